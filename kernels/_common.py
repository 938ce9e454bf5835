"""Shared infrastructure of the Triton backend (:mod:`contsup_fast.kernels`).

* op registration: every op is a ``torch.library.triton_op`` in the ``contsup_triton``
  namespace whose kernels are launched through ``torch.library.wrap_triton``, so that
  ``torch.compile`` traces into them. Under ``TRITON_INTERPRET=1`` (CPU testing) ``wrap_triton``
  cannot trace interpreted kernels, so the same bodies are registered as opaque
  ``torch.library.custom_op`` s instead (same schema, fake impl and autograd);
* argument validation with messages that name the argument, what was given and what is
  allowed;
* launch heuristics (tile sizes, split-K style two-stage reductions);
* small ``@triton.jit`` helpers shared by all kernels.
"""
import functools
from typing import Callable, Optional, Sequence, Tuple

import torch
import triton
import triton.language as tl

NAMESPACE = "contsup_triton"
FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
_DTYPE_NAMES = "float32, bfloat16, float16, float64"


@triton.jit
def _probe_kernel():
    pass


#: True when ``TRITON_INTERPRET=1`` was set before this module was imported: kernels then
#: run on the CPU in Triton's interpreter.
INTERPRETED = not isinstance(_probe_kernel, triton.runtime.jit.JITFunction)


# ----------------------------------------------------------------------------------------
# op registration and kernel launch
# ----------------------------------------------------------------------------------------
def define_op(name: str, fn: Callable):
    """Register ``fn`` (type-annotated, functional) as ``contsup_triton::<name>``."""
    qualname = f"{NAMESPACE}::{name}"
    if INTERPRETED:
        op = torch.library.custom_op(qualname, fn, mutates_args=())
        op.register_fake(fn)  # launches are skipped on fake tensors, see launch()
        return op
    return torch.library.triton_op(qualname, fn, mutates_args=())


def _is_fake(t: torch.Tensor) -> bool:
    from torch._subclasses.fake_tensor import is_fake

    return t.device.type == "meta" or is_fake(t)


#: set by :func:`kernels.compile_report.recording`: an object with ``record(kernel, grid, args,
#: meta)``, ``resident(kernel, args, meta)`` and ``sm_count``; launches are then recorded (for
#: the compile report), not run, and plans are made for the recorder's GPU.
RECORDER = None


def launch(kernel, grid: Tuple[int, ...], *args, **meta) -> None:
    """Launch ``kernel[grid](*args, **meta)`` through ``wrap_triton`` (traceable by
    ``torch.compile``); in the interpreter, skip it when tracing with fake tensors. While a
    compile-report recorder is set (:data:`RECORDER`) the launch is recorded instead."""
    if RECORDER is not None:
        RECORDER.record(kernel, grid, args, meta)
        return
    if INTERPRETED:
        if any(isinstance(a, torch.Tensor) and _is_fake(a) for a in args):
            return
        kernel[grid](*args, **meta)
    else:
        torch.library.wrap_triton(kernel)[grid](*args, **meta)


# ----------------------------------------------------------------------------------------
# dtypes, tiles and splits
# ----------------------------------------------------------------------------------------
def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation / statistics dtype: float64 for float64 activations, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def dot_config(dtype: torch.dtype, stats: bool = False) -> Tuple[torch.dtype, str, bool]:
    """``(operand dtype, input_precision, upcast)`` for ``tl.dot`` on activations of ``dtype``.

    16-bit activations use 16-bit tensor-core dots with fp32 accumulation (as autocast does
    for a 1x1 conv). fp32 uses 3xTF32 (close to fp32 accuracy) for the statistics and, like a
    cuDNN convolution, plain TF32 for the apply/backward passes when
    ``torch.backends.cudnn.allow_tf32`` is set. ``upcast`` works around the interpreter's
    bf16 ``tl.dot`` (it multiplies the raw bit patterns) by converting operands to fp32.
    """
    if dtype == torch.float32:
        prec = "tf32" if (not stats and torch.backends.cudnn.allow_tf32) else "tf32x3"
    else:
        prec = "ieee"
    return dtype, prec, INTERPRETED and dtype == torch.bfloat16


def pow2(n: int, lo: int, hi: int) -> int:
    """Next power of two of ``n``, clamped to ``[lo, hi]``."""
    return max(lo, min(hi, triton.next_power_of_2(max(int(n), 1))))


def pixel_block(n_pixels: int, gpu_cap: int) -> int:
    """Tile width over pixels: ``pow2(n, 16, gpu_cap)`` on the GPU. The interpreter's cost is
    per program and per op, not per element, so there it takes about an eighth of the pixels
    (>= 16, so small inputs still span several tiles and splits)."""
    if INTERPRETED:
        return pow2(triton.cdiv(int(n_pixels), 8), 16, 4096)
    return pow2(n_pixels, 16, gpu_cap)


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    if not torch.cuda.is_available():  # e.g. tracing with fake CUDA tensors on a CPU machine
        return 132
    return torch.cuda.get_device_properties(index).multi_processor_count


