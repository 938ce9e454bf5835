"""Shared benchmark plumbing: environment record, timing, tables and JSON output.

Every tool writes its results with :func:`write_results` in one JSON schema
(:data:`SCHEMA`, documented in docs/performance.md, "The results schema")::

    {"schema": "contsup_fast.bench/1", "benchmark": "train_step",
     "environment": {"time_utc", "python", "torch", "device", "device_name", ...},
     "settings": {... the command's arguments ...},
     "rows": [{...one measured row...}, ...],
     ...  tool-specific extra keys (e.g. "memory_measure", "summary")}

:func:`validate` checks a payload against it; files written before the schema (the legacy forms
of :data:`LEGACY_FORMS`) are still accepted, and :func:`load_results` reads either form into the
current one.
"""
from __future__ import annotations

import json
import os
import platform
import statistics
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def environment(device: torch.device) -> Dict[str, object]:
    """Device name, library versions and thread count, for every JSON the benches write."""
    info: Dict[str, object] = {
        "time_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": str(device),
    }
    try:
        import triton
        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    try:
        import torchvision
        info["torchvision"] = torchvision.__version__
    except ImportError:
        info["torchvision"] = None
    if device.type == "cuda":
        info["device_name"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
    else:
        info["device_name"] = f"CPU ({os.cpu_count()} cores)"
    return info


def median_time(fn: Callable[[], object], device: torch.device, warmup: int, steps: int) -> float:
    """Median seconds of ``fn()`` over ``steps`` runs after ``warmup`` runs (CUDA events on GPU)."""
    for _ in range(warmup):
        fn()
    times: List[float] = []
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        for _ in range(steps):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
    else:
        for _ in range(steps):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def format_table(rows: List[Dict[str, object]], columns: List[str]) -> str:
    """Right-aligned text table of ``rows`` restricted to ``columns`` (floats to 3 significant digits)."""
    def cell(v):
        if v is None:
            return "-"
        if isinstance(v, float):
            return f"{v:.3g}"
        return str(v)

    lines = [columns] + [[cell(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(line[i]) for line in lines) for i in range(len(columns))]
    return "\n".join("  ".join(c.rjust(w) for c, w in zip(line, widths)) for line in lines)


def _write_json(name: str, payload: Dict[str, object], out_dir: Optional[Path] = None) -> Path:
    """Write ``payload`` to ``bench/results/<name>.json`` (or ``out_dir``) and return the path."""
    out_dir = Path(out_dir) if out_dir else RESULTS
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}.json"
    with open(path, "w") as f:
        json.dump(payload, f, indent=2, default=str)
    return path


# --------------------------------------------------------------------------------------------
# the results schema

#: the ``"schema"`` value of a results file in the current form
SCHEMA = "contsup_fast.bench/1"
#: keys every ``"environment"`` must have (:func:`environment` writes them and more)
REQUIRED_ENVIRONMENT = ("time_utc", "python", "torch", "device", "device_name")
#: forms written before :data:`SCHEMA`, accepted by :func:`validate` and converted by
#: :func:`load_results` (name: the top-level keys that identify it)
LEGACY_FORMS = {
    "environment-settings-rows": ("environment", "settings", "rows"),   # bench tools, unversioned
    "meta-rows": ("meta", "rows"),                                      # contsup_fast.memory --json
    "accuracy": ("environment", "protocol", "summary", "runs"),         # bench.accuracy
}


def _check_rows(rows: Any, where: str) -> None:
    if not isinstance(rows, list) or not rows:
        raise ValueError(f"{where}: 'rows' must be a non-empty list of objects, got {type(rows).__name__}"
                         + (" (empty)" if isinstance(rows, list) else ""))
    for i, r in enumerate(rows):
        if not isinstance(r, dict):
            raise ValueError(f"{where}: rows[{i}] must be an object, got {type(r).__name__}")


def _check_dict(obj: Dict[str, Any], key: str, where: str) -> Dict[str, Any]:
    v = obj.get(key)
    if not isinstance(v, dict):
        raise ValueError(f"{where}: {key!r} must be an object, got "
                         f"{'nothing' if v is None else type(v).__name__}")
    return v


def legacy_form(obj: Any) -> Optional[str]:
    """The name of the legacy form ``obj`` has (:data:`LEGACY_FORMS`), or None (no schema key
    and no legacy form, or the current form)."""
    if not isinstance(obj, dict) or "schema" in obj:
        return None
    for name in ("accuracy", "meta-rows", "environment-settings-rows"):
        if all(k in obj for k in LEGACY_FORMS[name]):
            return name
    return None


def validate(obj: Any, where: str = "results", allow_legacy: bool = True) -> str:
    """Check a results payload; returns its form (``"current"`` or a :data:`LEGACY_FORMS` name).

    Current form: ``schema`` equal to :data:`SCHEMA`, ``benchmark`` a non-empty string,
    ``environment`` an object with every :data:`REQUIRED_ENVIRONMENT` key, ``settings`` an
    object, ``rows`` a non-empty list of objects; other keys are free.

    Raises:
        ValueError: naming ``where`` and the first key that is missing or of the wrong type (or,
            with ``allow_legacy=False``, that the payload is in a legacy form).
    """
    if not isinstance(obj, dict):
        raise ValueError(f"{where}: a results payload must be a JSON object, got {type(obj).__name__}")
    if "schema" not in obj:
        form = legacy_form(obj)
        if form is None:
            raise ValueError(f"{where}: no 'schema' key and not one of the legacy forms "
                             f"{ {k: list(v) for k, v in LEGACY_FORMS.items()} }")
        if not allow_legacy:
            raise ValueError(f"{where}: legacy form {form!r}; write it with bench.common.write_results")
        if form == "accuracy":
            _check_dict(obj, "environment", where)
            _check_dict(obj, "protocol", where)
            if not _check_dict(obj, "summary", where):
                raise ValueError(f"{where}: 'summary' is empty")
        elif form == "meta-rows":
            _check_dict(obj, "meta", where)
            _check_rows(obj["rows"], where)
        else:
            _check_dict(obj, "environment", where)
            _check_dict(obj, "settings", where)
            _check_rows(obj["rows"], where)
        return form
    if obj["schema"] != SCHEMA:
        raise ValueError(f"{where}: schema {obj['schema']!r} is not {SCHEMA!r}")
    bench = obj.get("benchmark")
    if not isinstance(bench, str) or not bench:
        raise ValueError(f"{where}: 'benchmark' must be a non-empty string (the tool's name), got {bench!r}")
    env = _check_dict(obj, "environment", where)
    missing = [k for k in REQUIRED_ENVIRONMENT if k not in env]
    if missing:
        raise ValueError(f"{where}: 'environment' lacks {missing} (bench.common.environment() writes them)")
    _check_dict(obj, "settings", where)
    _check_rows(obj.get("rows"), where)
    return "current"


def results_payload(benchmark: str, environment: Dict[str, Any], settings: Dict[str, Any],
                    rows: List[Dict[str, Any]], **extra: Any) -> Dict[str, Any]:
    """A validated payload in the current form (``extra``: tool-specific top-level keys, which
    may not shadow the schema's own)."""
    clash = {"schema", "benchmark", "environment", "settings", "rows"} & set(extra)
    if clash:
        raise ValueError(f"extra keys {sorted(clash)} are the schema's own")
    payload = {"schema": SCHEMA, "benchmark": benchmark, "environment": environment,
               "settings": settings, "rows": rows, **extra}
    validate(payload, where=benchmark, allow_legacy=False)
    return payload


def write_payload(name: str, payload: Dict[str, Any], out_dir: Optional[Path] = None) -> Path:
    """Write a payload in the current form (from :func:`results_payload` or :func:`load_results`,
    possibly with extra keys added since) to ``bench/results/<name>.json`` (or under
    ``out_dir``); returns the path.

    Raises:
        ValueError: the payload is not in the current form (see :func:`validate`).
    """
    validate(payload, where=name, allow_legacy=False)
    return _write_json(name, payload, out_dir)


def write_results(name: str, benchmark: str, environment: Dict[str, Any], settings: Dict[str, Any],
                  rows: List[Dict[str, Any]], out_dir: Optional[Path] = None, **extra: Any) -> Path:
    """Validate and write ``bench/results/<name>.json`` (or under ``out_dir``) in the current
    schema; returns the path. See :func:`validate` for the form and the errors raised."""
    return _write_json(name, results_payload(benchmark, environment, settings, rows, **extra), out_dir)


def load_results(path) -> Dict[str, Any]:
    """Read a results file in any accepted form and return it in the current form (a legacy
    file's benchmark is taken from its file name, its missing environment keys are None)."""
    with open(path) as f:
        obj = json.load(f)
    form = validate(obj, where=str(path))
    if form == "current":
        return obj
    stem = Path(path).stem
    if form == "accuracy":
        rows = [{"variant": v, **s} for v, s in obj["summary"].items()]
        extra = {k: v for k, v in obj.items() if k not in ("environment", "protocol", "summary")}
        env, settings, bench = obj["environment"], obj["protocol"], "accuracy"
    elif form == "meta-rows":
        meta = dict(obj["meta"])
        settings = meta.pop("settings", {})
        env, rows, bench = meta, obj["rows"], "memory"
        extra = {k: v for k, v in obj.items() if k not in ("meta", "rows")}
    else:
        env, settings, rows = obj["environment"], obj["settings"], obj["rows"]
        bench = obj.get("benchmark") or stem.split("_cpu")[0].split("_cuda")[0]
        extra = {k: v for k, v in obj.items() if k not in ("environment", "settings", "rows", "benchmark")}
    env = {**{k: None for k in REQUIRED_ENVIRONMENT}, **env}
    if "measures" in env:
        extra.setdefault("measures", env.pop("measures"))
    return {"schema": SCHEMA, "benchmark": bench, "environment": env, "settings": settings,
            "rows": rows, **extra}
