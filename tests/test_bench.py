"""The benchmarks' CPU-sized modes run in CI: tables print, JSON and the plot are written."""
import json

import pytest


def test_kernel_microbenchmark_quick(tmp_path, capsys):
    from bench import kernels
    if not _native():
        pytest.skip("the native extension is not built")
    rows = kernels.main(["--quick", "--backends", "native", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert "device-to-device copy" in out and "fwd_bwd_speedup_vs_eager" in out
    data = json.loads((tmp_path / "kernels_cpu_quick.json").read_text())
    assert data["environment"]["torch"] and len(data["rows"]) == len(rows) > 0
    assert all(r["fwd_us"] > 0 and r["fwd_bwd_us"] > 0 for r in rows)


@pytest.mark.slow
def test_train_step_benchmark_quick(tmp_path, capsys):
    from bench import train_step
    rows = train_step.main(["--quick", "--K", "4", "--contexts", "R0", "R1E", "--backends", "torch",
                            "--steps", "1", "--warmup", "0", "--batch", "8", "--out", str(tmp_path)])
    text = capsys.readouterr().out
    assert "E2E eager" in text and "E2E checkpoint" in text and "LocalSequential" in text
    assert (tmp_path / "train_step_cpu_quick.json").exists() and (tmp_path / "train_step_cpu_quick.png").exists()
    e2e = rows[0]
    assert e2e["method"] == "E2E eager" and e2e["speed_vs_e2e"] == 1.0
    local = [r for r in rows if r["method"] == "LocalSequential"]
    assert len(local) == 2 and all(r["mem_vs_e2e"] < 1.0 for r in local)


def _native():
    from contsup_fast.fused import available_backends
    return "native" in available_backends("cpu")
