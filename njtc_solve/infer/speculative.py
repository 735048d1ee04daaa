"""Greedy self-speculative decoding with a shortcut map as the draft head.

The draft runs blocks 0..ℓ−1 on each new token and reads layer ℓ through the map and the head:
``k`` tokens, one at a time. The verification runs blocks ℓ..L−1 on the ``k + 1`` layer-ℓ states
in one pass and keeps the drafts the model's argmax agrees with, plus its own next token: the
model's greedy output (up to the rounding of a batched pass, which can flip an exact near-tie).
Both are the model's own ``forward`` on one :class:`transformers.DynamicCache`, the other blocks
passed through (:meth:`njtc_solve.core.decoder.Decoder.passed_through`); a verification sees the
cache's first ℓ entries aliased to layer ℓ's, so positions and masks follow the upper layers.

Examples
--------
>>> from njtc_solve import fit_shortcuts
>>> [shortcuts] = fit_shortcuts("activations.h5", method="jtc", ranks=None, progress=False)
>>> input_ids = tokenizer("The import statement", return_tensors="pt").input_ids
>>> drafter = ShortcutDrafter(model, shortcuts, exit_layer=2)
>>> result = speculative_generate(model, input_ids, drafter=drafter, max_new_tokens=8, draft_tokens=3)
>>> bool((result.sequences == model.generate(input_ids, do_sample=False, max_new_tokens=8)).all())
True
"""

from __future__ import annotations

import copy
import inspect
import time
import warnings
from dataclasses import dataclass, field
from typing import ClassVar

import torch

from njtc_solve.core.decoder import Decoder
from njtc_solve.core.errors import NJTCError
from njtc_solve.core.params import DEVICE, Interval, check_spec
from njtc_solve.maps.compatibility import check_compatible
from njtc_solve.maps.shortcuts import Shortcuts

__all__ = ["GenerateSpec", "GenerationStats", "SpeculativeResult", "ShortcutDrafter", "check_greedy_config",
           "speculative_generate"]

# decoding strategies other than greedy search under do_sample=False, and a stopping rule the drafter lacks
# (settings that build no logits processor)
_STRATEGIES = {"num_beams": (None, 1), "num_beam_groups": (None, 1), "penalty_alpha": (None, 0.0),
               "stop_strings": (None,), "dola_layers": (None,), "custom_generate": (None,), "max_time": (None,)}


def _greedy_processors(model, config) -> list[str]:
    """Names of the logits processors ``model.generate(do_sample=False)`` builds from ``config``
    (transformers' own ``_get_logits_processor``, after its special tokens are prepared as generate does)."""
    from transformers.generation import LogitsProcessorList

    config = copy.deepcopy(config)
    config.do_sample = False
    for name, value in list(vars(config).items()):  # an empty list or dict (suppress_tokens=[]) sets nothing
        if not name.startswith("_") and isinstance(value, (list, tuple, dict)) and len(value) == 0:
            setattr(config, name, None)
    model._prepare_special_tokens(config, False, device="cpu")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "... requires input_ids": the warnings generate itself would give
        # generate passes a decoder-only model's prompt as its encoder_input_ids too
        prompt = torch.zeros(1, 1, dtype=torch.long)
        built = model._get_logits_processor(generation_config=config, input_ids_seq_length=1, encoder_input_ids=prompt,
                                            prefix_allowed_tokens_fn=None, logits_processor=LogitsProcessorList(),
                                            device="cpu", model_kwargs={})
    return [type(p).__name__ for p in built]


