"""One training step through every native boundary op, small enough for compute-sanitizer.

    compute-sanitizer --tool memcheck  python scripts/gpuval_sanitize_step.py
    compute-sanitizer --tool racecheck python scripts/gpuval_sanitize_step.py --ops-only
    python scripts/gpuval_sanitize_step.py --device cpu      # the same calls on the CPU kernels

For every activation dtype (fp32, bf16, fp16) and memory format (contiguous, channels_last):

* each op of ``backend="native"`` (:mod:`contsup_fast._native`) directly, forward and backward,
  in training and eval mode: ``residual_context`` with two context terms (pooling factors 1
  and 2), ``image_context_tail`` (factor 2), ``bn_relu_gap``, ``global_avg_pool``, and
  ``image_context`` when the backend has it;
* one ``LocalSequential`` training step (a four-block CNN, K=4, R2E context, 1c2f heads: residual
  context, image context, head pooling) and one with 0c1f heads (global average pooling),
  under autocast for the half dtypes (fp16 with a ``GradScaler``).

Every result is checked to be finite (a sanitizer finds bad accesses; this finds garbage).
Prints one line per configuration and ``sanitize step ok: N configurations``; exit 1 otherwise.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the checkout this script sits in
from contsup_fast import LocalSequential  # noqa: E402
from contsup_fast.fused import resolve_backend  # noqa: E402
from torch import nn  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _bn(C, device):
    return [torch.rand(C, device=device) + 0.5, torch.randn(C, device=device),
            torch.randn(C, device=device), torch.rand(C, device=device) + 0.5]


def _fmt(t, cl):
    return t.contiguous(memory_format=torch.channels_last) if cl else t.contiguous()


def _finite(*ts):
    for t in ts:
        if t is not None and not torch.isfinite(t.float()).all():
            raise RuntimeError("non-finite value in a result")


def direct_ops(backend, device, dtype, cl):
    """Every op of ``backend`` once forward and backward (training) and forward (eval)."""
    N, C, H = 3, 8, 5
    r = lambda *s: _fmt(torch.randn(*s, device=device, dtype=dtype), cl)  # noqa: E731
    h = r(N, C, H, H)
    for training in (True, False):
        ctx = [r(N, 6, H, H), r(N, 4, 2 * H, 2 * H)]
        w = [torch.randn(C, 6, 1, 1, device=device, requires_grad=True),
             torch.randn(C, 4, 1, 1, device=device, requires_grad=True)]
        b = [torch.randn(C, device=device, requires_grad=True) for _ in ctx]
        bns = [_bn(C, device) for _ in ctx]
        for p in bns:
            p[0].requires_grad_(True), p[1].requires_grad_(True)
        out, _, _ = backend.residual_context(h, ctx, w, b, [p[0] for p in bns], [p[1] for p in bns],
                                             [p[2] for p in bns], [p[3] for p in bns], training, 1e-5)
        out.float().square().sum().backward()
        _finite(out, *[t.grad for t in w + b])
        z = r(N, C, 2 * H, 2 * H).requires_grad_(True)
        g, beta, rm, rv = _bn(C, device)
        g.requires_grad_(True)
        out, _, _ = backend.image_context_tail(h, z, g, beta, rm, rv, training, 1e-5)
        out.float().square().sum().backward()
        _finite(out, z.grad, g.grad)
        if getattr(backend, "image_context", None) is not None:
            u = r(N, 4, 2 * H, 2 * H).requires_grad_(True)
            wc = torch.randn(C, 4, 3, 3, device=device, requires_grad=True)
            bc = torch.randn(C, device=device, requires_grad=True)
            out, _, _ = backend.image_context(h, u, wc, bc, g, beta, rm, rv, training, 1e-5)
            out.float().square().sum().backward()
            _finite(out, u.grad, wc.grad)
        z2 = r(N, C, H, H).requires_grad_(True)
        pooled, _, _ = backend.bn_relu_gap(z2, g, beta, rm, rv, training, 1e-5)
        pooled.float().square().sum().backward()
        _finite(pooled, z2.grad)
        h2 = r(N, C, H, H).requires_grad_(True)
        pooled = backend.global_avg_pool(h2)
        pooled.float().square().sum().backward()
        _finite(pooled, h2.grad)


def tiny_cnn() -> nn.Sequential:
    """Four conv-BN-ReLU blocks (8, 8, 16, 16 channels; the third with stride 2) and a linear
    classifier: the smallest network whose boundaries need every context path (pooling 1 and 2)."""
    def block(cin, cout, stride=1):
        return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU())

    return nn.Sequential(block(3, 8), block(8, 8), block(8, 16, 2), block(16, 16),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10))


def training_steps(device, dtype, cl):
    """A LocalSequential training step with 1c2f heads (R2E) and one with 0c1f heads (R1)."""
    fmt = torch.channels_last if cl else torch.contiguous_format
    for context, aux in (("R2E", "1c2f"), ("R1", "0c1f")):
        torch.manual_seed(0)
        local = LocalSequential(tiny_cnn(), K=4, context=context, aux=aux, backend="native", input_size=(3, 16, 16))
        local = local.to(device, memory_format=fmt)
        x = torch.randn(4, 3, 16, 16, device=device).contiguous(memory_format=fmt)
        y = torch.randint(0, 10, (4,), device=device)
        scaler = torch.amp.GradScaler(device.type) if dtype == torch.float16 else None
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            out = local(x, y, scaler=scaler)
        _finite(out.local_losses, *[p.grad for p in local.parameters() if p.grad is not None])
        local.eval()
        with torch.no_grad(), torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            _finite(local(x))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=list(DTYPES))
    p.add_argument("--ops-only", action="store_true",
                   help="only the direct op calls, no LocalSequential step (racecheck: the native "
                        "kernels' shared memory, without cuDNN's convolutions)")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    try:
        backend = resolve_backend("native", device)
    except RuntimeError as exc:
        print(f"sanitize step: {exc}", file=sys.stderr)
        return 1
    n = 0
    for name in args.dtypes:
        for cl in (False, True):
            label = f"{name} {'channels_last' if cl else 'contiguous'}"
            try:
                direct_ops(backend, device, DTYPES[name], cl)
                if not args.ops_only:
                    training_steps(device, DTYPES[name], cl)
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
            except Exception as exc:  # any failure fails the run, with its configuration
                print(f"sanitize step FAILED {label}: {type(exc).__name__}: {exc}", flush=True)
                return 1
            n += 1
            print(f"sanitize step {label}: ok", flush=True)
    print(f"sanitize step ok: {n} configurations on {device}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
