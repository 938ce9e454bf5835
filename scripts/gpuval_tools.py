"""Helpers of ``scripts/gpu-validate.sh``: toy data, the size of what travels, the summary.

    python scripts/gpuval_tools.py toy-data --out DIR [--per-batch 16]
    python scripts/gpuval_tools.py travel-size [--carry .gpuval] [--limit-mib 64]
    python scripts/gpuval_tools.py summary RESULTS_DIR

``toy-data`` writes random images in the official ``cifar-10-batches-py`` layout (five
training batches and a test batch of ``--per-batch`` images each; labels cycle over the ten
classes) for the CPU dry run. ``travel-size`` adds up what the device tool sends: tracked and
untracked-not-ignored files (``git ls-files``), the folder ``shared/`` if the checkout has one,
and the carried paths; exit 1 above the limit. ``summary`` prints the short tables that end a
validation run, from ``phases.tsv`` (one line per phase: name, status, seconds, budget, log)
and the JSON and logs the phases wrote, and saves them as ``summary.txt`` and ``summary.json``.
"""
from __future__ import annotations

import argparse
import json
import os
import pickle
import re
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np

LIMIT_MIB = 64


# ----------------------------------------------------------------------------- toy data
def toy_data(out: Path, per_batch: int, seed: int = 0) -> Path:
    """Write a random CIFAR-10-layout dataset under ``out/cifar-10-batches-py``."""
    if per_batch < 10:
        raise ValueError(f"--per-batch must be >= 10 (one image per class), got {per_batch}")
    rng = np.random.default_rng(seed)
    folder = out / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {b"batch_label": name.encode(), b"labels": [i % 10 for i in range(per_batch)],
                 b"data": rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8),
                 b"filenames": [f"{i:05d}.png".encode() for i in range(per_batch)]}
        with open(folder / name, "wb") as f:
            pickle.dump(batch, f, protocol=4)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({b"label_names": [f"class{i}".encode() for i in range(10)],
                     b"num_cases_per_batch": per_batch, b"num_vis": 3072}, f, protocol=4)
    return folder


# ----------------------------------------------------------------------------- travel size
def _tree_bytes(path: Path) -> int:
    if path.is_symlink() or path.is_file():
        return path.lstat().st_size
    total = 0
    for root, dirs, files in os.walk(path):
        for f in files:
            total += (Path(root) / f).lstat().st_size
    return total


