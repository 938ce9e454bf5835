"""The compile report (:mod:`contsup_fast.kernels.compile_report`) on the core specialisations:
the launches of a real ResNet-32 (K=16, R1E, batch 1024) training step, bf16 and fp32,
channels_last, recorded on fake tensors and compiled for sm_90 with Triton's bundled ptxas (no
GPU needed). Asserts no register spills and SM-count-planned grids that fit one wave.

Bounded for a loaded 2-core CI machine: one subprocess under ``nice`` with a Triton cache dir
(a warm cache makes a rerun take seconds) and a timeout of 6 minutes."""
import json
import os
import pathlib
import subprocess
import sys

import pytest

pytest.importorskip("triton")
ROOT = pathlib.Path(__file__).resolve().parents[1]


def _ptxas_present() -> bool:
    import triton

    return os.path.exists(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin",
                                       "ptxas"))


def test_core_specialisations_compile_for_sm90_without_spills(tmp_path):
    if not _ptxas_present():
        pytest.skip("Triton's CUDA backend (bundled ptxas) is not installed")
    cache = pathlib.Path(os.environ.get("CONTSUP_TRITON_CACHE",
                                        pathlib.Path.home() / ".cache" / "contsup_fast" / "triton-sm90"))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(TRITON_CACHE_DIR=str(cache), PYTHONPATH=os.pathsep.join(
        [str(ROOT)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])))
    cmd = ["nice", "-n", "5", sys.executable, "-m", "contsup_fast.kernels.compile_report",
           "--arch", "sm_90", "--configs", "resnet32", "--dtypes", "bf16", "fp32",
           "--layouts", "nhwc", "--modes", "train", "--out", str(tmp_path), "--name", "core"]
    try:
        proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=360)
    except subprocess.TimeoutExpired:
        pytest.fail("compiling the core sm_90 specialisations took over 360 s")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads((tmp_path / "core.json").read_text())
    rows = result["rows"]
    names = {r["kernel"] for r in rows}
    # every boundary op's kernels were recorded from the step
    for k in ("_patch_gram_kernel", "_ic_apply_kernel", "_ic_grad_sums_kernel", "_ic_grad_input_kernel",
              "_ctx_gram_kernel", "_ctx_apply_kernel", "_ctx_grad_kernel", "_chan_reduce_kernel"):
        assert k in names, f"{k} was not launched by the recorded step: {sorted(names)}"
    spilling = [(r["kernel"], r["constexprs"], r["spill_bytes"]) for r in rows if r["spill_bytes"]]
    assert not spilling, f"specialisations spill on sm_90: {spilling}"
    overfull = [(r["kernel"], r["overfull_planned_grids"], r["blocks"]) for r in rows
                if r["overfull_planned_grids"]]
    assert not overfull, f"SM-count-planned grids larger than the resident blocks: {overfull}"
    assert all(r["blocks"] >= 1 for r in rows)
    assert any(r["sm_planned_grids"] for r in rows)  # the split reductions were planned
