"""The lens: fitted shortcuts read on a live model, for any prompt, layer by layer.

``python -m njtc_solve.lens --shortcuts jtc.safetensors --prompt "The capital of France is" --out lens``
prints a per-layer table and writes into ``--out`` ``trajectory.png`` (layers × positions, each
cell the top-1 token, coloured by KL to the model's final distribution or by the top-1
probability; the logit lens beside each lens), ``trajectory.json``, ``trajectory.csv`` and
``lens.html`` (an interactive page: :mod:`njtc_solve.evaluation.lens_page`). ``--shortcuts``
may be repeated, and goes with ``--tuned-lens`` and ``--jacobian-lens``.

:class:`ShortcutLens` follows tuned-lens's ``Lens`` conventions; its metrics are evaluation's,
through the same map, head and :mod:`njtc_solve.core.metrics`, in float32.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch
from torch import nn

from njtc_solve.core.decoder import Decoder
from njtc_solve.core.errors import NJTCError
from njtc_solve.core.head import Head
from njtc_solve.core.metrics import Reference, kl_divergence
from njtc_solve.core.models import context_length
from njtc_solve.core.outputs import FolderKind, atomic_folder, atomic_output
from njtc_solve.core.params import DEVICE, Interval, Options, check_spec
from njtc_solve.data.capture import capture_residual_stream
from njtc_solve.evaluation.lens_page import inline_frame, lens_page
from njtc_solve.evaluation.report import write_csv
from njtc_solve.maps.compatibility import check_compatible
from njtc_solve.maps.shortcuts import ShortcutMap, Shortcuts

__all__ = ["LENS_FILES", "LensSpec", "ShortcutLens", "Trajectory", "merge_trajectories", "plot_trajectory",
           "write_trajectory"]


IDENTITY = "identity"  # the logit lens, named as in evaluation
LENS_FILES = ("trajectory.png", "trajectory.json", "trajectory.csv", "lens.html")  # what --out receives
LENS_KIND = FolderKind("a lens output", "trajectory.json", lambda c: {"meta", "records"} <= set(c), LENS_FILES,
                       shared=True, lists_files=False)


@dataclass(frozen=True)
class LensSpec:
    """The settings of a lens reading, checked when made, before the model loads.

    Parameters
    ----------
    k, batch_size, chunk_rows : int
        Top tokens kept per cell, prompts per forward pass, rows per chunk of logits.
    color : {"kl", "prob"}
        Cell colour of the figure.
    max_positions : int
        Positions drawn in the figure (the last).
    device : str
    dtype : {"float32", "bfloat16", "float16"}
        The model's dtype while it is read.

    Examples
    --------
    >>> LensSpec(color="red")
    Traceback (most recent call last):
      ...
    njtc_solve.core.errors.NJTCError: `color` must be kl or prob, not 'red'
    """

    k: int = 5
    batch_size: int = 8
    chunk_rows: int = 256
    color: str = "kl"
    max_positions: int = 24
    device: str = "cpu"
    dtype: str = "float32"

    constraints: ClassVar[dict] = {
        "k": [Interval(int, 1, None, show_value=False)],
        "batch_size": [Interval(int, 1, None)],
        "chunk_rows": [Interval(int, 1, None)],
        "color": [Options(("kl", "prob"), says="kl or prob")],
        "max_positions": [Interval(int, 1, None, show_value=False)],
        "device": [DEVICE],
        "dtype": [Options(("float32", "bfloat16", "float16"))],
    }

    def __post_init__(self):
        check_spec(self)

    def check_maps(self, shortcuts: Shortcuts | None) -> None:
        """Refuse ``k`` above the vocabulary the maps' model records (before that model loads)."""
        vocab = shortcuts.head_description.get("vocab_size") if shortcuts is not None else None
        if isinstance(vocab, int) and self.k > vocab:
            raise NJTCError(f"`k` {self.k} is above the vocabulary of the maps' model ({vocab} tokens)")


