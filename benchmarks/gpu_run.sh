#!/usr/bin/env bash
# One benchmark run from a source checkout, without installing anything (the GPU machines have torch, triton and
# transformers but no network): links fastmask/kernels (pyproject's package-dir mapping), builds fastmask._C with
# the JIT loader (fastmask/_ext.py), then runs `fastmask bench`; CSVs and bench.log go to $OUT.
#
#   FASTMASK_GIT_SHA=$(git rev-parse --short HEAD) OUT=/some/dir bash benchmarks/gpu_run.sh [fastmask bench args]
#
# Environment: OUT (default ./bench-results), PYTHON (default python3), BUDGET_S (default 300: work not started
# by then is skipped and listed, so build + run stay under 8 minutes on an H100/H200), TORCH_CUDA_ARCH_LIST
# (default 9.0), MAX_JOBS (default: all cores), FASTMASK_JIT_BUILD_DIR (default /tmp/fastmask-jit).
# Afterwards, on the development machine: fastmask bench report --add <the CSVs' folder>
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
OUT="${OUT:-bench-results}"
PYTHON="${PYTHON:-python3}"
mkdir -p "$OUT"
[[ -e fastmask/kernels ]] || ln -s ../kernels fastmask/kernels
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" FASTMASK_JIT_BUILD=1 PYTHONUNBUFFERED=1
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}" MAX_JOBS="${MAX_JOBS:-$(nproc)}"
export FASTMASK_JIT_BUILD_DIR="${FASTMASK_JIT_BUILD_DIR:-/tmp/fastmask-jit}"
{
  echo "== build fastmask._C (JIT), $(date -u +%FT%TZ)"
  SECONDS=0
  "$PYTHON" -c 'import json, fastmask; from fastmask import _ext
print(_ext.load(jit=True, warn=False)); print(json.dumps(fastmask.info(), indent=1))'
  echo "== build: ${SECONDS} s"
  SECONDS=0
  "$PYTHON" -m fastmask bench --out "$OUT" --no-progress --time-budget-s "${BUDGET_S:-300}" "$@"
  rc=$?
  echo "== bench: ${SECONDS} s, exit ${rc}"
  exit $rc
} 2>&1 | tee "$OUT/bench.log"
exit "${PIPESTATUS[0]}"
