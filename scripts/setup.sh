#!/usr/bin/env bash
# Create .venv with the pinned toolchain (requirements-dev.txt) and build contsup_fast in place.
# The C++ extension is compiled with the CUDA kernels when a CUDA toolkit is found
# (CUDA_HOME, else /usr/local/cuda), CPU-only otherwise; a failed build leaves the
# pure-PyTorch path working (one warning).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -r requirements-dev.txt
if [ -z "${CUDA_HOME:-}" ] && [ -x /usr/local/cuda/bin/nvcc ]; then export CUDA_HOME=/usr/local/cuda; fi
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-"8.0;9.0+PTX"}
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
.venv/bin/python -m pip install -q --no-build-isolation -e .
.venv/bin/python - <<'PY'
from contsup_fast.fused import available_backends
print("contsup_fast installed; boundary-op backends on cpu:", available_backends("cpu"))
PY
