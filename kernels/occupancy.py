"""Theoretical occupancy of a compiled Triton kernel, and launch plans sized from it.

A CUDA SM holds as many blocks (Triton programs) at once as its registers, shared memory and
thread slots allow (CUDA C Programming Guide, "Compute Capabilities", table of technical
specifications; the CUDA occupancy calculator's allocation rules):

* registers are allocated per warp in units of 256 (``regs/thread * 32`` rounded up);
* each block reserves 1 KB of shared memory for the system on sm_80 and later;
* at most 64 resident warps (2048 threads) and 32 blocks per SM on sm_80 and sm_90.

:func:`blocks_per_sm` applies these rules; :func:`resident_on_device` compiles (or looks up) the
kernel Triton would launch on a real GPU and returns SMs x blocks per SM, the number of
programs of one wave, which the launch plans of :mod:`kernels._common` do not exceed.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Sequence

import torch

__all__ = ["GPU", "GPUS", "blocks_per_sm", "resident_on_device"]


@dataclass(frozen=True)
class GPU:
    """Per-SM resources of a GPU model (bytes for shared memory)."""
    name: str
    arch: int
    sms: int
    regs: int = 65536
    smem: int = 228 * 1024
    max_warps: int = 64
    max_blocks: int = 32


#: H100/H200 SXM (sm_90: 132 SMs, 228 KB shared memory per SM) and A100 (sm_80: 108 SMs,
#: 164 KB shared memory per SM)
GPUS: Dict[str, GPU] = {
    "sm_90": GPU("H100/H200 (sm_90)", 90, 132, smem=228 * 1024),
    "sm_80": GPU("A100 (sm_80)", 80, 108, smem=164 * 1024),
}


def blocks_per_sm(regs: int, shared: int, warps: int, gpu: GPU) -> Dict[str, int]:
    """Resident blocks per SM of a kernel using ``regs`` registers per thread, ``shared``
    bytes of shared memory and ``warps`` warps per block on ``gpu``.

    Returns ``{"blocks", "by_regs", "by_smem", "by_warps"}`` (``blocks`` the minimum, 0 when
    one block does not fit)."""
    per_warp = -(-max(int(regs), 1) * 32 // 256) * 256
    by_regs = (gpu.regs // per_warp) // warps
    by_smem = gpu.smem // (int(shared) + 1024)
    by_warps = gpu.max_warps // warps
    return {"blocks": max(0, min(by_regs, by_smem, by_warps, gpu.max_blocks)),
            "by_regs": by_regs, "by_smem": by_smem, "by_warps": by_warps}


def _key(kernel, args: Sequence, meta: dict):
    def one(a):
        if isinstance(a, torch.Tensor):  # allocations are aligned: the offset decides (no
            # data_ptr(), which fake tensors under torch.compile do not have)
            return (a.dtype, a.storage_offset() * a.element_size() % 16 == 0)
        if isinstance(a, torch.dtype):
            return (a, True)
        if isinstance(a, int) and not isinstance(a, bool):
            return ("i", a == 1, a % 16 == 0, -2**31 <= a < 2**31)
        return (type(a).__name__, a)
    return (kernel, tuple(one(a) for a in args), tuple(sorted(meta.items())))


_CACHE: Dict[tuple, int] = {}


def resident_on_device(kernel, args: Sequence, meta: dict, device: torch.device) -> int:
    """SMs x blocks per SM of ``kernel`` as Triton compiles it for ``args``/``meta`` on the CUDA
    ``device`` (the kernel is compiled now if it was not; ``args`` may hold dtypes for buffers
    not yet allocated). Under ``torch.compile`` tracing, where nothing can be compiled, a
    kernel not seen before counts 1 block per SM. Always >= the SM count."""
    from triton.runtime.jit import MockTensor

    index = device.index if device.index is not None else torch.cuda.current_device()
    props = torch.cuda.get_device_properties(index)
    key = (_key(kernel, args, meta), index)
    if key not in _CACHE:
        if torch.compiler.is_compiling():
            return props.multi_processor_count
        mock = [MockTensor(a.dtype) if isinstance(a, torch.Tensor) else a for a in args]
        with torch.cuda.device(index):
            compiled = kernel.warmup(*mock, grid=(1,), **meta)
            compiled._init_handles()
        gpu = GPU(props.name, props.major * 10 + props.minor, props.multi_processor_count,
                  regs=props.regs_per_multiprocessor,
                  smem=props.shared_memory_per_multiprocessor,
                  max_warps=props.max_threads_per_multi_processor // 32)
        blocks = blocks_per_sm(compiled.n_regs, compiled.metadata.shared,
                               compiled.metadata.num_warps, gpu)["blocks"]
        _CACHE[key] = max(1, blocks)
    return props.multi_processor_count * _CACHE[key]
