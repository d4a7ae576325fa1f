#!/usr/bin/env bash
# One pass of everything that needs a CUDA GPU: the CUDA tests, then the speed benchmark by default and
# with --compile. Each part has its own time limit, so one slow part cannot eat the others' time.
# Logs and JSON go to $OUT (default: benchmarks/<today>/); file names start with $PREFIX (default: gpu).
#
#   bash scripts/gpu_check.sh                    # all three parts, about 8 minutes on an H100
#   PARTS="tests bench" bash scripts/gpu_check.sh
#   PARTS=profile bash scripts/gpu_check.sh       # where a compiled batch-1 ADM step's time goes (not in the default)
#   PARTS=autotune bash scripts/gpu_check.sh      # batch 8 with Inductor's max-autotune (not in the default: minutes of tuning)
#   PARTS=breakdown bash scripts/gpu_check.sh     # batch-8 compiled kernels by kind + NCHW/NHWC and GroupNorm A/B (~3 min)
#
# The benchmark needs resize-right for its plain loop; on a machine without package access, put its
# wheel in .whl/ first (`pip download resize-right==0.0.2 -d .whl`) and this script installs it.
set -uo pipefail
cd "$(dirname "$0")/.."

OUT=${OUT:-benchmarks/$(date -u +%Y-%m-%d)}
PREFIX=${PREFIX:-gpu}
PARTS=${PARTS:-"tests bench compile"}
PYTHON=${PYTHON:-python3}
mkdir -p "$OUT"

if ! "$PYTHON" -c "import resize_right" 2>/dev/null && ls .whl/*.whl >/dev/null 2>&1; then
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/ilvr_site .whl/*.whl
  export PYTHONPATH=/tmp/ilvr_site${PYTHONPATH:+:$PYTHONPATH}
fi
if ! "$PYTHON" -c "import torch, sys; sys.exit(not torch.cuda.is_available())"; then
  echo "no CUDA device visible to torch: nothing to check here" >&2
  exit 2
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/${PREFIX}_device.txt"

status=0
run_part() {  # name, time limit in seconds, command...
  local name=$1 limit=$2; shift 2
  echo "== $name (limit ${limit}s): $*"
  timeout "$limit" "$@" 2>&1 | tee "$OUT/${PREFIX}_${name}.log"
  local rc=${PIPESTATUS[0]}
  [ "$rc" -eq 0 ] || { echo "== $name: exit code $rc"; status=1; }
}

for part in $PARTS; do
  case $part in
    tests)   run_part pytest_cuda 150 "$PYTHON" -m pytest -q -p no:cacheprovider tests/test_cuda.py tests/test_cuda_graphs.py ;;
    bench)   run_part bench 260 "$PYTHON" -m ilvr bench --json "$OUT/${PREFIX}_bench.json" ;;
    compile) run_part bench_compile 280 "$PYTHON" -m ilvr bench --models adm256 --compile --repeats 2 \
                 --json "$OUT/${PREFIX}_bench_compile.json" ;;
    autotune) run_part bench_autotune 420 "$PYTHON" -m ilvr bench --models adm256 --batch 8 --compile \
                 --compile-mode max-autotune-no-cudagraphs --no-fp32-variant --repeats 2 \
                 --json "$OUT/${PREFIX}_bench_autotune.json" ;;
    breakdown) run_part breakdown 300 "$PYTHON" scripts/gpu_step_breakdown.py --deadline 230 ;;
    profile) run_part profile 200 "$PYTHON" scripts/profile_step.py --model adm256 --compile \
                 --out "$OUT/${PREFIX}_profile" ;;
    *) echo "unknown part '$part' (tests, bench, compile, autotune, profile, breakdown)" >&2; status=1 ;;
  esac
done
exit $status
