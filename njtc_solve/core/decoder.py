"""The one place that hooks, replays, passes through or removes a model's blocks (tests/test_layout.py).

A :class:`Decoder` is resolved once per model: the table's parts, the block count and the head.
Hooks go by point name and a patched ``forward`` is restored, on every exit.

Examples
--------
>>> import torch
>>> decoder = Decoder.of(model)
>>> ids = torch.tensor([[5, 17, 42, 7]])
>>> recorded = decoder.record(ids)
>>> h = decoder.run_blocks(recorded, recorded.hidden[1], 1, decoder.n_blocks)   # replay blocks 1..L-1
>>> bool(torch.equal(h, recorded.hidden[-1]))
True
>>> logits = decoder.run_from(ids, recorded.hidden[2], first_block=2)      # blocks 0, 1 passed through
>>> bool(torch.allclose(logits, recorded.logits, atol=1e-5))
True
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable
from contextlib import ExitStack, contextmanager, nullcontext
from typing import NamedTuple

import torch
from torch import nn

from njtc_solve.core import architectures
from njtc_solve.core.architectures import FoldSpec, _get, projection_of, resolve_parts
from njtc_solve.core.errors import NJTCError
from njtc_solve.core.head import Head

__all__ = ["Decoder", "Recording"]

_UNKNOWN = object()
_ATTRIBUTE = "_njtc_decoder"  # where a model keeps its decoder


class Recording(NamedTuple):
    """``hidden[l]``: block ``l``'s input, ``hidden[L]`` the last block's output; ``calls[i]``: block
    ``i``'s other arguments (masks, positions ...); ``logits``: the model's own (:meth:`Decoder.record`)."""

    hidden: list
    calls: list
    logits: torch.Tensor


def _first(output):
    """The hidden state a block returns: the tensor, or the first item of its tuple."""
    return output[0] if isinstance(output, tuple) else output


class Decoder:
    """A causal LM's table entry ``spec``, parts (``blocks``, ``final_norm``, ``unembed``, the output
    ``projection`` or ``None``), block count ``n_blocks`` and head, with the surgery on them."""

    def __init__(self, model):
        self.model = model
        self._resolve()
        self._returns = _UNKNOWN  # what a block returns: a tensor (None) or a tuple of this length
        self._head, self._heads_on = None, {}  # (parameter versions, Head), and its copies by device

    @classmethod
    def of(cls, model) -> Decoder:
        """The model's decoder, kept with the model (made again if its block list changed)."""
        decoder = model.__dict__.get(_ATTRIBUTE)
        if decoder is None or decoder.model is not model or _get(model, decoder.spec.blocks) is not decoder.blocks:
            decoder = cls(model)
            object.__setattr__(model, _ATTRIBUTE, decoder)  # a plain attribute, not a submodule
        return decoder

    def _resolve(self) -> None:
        """Read the parts and the block count."""
        self.spec, self.blocks, self.final_norm, self.unembed = resolve_parts(self.model)
        self.projection = projection_of(self.model, self.spec)
        self.n_blocks = len(self.blocks)

    @property
    def head(self) -> Head:
        """The model's :class:`~njtc_solve.core.head.Head` (float32, CPU; read again when a head parameter
        changed), a shallow copy per caller."""
        key = tuple((id(p), p._version, p.data_ptr(), p.dtype) for module in (self.final_norm, self.unembed, self.projection)
                    if module is not None for p in module.parameters())
        if self._head is None or self._head[0] != key:
            self._head, self._heads_on = (key, Head.from_model(self.model)), {}
        return copy.copy(self._head[1])

    def head_on(self, device) -> Head:
        """:attr:`head` on ``device``, one copy per device."""
        head, device = self.head, torch.device(device)
        if device not in self._heads_on:
            self._heads_on[device] = head.to(device)
        return copy.copy(self._heads_on[device])

    @contextmanager
    def hooks(self, points: dict[str, Callable], fold: FoldSpec | None = None):
        """Read-only hooks by point name for the block, removed on every exit.

        ``block_in.{i}``: ``fn(hidden, args, kwargs)`` before block ``i``; ``block_out.{i}``:
        ``fn(hidden, output)`` after it; ``mlp_out.{i}``: ``fn(output)`` of its MLP output projection.
        """
        with ExitStack() as stack:
            for name, fn in points.items():
                stack.callback(self._register(name, fn, fold).remove)
            yield

    def _register(self, name: str, fn: Callable, fold: FoldSpec | None):
        """Register one hook point; its handle."""
        kind, _, index = name.partition(".")
        if not index.isdigit() or int(index) >= self.n_blocks:
            raise NJTCError(f"no hook point {name!r}: blocks are 0..{self.n_blocks - 1}")
        block = self.blocks[int(index)]
        if kind == "block_in":
            def before(module, args, kwargs):
                if args:
                    fn(args[0], args[1:], dict(kwargs))
                else:
                    kwargs = dict(kwargs)
                    fn(kwargs.pop("hidden_states"), (), kwargs)
            return block.register_forward_pre_hook(before, with_kwargs=True)
        if kind == "block_out":
            def after(module, args, output):
                self._returns = len(output) if isinstance(output, tuple) else None
                fn(_first(output), output)
            return block.register_forward_hook(after)
        if kind == "mlp_out":
            spec = fold if fold is not None else architectures.check_foldable(self.model.config)
            return _get(block, spec.projection).register_forward_hook(lambda module, args, output: fn(output))
        raise NJTCError(f"no hook point {name!r}: the points are block_in.i, block_out.i and mlp_out.i")

    @contextmanager
    def mlp_outputs(self, fold: FoldSpec | None = None):
        """Yield a dict ``block index → its MLP output projection's latest output`` (``(batch, seq, d)``)."""
        outputs: dict[int, torch.Tensor] = {}
        with self.hooks({f"mlp_out.{i}": functools.partial(outputs.__setitem__, i) for i in range(self.n_blocks)},
                        fold or architectures.check_foldable(self.model.config)):
            yield outputs

    def record(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> Recording:
        """Run the model once on a batch (no cache, no gradient), keeping every block's input and arguments."""
        hidden, calls = [], []

        def before(h, args, kwargs):
            hidden.append(h)
            calls.append((args, kwargs))

        points = {f"block_in.{i}": before for i in range(self.n_blocks)}
        points[f"block_out.{self.n_blocks - 1}"] = lambda h, output: hidden.append(h)
        with self.hooks(points), torch.no_grad():
            out = self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        if len(hidden) != self.n_blocks + 1:
            raise NJTCError(f"recorded {len(hidden)} hidden states for {self.n_blocks} blocks; "
                            "the model does not call its blocks once each")
        return Recording(hidden, calls, out.logits)

    def run_blocks(self, recording: Recording, h: torch.Tensor, start: int, end: int) -> torch.Tensor:
        """Run the model's own blocks ``start..end-1`` on ``h`` (batch, seq, d), with the recorded arguments."""
        with torch.no_grad():
            for i in range(start, end):
                args, kwargs = recording.calls[i]
                h = _first(self.blocks[i](h, *args, **kwargs))
        return h

    @contextmanager
    def passed_through(self, indices, last_output: torch.Tensor | None = None):
        """Blocks ``indices`` return their input for the block (the last ``last_output`` when given);
        the model's own ``forward`` runs the others, with the caller's cache or gradients."""
        indices = sorted(int(i) for i in indices)
        if not indices:
            yield
            return
        first, last = indices[0], indices[-1]
        if first == 0 and self._returns is _UNKNOWN:
            self._probe()

        def make(i):
            def forward(hidden_states, *args, **kwargs):
                out = last_output if (i == last and last_output is not None) else hidden_states
                return out if self._returns is None else (out,) + (None,) * (self._returns - 1)
            return forward

        learn = {} if first == 0 else {f"block_out.{first - 1}": lambda h, output: None}
        saved = []
        with self.hooks(learn):
            try:
                for i in indices:
                    block = self.blocks[i]
                    saved.append((block, block.__dict__.get("forward")))
                    block.forward = make(i)
                yield
            finally:
                for block, previous in saved:
                    if previous is None:
                        del block.forward
                    else:
                        block.forward = previous

    def _probe(self) -> None:
        """Learn what a block returns from block 0 on one token (the rest passed through)."""
        with self.passed_through(range(1, self.n_blocks)), self.hooks({"block_out.0": lambda h, output: None}), \
                torch.no_grad():
            self.model(input_ids=torch.zeros(1, 1, dtype=torch.long, device=next(self.model.parameters()).device),
                       use_cache=False)

    def run_from(self, input_ids: torch.Tensor, stream: torch.Tensor, *, first_block: int,
                 grad: bool = False) -> torch.Tensor:
        """The model's logits (no cache) when ``stream`` (batch, seq, d) is block ``first_block - 1``'s
        output: blocks before it passed through; ``grad`` keeps the graph back into ``stream``."""
        if not 1 <= first_block <= self.n_blocks:
            raise NJTCError(f"`first_block` must be in 1..{self.n_blocks}, not {first_block}")
        param = next(self.model.parameters())
        with self.passed_through(range(first_block), last_output=stream.to(param.device, param.dtype)), \
                nullcontext() if grad else torch.no_grad():
            return self.model(input_ids=input_ids.to(param.device), use_cache=False).logits

    def mlp_projections(self, fold: FoldSpec | None = None) -> list[nn.Module]:
        """Every block's MLP output projection (``fold`` the family's checked fold)."""
        spec = fold if fold is not None else architectures.check_foldable(self.model.config)
        return [_get(block, spec.projection) for block in self.blocks]

    def enable_bias_option(self, fold: FoldSpec) -> None:
        """Switch on the config's MLP bias option (Llama's ``mlp_bias``), adding zero biases where it puts them."""
        setattr(self.model.config, fold.bias_option, True)
        for block in self.blocks:
            for path in fold.bias_modules:
                lin = _get(block, path)
                if lin.bias is None:
                    lin.bias = nn.Parameter(torch.zeros(lin.out_features, dtype=lin.weight.dtype,
                                                        device=lin.weight.device))

    def remove_blocks(self, start: int, remove: int) -> None:
        """Delete blocks ``start .. start+remove-1`` in place: the kept blocks' ``layer_idx`` renumbered,
        the config's layer count and per-layer lists (``layer_types``) shortened."""
        n = self.n_blocks
        kept = [b for i, b in enumerate(self.blocks) if not start <= i < start + remove]
        parent_path, _, name = self.spec.blocks.rpartition(".")
        setattr(_get(self.model, parent_path) if parent_path else self.model, name, nn.ModuleList(kept))
        for new_index, block in enumerate(kept):
            for module in block.modules():
                if isinstance(getattr(module, "layer_idx", None), int):
                    module.layer_idx = new_index
        config = self.model.config
        config.num_hidden_layers = len(kept)
        for key, value in list(vars(config).items()):
            if isinstance(value, list) and len(value) == n and key.startswith("layer"):
                setattr(config, key, [v for i, v in enumerate(value) if not start <= i < start + remove])
        self._resolve()
