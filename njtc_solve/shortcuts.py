"""Shortcut files (safetensors, design.md §4): save, load and apply fitted maps.

A file holds one method's maps for many source layers. Prediction is
``y = norm(x) @ W + bias`` (plus ``x`` when the map is residual), with ``W = U @ V`` for
narrow maps, ``norm`` one of ``none``, ``batch`` (``(x - norm_mean) * norm_scale``),
``layer`` or ``rms`` (per token, no affine parameters).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import numpy as np
import torch
from safetensors.torch import save_file

from .errors import NJTCError, atomic_output, read_safetensors
from .stats import normalize_rows

__all__ = ["FORMAT", "FORMAT_VERSION", "ShortcutMap", "Shortcuts"]

FORMAT = "njtc-shortcuts"
FORMAT_VERSION = 1


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
            for key in ("weight", "U", "V", "bias", "norm_mean", "norm_scale"):
                value = getattr(m, key)
                if value is not None:
                    tensors[f"layers.{layer}.{key}"] = value.to(torch.float32).contiguous().cpu()
        b = lambda v: "true" if v else "false"
        metadata = {
            "format": FORMAT, "format_version": str(FORMAT_VERSION), "method": self.method,
            "rank": "none" if self.rank is None else str(self.rank), "normalize": self.normalize,
            "residual": b(self.residual), "fit_intercept": b(self.fit_intercept), "alpha": str(self.alpha),
            "weight": self.weight, "target_layer": str(self.target_layer), "model_sha256": self.model_sha256,
            "layers": json.dumps(sorted(self.maps)), "stats": json.dumps(self.stats), "label": self.label,
            "provenance": json.dumps(self.provenance),
        }
        with atomic_output(path) as tmp:
            save_file(tensors, str(tmp), metadata=metadata)

    @classmethod
    def load(cls, path) -> Shortcuts:
        """Read a shortcut file; a missing, foreign or damaged file is a clear error."""
        tensors, meta = read_safetensors(path, "shortcut", FORMAT)
        if int(meta.get("format_version", -1)) != FORMAT_VERSION:
            raise NJTCError(f"{path} has shortcut format version {meta.get('format_version')}; "
                            f"this library reads {FORMAT_VERSION}")
        normalize, residual = meta["normalize"], meta["residual"] == "true"
        maps = {}
        for layer in json.loads(meta["layers"]):
            parts = [tensors.get(f"layers.{layer}.{key}")
                     for key in ("weight", "U", "V", "bias", "norm_mean", "norm_scale")]
            maps[int(layer)] = ShortcutMap(*parts, normalize, residual)
        return cls(meta["method"], maps, int(meta["target_layer"]), meta.get("model_sha256", ""),
                   None if meta["rank"] == "none" else int(meta["rank"]), normalize, residual,
                   meta["fit_intercept"] == "true", _alpha(meta["alpha"]), meta.get("weight", "none"),
                   json.loads(meta.get("stats", "{}")), meta.get("label", ""),
                   json.loads(meta.get("provenance", "{}")))


def _alpha(text: str) -> float | str:
    return text if text == "auto" else float(text)
