"""The race: tuned-lens's translators against the closed form, and the closed form + KL refinement.

Side by side, per source layer, on the same rows of one store and the same device:

1. the real ``tuned_lens.nn.lenses.TunedLens`` (its ``h + translator(h)``, zero start, its
   ``Unembed``), trained with its recipe from ``tuned_lens/scripts/train_loop.py`` and
   ``ingredients.py``: KL to the model's final distribution, SGD with Nesterov momentum 0.9,
   lr ``lr_scale·(1 − 0.9)`` with ``lr_scale = 1``, weight decay 1e-3, gradient norm clipped
   to 1, linear decay to 0 over ``num_steps = 250``, ``tokens_per_step = 2**18`` (scaled down
   here: ``--tl-tokens-per-step``);
2. the closed-form JTC and residual (identity + rank-r) maps, timed with their pass over the data;
3. the same closed-form maps refined on KL (:func:`njtc_solve.solve.training.train_maps`, Adam), the
   refinement's time added to the closed form's.

Every contestant is scored by the same pure functions (:mod:`njtc_solve.core.metrics`) on the same
validation rows (the first ``--eval-rows``); refinement stops early on other validation rows
(the next ``--check-rows``), so its selection does not flatter the reported figures. Clocks
count training (reading rows included) and exclude the scoring.

    python benchmarks/vs_tuned_lens.py --store runs/demo/activations.h5 --layers 5,15,25

Writes ``benchmarks/results/vs_tuned_lens.{json,md,png}``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import matplotlib
import torch
from torch import nn

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from njtc_solve.core.errors import NJTCError
from njtc_solve.solve.fit import fit_shortcuts
from njtc_solve.core.metrics import Reference
from njtc_solve.data.store import ActivationStore
from njtc_solve.solve.training import StoreRows, check_metrics, train_maps
from provenance import measured_at

RESULTS = Path(__file__).resolve().parent / "results"
METRICS = ("kl", "precision@1", "surprisal")


def tuned_lens_unembed(head):
    """tuned-lens's ``Unembed`` over the store's head (no model needed: the store carries its head)."""
    from tuned_lens.nn.unembed import Unembed

    class FinalNorm(nn.Module):
        def forward(self, h):
            return head.normalize(h)

    unembed = Unembed.__new__(Unembed)
    nn.Module.__init__(unembed)
    unembed.final_norm = FinalNorm()
    unembed.unembedding = nn.Linear(head.d_model, head.vocab_size, bias=head.unembed_bias is not None)
    with torch.no_grad():
        unembed.unembedding.weight.copy_(head.unembed)
        if head.unembed_bias is not None:
            unembed.unembedding.bias.copy_(head.unembed_bias)
    unembed.requires_grad_(False)
    return unembed


class TunedLensLayer(nn.Module):
    """One layer of a real ``TunedLens``: its translator is the only parameter; logits are the lens's own."""

    def __init__(self, lens, idx: int):
        super().__init__()
        self.translator = lens[idx]
        self.idx = idx
        object.__setattr__(self, "lens", lens)  # not a submodule: its unembedding stays out of the optimiser

    def forward(self, x):
        return self.lens.transform_hidden(x, self.idx)

    def predict_with_logits(self, x, head):
        return self.forward(x), self.lens(x, self.idx)


def held_out(store, layer, start, rows, device, head):
    """Validation rows ``start .. start + rows`` on ``device`` with the model's reference distribution."""
    with torch.no_grad():
        return [({layer: x[layer].to(device)}, y.to(device), Reference.from_logits(head.logits(y.to(device))))
                for x, y in StoreRows(store, [layer], "validation", start=start, max_rows=rows)]


def score(module, layer, head, rows):
    module.eval()
    out = check_metrics({layer: module}, head, rows, objective="kl")[layer]
    module.train()
    return {k: out[k] for k in METRICS}


def closed_form(store, layer, method, rank, residual, device):
    start = time.perf_counter()
    [sc] = fit_shortcuts(store, method=method, ranks=None if rank is None else [rank], layers=[layer],
                         residual=residual, device=device, progress=False)
    return sc, time.perf_counter() - start


def run_trainer(module, layer, head, train, check, eval_rows, offset, **kwargs):
    """Train ``module`` in place; its curve on the evaluation rows, clock offset by ``offset`` seconds."""
    curve = []

    def on_check(record):
        curve.append({"seconds": offset + record["seconds"], "step": record["step"],
                      **score(module, layer, head, eval_rows)})
        return False

    curve.append({"seconds": offset, "step": 0, **score(module, layer, head, eval_rows)})
    result = train_maps({layer: module}, head, train, check=check, objective="kl", progress=False, on_check=on_check, **kwargs)
    return result, curve


