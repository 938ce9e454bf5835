"""bench.zoo: every model in its own capped subprocess; rows for wraps, refusals, errors and
timeouts; the table and the JSON. A few small CNNs at 32x32, as CI runs it."""
import json

import pytest

from bench import zoo
from bench.common import validate

pytest.importorskip("torchvision")

COMMON = ["--contexts", "R0", "R1E", "--sizes", "32", "64", "--warmup", "0", "--memory-gib", "8"]


@pytest.mark.slow
def test_small_cnns_wrap_train_evaluate_and_export(tmp_path):
    models = ["resnet18", "mobilenet_v3_small", "squeezenet1_0"]
    rows = zoo.main(["--models", *models, "--K", "2", "64", *COMMON, "--timeout", "900",
                     "--out-dir", str(tmp_path), "--tag", "t"])
    by = {(r["model"], r["K"], r["context"]): r for r in rows}
    assert len(rows) == 3 * 5
    for m in models:
        e2e = by[(m, 1, "E2E")]
        assert e2e["status"] == "ok" and e2e["input"] == 32 and e2e["params"] > 0
        for ctx in ("R0", "R1E"):
            r = by[(m, 2, ctx)]
            assert r["status"] == "ok", r
            assert len(r["cuts"]) == 1 and r["to_module_max_abs_diff"] <= 1e-5
            assert r["saved_ratio"] == pytest.approx(r["saved_peak_MiB"] / e2e["saved_peak_MiB"])
            refused = by[(m, 64, ctx)]
            assert refused["status"] == "refused" and "K=64" in refused["reason"]
        # greedy local learning keeps fewer activations than E2E: the point of the table
        assert by[(m, 2, "R0")]["saved_ratio"] < 1.0
    saved = json.loads((tmp_path / "zoo_t.json").read_text())
    assert saved["rows"] == rows and saved["environment"]["torch"] and "no GPU" in saved["machine"]
    assert validate(saved, allow_legacy=False) == "current" and saved["benchmark"] == "zoo"
    table = (tmp_path / "zoo_t.md").read_text()
    assert all(f"| {m} | 32x32 |" in table for m in models)
    assert "refused: K=64 is larger than the number of splittable blocks" in table


def test_timeout_and_unknown_model_are_rows(tmp_path):
    rows = zoo.main(["--models", "resnet18", "--K", "2", *COMMON, "--timeout", "1",
                     "--out-dir", str(tmp_path), "--tag", "t"])
    assert [(r["K"], r["context"], r["status"]) for r in rows] == [
        (1, "E2E", "timeout"), (2, "R0", "not run"), (2, "R1E", "not run")]
    rows = zoo.main(["--models", "no_such_net", "--K", "2", *COMMON, "--timeout", "600",
                     "--out-dir", str(tmp_path), "--tag", "t"])
    assert len(rows) == 1 and rows[0]["status"] == "error" and "no_such_net" in rows[0]["reason"]


def test_markdown_table_and_reasons():
    settings = {"K": [2], "contexts": ["R0"], "batch": 2, "warmup": 0, "memory_gib": 8.0,
                "timeout": 60.0, "command": "python -m bench.zoo", "models": ["a", "b", "c"]}
    rows = [{"model": "a", "K": 1, "context": "E2E", "status": "ok", "params": 2e6, "input": 32,
             "saved_peak_MiB": 10.0, "true_peak_MiB": 40.0},
            {"model": "a", "K": 2, "context": "R0", "status": "ok", "params": 2e6, "input": 32,
             "saved_peak_MiB": 5.0, "true_peak_MiB": 30.0},
            {"model": "b", "K": 1, "context": "E2E", "status": "oom", "reason": "RuntimeError: can't allocate"}]
    zoo._add_ratios(rows[:2])
    text = zoo.markdown(rows, settings, "2-core x86_64 CPU, no GPU")
    assert "| a | 32x32 | 2.0 | yes | 10 / 40 | 50% / 75% |" in text
    assert "- **b** (E2E) oom: RuntimeError: can't allocate" in text
    assert "Not run (the sweep was stopped before them): c." in text
    assert "2-core x86_64 CPU, no GPU" in text and "`python -m bench.zoo`" in text


def test_render_merges_later_rows_and_flags_channels_last(tmp_path):
    settings = {"K": [2], "contexts": ["R0"], "batch": 2, "warmup": 0, "memory_gib": 8.0,
                "timeout": 60.0, "command": "python -m bench.zoo", "models": ["cnn", "swin"]}
    ok = {"status": "ok", "params": 1e6, "input": 224, "saved_peak_MiB": 4.0, "true_peak_MiB": 8.0}
    first = [{"model": "cnn", "K": 1, "context": "E2E", **ok},
             {"model": "cnn", "K": 2, "context": "R0", **ok, "cut_shapes": [[64, 56, 56]]},
             {"model": "swin", "K": 1, "context": "E2E", "status": "timeout", "reason": "slow"}]
    later = [{"model": "swin", "K": 1, "context": "E2E", **ok},
             {"model": "swin", "K": 2, "context": "R0", **ok, "cut_shapes": [[56, 56, 96]]}]
    for name, rows in (("zoo_a.json", first), ("zoo_b.json", later)):
        (tmp_path / name).write_text(json.dumps({"environment": {"torch": "x"}, "settings": settings,
                                                 "machine": "2-core x86_64 CPU, no GPU", "rows": rows}))
    rows = zoo.main(["--render", str(tmp_path / "zoo_a.json"), str(tmp_path / "zoo_b.json"),
                     "--tag", "merged", "--out-dir", str(tmp_path)])
    by = {(r["model"], r["K"]): r for r in rows}
    assert by[("swin", 1)]["status"] == "ok" and by[("cnn", 2)]["status"] == "ok"
    expected = "ok" if zoo._has_layout_support() else "wrong layout"  # a version that knows layouts
    assert by[("swin", 2)]["status"] == expected
    saved = json.loads((tmp_path / "zoo_merged.json").read_text())
    assert saved["replaced_from"][0]["models"] == ["swin"]
    assert validate(saved, allow_legacy=False) == "current"  # legacy inputs, written in the schema
    assert "| swin | 224x224 |" in (tmp_path / "zoo_merged.md").read_text()


def test_allocation_failure_while_wrapping_is_oom_not_refused(monkeypatch):
    """LocalSequential turns a failure on the example input into a ValueError; when that failure
    is an allocation (vit_h_14 under the cap), the row says oom, not refused."""
    import torch
    import contsup_fast

    def fail(message):
        def build(*args, **kwargs):
            raise ValueError(message)
        return build

    model = torch.nn.Linear(2, 2)
    monkeypatch.setattr(contsup_fast, "LocalSequential", fail(
        "model VisionTransformer failed on an example input (RuntimeError: DefaultCPUAllocator: "
        "can't allocate memory: you tried to allocate 7895040 bytes)"))
    assert zoo._run_config(model, 2, "R0", 32, 2, 0)["status"] == "oom"
    monkeypatch.setattr(contsup_fast, "LocalSequential", fail("K=4 is larger than the number of splittable blocks"))
    assert zoo._run_config(model, 2, "R0", 32, 2, 0)["status"] == "refused"
