"""Markdown summary of a ``bench.parity`` JSON: ``python -m bench.parity.summary [JSON]``.

One line per (reference, model, backend): how many configurations MATCH, and the largest
relative error of each compared quantity over them; then every row that does not MATCH,
with its worst quantity and tensor.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Dict, List

from ..common import RESULTS, load_results

QUANTITIES = ["losses", "inputs", "outputs", "logits", "grads", "grads_zero", "running_stats", "eval_logits",
              "eval_outputs", "params", "updates"]


def _fmt(v) -> str:
    return "-" if v is None else ("0" if v == 0 else f"{v:.1e}")


def summarise(payload: Dict) -> str:
    rows: List[dict] = payload["rows"]
    groups: Dict[tuple, List[dict]] = {}
    for r in rows:
        model = (r.get("model") or "head") + ("" if r.get("dataset", "cifar10") == "cifar10" else f" {r['dataset']}")
        groups.setdefault((r.get("reference", "ContSup"), model, r["backend"]), []).append(r)
    head = ["reference", "model", "backend", "MATCH"] + QUANTITIES
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for (ref, model, backend), rs in groups.items():
        n_ok = sum(r["verdict"] == "MATCH" for r in rs)
        cells = [ref, model, backend, f"{n_ok}/{len(rs)}"]
        for q in QUANTITIES:
            vals = [r[f"{q}_rel"] for r in rs if r.get(f"{q}_rel") is not None]
            cells.append(_fmt(max(vals)) if vals else "-")
        lines.append("| " + " | ".join(cells) + " |")
    bad = [r for r in rows if r["verdict"] != "MATCH"]
    if bad:
        lines += ["", "| configuration | backend | verdict | worst quantity | relative error | tensor |",
                  "|---|---|---|---|---|---|"]
        for r in bad:
            if r["verdict"] == "ERROR":
                lines.append(f"| {r['config']} | {r['backend']} | ERROR | - | - | {r.get('error', '')[:120]} |")
                continue
            cmp = r["comparison"]
            q = max(cmp, key=lambda k: cmp[k]["rel"])
            lines.append(f"| {r['config']} | {r['backend']} | {r['verdict']} | {q} | {_fmt(cmp[q]['rel'])} | "
                         f"{cmp[q]['worst']} |")
    return "\n".join(lines)


def main(argv=None) -> str:
    argv = sys.argv[1:] if argv is None else argv
    path = Path(argv[0]) if argv else RESULTS / "parity_cpu.json"
    text = summarise(load_results(path))
    print(text)
    return text


if __name__ == "__main__":
    main()