@dataclass(frozen=True)
class GenerateSpec:
    """The settings of a generation, checked when made, before the model loads.

    What needs the model's configuration is checked by :meth:`check_model`.

    Parameters
    ----------
    exit_layer : int or None
        ℓ: the draft reads the residual stream after this many blocks (1..blocks−1); ``None``
        only with ``draft_tokens`` 0.
    max_new_tokens : int
    draft_tokens : int, optional
        Tokens drafted per verification (0: the model's own greedy decoding); ``None``: chosen
        by calibration (:mod:`njtc_solve.infer.calibrate`).
    max_draft_tokens, calibration_sequences : int
        Largest draft length, and held-out sequences, calibration uses (at least 1).
    device : str

    Examples
    --------
    >>> GenerateSpec(exit_layer=2, draft_tokens=-1)
    Traceback (most recent call last):
      ...
    njtc_solve.core.errors.NJTCError: `draft_tokens` must be 0 or more, not -1
    """

    exit_layer: int | None
    max_new_tokens: int = 64
    draft_tokens: int | None = None
    max_draft_tokens: int = 8
    calibration_sequences: int = 4
    device: str = "cpu"

    constraints: ClassVar[dict] = {
        "exit_layer": [None, Interval(int)],  # its range needs the model (check_model)
        "max_new_tokens": [Interval(int, 1, None)],
        "draft_tokens": [None, Interval(int, 0, None, says="0 or more")],
        "max_draft_tokens": [Interval(int, 1, None)],
        "calibration_sequences": [Interval(int, 1, None)],
        "device": [DEVICE],
    }

    def __post_init__(self):
        check_spec(self)
        if self.exit_layer is None and self.draft_tokens != 0:
            raise NJTCError("`exit_layer` is needed to draft; only `draft_tokens=0` runs without one")

    def check_model(self, n_blocks: int, hidden_size: int | None = None, shortcuts: Shortcuts | None = None,
                    where: str = "") -> None:
        """Refuse an exit layer the model lacks, and maps (read from ``where``) that cannot draft for it.

        Needs the configuration only (``hidden_size`` ``None``: unknown).
        """
        if self.exit_layer is None:  # no draft
            return
        if not 1 <= self.exit_layer <= n_blocks - 1:
            raise NJTCError(f"`exit_layer` must be in 1..{n_blocks - 1} (the model has {n_blocks} blocks), "
                            f"not {self.exit_layer}")
        if shortcuts is None:
            return
        if shortcuts.target_layer != n_blocks:
            raise NJTCError(f"`shortcuts` {where} map to layer {shortcuts.target_layer}, not the model's last "
                            f"layer ({n_blocks}): the draft reads them through the head")
        if shortcuts.method != "identity" and self.exit_layer not in shortcuts.maps:
            raise NJTCError(f"`shortcuts` {where} have no map for `exit_layer` {self.exit_layer} "
                            f"(they have {sorted(shortcuts.maps)})")
        width = shortcuts.maps[self.exit_layer].width if self.exit_layer in shortcuts.maps else None
        if width is not None and hidden_size is not None and width != hidden_size:
            raise NJTCError(f"`shortcuts` {where} were fitted on another model: they map width {width}, "
                            f"the model's is {hidden_size}")
        recorded = shortcuts.stats.get("n_layers")
        if isinstance(recorded, int) and recorded != n_blocks:
            raise NJTCError(f"`shortcuts` {where} were fitted on another model of {recorded} blocks, not {n_blocks}")


def check_greedy_config(model) -> list[int]:
    """The model's end-of-sequence ids, once its generation config is checked to be plain greedy.

    The logits processors transformers builds from the config (its ``_get_logits_processor``)
    must be those it builds from an empty config, and the strategy greedy search: speculative
    decoding here reproduces the plain argmax only.

    Raises
    ------
    NJTCError
        Naming the settings that make greedy decoding other than the argmax.
    """
    from transformers import GenerationConfig

    config = getattr(model, "generation_config", None)
    if config is None:
        return []
    for name, neutral in _STRATEGIES.items():
        value = getattr(config, name, None)
        if value not in neutral and not (isinstance(value, (list, tuple, dict)) and len(value) == 0):
            raise NJTCError(f"the model's generation config sets {name}={value!r}: greedy decoding is then not the "
                            "plain argmax, which is what speculative decoding reproduces")
    tokens = {k: getattr(config, k, None) for k in ("eos_token_id", "pad_token_id", "bos_token_id")}
    plain = _greedy_processors(model, GenerationConfig(**tokens))
    built = _greedy_processors(model, config)
    if built != plain:
        culprits = []
        for name, value in config.to_diff_dict().items():
            trial = GenerationConfig(**tokens)
            try:
                setattr(trial, name, copy.deepcopy(value))
                if _greedy_processors(model, trial) != plain:
                    culprits.append(f"{name}={value!r}")
            except Exception:  # a setting that does not stand alone: named by the processors below
                continue
        extra = ", ".join(sorted(set(built) - set(plain)) or built)
        raise NJTCError(f"the model's generation config sets {', '.join(culprits) or 'settings'} (model.generate "
                        f"applies {extra}): greedy decoding is then not the plain argmax, which is what speculative "
                        "decoding reproduces")
    eos = config.eos_token_id
    return [] if eos is None else [int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos])]


def _cache_keyword(module) -> str:
    """The name under which ``module.forward`` takes the KV cache (``cache`` in transformers 5)."""
    parameters = inspect.signature(module.forward).parameters
    for name in ("cache", "past_key_values"):
        if name in parameters:
            return name
    raise NJTCError(f"{type(module).__name__}.forward takes no KV cache (neither `cache` nor `past_key_values`)")


