#!/usr/bin/env bash
# One GPU call that returns evidence even when it is cut short.
#
# For an OFFLINE GPU host (torch 2.11 / CUDA 13, Triton 3.6, Python 3.12, nvcc, no
# bitsandbytes, no network) whose command is killed at 10 minutes. A global deadline
# (default 540 s) bounds the whole run; each step gets what is left minus a margin, and a
# step that would get less than it needs is skipped with a note. After EVERY step the
# results so far are in $OUT (default ./gpu-out), which the host returns (at most 8 files,
# at most 2 folders down):
#   summary.txt     one line per step: rc, seconds, budget (appended as it goes)
#   smoke.json      scripts/gpu/smoke.py: every kernel once vs its reference, then timings
#   junit.xml       the kernel tests (pytest --junitxml)
#   bench.json      the benchmark results (areas merged as each finishes), bench.md its tables
#   two_gpu.json    scripts/gpu/two_gpu.py: the trainers under torchrun on 2 GPUs (only with 2 GPUs)
#   logs.tar.gz     every step's log, re-packed after each step
#
# Order: environment; carried wheels; the C++/CUDA extension build started in the
# BACKGROUND (the Triton steps do not need it; the steps that do wait for it only as long
# as their own budget allows); the 60-90 s smoke script; the kernel tests with the fused
# GEMM's autotuning restricted to one config (pytest --triton-autotune one); on a host with 2
# GPUs, the distributed trainers (NCCL, FSDP2 over 4-bit, FSDP checkpoints); then the
# benchmark areas one at a time.
#
#   scripts/gpu/run_gpu.sh [--deadline S] [--python PY] [--areas nf4,lora_linear,...]
#                          [--preset llama3-8b] [--dry-run]
#
# --dry-run runs on a CPU machine (CI: tests/test_run_gpu_dry.py): the smoke script on tiny
# shapes under Triton's interpreter, one small test file, and a benchmark step that
# overruns its budget, so the deadline handling and the $OUT files are proven without a GPU.
set -uo pipefail
cd "$(dirname "$0")/../.."
ROOT=$(pwd)
T0=$SECONDS

PY=python3 DEADLINE=540 MARGIN=15 DRY=0 PRESET=llama3-8b
AREAS="nf4,lora_linear,cross_entropy,generation,prefix,train_step"
while [ $# -gt 0 ]; do
  case "$1" in
    --deadline) DEADLINE="$2"; shift ;;
    --python) PY="$2"; shift ;;
    --areas) AREAS="$2"; shift ;;
    --preset) PRESET="$2"; shift ;;
    --dry-run) DRY=1 ;;
    -h|--help) sed -n '2,29p' "$0"; exit 0 ;;
    *) echo "run_gpu.sh: unknown argument $1" >&2; exit 2 ;;
  esac
  shift
done

OUT=${OUT:-$ROOT/gpu-out}
mkdir -p "$OUT"
LOGS=$(mktemp -d /tmp/fastlora-gpu-logs.XXXXXX)
SUMMARY="$OUT/summary.txt"
: > "$SUMMARY"
STATUS=0
export PYTHONUNBUFFERED=1
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"  # fastlora from this tree, no install

note() { echo "$*" | tee -a "$SUMMARY"; }
left() { echo $((DEADLINE - (SECONDS - T0) - MARGIN)); }
publish() {  # everything so far into $OUT: cheap, so after every step
  tar -czf "$OUT/logs.tar.gz.tmp" -C "$LOGS" . 2>/dev/null && mv "$OUT/logs.tar.gz.tmp" "$OUT/logs.tar.gz"
}

