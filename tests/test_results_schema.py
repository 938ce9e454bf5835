"""bench/results: one JSON schema (bench.common.SCHEMA), checked on every committed file, and the
helpers every bench tool writes it with."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from bench import common

RESULTS = Path(__file__).resolve().parent.parent / "bench" / "results"
COMMITTED = sorted(RESULTS.glob("*.json"))
#: committed files still in a legacy form, each waiting for its tool's migration or a rerun
#: (empty this list as they land; nothing else may be written outside the current form)
LEGACY_ALLOWED: set = set()


def _env():
    return common.environment(torch.device("cpu"))


def _legacy_allowed(path: Path) -> bool:
    return any(path.match(pattern) for pattern in LEGACY_ALLOWED)


@pytest.mark.parametrize("path", COMMITTED, ids=[p.name for p in COMMITTED])
def test_every_committed_result_is_in_the_current_schema(path):
    obj = json.loads(path.read_text())
    if _legacy_allowed(path):
        assert common.validate(obj, where=path.name) in ("current",) + tuple(common.LEGACY_FORMS)
    else:
        assert common.validate(obj, where=path.name, allow_legacy=False) == "current"
        # the file is named after its tool: <benchmark>_<tag>.json
        assert path.stem.startswith(obj["benchmark"] + "_"), (path.name, obj["benchmark"])
    cur = common.load_results(path)
    assert common.validate(cur, where=path.name, allow_legacy=False) == "current"
    assert cur["rows"] and all(isinstance(r, dict) for r in cur["rows"])


def test_write_results_round_trip(tmp_path):
    rows = [{"model": "resnet20", "step_ms": 1.5}, {"model": "resnet32", "step_ms": 2.5}]
    path = common.write_results("demo_cpu", "demo", _env(), {"batch": 8}, rows, tmp_path, note="x")
    obj = json.loads(path.read_text())
    assert obj["schema"] == common.SCHEMA and obj["benchmark"] == "demo" and obj["note"] == "x"
    assert obj["rows"] == rows and obj["settings"] == {"batch": 8}
    assert set(common.REQUIRED_ENVIRONMENT) <= set(obj["environment"])
    assert common.load_results(path) == obj


def test_write_payload_writes_the_current_form_with_extras_and_refuses_any_other(tmp_path):
    payload = common.results_payload("demo", _env(), {"batch": 8}, [{"a": 1}])
    payload["vs_ours"] = [{"b": 2}]  # a key added after the payload was built
    path = common.write_payload("demo_cpu", payload, tmp_path)
    assert common.load_results(path) == json.loads(json.dumps(payload))
    legacy = {"environment": _env(), "settings": {}, "rows": [{"a": 1}]}
    with pytest.raises(ValueError, match="legacy form"):
        common.write_payload("legacy_cpu", legacy, tmp_path)
    assert not (tmp_path / "legacy_cpu.json").exists()


@pytest.mark.parametrize("change, message", [
    (lambda o: o.pop("rows"), "'rows' must be a non-empty list"),
    (lambda o: o.update(rows=[]), "empty"),
    (lambda o: o.update(rows=[1, 2]), r"rows\[0\] must be an object"),
    (lambda o: o.update(settings=[1]), "'settings' must be an object"),
    (lambda o: o["environment"].pop("torch"), r"lacks \['torch'\]"),
    (lambda o: o.update(benchmark=""), "'benchmark' must be a non-empty string"),
    (lambda o: o.update(schema="contsup_fast.bench/0"), "is not"),
])
def test_validate_names_what_is_wrong(change, message):
    obj = common.results_payload("demo", _env(), {"batch": 8}, [{"a": 1}])
    change(obj)
    with pytest.raises(ValueError, match=message):
        common.validate(obj, where="demo")


def test_legacy_forms_are_accepted_only_when_allowed_and_converted():
    env = _env()
    legacy = {"environment": env, "settings": {"b": 1}, "rows": [{"a": 1}]}
    assert common.validate(legacy) == "environment-settings-rows"
    with pytest.raises(ValueError, match="legacy form"):
        common.validate(legacy, allow_legacy=False)
    with pytest.raises(ValueError, match="not one of the legacy forms"):
        common.validate({"rows": [{"a": 1}]})
    with pytest.raises(ValueError, match="extra keys"):
        common.results_payload("demo", env, {}, [{"a": 1}], schema="x")


def test_memory_cli_writes_the_current_form(tmp_path):
    from contsup_fast import memory
    out = tmp_path / "m.json"
    memory.main(["--models", "resnet20", "--K", "2", "--contexts", "R0", "--batch", "2", "--backend", "torch",
                 "--json", str(out)])
    obj = json.loads(out.read_text())
    assert common.validate(obj, allow_legacy=False) == "current" and obj["benchmark"] == "memory"