def _length(layer) -> int:
    """Positions held by one layer's cache entry."""
    keys = getattr(layer, "keys", None)
    return 0 if keys is None or keys.numel() == 0 else int(keys.shape[-2])


def _upper_view(cache, exit_layer: int):
    """A shallow copy of ``cache`` whose first ``exit_layer`` entries alias entry ``exit_layer`` (never written)."""
    view = copy.copy(cache)
    view.layers = [cache.layers[exit_layer]] * exit_layer + list(cache.layers[exit_layer:])
    return view


class ShortcutDrafter:
    """The draft of self-speculative decoding: blocks ``0..exit_layer−1``, a shortcut map, the head.

    Parameters
    ----------
    model : transformers.PreTrainedModel
    shortcuts : Shortcuts or None
        Maps fitted on this model to its last layer; ``None`` is the logit lens.
    exit_layer : int
        ℓ in ``1..L−1``: the draft reads layer ℓ, the output of block ℓ−1.
    check : bool
        Check the maps against the model (:func:`njtc_solve.maps.compatibility.check_compatible`).
    model_sha256 : str, optional
        The model's weights hash, when known.

    Raises
    ------
    NJTCError
        ``exit_layer`` outside ``1..L−1``, no map for it, maps of another model or target.
    """

    def __init__(self, model, shortcuts: Shortcuts | None, exit_layer: int, *, check: bool = True,
                 model_sha256: str | None = None):
        self.decoder = decoder = Decoder.of(model)
        n = decoder.n_blocks
        if not isinstance(exit_layer, int) or isinstance(exit_layer, bool) or not 1 <= exit_layer <= n - 1:
            raise NJTCError(f"`exit_layer` must be a layer in 1..{n - 1} (the model has {n} blocks), not {exit_layer!r}")
        if shortcuts is None:
            shortcuts = Shortcuts.identity([exit_layer], n)
        if check:
            check_compatible(shortcuts, model, model_sha256=model_sha256)
        if shortcuts.target_layer != n:
            raise NJTCError(f"shortcuts {shortcuts.name} target layer {shortcuts.target_layer}, not the last layer ({n})")
        if exit_layer not in shortcuts.maps:
            if shortcuts.method != "identity":
                raise NJTCError(f"shortcuts {shortcuts.name} have no map for `exit_layer` {exit_layer} "
                                f"(they have {sorted(shortcuts.maps)})")
            shortcuts = Shortcuts.identity([exit_layer], n)
        self.model, self.shortcuts, self.exit_layer, self.n_blocks = model, shortcuts, exit_layer, n
        self.base = model.base_model
        self.cache_keyword = _cache_keyword(model)
        self.base_cache_keyword = _cache_keyword(self.base)
        self.device = next(model.parameters()).device
        self.map = shortcuts.maps[exit_layer].to_map(self.device).float()
        # one vocabulary-sized matrix on the device: a narrow map's (r + 2) × V factor, or the head
        self.head, self.low_rank = decoder.head, None
        if self.map.U is not None and not self.map.residual:
            bias = None if self.map.bias is None else self.map.bias.cpu()
            with torch.no_grad():
                self.low_rank = self.head.low_rank_factor(self.map.V.cpu(), bias).to(self.device)
        else:
            self.head = decoder.head_on(self.device)

    @property
    def name(self) -> str:
        """The map's label (``identity`` for the logit lens) and the exit layer, e.g. ``jtc@20``."""
        return f"{self.shortcuts.name}@{self.exit_layer}"

    # -- the three parts of a step ----------------------------------------------------------
    def lower(self, input_ids: torch.Tensor, cache) -> torch.Tensor:
        """Run blocks ``0..ℓ−1`` on ``input_ids`` (1, m), writing their cache; the layer-ℓ states (1, m, d)."""
        captured = []
        with self.decoder.hooks({f"block_out.{self.exit_layer - 1}": lambda h, output: captured.append(h)}), \
                self.decoder.passed_through(range(self.exit_layer, self.n_blocks)):
            self.base(input_ids=input_ids, **{self.base_cache_keyword: cache}, use_cache=True)
        return captured[-1]

    def draft_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Draft logits (m, V) of layer-ℓ states (m, d), float32 (a narrow map's without the monotone
        logit scale and soft-cap: only the argmax is used)."""
        x = hidden.reshape(-1, hidden.shape[-1]).float()
        if self.low_rank is not None:
            _, z = self.map._normalized(x)
            a = z @ self.map.U
            y = a @ self.map.V if self.map.bias is None else a @ self.map.V + self.map.bias
            return self.head.low_rank_linear(self.low_rank, a, y)
        return self.head.logits(self.map(x))

    def upper(self, input_ids: torch.Tensor, hidden: torch.Tensor, cache) -> torch.Tensor:
        """Run blocks ``ℓ..L−1`` and the head on layer-ℓ states ``hidden`` (1, m, d); logits (1, m, V).

        Called after :meth:`lower`, which learns what a block returns.
        """
        with self.decoder.passed_through(range(self.exit_layer), last_output=hidden):
            out = self.model(input_ids=input_ids, **{self.cache_keyword: _upper_view(cache, self.exit_layer)},
                             use_cache=True)
        return out.logits

    # -- the KV cache ---------------------------------------------------------------------------
    def prefill(self, input_ids: torch.Tensor):
        """Run the model on ``input_ids`` (1, n) into a new cache; its logits (1, n, V) and the cache,
        whose layers are checked to be plain growing (croppable) full-attention ones."""
        from transformers import DynamicCache

        try:
            cache = DynamicCache(config=self.model.config)
        except TypeError:  # older signatures
            cache = DynamicCache()
        logits = self.model(input_ids=input_ids, **{self.cache_keyword: cache}, use_cache=True).logits
        layers = getattr(cache, "layers", None)
        if layers is None or len(layers) < self.n_blocks:
            raise NJTCError("the model's KV cache has no per-layer entries (transformers >= 4.56 needed)")
        for i, layer in enumerate(layers[:self.n_blocks]):
            if getattr(layer, "is_sliding", False) or not hasattr(layer, "keys"):
                raise NJTCError(f"layer {i}'s KV cache is a {type(layer).__name__} (sliding-window or linear "
                                "attention); speculative decoding here needs full-attention layers")
        return logits, cache

    def cached(self, cache) -> int:
        """Positions held by layer ℓ's cache entry (every layer's after :meth:`crop`)."""
        return _length(cache.layers[self.exit_layer])

    @staticmethod
    def crop(cache, length: int) -> None:
        """Cut every layer's cached keys and values to the first ``length`` positions."""
        for layer in cache.layers:
            if _length(layer) > length:
                layer.keys = layer.keys[..., :length, :]
                layer.values = layer.values[..., :length, :]


