"""Microbenchmarks of the fused boundary ops against the eager composition and torch.compile.

    python -m bench.kernels               # GPU: batch 128 and 1024, fp32 and bf16
    python -m bench.kernels --quick       # CPU-sized, as run in CI

Each op is timed forward (training mode, autograd recording) and forward+backward, on the
boundary shapes of the CIFAR ResNets, for every available fused backend, against:
``eager``, the same computation as ``nn`` modules (Conv1x1 -> BatchNorm2d -> ReLU ->
avgpool -> add, ...), which is what ``backend="torch"`` runs; and ``compile``, that eager
function under ``torch.compile``. The image-context op (``image_context``: E's second
half, Conv3x3(12->C) -> BN -> ReLU -> avgpool -> add) is also timed on the ``torch``
backend, whose batch-chunked recompute differs from the eager encoder. Times are medians (``triton.testing.do_bench`` on CUDA,
``perf_counter`` on CPU). Achieved bandwidth counts the bytes each op must move at the least
(every input read once, every output written once) and is compared with a measured
device-to-device copy. Writes ``bench/results/kernels_<device>.json``.
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Callable, Dict, List

import torch
import torch.nn.functional as F
from torch import nn

from contsup_fast.fused import available_backends, resolve_backend

from .common import environment, format_table, median_time, write_results


@dataclass
class Case:
    """One op on one shape. ``src`` is c or z (N, C_src, s*H, s*W); ``dst`` is h (N, C, H, W)."""

    op: str
    c_src: int
    c: int
    hw: int
    scale: int

    @property
    def label(self) -> str:
        return f"{self.op} {self.c_src}x{self.hw * self.scale}^2->{self.c}x{self.hw}^2"


# Boundary shapes of CIFAR ResNet-32/110 (stages of 16/32/64 channels at 32/16/8 pixels).
CASES = [
    Case("residual", 16, 16, 32, 1), Case("residual", 16, 32, 16, 2), Case("residual", 64, 64, 8, 1),
    Case("image_tail", 16, 16, 32, 1), Case("image_tail", 64, 64, 8, 4),
    Case("head_pool", 32, 32, 16, 1), Case("head_pool", 64, 64, 8, 1),
    Case("gap", 16, 16, 32, 1),
    Case("image_context", 12, 16, 32, 1), Case("image_context", 12, 32, 16, 2),
    Case("image_context", 12, 64, 8, 4),
]


class _Eager(nn.Module):
    """The eager composition of one op, from nn modules."""

    def __init__(self, case: Case):
        super().__init__()
        self.case = case
        self.conv = {"residual": lambda: nn.Conv2d(case.c_src, case.c, 1),
                     "image_context": lambda: nn.Conv2d(case.c_src, case.c, 3, padding=1)}.get(case.op, lambda: None)()
        self.bn = nn.BatchNorm2d(case.c) if case.op != "gap" else None

    def forward(self, src, h):
        op = self.case.op
        if op == "gap":
            return src.mean((2, 3))
        y = self.conv(src) if self.conv is not None else src
        z = F.relu(self.bn(y))
        if op == "head_pool":
            return z.mean((2, 3))
        return h + F.adaptive_avg_pool2d(z, h.shape[-2:])


def _fused(case: Case, eager: _Eager, backend) -> Callable:
    bn, conv = eager.bn, eager.conv
    if case.op == "residual":
        return lambda src, h: backend.residual_context(
            h, [src], [conv.weight], [conv.bias], [bn.weight], [bn.bias], [bn.running_mean],
            [bn.running_var], True, bn.eps)[0]
    if case.op == "image_tail":
        return lambda src, h: backend.image_context_tail(h, src, bn.weight, bn.bias, bn.running_mean,
                                                         bn.running_var, True, bn.eps)[0]
    if case.op == "image_context":
        return lambda src, h: backend.image_context(h, src, conv.weight, conv.bias, bn.weight, bn.bias,
                                                    bn.running_mean, bn.running_var, True, bn.eps)[0]
    if case.op == "head_pool":
        return lambda src, h: backend.bn_relu_gap(src, bn.weight, bn.bias, bn.running_mean, bn.running_var,
                                                  True, bn.eps)[0]
    return lambda src, h: backend.global_avg_pool(src)


def min_bytes(case: Case, n: int, itemsize: int, backward: bool) -> int:
    """Least bytes an op must move: inputs read once, outputs written once (forward; +backward)."""
    src = n * case.c_src * (case.hw * case.scale) ** 2 * itemsize
    dst = n * case.c * case.hw ** 2 * itemsize
    pooled = n * case.c * itemsize
    fwd = {"residual": src + 2 * dst, "image_tail": src + 2 * dst, "image_context": src + 2 * dst,
           "head_pool": src + pooled, "gap": src + pooled}[case.op]
    if not backward:
        return fwd
    # backward reads grad_out and the saved input; grad of z/h written where it exists
    bwd = {"residual": src + dst, "image_tail": 2 * src + dst, "image_context": 2 * src + dst,
           "head_pool": 2 * src + pooled, "gap": src + pooled}[case.op]
    return fwd + bwd


def _timer(device: torch.device, quick: bool) -> Callable[[Callable], float]:
    if device.type == "cuda":
        from triton.testing import do_bench
        return lambda fn: do_bench(fn, warmup=25, rep=100, return_mode="median") / 1e3
    return lambda fn: median_time(fn, device, warmup=1 if quick else 3, steps=3 if quick else 10)


def copy_bandwidth(device: torch.device, timer) -> float:
    """Bytes/s of a large device-to-device copy (bytes read + bytes written)."""
    n = (256 if device.type == "cuda" else 16) * 2**20 // 4
    src = torch.randn(n, device=device)
    dst = torch.empty_like(src)
    return 2 * src.numel() * 4 / timer(lambda: dst.copy_(src))


def bench_case(case: Case, n: int, dtype: torch.dtype, device: torch.device, backends: List[str],
               timer, compile_baseline: bool, copy_bw: float) -> List[dict]:
    g = torch.Generator(device="cpu").manual_seed(0)
    src = torch.randn(n, case.c_src, case.hw * case.scale, case.hw * case.scale, generator=g).to(device, dtype)
    h = torch.randn(n, case.c, case.hw, case.hw, generator=g).to(device, dtype)
    eager = _Eager(case).to(device)
    if case.op in ("image_tail", "image_context", "head_pool", "gap"):
        src.requires_grad_(True)
    impls: Dict[str, Callable] = {"eager": lambda s, hh: _autocast_call(eager, s, hh, dtype)}
    if compile_baseline:
        compiled = torch.compile(eager)
        impls["compile"] = lambda s, hh: _autocast_call(compiled, s, hh, dtype)
    # the torch backend's image-context op is a chunked recompute, not the eager composition
    extra = ["torch"] if case.op == "image_context" and "torch" not in backends else []
    for b in extra + backends:
        impls[b] = _fused(case, eager, resolve_backend(b, device))
    rows = []
    for impl, fn in impls.items():
        out = fn(src, h)
        grad = torch.randn_like(out)
        t_fwd = timer(lambda: fn(src, h))
        params = [p for p in eager.parameters()] + ([src] if src.requires_grad else [])

        def fwd_bwd():
            torch.autograd.grad(fn(src, h), params, grad)

        t_all = timer(fwd_bwd)
        itemsize = src.element_size()
        rows.append({
            "case": case.label, "batch": n, "dtype": str(dtype).replace("torch.", ""), "impl": impl,
            "fwd_us": t_fwd * 1e6, "fwd_bwd_us": t_all * 1e6,
            "fwd_GBs": min_bytes(case, n, itemsize, False) / t_fwd / 1e9,
            "fwd_vs_copy": min_bytes(case, n, itemsize, False) / t_fwd / copy_bw,
            "fwd_bwd_GBs": min_bytes(case, n, itemsize, True) / t_all / 1e9,
        })
    base = {r["impl"]: r for r in rows}
    for r in rows:
        r["fwd_bwd_speedup_vs_eager"] = base["eager"]["fwd_bwd_us"] / r["fwd_bwd_us"]
        r["fwd_bwd_speedup_vs_compile"] = (base["compile"]["fwd_bwd_us"] / r["fwd_bwd_us"]
                                           if "compile" in base else None)
    return rows


def _autocast_call(module, src, h, dtype):
    # the eager composition sees low-precision activations with fp32 parameters, as under autocast
    with torch.autocast(src.device.type, dtype=dtype, enabled=dtype != torch.float32):
        return module(src, h)


def main(argv=None) -> List[dict]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="small CPU-sized run")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batches", nargs="+", type=int, default=None)
    p.add_argument("--dtypes", nargs="+", default=None, choices=["fp32", "bf16", "fp16"])
    p.add_argument("--backends", nargs="+", default=None)
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None)
    p.add_argument("--ops", nargs="+", default=None,
                   choices=sorted({c.op for c in CASES}), help="only these ops, every shape (default: all)")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    device = torch.device(args.device)
    cpu = device.type == "cpu"
    batches = args.batches or ([8] if args.quick else ([32] if cpu else [128, 1024]))
    dtypes = args.dtypes or (["fp32"] if args.quick else ["fp32", "bf16"])
    backends = args.backends or [b for b in available_backends(device) if b != "torch"]
    compile_baseline = (not args.quick) if args.compile is None else args.compile
    timer = _timer(device, args.quick)
    copy_bw = copy_bandwidth(device, timer)
    cases = CASES[:1] + CASES[3:4] + CASES[5:6] + CASES[7:9] if args.quick else CASES
    if args.ops:
        cases = [c for c in CASES if c.op in args.ops]
    settings = dict(batches=batches, dtypes=dtypes, backends=backends, compile=compile_baseline,
                    quick=args.quick, copy_GBs=copy_bw / 1e9)
    print(f"settings: {settings}", flush=True)
    dt = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    rows: List[dict] = []
    for n in batches:
        for d in dtypes:
            for case in cases:
                rows += bench_case(case, n, dt[d], device, backends, timer, compile_baseline, copy_bw)
    cols = ["case", "batch", "dtype", "impl", "fwd_us", "fwd_bwd_us", "fwd_GBs", "fwd_vs_copy",
            "fwd_bwd_speedup_vs_eager", "fwd_bwd_speedup_vs_compile"]
    print(format_table(rows, cols))
    print(f"device-to-device copy: {copy_bw / 1e9:.1f} GB/s (read + write)")
    tag = f"kernels_{device.type}" + ("_quick" if args.quick else "")
    path = write_results(tag, "kernels", environment(device), settings, rows, args.out)
    print(f"wrote {path}")
    return rows


if __name__ == "__main__":
    main()