def _planned_for_gpu(device: torch.device) -> bool:
    return RECORDER is not None or (device.type == "cuda" and not INTERPRETED)


def resident_programs(kernel, args: Sequence, meta: dict, device: torch.device) -> int:
    """How many programs of ``kernel[...](*args, **meta)`` are resident on the whole GPU at
    once: SMs x blocks per SM, the blocks per SM limited by the compiled kernel's registers,
    shared memory and threads (:func:`kernels.occupancy.blocks_per_sm`). Tensors in ``args``
    may be given as their dtype (buffers not yet allocated). In the interpreter: 4 (so that
    small inputs still take the multi-split and persistent paths)."""
    if not _planned_for_gpu(device):
        return 4
    from .occupancy import resident_on_device

    if RECORDER is not None:
        return RECORDER.sm_count * RECORDER.resident(kernel, args, meta)
    return resident_on_device(kernel, args, meta, device)


def split_plan(n_items: int, block: int, other_programs: int, device: torch.device,
               resident: Optional[int] = None) -> Tuple[int, int]:
    """Split ``n_items`` (pixels) into ``splits`` chunks of ``chunk`` items (a multiple of
    ``block``) so that the ``splits * other_programs`` programs are at most ``resident``
    (:func:`resident_programs`: one wave on the GPU; default 4 x the SM count).
    Returns ``(splits, chunk)``; the partial sums of the splits are added by a finalize."""
    n_blocks = triton.cdiv(int(n_items), block)
    if RECORDER is not None:
        RECORDER.pending = True  # the next launch's grid is planned from the SM count
    if resident is not None:
        target = resident
    elif _planned_for_gpu(device):
        target = 4 * (RECORDER.sm_count if RECORDER is not None
                      else _sm_count(device.index if device.index is not None else 0))
    else:
        target = 4  # interpreter: still exercise the multi-split path
    other = max(int(other_programs), 1)
    # a residency bound is never exceeded (floor); the default targets are reached (ceil)
    per_split = target // other if resident is not None else triton.cdiv(target, other)
    splits = max(1, min(n_blocks, per_split))
    per = triton.cdiv(n_blocks, splits)
    return triton.cdiv(n_blocks, per), per * block


def launch_split_sums(kernel, args: list, meta: dict, n_items: int, block: int,
                      tiles: Tuple[int, int], rows: int, cols: int, acc: torch.dtype,
                      device: torch.device) -> Tuple[torch.Tensor, torch.Tensor]:
    """Launch a backward-sums kernel over the grid ``(splits, *tiles)`` planned by
    :func:`split_plan` from its residency, and add its partial results over the splits.
    ``args[9]`` is the split's chunk (any placeholder) and the last two arguments are the
    partial buffers, given as their dtype ``acc``; they are allocated here as
    ``(splits, rows, cols)`` and ``(splits, rows)``. Returns their sums over the splits."""
    resident = resident_programs(kernel, args, meta, device)
    splits, chunk = split_plan(n_items, block, tiles[0] * tiles[1], device, resident)
    args = list(args)
    args[9] = chunk
    args[-2:] = [torch.empty((splits, rows, cols), dtype=acc, device=device),
                 torch.empty((splits, rows), dtype=acc, device=device)]
    launch(kernel, (splits, *tiles), *args, **meta)
    return args[-2].sum(0), args[-1].sum(0)


def strides4(t: torch.Tensor) -> Tuple[int, int, int, int]:
    return tuple(int(s) for s in t.stride())  # type: ignore[return-value]


