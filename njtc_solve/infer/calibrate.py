"""Choosing the exit layer ℓ and the draft length k from measured acceptance and cost.

The acceptance ``α(map, ℓ)`` is how often the draft's top-1 is the model's on held-out
sequences; the costs are timed on the running model: the lower blocks on one token
(``t_low(ℓ)``), the map and head (``t_map``), a verification of ``m`` tokens (``t_up(ℓ, m)``)
and a plain one-token step (``t_plain``). A step drafting ``k`` tokens costs
``(k + 1)·t_low(ℓ) + k·t_map + t_up(ℓ, k + 1)`` and yields ``E = (1 − α^(k+1)) / (1 − α)``
tokens on average; the choice is the (map, ℓ, k) of the highest ``E / cost``, ``k = 0`` (plain
decoding) included.

Examples
--------
>>> from njtc_solve import fit_shortcuts
>>> [jtc] = fit_shortcuts("activations.h5", method="jtc", ranks=None, progress=False)
>>> sequences = held_out_sequences(tokenizer, documents, jtc, seq_len=16, max_sequences=2)
>>> table = calibrate(model, sequences, {"jtc": jtc}, layers=[1, 2], max_draft_tokens=2, repeats=1)
>>> table.best["map"], table.best["exit_layer"] in (1, 2), table.best["draft_tokens"] in (0, 1, 2)
('jtc', True, True)
>>> print(table.format())          # doctest: +SKIP
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch

from njtc_solve.core.errors import NJTCError
from njtc_solve.data.plan import PlanSpec
from njtc_solve.data.capture import capture_residual_stream
from njtc_solve.infer.speculative import ShortcutDrafter
from njtc_solve.maps.shortcuts import Shortcuts

__all__ = ["CalibrationTable", "calibrate", "expected_tokens", "held_out_sequences", "measure_acceptance",
           "measure_costs"]


def expected_tokens(alpha: float, k: int) -> float:
    """Expected tokens per verification with ``k`` drafts each accepted with probability ``alpha``.

    >>> round(expected_tokens(0.5, 3), 4), expected_tokens(1.0, 3), expected_tokens(0.3, 0)
    (1.875, 4.0, 1.0)
    """
    if not 0.0 <= alpha <= 1.0:
        raise NJTCError(f"`alpha` must be in [0, 1], not {alpha}")
    return float(k + 1) if alpha == 1.0 else (1.0 - alpha ** (k + 1)) / (1.0 - alpha)


def held_out_sequences(tokenizer, documents, shortcuts: Shortcuts | None = None, *,
                       seq_len: int = PlanSpec.seq_len, max_sequences: int = 8, seed: int = PlanSpec.seed) -> list[torch.Tensor]:
    """Token sequences (1, seq_len) of documents the maps were not fitted on.

    The validation documents the maps' provenance records for this corpus, else those of the
    default split (:func:`njtc_solve.data.plan.plan_extraction`).
    """
    from njtc_solve.data.corpus import corpus_sha256
    from njtc_solve.data.plan import plan_extraction

    provenance = {} if shortcuts is None else shortcuts.provenance
    recorded = provenance.get("validation_documents")
    if recorded and provenance.get("corpus_sha256") == corpus_sha256(documents):
        chosen = [documents[i] for i in recorded]
    else:
        chosen = [documents[i] for i in plan_extraction(tokenizer, documents, seq_len=max(seq_len, 2),
                                                        seed=seed).validation_documents]
    ids = tokenizer("\n\n".join(chosen), add_special_tokens=False)["input_ids"]
    n = min(max_sequences, len(ids) // seq_len)
    if n < 1:
        raise NJTCError(f"the held-out documents hold {len(ids)} tokens, fewer than one sequence of {seq_len}")
    return [torch.tensor([ids[i * seq_len:(i + 1) * seq_len]]) for i in range(n)]


def measure_acceptance(model, sequences, drafters: dict[str, list[ShortcutDrafter]], skip_positions: int = 8) -> dict:
    """Top-1 agreement of each drafter with the model on ``sequences``: ``{map: {ℓ: α}}``.

    ``drafters`` maps a label to its drafters (one per exit layer); the first ``skip_positions``
    of each sequence are left out.
    """
    hits: dict[str, dict[int, int]] = {name: {d.exit_layer: 0 for d in ds} for name, ds in drafters.items()}
    total = 0
    device = next(model.parameters()).device
    with capture_residual_stream(model) as hidden, torch.no_grad():
        for ids in sequences:
            logits = model(input_ids=ids.to(device)).logits[0, skip_positions:]
            target = logits.argmax(-1)
            total += len(target)
            for name, ds in drafters.items():
                for d in ds:
                    draft = d.draft_logits(hidden[d.exit_layer][0, skip_positions:]).argmax(-1)
                    hits[name][d.exit_layer] += int((draft == target).sum())
    if total == 0:
        raise NJTCError(f"`skip_positions` {skip_positions} leaves no position of the held-out sequences")
    return {name: {layer: h / total for layer, h in by_layer.items()} for name, by_layer in hits.items()}


def measure_costs(model, prompt: torch.Tensor, drafters: dict[str, list[ShortcutDrafter]], max_draft_tokens: int,
                  repeats: int = 5) -> dict:
    """Seconds of each part of a step (best of ``repeats``, interleaved) after a prefill of ``prompt``.

    Returns ``{"plain": s, "lower": {ℓ: s}, "upper": {ℓ: {m: s}}, "map": {label: s}}``, for
    ``m = 1..max_draft_tokens + 1``; every call's cache entries are cut again.
    """
    any_drafter = next(d for ds in drafters.values() for d in ds)
    device = torch.device(any_drafter.device)
    prompt = prompt.to(device)
    with torch.no_grad():
        _, cache = any_drafter.prefill(prompt)
        n = any_drafter.cached(cache)
        token = prompt[:, -1:]
        parts = {("plain",): lambda: model(input_ids=token, **{any_drafter.cache_keyword: cache}, use_cache=True)}
        by_layer = {}
        for ds in drafters.values():
            for d in ds:
                by_layer.setdefault(d.exit_layer, d)
        for layer, d in sorted(by_layer.items()):
            parts[("lower", layer)] = lambda d=d: d.lower(token, cache)
            h = d.lower(token, cache)
            any_drafter.crop(cache, n)
            for m in range(1, max_draft_tokens + 2):
                ids, states = token.repeat(1, m), h.repeat(1, m, 1)
                parts[("upper", layer, m)] = lambda d=d, ids=ids, states=states: d.upper(ids, states, cache)
        for name, ds in drafters.items():
            h = ds[0].lower(token, cache)
            any_drafter.crop(cache, n)
            parts[("map", name)] = lambda d=ds[0], h=h: d.draft_logits(h).argmax(-1)
        best = dict.fromkeys(parts, math.inf)
        for r in range(repeats + 1):  # interleaved, so that a change of the machine's load hits every part alike
            for key, fn in parts.items():
                start = time.perf_counter()
                fn()
                if device.type == "cuda":  # kernels run asynchronously: time them, not their launch
                    torch.cuda.synchronize(device)
                seconds = time.perf_counter() - start
                any_drafter.crop(cache, n)
                if r:  # the first round warms up
                    best[key] = min(best[key], seconds)
    costs = {"plain": best.pop(("plain",)), "lower": {}, "upper": {}, "map": {}}
    for (part, *where), seconds in best.items():
        if part == "upper":
            costs["upper"].setdefault(where[0], {})[where[1]] = seconds
        else:
            costs[part][where[0]] = seconds
    return costs


@dataclass
class CalibrationTable:
    """Acceptance (``{map: {ℓ: α}}``), costs (:func:`measure_costs`) and the expected rate of every (map, ℓ, k).

    ``rows`` holds one dict per (map, ℓ): ``map``, ``exit_layer``, ``alpha``, its best
    ``draft_tokens``, ``expected_tokens``, ``step_seconds``, ``tokens_per_second`` and
    ``speedup`` over plain decoding; ``best`` is the row of the highest rate.
    """

    acceptance: dict
    costs: dict
    rows: list = field(default_factory=list)
    best: dict = field(default_factory=dict)

    @classmethod
    def from_measurements(cls, acceptance: dict, costs: dict, max_draft_tokens: int) -> CalibrationTable:
        plain = 1.0 / costs["plain"]
        rows = []
        for name, by_layer in acceptance.items():
            for layer, alpha in sorted(by_layer.items()):
                options = []
                for k in range(0, max_draft_tokens + 1):  # k = 0 runs the model's own decoding: a plain step
                    step = (costs["plain"] if k == 0 else
                            (k + 1) * costs["lower"][layer] + k * costs["map"][name] + costs["upper"][layer][k + 1])
                    e = expected_tokens(alpha, k)
                    options.append((e / step, k, e, step))
                rate, k, e, step = max(options)
                rows.append({"map": name, "exit_layer": layer, "alpha": alpha, "draft_tokens": k,
                             "expected_tokens": e, "step_seconds": step, "tokens_per_second": rate,
                             "speedup": rate / plain})
        if not rows:
            raise NJTCError("nothing to calibrate: no map and exit layer")
        return cls(acceptance, costs, rows, max(rows, key=lambda r: r["tokens_per_second"]))

    def format(self) -> str:
        """The table as text, one line per (map, ℓ), the chosen line marked ``*``."""
        lines = [f"plain greedy: {1.0 / self.costs['plain']:.1f} tokens/s (one full pass "
                 f"{1e3 * self.costs['plain']:.2f} ms)",
                 f"  {'map':<16} {'layer':>5} {'alpha':>6} {'k':>3} {'E':>5} {'step ms':>8} {'tok/s':>7} {'x plain':>7}"]
        for r in self.rows:
            mark = "*" if r is self.best else " "
            lines.append(f"{mark} {r['map']:<16} {r['exit_layer']:>5} {r['alpha']:>6.3f} {r['draft_tokens']:>3} "
                         f"{r['expected_tokens']:>5.2f} {1e3 * r['step_seconds']:>8.2f} "
                         f"{r['tokens_per_second']:>7.1f} {r['speedup']:>7.2f}")
        return "\n".join(lines)

    def as_dict(self) -> dict:
        return {"acceptance": {m: {str(l): a for l, a in v.items()} for m, v in self.acceptance.items()},
                "costs": {"plain": self.costs["plain"], "lower": {str(l): s for l, s in self.costs["lower"].items()},
                          "upper": {str(l): {str(m): s for m, s in v.items()} for l, v in self.costs["upper"].items()},
                          "map": dict(self.costs["map"])},
                "rows": self.rows, "best": self.best}


def calibrate(model, sequences, maps: dict[str, Shortcuts | None], layers, *, max_draft_tokens: int = 8,
              repeats: int = 5, model_sha256: str | None = None, check: bool = True) -> CalibrationTable:
    """Measure acceptance and costs, and choose the map, exit layer and draft length.

    Parameters
    ----------
    model : transformers.PreTrainedModel
    sequences : list of Tensor
        Held-out token sequences (1, n) (:func:`held_out_sequences`); the first is also the
        prompt of the cost measurement.
    maps : dict of str to Shortcuts or None
        Candidate maps by label (``None``: the logit lens).
    layers : iterable of int
        Candidate exit layers (a map without one of them skips it).
    max_draft_tokens : int
        Largest k considered (at least 1).
    repeats : int
        Timings are the best of this many calls.
    model_sha256 : str, optional
        The model's weights hash, when known.
    check : bool
        Check each map against the model (:class:`ShortcutDrafter`).
    """
    if isinstance(max_draft_tokens, bool) or not isinstance(max_draft_tokens, int) or max_draft_tokens < 1:
        raise NJTCError(f"`max_draft_tokens` must be at least 1, not {max_draft_tokens!r}")
    if check and model_sha256 is None and any(m is not None and m.method != "identity" for m in maps.values()):
        from njtc_solve.core.models import model_sha256 as weights_sha256

        model_sha256 = weights_sha256(model)
    drafters = {}
    for name, sc in maps.items():
        usable = [l for l in layers if sc is None or sc.method == "identity" or l in sc.maps]
        drafters[name] = [ShortcutDrafter(model, sc, int(l), check=check, model_sha256=model_sha256) for l in usable]
    drafters = {name: ds for name, ds in drafters.items() if ds}
    if not drafters:
        raise NJTCError("none of the maps has a map for any of the candidate `layers`")
    acceptance = measure_acceptance(model, sequences, drafters)
    costs = measure_costs(model, sequences[0], drafters, max_draft_tokens, repeats=repeats)
    return CalibrationTable.from_measurements(acceptance, costs, max_draft_tokens)
