#!/usr/bin/env bash
# One prepared GPU run: the CUDA tests and the GPU benchmarks, in under 8 minutes, JSON into one folder.
#
#   benchmarks/gpu.sh                 # writes into $OUT when set, else benchmarks/results/gpu
#   benchmarks/gpu.sh --out DIR
#   benchmarks/gpu.sh --dry-run       # no GPU needed: print the commands, check each script and flag exists
#
# Each step has its own time limit (the sum is 450 s); a step that fails or runs out of time is
# recorded in summary.json and the next one still runs. The exit status is that of the worst step.
set -u
cd "$(dirname "$0")/.."

DRY=0
DIR="${OUT:-benchmarks/results/gpu}"
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY=1 ;;
    --out) shift; DIR="${1:?--out needs a folder}" ;;
    -h|--help) sed -n '2,10p' "$0"; exit 0 ;;
    *) echo "error: unknown argument $1" >&2; exit 2 ;;
  esac
  shift
done
if [ -x .venv/bin/python ]; then PY="${PYTHON:-.venv/bin/python}"; else PY="${PYTHON:-python3}"; fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

# name | seconds | command (run from the repository root; $DIR is the output folder)
STEPS=(
  "cuda_tests|90|$PY -m pytest -m cuda -q -p no:cacheprovider tests/test_cuda.py --junitxml=$DIR/cuda_tests.xml"
  "throughput|60|$PY benchmarks/throughput.py --device cuda --quick --out $DIR"
  "live_fit|120|$PY benchmarks/live_fit.py --device cuda --max-tokens 16384 --repeats 2 --skip memory --out $DIR/live_fit-cuda.json"
  "speculate|180|$PY benchmarks/speculate.py --device cuda --prompts 4 --max-new-tokens 48 --repeats 3 --out $DIR"
)

if [ "$DRY" = 1 ]; then
  status=0
  total=0
  for step in "${STEPS[@]}"; do
    IFS='|' read -r name limit cmd <<<"$step"
    total=$((total + limit))
    echo "[$name, ${limit}s] $cmd"
    read -r -a words <<<"$cmd"
    if [ "${words[1]}" = "-m" ]; then  # pytest: the CUDA tests are collected
      "$PY" -m pytest -m cuda -q --collect-only -p no:cacheprovider tests/test_cuda.py >/dev/null 2>&1 \
        || { echo "  error: pytest cannot collect tests/test_cuda.py"; status=1; }
      continue
    fi
    script="${words[1]}"
    [ -f "$script" ] || { echo "  error: $script not found"; status=1; continue; }
    help="$("$PY" "$script" --help 2>&1)" || { echo "  error: $script --help fails"; status=1; continue; }
    for w in "${words[@]:2}"; do
      case "$w" in --*) grep -q -- "$w" <<<"$help" || { echo "  error: $script has no flag $w"; status=1; } ;; esac
    done
  done
  echo "total time limit: ${total}s (of 480)"
  [ "$total" -le 480 ] || { echo "error: the steps' limits exceed 8 minutes"; status=1; }
  exit $status
fi

mkdir -p "$DIR"
"$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" \
  || { echo "error: no CUDA device (use --dry-run to check the commands without one)" >&2; exit 2; }
worst=0
summary="{"
for step in "${STEPS[@]}"; do
  IFS='|' read -r name limit cmd <<<"$step"
  echo "== $name (limit ${limit}s): $cmd"
  start=$(date +%s)
  timeout "$limit" bash -c "$cmd" > >(tee "$DIR/$name.log") 2>&1
  rc=$?
  secs=$(( $(date +%s) - start ))
  echo "== $name: exit $rc in ${secs}s"
  [ $rc -gt $worst ] && worst=$rc
  summary="$summary\"$name\": {\"exit\": $rc, \"seconds\": $secs, \"limit\": $limit},"
done
echo "${summary%,}}" > "$DIR/summary.json"
echo "wrote $DIR (summary.json, logs, result JSON)"
exit $worst
