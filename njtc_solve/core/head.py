"""The model's head: ``logits(h) = cap(scale · (norm(h) @ unembedᵀ + unembed_bias))``, for every supported family.

``norm`` is a LayerNorm or RMS norm (gain and bias optional; Gemma's ``1 + w`` gain folded in),
``unembed`` has any output projection folded in (OPT's ``project_out``), ``scale`` is Cohere's
``logit_scale`` or Granite's ``1/logits_scaling``, ``cap`` Gemma 2/3's final soft-cap. Stored with
the activations, in statistics files and identified in shortcut files (:meth:`Head.fingerprint`),
so evaluation and the lens apply the same head without the model.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from njtc_solve.core.architectures import projection_of, resolve_parts
from njtc_solve.core.errors import NJTCError

__all__ = ["Head"]

_TENSORS = ("norm_weight", "norm_bias", "unembed", "unembed_bias")


def _copy(t: torch.Tensor | None) -> torch.Tensor | None:
    """A float32 CPU copy, or None."""
    return None if t is None else t.detach().to(torch.float32).cpu().clone()


def _fold_projection(w_u: torch.Tensor, b_u: torch.Tensor | None, projection) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Unembedding and bias with ``n ↦ n Pᵀ + p`` folded in: ``W_U P`` and ``W_U p + b`` (float64 products)."""
    w_u64 = w_u.double()
    p_bias = getattr(projection, "bias", None)
    if p_bias is not None:
        extra = (w_u64 @ p_bias.detach().cpu().double()).float()
        b_u = extra if b_u is None else b_u + extra
    return (w_u64 @ projection.weight.detach().cpu().double()).float(), b_u


def _width(final_norm, weight) -> int | None:
    """The width of the final norm's output, where the module says it."""
    if weight is not None:
        return weight.shape[-1]
    shape = getattr(final_norm, "normalized_shape", None)
    return None if shape is None else int(shape[-1])


