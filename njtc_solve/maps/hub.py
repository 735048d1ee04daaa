"""Fitted maps shared as models are: a folder (``save_pretrained``), loaded from it or from a hub
repository (``from_pretrained``), and pushed to the Hugging Face Hub (``push_to_hub``).

A folder holds ``shortcuts.safetensors`` (the shortcut file), ``config.json`` (what the maps are,
with the format mark ``njtc-shortcuts-pretrained``, model, corpus, split and held-out metrics) and
``README.md`` (a model card). The functions take the class or the maps as an argument, so
:class:`~njtc_solve.maps.shortcuts.Shortcuts` reaches them as methods without an import circle.
"""

from __future__ import annotations

import json
import math
import re
import tempfile
from pathlib import Path

from njtc_solve.core.errors import NJTCError
from njtc_solve.core.outputs import FolderKind, atomic_folder, check_folder_output

__all__ = ["CONFIG", "FORMAT", "PRETRAINED_FILES", "WEIGHTS", "card_text", "load_pretrained", "push_to_hub",
           "save_pretrained"]

FORMAT = "njtc-shortcuts-pretrained"
FORMAT_VERSION = 1
WEIGHTS = "shortcuts.safetensors"
CONFIG = "config.json"
CARD = "README.md"
PRETRAINED_FILES = (WEIGHTS, CONFIG, CARD)
_REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")  # owner/name, as the hub spells repositories
_CARD_METRICS = ("precision@1", "precision@5", "kl", "surprisal", "r2", "mse", "n_rows")


# a saved-maps folder: its config.json carries the format mark and lists the files written
PRETRAINED_KIND = FolderKind("saved maps", CONFIG, lambda c: c.get("format") == FORMAT, PRETRAINED_FILES)


def _metric_rows(shortcuts, metrics) -> list[dict]:
    """Held-out figures per layer for the card: from ``metrics``, else the maps' ``stats["held_out"]``."""
    if metrics is None:
        metrics = shortcuts.stats.get("held_out")
    if metrics is None:
        return []
    records = getattr(metrics, "records", metrics)  # an EvaluationResult, or what it holds
    if isinstance(records, dict):
        records = [{"layer": int(layer), **dict(values)} for layer, values in records.items()]
    if not isinstance(records, (list, tuple)) or not all(isinstance(r, dict) and "layer" in r for r in records):
        raise NJTCError("`metrics` must be an evaluation result, its records, or {layer: {metric: value}}")
    own = [r for r in records if r.get("method", shortcuts.name) == shortcuts.name]
    if records and not own:
        raise NJTCError(f"`metrics` hold no figures of {shortcuts.name} (methods: "
                        f"{', '.join(sorted({str(r.get('method')) for r in records}))})")
    rows = []
    for r in sorted(own, key=lambda r: int(r["layer"])):
        row = {"layer": int(r["layer"])}
        for key, value in r.items():
            if key in ("method", "family", "layer", "rank", "params", "reduction", "total_params"):
                continue
            if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
                row[key] = value
        rows.append(row)
    return rows


def _config(shortcuts, model: str, corpus: str, rows: list[dict]) -> dict:
    provenance = shortcuts.provenance
    return {
        "format": FORMAT, "format_version": FORMAT_VERSION, "library": "njtc_solve", "method": shortcuts.method,
        "name": shortcuts.name, "rank": shortcuts.rank, "normalize": shortcuts.normalize,
        "residual": shortcuts.residual, "fit_intercept": shortcuts.fit_intercept, "alpha": shortcuts.alpha,
        "layers": sorted(shortcuts.maps), "target_layer": shortcuts.target_layer,
        "n_layers": shortcuts.stats.get("n_layers", shortcuts.target_layer), "model": model,
        "model_sha256": shortcuts.model_sha256, "head_sha256": shortcuts.head_sha256, "corpus": corpus,
        "corpus_sha256": provenance.get("corpus_sha256"),
        "split": {k: provenance.get(k) for k in ("split_by", "seed", "val_fraction", "seq_len", "positions",
                                                  "max_tokens", "split_id")},
        "held_out": rows, "weights": WEIGHTS,
        "one_jump": shortcuts.one_jump, "total_params": shortcuts.total_params,  # one map for every layer, or None
    }