def bn_fold(gamma: torch.Tensor, beta: torch.Tensor, mean: torch.Tensor, var: torch.Tensor,
            eps: float, acc: torch.dtype) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(rstd, scale, shift)`` with ``bn(x) = x * scale + shift`` (all ``acc`` dtype)."""
    rstd = torch.rsqrt(var.to(acc) + eps)
    scale = gamma.to(acc) * rstd
    shift = beta.to(acc) - mean.to(acc) * scale
    return rstd, scale, shift


# ----------------------------------------------------------------------------------------
# validation (ValueError / TypeError naming the argument, what was given, what is allowed)
# ----------------------------------------------------------------------------------------
def check_device(name: str, t: torch.Tensor, device: Optional[torch.device] = None) -> None:
    if not INTERPRETED and RECORDER is None and t.device.type != "cuda":
        raise ValueError(
            f"{name} is on device '{t.device}'; the Triton backend needs CUDA tensors "
            f"(or TRITON_INTERPRET=1 set before import to run in the CPU interpreter)")
    if device is not None and t.device != device:
        raise ValueError(f"{name} is on device '{t.device}' but the activations are on "
                         f"'{device}'; all tensors must be on one device")


def check_tensor(name: str, t, ndim: int, device: Optional[torch.device] = None) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != ndim:
        what = "(N, C, H, W)" if ndim == 4 else f"{ndim}-D"
        raise ValueError(f"{name} must be a {ndim}-D {what} tensor, got shape {tuple(t.shape)}")
    if t.dtype not in FLOAT_DTYPES:
        raise ValueError(f"{name} has dtype {t.dtype}; allowed dtypes: {_DTYPE_NAMES}")
    if t.numel() == 0:
        raise ValueError(f"{name} is empty (shape {tuple(t.shape)}); every dimension must be >= 1")
    check_device(name, t, device)


def check_vec(name: str, t, C: int, device: torch.device) -> None:
    if t is None:
        raise ValueError(f"{name} is None; a ({C},) tensor is required here")
    check_tensor(name, t, 1, device)
    if t.shape[0] != C:
        raise ValueError(f"{name} must have shape ({C},) to match the {C} channels, "
                         f"got {tuple(t.shape)}")


def check_bn_args(prefix: str, C: int, device: torch.device, weight, bias, running_mean,
                  running_var, training: bool) -> None:
    """BatchNorm parameters: (C,) tensors; running statistics required in eval mode only."""
    check_vec(f"{prefix}bn_weight", weight, C, device)
    check_vec(f"{prefix}bn_bias", bias, C, device)
    for nm, t in (("running_mean", running_mean), ("running_var", running_var)):
        if t is not None or not training:
            if t is None:
                raise ValueError(f"{prefix}{nm} is None; it is required when training=False")
            check_vec(f"{prefix}{nm}", t, C, device)


def check_sequences(names: Sequence[str], seqs: Sequence[Sequence]) -> int:
    lengths = [len(s) for s in seqs]
    if lengths[0] == 0:
        raise ValueError(f"{names[0]} is empty; at least one context term is required")
    if any(n != lengths[0] for n in lengths):
        given = ", ".join(f"{n}={m}" for n, m in zip(names, lengths))
        raise ValueError(f"the per-term sequences must have equal lengths, got {given}")
    return lengths[0]


def pool_factor(name: str, big: torch.Tensor, small_hw: Sequence[int], small_name: str) -> Tuple[int, int]:
    """Integer pooling factors ``(sh, sw)`` mapping ``big``'s spatial size onto ``small_hw``."""
    H, W = int(small_hw[0]), int(small_hw[1])
    Hb, Wb = int(big.shape[-2]), int(big.shape[-1])
    if Hb % H or Wb % W:
        raise ValueError(
            f"{name} has spatial size ({Hb}, {Wb}), which is not an integer multiple of "
            f"{small_name}'s ({H}, {W}); allowed: (s*{H}, s*{W}) for positive integers s")
    return Hb // H, Wb // W


# ----------------------------------------------------------------------------------------
# @triton.jit helpers
# ----------------------------------------------------------------------------------------
@triton.jit
def to_acc(x, FP64: tl.constexpr):
    if FP64:
        return x.to(tl.float64)
    else:
        return x.to(tl.float32)


@triton.jit
def zeros_acc(A: tl.constexpr, B: tl.constexpr, FP64: tl.constexpr):
    if FP64:
        return tl.zeros([A, B], tl.float64)
    else:
        return tl.zeros([A, B], tl.float32)


@triton.jit
def add_base(base, acc, FP64: tl.constexpr, BASE_FP64: tl.constexpr):
    """``base + acc`` in the wider of the accumulation dtype and float64 for a float64 base."""
    if BASE_FP64:
        return base.to(tl.float64) + acc.to(tl.float64)
    else:
        return to_acc(base, FP64) + acc


@triton.jit
def mma(a, b, acc, PREC: tl.constexpr, UPCAST: tl.constexpr):
    """``acc + a @ b`` on tensor cores (``UPCAST``: interpreter bf16 workaround)."""
    if UPCAST:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, acc, input_precision=PREC)


@triton.jit
def split_pixels(p, HW, W):
    """Flat pixel index over (N, H, W) -> (n (int64), h, w)."""
    n = p // HW
    r = p - n * HW
    h = r // W
    return n.to(tl.int64), h, r - h * W


@triton.jit
def chunk_bounds(sp, CHUNK, P):
    """``[start, end)`` of the flat pixels of split ``sp`` (chunks of ``CHUNK``, the last one
    clipped to ``P``)."""
    start = sp * CHUNK
    return start, tl.minimum(start + CHUNK, P)


@triton.jit
def chunk_block(p0, end, HW, W, BLOCK: tl.constexpr):
    """The ``BLOCK`` flat pixels from ``p0`` of a chunk ending at ``end``:
    ``(mask, n, h, w)`` with ``mask = p < end`` and ``(n, h, w)`` as in :func:`split_pixels`."""
    p = p0 + tl.arange(0, BLOCK)
    n, h, w = split_pixels(p, HW, W)
    return p < end, n, h, w
