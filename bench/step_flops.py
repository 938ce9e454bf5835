"""FLOPs of one training step, counted with ``torch.utils.flop_counter.FlopCounterMode``.

    python -m bench.step_flops --model resnet32 --K 16 --contexts R0 R1E --backends torch native

Counts the matrix-multiply and convolution FLOPs (forward, backward and every recompute) of
one ``LocalSequential`` training step (and E2E), as ``FlopCounterMode`` does: ATen
convolutions and matmuls, which is where a step's FLOPs are; element-wise work and custom
ops (the ``native``/``triton`` kernels) count 0, so add a fused kernel's own count where it
does matrix work. Prints a table with the convolution GFLOPs and the ratio to E2E; ``--json``
writes it under ``bench/results/``.
"""
from __future__ import annotations

import argparse
from typing import List

import torch
from torch.utils.flop_counter import FlopCounterMode

from contsup_fast import LocalSequential
from contsup_fast.models import build_model

from .common import environment, format_table, write_results


def step_flops(model: str, K: int, context: str, backend: str, batch: int) -> int:
    """FLOPs of one training step ``local(x, y)`` (batch of 32x32 images)."""
    torch.manual_seed(0)
    local = LocalSequential(build_model(model), K=K, context=context, backend=backend)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(batch, 3, 32, 32, generator=g), torch.randint(0, 10, (batch,), generator=g)
    with FlopCounterMode(display=False) as counter:
        local(x, y)
    return counter.get_total_flops()


def main(argv=None) -> List[dict]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="resnet32")
    p.add_argument("--K", type=int, default=16)
    p.add_argument("--contexts", nargs="+", default=["R0", "R1E"])
    p.add_argument("--backends", nargs="+", default=["torch"])
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--json", default=None, help="write the rows under bench/results/<name>.json")
    args = p.parse_args(argv)
    try:
        e2e = step_flops(args.model, 1, "R0", "torch", args.batch)
        rows = [{"model": args.model, "K": 1, "context": "E2E", "backend": "-", "GFLOP": e2e / 1e9, "vs_E2E": 1.0}]
        for ctx in args.contexts:
            for b in args.backends:
                f = step_flops(args.model, args.K, ctx, b, args.batch)
                rows.append({"model": args.model, "K": args.K, "context": ctx, "backend": b,
                             "GFLOP": f / 1e9, "vs_E2E": f / e2e})
    except (ValueError, RuntimeError) as exc:
        p.exit(2, f"error: {exc}\n")
    print(format_table(rows, ["model", "K", "context", "backend", "GFLOP", "vs_E2E"]))
    print(f"batch {args.batch}; FlopCounterMode: ATen convolutions and matmuls, forward + backward + recomputes")
    if args.json:
        write_results(args.json, "step_flops", environment(torch.device("cpu")), vars(args), rows)
    return rows


if __name__ == "__main__":
    main()
