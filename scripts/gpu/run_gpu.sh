#!/usr/bin/env bash
# On an OFFLINE GPU host (Linux x86-64, NVIDIA GPU, nvcc, Python 3.12 with a CUDA torch):
# install the wheels carried in .whl/ (see prepare_wheels.sh), build fastlora from this
# source tree against the host's torch (no build isolation, no network), run the CUDA
# tests, the whole test suite, compute-sanitizer on a CUDA test, then the llama3-8b
# benchmarks; the results (and one archive of the logs) are copied to $OUT when it is set.
#
#   scripts/gpu/run_gpu.sh [--skip-build] [--skip-tests] [--skip-sanitizer] [--skip-bench]
#                          [--only AREA[,AREA]] [--preset llama3-8b|llama3-8b-full|tiny] [--python PY]
#
# Every step runs even when an earlier one failed; the exit status is the first failure.
# A device session allows about 10 minutes per command: run the tests in one call and
# the benchmark areas in others (--skip-tests --only nf4,lora_linear, ...). Areas of the
# same day, device and preset accumulate in one results file.
set -uo pipefail
cd "$(dirname "$0")/../.."
ROOT=$(pwd)

PY=python3
BUILD=1 TESTS=1 SANITIZER=1 BENCH=1 ONLY="" PRESET=llama3-8b
while [ $# -gt 0 ]; do
  case "$1" in
    --skip-build) BUILD=0 ;;  # fastlora is already installed from this tree (a warm host)
    --skip-tests) TESTS=0 ;;
    --skip-sanitizer) SANITIZER=0 ;;
    --skip-bench) BENCH=0 ;;
    --only) ONLY="$2"; shift ;;
    --preset) PRESET="$2"; shift ;;
    --python) PY="$2"; shift ;;
    -h|--help) sed -n '2,18p' "$0"; exit 0 ;;
    *) echo "run_gpu.sh: unknown argument $1" >&2; exit 2 ;;
  esac
  shift
done

LOGS=$(mktemp -d /tmp/fastlora-gpu-logs.XXXXXX)
STATUS=0
step() {  # step NAME TIMEOUT_S CMD...: run, log, remember the first failure
  local name=$1 limit=$2; shift 2
  echo "=== $name: $*"
  local t0=$SECONDS
  timeout "$limit" "$@" 2>&1 | tee "$LOGS/$name.log"
  local rc=${PIPESTATUS[0]}
  echo "$name rc=$rc ($((SECONDS - t0)) s)" | tee -a "$LOGS/summary.txt"
  if [ "$rc" -ne 0 ] && [ "$STATUS" -eq 0 ]; then STATUS=$rc; fi
  return "$rc"
}

finish() {
  if [ -n "${OUT:-}" ]; then
    mkdir -p "$OUT"
    # the device tool returns at most 8 files: results (json, md, png), summary, one log archive
    cp "$LOGS/summary.txt" "$OUT/" 2>/dev/null
    tar -czf "$OUT/logs.tar.gz" -C "$LOGS" . 2>/dev/null
    for f in benchmarks/results/"$(date -u +%F)"-*; do
      [ -e "$f" ] && cp "$f" "$OUT/"
    done
  fi
  echo "run_gpu.sh: done, exit status $STATUS (logs in $LOGS)"
  exit "$STATUS"
}

step environment 60 bash -c "nvidia-smi; $PY -V; $PY -c 'import torch, triton; print(torch.__version__, torch.version.cuda, triton.__version__, torch.cuda.get_device_name(0))'; nvcc --version | tail -2"

# 1. the carried wheels, into a private site dir (the host's own packages stay as they are)
if compgen -G ".whl/*.whl" > /dev/null; then
  step wheels 300 "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl
  export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
else
  echo "run_gpu.sh: no .whl/*.whl: bitsandbytes, liger-kernel and cut-cross-entropy benchmarks will be skipped" \
    | tee -a "$LOGS/summary.txt"
fi

# 2. fastlora from source against the host's torch: no isolation (no torch download), no index
if [ "$BUILD" = 1 ]; then
  step build 600 "$PY" -m pip install --no-build-isolation --no-deps --no-index -e . || finish
fi
step extension 60 "$PY" -c "import fastlora._C as c; assert c.with_cuda, 'fastlora._C was built without CUDA'; print('fastlora._C with CUDA')"

# 3. tests
if [ "$TESTS" = 1 ]; then
  # no test selected (exit status 5) is a failure: the suite has CUDA tests, so none means
  # the marker or the collection broke
  step tests-cuda 600 "$PY" -m pytest -q -m cuda tests
  step tests-all 600 "$PY" -m pytest -q tests --durations=10
fi

# 4. compute-sanitizer (memcheck) on one test file that exercises the CUDA backend
if [ "$SANITIZER" = 1 ]; then
  target=$(grep -rlE "Backend\.CUDA|backend=\"cuda\"|backend='cuda'" tests --include='test_*.py' | sort | head -1)
  if [ -n "$target" ] && command -v compute-sanitizer > /dev/null; then
    step sanitizer 600 compute-sanitizer --tool memcheck --error-exitcode 99 --target-processes all \
      "$PY" -m pytest -q -x -m cuda "$target"
  else
    echo "sanitizer: skipped (no CUDA-backend test file found, or no compute-sanitizer)" | tee -a "$LOGS/summary.txt"
  fi
fi

# 5. benchmarks: what `fastlora bench` runs (the CLI delegates to fastlora.bench.run), called
# as `python -m fastlora.bench` so that its exit status (failed checks) reaches this script
if [ "$BENCH" = 1 ]; then
  args=(--preset "$PRESET")
  [ -n "$ONLY" ] && args+=(--only "$ONLY")
  step bench 3600 "$PY" -m fastlora.bench "${args[@]}"
fi
finish
