"""Benchmark of the fused image-context op against the eager image encoder tail.

Times ``forward + backward`` of E's second half at one boundary,
``out = h + avgpool_s(relu(bn(conv3x3(u))))`` (ContSup, arXiv 2312.07636, Fig. 3 "E"),
for the resnet32 boundaries (u: (B, 12, 32, 32); C = 16, 32, 64 at 32x32, 16x16, 8x8):

* ``eager``: ``nn.Conv2d(12, C, 3, padding=1)`` -> ``nn.BatchNorm2d`` -> ReLU ->
  ``adaptive_avg_pool2d`` -> ``+ h`` (what the torch backend computes today);
* ``native``: ``contsup_fast._native.image_context`` (never materialises the
  (B, C, 32, 32) convolution output).

and measures the peak of live allocated bytes of one forward + backward from the
profiler's allocator events (``torch.profiler``, ``profile_memory=True``; on CUDA
``torch.cuda.max_memory_allocated`` after a reset), counting everything allocated during
the step (inputs and parameters allocated before it are excluded).

Command::

    python -m bench.image_context [--device cpu|cuda] [--batch 32] [--dtype float32]
                                  [--steps 10] [--threads T] [--out DIR]

Prints a table and writes ``bench/results/image_context_<device>_<dtype>[_t<threads>].json`` (environment,
settings, per-case times and peaks, ratios eager / native from the same run).
"""
from __future__ import annotations

import argparse
import sys
from typing import Callable, Dict, List, Optional

import torch
import torch.nn.functional as F
from torch import nn

from bench.common import environment, format_table, median_time, write_results

# (C, target H = W) of resnet32's three stages; u is always (B, 12, 32, 32)
CASES = [(16, 32), (32, 16), (64, 8)]
C_IN, IMAGE = 12, 32


def _peak_bytes(fn: Callable[[], object], device: torch.device) -> int:
    """Peak of live bytes allocated during fn(): allocator events of the profiler (CPU),
    max_memory_allocated minus the bytes allocated before (CUDA)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - base
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns())
    live = peak = 0
    for e in events:
        live += e.nbytes()
        peak = max(peak, live)
    return peak


def _case(C: int, size: int, batch: int, device: torch.device, dtype: torch.dtype, steps: int) -> Dict[str, object]:
    from contsup_fast import _native as nat

    torch.manual_seed(0)
    s = IMAGE // size
    conv = nn.Conv2d(C_IN, C, 3, padding=1).to(device)
    bn = nn.BatchNorm2d(C).to(device)
    h = torch.randn(batch, C, size, size, device=device, dtype=dtype)
    u = torch.randn(batch, C_IN, IMAGE, IMAGE, device=device, dtype=dtype).relu().requires_grad_()
    grad = torch.randn_like(h)

    def eager():
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            z = F.relu(bn(conv(u)))
            out = h + F.adaptive_avg_pool2d(z, (size, size))
        out.backward(grad)

    def native():
        out, _, _ = nat.image_context(h, u, conv.weight, conv.bias, bn.weight, bn.bias, bn.running_mean,
                                      bn.running_var, True, bn.eps)
        out.backward(grad)

    row: Dict[str, object] = {"C": C, "target": f"{size}x{size}", "s": s}
    for name, fn in (("eager", eager), ("native", native)):
        row[f"{name}_ms"] = median_time(fn, device, warmup=2, steps=steps) * 1e3
        row[f"{name}_peak_MiB"] = _peak_bytes(fn, device) / 2 ** 20
    row["speedup"] = row["eager_ms"] / row["native_ms"]
    row["peak_ratio"] = row["native_peak_MiB"] / row["eager_peak_MiB"]
    # bytes of the full-resolution conv output the eager path allocates (and its gradient)
    row["z_MiB"] = batch * C * IMAGE * IMAGE * torch.tensor([], dtype=dtype).element_size() / 2 ** 20
    return row


def main(argv: Optional[List[str]] = None) -> List[Dict[str, object]]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--steps", type=int, default=10, help="timed repetitions (median)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: unchanged)")
    p.add_argument("--out", default=None, help="directory for the JSON (default bench/results)")
    args = p.parse_args(argv)
    if args.threads is not None:
        if args.threads < 1:
            p.exit(2, f"bench.image_context: --threads must be >= 1, got {args.threads}\n")
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        p.exit(2, "bench.image_context: --device cuda but no CUDA GPU is visible\n")
    from contsup_fast import _native as nat

    ok, why = nat.is_available()
    if not ok or not nat.supports_device(device):
        p.exit(2, f"bench.image_context: the native backend cannot run on {device}: {why}\n")
    dtype = getattr(torch, args.dtype)
    rows = [_case(C, size, args.batch, device, dtype, args.steps) for C, size in CASES]
    cols = ["C", "target", "s", "eager_ms", "native_ms", "speedup", "eager_peak_MiB", "native_peak_MiB",
            "peak_ratio", "z_MiB"]
    print(format_table(rows, cols))
    suffix = f"_t{torch.get_num_threads()}" if device.type == "cpu" else ""
    path = write_results(
        f"image_context_{device.type}_{args.dtype}{suffix}", "image_context", environment(device),
        {"threads": torch.get_num_threads(), "batch": args.batch, "dtype": args.dtype, "steps": args.steps, "C_in": C_IN,
         "image": IMAGE, "op": "h + avgpool_s(relu(bn(conv3x3(u))))", "pass": "forward+backward"},
        rows, args.out)
    print(f"wrote {path}")
    return rows


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
