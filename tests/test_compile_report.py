"""The compile report (:mod:`contsup_fast.kernels.compile_report`) on the core specialisations:
the launches of a real ResNet-32 (K=16, R1E, batch 1024) training step, bf16 and fp32,
channels_last, recorded on fake tensors and compiled for sm_90 with Triton's bundled ptxas (no
GPU needed). Asserts no register spills and SM-count-planned grids that fit one wave.

Bounded for a loaded 2-core CI machine: one subprocess with a Triton cache dir (a warm cache
makes a rerun take seconds) and a timeout of 5 minutes (about 1-2 minutes cold on an idle
2-core machine); on a machine so loaded that it runs out, the test is skipped with that reason
rather than failed."""
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
    cmd = [sys.executable, "-m", "contsup_fast.kernels.compile_report",
           "--arch", "sm_90", "--configs", "resnet32", "--dtypes", "bf16", "fp32",
           "--layouts", "nhwc", "--modes", "train", "--out", str(tmp_path), "--name", "core"]
    try:
        proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    except subprocess.TimeoutExpired:
        pytest.skip("compiling the core sm_90 specialisations took over 300 s (machine overloaded)")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads((tmp_path / "core.json").read_text())
    from bench.common import validate

    assert validate(result, allow_legacy=False) == "current" and result["benchmark"] == "compile_report"
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


def test_blocks_per_sm_follows_the_cuda_allocation_rules():
    """Independent figures (CUDA occupancy calculator rules: 256-register warp granularity,
    1 KB reserved shared memory per block, 64 warps and 32 blocks per SM)."""
    from contsup_fast.kernels.occupancy import GPUS, blocks_per_sm

    h100, a100 = GPUS["sm_90"], GPUS["sm_80"]
    assert blocks_per_sm(255, 0, 8, h100)["blocks"] == 1  # 256 regs x 256 threads = 65536
    assert blocks_per_sm(128, 0, 4, h100)["blocks"] == 4  # 128 x 128 = 16384 per block
    assert blocks_per_sm(129, 0, 4, h100)["by_regs"] == 3  # rounds to 136 x 32 = 4352 per warp
    assert blocks_per_sm(32, 96 * 1024, 4, h100)["blocks"] == 2  # 97 KB per block of 228
    assert blocks_per_sm(32, 96 * 1024, 4, a100)["blocks"] == 1  # of 164
    assert blocks_per_sm(16, 0, 1, h100)["blocks"] == 32  # the block limit
    assert blocks_per_sm(32, 0, 16, h100)["by_warps"] == 4


def test_markdown_tables_count_per_dtype_and_kernel():
    """The tables of docs/gpu-validation.md (``--render``): a specialisation counts under every
    dtype whose steps launched it; spills, over-one-wave grids and ranges per kernel."""
    from contsup_fast.kernels.compile_report import markdown

    def row(kernel, where, spill, regs, overfull=()):
        return {"arch": "sm_80", "kernel": kernel, "where": where, "spill_bytes": spill, "registers": regs,
                "blocks": 1, "shared": 2048, "mma": 4, "overfull_planned_grids": list(overfull)}

    rows = [row("_a", ["resnet32/bf16/nhwc/train", "resnet32/fp16/nhwc/train"], 0, 100),
            row("_a", ["resnet50/bf16/nchw/train"], 40, 128, [(200, 1, 1)]),
            row("_b", ["resnet32/fp32/nchw/eval"], 8, 255)]
    text = markdown({"rows": rows})
    assert "| sm_80 | bf16 | 2 | 1 | 40 | 1 | 0 |" in text
    assert "| sm_80 | fp16 | 1 | 0 | 0 | 0 | 0 |" in text
    assert "| sm_80 | fp32 | 1 | 1 | 8 | 0 | 0 |" in text
    assert "| sm_80 | `_a` | 2 | 1 | 40 | 100-128 | 1-1 | 2 | 4-4 | 1 |" in text