@dataclass
class GenerationStats:
    """What one speculative generation did: ``new_tokens`` (the prefill's included), ``verifications``
    after the prefill, draft tokens ``drafted`` and ``accepted``, and ``seconds`` of the whole."""

    new_tokens: int = 0
    verifications: int = 0
    drafted: int = 0
    accepted: int = 0
    seconds: float = 0.0

    @property
    def acceptance_rate(self) -> float:
        """Accepted over drafted tokens (NaN when nothing was drafted), drafts after a rejection included."""
        return self.accepted / self.drafted if self.drafted else float("nan")

    @property
    def tokens_per_verification(self) -> float:
        """Tokens each verification pass produced (accepted drafts plus the model's own)."""
        return (self.new_tokens - 1) / self.verifications if self.verifications else float("nan")

    @property
    def tokens_per_second(self) -> float:
        return self.new_tokens / self.seconds if self.seconds > 0 else float("nan")

    def as_dict(self) -> dict:
        return {"new_tokens": self.new_tokens, "verifications": self.verifications, "drafted": self.drafted,
                "accepted": self.accepted, "acceptance_rate": self.acceptance_rate,
                "tokens_per_verification": self.tokens_per_verification, "seconds": self.seconds,
                "tokens_per_second": self.tokens_per_second}


@dataclass
class SpeculativeResult:
    """``sequences`` (1, prompt + new) as ``model.generate`` returns them, ``stats``, and the final cache."""

    sequences: torch.Tensor
    stats: GenerationStats = field(default_factory=GenerationStats)
    cache: object = None