def card_text(config: dict) -> str:
    """The model card (``README.md``) of a folder with this ``config.json``."""
    front = ["---", "library_name: njtc_solve", "tags:", "- njtc_solve", "- shortcut-maps", "- logit-lens",
             f"- {config['method']}"]
    if config["model"] and _REPO_ID.fullmatch(config["model"]):
        front.append(f"base_model: {config['model']}")
    front.append("---")
    split = config["split"]
    described = ", ".join(f"{k} {v}" for k, v in split.items() if v is not None and k != "split_id")
    rank = "full (d × d)" if config["rank"] is None else str(config["rank"])
    lines = [*front, "", f"# {config['name']}: shortcut maps to layer {config['target_layer']}", "",
             f"Closed-form shortcut maps ({config['method']}) from the residual stream of layers "
             f"{_layer_range(config['layers'])} to layer {config['target_layer']}, read through the model's own "
             "final norm and unembedding, fitted with njtc_solve.", "",
             "| | |", "|---|---|",
             f"| model | {config['model'] or 'not recorded'} |",
             f"| model weights sha256 | `{config['model_sha256'] or 'not recorded'}` |",
             f"| corpus | {config['corpus'] or 'not recorded'} |",
             f"| corpus sha256 | `{config['corpus_sha256'] or 'not recorded'}` |",
             f"| split | {described or 'not recorded'} |",
             f"| method | {config['method']} (normalize {config['normalize']}, residual "
             f"{str(config['residual']).lower()}, intercept {str(config['fit_intercept']).lower()}) |",
             f"| rank | {rank} |", "",
             "## Use", "", "```python", "from njtc_solve import Shortcuts", "",
             'maps = Shortcuts.from_pretrained("THIS_FOLDER_OR_REPO")',
             "logits = maps.attach_head(model)(hidden, layer)",
             "```", ""]
    rows = config["held_out"]
    if rows:
        metrics = [m for m in _CARD_METRICS if any(m in r for r in rows)]
        metrics += sorted({k for r in rows for k in r} - set(metrics) - {"layer"})
        lines += ["## Held-out metrics", "", "On validation rows the maps were not fitted on.", "",
                  "| layer | " + " | ".join(metrics) + " |", "|---" * (len(metrics) + 1) + "|"]
        for r in rows:
            cells = [_cell(r.get(m)) for m in metrics]
            lines.append(f"| {r['layer']} | " + " | ".join(cells) + " |")
        lines.append("")
    else:
        lines += ["## Held-out metrics", "", "None recorded: evaluate with `python -m njtc_solve.evaluate`, and save "
                  "with `metrics=` to show them here.", ""]
    return "\n".join(lines)


def _cell(value) -> str:
    if value is None:
        return ""
    return str(value) if isinstance(value, int) else f"{value:.4g}"


def _layer_range(layers: list[int]) -> str:
    if not layers:
        return "none"
    if layers == list(range(layers[0], layers[-1] + 1)):
        return f"{layers[0]}–{layers[-1]}" if len(layers) > 1 else str(layers[0])
    return ", ".join(map(str, layers))


def save_pretrained(shortcuts, folder, *, model: str = "", corpus: str = "", metrics=None,
                    overwrite: bool = False) -> Path:
    """Write ``shortcuts`` as a folder: the shortcut file, ``config.json`` and a ``README.md`` model card.

    Parameters
    ----------
    shortcuts : Shortcuts
    folder : path
        Written whole (its parent must exist); an existing folder only when empty, or saved
        before and ``overwrite`` given.
    model, corpus : str
        How the card names the model and the corpus (default: the maps' provenance).
    metrics : EvaluationResult, its records or ``{layer: {metric: value}}``, optional
        Held-out figures for the card (default: ``stats["held_out"]`` where recorded).
    overwrite : bool
        Replace a folder saved before.

    Returns
    -------
    Path

    Examples
    --------
    >>> from njtc_solve import Shortcuts, fit_shortcuts
    >>> [jtc] = fit_shortcuts("activations.h5", method="jtc", ranks=None, progress=False)
    >>> folder = jtc.save_pretrained("jtc-maps", metrics={1: {"precision@1": 0.5, "kl": 1.25}})
    >>> sorted(p.name for p in folder.iterdir())
    ['README.md', 'config.json', 'shortcuts.safetensors']
    >>> Shortcuts.from_pretrained("jtc-maps").name
    'jtc'
    """
    folder = Path(folder)
    if folder.is_dir() and PRETRAINED_KIND.is_own(folder) and not overwrite:
        raise NJTCError(f"{folder} already holds saved maps; pass `overwrite=True` to replace them")
    check_folder_output(folder, "`folder`", PRETRAINED_FILES, PRETRAINED_KIND)
    provenance = shortcuts.provenance
    config = _config(shortcuts, model or str(provenance.get("model") or ""),
                     corpus or str(provenance.get("corpus") or ""), _metric_rows(shortcuts, metrics))
    with atomic_folder(folder, PRETRAINED_KIND, label="`folder`") as tmp:
        shortcuts.save(tmp / WEIGHTS)
        (tmp / CONFIG).write_text(json.dumps(config, indent=1, default=str) + "\n", encoding="utf-8")
        (tmp / CARD).write_text(card_text(config), encoding="utf-8")
    return folder


