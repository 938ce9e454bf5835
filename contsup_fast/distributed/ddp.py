"""Data-parallel local learning (:class:`LocalDDP`): a bucketed asynchronous all-reduce of each
local module's gradients starts right after that module's backward."""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from typing import Dict, Iterable, List, Optional, Tuple

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ..local import LocalModule, LocalSequential
from .group import _check_local, _control_group, _require_process_group, comm_failure
from .sync_bn import convert_sync_batchnorm

__all__ = ["LocalDDP"]


@dataclass
class _Bucket:
    params: List[nn.Parameter]
    work: object = None
    flat: Optional[Tensor] = None
    with_grad: List[nn.Parameter] = field(default_factory=list)


def _buckets(params: Iterable[nn.Parameter], cap_bytes: int) -> List[_Bucket]:
    groups: Dict[Tuple, List[List[nn.Parameter]]] = {}
    for p in params:
        if not p.requires_grad:
            continue
        key = (p.device, p.dtype)
        lists = groups.setdefault(key, [[]])
        size = sum(q.numel() * q.element_size() for q in lists[-1])
        if lists[-1] and size + p.numel() * p.element_size() > cap_bytes:
            lists.append([])
        lists[-1].append(p)
    return [_Bucket(ps) for lists in groups.values() for ps in lists if ps]


class LocalDDP(nn.Module):
    """Data-parallel :class:`LocalSequential`: ``ddp(x, y)`` returns what ``local(x, y)``
    returns, with every gradient averaged over the process group.

    Each process feeds its own share of the batch. After each local module's backward, its
    gradients are flattened into buckets of at most ``bucket_cap_mb`` MiB and an
    asynchronous all-reduce (sum, then divided by the world size) starts for each bucket; it
    overlaps the following modules' forward and backward. All have finished and the averages
    are written back into ``.grad`` before the call returns, the first step included.

    Args:
        local: the :class:`LocalSequential` (on this process's device).
        process_group: the group to average over (default: the whole world).
        sync_bn: convert every BatchNorm, the auxiliary heads' and context encoders' too, to
            a synchronised BatchNorm (:func:`convert_sync_batchnorm`; boundary ops then run
            eagerly, because the fused ones compute per-process statistics).
        bucket_cap_mb: largest all-reduce bucket in MiB (> 0).

    Parameters and buffers are broadcast from the group's rank 0 when wrapping. In eval mode
    the call runs no collective. ``with ddp.no_sync():`` accumulates gradients locally; the
    next synchronised call averages the accumulated gradients, as DDP's does.

    Raises:
        ValueError: ``local`` is not a LocalSequential, no process group is initialised, a bad
            ``bucket_cap_mb``, or the processes' models differ in structure.
        DeadRankError: a collective failed because a rank died (names it when the watchdog of
            :func:`init_distributed` runs).
    """

    def __init__(self, local: LocalSequential, process_group=None, sync_bn: bool = False,
                 bucket_cap_mb: float = 25.0):
        super().__init__()
        _check_local("LocalDDP", local)
        _require_process_group("LocalDDP", process_group)
        if not (isinstance(bucket_cap_mb, (int, float)) and bucket_cap_mb > 0):
            raise ValueError(f"LocalDDP: bucket_cap_mb must be a number > 0 (MiB), got {bucket_cap_mb!r}")
        self.local = local
        self.process_group = process_group
        self.world_size = dist.get_world_size(process_group)
        self.sync_bn = bool(sync_bn)
        self._check_same_structure()
        if sync_bn:
            convert_sync_batchnorm(local, process_group)
        self._broadcast_state()
        cap = int(bucket_cap_mb * 2**20)
        self._module_buckets = [_buckets(m.parameters(), cap) for m in local.local_modules]
        self._pending: List[_Bucket] = []
        self._active = False
        self._sync = True
        #: running totals: bytes handed to all-reduce, seconds spent waiting for it
        self.stats = {"bytes_sent": 0, "wait_s": 0.0}
        self._hook = local.register_module_step_hook(self._after_module)

    # -------------------------------------------------------------- setup
    def _check_same_structure(self) -> None:
        sig = [(k, tuple(v.shape), str(v.dtype)) for k, v in self.local.state_dict().items()]
        sigs = [None] * self.world_size
        dist.all_gather_object(sigs, (sig, self.local.spec.name, self.local.K),
                               group=_control_group(self.process_group))
        for r, other in enumerate(sigs):
            if other != sigs[0]:
                raise ValueError(f"LocalDDP: local: the model on group rank {r} differs from rank "
                                 f"0's (K, context, parameter names or shapes); every process must "
                                 f"build the same LocalSequential")

    @torch.no_grad()
    def _broadcast_state(self) -> None:
        src = dist.get_global_rank(self.process_group, 0) if self.process_group is not None else 0
        for t in list(self.local.parameters()) + list(self.local.buffers()):
            buf = t.data if t.data.is_contiguous() else t.data.contiguous()
            dist.broadcast(buf, src, group=self.process_group)
            if buf is not t.data:
                t.data.copy_(buf)

    # -------------------------------------------------------------- gradient averaging
    def _after_module(self, m: LocalModule) -> None:
        if not (self._active and self._sync):
            return
        for b in self._module_buckets[m.index]:
            b.with_grad = [p for p in b.params if p.grad is not None]
            if not b.with_grad:
                continue
            b.flat = torch.cat([p.grad.reshape(-1) for p in b.with_grad])
            try:
                b.work = dist.all_reduce(b.flat, group=self.process_group, async_op=True)
            except Exception as exc:
                raise comm_failure(exc, f"the gradient all-reduce of local module {m.index}") from exc
            self._pending.append(b)
            self.stats["bytes_sent"] += b.flat.numel() * b.flat.element_size()

    @torch.no_grad()
    def _finish(self) -> None:
        pending, self._pending = self._pending, []
        for b in pending:
            t0 = time.perf_counter()
            try:
                b.work.wait()
            except Exception as exc:
                raise comm_failure(exc, "the gradient all-reduce") from exc
            self.stats["wait_s"] += time.perf_counter() - t0
            b.flat.div_(self.world_size)
            offset = 0
            for p in b.with_grad:
                n = p.grad.numel()
                p.grad.copy_(b.flat[offset:offset + n].view(p.grad.shape))
                offset += n
            b.work = b.flat = None
            b.with_grad = []

    @contextlib.contextmanager
    def no_sync(self):
        """Inside, training calls accumulate gradients locally without any all-reduce."""
        old, self._sync = self._sync, False
        try:
            yield
        finally:
            self._sync = old

    def forward(self, x: Tensor, y: Optional[Tensor] = None, scaler=None):
        """``local(x, y, scaler)`` with averaged gradients (training) or no collective (eval).
        x: (N_local, C, H, W) this process's share of the batch; y: (N_local,) int64."""
        if not (self.training and y is not None and torch.is_grad_enabled()):
            return self.local(x, y, scaler=scaler) if y is not None else self.local(x)
        self._active = True
        try:
            out = self.local(x, y, scaler=scaler)
        except BaseException:
            self._pending = []
            raise
        finally:
            self._active = False
        self._finish()
        return out

    def extra_repr(self) -> str:
        return f"world_size={self.world_size}, sync_bn={self.sync_bn}"