def speculative_generate(model, input_ids, *, drafter: ShortcutDrafter | None, max_new_tokens: int,
                         draft_tokens: int) -> SpeculativeResult:
    """Greedy decoding of ``model`` from ``input_ids``, drafting ``draft_tokens`` tokens per step.

    Parameters
    ----------
    model : transformers.PreTrainedModel
        The model ``drafter`` was built on.
    input_ids : Tensor
        The prompt, (1, n) or (n,) token ids.
    drafter : ShortcutDrafter or None
        ``None`` only with ``draft_tokens`` 0.
    max_new_tokens : int
        At least 1; generation also ends at an end-of-sequence token.
    draft_tokens : int
        Tokens drafted before each verification (0: every step is one full pass).

    Returns
    -------
    SpeculativeResult
        ``sequences`` equals ``model.generate(input_ids, do_sample=False, max_new_tokens=...)``.
    """
    if drafter is not None and drafter.model is not model:
        raise NJTCError("`drafter` was built on another model than `model`")
    GenerateSpec(None if drafter is None else drafter.exit_layer, max_new_tokens=max_new_tokens,
                 draft_tokens=draft_tokens, device=None)
    if draft_tokens is None:  # auto is the caller's calibration
        raise NJTCError("`draft_tokens` must be 0 or more, not None")
    ids = torch.as_tensor(input_ids, device=next(model.parameters()).device if drafter is None else drafter.device)
    ids = ids[None] if ids.ndim == 1 else ids
    if ids.ndim != 2 or ids.shape[0] != 1 or ids.shape[1] == 0:
        raise NJTCError(f"`input_ids` must hold one non-empty prompt, (1, n); got shape {tuple(ids.shape)}")
    vocab = model.get_input_embeddings().num_embeddings
    if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool or not (
            0 <= int(ids.min()) and int(ids.max()) < vocab):
        raise NJTCError(f"`input_ids` must be token ids, whole numbers in 0..{vocab - 1} (the model's vocabulary)")
    from njtc_solve.core.models import context_length

    limit = context_length(model.config)
    if limit is not None and ids.shape[1] + max_new_tokens > limit:
        raise NJTCError(f"the prompt ({ids.shape[1]} tokens) and `max_new_tokens` {max_new_tokens} reach past the "
                        f"model's context of {limit} tokens")
    eos = set(check_greedy_config(model))
    pad = getattr(getattr(model, "generation_config", None), "pad_token_id", None)
    if pad is not None and int(pad) not in eos and bool((ids == int(pad)).any()):
        raise NJTCError(f"`input_ids` holds the pad token id {int(pad)}: model.generate would mask it out of "
                        "attention; pass the prompt without padding")
    if draft_tokens == 0:  # nothing to draft: the model's own greedy decoding, never slower than it
        return _model_generate(model, ids, max_new_tokens)
    stats, start = GenerationStats(), time.perf_counter()
    out = []
    with torch.no_grad():
        logits, cache = drafter.prefill(ids)
        out.append(int(logits[0, -1].argmax()))
        done = out[-1] in eos
        while not done and len(out) < max_new_tokens:
            past = drafter.cached(cache)  # every layer holds the positions before out[-1]
            k = min(draft_tokens, max_new_tokens - len(out) - 1)
            tokens, states = [out[-1]], []
            for i in range(k + 1):
                states.append(drafter.lower(torch.tensor([[tokens[-1]]], device=drafter.device), cache))
                if i == k or tokens[-1] in eos:  # nothing after an end of sequence is worth verifying
                    break
                tokens.append(int(drafter.draft_logits(states[-1])[-1].argmax()))
            drafts = tokens[1:]
            verify_ids = torch.tensor([tokens], device=drafter.device)
            greedy = drafter.upper(verify_ids, torch.cat(states, dim=1), cache)[0].argmax(-1).tolist()
            accepted = next((i for i, (d, g) in enumerate(zip(drafts, greedy)) if d != g), len(drafts))
            stats.verifications += 1
            stats.drafted += len(drafts)
            stats.accepted += accepted
            for token in drafts[:accepted] + [greedy[accepted]]:
                out.append(token)
                if token in eos or len(out) >= max_new_tokens:
                    done = True
                    break
            drafter.crop(cache, past + accepted + 1)  # the last accepted token's entries stay; the model's own is next
    stats.new_tokens, stats.seconds = len(out), time.perf_counter() - start
    sequences = torch.cat([ids, torch.tensor([out], dtype=ids.dtype, device=ids.device)], dim=1)
    return SpeculativeResult(sequences, stats, cache)


def _model_generate(model, ids: torch.Tensor, max_new_tokens: int) -> SpeculativeResult:
    """``model.generate(ids, do_sample=False, max_new_tokens=...)``, with the stats of a run without drafts."""
    start = time.perf_counter()
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=max_new_tokens,
                             return_dict_in_generate=True)
    new_tokens = out.sequences.shape[1] - ids.shape[1]
    stats = GenerationStats(new_tokens=new_tokens, verifications=new_tokens - 1, seconds=time.perf_counter() - start)
    return SpeculativeResult(out.sequences, stats, getattr(out, "cache", None) or getattr(out, "past_key_values", None))
