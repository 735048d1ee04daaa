"""Choosing and scoring block replacements on held-out documents: the library behind ``prune``.

:func:`prune_model` runs the model once over a plan's sequences: the training sequences feed
the replacement statistics of every candidate start (:mod:`njtc_solve.prune.folding`), the first
validation sequences are cached (every layer's residual stream, every block's MLP output and
the full model's log-probabilities). Each candidate (plain dropping, and least squares plain,
row-weighted and ridge, with or without an intercept) is then scored by running only the
blocks after the removed ones on the cached stream at the cut: held-out KL of the replaced
model to the full one, top-1 agreement, and perplexity on the text's next tokens. Per start
the lowest KL wins, dropping included, so a replacement worse than dropping is never chosen;
with every start (``start=None``) the start with the lowest KL wins, and the start a
cosine-distance rule (ReplaceMe, ShortGPT) would pick is reported beside it.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from njtc_solve.core.architectures import _get, resolve_parts
from njtc_solve.data.capture import forward_batches
from njtc_solve.core.errors import NJTCError
from njtc_solve.data.plan import plan_extraction
from njtc_solve.prune.folding import (WEIGHTINGS, Replacement, ReplacementAccumulator, apply_replacement, capture_mlp_outputs,
                      check_foldable, check_removal, save_pruned, solve_replacement)
from njtc_solve.data.store import TRAIN, VALIDATION

__all__ = ["HeldOut", "PruneResult", "candidate_replacements", "choose_replacement", "collect_held_out", "model_blocks", "prune_model", "replacement_statistics",
           "replaced_stream", "score_replacement", "tail_logits"]


def model_blocks(name: str | None) -> tuple[str, int, object]:
    """``(model_type, number of blocks, config or None)`` of a model, read without its weights.

    A ``.gguf`` file's metadata (the default model's too) or a folder's ``config.json``; lets
    a command refuse a removal before the model loads.
    """
    from pathlib import Path

    from njtc_solve.core.models import _GGUF_MODEL_TYPES, default_model_path, gguf_reader

    path = default_model_path() if name in (None, "default") else Path(name)
    if path.suffix == ".gguf":
        if not path.is_file():
            raise NJTCError(f"model file {path} not found")
        reader = gguf_reader(path)
        arch_field = reader.fields["general.architecture"]
        arch = bytes(arch_field.parts[arch_field.data[0]]).decode()
        count = reader.fields.get(f"{arch}.block_count")
        if count is None:
            raise NJTCError(f"{path} does not say its block count")
        return _GGUF_MODEL_TYPES.get(arch, arch), int(count.parts[count.data[0]][0]), None
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(str(path))
    except (OSError, ValueError, KeyError) as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise NJTCError(f"cannot read the configuration of model {name!r}: {first}") from err
    return config.model_type, int(config.num_hidden_layers), config


@dataclass
class HeldOut:
    """The full model on held-out sequences, cached for scoring many replacements.

    ``token_ids`` (n_seq, seq); ``hidden[l]`` layer ``l``'s stream and ``mlp[i]`` block
    ``i``'s MLP output, ``(n_seq, seq, d)`` float32 on the CPU; ``logp`` the full model's
    log-probabilities ``(n_seq, seq, V)`` float32.
    """

    token_ids: torch.Tensor
    hidden: list[torch.Tensor]
    mlp: list[torch.Tensor]
    logp: torch.Tensor

    @property
    def n_rows(self) -> int:
        return self.token_ids.numel()

    def full_metrics(self) -> dict:
        """Perplexity of the full model itself on the held-out next tokens."""
        nll = -self.logp[:, :-1].gather(-1, self.token_ids[:, 1:, None].to(self.logp.device))[..., 0]
        return {"kl": 0.0, "top1": 1.0, "ppl": math.exp(float(nll.double().mean())), "nll": float(nll.double().mean())}


def _batch_states(batch, mlp: dict, seq_len: int):
    """A captured batch as ``(hidden, mlp)`` lists of (batch, seq, d) tensors."""
    shape = (-1, seq_len, batch.hidden[0].shape[-1])
    return [h.reshape(shape) for h in batch.hidden], [mlp[i].reshape(shape) for i in range(len(mlp))]


def replacement_statistics(model, plan, pairs: dict, *, weightings=WEIGHTINGS, batch_size: int = 8,
                           device="cpu", bar=None, extra=None):
    """One forward pass over ``plan``'s sequences (every position): the statistics of every ``start → [K]``.

    ``bar`` (a tqdm bar) advances by the tokens of each batch; ``extra(hidden, mlp)``, when
    given, also sees every batch (a benchmark's own accumulator).
    """
    acc = ReplacementAccumulator(pairs, weightings=weightings, device=device)
    with capture_mlp_outputs(model) as mlp:
        for batch in forward_batches(model, plan, batch_size):
            states = _batch_states(batch, mlp, plan.seq_len)
            acc.update(*states)
            if extra is not None:
                extra(*states)
            if bar is not None:
                bar.update(batch.tokens.numel())
    return acc.finalize({"rows": plan.n_rows})


def collect_held_out(model, plan, *, batch_size: int = 8) -> HeldOut:
    """Run the full model over ``plan``'s sequences and cache what scoring needs (see :class:`HeldOut`)."""
    hidden, mlps, logps = None, None, []
    with capture_mlp_outputs(model) as mlp:
        for batch in forward_batches(model, plan, batch_size):
            h, m = _batch_states(batch, mlp, plan.seq_len)
            if hidden is None:
                hidden, mlps = [[] for _ in h], [[] for _ in m]
            for store, new in ((hidden, h), (mlps, m)):
                for i, t in enumerate(new):
                    store[i].append(t.detach().float().cpu().clone())
            logps.append(torch.log_softmax(batch.logits.float(), -1).reshape(h[0].shape[0], plan.seq_len, -1).cpu())
    return HeldOut(torch.as_tensor(plan.token_ids), [torch.cat(t) for t in hidden], [torch.cat(t) for t in mlps],
                   torch.cat(logps))


def tail_logits(model, token_ids: torch.Tensor, stream: torch.Tensor, *, first_block: int) -> torch.Tensor:
    """The model's logits when ``stream`` enters block ``first_block`` and only the blocks after it run.

    Blocks before ``first_block`` are taken out of the model for the call (their output is
    replaced by ``stream``, shape ``(batch, seq, d)``); with ``first_block`` past the last
    block ``stream`` goes straight to the final norm. Positions, masks and the head are the
    model's own.
    """
    spec, blocks, final_norm, _ = resolve_parts(model)
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    stream = stream.to(device, dtype)
    tail = nn.ModuleList(list(blocks)[first_block:])
    entry = tail[0] if len(tail) else final_norm

    def replace_input(module, args, kwargs):
        if args:
            return (stream,) + tuple(args[1:]), kwargs
        return args, {**kwargs, "hidden_states": stream}

    parent_path, _, name = spec.blocks.rpartition(".")
    parent = _get(model, parent_path) if parent_path else model
    handle = entry.register_forward_pre_hook(replace_input, with_kwargs=True)
    parent._modules[name] = tail
    try:
        with torch.no_grad():
            return model(input_ids=token_ids.to(device), use_cache=False).logits
    finally:
        parent._modules[name] = blocks
        handle.remove()


def replaced_stream(held: HeldOut, replacement: Replacement, seqs: slice) -> torch.Tensor:
    """``h_S + m_{S-1}(T - I) + c``: the stream block ``S-1`` writes once the map is folded in."""
    s = replacement.start
    h = held.hidden[s][seqs]
    if replacement.name == "drop":
        return h
    m = held.mlp[s - 1][seqs].double()
    eye = torch.eye(m.shape[-1], dtype=torch.float64)
    out = h.double() + m @ (replacement.T.double().cpu() - eye)
    if replacement.c is not None:
        out = out + replacement.c.double().cpu()
    return out.float()


def score_replacement(model, held: HeldOut, replacement: Replacement, *, chunk_sequences: int = 4) -> dict:
    """Held-out KL(full ‖ replaced) and top-1 agreement over every position, and perplexity.

    Perplexity is ``exp`` of the mean negative log-likelihood of the text's next token
    (positions ``0..seq-2``). Only the blocks after the removed ones run.
    """
    kl = agree = nll = 0.0
    n_rows = n_next = 0
    first = replacement.start + replacement.remove
    for s0 in range(0, len(held.token_ids), chunk_sequences):
        seqs = slice(s0, s0 + chunk_sequences)
        ids = held.token_ids[seqs]
        logq = torch.log_softmax(tail_logits(model, ids, replaced_stream(held, replacement, seqs), first_block=first).float(),
                                 -1).cpu()
        logp = held.logp[seqs]
        kl += float(torch.einsum("bsv,bsv->", logp.exp(), logp - logq))
        agree += float((logq.argmax(-1) == logp.argmax(-1)).sum())
        nll -= float(logq[:, :-1].gather(-1, ids[:, 1:, None])[..., 0].double().sum())
        n_rows += ids.numel()
        n_next += ids[:, 1:].numel()
    return {"kl": kl / n_rows, "top1": agree / n_rows, "ppl": math.exp(nll / n_next), "nll": nll / n_next}


@dataclass
class PruneResult:
    """What :func:`prune_model` chose and why.

    ``chosen`` the replacement to apply; ``candidates`` every scored candidate (start,
    name, held-out ``kl``, ``top1``, ``ppl``, training losses); ``full`` the full model's
    held-out perplexity; ``cosine`` per start the mean cosine similarity of ``h_S`` and
    ``h_{S+K}`` (every row, last positions) and ``cosine_choice`` the start each picks;
    ``record`` the provenance written to ``njtc_prune.json``; ``timings`` in seconds.
    """

    chosen: Replacement
    candidates: list[dict]
    full: dict
    cosine: dict
    cosine_choice: dict
    record: dict = field(default_factory=dict)
    timings: dict = field(default_factory=dict)

    def best(self, start: int, fitted_only: bool = False) -> dict:
        """The best-scoring candidate at ``start`` (among the fitted maps only, with ``fitted_only``)."""
        pool = [c for c in self.candidates if c["start"] == start and not (fitted_only and c["name"] == "drop")]
        return min(pool, key=lambda c: c["kl"])

    def save(self, model, tokenizer, out, *, model_name: str = "", corpus_name: str = "",
             model_sha256: str | None = None, overwrite: bool = False) -> tuple[Path, dict]:
        """Apply the chosen replacement to ``model`` (in place) and write the smaller checkpoint.

        ``out`` becomes a standard checkpoint folder (see :func:`njtc_solve.prune.folding.save_pruned`)
        with ``njtc_prune.json``: the choice, every candidate's held-out scores, the plan, the
        parameter counts before and after, and the provenance given here (``model_sha256`` of
        the full model's weights, hashed now when not given). Returns the folder and that record.
        """
        from njtc_solve.core.models import model_sha256 as weights_sha256

        chosen = self.chosen
        sha = model_sha256 or weights_sha256(model)
        before = sum(p.numel() for p in model.parameters())
        apply_replacement(model, chosen)
        params = {"before": before, "after": sum(p.numel() for p in model.parameters())}  # mlp_bias adds some
        record = {"parameters": params, "format": "njtc-prune", "format_version": 1, "model": model_name,
                  "model_sha256": sha, "architecture": model.config.model_type, "corpus": corpus_name,
                  "start": chosen.start, "removed_blocks": [chosen.start, chosen.start + chosen.remove - 1],
                  "method": chosen.name, "replacement": chosen.describe(), "full_model": self.full,
                  "cosine_choice": self.cosine_choice, "cosine": {str(s): v for s, v in self.cosine.items()},
                  "candidates": self.candidates, "timings_s": self.timings, **self.record}
        return save_pruned(model, tokenizer, out, record=record, overwrite=overwrite), record


def _intercepts(model, spec, intercept: str) -> list[str]:
    """Where an intercept can go: ``"none"``, ``"bias"`` (the projection's own) or the config's option."""
    proj = _get(resolve_parts(model)[1][0], spec.projection)
    has_bias = getattr(proj, "bias", None) is not None
    if intercept == "none":
        return ["none"]
    if has_bias:
        return ["bias"]
    if intercept == "bias" and spec.bias_option is None:
        raise NJTCError(f"intercept='bias': {model.config.model_type}'s MLP output projection has no bias and its "
                        "config no option for one")
    options = [spec.bias_option] if spec.bias_option else []
    return options if intercept == "bias" else ["none"] + options


def candidate_replacements(stats, *, remove: int, starts, weightings=WEIGHTINGS, ridge=(),
                           intercepts=("none",)) -> list[Replacement]:
    """Every candidate at every start: plain dropping, then each weighting × ridge penalty × intercept."""
    maps = []
    for s in starts:
        d = next(m for key, m in stats.moments.items() if key[0] == s)["cxx"].shape[0]
        maps.append(Replacement.drop(s, remove, d))
        for weighting in weightings:
            for alpha in [0.0, *ridge]:
                for where in intercepts:
                    maps.append(solve_replacement(stats, start=s, remove=remove, weighting=weighting, alpha=alpha,
                                                  intercept=where != "none", intercept_name=where))
    return maps


def choose_replacement(model, stats, held: HeldOut, *, remove: int, starts, weightings=WEIGHTINGS, ridge=(),
                       intercepts=("none",), progress: bool = False) -> tuple[Replacement, list[dict]]:
    """Solve and score every candidate; the one with the lowest held-out KL wins (dropping included).

    Returns the chosen :class:`~njtc_solve.prune.folding.Replacement` and every candidate's record
    (its settings and :func:`score_replacement`'s metrics).
    """
    maps = candidate_replacements(stats, remove=remove, starts=starts, weightings=weightings, ridge=ridge,
                                  intercepts=intercepts)
    candidates = [{**rep.describe(), **score_replacement(model, held, rep)}
                  for rep in tqdm(maps, desc="prune: score", leave=False, disable=not progress)]
    best = min(range(len(maps)), key=lambda i: candidates[i]["kl"])
    return maps[best], candidates


def prune_model(model, tokenizer, documents, *, remove: int, start: int | None = None,
                weightings=WEIGHTINGS, ridge=(), intercept: str = "auto", seq_len: int = 128,
                max_tokens: int | None = None, val_fraction: float = 0.25, seed: int = 0, bos: str = "auto",
                batch_size: int = 8, score_tokens: int = 2048, progress: bool = True) -> PruneResult:
    """Fit, score and choose the replacement of ``remove`` consecutive blocks; the model is not changed.

    Parameters
    ----------
    model, tokenizer
        A causal LM of a foldable family (:data:`njtc_solve.prune.folding.FOLDABLE`) and its tokenizer.
    documents : list of str
        The corpus; its training documents give the statistics, the first held-out
        sequences (``score_tokens`` tokens) the scores.
    remove : int
        Number of consecutive blocks to remove (at least 1, fewer than the blocks).
    start : int, optional
        First removed block (0-based, at least 1); ``None`` scores every start.
    weightings : tuple of {"plain", "rms"}
        Row weightings of the least-squares candidates (``rms``: 1 / mean(h_S²)).
    ridge : sequence of float
        Relative ridge penalties (units of ``tr C_xx / d``) for extra candidates, shrinking
        the map towards dropping.
    intercept : {"auto", "none", "bias"}
        ``auto``: into the projection's bias where it has one, else candidates without an
        intercept and with the config's bias option (Llama's ``mlp_bias``), scored side by side.
    seq_len, max_tokens, val_fraction, seed, bos, batch_size
        The corpus plan (:func:`njtc_solve.data.plan.plan_extraction`, every position).
    score_tokens : int
        Held-out tokens the candidates are scored on.
    progress : bool
        Show progress bars.

    Returns
    -------
    PruneResult
        The choice and every candidate's held-out scores; :meth:`PruneResult.save` applies it
        and writes the smaller checkpoint.

    Examples
    --------
    >>> import copy
    >>> result = prune_model(model, tokenizer, documents, remove=1, start=1, seq_len=32, max_tokens=1024,
    ...                      score_tokens=64, progress=False)
    >>> result.chosen.start, sorted({c["name"] for c in result.candidates})[:1]
    (1, ['drop'])
    >>> out, record = result.save(copy.deepcopy(model), tokenizer, "pruned", model_name="tiny-llama")
    >>> record["n_blocks_before"] - record["n_blocks_after"], (out / "njtc_prune.json").is_file()
    (1, True)
    """
    spec = check_foldable(model.config)
    _, blocks, _, _ = resolve_parts(model)
    n_blocks = len(blocks)
    check_removal(n_blocks, remove, start)
    ridge = _check_prune_settings(intercept=intercept, ridge=ridge, score_tokens=score_tokens,
                                  val_fraction=val_fraction)
    intercepts = _intercepts(model, spec, intercept)
    starts = [start] if start is not None else list(range(1, n_blocks - remove + 1))
    timings = {}
    t0 = time.perf_counter()
    plan = plan_extraction(tokenizer, documents, seq_len=seq_len, max_tokens=max_tokens, val_fraction=val_fraction,
                           seed=seed, bos=bos)
    train_plan, score_plan = _train_and_score_plans(plan, score_tokens)

    with tqdm(total=train_plan.n_rows + score_plan.n_rows, unit="tok", unit_scale=True, desc="prune: pass",
              leave=False, disable=not progress) as bar:
        stats = replacement_statistics(model, train_plan, {s: [remove] for s in starts}, weightings=weightings,
                                       batch_size=batch_size, device=next(model.parameters()).device, bar=bar)
        timings["train_pass_s"] = time.perf_counter() - t0
        held = collect_held_out(model, score_plan, batch_size=batch_size)
        bar.update(score_plan.n_rows)
    timings["pass_s"] = time.perf_counter() - t0

    t1 = time.perf_counter()
    chosen, candidates = choose_replacement(model, stats, held, remove=remove, starts=starts, weightings=weightings,
                                            ridge=ridge, intercepts=intercepts, progress=progress)
    timings["solve_and_score_s"] = time.perf_counter() - t1
    cosine = {s: stats.cosine[(s, remove)] for s in starts}
    cosine_choice = {"all": max(starts, key=lambda s: cosine[s]["all"]),
                     "angular_last": min(starts, key=lambda s: cosine[s]["angular_last"])}
    timings["total_s"] = time.perf_counter() - t0
    record = {"remove": remove, "selection": "auto" if start is None else "start", "n_blocks_before": n_blocks,
              "n_blocks_after": n_blocks - remove, "weightings": list(weightings), "ridge": ridge,
              "intercepts": intercepts,
              "plan": {"seq_len": seq_len, "max_tokens": max_tokens, "val_fraction": val_fraction, "seed": seed,
                       "bos": plan.bos, "train_rows": stats.n_rows, "score_rows": held.n_rows,
                       "positions": "all (position 0 included)",
                       "validation_documents": plan.validation_documents.tolist()}}
    return PruneResult(chosen, candidates, held.full_metrics(), cosine, cosine_choice, record, timings)


def _check_prune_settings(*, intercept: str, ridge, score_tokens: int, val_fraction: float) -> list[float]:
    """Refuse settings of :func:`prune_model` that cannot work; the ridge penalties as floats."""
    if intercept not in ("auto", "none", "bias"):
        raise NJTCError(f"`intercept` must be auto, none or bias, not {intercept!r}")
    ridge = [float(a) for a in ridge]
    if any(not (a > 0 and math.isfinite(a)) for a in ridge):
        raise NJTCError(f"`ridge` penalties must be positive numbers, not {ridge!r}")
    if score_tokens < 1:
        raise NJTCError(f"`score_tokens` must be positive, not {score_tokens}")
    if val_fraction <= 0:
        raise NJTCError("`val_fraction` must be above 0: candidates are scored on held-out documents")
    return ridge


def _train_and_score_plans(plan, score_tokens: int):
    """The plan's training sequences, and its first validation sequences holding ``score_tokens`` tokens."""
    train = np.flatnonzero(plan.split == TRAIN)
    val = np.flatnonzero(plan.split == VALIDATION)
    n_score = min(len(val), max(1, -(-score_tokens // plan.seq_len)))
    return (plan.sequences(slice(int(train[0]), int(train[-1]) + 1)),
            plan.sequences(slice(int(val[0]), int(val[0]) + n_score)))
