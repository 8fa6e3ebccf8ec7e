#!/usr/bin/env bash
# The whole GPU check in one call: the correctness tests that need CUDA, then the ratio benchmarks
# (statistics vs eval forward: ResNet-50 at batch 256 and the 3-D U-Net; the matrix vs its bare loop
# and vs its floor),
# each under a timeout, one table at the end. A few minutes on one GPU.
# Installs nothing: runs .venv/bin/python when present, else python3 (or $PY), with this checkout's shiftbn.
# A failing or timed-out step is marked in the table; the others still run; exit status 1 if any failed.
#
# Usage: benchmarks/gpu.sh [--dry-run]
#   --dry-run  no GPU needed: every step on the CPU at toy sizes (checks the script itself; the CUDA
#              tests then report "skipped").
# Logs: one file per step under $TMPDIR (printed at the end).
set -euo pipefail
cd "$(dirname "$0")/.."

DRY=0
case "${1:-}" in
  "") ;;
  --dry-run) DRY=1 ;;
  -h | --help) sed -n '2,11p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
  *) echo "gpu.sh: unknown argument '$1'; run it with no argument on a CUDA machine, or with --dry-run" >&2; exit 2 ;;
esac
if [[ -z "${PY:-}" ]]; then
  if [[ -x .venv/bin/python ]]; then PY=.venv/bin/python; else PY=python3; fi
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
LOGS=$(mktemp -d "${TMPDIR:-/tmp}/shiftbn-gpu.XXXXXX")

echo "python: $PY: $("$PY" -c 'import torch; print(f"torch {torch.__version__}, CUDA build {torch.version.cuda}, cuda available {torch.cuda.is_available()}")')"
echo "host: nproc $(env -u OMP_NUM_THREADS nproc), CPU$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2), load average $(cut -d' ' -f1-3 /proc/loadavg)"
if ((DRY)); then
  DEV=cpu
  echo "dry run: every step on the CPU at toy sizes"
else
  if ! command -v nvidia-smi > /dev/null; then
    echo "gpu.sh: nvidia-smi not found, so no CUDA machine here; benchmarks/gpu.sh --dry-run checks the script on the CPU" >&2
    exit 2
  fi
  nvidia-smi --query-gpu=name,memory.total --format=csv
  if ! "$PY" -c 'import sys, torch; sys.exit(not torch.cuda.is_available())'; then
    echo "gpu.sh: torch in $PY cannot use CUDA (torch.cuda.is_available() is False); point PY= at a CUDA build of torch" >&2
    exit 2
  fi
  DEV=cuda
fi

NAMES=() STATUS=() SECS=() FIGS=()
# step NAME TIMEOUT_S PATTERN LINES CMD...: run CMD under a timeout, its output shown and logged; the
# first LINES lines matching PATTERN (extended regex) are that step's figures in the table.
step() {
  local name=$1 limit=$2 pattern=$3 lines=$4
  shift 4
  local log="$LOGS/$name.log" t0=$SECONDS rc status
  echo
  echo "=== $name (at most ${limit} s): $*"
  set +e
  timeout -k 10 "$limit" "$@" 2>&1 | tee "$log"
  rc=${PIPESTATUS[0]}
  set -e
  case $rc in
    0) status=ok ;;
    124 | 137) status="TIMEOUT (${limit} s)" ;;
    *) status="FAIL (exit $rc)" ;;
  esac
  if [[ $rc == 0 ]] && grep -qE '^[0-9]+ skipped' "$log" && ! grep -qE '[0-9]+ passed' "$log"; then status=skipped; fi
  NAMES+=("$name") STATUS+=("$status") SECS+=($((SECONDS - t0)))
  FIGS+=("$(grep -E "$pattern" "$log" | head -n "$lines" | sed -E 's/^ +//; s/ +/ /g' | paste -sd '|' - || true)")
}

PYTEST=("$PY" -m pytest -rs -p no:cacheprovider)  # pyproject adds -q: one summary line
if ((DRY)); then
  step cuda-tests 300 '(passed|failed|skipped|error)' 2 "${PYTEST[@]}" tests/bn/test_cuda.py
  step kernel-tests 300 '(passed|failed|error)' 1 "${PYTEST[@]}" tests/bn/test_bn_native.py -k "float64_exact or unet3d"
  step stats-smallresnet 300 'throughput ratio' 3 "$PY" benchmarks/bench_stats.py --model smallresnet --batches 2 \
    --batch-size 8 --repeats 1 --skip-precise --device "$DEV"
  step dense-unet3d 300 '^summary' 3 "$PY" benchmarks/bench_dense.py --device "$DEV" --threads 1 --size 16 \
    --batches 2 --roi 12 --repeats 1
  step matrix 300 '^wall' 2 "$PY" benchmarks/bench_matrix.py --device "$DEV" --sources 2 --per-source 40 --repeats 1
  step matrix-floor 300 '^data|^png .* wall ' 3 "$PY" benchmarks/bench_floor.py --device "$DEV" --png 200 --sizes 2 \
    --repeats 1 --work "$LOGS/floor"
else
  step cuda-tests 300 '(passed|failed|skipped|error)' 2 "${PYTEST[@]}" tests/bn/test_cuda.py
  # the C kernel as this host's CPU builds it (AVX-512 hosts take its 8-lane path)
  step kernel-tests 300 '(passed|failed|error)' 1 "${PYTEST[@]}" tests/bn/test_bn_native.py -k "float64_exact or unet3d"
  step stats-resnet50-b256 420 'throughput ratio' 3 "$PY" benchmarks/bench_stats.py --model resnet50 --batches 8 \
    --batch-size 256 --repeats 3 --skip-precise --device cuda
  step dense-unet3d 300 '^summary' 6 "$PY" benchmarks/bench_dense.py --device cuda --threads 1 4 --size 96 \
    --batches 4 --batch-size 2 --roi 64 --repeats 5
  step matrix 300 '^wall' 2 "$PY" benchmarks/bench_matrix.py --device cuda --sources 5 20 --per-source 300 --repeats 3
  step matrix-floor 420 '^data|^png .* wall ' 6 "$PY" benchmarks/bench_floor.py --device cuda --png 2000 --sizes 2 5 \
    --repeats 2 --work "$LOGS/floor"
fi

echo
echo "=== summary ($([[ $DEV == cuda ]] && nvidia-smi --query-gpu=name --format=csv,noheader | head -n1 || echo "dry run, CPU"); logs in $LOGS)"
printf '%-20s %-18s %7s  %s\n' step status seconds "figures (wall time; the min round first)"
failed=0
for i in "${!NAMES[@]}"; do
  IFS='|' read -r -a lines <<< "${FIGS[$i]:-}"
  printf '%-20s %-18s %7s  %s\n' "${NAMES[$i]}" "${STATUS[$i]}" "${SECS[$i]}" "${lines[0]:-}"
  for line in "${lines[@]:1}"; do printf '%48s  %s\n' "" "$line"; done
  [[ ${STATUS[$i]} == ok || ${STATUS[$i]} == skipped ]] || failed=1
done
exit $failed
