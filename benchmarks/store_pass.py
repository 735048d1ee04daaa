"""A real pass over a store against the measured GEMM peak: this tree against an earlier commit.

The statistics of every source layer need ``2·rows·d²·(2·layers + 1)`` GEMM flops; a pass
over a store also reads and checks every row from disk. This runs the same pass with the
code of this tree and of ``--before`` (a commit, checked out in a temporary worktree), one
after the other, ``--repeats`` times each, interleaved, so that both see the same machine;
and measures the float32 GEMM peak in between. Reports the best time of each.

    python benchmarks/store_pass.py --store runs/demo/activations.h5 --before e9a2d43
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from provenance import measured_at

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"

# one timed pass, run in a fresh interpreter against the tree on sys.path[0]
_PASS = """
import json, sys, time, torch
from njtc_solve.solve.statistics_pass import accumulate_statistics
from njtc_solve.data.store import ActivationStore
with ActivationStore(sys.argv[1]) as store:
    layers = [l for l in range(store.n_layers)]
    stats = accumulate_statistics(store, layers, device=sys.argv[2], progress=False)
print(json.dumps({k: stats.meta[k] for k in ("seconds", "rows_per_s", "gflops")} | {"rows": stats.n_rows,
                  "layers": len(layers), "d": int(stats.cyy.shape[0])}))
"""

_PEAK = """
import sys, time, torch
sys.path.insert(0, sys.argv[2])
from throughput import peak_gemm
torch.set_float32_matmul_precision("highest")
print(peak_gemm(torch.device(sys.argv[1]), torch.float32, int(sys.argv[3])))
"""


def run_pass(tree: Path, store: str, device: str) -> dict:
    done = subprocess.run([sys.executable, "-c", f"import sys; sys.path.insert(0, {str(tree)!r})\n" + _PASS,
                           store, device], capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--store", required=True)
    p.add_argument("--before", help="commit to compare with (default: none, this tree only)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default=str(RESULTS / "store_pass.json"))
    args = p.parse_args(argv)
    trees = {"after": ROOT}
    with tempfile.TemporaryDirectory() as tmp:
        if args.before:
            before = Path(tmp) / "before"
            subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(before), args.before],
                           check=True, capture_output=True)
            trees["before"] = before
        try:
            runs = {name: [] for name in trees}
            peaks = []
            for _ in range(args.repeats):
                for name, tree in trees.items():
                    runs[name].append(run_pass(tree, args.store, args.device))
                    print(f"{name}: {runs[name][-1]['seconds']:.2f}s {runs[name][-1]['gflops']:.1f} GFLOP/s",
                          flush=True)
                peak = subprocess.run([sys.executable, "-c", _PEAK, args.device, str(ROOT / "benchmarks"),
                                       str(runs["after"][-1]["d"])], capture_output=True, text=True, check=True)
                peaks.append(float(peak.stdout.strip()))
        finally:
            if args.before:
                subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(trees["before"])],
                               check=True, capture_output=True)
    peak = max(peaks)
    result = {"store": args.store, "device": args.device, "peak_gflops_float32": peak, "before": args.before}
    for name, found in runs.items():
        best = min(found, key=lambda r: r["seconds"])
        result[name] = {**best, "fraction_of_peak": best["gflops"] / peak, "all_seconds": [r["seconds"] for r in found]}
        print(f"{name}: best {best['seconds']:.2f}s for {best['rows']} rows x {best['layers']} layers, "
              f"{best['gflops']:.1f} GFLOP/s = {100 * best['gflops'] / peak:.0f}% of the {peak:.1f} GFLOP/s peak")
    if "before" in result:
        print(f"speed-up: {result['before']['seconds'] / result['after']['seconds']:.2f}x")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"measured_at": measured_at(), **result}, indent=1))


if __name__ == "__main__":
    main()