# The distributed trainers need 2 GPUs; with fewer the step is a note, never a failure.
two_gpu_step() {
  local n
  n=$("$PY" -c "import torch; print(torch.cuda.device_count())" 2>/dev/null || echo 0)
  if [ "${n:-0}" -ge 2 ] 2>/dev/null; then
    step two-gpu 180 60 "$PY" -m torch.distributed.run --standalone --nproc_per_node 2 scripts/gpu/two_gpu.py \
      --out "$OUT/two_gpu.json"
  else
    note "two-gpu: SKIPPED, ${n:-0} GPU(s) here (it needs 2)"
    publish
  fi
}

# step NAME WANT_S MIN_S CMD...: run CMD with a budget of min(WANT_S, time left); skip it
# with a note when less than MIN_S is left. Never aborts the run.
step() {
  local name=$1 want=$2 min=$3; shift 3
  local budget; budget=$(left)
  [ "$budget" -gt "$want" ] && budget=$want
  if [ "$budget" -lt "$min" ]; then
    note "$name: SKIPPED, $(left) s left before the deadline (needs $min s)"
    publish
    return 0
  fi
  echo "=== $name (budget ${budget} s): $*"
  local t=$SECONDS
  timeout --kill-after=5 "$budget" "$@" > "$LOGS/$name.log" 2>&1
  local rc=$?
  tail -n 5 "$LOGS/$name.log"
  local what="rc=$rc"
  [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ] && what="rc=$rc TIMED OUT at its budget"
  note "$name: $what ($((SECONDS - t)) s, budget $budget s, $((SECONDS - T0)) s elapsed)"
  if [ "$rc" -ne 0 ] && [ "$STATUS" -eq 0 ]; then STATUS=$rc; fi
  publish
  return 0
}

note "run_gpu.sh $(date -u +%FT%TZ) deadline ${DEADLINE} s, dry run ${DRY}, commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"

if [ "$DRY" = 1 ]; then
  export TRITON_INTERPRET=1  # Triton's own switch: its interpreter runs the kernels on CPU
  step environment 20 2 "$PY" -c "import sys, torch, triton; print(sys.version.split()[0], torch.__version__, triton.__version__)"
  step smoke 120 10 "$PY" scripts/gpu/smoke.py --out "$OUT/smoke.json" --dry-run
  step tests 120 10 "$PY" -m pytest -q -p no:cacheprovider tests/test_lora_linear.py -k dispatch_picks \
    --triton-autotune one --junitxml "$OUT/junit.xml"
  # a step that overruns: killed at its budget (10 s here); then a step that needs more
  # time than is left before the deadline: skipped with a note
  step bench-overrun 10 5 "$PY" -c "import time; time.sleep(3600)"
  step bench-after-deadline 60 "$((DEADLINE + 1))" "$PY" -c "print('never runs')"
  two_gpu_step  # no GPU here: a note
  note "run_gpu.sh: done in $((SECONDS - T0)) s, exit status $STATUS"
  publish
  exit "$STATUS"
fi

step environment 30 5 bash -c "nvidia-smi -L; nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv; $PY -c 'import sys, torch, triton; print(sys.version.split()[0], torch.__version__, torch.version.cuda, triton.__version__, torch.cuda.get_device_name(0))'; nvcc --version | tail -1"

# carried wheels (scripts/gpu/prepare_wheels.sh): the trimmed bitsandbytes and the peers
if compgen -G ".whl/*.whl" > /dev/null; then
  step wheels 60 10 "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl
  export PYTHONPATH="$PYTHONPATH:/tmp/site"
else
  note "wheels: none carried (.whl/): bitsandbytes, liger-kernel and cut-cross-entropy rows will be skipped"
fi

