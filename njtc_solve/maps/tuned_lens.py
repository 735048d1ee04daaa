"""Carry fitted maps to tuned-lens, and read a tuned-lens folder as maps.

``python -m njtc_solve.export --format tuned-lens --shortcuts jtc.safetensors --out jtc-lens``
writes ``config.json`` and ``params.pt``, which tuned-lens 0.2.0 loads with
``TunedLens.from_model_and_pretrained(model, "jtc-lens")``. A map affine in ``h``
(``y = h·A + b``: full, narrow, residual or batch-normalised) becomes the translator
``weight = (A − I)ᵀ``, ``bias = b``; maps behind a per-token layer or RMS norm are refused, and
layers without a map get a zero translator. :func:`read_tuned_lens` reads such a folder back as
residual maps ``h + h·Wᵀ + b`` (method ``tuned-lens``), for ``evaluate --tuned-lens DIR``.
"""

from __future__ import annotations

import hashlib
import json
from functools import partial
from pathlib import Path

import numpy as np
import torch
from torch import nn

from njtc_solve.core.errors import NJTCError
from njtc_solve.core.head import Head
from njtc_solve.core.outputs import FolderKind, atomic_folder, check_finite
from njtc_solve.maps.compatibility import check_compatible
from njtc_solve.maps.lens_files import check_lens_output, check_recorded_model, check_tensor, load_torch
from njtc_solve.maps.shortcuts import ShortcutMap, Shortcuts

__all__ = ["TUNED_LENS_ARCHITECTURES", "TUNED_LENS_FILES", "affine_form", "check_exportable", "check_output_folder",
           "export_tuned_lens", "read_tuned_lens", "translator_state", "unembed_hash"]


METHOD = "tuned-lens"
SIDECAR = "njtc.json"  # beside config.json: the weights' hash, which tuned-lens's config has no key for
TUNED_LENS_FILES = ("config.json", "params.pt", SIDECAR)  # what an export writes
# model types whose final norm tuned-lens 0.2.0 finds (model_surgery.get_final_norm), among ours
TUNED_LENS_ARCHITECTURES = ("bloom", "gpt2", "gpt_neo", "gpt_neox", "gptj", "llama", "opt")
# an export folder: its njtc.json marks the files this project wrote there
TUNED_LENS_KIND = FolderKind("a tuned lens", SIDECAR, lambda c: c.get("format") == "njtc-tuned-lens",
                             TUNED_LENS_FILES, shared=True)