def travel_bytes(root: Path, carry: List[str]) -> Dict[str, int]:
    """Bytes per part of what the device tool would send from the checkout at ``root``."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                            cwd=root, check=True, capture_output=True).stdout.split(b"\0")
    files = 0
    for name in filter(None, listed):
        p = root / os.fsdecode(name)
        if p.is_symlink() or p.is_file():
            files += p.lstat().st_size
    parts = {"tree": files}
    if (root / "shared").is_dir():
        parts["shared/"] = _tree_bytes(root / "shared")
    for c in carry:
        p = root / c
        parts[c] = _tree_bytes(p) if p.exists() else 0
    return parts


# ----------------------------------------------------------------------------- summary
def _read_phases(res: Path) -> List[Dict[str, str]]:
    rows = []
    path = res / "phases.tsv"
    if path.exists():
        for line in path.read_text().splitlines():
            parts = line.split("\t")
            if len(parts) >= 5:
                rows.append(dict(zip(("phase", "status", "seconds", "budget", "log"), parts)))
    return rows


def _tail_match(text: str, pattern: str) -> Optional[str]:
    found = re.findall(pattern, text, flags=re.M)
    return found[-1] if found else None


def _phase_note(res: Path, phase: Dict[str, str]) -> str:
    log = res / phase["log"] if phase["log"] and phase["log"] != "-" else None
    text = log.read_text(errors="replace") if log and log.is_file() else ""
    name = phase["phase"]
    if phase["status"] == "skipped":
        return _tail_match(text, r"^(skipped: .*)$") or "skipped"
    if name == "check":
        verdicts = [" ".join(line.split(":")[0].split("(")[0].split()) for line in text.splitlines()
                    if re.match(r"^(torch|native|triton)\s", line)]
        return "; ".join(verdicts)
    if name == "gpu-tests":
        return _tail_match(text, r"^=*\s*(.*(?:passed|failed|error|skipped|no tests ran).*?)\s*=*$") or ""
    if name in ("memcheck", "racecheck"):
        return (_tail_match(text, r"(ERROR SUMMARY: .*|RACECHECK SUMMARY: .*)") or
                _tail_match(text, r"(sanitize step ok: .*|sanitize step FAILED .*)") or "")
    if name == "parity":
        return _tail_match(text, r"^(\d+/\d+ MATCH .*)$") or ""
    if name == "build":
        return _tail_match(text, r"(built contsup_fast\._C .*|extension: .*)") or ""
    return _tail_match(text, r"^(skipped: .*)$") or ""


def _accuracy_rows(res: Path) -> List[Dict[str, object]]:
    rows = []
    for log in sorted((res / "accuracy").glob("*/log.json")):
        data = json.loads(log.read_text())
        hist = data.get("history") or data.get("epochs") or []
        last = hist[-1] if hist else {}
        times = [h.get("train_time_s") for h in hist if h.get("train_time_s") is not None]
        rows.append({"row": log.parent.name, "epochs_done": len(hist), "_hist": hist,
                     "epochs": (data.get("final") or {}).get("epochs") or data.get("args", {}).get("epochs"),
                     "test_acc": last.get("test_acc"), "peak_mem_MiB": last.get("peak_mem_mib"),
                     "s_per_epoch": (sum(times) / len(times)) if times else None,
                     "img_s": last.get("images_per_s")})
    # rows stopped by the time budget: compare every row at the last epoch all of them finished
    common = min((r["epochs_done"] for r in rows), default=0)
    for r in rows:
        hist = r.pop("_hist")
        r["common_epoch"] = common or None
        r["acc_at_common"] = hist[common - 1].get("test_acc") if common else None
    return rows


def _load_rows(res: Path, pattern: str) -> List[dict]:
    rows: List[dict] = []
    for p in sorted(res.glob(pattern)):
        try:
            rows += json.loads(p.read_text()).get("rows", [])
        except (OSError, ValueError):
            pass
    return rows


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.3g}"
    return str(v)


def _table(rows: List[dict], cols: List[str]) -> str:
    lines = [cols] + [[_fmt(r.get(c)) for c in cols] for r in rows]
    widths = [max(len(line[i]) for line in lines) for i in range(len(cols))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip() for line in lines)


def summary(res: Path) -> str:
    """The closing tables of a validation run (also written to summary.txt / summary.json)."""
    phases = _read_phases(res)
    for p in phases:
        p["note"] = _phase_note(res, p)
    acc = _accuracy_rows(res)
    steps = _load_rows(res, "bench/**/train_step_*.json")
    ref = _load_rows(res, "bench/reference_contsup_*.json")
    kernels = _load_rows(res, "bench/**/kernels_*.json")
    out = ["== phases", _table(phases, ["phase", "status", "seconds", "budget", "note"])]
    if acc:
        out += ["", "== accuracy (CIFAR-10 JPEG-lossy copy: not official numbers)",
                _table(acc, ["row", "epochs_done", "epochs", "test_acc", "common_epoch", "acc_at_common",
                             "peak_mem_MiB", "s_per_epoch", "img_s"])]
    if steps:
        out += ["", "== train step (vs E2E eager of the same model)",
                _table(steps, ["model", "method", "K", "context", "backend", "img_s", "mem_MiB",
                               "speed_vs_e2e", "mem_vs_e2e", "saved_vs_e2e"])]
    if ref:
        out += ["", "== reference ContSup scripts (fp32)",
                _table(ref, ["model", "K", "context", "batch", "img_s", "mem_MiB"])]
    if kernels:
        fused = [r for r in kernels if r.get("impl") not in ("eager", "compile")]
        out += ["", "== fused ops (fwd+bwd speed-up; fwd bandwidth / copy)",
                _table(fused, ["case", "batch", "dtype", "impl", "fwd_bwd_speedup_vs_eager",
                               "fwd_bwd_speedup_vs_compile", "fwd_vs_copy"])]
    text = "\n".join(out)
    (res / "summary.txt").write_text(text + "\n")
    (res / "summary.json").write_text(json.dumps({"phases": phases, "accuracy": acc, "train_step": steps,
                                                  "reference": ref, "kernels": kernels}, indent=1, default=str))
    return text


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("toy-data", help="random CIFAR-10-layout data for the dry run")
    t.add_argument("--out", required=True)
    t.add_argument("--per-batch", type=int, default=16)
    s = sub.add_parser("travel-size", help="bytes the device tool would send from this checkout")
    s.add_argument("--root", default=".")
    s.add_argument("--carry", nargs="*", default=[])
    s.add_argument("--limit-mib", type=float, default=LIMIT_MIB)
    m = sub.add_parser("summary", help="closing tables of a validation run")
    m.add_argument("results")
    args = p.parse_args(argv)
    if args.cmd == "toy-data":
        try:
            print(f"toy data: {toy_data(Path(args.out), args.per_batch)}")
        except ValueError as exc:
            print(f"gpuval_tools: {exc}", file=sys.stderr)
            return 2
        return 0
    if args.cmd == "travel-size":
        parts = travel_bytes(Path(args.root).resolve(), args.carry)
        total = sum(parts.values())
        detail = ", ".join(f"{k} {v / 2**20:.1f}" for k, v in parts.items())
        ok = total <= args.limit_mib * 2**20
        print(f"travel size: {total / 2**20:.1f} MiB ({detail}); limit {args.limit_mib:g} MiB: "
              f"{'ok' if ok else 'TOO LARGE'}")
        return 0 if ok else 1
    print(summary(Path(args.results)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
