"""Shortcut files (safetensors, design.md §4): save, load and apply fitted maps.

A file holds one method's maps for many source layers. Prediction is
``y = norm(x) @ W + bias`` (plus ``x`` when the map is residual), with ``W = U @ V`` for
narrow maps, ``norm`` one of ``none``, ``batch`` (``(x - norm_mean) * norm_scale``),
``layer`` or ``rms`` (per token, no affine parameters).
"""

from __future__ import annotations

import json
import math
import re
import reprlib
from dataclasses import dataclass, field

import numpy as np
import torch
from safetensors.torch import save_file

from .errors import NJTCError, atomic_output, read_safetensors
from .stats import normalize_rows

__all__ = ["FORMAT", "FORMAT_VERSION", "ShortcutMap", "Shortcuts"]

FORMAT = "njtc-shortcuts"
FORMAT_VERSION = 1
# each map tensor and its shape: d the width, r the rank
_SHAPES = {"weight": "dd", "U": "dr", "V": "rd", "bias": "d", "norm_mean": "d", "norm_scale": "d"}
_TENSOR_NAME = re.compile(r"layers\.(0|[1-9][0-9]*)\.(" + "|".join(_SHAPES) + ")")


@dataclass
class ShortcutMap:
    """One source layer's map to the target layer.

    Examples
    --------
    >>> import torch
    >>> narrow = ShortcutMap(U=torch.ones(4, 1), V=torch.ones(1, 4), bias=torch.zeros(4))
    >>> narrow.predict(torch.eye(4)[:1]), narrow.n_params
    (tensor([[1., 1., 1., 1.]]), 8)
    """

    weight: torch.Tensor | None = None  # (d, d) full map
    U: torch.Tensor | None = None  # (d, r)
    V: torch.Tensor | None = None  # (r, d)
    bias: torch.Tensor | None = None
    norm_mean: torch.Tensor | None = None
    norm_scale: torch.Tensor | None = None
    normalize: str = "none"
    residual: bool = False

    @property
    def rank(self) -> int | None:
        return None if self.U is None else self.U.shape[1]

    @property
    def n_params(self) -> int:
        """Parameters of the linear map (``d²`` full, ``2dr`` narrow; 0 for the identity)."""
        if self.weight is not None:
            return self.weight.numel()
        if self.U is not None:
            return self.U.numel() + self.V.numel()
        return 0

    def _normalized(self, x) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.as_tensor(np.asarray(x) if not isinstance(x, torch.Tensor) else x).to(torch.float32)
        if self.normalize == "batch":
            return x, (x - self.norm_mean) * self.norm_scale
        return x, normalize_rows(x, self.normalize)

    def predict_with_logits(self, x, head):
        """``(y_hat, head logits of y_hat)``; narrow non-residual maps take the low-rank route."""
        if self.U is None or self.residual:
            y = self.predict(x)
            return y, head.logits(y)
        _, z = self._normalized(x)
        a = z @ self.U
        y = a @ self.V if self.bias is None else a @ self.V + self.bias
        return y, head.low_rank_logits(a, self.V, self.bias, y)

    def predict(self, x) -> torch.Tensor:
        """Map source rows ``x`` (n, d) to estimates of the target layer (float32)."""
        x, z = self._normalized(x)
        if self.weight is not None:
            y = z @ self.weight
        elif self.U is not None:
            y = (z @ self.U) @ self.V
        else:
            y = z.clone()  # identity ("logit lens")
        if self.bias is not None:
            y = y + self.bias
        return y + x if self.residual else y