# The extension (CPU kernels, the CUDA dequantize and decode GEMV) in the background,
# for sm_90 only; it links libstdc++, libgomp and a static cudart (only the driver at run
# time). A CPython 3.12 module cannot be built on the CPU machine (no 3.12 headers
# there), so it is built here, off the critical path.
BUILD_LOG="$LOGS/build.log"
( timeout 300 "$PY" - > "$BUILD_LOG" 2>&1 <<'PYEOF'
import glob, os, shutil, subprocess, sys, sysconfig
import pybind11
b = "/tmp/fastlora-build"
os.makedirs(b, exist_ok=True)
subprocess.run(["cmake", os.getcwd(), f"-DPython_EXECUTABLE={sys.executable}", f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
                "-DCMAKE_BUILD_TYPE=Release", "-DCMAKE_CUDA_ARCHITECTURES=90", f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={b}/out"],
               cwd=b, check=True)
subprocess.run(["cmake", "--build", ".", "-j", str(os.cpu_count() or 4)], cwd=b, check=True)
so = glob.glob(f"{b}/out/_C*.so")[0]
shutil.copy(so, os.path.join("fastlora", os.path.basename(so)))
print("built", so)
PYEOF
  echo "rc=$?" >> "$BUILD_LOG" ) &
BUILD_PID=$!
note "build: started in the background (pid $BUILD_PID)"

step smoke 150 30 "$PY" scripts/gpu/smoke.py --out "$OUT/smoke.json"

wait_build() {  # wait for the background build within this step's budget
  local budget; budget=$(left)
  local t=$SECONDS
  while kill -0 "$BUILD_PID" 2>/dev/null && [ $((SECONDS - t)) -lt "$1" ] && [ "$(left)" -gt 30 ]; do sleep 2; done
  if kill -0 "$BUILD_PID" 2>/dev/null; then
    note "build: still running after $((SECONDS - t)) s more; the steps below run without fastlora._C"
  else
    note "build: $(tail -n 1 "$BUILD_LOG") (log in logs.tar.gz)"
  fi
}
wait_build 120
step extension 20 5 "$PY" -c "import fastlora._C as c; assert c.with_cuda, 'built without CUDA'; print('fastlora._C with CUDA')"

# kernel tests: the GPU runs them (no interpreter), the fused GEMM on one config
step tests 240 60 "$PY" -m pytest -q -p no:cacheprovider -x --triton-autotune one --junitxml "$OUT/junit.xml" \
  tests/test_nf4.py tests/test_lora_linear.py tests/test_cross_entropy.py tests/test_linear_cross_entropy.py \
  tests/test_token_logprobs.py

# shared prefixes on the GPU (issue 23): SDPA with the dense tree mask and FlexAttention with
# the block mask (transformers compiles flex; CPU inductor cannot build it), against the plain batch
# (its log is in logs.tar.gz: $OUT returns at most 8 files)
step prefix-tests 120 30 "$PY" -m pytest -q -p no:cacheprovider tests/patch/test_prefix.py -k "gpu or flex"

# issue 26's first multi-GPU evidence, before the benchmarks (which have their own deadline)
two_gpu_step

# benchmark areas, one at a time; each merged into the day's results file and published
IFS=, read -ra area_list <<< "$AREAS"
for area in "${area_list[@]}"; do
  step "bench-$area" 180 45 "$PY" -m fastlora.bench --preset "$PRESET" --only "$area" --results-dir "$LOGS/bench"
  f=$(ls -t "$LOGS"/bench/*.json 2>/dev/null | head -1)
  if [ -n "$f" ]; then cp "$f" "$OUT/bench.json"; cp "${f%.json}.md" "$OUT/bench.md" 2>/dev/null; fi
done

# issue 14's memory bar on the GPU: one 8B-wide PPO step, four separate bnb + PEFT models
# vs the shared base, from the caching allocator's statistics (after the speed evidence)
step ppo-memory 150 60 "$PY" benchmarks/ppo_memory.py --device cuda --out "$LOGS/ppo_memory_gpu.json"
cp "$LOGS/ppo_memory_gpu.json" "$OUT/" 2>/dev/null  # the JSON only: $OUT returns at most 8 files

kill "$BUILD_PID" 2>/dev/null
note "run_gpu.sh: done in $((SECONDS - T0)) s, exit status $STATUS"
publish
exit "$STATUS"
