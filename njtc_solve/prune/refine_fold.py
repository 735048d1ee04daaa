"""KL refinement of a folded block replacement: train only the map, through the frozen rest of the model.

:func:`refine_fold` starts from the fold ``m ↦ m·T + c`` on block ``S-1``'s MLP output and
minimises ``KL(p_full ‖ p_pruned)`` on training sequences by Adam over ``T`` (and ``c``): the
stream entering block ``S+K`` is ``h_S + m(T - I) + c`` from the full model's cached states, and
the gradient flows through the frozen remaining blocks and head (:func:`tail_logits`). The
held-out KL (:func:`~njtc_solve.prune.scoring.score_replacement`) is checked as it goes, with
early stopping (:func:`njtc_solve.solve.training.train_loop`); a refined map is returned only if
its held-out KL is below the start's, else the start comes back unchanged (``improved=False``).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field, replace
from typing import ClassVar

import torch

from njtc_solve.core.errors import NJTCError
from njtc_solve.core.metrics import Reference, kl_divergence
from njtc_solve.core.params import Interval, check_spec
from njtc_solve.prune.replacement import Replacement
from njtc_solve.prune.scoring import ReferenceSample, score_replacement, tail_logits
from njtc_solve.solve.training import Patience, train_loop

__all__ = ["OBJECTIVES", "RefineFoldSpec", "RefineResult", "RefineSpec", "refine_fold"]

OBJECTIVES = ("kl",)


@dataclass(frozen=True)
class RefineFoldSpec:
    """The settings of :func:`refine_fold`, checked when made, before any model loads.

    Attributes
    ----------
    objective : {"kl"}
        ``KL(p_full ‖ p_pruned)`` over every position of the training sequences.
    steps : int
        Most Adam steps (one minibatch of ``batch_sequences`` sequences each).
    lr : float
        Adam's learning rate (finite, positive).
    batch_sequences : int
        Training sequences per step.
    check_every, patience : int
        Held-out KL every ``check_every`` steps; stop after ``patience`` checks with no new
        best (0: never early).
    train_tokens : int
        Training tokens the refinement reads (a seeded sample of the plan's training sequences
        spread across documents; the full model's log-probabilities over them are cached,
        ``tokens × vocab`` float16).
    time_budget : float, optional
        Stop once this many seconds of training have passed (checks excluded).
    seed : int
        Order of the training sequences.
    """

    objective: str = "kl"
    steps: int = 200
    lr: float = 1e-4
    batch_sequences: int = 4
    check_every: int = 20
    patience: int = 3
    train_tokens: int = 8192
    time_budget: float | None = None
    seed: int = 0

    constraints: ClassVar[dict] = {
        "lr": [Interval(float, 0, None, closed="neither", says="a finite positive number")],
        "steps": [Interval(int, 1, None)],
        "batch_sequences": [Interval(int, 1, None)],
        "check_every": [Interval(int, 1, None)],
        "train_tokens": [Interval(int, 1, None)],
        "patience": [Interval(int, 0, None, says="0 or more")],
        "time_budget": [None, Interval(float, 0, None, closed="neither", says="a finite positive number of seconds")],
        "seed": [Interval(int)],
    }

    def __post_init__(self):
        """Refuse an unknown objective or a number out of range, naming its parameter."""
        if self.objective not in OBJECTIVES:  # the prune command's --refine
            raise NJTCError(f"`refine` must be one of {', '.join(OBJECTIVES)}, not {self.objective!r}")
        check_spec(self)

    @classmethod
    def check(cls, objective: str = "kl", **settings) -> RefineFoldSpec:
        """The checked settings (every instance is checked when it is made)."""
        return cls(objective, **settings)

    def describe(self) -> dict:
        """The settings, for ``njtc_prune.json``."""
        return dict(vars(self))


RefineSpec = RefineFoldSpec  # an alias in njtc_solve's API


@dataclass
class RefineResult:
    """What :func:`refine_fold` did.

    ``replacement`` is the map to write: the refined one when ``improved``, else the start
    itself. ``start`` and ``best`` are the held-out scores (:func:`score_replacement`) of the
    start and of the best map seen (``best["step"]``); ``steps`` the steps taken, ``seconds``
    the training time (checks excluded), ``check_seconds`` the time of the checks,
    ``stopped`` why it ended (``"steps"``, ``"converged"``, ``"time"``), ``history`` one
    ``{step, seconds, kl, train_kl}`` per check.
    """

    replacement: Replacement
    start: dict
    best: dict
    improved: bool
    steps: int = 0
    seconds: float = 0.0
    check_seconds: float = 0.0
    stopped: str = "steps"
    history: list = field(default_factory=list)

    def describe(self) -> dict:
        """A summary for ``njtc_prune.json`` and the command's report."""
        def brief(score):
            return {k: score[k] for k in ("kl", "kl_se", "top1", "ppl", "step") if k in score}

        return {"improved": self.improved, "steps": self.steps, "train_seconds": self.seconds,
                "check_seconds": self.check_seconds, "stopped": self.stopped, "held_out_start": brief(self.start),
                "held_out_best": brief(self.best), "history": self.history}