def affine_form(m: ShortcutMap, d: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(Δ, b)`` in float64 with ``m.predict(h) = h + h·Δ + b``: the map as a tuned-lens translator.

    Raises
    ------
    NJTCError
        For maps behind a per-token norm (``normalize`` ``layer`` or ``rms``).

    Examples
    --------
    >>> import torch
    >>> m = ShortcutMap(weight=2 * torch.eye(3), bias=torch.ones(3))
    >>> delta, b = affine_form(m, 3)
    >>> h = torch.randn(4, 3, dtype=torch.float64)
    >>> bool(torch.allclose(h + h @ delta + b, m.predict(h).double()))
    True
    """
    if m.normalize in ("layer", "rms"):
        raise NJTCError(f"a map behind a per-token {m.normalize} norm is not affine in h, so no tuned-lens "
                        "translator reproduces it; export full (jtc), narrow (njtc), residual or batch-normalised "
                        "maps")
    f64 = lambda t: None if t is None else t.to(torch.float64).cpu()
    weight = f64(m.weight) if m.weight is not None else (f64(m.U) @ f64(m.V) if m.U is not None else None)
    bias = torch.zeros(d, dtype=torch.float64) if m.bias is None else f64(m.bias)
    if m.normalize == "batch":  # ((h - μ)·s)·W = h·(diag(s)W) - (μ·s)·W; the identity map reads (h - μ)·s
        scale, mean = f64(m.norm_scale), f64(m.norm_mean)
        weight = torch.diag(scale) if weight is None else scale[:, None] * weight
        bias = bias - mean @ weight
    if weight is None:  # the identity: h (+ h when residual)
        delta = torch.eye(d, dtype=torch.float64) if m.residual else torch.zeros(d, d, dtype=torch.float64)
    else:
        delta = weight if m.residual else weight - torch.eye(d, dtype=torch.float64)
    return delta, bias


def translator_state(shortcuts: Shortcuts) -> dict[str, torch.Tensor]:
    """tuned-lens's ``params.pt``: ``{i}.weight`` (``Δᵀ``) and ``{i}.bias`` for ``i`` in ``0..L-1``."""
    d = _width(shortcuts)
    zero = torch.zeros(d, d, dtype=torch.float64), torch.zeros(d, dtype=torch.float64)
    state = {}
    for i in range(shortcuts.target_layer):
        delta, bias = affine_form(shortcuts.maps[i], d) if i in shortcuts.maps else zero
        state[f"{i}.weight"] = delta.T.to(torch.float32).contiguous()
        state[f"{i}.bias"] = bias.to(torch.float32)
    return state


def unembed_hash(unembed: torch.Tensor) -> str:
    """tuned-lens's hash of an unembedding matrix (``tuned_lens.utils.tensor_hash``)."""
    text = np.array_str(unembed.detach().cpu().float().numpy(), precision=1)
    return hashlib.sha256(text.encode()).hexdigest()


def export_tuned_lens(shortcuts: Shortcuts | str | Path, out: str | Path, *, model: nn.Module | None = None,
                      overwrite: bool = False) -> Path:
    """Write ``shortcuts`` as a tuned-lens folder (``config.json``, ``params.pt`` and ``njtc.json``).

    Parameters
    ----------
    shortcuts : path or Shortcuts
    out : path
        The folder (created; its parent must exist).
    model : transformers causal LM, optional
        The model the maps were fitted on: checked, and its name and unembedding hash recorded.
    overwrite : bool
        Replace a lens exported before.

    Returns
    -------
    Path

    Examples
    --------
    >>> from njtc_solve import fit_shortcuts
    >>> [jtc] = fit_shortcuts("activations.h5", method="jtc", ranks=None, progress=False)
    >>> folder = export_tuned_lens(jtc, "jtc-lens", model=model)
    >>> sorted(p.name for p in folder.iterdir())
    ['config.json', 'njtc.json', 'params.pt']
    >>> from tuned_lens.nn.lenses import TunedLens                   # the real package
    >>> tuned = TunedLens.from_model_and_pretrained(model, folder)
    >>> len(tuned), tuned.config.d_model
    (3, 32)
    """
    shortcuts = shortcuts if isinstance(shortcuts, Shortcuts) else Shortcuts.load(shortcuts)
    out = check_output_folder(out, overwrite=overwrite)
    state = check_exportable(shortcuts)  # before anything is written
    name, hashed = "", None
    if model is not None:
        name, hashed = _check_model(shortcuts, model)
    config = {"base_model_name_or_path": name, "d_model": _width(shortcuts),
              "num_hidden_layers": shortcuts.target_layer, "bias": True, "base_model_revision": None,
              "unembed_hash": hashed, "lens_type": "linear_tuned_lens"}
    sidecar = {"format": "njtc-tuned-lens", "method": shortcuts.method, "name": shortcuts.name,
               "model_sha256": shortcuts.model_sha256, "layers": sorted(shortcuts.maps)}
    check_finite(state, out / "params.pt")
    with atomic_folder(out, TUNED_LENS_KIND) as tmp:
        (tmp / SIDECAR).write_text(json.dumps(sidecar, indent=1) + "\n")
        torch.save(state, tmp / "params.pt")
        (tmp / "config.json").write_text(json.dumps(config, indent=1) + "\n")
    return out


def check_output_folder(out: str | Path, *, overwrite: bool = False) -> Path:
    """Refuse an export folder that cannot be written, holds a lens (without ``overwrite``) or foreign files."""
    return check_lens_output(out, overwrite, "params.pt", TUNED_LENS_KIND)


def check_exportable(shortcuts: Shortcuts) -> dict[str, torch.Tensor]:
    """Refuse maps tuned-lens cannot hold; their translators (:func:`translator_state`) when it can.

    Such maps target the last layer, are affine in ``h`` and read through a plain head (no logit
    scale, soft-cap or output projection). Needs no model.
    """
    check_compatible(shortcuts)
    if shortcuts.method == "identity":
        raise NJTCError("the identity is tuned-lens's LogitLens; there is nothing to export")
    state = translator_state(shortcuts)
    _check_head_description(shortcuts.head_description)
    return state


def _check_head_description(head: dict) -> None:
    """Refuse a head with a part that tuned-lens's unembedding leaves out (logit scale, soft-cap, projection)."""
    if head.get("logit_scale", 1.0) != 1.0 or head.get("softcap") is not None:
        raise NJTCError("these maps are for a head that scales or soft-caps its logits, which tuned-lens's "
                        "unembedding leaves out")
    if "output projection" in head.get("folded", []):
        raise NJTCError("these maps are for a head with an output projection (OPT's project_out), which "
                        "tuned-lens's unembedding leaves out")


def _check_model(shortcuts: Shortcuts, model) -> tuple[str, str]:
    """The model's name and unembedding hash, once it is known to be the maps' and loadable by tuned-lens."""
    from njtc_solve.core.decoder import Decoder

    head = check_compatible(shortcuts, model)
    model_type = model.config.model_type
    if model_type not in TUNED_LENS_ARCHITECTURES:
        raise NJTCError(f"tuned-lens 0.2.0 cannot find the final norm of {model_type!r} models; it loads "
                        f"{', '.join(TUNED_LENS_ARCHITECTURES)}")
    _check_head_description(head.describe())
    return model.config.name_or_path, unembed_hash(Decoder.of(model).unembed.weight)


def _width(shortcuts: Shortcuts) -> int:
    d = next((m.width for m in shortcuts.maps.values() if m.width is not None), None)
    if d is None:
        raise NJTCError(f"shortcuts {shortcuts.name} hold no tensor to tell their width from")
    return d


def read_tuned_lens(folder: str | Path, *, head: Head | None = None, model_sha256: str = "") -> Shortcuts:
    """Read a tuned-lens folder as residual maps ``h + h·Wᵀ + b`` (method ``tuned-lens``).

    Parameters
    ----------
    folder : path
        Holds ``config.json`` and ``params.pt`` (tuned-lens's layout).
    head : Head, optional
        The head the lens will be read through: of the lens's width and ``unembed_hash``.
    model_sha256 : str
        The weights' hash of that model, recorded in the maps; an export's other hash is refused.

    Returns
    -------
    Shortcuts
        One residual full map per layer ``0..L-1``, target layer ``L``.

    Examples
    --------
    >>> from njtc_solve import fit_shortcuts
    >>> [jtc] = fit_shortcuts("activations.h5", method="jtc", ranks=None, progress=False)
    >>> back = read_tuned_lens(export_tuned_lens(jtc, "jtc-lens"), model_sha256=jtc.model_sha256)
    >>> import torch
    >>> h = torch.randn(4, 32)
    >>> back.name, bool(torch.allclose(back.transform_hidden(h, 1), jtc.transform_hidden(h, 1), atol=1e-4))
    ('tuned-lens', True)
    """
    folder = Path(folder)
    if not (folder / "config.json").is_file() or not (folder / "params.pt").is_file():
        raise NJTCError(f"{folder} is not a tuned-lens folder (it needs config.json and params.pt)")
    config = _read_config(folder)
    d, n_layers = config["d_model"], config["num_hidden_layers"]
    state = _read_params(folder, d, n_layers)
    maps = {}
    for i in range(n_layers):
        weight, bias = state[f"{i}.weight"], state.get(f"{i}.bias")
        maps[i] = ShortcutMap(weight=weight.T.float().contiguous(), residual=True,
                              bias=None if bias is None else bias.float())
    recorded = _recorded_sha256(folder)
    check_recorded_model(recorded, model_sha256, f"the tuned lens in {folder}")
    if head is not None:
        if head.d_model != d:
            raise NJTCError(f"the tuned lens in {folder} has width {d}; the model's is {head.d_model}")
        if config.get("unembed_hash") and config["unembed_hash"] != unembed_hash(head.unembed):
            raise NJTCError(f"the tuned lens in {folder} was trained with another unembedding (unembed_hash "
                            "differs): another model")
    return Shortcuts(METHOD, maps, n_layers, model_sha256=model_sha256 or recorded, residual=True, label=METHOD,
                     provenance={"tuned_lens": str(folder), "base_model": config.get("base_model_name_or_path")})


def _unreadable(folder: Path, problem: str) -> NJTCError:
    return NJTCError(f"{folder} is not a tuned-lens folder this library reads: {problem}")


def _read_config(folder: Path) -> dict:
    """``config.json`` of a tuned-lens folder, checked: a linear lens of positive ``d_model`` and layer count."""
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):  # UnicodeDecodeError is a ValueError
        raise _unreadable(folder, "config.json is not JSON") from None
    if not isinstance(config, dict):
        raise _unreadable(folder, f"config.json holds a JSON {type(config).__name__}, not an object")
    if config.get("lens_type", "linear_tuned_lens") != "linear_tuned_lens":
        raise _unreadable(folder, f"lens_type {config.get('lens_type')!r}, not linear_tuned_lens")
    if config.get("unembed_hash") is not None and not isinstance(config["unembed_hash"], str):
        raise _unreadable(folder, f"config.json's unembed_hash is a {type(config['unembed_hash']).__name__}, "
                                  "not a string")
    d, n_layers = config.get("d_model"), config.get("num_hidden_layers")
    if type(d) is not int or type(n_layers) is not int or d < 1 or n_layers < 1:
        raise _unreadable(folder, "config.json needs positive integers d_model and num_hidden_layers")
    return config