class ShortcutLens(nn.Module):
    """Decode hidden states of any layer into logits through fitted shortcut maps.

    Built with :meth:`from_model`; :attr:`shortcuts` holds the maps with the model's head attached.

    Examples
    --------
    >>> from njtc_solve import fit_shortcuts
    >>> [jtc] = fit_shortcuts("activations.h5", method="jtc", ranks=None, progress=False)
    >>> lens = ShortcutLens.from_model(model, jtc, tokenizer)
    >>> traj = lens.trajectory("The lens reads every layer.", k=3)
    >>> df = traj.to_pandas()
    >>> sorted(df.method.unique()), int(df.layer.max()) == model.config.num_hidden_layers
    (['identity', 'jtc'], True)
    >>> import torch
    >>> tuple(lens(torch.zeros(2, 5, 32), 1).shape)      # forward(h, idx), as tuned-lens
    (2, 5, 300)
    """

    def __init__(self, head: Head, shortcuts: Shortcuts):
        super().__init__()
        check_compatible(shortcuts)  # the head reads the last layer only
        # new map modules over the same tensors (no copy): moving or casting the lens never moves the caller's maps
        own = {l: ShortcutMap(**{k: None if t is None else t.detach() for k, t in m.tensors().items()},
                              normalize=m.normalize, residual=m.residual) for l, m in shortcuts.maps.items()}
        self.shortcuts = shortcuts.replace(head=head, maps=own)  # the model's head attached
        self.n_layers = int(shortcuts.target_layer)
        self.name, self.method = shortcuts.name, shortcuts.method
        self.__dict__.update(model=None, tokenizer=None)  # not submodules: the lens's state is its maps

    @classmethod
    def from_model(cls, model: nn.Module, shortcuts: Shortcuts | str | Path | None = None, tokenizer=None, *,
                   model_sha256: str | None = None) -> ShortcutLens:
        """The lens of ``shortcuts`` on ``model`` (placed on the model's device).

        Parameters
        ----------
        model : transformers causal LM
        shortcuts : path or Shortcuts, optional
            A shortcut file or fitted maps; ``None`` is the logit lens alone.
        tokenizer : optional
            The model's tokenizer, to read prompts and decode tokens.
        model_sha256 : str, optional
            The weights' hash the maps must have been fitted on (default: the model's; pass the
            float32 weights' hash for a model cast since).

        Raises
        ------
        NJTCError
            When the maps do not belong to the model (:func:`~njtc_solve.maps.compatibility.check_compatible`).
        """
        if shortcuts is None:
            n_layers = Decoder.of(model).n_blocks
            shortcuts = Shortcuts.identity(range(n_layers), n_layers)
        elif not isinstance(shortcuts, Shortcuts):
            shortcuts = Shortcuts.load(shortcuts)
        head = check_compatible(shortcuts, model, model_sha256=model_sha256)
        device = next(model.parameters()).device
        lens = cls(head, shortcuts).to(device)  # the lens's own map modules move, not the caller's
        lens.__dict__.update(model=model, tokenizer=tokenizer)
        return lens

    @property
    def layers(self) -> list[int]:
        """Source layers with a map (the last layer, ``n_layers``, needs none)."""
        return sorted(self.shortcuts.maps)

    def head(self) -> Head:
        """The model's final norm and unembedding, as attached to :attr:`shortcuts`."""
        return self.shortcuts.head

    def shortcut(self, idx: int) -> ShortcutMap:
        """The map of source layer ``idx`` (the identity for the last layer)."""
        return self.shortcuts._map(idx)

    def transform_hidden(self, h: torch.Tensor, idx: int) -> torch.Tensor:
        """Map hidden states ``h`` (..., d) of layer ``idx`` to estimates of the last layer (float32)."""
        return self.shortcuts.transform_hidden(h, idx)

    def forward(self, h: torch.Tensor, idx: int) -> torch.Tensor:
        """Logits (..., vocab) of hidden states ``h`` (..., d) of layer ``idx``, through its map and the head."""
        return self.shortcuts(h, idx)

    def trajectory(self, inputs, *, k: int = 5, batch_size: int = 8, chunk_rows: int = 256) -> Trajectory:
        """Run the model once over ``inputs`` and read every layer × position through the lens.

        Parameters
        ----------
        inputs : str, list of str, list of int, list of lists of int, or a 2-d tensor of ids
            Prompts or token ids; several are run ``batch_size`` at a time, padded on the right.
        k : int
            Top tokens kept per cell.

        Returns
        -------
        Trajectory
            For the logit lens and this lens, per prompt, layer ``0..L`` and position.
        """
        LensSpec(k=k, batch_size=batch_size, chunk_rows=chunk_rows, device=None)
        if self.model is None:
            raise NJTCError("this lens has no model; build it with ShortcutLens.from_model(model, ...)")
        head = self.head()
        if k > head.vocab_size:
            raise NJTCError(f"`k` is {k}, above the vocabulary's {head.vocab_size} tokens")
        ids = self._token_ids(inputs)
        lenses = {IDENTITY: ShortcutLens(head, Shortcuts.identity(range(self.n_layers), self.n_layers))}
        if self.method != IDENTITY:
            lenses[self.name] = self
        methods = list(lenses)
        n_b, n_l, n_t = len(ids), self.n_layers + 1, max(map(len, ids))
        shape = (len(methods), n_b, n_l, n_t)
        out = {"topk_ids": np.full((*shape, k), -1, np.int64), "topk_probs": np.full((*shape, k), np.nan, np.float32),
               "entropy": np.full(shape, np.nan), "kl": np.full(shape, np.nan), "agrees": np.zeros(shape, bool),
               "valid": np.zeros(shape, bool), "final_top1": np.full((n_b, n_t), -1, np.int64),
               "final_prob": np.full(shape, np.nan, np.float32), "final_rank": np.zeros(shape, np.int64)}
        device, here = next(self.model.parameters()).device, head.unembed.device
        with capture_residual_stream(self.model) as hidden, torch.no_grad():
            for b0 in range(0, n_b, batch_size):
                batch = ids[b0:b0 + batch_size]
                lengths = [len(s) for s in batch]
                width = max(lengths)
                padded = torch.zeros(len(batch), width, dtype=torch.long, device=device)
                mask = torch.zeros_like(padded)
                for i, s in enumerate(batch):
                    padded[i, :len(s)] = torch.as_tensor(s)
                    mask[i, :len(s)] = 1
                kwargs = {} if min(lengths) == width else {"attention_mask": mask}
                model_logits = self.model(input_ids=padded, use_cache=False, **kwargs).logits
                keep = mask.bool()  # rows: valid positions of the batch, in row-major order
                where = keep.nonzero().cpu().numpy()
                prompt_of, position_of = where[:, 0] + b0, where[:, 1]
                own_top1 = _valid_rows(model_logits, keep, here).argmax(-1)
                out["final_top1"][prompt_of, position_of] = own_top1.cpu().numpy()
                rows_of = [_valid_rows(h, keep, here) for h in hidden]
                for r0 in range(0, len(where), chunk_rows):
                    part = slice(r0, r0 + chunk_rows)
                    final = Reference.from_logits(head.logits(rows_of[-1][part]))
                    p_, t_ = prompt_of[part], position_of[part]
                    for m, lens in enumerate(lenses.values()):
                        for layer in range(n_l):
                            if layer < self.n_layers and layer not in lens.shortcuts.maps:
                                continue
                            logits = lens(rows_of[layer][part], layer)
                            own = Reference.from_logits(logits)  # one softmax for top-k and entropy
                            top = own.logp.topk(k, -1)
                            final_logp = own.logp.gather(-1, own_top1[part, None])  # the model's top-1's
                            cells = {"topk_ids": top.indices, "topk_probs": top.values.exp(),
                                     "entropy": -own.neg_entropy, "kl": kl_divergence(final, logits),
                                     "agrees": top.indices[:, 0] == own_top1[part],
                                     "final_prob": final_logp[:, 0].exp(),  # and its rank, 1 = the lens's top-1
                                     "final_rank": (own.logp > final_logp).sum(-1) + 1}
                            for key, value in cells.items():
                                out[key][m, p_, layer, t_] = value.cpu().numpy()
                            out["valid"][m, p_, layer, t_] = True
        return Trajectory(methods, ids, **out, tokenizer=self.tokenizer)

    def _token_ids(self, inputs) -> list[list[int]]:
        """``inputs`` as lists of token ids, checked against the vocabulary and the context length."""
        if isinstance(inputs, torch.Tensor):
            inputs = inputs.tolist()
        if isinstance(inputs, str):
            inputs = [inputs]
        if isinstance(inputs, (list, tuple)) and inputs and all(isinstance(t, int) for t in inputs):
            inputs = [list(inputs)]
        if not isinstance(inputs, (list, tuple)) or not inputs:
            raise NJTCError("give a prompt, a list of prompts or token ids")
        ids = []
        for item in inputs:
            if isinstance(item, str):
                if self.tokenizer is None:
                    raise NJTCError("a text prompt needs the tokenizer: ShortcutLens.from_model(model, s, tokenizer)")
                item = self.tokenizer(item)["input_ids"]
            item = [int(t) for t in item]
            if not item:
                raise NJTCError("a prompt has no tokens")
            vocab = self.head().vocab_size
            if min(item) < 0 or max(item) >= vocab:
                raise NJTCError(f"token ids must be in [0, {vocab})")
            ids.append(item)
        limit = context_length(self.model.config)
        if limit is not None and max(map(len, ids)) > limit:
            raise NJTCError(f"a prompt has {max(map(len, ids))} tokens; the model reads at most {limit}")
        return ids