def first_time(curve, below):
    return next((p["seconds"] for p in curve if p["kl"] <= below), None)


def race_layer(store, layer, args, head, device):
    eval_rows = held_out(store, layer, 0, args.eval_rows, device, head)
    check_rows = StoreRows(store, [layer], "validation", start=args.eval_rows, max_rows=args.check_rows)
    rec = {"layer": layer}

    # 1. tuned-lens, its recipe
    from tuned_lens.nn.lenses import TunedLens, TunedLensConfig

    lens = TunedLens(tuned_lens_unembed(head), TunedLensConfig("store", store.d_model, store.n_layers)).to(device)
    probe = eval_rows[0][1][:8]
    assert torch.allclose(lens(probe, layer), head.logits(probe), atol=1e-3), "the lens's head is not the model's"
    train = StoreRows(store, [layer], "train", seed=args.seed, in_memory=True)
    list(train)  # read once before any clock starts: every contestant trains from the same rows in memory
    result, curve = run_trainer(
        TunedLensLayer(lens, layer), layer, head, train, check_rows, eval_rows, 0.0, steps=args.tl_steps,
        lr=args.tl_lr_scale * (1 - 0.9), optimizer="sgd", momentum=0.9, weight_decay=1e-3, grad_clip=1.0,
        schedule="linear", batch_rows=args.tl_tokens_per_step, check_every=args.tl_eval_every, patience=0,
        device=device, seed=args.seed)
    rec["tuned_lens"] = {"seconds": result.seconds, "steps": result.steps, "curve": curve, "final": curve[-1]}
    print(f"L{layer} tuned-lens: {result.steps} steps {result.seconds:.0f}s final KL {curve[-1]['kl']:.4f}",
          flush=True)

    # 2. and 3. closed form, then refined
    for name, (method, rank, residual) in {"jtc": ("jtc", None, False),
                                           f"residual-r{args.rank}": ("njtc", args.rank, True)}.items():
        sc, seconds = closed_form(store, layer, method, rank, residual, device)
        point = {"seconds": seconds, **score(sc.maps[layer].to(device), layer, head, eval_rows)}
        module = sc.maps[layer].trainable().to(device)  # trained in place by train_maps
        result, curve = run_trainer(module, layer, head, train, check_rows, eval_rows, seconds,
                                    steps=args.refine_steps, lr=args.refine_lr, batch_rows=args.refine_batch,
                                    check_every=args.refine_check_every, patience=args.patience, device=device,
                                    seed=args.seed)
        final = {"seconds": seconds + result.seconds, **score(module, layer, head, eval_rows)}  # best on check rows
        rec[name] = {"closed_form": point, "refined": {"seconds": seconds + result.seconds, "steps": result.steps,
                                                       "stopped": result.stopped, "curve": curve, "final": final}}
        print(f"L{layer} {name}: closed form {seconds:.1f}s KL {point['kl']:.4f}; refined {result.steps} steps "
              f"{result.seconds:.0f}s KL {final['kl']:.4f}", flush=True)

    tl = rec["tuned_lens"]
    tl_final, tl_total = tl["final"]["kl"], tl["seconds"]
    report = {}
    for name in ("jtc", f"residual-r{args.rank}"):
        cf, refined = rec[name]["closed_form"], rec[name]["refined"]
        t_match = first_time(tl["curve"], cf["kl"])
        beat = next((p["seconds"] for p in refined["curve"] if p["kl"] < tl_final), None)
        report[name] = {
            "a_tuned_lens_s_to_match_closed_form": t_match,
            "a_speedup": (t_match if t_match is not None else tl_total) / cf["seconds"],
            "a_lower_bound": t_match is None,
            "closed_form_reaches_tuned_lens_final": cf["kl"] <= tl_final,
            # tuned-lens reaches its final KL at the end of its budget
            "closed_form_speedup_to_tuned_lens_final": tl_total / cf["seconds"] if cf["kl"] <= tl_final else None,
            "c_refined_s_to_beat_tuned_lens": beat,
            "c_fraction_of_tuned_lens_time": None if beat is None else beat / tl_total,
        }
    rec["report"] = report
    return rec