def refine_fold(model, replacement: Replacement, train: ReferenceSample, check: ReferenceSample,
                spec: RefineFoldSpec | None = None, *, progress: bool = False) -> RefineResult:
    """Train a fold's ``T`` (and ``c``) by KL to the full model, through the frozen rest of the pruned model.

    Parameters
    ----------
    model
        The full model (not changed: the removed blocks are skipped for each call, as scoring does).
    replacement : Replacement
        The closed-form fold to start from (plain dropping starts from ``T = I``).
    train, check : ReferenceSample
        The full model over training and held-out sequences
        (:func:`~njtc_solve.prune.scoring.collect_reference`, at least ``replacement.start``'s states).
    spec : RefineFoldSpec, optional
        The settings (default: :class:`RefineFoldSpec`'s).
    progress : bool
        Show a progress bar.

    Returns
    -------
    RefineResult
        ``replacement`` is the refined map only if its held-out KL is below the start's.
    """
    spec = RefineFoldSpec() if spec is None else spec
    s, first = replacement.start, replacement.start + replacement.remove
    train.check_start(s)
    check.check_start(s)
    start_score = score_replacement(model, check, replacement)
    d = train.hidden[s].shape[-1]
    eye = torch.eye(d, dtype=torch.float64)
    device = next(model.parameters()).device
    delta = (replacement.T.double().cpu() - eye).float().to(device).requires_grad_(True)
    c = None if replacement.c is None else replacement.c.float().to(device).requires_grad_(True)
    opt = torch.optim.Adam([delta] + ([] if c is None else [c]), lr=spec.lr)
    generator = torch.Generator().manual_seed(spec.seed)
    n_seq = len(train.token_ids)
    name = replacement.name + "+kl" if not replacement.name.endswith("+kl") else replacement.name
    best = best_map = None  # the best checked map of the run (the start is not one of them)
    order, at, train_kl, check_clock = torch.randperm(n_seq, generator=generator), 0, 0.0, 0.0
    stopping, history = Patience({0: math.inf}, spec.patience), []

    def train_step():
        nonlocal order, at, train_kl
        if at >= n_seq:
            order, at = torch.randperm(n_seq, generator=generator), 0
        idx = order[at:at + spec.batch_sequences]
        at += spec.batch_sequences
        h = train.hidden[s][idx].to(device)
        m = train.mlp[s - 1][idx].to(device)
        stream = h + m @ delta + (0 if c is None else c)
        logits = tail_logits(model, train.token_ids[idx], stream, first_block=first, grad=True).float()
        logp = train.logp[idx].float().to(device).reshape(-1, logits.shape[-1])
        logp = torch.log_softmax(logp, -1)  # a float16 cache renormalised in float32
        loss = kl_divergence(Reference(logp, logp.exp(), None), logits.reshape(-1, logits.shape[-1])).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        train_kl = loss.item()

    def checked(step: int, clock: float):
        nonlocal best, best_map, check_clock
        t1 = time.perf_counter()
        with torch.no_grad():
            candidate = replace(replacement, T=eye + delta.detach().double().cpu(),
                                c=None if c is None else c.detach().double().cpu(), name=name)
        score = score_replacement(model, check, candidate)
        check_clock += time.perf_counter() - t1
        history.append({"step": step, "seconds": clock, "kl": score["kl"], "train_kl": train_kl})
        if stopping.improved(0, score["kl"]):
            best, best_map = dict(score, step=step), candidate
        converged = not math.isfinite(score["kl"]) or not stopping.active
        return {"held-out KL": f"{score['kl']:.4f}"}, "converged" if converged else None

    flags = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)
    try:
        steps, clock, stopped = train_loop(train_step, checked, steps=spec.steps, check_every=spec.check_every,
                                           time_budget=spec.time_budget, desc="prune: refine kl", progress=progress)
    finally:
        for p, flag in zip(model.parameters(), flags):
            p.requires_grad_(flag)
    improved = best is not None and best["kl"] < start_score["kl"]
    if not improved:  # the guard: never a map whose held-out KL is worse than the start's
        best_map, best = replacement, dict(start_score, step=0)
    return RefineResult(best_map, start_score, best, improved, steps, clock, check_clock, stopped, history)