def _valid_rows(t: torch.Tensor, keep: torch.Tensor, device) -> torch.Tensor:
    """The rows ``t[keep]`` of a (batch, seq, ...) tensor, moved to ``device`` (for a model spread over devices)."""
    return t[keep.to(t.device)].to(device)


@dataclass
class Trajectory:
    """What each lens reads at every layer × position of one or more prompts.

    Arrays are indexed ``[method, prompt, layer, position]`` (``topk_*`` have a last axis of
    ``k``); ``valid`` is False on padding and at layers a method has no map for.
    ``final_top1[prompt, position]`` is the model's own top-1; ``final_prob`` and ``final_rank``
    (1 = the lens's top-1) what each lens gives it (may be ``None``).
    """

    methods: list[str]
    token_ids: list[list[int]]
    topk_ids: np.ndarray
    topk_probs: np.ndarray
    entropy: np.ndarray
    kl: np.ndarray
    agrees: np.ndarray
    valid: np.ndarray
    final_top1: np.ndarray
    tokenizer: object = None
    final_prob: np.ndarray | None = None
    final_rank: np.ndarray | None = None

    @property
    def n_layers(self) -> int:
        """``L``: rows are layers ``0..L``, ``L`` being the model's own output."""
        return self.kl.shape[2] - 1

    def decode(self, ids) -> list[str]:
        """Token strings of ``ids`` (the ids themselves without a tokenizer)."""
        ids = [int(i) for i in ids]
        if self.tokenizer is None:
            return [str(i) for i in ids]
        return [self.tokenizer.decode([i]) for i in ids]

    def _token_texts(self) -> tuple[np.ndarray, list[str]]:
        """The distinct token ids the trajectory shows (top-k, the model's top-1, the inputs) and their texts."""
        every = np.unique(np.concatenate([self.topk_ids[self.valid].ravel(), self.final_top1.ravel(),
                                          *map(np.asarray, self.token_ids)]))
        every = every[every >= 0]
        return every, self.decode(every)

    def records(self) -> list[dict]:
        """One record per method, prompt, layer and position (the rows of :meth:`to_pandas`)."""
        ids, texts = self._token_texts()
        vocab = dict(zip(ids.tolist(), texts))
        out = []
        for m, p, layer, t in zip(*np.nonzero(self.valid)):
            ids, probs = self.topk_ids[m, p, layer, t], self.topk_probs[m, p, layer, t]
            out.append({
                "method": self.methods[m], "prompt": int(p), "layer": int(layer), "position": int(t),
                "input_token": vocab[self.token_ids[p][t]], "top1_token": vocab[int(ids[0])],
                "top1_prob": float(probs[0]), "entropy": float(self.entropy[m, p, layer, t]),
                "kl": float(self.kl[m, p, layer, t]), "agrees": bool(self.agrees[m, p, layer, t]),
                "final_token": vocab[int(self.final_top1[p, t])],
                "topk_tokens": [vocab[int(i)] for i in ids], "topk_probs": [float(x) for x in probs],
            })
            if self.final_prob is not None:
                out[-1].update(final_prob=float(self.final_prob[m, p, layer, t]),
                               final_rank=int(self.final_rank[m, p, layer, t]))
        return out

    def to_html(self, path=None, *, title: str | None = None, prompts: list[str] | None = None) -> str:
        """The interactive page of this trajectory, written to ``path`` when given; returns its text."""
        page = lens_page(self, title=title, prompts=prompts)
        if path is not None:
            with atomic_output(Path(path)) as tmp:
                tmp.write_text(page, encoding="utf-8")
        return page

    def _repr_html_(self) -> str:
        """The page inline in Jupyter."""
        return inline_frame(self.to_html())

    def to_pandas(self):
        """A tidy table: one row per method, prompt, layer and position (needs pandas)."""
        import pandas as pd

        return pd.DataFrame(self.records())

    def summary(self, prompt: int = 0) -> str:
        """A compact per-layer table: mean KL and top-1 agreement over positions, and the top-1 at the end."""
        n = len(self.token_ids[prompt])
        last = n - 1
        lines = [f"{n} tokens; the last is {self.decode([self.token_ids[prompt][last]])[0]!r}, the model's next "
                 f"{self.decode([self.final_top1[prompt, last]])[0]!r}",
                 f"{'':5}" + "".join(f"   {name[:28]:<28}" for name in self.methods),
                 f"{'layer':>5}" + f"   {'KL':>7} {'agree':>5} {'top-1 at end':<14}" * len(self.methods)]
        for layer in range(self.n_layers + 1):
            line = f"{layer if layer < self.n_layers else 'out':>5}"
            for m in range(len(self.methods)):
                ok = self.valid[m, prompt, layer, :n]
                if not ok.any():
                    line += f"   {'-':>7} {'-':>5} {'-':<14}"
                    continue
                top = self.decode([self.topk_ids[m, prompt, layer, last, 0]])[0]
                line += (f"   {self.kl[m, prompt, layer, :n][ok].mean():7.3f} "
                         f"{self.agrees[m, prompt, layer, :n][ok].mean():5.2f} {_cell(top, 14):<14}")
            lines.append(line.rstrip())
        return "\n".join(lines)


