"""The model's head: its final norm followed by the unembedding.

Stored with the activations so that evaluation never needs the model itself.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from .architectures import resolve_parts
from .errors import NJTCError

__all__ = ["Head"]


@dataclass
class Head:
    """Final norm and unembedding, applied to row vectors ``h`` of shape ``(n, d)``.

    Examples
    --------
    >>> import torch
    >>> from njtc_solve.capture import capture_residual_stream
    >>> head = Head.from_model(model)
    >>> ids = torch.tensor([[5, 17, 42]])
    >>> with capture_residual_stream(model) as hidden, torch.no_grad():
    ...     own = model(input_ids=ids).logits[0]
    >>> bool(torch.allclose(head.logits(hidden[-1][0]), own, atol=1e-4))   # last block's output
    True
    """

    norm: str
    eps: float
    norm_weight: torch.Tensor
    unembed: torch.Tensor
    norm_bias: torch.Tensor | None = None
    unembed_bias: torch.Tensor | None = None

    @classmethod
    def from_model(cls, model) -> Head:
        """Copy the head of a Hugging Face causal language model (float32)."""
        spec, _, final_norm, unembed = resolve_parts(model)
        eps = getattr(final_norm, "eps", getattr(final_norm, "variance_epsilon", None))
        if eps is None:
            raise NJTCError(f"cannot find the epsilon of {type(final_norm).__name__}")

        def copy(t):
            return None if t is None else t.detach().to(torch.float32).cpu().clone()

        return cls(
            norm=spec.norm,
            eps=float(eps),
            norm_weight=copy(final_norm.weight),
            norm_bias=copy(getattr(final_norm, "bias", None)),
            unembed=copy(unembed.weight),
            unembed_bias=copy(getattr(unembed, "bias", None)),
        )

    @classmethod
    def from_group(cls, group) -> Head:
        """Read a head from the ``/head`` group of an activation store."""

        def read(name):
            return torch.from_numpy(group[name][...].astype(np.float32)) if name in group else None

        if "norm_weight" not in group or "unembed" not in group:
            raise NJTCError("the head has no norm_weight or unembed; the file is damaged")
        return cls(
            norm=str(group.attrs["norm"]),
            eps=float(group.attrs["eps"]),
            norm_weight=read("norm_weight"),
            norm_bias=read("norm_bias"),
            unembed=read("unembed"),
            unembed_bias=read("unembed_bias"),
        )

    def write_group(self, group) -> None:
        """Write this head into an HDF5 group (layout of design.md §3)."""
        group.attrs["norm"] = self.norm
        group.attrs["eps"] = self.eps
        for name in ("norm_weight", "norm_bias", "unembed", "unembed_bias"):
            value = getattr(self, name)
            if value is not None:
                group.create_dataset(name, data=value.numpy(), fletcher32=True)  # chunked, checksummed

    @property
    def d_model(self) -> int:
        return self.unembed.shape[1]

    @property
    def vocab_size(self) -> int:
        return self.unembed.shape[0]

    def to(self, device) -> Head:
        """Move the head's tensors to ``device``."""
        moved = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in vars(self).items()}
        return Head(**moved)

    def normalize(self, h: torch.Tensor) -> torch.Tensor:
        """Apply the final norm (with its gain and bias) to rows ``h``."""
        h = h.to(torch.float32)
        if self.norm == "layernorm":
            return F.layer_norm(h, (h.shape[-1],), self.norm_weight, self.norm_bias, self.eps)
        if self.norm == "rmsnorm":
            out = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps) * self.norm_weight
            return out if self.norm_bias is None else out + self.norm_bias
        raise NJTCError(f"unknown norm kind {self.norm!r}")

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """Logits ``norm(h) @ unembedᵀ (+ bias)`` for rows ``h`` (evaluate in row chunks)."""
        out = self.normalize(h) @ self.unembed.T
        return out if self.unembed_bias is None else out + self.unembed_bias

    def low_rank_logits(self, a: torch.Tensor, V: torch.Tensor, bias, y: torch.Tensor) -> torch.Tensor:
        """Logits of ``y = a @ V + bias`` through the rank-r factor, without ``y @ W_Uᵀ``.

        The final norm's centring (LayerNorm) and gain are linear, so the logits are
        ``[a/σ, 1/σ, 1] @ [M; c; const]`` with ``M = (V - mean) diag(g) W_Uᵀ``: one
        ``rows × (r+2) × vocab`` product instead of ``rows × d × vocab``, written once.
        ``y`` (already computed by the caller) supplies only the per-row scale ``σ``.
        """
        a, V, y = a.to(torch.float32), V.to(torch.float32), y.to(torch.float32)
        bias = torch.zeros(V.shape[1], dtype=torch.float32, device=V.device) if bias is None else bias.float()
        if self.norm == "layernorm":
            V, bias = V - V.mean(1, keepdim=True), bias - bias.mean()
            inv_sigma = torch.rsqrt(y.var(-1, unbiased=False, keepdim=True) + self.eps)
        elif self.norm == "rmsnorm":
            inv_sigma = torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + self.eps)
        else:
            raise NJTCError(f"unknown norm kind {self.norm!r}")
        const = torch.zeros_like(self.unembed[:, 0])
        if self.norm_bias is not None:
            const = const + self.unembed @ self.norm_bias
        if self.unembed_bias is not None:
            const = const + self.unembed_bias
        factor = torch.cat([V * self.norm_weight, (bias * self.norm_weight)[None]]) @ self.unembed.T
        rows = torch.cat([a * inv_sigma, inv_sigma, torch.ones_like(inv_sigma)], dim=1)
        return rows @ torch.cat([factor, const[None]])

    def logit_weight_factor(self) -> torch.Tensor:
        """Matrix ``F`` (d×V) whose Gram ``F Fᵀ`` weights errors in h by their effect on logits.

        The error ``e`` in the final-norm input changes the centred logits by approximately
        ``(e P / σ) diag(g) W_Uᵀ`` (σ the token's norm scale), where ``P = I - 11ᵀ/d`` is the
        centring of a LayerNorm (``P = I`` for an RMS norm): a LayerNorm head never sees the
        all-ones direction of its input, so neither does the weight. Centring over the
        vocabulary drops the direction that softmax ignores.
        """
        w_u = self.unembed.to(torch.float64)
        w_u = w_u - w_u.mean(0, keepdim=True)
        factor = self.norm_weight.to(torch.float64)[:, None] * w_u.T
        return factor - factor.mean(0, keepdim=True) if self.norm == "layernorm" else factor