def _read_params(folder: Path, d: int, n_layers: int) -> dict:
    """``params.pt`` of a tuned-lens folder, checked: ``{i}.weight`` (d, d) and optional ``{i}.bias`` (d,), finite."""
    state = load_torch(folder / "params.pt", partial(_unreadable, folder), "params.pt")
    weights = {f"{i}.weight" for i in range(n_layers)}
    if not isinstance(state, dict):
        raise _unreadable(folder, f"params.pt holds a {type(state).__name__}, not a state dict")
    if not weights <= set(state) <= weights | {f"{i}.bias" for i in range(n_layers)}:
        raise _unreadable(folder, f"params.pt must hold {{i}}.weight (and {{i}}.bias) for i in 0..{n_layers - 1}")
    for name, value in state.items():
        check_tensor(value, f"params.pt entry {name}", (d, d) if name.endswith(".weight") else (d,),
                     partial(_unreadable, folder))
    return state


def _recorded_sha256(folder: Path) -> str:
    """The weights' hash an export recorded beside the lens (``njtc.json``); ``""`` for a lens without one."""
    sidecar = folder / SIDECAR
    if not sidecar.is_file():
        return ""
    try:
        content = json.loads(sidecar.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        raise _unreadable(folder, f"{SIDECAR} is not JSON") from None
    if not isinstance(content, dict) or not isinstance(content.get("model_sha256", ""), str):
        raise _unreadable(folder, f"{SIDECAR} is not a JSON object with a string model_sha256")
    return content.get("model_sha256", "")

