#!/usr/bin/env bash
# Download the peers' wheels for an OFFLINE Linux x86-64 CUDA host with Python 3.12, into
# .whl/ at the repository root (ignored by git), so they can travel with the checkout.
#
#   scripts/gpu/prepare_wheels.sh [--dry-run] [--with-pybind11] [--python PY]
#
# The host is assumed to have torch (CUDA build), triton, transformers, peft, numpy,
# packaging, pytest, pytest-benchmark, psutil, matplotlib, cmake, ninja and nvcc: only the
# peers are fetched, each with --no-deps (their remaining requirements are torch/triton/
# numpy/packaging, already there). pybind11 is fetched only with --with-pybind11 (the
# build needs it; the image this project uses has it). --dry-run resolves and lists the
# files without downloading anything. Pinned versions: change them here, in one place.
# The bitsandbytes wheel is trimmed to its CUDA 13.0 and CPU libraries (~43 -> ~5 MB).
set -euo pipefail
cd "$(dirname "$0")/../.."

PY=python3
DRY=0
PKGS=("bitsandbytes==0.50.2" "liger-kernel==0.8.5" "cut-cross-entropy==25.1.1")
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY=1 ;;
    --with-pybind11) PKGS+=("pybind11==2.13.6") ;;
    --python) PY="$2"; shift ;;
    -h|--help) sed -n '2,14p' "$0"; exit 0 ;;
    *) echo "prepare_wheels.sh: unknown argument $1" >&2; exit 2 ;;
  esac
  shift
done

# pip matches manylinux tags exactly: list the ones these wheels use.
PLAT=(--only-binary=:all: --python-version 3.12 --implementation cp
      --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64
      --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64
      --platform any)

if [ "$DRY" = 1 ]; then
  report=$(mktemp)
  trap 'rm -f "$report"' EXIT
  "$PY" -m pip install --dry-run --quiet --ignore-installed --no-deps --target "$(mktemp -d)" \
    --report "$report" "${PLAT[@]}" "${PKGS[@]}"
  "$PY" - "$report" <<'PYEOF'
import json, sys
for item in json.load(open(sys.argv[1]))["install"]:
    print(f"{item['metadata']['name']:20s} {item['metadata']['version']:10s} {item['download_info']['url'].rsplit('/', 1)[-1]}")
PYEOF
  exit 0
fi

mkdir -p .whl
# one version of each package: a stale second wheel would stop the whole install there
for spec in "${PKGS[@]}"; do
  name=${spec%%==*}
  rm -f .whl/"${name//-/_}"-*.whl .whl/"$name"-*.whl
done
"$PY" -m pip download --no-deps -d .whl "${PLAT[@]}" "${PKGS[@]}"
# bitsandbytes ships one library per CUDA/ROCm/XPU version (~43 MB zipped); the host runs
# CUDA 13.0 (torch 2.11+cu130): keep libbitsandbytes_cuda130 and the CPU library only,
# and drop the others' lines from RECORD so pip installs the trimmed wheel cleanly.
for whl in .whl/bitsandbytes-*.whl; do
  [ -e "$whl" ] || continue
  "$PY" - "$whl" <<'PYEOF'
import os, re, sys, zipfile
src = sys.argv[1]
keep = re.compile(r"bitsandbytes/libbitsandbytes_(cuda130|cpu)\.so$")
drop = lambda n: n.startswith("bitsandbytes/libbitsandbytes_") and n.endswith(".so") and not keep.search(n)
tmp = src + ".tmp"
with zipfile.ZipFile(src) as zin, zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as zout:
    for item in zin.infolist():
        if drop(item.filename):
            continue
        data = zin.read(item.filename)
        if item.filename.endswith(".dist-info/RECORD"):
            lines = data.decode().splitlines()
            data = ("\n".join(l for l in lines if not drop(l.split(",")[0])) + "\n").encode()
        zout.writestr(item, data)
os.replace(tmp, src)
print(f"trimmed {src}: {os.path.getsize(src) / 2**20:.1f} MiB")
PYEOF
done
ls -l .whl
size=$(du -sm .whl | cut -f1)
echo "prepare_wheels.sh: .whl/ holds ${size} MiB"
if [ "$size" -gt 56 ]; then
  echo "prepare_wheels.sh: WARNING: the device tool carries at most 64 MiB with the working tree" >&2
fi