@dataclass
class Shortcuts:
    """Maps of one method for many source layers, with their provenance.

    Examples
    --------
    >>> from njtc_solve import ActivationStore, fit_shortcuts
    >>> [jtc] = fit_shortcuts("activations.h5", method="jtc", ranks=None, progress=False)
    >>> jtc.save("jtc.safetensors")
    >>> sc = Shortcuts.load("jtc.safetensors")
    >>> with ActivationStore("activations.h5") as store:
    ...     hidden_1 = store.file["hidden/1"][:5]
    >>> sc.name, tuple(sc.predict(1, hidden_1).shape)
    ('jtc', (5, 32))
    """

    method: str
    maps: dict[int, ShortcutMap]
    target_layer: int
    model_sha256: str = ""
    rank: int | None = None
    normalize: str = "none"
    residual: bool = False
    fit_intercept: bool = True
    alpha: float | str = 0.0  # "auto": chosen per layer by GCV (values in stats)
    weight: str = "none"
    stats: dict = field(default_factory=dict)
    label: str = ""  # overrides the derived name (e.g. "njtc-adam" for a gradient-trained map)
    provenance: dict = field(default_factory=dict)  # the fit store's identity and split (store.provenance)
    head: dict = field(default_factory=dict)  # Head.describe() of the head the maps were fitted for
    head_sha256: str = ""  # Head.fingerprint() of that head ("" in files written before it was recorded)

    @classmethod
    def identity(cls, layers, target_layer: int, model_sha256: str = "") -> Shortcuts:
        """The logit lens: every layer's rows are read as if they were the last layer's."""
        return cls("identity", {int(l): ShortcutMap() for l in layers}, target_layer, model_sha256)

    @property
    def name(self) -> str:
        """Short label such as ``njtc-r32``, ``nnjtc-layer-r32``, ``jtc`` or ``njtc-r32-residual``."""
        if self.label:
            return self.label
        parts = [self.method]
        if self.method == "nnjtc":
            parts.append(self.normalize)
        if self.rank is not None:
            parts.append(f"r{self.rank}")
        if self.residual:
            parts.append("residual")
        if self.weight != "none":
            parts.append(f"w{self.weight}")
        return "-".join(parts)

    def check_head(self, head) -> None:
        """Refuse to apply these maps through another head than the one they were fitted for.

        Files that record no head (``head_sha256`` empty, written before it was recorded) pass.
        """
        if self.head_sha256 and self.head_sha256 != head.fingerprint():
            raise NJTCError(f"shortcuts {self.name} were fitted for another head (head_sha256 {self.head_sha256[:12]}…, "
                            f"this head's {head.fingerprint()[:12]}…: {json.dumps(head.describe())})")

    def predict(self, layer: int, x) -> torch.Tensor:
        """Apply the map of source ``layer`` to rows ``x``."""
        if layer not in self.maps:
            raise NJTCError(f"{self.name} has no map for layer {layer} (it has {sorted(self.maps)})")
        return self.maps[layer].predict(x)

    def to(self, device) -> Shortcuts:
        """Move every map's tensors to ``device``."""
        for m in self.maps.values():
            for key, value in vars(m).items():
                if isinstance(value, torch.Tensor):
                    setattr(m, key, value.to(device))
        return self

    def save(self, path) -> None:
        """Write the file atomically (temporary name, then rename)."""
        tensors = {}
        for layer, m in self.maps.items():
            parts = {key: getattr(m, key) for key in _SHAPES if getattr(m, key) is not None}
            for key, value in parts.items():
                tensors[f"layers.{layer}.{key}"] = value.to(torch.float32).contiguous().cpu()
        b = lambda v: "true" if v else "false"
        metadata = {
            "format": FORMAT, "format_version": str(FORMAT_VERSION), "method": self.method,
            "rank": "none" if self.rank is None else str(self.rank), "normalize": self.normalize,
            "residual": b(self.residual), "fit_intercept": b(self.fit_intercept), "alpha": str(self.alpha),
            "weight": self.weight, "target_layer": str(self.target_layer), "model_sha256": self.model_sha256,
            "layers": json.dumps(sorted(self.maps)), "stats": json.dumps(self.stats), "label": self.label,
            "provenance": json.dumps(self.provenance), "head": json.dumps(self.head), "head_sha256": self.head_sha256,
        }
        with atomic_output(path) as tmp:
            save_file(tensors, str(tmp), metadata=metadata)

    @classmethod
    def load(cls, path) -> Shortcuts:
        """Read a shortcut file; a missing, foreign, damaged or inconsistent file is a clear error."""
        tensors, meta = read_safetensors(path, "shortcut", FORMAT)
        f, parts = _checked(path, tensors, meta)
        maps = {l: ShortcutMap(**p, normalize=f["normalize"], residual=f["residual"]) for l, p in parts.items()}
        return cls(f["method"], maps, f["target_layer"], f["model_sha256"], f["rank"], f["normalize"],
                   f["residual"], f["fit_intercept"], f["alpha"], f["weight"], f["stats"], f["label"],
                   f["provenance"], f["head"], f["head_sha256"])