def _cell(token: str, width: int = 7) -> str:
    """A token as a cell shows it: spaces as ``␣``, other whitespace escaped, ``∅`` for none, ``width`` at most."""
    shown = (c if c.isprintable() and not c.isspace() else "␣" if c == " " else repr(c)[1:-1] for c in token)
    text = "".join(shown) or "∅"
    return text if len(text) <= width else text[:width - 1] + "…"


def plot_trajectory(traj: Trajectory, *, prompt: int = 0, color: str = "kl", max_positions: int = 24):
    """The prediction-trajectory heatmap of one prompt: the logit lens beside each lens.

    Rows are layers, columns the last ``max_positions`` positions, each cell the top-1 token,
    coloured by ``KL(p_final ‖ p_lens)`` (``color="kl"``, log scale from 0.01 nats) or the top-1
    probability (``"prob"``).

    Returns
    -------
    matplotlib.figure.Figure
    """
    from matplotlib.colors import LogNorm, Normalize
    from matplotlib.figure import Figure  # no pyplot: the caller's backend stays as it is

    LensSpec(color=color, max_positions=max_positions, device=None)
    n = len(traj.token_ids[prompt])
    first = max(0, n - max_positions)
    cols = range(first, n)
    layers = traj.n_layers + 1
    values = traj.kl if color == "kl" else traj.topk_probs[..., 0]
    shown = np.where(traj.valid[:, prompt, :, first:n], values[:, prompt, :, first:n], np.nan)
    if color == "kl":  # KL spans 1e-3 to 1e2 nats: a log scale, floored at 0.01
        top = np.nanmax(shown) if np.isfinite(shown).any() else 1.0
        norm, cmap = LogNorm(vmin=1e-2, vmax=max(float(top), 1.0), clip=True), "viridis_r"
    else:
        norm, cmap = Normalize(vmin=0.0, vmax=1.0), "viridis"
    width = len(cols)
    fig = Figure(figsize=(1.5 + len(traj.methods) * (0.62 * width + 0.8), 1.6 + 0.28 * layers), layout="constrained")
    axes = fig.subplots(1, len(traj.methods), squeeze=False, sharey=True)
    for m, ax in enumerate(axes[0]):
        image = ax.imshow(np.ma.masked_invalid(shown[m]), origin="lower", aspect="auto", cmap=cmap, norm=norm)
        for layer in range(layers):
            for j, t in enumerate(cols):
                if traj.valid[m, prompt, layer, t]:
                    token = traj.decode([traj.topk_ids[m, prompt, layer, t, 0]])[0]
                    dark = (norm(shown[m, layer, j]) > 0.5) == (color == "kl")
                    ax.text(j, layer, _cell(token), ha="center", va="center", fontsize=6,
                            color="white" if dark else "black")
        ax.set_title("logit lens (identity)" if traj.methods[m] == IDENTITY else traj.methods[m], fontsize=10)
        ax.set_xticks(range(width), [_cell(traj.decode([traj.token_ids[prompt][t]])[0], 10) for t in cols],
                      rotation=60, ha="right", fontsize=7)
        ax.set_xlabel("input token")
        ax.set_yticks(range(layers), [str(l) for l in range(layers - 1)] + ["out"], fontsize=6)
    axes[0][0].set_ylabel("layer")
    label = "KL(final ‖ lens), nats" if color == "kl" else "top-1 probability"
    extend = "min" if color == "kl" else "neither"
    fig.colorbar(image, ax=axes[0].tolist(), fraction=0.02, pad=0.01, label=label, extend=extend)
    note = f"; positions {first}–{n - 1} of {n} shown" if first else ""
    fig.suptitle(f"top-1 token per layer and position{note}", fontsize=10)
    return fig


