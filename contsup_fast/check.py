"""``contsup-check`` (``python -m contsup_fast.check``): is this installation computing right, and fast?

Prints the environment (Python, torch and its CUDA, Triton, the compiled extension
``contsup_fast._C`` and the GPU architectures its CUDA kernels were built for, the device),
then, for the current device, checks every available boundary-op backend (``torch``,
``triton``, ``native``; see :mod:`contsup_fast.fused`) against the plain-PyTorch
specification :mod:`contsup_fast.fused.reference` evaluated in float64 on the same random
inputs, on one boundary of each kind:

* ``residual``      ``residual_context``   (R terms: conv1x1 -> BN -> ReLU -> avgpool -> add)
* ``image_tail``    ``image_context_tail`` (tail of the image context encoder E)
* ``image_context`` ``image_context``      (conv3x3 -> BN -> ReLU -> pool -> add; only for
                    backends that have it, looked up by name)
* ``head_pool``     ``bn_relu_gap``        (auxiliary-head pooling)
* ``gap``           ``global_avg_pool``

Forward outputs, returned batch statistics and the gradients of every differentiable input
are compared in fp32 and bf16 (bf16 activations with fp32 parameters under ``torch.autocast``,
as in training) by the relative error ``||out - ref|| / ||ref||`` against a per-dtype
tolerance (:data:`TOLERANCE`). Each backend is then timed once (forward + backward of all the
ops, median of a few runs) against the eager composition (``backend="torch"``) and the ratio
printed. One verdict line per backend: ``ok``, ``slower than eager``, ``WRONG`` or
``unavailable`` with the reason. Exit status 1 when any backend computes wrong results, else 0.

Runs in under a minute on a 2-core CPU and on a GPU. On CPU the Triton backend runs only in
Triton's interpreter, which must be chosen before Triton is imported: set
``TRITON_INTERPRET=1`` in the environment (its results are then checked, not timed), else it
is reported unavailable with that reason.
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import struct
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from .fused import reference as ref

__all__ = ["TOLERANCE", "OPS", "fatbin_architectures", "extension_info", "environment",
           "check_backend", "check_op", "BackendReport", "run_checks", "main", "cli"]

# relative error ||out - ref|| / ||ref|| against the float64 reference, per activation dtype.
# fp32 arithmetic lands far under 1e-4 (measured: <= 2.4e-6 for every op and backend).
# bf16 (8-bit mantissa, eps 7.8e-3) rounding of inputs and outputs gives a few 1e-3 in the
# outputs; the conv weight gradient of the residual term is a difference of two sums (the
# BatchNorm after the conv removes the mean), where the eager composition itself lands at
# 2e-2..4e-2 on a 2-core CPU. A wrong kernel gives errors of order 1.
TOLERANCE = {torch.float32: {"out": 1e-4, "grad": 1e-3},
             torch.bfloat16: {"out": 2e-2, "grad": 1e-1}}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
OPS = ("residual", "image_tail", "image_context", "head_pool", "gap")
# reference (specification) function of each op and the backend attribute implementing it
_OP_ATTR = {"residual": "residual_context", "image_tail": "image_context_tail",
            "image_context": "image_context", "head_pool": "bn_relu_gap", "gap": "global_avg_pool"}
_REF = {"residual": ref.residual_context_ref, "image_tail": ref.image_context_tail_ref,
        "image_context": getattr(ref, "image_context_ref", None), "head_pool": ref.bn_relu_gap_ref,
        "gap": ref.global_avg_pool_ref}


# --------------------------------------------------------------------------------- environment
def fatbin_architectures(path: str) -> List[str]:
    """GPU architectures embedded in the CUDA fat binary of a shared library.

    Reads the ELF section ``.nv_fatbin`` and the entry headers of each fat-binary container
    (magic ``0xBA55ED50``; entry kind 2 = machine code ``sm_XY``, kind 1 = PTX ``compute_XY``,
    architecture number at byte 28 of the entry header). Returns e.g.
    ``["sm_80", "sm_90", "compute_90"]``; ``[]`` when the file holds no CUDA code.

    Raises:
        ValueError: ``path`` is not a 64-bit little-endian ELF file.
    """
    with open(path, "rb") as f:
        data = f.read()
    if data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        raise ValueError(f"path must be a 64-bit little-endian ELF file, got {path!r}")
    shoff, = struct.unpack_from("<Q", data, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", data, 0x3A)
    sections = [struct.unpack_from("<IIQQQQ", data, shoff + i * shentsize) for i in range(shnum)]
    strtab_off = sections[shstrndx][4]

    def name(sec):
        start = strtab_off + sec[0]
        return data[start:data.index(b"\0", start)].decode()

    archs: List[str] = []
    for sec in sections:
        if name(sec) != ".nv_fatbin":
            continue
        pos, end = sec[4], sec[4] + sec[5]
        while pos + 16 <= end:
            magic, _ver, hsize, fsize = struct.unpack_from("<IHHQ", data, pos)
            if magic != 0xBA55ED50:
                pos += 8  # containers are 8-byte aligned
                continue
            entry, last = pos + hsize, pos + hsize + fsize
            while entry + 32 <= last:
                kind, _flags, ehsize, payload = struct.unpack_from("<HHIQ", data, entry)
                arch, = struct.unpack_from("<I", data, entry + 28)
                tag = {1: "compute", 2: "sm"}.get(kind)
                if tag and f"{tag}_{arch}" not in archs:
                    archs.append(f"{tag}_{arch}")
                if ehsize == 0:
                    break
                entry += ehsize + payload
            pos = last
    return archs


def extension_info() -> Dict[str, object]:
    """State of the compiled extension ``contsup_fast._C``: loaded or why not, its file, whether
    CUDA kernels were compiled in, and the architectures of its fat binary."""
    from . import _native

    ok, why = _native.is_available()
    info: Dict[str, object] = {"loaded": ok, "detail": why}
    if not ok:
        return info
    ext = _native._ext
    info["path"] = getattr(ext, "__file__", None)
    info["with_cuda"] = bool(getattr(ext, "with_cuda", 0))
    if info["with_cuda"] and info["path"]:
        try:
            info["archs"] = fatbin_architectures(info["path"])
        except (OSError, ValueError, struct.error) as exc:
            info["archs"] = f"unreadable ({exc})"
    return info


def environment(device: torch.device) -> Dict[str, object]:
    """Python, torch (+ its CUDA), Triton, the extension and the device, as a dict."""
    env: Dict[str, object] = {"python": platform.python_version(), "torch": torch.__version__,
                              "torch_cuda": torch.version.cuda, "device": str(device)}
    try:
        import triton
        env["triton"] = triton.__version__
    except Exception as exc:  # ImportError, or a broken install
        env["triton"] = f"not importable ({type(exc).__name__}: {exc})"
    env["TRITON_INTERPRET"] = os.environ.get("TRITON_INTERPRET", "")
    env["extension"] = extension_info()
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env["device_name"] = props.name
        env["capability"] = f"sm_{props.major}{props.minor}"
        env["multiprocessors"] = props.multi_processor_count
        env["memory_GiB"] = round(props.total_memory / 2**30, 1)
        env["torch_arch_list"] = torch.cuda.get_arch_list()
    else:
        env["device_name"] = f"CPU {platform.machine()} ({os.cpu_count()} cores, {torch.get_num_threads()} threads)"
    return env


def _format_environment(env: Dict[str, object]) -> List[str]:
    ext = env["extension"]
    if not ext["loaded"]:
        ext_line = f"not loaded: {ext['detail']}"
    else:
        kinds = "CPU+CUDA kernels" if ext.get("with_cuda") else "CPU kernels only"
        archs = ext.get("archs")
        arch_txt = f", built for {' '.join(archs) if isinstance(archs, list) else archs}" if archs else ""
        ext_line = f"{kinds}{arch_txt} ({ext.get('path')})"
    lines = [f"python        {env['python']}",
             f"torch         {env['torch']} (CUDA {env['torch_cuda'] or 'none'})",
             f"triton        {env['triton']}" + (f" (TRITON_INTERPRET={env['TRITON_INTERPRET']})"
                                                  if env["TRITON_INTERPRET"] else ""),
             f"extension     {ext_line}",
             f"device        {env['device']}: {env['device_name']}"]
    if "capability" in env:
        lines[-1] += (f", {env['capability']}, {env['multiprocessors']} SMs, {env['memory_GiB']} GiB; "
                      f"torch built for {' '.join(env['torch_arch_list'])}")
    return lines


# --------------------------------------------------------------------------------- one op case
@dataclass
class _Case:
    """Random fp64 inputs of one op: ``args`` positional arguments (tensors, lists of tensors,
    flags), ``diff`` the indices (or (index, item)) of the arguments that receive gradient,
    ``acts`` those that are activations (cast to the checked dtype; the rest stay fp32)."""

    args: list
    diff: List[Tuple[int, Optional[int]]]
    acts: List[Tuple[int, Optional[int]]] = field(default_factory=list)


def _bn(C: int, g: torch.Generator) -> list:
    return [torch.rand(C, generator=g, dtype=torch.float64) + 0.5,
            torch.randn(C, generator=g, dtype=torch.float64) * 0.5,
            torch.randn(C, generator=g, dtype=torch.float64) * 0.5,
            torch.rand(C, generator=g, dtype=torch.float64) + 0.5]


def _make_case(op: str, N: int, C: int, H: int, g: torch.Generator) -> _Case:
    """Inputs of ``op`` at a boundary of C channels and H x H pixels (source at 2H for the
    pooled terms, so the avgpool path is exercised), batch N, training mode."""
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    h = r(N, C, H, H)
    if op == "residual":
        Cr = C // 2 + 1
        bn = _bn(C, g)
        args = [h, [r(N, Cr, 2 * H, 2 * H)], [r(C, Cr, 1, 1) / Cr ** 0.5], [r(C) * 0.1],
                [bn[0]], [bn[1]], [bn[2]], [bn[3]], True, 1e-5]
        return _Case(args, diff=[(2, 0), (3, 0), (4, 0), (5, 0)], acts=[(0, None), (1, 0)])
    if op == "image_tail":
        return _Case([h, r(N, C, 2 * H, 2 * H), *_bn(C, g), True, 1e-5], diff=[(1, None), (2, None), (3, None)],
                     acts=[(0, None), (1, None)])
    if op == "image_context":
        Ci = max(C // 2, 3)
        return _Case([h, r(N, Ci, 2 * H, 2 * H), r(C, Ci, 3, 3) / (3 * Ci ** 0.5), r(C) * 0.1, *_bn(C, g), True, 1e-5],
                     diff=[(1, None), (2, None), (3, None), (4, None), (5, None)], acts=[(0, None), (1, None)])
    if op == "head_pool":
        return _Case([r(N, C, H, H), *_bn(C, g), True, 1e-5], diff=[(0, None), (1, None), (2, None)],
                     acts=[(0, None)])
    if op == "gap":
        return _Case([h], diff=[(0, None)], acts=[(0, None)])
    raise ValueError(f"op must be one of {OPS}, got {op!r}")


def _get(args, where):
    i, j = where
    return args[i] if j is None else args[i][j]


def _materialise(case: _Case, dtype: torch.dtype, device: torch.device, channels_last: bool):
    """Copies of the case's inputs: activations in ``dtype`` (channels_last when asked),
    parameters fp32 (fp64 when dtype is fp64); differentiable ones as fresh leaves."""
    acts = set(case.acts)
    param_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    out = []
    for i, a in enumerate(case.args):
        items = a if isinstance(a, list) else [a]
        conv = []
        for j, t in enumerate(items):
            if isinstance(t, Tensor):
                where = (i, j if isinstance(a, list) else None)
                t = t.to(device, dtype if where in acts else param_dtype)
                if channels_last and t.dim() == 4:
                    t = t.contiguous(memory_format=torch.channels_last)
                if where in case.diff:
                    t = t.detach().clone().requires_grad_(True)
            conv.append(t)
        out.append(conv if isinstance(a, list) else conv[0])
    return out


def _run(fn: Callable, args: list, diff, grad_seed: int, dtype: torch.dtype, device: torch.device,
         grad_out: Optional[Tensor] = None):
    """Forward under autocast for half dtypes, then backward of ``grad_out`` (default: a
    random one drawn from ``grad_seed``, the same for every implementation).
    Returns (outputs as a flat list of tensors, gradients of the ``diff`` inputs)."""
    with torch.autocast(device.type, dtype=dtype, enabled=dtype not in (torch.float32, torch.float64)):
        res = fn(*args)
    outs = [res] if isinstance(res, Tensor) else [t for x in res for t in (x if isinstance(x, (list, tuple)) else [x])]
    main = outs[0]
    if grad_out is None:
        g = torch.Generator().manual_seed(grad_seed)
        grad_out = torch.randn(main.shape, generator=g, dtype=torch.float64).to(device, main.dtype)
    leaves = [_get(args, w) for w in diff]
    grads = torch.autograd.grad(main, leaves, grad_out, allow_unused=True)
    return [o.detach() for o in outs], [None if gr is None else gr.detach() for gr in grads]


def _rel(a: Optional[Tensor], b: Optional[Tensor], floor: float = 0.0) -> float:
    """``||a - b|| / max(||b||, floor)``; ``inf`` for a shape mismatch, a missing tensor or a
    non-finite value."""
    if a is None or b is None:
        return 0.0 if a is None and b is None else float("inf")
    if a.shape != b.shape:
        return float("inf")
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    if not torch.isfinite(a).all():
        return float("inf")
    return ((a - b).norm() / max(b.norm().item(), floor, 1e-12)).item()


def check_op(fn: Callable, op: str, dtype: torch.dtype, device: torch.device, seed: int = 0,
             channels_last: bool = False, shape: Tuple[int, int, int] = (4, 8, 6)) -> Dict[str, float]:
    """Relative errors of ``fn`` (an implementation of ``op``) against the float64 reference.

    Args:
        fn: callable with the signature of the op's reference function.
        op: one of :data:`OPS`.
        dtype: activation dtype (fp32 or bf16; parameters stay fp32).
        shape: (N, C, H) of the boundary.

    Returns:
        ``{"out": max relative error of the outputs (result and statistics), "grad": max over
        the gradients}``; ``inf`` for a wrong shape, a missing gradient or a non-finite value.
    """
    N, C, H = shape
    case = _make_case(op, N, C, H, torch.Generator().manual_seed(seed))
    want_out, want_grad = _run(_REF[op], _materialise(case, torch.float64, torch.device("cpu"), False),
                               case.diff, seed + 1, torch.float64, torch.device("cpu"))
    got_out, got_grad = _run(fn, _materialise(case, dtype, device, channels_last), case.diff, seed + 1,
                             dtype, device)
    if len(got_out) != len(want_out):
        return {"out": float("inf"), "grad": float("inf")}
    # A gradient that is ~0 by construction (the conv bias before a training-mode BatchNorm,
    # which cancels it) is measured against a tenth of the largest gradient of the case.
    floor = 0.1 * max((b.norm().item() for b in want_grad if b is not None), default=0.0)
    return {"out": max(_rel(a, b) for a, b in zip(got_out, want_out)),
            "grad": max(_rel(a, b, floor) for a, b in zip(got_grad, want_grad))}


# --------------------------------------------------------------------------------- backends
@dataclass
class BackendReport:
    """What :func:`check_backend` found for one backend on one device."""

    name: str
    available: bool
    reason: str = ""
    errors: Dict[str, Dict[str, float]] = field(default_factory=dict)  # "op dtype layout" -> errors
    failures: List[str] = field(default_factory=list)
    skipped_ops: List[str] = field(default_factory=list)
    seconds: Optional[float] = None
    eager_seconds: Optional[float] = None
    not_timed: str = "timing not asked for"

    @property
    def wrong(self) -> bool:
        return bool(self.failures)

    @property
    def speedup(self) -> Optional[float]:
        if self.seconds is None or self.eager_seconds is None:
            return None
        return self.eager_seconds / self.seconds

    def verdict(self) -> str:
        """One line: ``ok``, ``slower than eager``, ``WRONG`` or ``unavailable`` with the reason."""
        if not self.available:
            return f"{self.name:7s} unavailable: {self.reason}"
        worst = max((e for errs in self.errors.values() for e in errs.values()), default=0.0)
        checked = f"{len(self.errors)} checks, worst rel. error {worst:.1e}"
        if self.skipped_ops:
            checked += f"; no {', '.join(self.skipped_ops)} op"
        if self.wrong:
            return f"{self.name:7s} WRONG: {'; '.join(self.failures[:4])}" + (
                f" (+{len(self.failures) - 4} more)" if len(self.failures) > 4 else "")
        speed = self.speedup
        if speed is None:
            return f"{self.name:7s} ok ({checked}; not timed: {self.not_timed})"
        if self.name == "torch":
            return f"{self.name:7s} ok (the eager reference; {checked}; {self.seconds * 1e3:.2f} ms)"
        word = "ok" if speed >= 1.0 else "slower than eager"
        return f"{self.name:7s} {word}: {speed:.2f}x eager ({self.seconds * 1e3:.2f} vs {self.eager_seconds * 1e3:.2f} ms; {checked})"


def _backend(name: str, device: torch.device):
    """(backend object or None, reason)."""
    from .fused import resolve_backend

    if name == "triton" and device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        return None, "no CUDA device; on CPU Triton runs only in its interpreter (set TRITON_INTERPRET=1 before starting)"
    try:
        return resolve_backend(name, device), ""
    except (RuntimeError, ValueError) as exc:
        return None, str(exc)


def _op_fn(backend, op: str) -> Optional[Callable]:
    fn = getattr(backend, _OP_ATTR[op], None)
    if fn is None and backend.name == "torch":
        fn = _REF[op]
    return fn


def _timing_inputs(device: torch.device, dtype: torch.dtype, shape: Tuple[int, int, int]):
    """Per op: (case, inputs on ``device``, grad_out on ``device``), made once, outside any timing."""
    cases = {}
    g = torch.Generator().manual_seed(123)
    for op in OPS:
        case = _make_case(op, *shape, g)
        args = _materialise(case, dtype, device, device.type == "cuda")
        out, _ = _run(_REF[op], args, case.diff, 7, dtype, device) if _REF[op] is not None else ([None], None)
        grad_out = None if out[0] is None else torch.randn_like(out[0])
        cases[op] = (case, args, grad_out)
    return cases


def _time_ops(backends: Sequence, ops: Sequence[str], cases, dtype: torch.dtype, device: torch.device,
              reps: int, warmup: bool = True) -> List[float]:
    """Median seconds of forward + backward of ``ops`` (one call each) for each of ``backends``,
    timed in alternation (so a busy machine slows all of them alike)."""
    def once(backend):
        for op in ops:
            case, args, grad_out = cases[op]
            _run(_op_fn(backend, op), args, case.diff, 7, dtype, device, grad_out)

    if warmup:
        for b in backends:
            once(b)  # compilation, autotuning, handle creation
    times: List[List[float]] = [[] for _ in backends]
    for _ in range(reps):
        for i, b in enumerate(backends):
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            t0 = time.perf_counter()
            once(b)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            times[i].append(time.perf_counter() - t0)
    return [statistics.median(t) for t in times]


def check_backend(name: str, device: torch.device, dtypes: Sequence[torch.dtype] = (torch.float32, torch.bfloat16),
                  layouts: Sequence[bool] = (False, True)) -> BackendReport:
    """Check one backend on ``device``: every op it has, every dtype and layout (False:
    contiguous, True: channels_last), forward and backward, against the float64 reference."""
    backend, why = _backend(name, device)
    if backend is None:
        return BackendReport(name, False, why)
    rep = BackendReport(name, True)
    for op in OPS:
        fn = _op_fn(backend, op)
        if fn is None or _REF[op] is None:
            rep.skipped_ops.append(op)
            continue
        for dtype in dtypes:
            tol = TOLERANCE[dtype]
            for cl in layouts:
                key = f"{op} {str(dtype).replace('torch.', '')} {'channels_last' if cl else 'contiguous'}"
                try:
                    errs = check_op(fn, op, dtype, device, seed=len(rep.errors), channels_last=cl)
                except Exception as exc:  # a crash in a backend is a wrong result, reported
                    rep.errors[key] = {"out": float("inf"), "grad": float("inf")}
                    rep.failures.append(f"{key}: raised {type(exc).__name__}: {str(exc).splitlines()[0][:120]}")
                    continue
                rep.errors[key] = errs
                for what in ("out", "grad"):
                    if not errs[what] <= tol[what]:
                        rep.failures.append(f"{key} {what}: rel. error {errs[what]:.2e} > {tol[what]:.0e}")
    return rep


def run_checks(device: torch.device, backends: Sequence[str] = ("torch", "native", "triton"),
               time_it: bool = True) -> List[BackendReport]:
    """:func:`check_backend` for each of ``backends``, then one timing of each correct one
    against the eager composition (``torch``) on the ops both have."""
    reports = [check_backend(b, device) for b in backends]
    if not time_it:
        return reports
    cuda = device.type == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32
    shape = (256, 64, 16) if cuda else (16, 16, 8)
    reps = 20 if cuda else 5
    cases = _timing_inputs(device, dtype, shape)
    eager, _ = _backend("torch", device)
    for r in reports:
        if not r.available or r.wrong:
            continue
        backend, _ = _backend(r.name, device)
        ops = [op for op in OPS if op not in r.skipped_ops and _REF[op] is not None]
        if r.name == "triton" and not cuda:
            r.not_timed = "Triton interpreter: its speed says nothing about the kernels"
            continue
        if r.name == "torch":
            r.seconds = r.eager_seconds = _time_ops([eager], ops, cases, dtype, device, reps)[0]
        else:
            r.seconds, r.eager_seconds = _time_ops([backend, eager], ops, cases, dtype, device, reps)
    return reports


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Console entry point ``contsup-check``; returns (and exits with) 1 when a backend is wrong."""
    p = argparse.ArgumentParser(prog="contsup-check", description=__doc__.splitlines()[0])
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--backends", nargs="+", default=["torch", "native", "triton"],
                   choices=["torch", "native", "triton"], help="backends to check")
    p.add_argument("--no-timing", action="store_true", help="check correctness only")
    p.add_argument("--compile", nargs="+", metavar="ARCH", default=None,
                   help="instead of checking: the compile report of the Triton kernels' real launches "
                        "for these architectures (sm_90, sm_80; no GPU needed), see "
                        "contsup_fast.kernels.compile_report (its other options after --)")
    args, rest = p.parse_known_args(argv)
    if args.compile:
        return _compile_report(args.compile, rest)
    if rest:
        p.error(f"unrecognized arguments: {' '.join(rest)}")
    try:
        device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if device.type == "cuda" and not torch.cuda.is_available():
            raise RuntimeError(f"--device {args.device}: no CUDA device is visible to torch {torch.__version__}")
        if device.type not in ("cpu", "cuda"):
            raise ValueError(f"--device must be cpu or cuda[:i], got {args.device!r}")
    except (RuntimeError, ValueError) as exc:
        print(f"contsup-check: error: {exc}", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    print("contsup_fast self-check")
    for line in _format_environment(environment(device)):
        print("  " + line)
    print(f"checking on {device}: ops {', '.join(OPS)}; fp32 and bf16; contiguous and channels_last; "
          "forward and backward vs float64 reference", flush=True)
    reports = run_checks(device, args.backends, time_it=not args.no_timing)
    for r in reports:
        print(r.verdict())
    wrong = [r.name for r in reports if r.wrong]
    print(f"{'FAILED: wrong results from ' + ', '.join(wrong) if wrong else 'all available backends compute correct results'}"
          f" ({time.perf_counter() - t0:.1f} s)")
    return 1 if wrong else 0


def _compile_report(archs: Sequence[str], rest: Sequence[str]) -> int:
    """``--compile ARCH...``: run :func:`contsup_fast.kernels.compile_report.main`."""
    try:
        from .kernels import compile_report
    except Exception as exc:  # Triton missing or a broken install
        print(f"contsup-check: error: the compile report needs Triton ({type(exc).__name__}: {exc})",
              file=sys.stderr)
        return 2
    return compile_report.main(["--arch", *archs, *[r for r in rest if r != "--"]])


def cli() -> None:
    """Console script ``contsup-check``: :func:`main` as the exit status."""
    sys.exit(main())


if __name__ == "__main__":
    cli()