def _read_config(folder: Path) -> dict:
    try:
        config = json.loads((folder / CONFIG).read_text(encoding="utf-8"))
    except OSError:
        raise NJTCError(f"{folder} is not a saved-maps folder (it needs {CONFIG} and {WEIGHTS})") from None
    except ValueError:
        raise NJTCError(f"{folder}/{CONFIG} is not JSON") from None
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        raise NJTCError(f"{folder} is not a saved-maps folder: its {CONFIG} has no format {FORMAT!r} "
                        "(a model's config?)")
    if config.get("format_version") != FORMAT_VERSION:
        raise NJTCError(f"{folder} has saved-maps format version {config.get('format_version')!r}; this library "
                        f"reads {FORMAT_VERSION}")
    return config


def _download(repo_id: str, revision: str | None, token, cache_dir) -> Path:
    """The local snapshot of a hub repository's saved maps (``huggingface_hub.snapshot_download``)."""
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise NJTCError(f"loading {repo_id!r} from the hub needs huggingface_hub: "
                        "pip install huggingface_hub") from None
    try:
        path = snapshot_download(repo_id=repo_id, revision=revision, token=token, cache_dir=cache_dir,
                                 allow_patterns=list(PRETRAINED_FILES), library_name="njtc_solve")
    except Exception as err:  # not found, gated, offline
        raise _hub_error(f"cannot load {repo_id!r} from the hub (and there is no local folder of that name)",
                         err) from None
    return Path(path)


def _hub_error(problem: str, err: Exception) -> NJTCError:
    """``problem``, then the hub's error: its type and its own first line."""
    text = str(err).strip().splitlines()
    return NJTCError(f"{problem}: {type(err).__name__}" + (f": {text[0]}" if text else ""))


def load_pretrained(cls, name_or_path, *, revision: str | None = None, head=None, token=None, cache_dir=None):
    """Maps saved by :func:`save_pretrained`, from a local folder or a hub repository ``owner/name``.

    Parameters
    ----------
    cls : type
        :class:`~njtc_solve.maps.shortcuts.Shortcuts` (or a subclass).
    name_or_path : str or path
        A local folder, or a hub repository id (``huggingface_hub.snapshot_download``).
    revision, token, cache_dir
        Passed to ``snapshot_download``.
    head : Head, ActivationStore or model, optional
        Attached as by :meth:`Shortcuts.load`.

    Raises
    ------
    NJTCError
        Neither a folder nor a repository id, a folder this project did not save, a damaged
        shortcut file, a ``config.json`` that disagrees with it, the hub's refusal.
    """
    path = Path(name_or_path)
    if path.is_dir():
        folder = path
    elif isinstance(name_or_path, str) and _REPO_ID.fullmatch(name_or_path) and not path.exists():
        folder = _download(name_or_path, revision, token, cache_dir)
    else:
        raise NJTCError(f"{name_or_path} is neither a saved-maps folder nor a hub repository id (owner/name)")
    config = _read_config(folder)
    if not (folder / WEIGHTS).is_file():
        raise NJTCError(f"{folder} is a saved-maps folder without its {WEIGHTS}")
    shortcuts = cls.load(folder / WEIGHTS, head=head)
    recorded = {"method": shortcuts.method, "layers": sorted(shortcuts.maps), "target_layer": shortcuts.target_layer,
                "model_sha256": shortcuts.model_sha256}
    for key, value in recorded.items():
        if config.get(key) != value:
            raise NJTCError(f"{folder}/{CONFIG} says {key} {config.get(key)!r}, its {WEIGHTS} {value!r}: the folder "
                            "was changed by hand")
    return shortcuts


def push_to_hub(shortcuts, repo_id: str, *, token: str | None = None, private: bool | None = None,
                commit_message: str | None = None, revision: str | None = None, model: str = "", corpus: str = "",
                metrics=None) -> str:
    """Upload ``shortcuts`` as a folder (:func:`save_pretrained`) to the hub repository ``repo_id``.

    Creates the repository if needed. Needs a token: ``token=``, ``HF_TOKEN`` or ``huggingface-cli login``.

    Returns
    -------
    str
        The commit's URL.
    """
    try:
        from huggingface_hub import HfApi, get_token
    except ImportError:
        raise NJTCError("pushing to the hub needs huggingface_hub: pip install huggingface_hub") from None
    if not isinstance(repo_id, str) or not _REPO_ID.fullmatch(repo_id):
        raise NJTCError(f"`repo_id` must be owner/name, not {repo_id!r}")
    if token is None and get_token() is None:
        raise NJTCError("pushing to the hub needs a token: pass `token`, set HF_TOKEN or run huggingface-cli login")
    api = HfApi(token=token)
    with tempfile.TemporaryDirectory(prefix="njtc-push-") as tmp:
        folder = save_pretrained(shortcuts, Path(tmp) / "maps", model=model, corpus=corpus, metrics=metrics)
        try:
            api.create_repo(repo_id, private=private, exist_ok=True)
            info = api.upload_folder(repo_id=repo_id, folder_path=str(folder), revision=revision,
                                     commit_message=commit_message or f"Upload {shortcuts.name} shortcut maps")
        except Exception as err:  # no rights, offline
            raise _hub_error(f"cannot push to {repo_id!r}", err) from None
    return str(getattr(info, "commit_url", info))