def write_trajectory(traj: Trajectory, out, *, meta: dict | None = None, color: str = "kl",
                     max_positions: int = 24) -> dict[str, Path]:
    """Write a trajectory's figure, JSON (with ``meta``: the folder's marker), CSV and page into the folder
    ``out``, all or none; returns the paths by kind."""
    out, meta = Path(out), meta or {}
    records = traj.records()
    fig = plot_trajectory(traj, color=color, max_positions=max_positions)
    page = lens_page(traj, title=meta.get("title"), prompts=meta.get("prompts"), meta=meta)
    with atomic_folder(out, LENS_KIND) as tmp:
        (tmp / "trajectory.json").write_text(json.dumps({"meta": meta, "records": records},
                                                        ensure_ascii=False, indent=1))
        fig.savefig(tmp / "trajectory.png", format="png", dpi=120)
        write_csv(tmp / "trajectory.csv", records)
        (tmp / "lens.html").write_text(page, encoding="utf-8")
    return {"json": out / "trajectory.json", "png": out / "trajectory.png", "csv": out / "trajectory.csv",
            "html": out / "lens.html"}


def merge_trajectories(trajectories: list[Trajectory], names: list[str] | None = None) -> Trajectory:
    """One trajectory of several lenses read on the same prompts: the logit lens once, then each
    trajectory's own lens, renamed ``names[i]`` where given (names must end up distinct)."""
    first = trajectories[0]
    keep = [(0, first.methods.index(IDENTITY))]
    methods = [IDENTITY]
    for i, traj in enumerate(trajectories):
        if traj.token_ids != first.token_ids or traj.topk_ids.shape[2:] != first.topk_ids.shape[2:]:
            raise NJTCError("trajectories to merge must read the same prompts with the same `k`")
        for m, name in enumerate(traj.methods):
            if name != IDENTITY:
                keep.append((i, m))
                methods.append(names[i] if names is not None else name)
    if len(set(methods)) < len(methods):
        raise NJTCError(f"lenses to merge need distinct names, not {methods}")

    def stacked(field):
        parts = [getattr(trajectories[i], field) for i, _ in keep]
        return None if any(a is None for a in parts) else np.stack([a[m] for a, (_, m) in zip(parts, keep)])

    fields = ("topk_ids", "topk_probs", "entropy", "kl", "agrees", "valid", "final_prob", "final_rank")
    return Trajectory(methods, first.token_ids, final_top1=first.final_top1, tokenizer=first.tokenizer,
                      **{f: stacked(f) for f in fields})
