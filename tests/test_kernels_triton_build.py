"""Every kernel variant the small Triton ops launch compiles to an sm_90 cubin, without a GPU
(a stand-in driver and Triton's bundled ptxas, in a subprocess). The model-sized launches are
compiled by ``tests/test_compile_report.py``.
"""
import os
import pathlib
import sys

import pytest
import torch

pytestmark = pytest.mark.skipif(
    not (os.environ.get("TRITON_INTERPRET") == "1" or torch.cuda.is_available()),
    reason="Triton kernels need CUDA or TRITON_INTERPRET=1")

pytest.importorskip("triton")

ROOT = pathlib.Path(__file__).resolve().parents[1]


_SM90_SCRIPT = r"""
import importlib, importlib.util, sys
import torch
try:  # a stand-in driver: compile for an H100 (sm_90) without a GPU
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia.driver import CudaDriver

    class _Driver(CudaDriver):
        def __init__(self):
            pass

        def get_current_target(self):
            return GPUTarget("cuda", 90, 32)

        def get_current_device(self):
            return 0

        def get_current_stream(self, device=None):
            return 0

    triton.runtime.driver.set_active(_Driver())
except Exception as exc:
    print("setup failed:", exc)
    sys.exit(77)
root = sys.argv[1]
sys.path.insert(0, root)
try:
    importlib.import_module("contsup_fast.kernels")
except ImportError:
    spec = importlib.util.spec_from_file_location(
        "contsup_fast.kernels", root + "/kernels/__init__.py",
        submodule_search_locations=[root + "/kernels"])
    mod = importlib.util.module_from_spec(spec)
    sys.modules["contsup_fast.kernels"] = mod
    spec.loader.exec_module(mod)
from contsup_fast.kernels import _bn_kernels, _common, _head_pool, _image_tail, _residual
assert not _common.INTERPRETED
built = set()

def warmup(kernel, grid, *args, **meta):  # compile (TTIR .. PTX .. cubin), do not launch
    kernel.warmup(*args, grid=grid, **meta)
    built.add((kernel.fn.__name__, tuple(sorted(meta.items()))))

_bn_kernels.launch = _residual.launch = _common.launch = warmup  # _common: launch_split_sums
for dt in (torch.float32, torch.bfloat16, torch.float64):  # fp16 compiles as bf16 does
    p = torch.float64 if dt == torch.float64 else torch.float32
    vec = lambda: torch.rand(24, dtype=p) + 0.5
    h = torch.randn(2, 24, 4, 4, dtype=dt)
    z = torch.randn(2, 24, 8, 8, dtype=dt)
    cs = [torch.randn(2, 40, 8, 8, dtype=dt), torch.randn(2, 24, 4, 4, dtype=dt)]
    ws = [torch.randn(24, c.shape[1], dtype=p) for c in cs]
    for tr in (True, False):
        run = [] if tr else [vec(), vec()]
        out, m, v, cm, cv = _residual._residual_context_fwd(
            h, cs, ws, [vec(), vec()], [vec(), vec()], [vec(), vec()], run, run, tr, 1e-5)
        _residual._residual_context_bwd(h, cs, ws, [vec(), vec()], [vec(), vec()], [vec(), vec()],
                                        m, v, cm, cv, tr, 1e-5)
        _, m, v = _image_tail._fwd(h, z, vec(), vec(), vec(), vec(), tr, 1e-5)
        _image_tail._bwd(h, z, vec(), vec(), m, v, tr, 1e-5)
        pooled, m, v = _head_pool._gap_fwd(z, vec(), vec(), vec(), vec(), tr, 1e-5)
        _head_pool._gap_bwd(pooled, z, vec(), vec(), m, v, tr, 1e-5)
    _head_pool._avg_fwd(h)
    _head_pool._avg_bwd(pooled, 8, 8, True)
print("built", len(built), "kernel variants for sm_90")
"""


def test_kernels_build_for_sm90():
    """Every kernel variant the small ops launch (fp32/bf16/fp64, train/eval) compiles to an
    sm_90 cubin with Triton's bundled ptxas -- no GPU needed. (fp16 takes bf16's code paths;
    the model-sized launches are compiled by tests/test_compile_report.py.) Bounded: ``nice``,
    a persistent Triton cache dir (reruns take seconds) and a 420 s timeout."""
    import subprocess

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = os.environ.get(
        "CONTSUP_TRITON_CACHE", str(pathlib.Path.home() / ".cache" / "contsup_fast" / "triton-sm90"))
    try:
        proc = subprocess.run(["nice", "-n", "5", sys.executable, "-c", _SM90_SCRIPT, str(ROOT)],
                              env=env, capture_output=True, text=True, timeout=420)
    except subprocess.TimeoutExpired:
        pytest.fail("building the sm_90 kernel variants took over 420 s")
    if proc.returncode == 77:
        pytest.skip(f"cannot set up an sm_90 Triton target here: {proc.stdout.strip()}")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "kernel variants for sm_90" in proc.stdout
