"""The model's own room: every way the package reads, skips or changes a model's blocks.

A :class:`Decoder` is resolved once per model (the family table's parts, the block count, the
:class:`~njtc_solve.core.head.Head`), and every stage that touches a live model goes through it:

- :meth:`Decoder.hooks`, the one hook installer: hooks by point name (``block_in.{i}``,
  ``block_out.{i}``, ``mlp_out.{i}``), every one removed on every exit, an exception's
  included (TransformerLens's ``hooks()`` context);
- :meth:`Decoder.record` and :meth:`Decoder.run_blocks`: one ordinary pass keeps every block's
  input and call arguments; blocks are then replayed on another hidden state;
- :meth:`Decoder.passed_through`: the model's own ``forward`` (with a KV cache, or gradients)
  while some blocks return their input, the last of them a given stream; their ``forward`` is
  restored on every exit (tuned-lens's ``model_surgery`` contexts);
- :meth:`Decoder.run_from`: the model's logits when a stream enters block ``first_block``;
- :meth:`Decoder.mlp_projections`, :meth:`Decoder.enable_bias_option` and
  :meth:`Decoder.remove_blocks`: what folding a map and removing blocks change, in place.

Hooks, ``forward`` patching and changes of the block list live here and nowhere else in the
package (``tests/test_layout.py`` checks it).

Examples
--------
>>> import torch
>>> decoder = Decoder.of(model)
>>> ids = torch.tensor([[5, 17, 42, 7]])
>>> recorded = decoder.record(ids)
>>> len(recorded.hidden) == decoder.n_blocks + 1
True
>>> h = decoder.run_blocks(recorded, recorded.hidden[1], 1, decoder.n_blocks)   # replay blocks 1..L-1
>>> bool(torch.equal(h, recorded.hidden[-1]))
True
>>> logits = decoder.run_from(ids, recorded.hidden[2], first_block=2)      # blocks 0, 1 passed through
>>> bool(torch.allclose(logits, recorded.logits, atol=1e-5))
True
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from contextlib import ExitStack, contextmanager, nullcontext
from dataclasses import dataclass

import torch
from torch import nn

from njtc_solve.core import architectures
from njtc_solve.core.architectures import FoldSpec, _get, projection_of, resolve_parts
from njtc_solve.core.errors import NJTCError
from njtc_solve.core.head import Head

__all__ = ["Decoder", "Recording"]

_UNKNOWN = object()
_ATTRIBUTE = "_njtc_decoder"  # where a model keeps its decoder


@dataclass
class Recording:
    """One ordinary pass of :meth:`Decoder.record`.

    ``hidden[l]`` is block ``l``'s input (``l < L``) and ``hidden[L]`` the last block's output,
    ``(batch, seq, d)``; ``calls[i]`` block ``i``'s arguments other than the hidden state
    (masks, position embeddings ...); ``logits`` the model's own.
    """

    hidden: list
    calls: list
    logits: torch.Tensor


def _first(output):
    """The hidden state a block returns: the tensor, or the first item of its tuple."""
    return output[0] if isinstance(output, tuple) else output


class Decoder:
    """A causal language model's parts, head and surgery, resolved once.

    Parameters
    ----------
    model : transformers causal LM
        Any family of :mod:`njtc_solve.core.architectures` (or one whose parts were named
        with :func:`~njtc_solve.core.architectures.custom_architecture`).

    Attributes
    ----------
    model, spec, blocks, final_norm, unembed, projection
        The model, its table entry and its parts (``projection`` the output projection
        between the final norm and the unembedding, or ``None``).
    n_blocks : int
        L, the number of blocks.
    """

    def __init__(self, model):
        self.model = model
        self._resolve()
        self._returns = _UNKNOWN  # what a block returns: a tensor (None) or a tuple of this length
        self._head, self._heads_on = None, {}  # (parameter versions, Head), and its copies by device

    @classmethod
    def of(cls, model) -> Decoder:
        """The model's decoder, made on first use and kept with the model (made again if its block list changed)."""
        decoder = model.__dict__.get(_ATTRIBUTE)
        if decoder is None or decoder.model is not model or _get(model, decoder.spec.blocks) is not decoder.blocks:
            decoder = cls(model)
            object.__setattr__(model, _ATTRIBUTE, decoder)  # a plain attribute, not a submodule
        return decoder

    def _resolve(self) -> None:
        self.spec, self.blocks, self.final_norm, self.unembed = resolve_parts(self.model)
        self.projection = projection_of(self.model, self.spec)
        self.n_blocks = len(self.blocks)

    @property
    def head(self) -> Head:
        """The model's :class:`~njtc_solve.core.head.Head` (float32, CPU), read once.

        Read again when a parameter of the final norm, the unembedding or the output
        projection has changed since (a new tensor, or one changed in place).
        """
        key = tuple((id(p), p._version, p.data_ptr(), p.dtype) for module in (self.final_norm, self.unembed, self.projection)
                    if module is not None for p in module.parameters())
        if self._head is None or self._head[0] != key:
            self._head, self._heads_on = (key, Head.from_model(self.model)), {}
        return self._head[1]

    def head_on(self, device) -> Head:
        """:attr:`head` on ``device``, one copy per device."""
        head, device = self.head, torch.device(device)
        if device not in self._heads_on:
            self._heads_on[device] = head.to(device)
        return self._heads_on[device]

    @property
    def device(self) -> torch.device:
        """Where the model takes its input ids (its input embedding's device)."""
        return self.model.get_input_embeddings().weight.device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    # -- hooks -----------------------------------------------------------------------------
    @contextmanager
    def hooks(self, points: dict[str, Callable], fold: FoldSpec | None = None):
        """Install hooks by point name for the duration; every one is removed on every exit.

        Points and what their callable receives:

        - ``block_in.{i}``: ``fn(hidden, args, kwargs)`` before block ``i`` runs: its hidden
          state and its other arguments;
        - ``block_out.{i}``: ``fn(hidden, output)`` after block ``i``: the hidden state it
          returns and its raw output (a tensor or a tuple);
        - ``mlp_out.{i}``: ``fn(output)``: block ``i``'s MLP output projection's output, the
          MLP part of what the block adds to the stream (``fold`` the family's checked fold;
          checked here when not given).

        Return values are ignored: hooks read, they never change the computation.
        """
        with ExitStack() as stack:
            for name, fn in points.items():
                stack.callback(self._register(name, fn, fold).remove)
            yield

    def _register(self, name: str, fn: Callable, fold: FoldSpec | None):
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
        spec = fold if fold is not None else architectures.check_foldable(self.model.config)
        points = {f"mlp_out.{i}": functools.partial(outputs.__setitem__, i) for i in range(self.n_blocks)}
        with self.hooks(points, spec):
            yield outputs

    # -- replay ----------------------------------------------------------------------------
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

    # -- pass-through ----------------------------------------------------------------------
    @contextmanager
    def passed_through(self, indices, last_output: torch.Tensor | None = None):
        """Blocks ``indices`` return their input for the duration (the last of them ``last_output`` when given).

        The model's own ``forward`` then runs the other blocks, with whatever cache or
        gradients its caller uses. A passed-through block returns what a real one does (a
        tensor, or a tuple whose first item is read: GPT-Neo, BLOOM, Falcon); that is learnt
        from the block before the first passed-through one, or from one probe pass of the
        first block on one token. Every ``forward`` is restored on every exit.
        """
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
            self.model(input_ids=torch.zeros(1, 1, dtype=torch.long, device=self.device), use_cache=False)

    def run_from(self, input_ids: torch.Tensor, stream: torch.Tensor, *, first_block: int,
                 grad: bool = False) -> torch.Tensor:
        """The model's logits when ``stream`` enters block ``first_block`` and only the blocks from it run.

        Blocks ``0..first_block-1`` are passed through (the last one returns ``stream``, shape
        ``(batch, seq, d)``); with ``first_block`` past the last block ``stream`` goes straight
        to the final norm. Positions, masks and the head are the model's own; no cache.
        ``grad`` keeps the graph (a gradient flows back into ``stream``).
        """
        if not 1 <= first_block <= self.n_blocks:
            raise NJTCError(f"`first_block` must be in 1..{self.n_blocks}, not {first_block}")
        stream = stream.to(self.device, self.dtype)
        with self.passed_through(range(first_block), last_output=stream), \
                nullcontext() if grad else torch.no_grad():
            return self.model(input_ids=input_ids.to(self.device), use_cache=False).logits

    # -- folding and removal ---------------------------------------------------------------
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
        """Delete blocks ``start .. start+remove-1`` in place and make the model consistent again.

        The remaining blocks' attention ``layer_idx`` (which the KV cache indexes by) is
        renumbered, the config's layer count set and per-layer config lists (``layer_types``)
        shortened.
        """
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