def _checked(path, tensors: dict, meta: dict) -> tuple[dict, dict]:
    """Parse a shortcut file's metadata and check it against the file's tensors (design.md §4).

    Parameters
    ----------
    path : str or Path
        The file, named in the error.
    tensors : dict of str to Tensor
        The file's tensors, named ``layers.{l}.{part}``.
    meta : dict of str to str
        The file's metadata.

    Returns
    -------
    fields : dict
        The metadata parsed (``rank`` an int or None, booleans as bool, ``alpha`` a float or
        ``"auto"``, ``stats`` and ``provenance`` dicts), absent optional keys at their defaults.
    parts : dict of int to dict
        For each listed layer, its tensors by part (``weight``, ``U``, ``V``, ``bias``, ...).

    Raises
    ------
    NJTCError
        One line naming ``path`` and the first disagreement: a metadata value missing or not
        parseable, a listed layer without its map, a tensor of an unlisted layer, a shape that
        disagrees with the width ``d`` of the other tensors or with ``rank``, normalisation
        tensors present without ``normalize = "batch"`` (or absent with it), a tensor that is not
        finite float32.
    """
    def bad(problem: str) -> NJTCError:
        return NJTCError(f"{path} is not a valid shortcut file: {problem}")

    def field(key, parse, must_be, default=None):
        text = meta.get(key, default)
        if text is None:
            raise bad(f"its metadata has no {key!r}")
        try:
            return parse(text)
        except (ValueError, KeyError):  # json.JSONDecodeError is a ValueError
            raise bad(f"metadata {key}={reprlib.repr(text)} is not {must_be}") from None

    version = field("format_version", int, "an integer")
    if version != FORMAT_VERSION:
        raise NJTCError(f"{path} has shortcut format version {version}; this library reads {FORMAT_VERSION}")
    boolean = {"true": True, "false": False}.__getitem__
    f = {
        "method": field("method", str, "a string"),
        "layers": field("layers", _layer_list, "a JSON list of distinct layer numbers"),
        "rank": field("rank", _rank, '"none" or a positive integer'),
        "normalize": field("normalize", _one_of("none", "batch", "layer", "rms"), "none, batch, layer or rms"),
        "residual": field("residual", boolean, "true or false"),
        "fit_intercept": field("fit_intercept", boolean, "true or false"),
        "alpha": field("alpha", _alpha, 'a non-negative number or "auto"'),
        "target_layer": field("target_layer", int, "an integer"),
        "weight": field("weight", _one_of("none", "logits"), "none or logits", "none"),
        "model_sha256": meta.get("model_sha256", ""),
        "label": meta.get("label", ""),
        "stats": field("stats", _json_object, "a JSON object", "{}"),
        "provenance": field("provenance", _json_object, "a JSON object", "{}"),
        "head": field("head", _json_object, "a JSON object", "{}"),
        "head_sha256": meta.get("head_sha256", ""),
    }
    parts = {l: {} for l in f["layers"]}
    for name, t in tensors.items():
        match = _TENSOR_NAME.fullmatch(name)
        if match is None:
            raise bad(f"unexpected tensor {name!r}")
        if int(match[1]) not in parts:
            raise bad(f"tensor {name} is for a layer that its metadata's layers {f['layers']} omit")
        parts[int(match[1])][match[2]] = t
    needed = {"weight"} if f["rank"] is None else {"U", "V"}
    needed |= {"norm_mean", "norm_scale"} if f["normalize"] == "batch" else set()
    sizes = {"r": (f["rank"], "its metadata's rank")}  # symbol: (size, its source); d from the first tensor
    for layer, got in parts.items():
        if not got:
            raise bad(f"layer {layer} is listed in its metadata but has no tensors")
        if not needed <= got.keys() <= needed | {"bias"}:
            raise bad(f"layer {layer} has {', '.join(got)}; rank={meta['rank']} and normalize={f['normalize']} "
                      f"need {', '.join(sorted(needed))} (and optionally bias)")
        for part, t in got.items():
            name, dims = f"layers.{layer}.{part}", _SHAPES[part]
            if t.dim() == len(dims):
                for s, n in zip(dims, t.shape):
                    sizes.setdefault(s, (n, name))
            expected = [sizes.get(s, (s,))[0] for s in dims]
            if list(t.shape) != expected:
                known = ", ".join(f"{s}={sizes[s][0]} from {sizes[s][1]}" for s in sorted(set(dims)) if s in sizes)
                raise bad(f"tensor {name} has shape {tuple(t.shape)}, not {' × '.join(map(str, expected))} ({known})")
            if t.dtype != torch.float32 or not torch.isfinite(t).all():
                raise bad(f"tensor {name} is not finite float32")
    return f, parts


def _layer_list(text: str) -> list[int]:
    layers = json.loads(text)
    if not isinstance(layers, list) or any(type(l) is not int for l in layers) or len(set(layers)) < len(layers):
        raise ValueError(text)
    return layers


def _rank(text: str) -> int | None:
    rank = None if text == "none" else int(text)
    if rank is not None and rank < 1:
        raise ValueError(text)
    return rank


def _alpha(text: str) -> float | str:
    alpha = text if text == "auto" else float(text)
    if alpha != "auto" and not (math.isfinite(alpha) and alpha >= 0):
        raise ValueError(text)
    return alpha


def _json_object(text: str) -> dict:
    value = json.loads(text)
    if not isinstance(value, dict):
        raise ValueError(text)
    return value


def _one_of(*options: str):
    def parse(text: str) -> str:
        if text not in options:
            raise ValueError(text)
        return text
    return parse
