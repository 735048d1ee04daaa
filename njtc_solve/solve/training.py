"""Gradient training of shortcut maps on KL or MSE, streaming, with held-out checks and early stopping.

:func:`train_maps` starts from any maps and minimises, per source layer, ``"kl"``:
``KL(p_model ‖ p_shortcut)`` through the model's head (:func:`~njtc_solve.core.metrics.kl_divergence`),
or ``"mse"``: the mean squared error of the mapped row. Rows come in chunks ``({layer: x}, y)``,
one pass an epoch (:class:`StoreRows`). A :class:`ShortcutMap` is trained as its
:meth:`~ShortcutMap.trainable` copy, so narrow maps stay narrow. :func:`train_loop` and
:class:`Patience` are the early-stopping loop, shared with the pruning fold's refinement.

Examples
--------
>>> from njtc_solve import ActivationStore, fit_shortcuts
>>> with ActivationStore("activations.h5") as store:
...     [njtc] = fit_shortcuts(store, method="njtc", ranks=[4], layers=[1], progress=False)
...     train = StoreRows(store, [1], "train", seed=0)
...     check = StoreRows(store, [1], "validation", max_rows=256)
...     result = train_maps(njtc.maps, store.head(), train, check=check, steps=20, check_every=5, progress=False)
>>> result.best[1]["loss"] <= result.start[1]["loss"], result.maps()[1].rank
(True, 4)
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from tqdm.auto import tqdm

from njtc_solve.core.errors import NJTCError
from njtc_solve.core.head import Head
from njtc_solve.core.metrics import Reference, kl_divergence, surprisal
from njtc_solve.data.rows import RowSource
from njtc_solve.maps.shortcuts import ShortcutMap

__all__ = ["OBJECTIVES", "OPTIMIZERS", "SCHEDULES", "Patience", "StoreRows", "TrainResult", "check_metrics", "train_loop",
           "train_maps"]

OBJECTIVES = ("kl", "mse")
OPTIMIZERS = ("adam", "sgd")
SCHEDULES = ("constant", "linear")


class StoreRows:
    """Chunks ``({layer: x}, y)`` of one split of an activation store or a live source; one pass per iteration.

    Parameters
    ----------
    store : RowSource
        An activation store or a live model's rows (:class:`~njtc_solve.data.rows.RowSource`).
    layers : list of int
        Source layers; the target (the store's last layer) is read as well.
    split : {"train", "validation"}
    chunk_rows : int
    start, max_rows : int
        Keep the split's rows ``start .. start + max_rows`` only.
    skip_positions : int, optional
        Leave out rows at positions below this (default: the store's first position).
    seed : int, optional
        Shuffle within chunks, differently on every pass (``None``: row order).
    in_memory : bool
        Keep the rows read by the first pass for later passes.
    """

    def __init__(self, store: RowSource, layers: Sequence[int], split: str = "train", *, chunk_rows: int = 4096,
                 start: int = 0, max_rows: int | None = None, skip_positions: int | None = None,
                 seed: int | None = None, in_memory: bool = False):
        self.store, self.layers, self.split = store, store.check_layers(layers), split
        self.target = store.n_layers
        self.chunk_rows, self.start, self.max_rows = int(chunk_rows), int(start), max_rows
        self.skip = store.default_skip_positions if skip_positions is None else int(skip_positions)
        if self.chunk_rows <= 0 or self.start < 0 or (max_rows is not None and max_rows <= 0):
            raise NJTCError("`chunk_rows` and `max_rows` must be positive and `start` must be 0 or more")
        available = store.count(split, self.skip) - self.start
        if available <= 0:
            raise NJTCError(f"{store.path} has no {split} rows from row {self.start} at positions >= {self.skip}")
        self.n_rows = available if max_rows is None else min(available, max_rows)
        self.generator = None if seed is None else torch.Generator().manual_seed(seed)
        self.in_memory, self._cached = in_memory, None

    def __len__(self) -> int:
        """Rows per pass."""
        return self.n_rows

    def _read(self):
        stop = self.start + self.n_rows
        seen = 0
        for _, chunk in self.store.iter_chunks(self.layers + [self.target], self.split, self.chunk_rows, stop,
                                               skip_positions=self.skip):
            n = len(chunk[self.target])
            keep = slice(max(0, self.start - seen), n)
            seen += n
            if keep.start >= n:
                continue
            rows = {l: torch.as_tensor(chunk[l][keep]).to("cpu", torch.float32) for l in self.layers + [self.target]}
            yield {l: rows[l] for l in self.layers}, rows[self.target]

    def __iter__(self):
        chunks = self._cached if self._cached is not None else self._read()
        kept = [] if self.in_memory and self._cached is None else None
        for x, y in chunks:
            if kept is not None:
                kept.append((x, y))
            if self.generator is not None:
                order = torch.randperm(len(y), generator=self.generator)
                x, y = {l: v[order] for l, v in x.items()}, y[order]
            yield x, y
        if kept is not None:
            self._cached = kept


@dataclass
class TrainResult:
    """Outcome of :func:`train_maps`: ``modules`` at each layer's best state; ``history`` one record per
    check (``step``, ``seconds``, ``layers``: metrics per layer still training); ``start`` and ``best``
    each layer's metrics at step 0 and at its best step; ``stopped``: ``"steps"``, ``"converged"``,
    ``"time"`` or ``"callback"``."""

    modules: dict
    history: list = field(default_factory=list)
    start: dict = field(default_factory=dict)
    best: dict = field(default_factory=dict)
    steps: int = 0
    seconds: float = 0.0
    stopped: str = "steps"

    def maps(self) -> dict[int, ShortcutMap]:
        """Each layer's best map as a :class:`ShortcutMap` (what a shortcut file saves)."""
        return {l: m.to_map() for l, m in self.modules.items()}


def _logits(module, x, head):
    """``(ŷ, logits)`` of ``module`` on ``x``."""
    if hasattr(module, "predict_with_logits"):
        return module.predict_with_logits(x, head)
    y_hat = module(x)
    return y_hat, head.logits(y_hat)


def _loss(objective, module, x, y, head, reference):
    """Mean loss of one layer's ``module`` on rows ``x`` against target rows ``y``."""
    if objective == "mse":
        return ((module(x) - y) ** 2).mean()
    return kl_divergence(reference, _logits(module, x, head)[1]).mean()


def check_metrics(modules: dict, head: Head, chunks, *, objective: str = "kl") -> dict[int, dict]:
    """Held-out metrics of each layer's module over ``chunks`` (a list of ``(x, y, reference)``): ``loss``,
    the objective's mean; for KL also ``precision@1`` (against the head's top-1) and ``surprisal`` (nats)."""
    totals = {l: np.zeros(3) for l in modules}
    n = 0
    with torch.no_grad():
        for x, y, reference in chunks:
            n += len(y)
            for l, module in modules.items():
                if objective == "mse":
                    totals[l][0] += float(((module(x[l]).double() - y.double()) ** 2).mean(1).sum())
                    continue
                logits = _logits(module, x[l], head)[1]
                predicted = logits.argmax(-1)
                totals[l] += [float(kl_divergence(reference, logits).sum()),
                              float((predicted == reference.logp.argmax(-1)).sum()),
                              float(surprisal(reference, predicted).sum())]
    if objective == "mse":
        return {l: {"loss": float(t[0]) / n} for l, t in totals.items()}
    return {l: {"loss": float(t[0]) / n, "kl": float(t[0]) / n, "precision@1": float(t[1]) / n,
                "surprisal": float(t[2]) / n} for l, t in totals.items()}


def _batches(source, batch_rows):
    """Minibatches ``(x, y)`` of ``batch_rows`` rows, pass after pass over ``source``."""
    while True:
        empty = True
        for x, y in source:
            for i in range(0, len(y), batch_rows):
                empty = False
                yield {l: v[i:i + batch_rows] for l, v in x.items()}, y[i:i + batch_rows]
        if empty:
            raise NJTCError("the training rows are empty")


def _fitted(m) -> bool:
    """Whether ``m`` is a fitted :class:`ShortcutMap` (buffers only)."""
    return isinstance(m, ShortcutMap) and next(m.parameters(), None) is None


def _optimizer(name, params, lr, weight_decay, momentum):
    """Adam, or Nesterov momentum SGD."""
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    return torch.optim.SGD(params, lr=lr, momentum=momentum, nesterov=True, weight_decay=weight_decay)


def train_maps(maps: dict, head: Head, train, *, check, objective: str = "kl", steps: int = 1000, lr: float = 1e-4,
               optimizer: str = "adam", batch_rows: int = 256, check_every: int = 50, patience: int = 5,
               time_budget: float | None = None, weight_decay: float = 0.0, momentum: float = 0.9,
               grad_clip: float | None = None, schedule: str = "constant", device: str | torch.device = "cpu",
               progress: bool = True, on_check: Callable[[dict], bool] | None = None, seed: int = 0) -> TrainResult:
    """Train shortcut maps by gradient on KL or MSE, keeping each layer's best held-out state.

    Parameters
    ----------
    maps : dict of int to ShortcutMap or nn.Module
        Starting maps by source layer. A fitted :class:`ShortcutMap` is trained as its
        :meth:`~ShortcutMap.trainable` copy; a module with parameters is trained in place.
    head : Head
        The model's final norm and unembedding.
    train, check : iterables of ``(x, y)`` chunks
        Training rows, read pass after pass, and held-out rows, read once and kept on ``device``.
    objective : {"kl", "mse"}
    steps : int
        Most optimisation steps (one minibatch of ``batch_rows`` rows each).
    lr, optimizer, weight_decay, momentum : float, {"adam", "sgd"}, float, float
        ``"sgd"`` is Nesterov momentum SGD.
    check_every, patience : int
        Check held-out rows every ``check_every`` steps; a layer stops after ``patience``
        checks without a new best (``0``: never early).
    time_budget : float, optional
        Stop once this many seconds of training have passed (checks excluded).
    grad_clip : float, optional
        Clip each layer's gradient norm.
    schedule : {"constant", "linear"}
        ``"linear"`` decays the learning rate to 0 at ``steps``.
    on_check : callable, optional
        ``on_check(record) -> bool`` after every check; ``True`` ends the run.

    Returns
    -------
    TrainResult
    """
    _check_settings(objective, optimizer, schedule, steps=steps, batch_rows=batch_rows, check_every=check_every,
                    patience=patience, lr=lr)
    if not maps:
        raise NJTCError("`maps` is empty: no maps to train")
    torch.manual_seed(seed)
    device = torch.device(device)
    head = head.to(device)
    modules = {int(l): (m.trainable() if _fitted(m) else m).to(device) for l, m in maps.items()}
    opt = _optimizer(optimizer, [p for m in modules.values() for p in m.parameters()], lr, weight_decay, momentum)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        opt, (lambda s: max(0.0, 1 - s / max(steps, 1))) if schedule == "linear" else (lambda s: 1.0))
    run = _Run(objective, modules, head, _held_out(check, modules, head, objective, device), patience)
    batches = _batches(train, batch_rows)

    def checked(step: int, clock: float):
        record = run.check(step, clock)
        stop = "callback" if on_check is not None and on_check(record) else None if run.stopping.active else "converged"
        return {f"L{l}": f"{v['loss']:.4g}" for l, v in record["layers"].items()}, stop

    step, clock, run.result.stopped = train_loop(
        lambda: _step(run, next(batches), opt, scheduler, device, grad_clip), checked, steps=steps,
        check_every=check_every, time_budget=time_budget, desc=f"train {objective}", progress=progress)
    return run.finish(step, clock)


def train_loop(step: Callable[[], None], check: Callable[[int, float], tuple], *, steps: int, check_every: int,
               time_budget: float | None = None, desc: str = "train", progress: bool = True) -> tuple[int, float, str]:
    """Call ``step()`` up to ``steps`` times, and ``check(steps_done, seconds)`` every ``check_every`` steps,
    after the last and once ``time_budget`` seconds of steps have passed; ``check`` returns ``(postfix,
    stop)``, the progress bar's figures and why to stop (``None``: go on).

    Returns ``(steps taken, their seconds (checks excluded), why it ended)``: ``check``'s reason,
    ``"time"`` or ``"steps"``.
    """
    done, clock, stopped = 0, 0.0, "steps"
    with tqdm(total=steps, unit="step", desc=desc, leave=False, disable=not progress) as bar:
        while done < steps:
            t0 = time.perf_counter()
            step()
            clock += time.perf_counter() - t0
            done += 1
            bar.update(1)
            out_of_time = time_budget is not None and clock >= time_budget
            if done % check_every and done < steps and not out_of_time:
                continue
            postfix, stop = check(done, clock)
            bar.set_postfix(postfix)
            if stop or out_of_time:
                stopped = stop or "time"
                break
    return done, clock, stopped


class Patience:
    """Each key's best loss and the checks since it; a key stops after ``patience`` checks with no new
    best (0: never). ``best``: each key's starting best loss."""

    def __init__(self, best: dict, patience: int):
        self.best, self.patience = dict(best), patience
        self.waited, self.active = dict.fromkeys(best, 0), set(best)

    def improved(self, key, loss: float) -> bool:
        """Whether ``loss`` is ``key``'s new best; else one more check without, and ``key`` out of
        :attr:`active` once out of patience."""
        if loss < self.best[key]:
            self.best[key], self.waited[key] = loss, 0
            return True
        self.waited[key] += 1
        if self.patience and self.waited[key] >= self.patience:
            self.active.discard(key)
        return False


def _check_settings(objective: str, optimizer: str, schedule: str, **numbers) -> None:
    """Refuse unknown choices and out-of-range numbers of :func:`train_maps`, naming its parameters."""
    for name, value, options in (("objective", objective, OBJECTIVES), ("optimizer", optimizer, OPTIMIZERS),
                                 ("schedule", schedule, SCHEDULES)):
        if value not in options:
            raise NJTCError(f"`{name}` must be one of {', '.join(options)}, not {value!r}")
    n = numbers
    if (n["steps"] < 0 or n["batch_rows"] <= 0 or n["check_every"] <= 0 or n["patience"] < 0
            or not 0 < n["lr"] < math.inf):
        raise NJTCError("`steps` and `patience` must be 0 or more; `batch_rows`, `check_every` and `lr` positive "
                        "(`lr` finite)")


def _held_out(check, modules: dict, head: Head, objective: str, device: torch.device) -> list:
    """The held-out chunks on ``device``: ``(x, y, reference)``, the reference the model's distribution (KL)."""
    held_out = []
    with torch.no_grad():
        for x, y in check:
            y = y.to(device)
            reference = None if objective == "mse" else Reference.from_logits(head.logits(y))
            held_out.append(({l: x[l].to(device) for l in modules}, y, reference))
    if not held_out:
        raise NJTCError("the held-out rows are empty")
    return held_out


class _Run:
    """One training run: each layer's best state and its patience (:class:`Patience`)."""

    def __init__(self, objective: str, modules: dict, head: Head, held_out: list, patience: int):
        self.objective, self.modules, self.head, self.held_out = objective, modules, head, held_out
        self.result = TrainResult(modules)
        self.best_state = {l: copy.deepcopy(m.state_dict()) for l, m in modules.items()}
        record = self._measure(0, 0.0, list(modules))
        self.result.start = {l: dict(v, step=0) for l, v in record["layers"].items()}
        self.result.best = {l: dict(v, step=0) for l, v in record["layers"].items()}
        self.stopping = Patience({l: v["loss"] for l, v in record["layers"].items()}, patience)

    def _measure(self, step: int, clock: float, layers: list[int]) -> dict:
        """Check ``layers`` on the held-out rows and record it in the history."""
        for m in self.modules.values():
            m.eval()
        metrics = check_metrics({l: self.modules[l] for l in layers}, self.head, self.held_out,
                                objective=self.objective)
        for m in self.modules.values():
            m.train()
        record = {"step": step, "seconds": clock, "layers": metrics}
        self.result.history.append(record)
        return record

    def check(self, step: int, clock: float) -> dict:
        """Measure the active layers on the held-out rows; keep new bests, retire layers out of patience."""
        record = self._measure(step, clock, sorted(self.stopping.active))
        for l, metrics in record["layers"].items():
            if self.stopping.improved(l, metrics["loss"]):
                self.result.best[l] = dict(metrics, step=step)
                self.best_state[l] = copy.deepcopy(self.modules[l].state_dict())
        return record

    def finish(self, step: int, clock: float) -> TrainResult:
        """Every layer back at its best state; the result."""
        for l, m in self.modules.items():
            m.load_state_dict(self.best_state[l])
            m.eval()
        self.result.steps, self.result.seconds = step, clock
        return self.result


def _step(run: _Run, batch, opt, scheduler, device: torch.device, grad_clip: float | None) -> None:
    """One optimisation step of every active layer on a minibatch ``(x, y)``."""
    x, y = batch
    active = run.stopping.active
    x, y = {l: x[l].to(device) for l in active}, y.to(device)
    with torch.no_grad():
        reference = None if run.objective == "mse" else Reference.from_logits(run.head.logits(y))
    opt.zero_grad(set_to_none=True)
    with torch.enable_grad():  # a source's generator may hold no_grad across its yields (a live model's)
        loss = sum(_loss(run.objective, run.modules[l], x[l], y, run.head, reference) for l in sorted(active))
        loss.backward()
    if grad_clip is not None:
        for l in active:
            torch.nn.utils.clip_grad_norm_(run.modules[l].parameters(), grad_clip)
    opt.step()
    scheduler.step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
