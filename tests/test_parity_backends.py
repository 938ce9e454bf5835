"""``python -m bench.parity --against-torch`` (bench/parity/backends.py) on the CPU: a fused
backend's training step and the torch backend's, both against the torch backend in float64."""
import json

import pytest
import torch

from contsup_fast.fused import available_backends

pytestmark = pytest.mark.skipif("native" not in available_backends("cpu"),
                                reason="needs the compiled extension (the native backend)")


def test_native_matches_and_the_json_follows_the_results_schema(tmp_path):
    from bench.common import validate
    from bench.parity.__main__ import main

    rows = main(["--against-torch", "--device", "cpu", "--dtypes", "fp32", "--backends", "native",
                 "--only", "resnet32 K=4 R1E", "--batch", "2", "--out", str(tmp_path)])
    assert [(r["config"], r["backend"], r["dtype"], r["verdict"]) for r in rows] == [
        ("resnet32 K=4 R1E", "native", "fp32", "MATCH")]
    # both fp32 runs are close to float64: the comparison is not vacuous
    assert 0 < rows[0]["grads_rel"] < 1e-3 and 0 < rows[0]["grads_torch_rel"] < 1e-3
    data = json.loads((tmp_path / "parity_backends_cpu.json").read_text())
    assert validate(data, allow_legacy=False) == "current" and data["benchmark"] == "parity_backends"


def test_a_wrong_boundary_op_is_caught(monkeypatch):
    """The residual context op's output 1% too large: DIFFER, found in the module outputs."""
    import contsup_fast._native as native
    from bench.parity import backends

    real = native.residual_context

    def wrong(*args, **kwargs):
        out, means, variances = real(*args, **kwargs)
        return out * 1.01, means, variances

    monkeypatch.setattr(native, "residual_context", wrong)
    row = backends.run_pair("resnet32 K=4 R1E", "native", "fp32", torch.device("cpu"), batch=2)
    assert row["verdict"] == "DIFFER"
    assert row["inputs_rel"] > 1e-3 > 100 * row["inputs_torch_rel"]