def table(records, rank):
    names = ["jtc", f"residual-r{rank}"]
    cols = ["layer", "tuned-lens s", "tuned-lens KL"]
    for n in names:
        cols += [f"{n} s", f"{n} KL", f"{n}+KL s", f"{n}+KL KL", f"TL s to match {n}", f"{n}+KL s to beat TL"]
    fmt = lambda v: "never" if v is None else (f"{v:.4g}" if isinstance(v, float) else str(v))
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in records:
        row = [r["layer"], r["tuned_lens"]["seconds"], r["tuned_lens"]["final"]["kl"]]
        for n in names:
            rep = r["report"][n]
            row += [r[n]["closed_form"]["seconds"], r[n]["closed_form"]["kl"], r[n]["refined"]["seconds"],
                    r[n]["refined"]["final"]["kl"], rep["a_tuned_lens_s_to_match_closed_form"],
                    rep["c_refined_s_to_beat_tuned_lens"]]
        lines.append("| " + " | ".join(fmt(v) for v in row) + " |")
    return lines


def plot(records, rank, path):
    fig, axes = plt.subplots(len(records), 3, figsize=(11, 3 * len(records)), squeeze=False)
    for row, r in zip(axes, records):
        for ax, metric in zip(row, METRICS):
            c = r["tuned_lens"]["curve"]
            ax.plot([max(p["seconds"], 0.1) for p in c], [p[metric] for p in c], color="gray", label="tuned-lens")
            for name, color in (("jtc", "C0"), (f"residual-r{rank}", "C1")):
                cf, c = r[name]["closed_form"], r[name]["refined"]["curve"]
                ax.plot([p["seconds"] for p in c], [p[metric] for p in c], color=color, label=f"{name} + KL")
                ax.scatter([cf["seconds"]], [cf[metric]], color=color, marker="o", zorder=3,
                           label=f"{name} closed form")
                final = r[name]["refined"]["final"]
                ax.scatter([final["seconds"]], [final[metric]], color=color, marker="*", s=80, zorder=3,
                           label=f"{name} + KL, kept (best on check rows)")
            ax.set_xscale("log")
            if metric == "kl":
                ax.set_yscale("log")
            ax.set_title(f"layer {r['layer']}: {metric}", fontsize=9)
            ax.set_xlabel("seconds")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--store", default="runs/demo/activations.h5")
    p.add_argument("--layers", default="5,15,25")
    p.add_argument("--rank", type=int, default=32, help="rank of the residual map's correction")
    p.add_argument("--eval-rows", type=int, default=512, help="validation rows every contestant is scored on")
    p.add_argument("--check-rows", type=int, default=256, help="further validation rows for early stopping")
    p.add_argument("--tl-steps", type=int, default=250, help="tuned-lens num_steps (its default: 250)")
    p.add_argument("--tl-tokens-per-step", type=int, default=2**18, help="tuned-lens tokens_per_step (its default 2**18)")
    p.add_argument("--tl-lr-scale", type=float, default=1.0, help="tuned-lens lr_scale (its default 1)")
    p.add_argument("--tl-eval-every", type=int, default=25, help="steps between scorings of tuned-lens")
    p.add_argument("--refine-steps", type=int, default=200)
    p.add_argument("--refine-lr", type=float, default=1e-3)
    p.add_argument("--refine-batch", type=int, default=256)
    p.add_argument("--refine-check-every", type=int, default=10)
    p.add_argument("--patience", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default=str(RESULTS))
    p.add_argument("--replot", help="redraw the table and plot from a result JSON, without racing")
    args = p.parse_args(argv)
    if args.replot:
        saved = json.loads(Path(args.replot).read_text())
        plot(saved["records"], saved["args"]["rank"], Path(args.out) / "vs_tuned_lens.png")
        print("\n".join(table(saved["records"], saved["args"]["rank"])))
        return
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device(args.device)
    records = []
    with ActivationStore(args.store) as store:
        head = store.head().to(device)
        for layer in store.check_layers(args.layers.split(",")):
            records.append(race_layer(store, layer, args, head, device))
            payload = {"args": vars(args), "torch_threads": torch.get_num_threads(), "records": records}
            (out / "vs_tuned_lens.json").write_text(json.dumps({"measured_at": measured_at(), **payload}, indent=1))  # after every layer
    lines = table(records, args.rank)
    (out / "vs_tuned_lens.md").write_text("\n".join(lines) + "\n")
    plot(records, args.rank, out / "vs_tuned_lens.png")
    print("\n".join(lines))
    for r in records:
        print(f"L{r['layer']}: " + json.dumps(r["report"]))


if __name__ == "__main__":
    try:
        main()
    except NJTCError as err:
        sys.exit(f"error: {err}")