@dataclass
class Head:
    """Final norm, unembedding, logit scale and soft-cap, applied to rows ``h`` of shape ``(n, d)``.

    Attributes
    ----------
    norm : {"layernorm", "rmsnorm"}
    eps : float
    norm_weight, norm_bias : Tensor or None
        The norm's effective gain and bias, ``(d,)``.
    unembed, unembed_bias : Tensor
        ``(V, d)`` unembedding and its ``(V,)`` bias or None.
    logit_scale : float
    softcap : float or None
        ``c`` of the final soft-cap ``c·tanh(z/c)``.
    folded : tuple of str
        What was folded in when read from the model (``"1+w gain"``, ``"output projection"``).

    Examples
    --------
    >>> import torch
    >>> from njtc_solve.data.capture import capture_residual_stream
    >>> head = Head.from_model(model)
    >>> ids = torch.tensor([[5, 17, 42]])
    >>> with capture_residual_stream(model) as hidden, torch.no_grad():
    ...     own = model(input_ids=ids).logits[0]
    >>> bool(torch.allclose(head.logits(hidden[-1][0]), own, atol=1e-4))   # last block's output
    True
    >>> head.describe()["norm"], head.describe()["softcap"]
    ('rmsnorm', None)
    """

    norm: str
    eps: float
    norm_weight: torch.Tensor | None
    unembed: torch.Tensor
    norm_bias: torch.Tensor | None = None
    unembed_bias: torch.Tensor | None = None
    logit_scale: float = 1.0
    softcap: float | None = None
    folded: tuple[str, ...] = ()

    def __post_init__(self):
        if self.norm not in ("layernorm", "rmsnorm"):
            raise NJTCError(f"unknown norm kind {self.norm!r}; expected layernorm or rmsnorm")
        if not (math.isfinite(self.eps) and self.eps >= 0):
            raise NJTCError(f"the head's eps {self.eps!r} is not a non-negative number")
        if not (math.isfinite(self.logit_scale) and self.logit_scale > 0):
            raise NJTCError(f"the head's logit scale {self.logit_scale!r} is not a positive number")
        if self.softcap is not None and not (math.isfinite(self.softcap) and self.softcap > 0):
            raise NJTCError(f"the head's soft-cap {self.softcap!r} is not a positive number")
        self.folded = tuple(self.folded)

    @classmethod
    def from_model(cls, model) -> Head:
        """Copy the head of a supported causal LM (float32, CPU), gains and projections folded in."""
        spec, _, final_norm, unembed = resolve_parts(model)
        eps = spec.eps
        if eps is None:
            eps = getattr(final_norm, "eps", getattr(final_norm, "variance_epsilon", None))
        if eps is None:
            raise NJTCError(f"cannot find the epsilon of {type(final_norm).__name__}")
        folded = []
        weight = _copy(getattr(final_norm, "weight", None))
        if spec.gain == "1+w":
            weight, folded = 1.0 + weight, folded + ["1+w gain"]
        w_u, b_u = _copy(unembed.weight), _copy(getattr(unembed, "bias", None))
        projection = projection_of(model, spec)
        if projection is not None:
            w_u, b_u = _fold_projection(w_u, b_u, projection)
            folded.append("output projection")
        width = _width(final_norm, weight)
        if width is not None and w_u.shape[1] != width:
            raise NJTCError(f"the unembedding takes vectors of width {w_u.shape[1]}, the final norm gives {width}: "
                            "an output projection between them is missing from the architecture table")
        config = model.config
        scale = 1.0
        if spec.logit_scale is not None and getattr(config, spec.logit_scale, None) is not None:
            scale *= float(getattr(config, spec.logit_scale))
        if spec.logit_divisor is not None and getattr(config, spec.logit_divisor, None) is not None:
            scale /= float(getattr(config, spec.logit_divisor))
        cap = getattr(config, spec.softcap, None) if spec.softcap is not None else None
        return cls(norm=spec.norm, eps=float(eps), norm_weight=weight, norm_bias=_copy(getattr(final_norm, "bias", None)),
                   unembed=w_u, unembed_bias=b_u, logit_scale=scale, softcap=None if cap is None else float(cap),
                   folded=tuple(folded))

    def describe(self) -> dict:
        """The head's description as JSON-able scalars (which tensors it has, and its constants)."""
        return {"norm": self.norm, "eps": self.eps, "logit_scale": self.logit_scale, "softcap": self.softcap,
                "folded": list(self.folded), "d_model": self.d_model, "vocab_size": self.vocab_size,
                **{f"has_{name}": getattr(self, name) is not None for name in _TENSORS if name != "unembed"}}

    def to_tensors(self, prefix: str = "head.") -> dict[str, torch.Tensor]:
        """The head's tensors by name (``prefix + "unembed"``, ...), float32, contiguous, on the CPU."""
        return {prefix + name: getattr(self, name).to(torch.float32).contiguous().cpu()
                for name in _TENSORS if getattr(self, name) is not None}

    @classmethod
    def from_tensors(cls, tensors: dict, description: dict, prefix: str = "head.") -> Head:
        """Rebuild a head from :meth:`to_tensors` and :meth:`describe` (e.g. from a safetensors file)."""
        try:
            wanted = {name: bool(description.get(f"has_{name}", name in ("unembed", "norm_weight")))
                      for name in _TENSORS}
            wanted["unembed"] = True
            parts = {}
            for name, present in wanted.items():
                if present and prefix + name not in tensors:
                    raise NJTCError(f"the head lacks its tensor {prefix + name}")
                parts[name] = tensors[prefix + name].to(torch.float32) if present else None
            cap = description.get("softcap")
            head = cls(norm=str(description["norm"]), eps=float(description["eps"]),
                       logit_scale=float(description.get("logit_scale", 1.0)),
                       softcap=None if cap is None else float(cap), folded=tuple(description.get("folded", ())),
                       **parts)
        except (KeyError, TypeError, ValueError) as err:
            raise NJTCError(f"the head's description is incomplete or malformed ({err!r})") from err
        head._check_shapes()
        return head

    @classmethod
    def from_group(cls, group) -> Head:
        """Read a head from the ``/head`` group of an activation store (format 1 lacks scale, soft-cap and
        ``has_norm_weight``: none, none, a gain)."""
        attrs = {k: (v.item() if isinstance(v, np.generic) else v) for k, v in group.attrs.items()}
        tensors = {name: torch.from_numpy(group[name][...].astype(np.float32, copy=False)) for name in _TENSORS
                   if name in group}
        if "unembed" not in tensors or (attrs.get("has_norm_weight", True) and "norm_weight" not in tensors):
            raise NJTCError("the head has no norm_weight or unembed; the file is damaged")
        cap = float(attrs.get("softcap", 0.0))
        description = {"norm": str(attrs["norm"]), "eps": float(attrs["eps"]),
                       "logit_scale": float(attrs.get("logit_scale", 1.0)), "softcap": cap if cap > 0 else None,
                       "folded": json.loads(str(attrs.get("folded", "[]"))),
                       **{f"has_{name}": name in tensors for name in _TENSORS}}
        return cls.from_tensors(tensors, description, prefix="")

    def write_group(self, group) -> None:
        """Write this head into an HDF5 group (docs/reference/file-formats.md; ``softcap`` 0 means none)."""
        group.attrs["norm"] = self.norm
        group.attrs["eps"] = self.eps
        group.attrs["logit_scale"] = self.logit_scale
        group.attrs["softcap"] = 0.0 if self.softcap is None else self.softcap
        group.attrs["has_norm_weight"] = self.norm_weight is not None
        group.attrs["folded"] = json.dumps(list(self.folded))
        for name, value in self.to_tensors(prefix="").items():
            group.create_dataset(name, data=value.numpy(), fletcher32=True)  # chunked, checksummed

    def fingerprint(self) -> str:
        """sha256 of the description and tensors: equal fingerprints give equal logits."""
        digest = hashlib.sha256(json.dumps(self.describe(), sort_keys=True).encode())
        for name, value in sorted(self.to_tensors(prefix="").items()):
            digest.update(name.encode())
            digest.update(value.contiguous().numpy().data)
        return digest.hexdigest()

    def _check_shapes(self) -> None:
        """Refuse a gain, norm bias or unembedding bias of the wrong shape."""
        d, v = self.d_model, self.vocab_size
        for name, shape in (("norm_weight", (d,)), ("norm_bias", (d,)), ("unembed_bias", (v,))):
            value = getattr(self, name)
            if value is not None and tuple(value.shape) != shape:
                raise NJTCError(f"the head's {name} has shape {tuple(value.shape)}, not {shape}")

    @property
    def d_model(self) -> int:
        """The residual width ``d``."""
        return self.unembed.shape[1]

    @property
    def vocab_size(self) -> int:
        """The vocabulary size ``V``."""
        return self.unembed.shape[0]

    @property
    def gain(self) -> torch.Tensor:
        """The norm's effective gain ``(d,)``: its weight, or ones for a norm without one."""
        if self.norm_weight is not None:
            return self.norm_weight
        return torch.ones(self.d_model, dtype=self.unembed.dtype, device=self.unembed.device)

    def to(self, device) -> Head:
        """Move the head's tensors to ``device``."""
        moved = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in vars(self).items()}
        return Head(**moved)

    def normalize(self, h: torch.Tensor) -> torch.Tensor:
        """Apply the final norm (with its gain and bias) to rows ``h``."""
        h = h.to(torch.float32)
        if self.norm == "layernorm":
            return F.layer_norm(h, (h.shape[-1],), self.norm_weight, self.norm_bias, self.eps)
        out = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.norm_weight is not None:
            out = out * self.norm_weight
        return out if self.norm_bias is None else out + self.norm_bias

    def finish(self, z: torch.Tensor) -> torch.Tensor:
        """The nonlinear end of the head on the linear logits ``z``: scale, then soft-cap."""
        if self.logit_scale != 1.0:
            z = z * self.logit_scale
        if self.softcap is not None:
            z = torch.tanh(z / self.softcap) * self.softcap
        return z

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """Logits of rows ``h``, exactly as the model computes them (evaluate in row chunks)."""
        out = self.normalize(h) @ self.unembed.T
        return self.finish(out if self.unembed_bias is None else out + self.unembed_bias)

    def low_rank_logits(self, a: torch.Tensor, V: torch.Tensor, bias, y: torch.Tensor) -> torch.Tensor:
        """Logits of ``y = a @ V + bias`` as ``[a/σ, 1/σ, 1] @ [M; c; const]`` (:meth:`low_rank_factor`),
        without ``y @ W_Uᵀ``; ``y`` gives only the per-row norm scale ``σ``."""
        return self.finish(self.low_rank_linear(self.low_rank_factor(V, bias), a, y))

    def low_rank_factor(self, V: torch.Tensor, bias) -> torch.Tensor:
        """``[M; c; const]``, ``(r + 2) × vocab`` (float32), of the rank-r map ``a @ V + bias``;
        differentiable in ``V`` and ``bias`` (the KL trainer's gradients pass through it)."""
        V = V.to(torch.float32)
        bias = torch.zeros(V.shape[1], dtype=torch.float32, device=V.device) if bias is None else bias.float()
        if self.norm == "layernorm":
            V, bias = V - V.mean(1, keepdim=True), bias - bias.mean()
        const = torch.zeros_like(self.unembed[:, 0])
        if self.norm_bias is not None:
            const = const + self.unembed @ self.norm_bias
        if self.unembed_bias is not None:
            const = const + self.unembed_bias
        gain = self.gain
        factor = torch.cat([V * gain, (bias * gain)[None]]) @ self.unembed.T
        return torch.cat([factor, const[None]])

    def low_rank_linear(self, factor: torch.Tensor, a: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The linear logits ``[a/σ, 1/σ, 1] @ factor`` (no scale, no soft-cap) of :meth:`low_rank_factor`."""
        a, y = a.to(torch.float32), y.to(torch.float32)
        if self.norm == "layernorm":
            inv_sigma = torch.rsqrt(y.var(-1, unbiased=False, keepdim=True) + self.eps)
        else:
            inv_sigma = torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + self.eps)
        return torch.cat([a * inv_sigma, inv_sigma, torch.ones_like(inv_sigma)], dim=1) @ factor

    def logit_weight_factor(self) -> torch.Tensor:
        """Matrix ``F`` (d×V) whose Gram ``F Fᵀ`` weights errors in h by their effect on the logits.

        ``F = scale · P diag(g) W_Uᵀ`` centred over the vocabulary (which softmax ignores), ``P`` a
        LayerNorm's centring (``I`` for an RMS norm); a soft-cap, whose slope varies per token, is left out.
        """
        w_u = self.unembed.to(torch.float64)
        w_u = w_u - w_u.mean(0, keepdim=True)
        factor = (self.logit_scale * self.gain.to(torch.float64))[:, None] * w_u.T
        return factor - factor.mean(0, keepdim=True) if self.norm == "layernorm" else factor

