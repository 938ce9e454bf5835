"""Multi-process local learning on ``torch.distributed``: the one module for parallelism.

Two forms, both built on :meth:`LocalSequential.module_step` (one local module: context,
body, local loss, local backward):

* :class:`LocalDDP` (data parallel): every process holds the whole model and trains on its
  share of the batch. Right after each local module's backward, an asynchronous bucketed
  all-reduce of that module's gradients starts; it overlaps the next modules' work and all
  are waited for before the call returns, so ``opt.step()`` sees averaged gradients from the
  very first step. (Plain ``DistributedDataParallel`` gets the first step wrong: the local
  backwards run inside ``forward``, before its reducer is armed; it is refused.)
* :class:`LocalPipeline` (pipeline parallel): the K local modules are placed on P processes
  as contiguous *stages*. No gradient crosses a boundary, so each stage runs forward, local
  loss, backward and its own optimizer step, then sends forward (point to point, never
  backward) what later stages read: the detached output ``h``, the stored module inputs
  ``a_i`` of later R terms, the image (E terms, reconstruction) and the labels. Stage ``s``
  works on batch ``t - s`` at tick ``t``: exactly sequential local learning, streamed.

Runtime helpers: :func:`init_distributed` (torchrun environment -> process group with a
bounded timeout, plus a :class:`RankWatchdog` whose heartbeats name a dead or hung rank), and
:class:`StopVote` (one rank's Ctrl-C/SIGTERM becomes every rank's stop at the same step).
"""
from __future__ import annotations

import contextlib
import datetime
import os
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .local import LocalModule, LocalSequential

__all__ = ["LocalDDP", "LocalPipeline", "StageOutput", "DeadRankError", "RankWatchdog",
           "DistInfo", "init_distributed", "shutdown_distributed", "current", "comm_failure",
           "StopVote", "convert_sync_batchnorm", "module_costs", "balance_stages", "EXIT_PEER_DEAD"]

#: exit status of a process that the watchdog ends because another rank died or hung
EXIT_PEER_DEAD = 75


class DeadRankError(RuntimeError):
    """A peer process died or stopped responding; ``ranks`` lists the ones found dead."""

    def __init__(self, message: str, ranks: Sequence[int] = ()):
        super().__init__(message)
        self.ranks = list(ranks)


# ============================================================================================
# process group, heartbeats, coordinated stop


class RankWatchdog:
    """Heartbeats through the rendezvous store, to name a dead or hung rank.

    A daemon thread increments ``hb/<rank>`` every ``interval_s`` seconds and reads the other
    ranks' counters. If another rank's counter has not moved for ``timeout_s`` seconds (it
    died, or hangs), the thread prints one line naming it and ends this process with exit
    status :data:`EXIT_PEER_DEAD`: a blocked collective can never hang a rank for longer
    than that. :meth:`dead_ranks` answers, after a failed collective, which ranks stopped
    beating. :meth:`close` marks this rank finished, so that its silence is not taken as death.

    Args:
        store: a ``torch.distributed.Store`` every rank reaches (torchrun's, or the TCPStore
            of :func:`init_distributed`).
        rank, world_size: this process's rank and the number of ranks.
        timeout_s: seconds of silence after which a rank counts as dead.
        interval_s: heartbeat period in seconds.
        exit_on_dead: end the process when a peer is found dead (else only record it).
    """

    def __init__(self, store, rank: int, world_size: int, timeout_s: float,
                 interval_s: float = 0.5, exit_on_dead: bool = True):
        if not timeout_s > 0:
            raise ValueError(f"timeout_s must be > 0 seconds, got {timeout_s!r}")
        self.store = dist.PrefixStore("contsup_watchdog", store)
        self.rank, self.world_size = int(rank), int(world_size)
        self.timeout_s, self.interval_s = float(timeout_s), float(interval_s)
        self.exit_on_dead = exit_on_dead
        self.dead: List[int] = []
        self._stop = threading.Event()
        self._beat()
        now = time.monotonic()
        self._seen = {r: (self._count(r), now) for r in range(self.world_size) if r != self.rank}
        self._thread = threading.Thread(target=self._loop, name="contsup-watchdog", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        self.store.add(f"hb/{self.rank}", 1)

    def _count(self, r: int) -> int:
        return int(self.store.add(f"hb/{r}", 0))

    def _finished(self, r: int) -> bool:
        return int(self.store.add(f"done/{r}", 0)) > 0

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self._beat()
                now = time.monotonic()
                for r, (count, since) in list(self._seen.items()):
                    c = self._count(r)
                    if c != count:
                        self._seen[r] = (c, now)
                    elif now - since > self.timeout_s and not self._finished(r):
                        self._declare([r], f"rank {r} sent no heartbeat for {now - since:.0f} s "
                                           f"(--dist-timeout {self.timeout_s:g}): it died or hangs")
                        return
            except Exception as exc:  # the store itself is gone
                if self._stop.is_set():
                    return
                self._declare([0], f"lost the rendezvous store ({type(exc).__name__}: {exc}); "
                                   f"the process holding it (rank 0 or the launcher) died")
                return

    def _declare(self, ranks: List[int], why: str) -> None:
        self.dead = ranks
        print(f"rank {self.rank}: stopping, {why}", file=sys.stderr, flush=True)
        if self.exit_on_dead:
            os._exit(EXIT_PEER_DEAD)

    def dead_ranks(self, grace_s: Optional[float] = None) -> List[int]:
        """Ranks (other than this one) whose heartbeat does not move for ``grace_s`` seconds
        (default 3 heartbeats) and that have not finished; ``[0]`` if the store is gone."""
        grace_s = 3 * self.interval_s if grace_s is None else grace_s
        try:
            before = {r: self._count(r) for r in range(self.world_size) if r != self.rank}
            time.sleep(grace_s)
            return [r for r, c in before.items() if self._count(r) == c and not self._finished(r)]
        except Exception:
            return [0]

    def close(self) -> None:
        """Mark this rank finished and stop the thread."""
        self._stop.set()
        try:
            self.store.add(f"done/{self.rank}", 1)
        except Exception:
            pass


@dataclass
class DistInfo:
    """What :func:`init_distributed` set up: ``rank``, ``world_size``, ``local_rank``,
    ``device``, ``backend``, the :class:`RankWatchdog` and a gloo ``control_group`` (CPU
    tensors: stop votes, metrics) that never touches the accelerator."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str
    watchdog: Optional[RankWatchdog] = None
    control_group: object = None
    timeout_s: float = 300.0


_CURRENT: Optional[DistInfo] = None


def current() -> Optional[DistInfo]:
    """The :class:`DistInfo` of :func:`init_distributed` in this process, or None."""
    return _CURRENT


def _env_int(name: str) -> int:
    value = os.environ.get(name)
    try:
        return int(value)
    except (TypeError, ValueError):
        raise RuntimeError(f"environment variable {name}={value!r} is not an integer; launch with "
                           f"torchrun --nproc-per-node N -m contsup_fast.train ...") from None


def init_distributed(backend: Optional[str] = None, timeout_s: float = 300.0,
                     device: Optional[str] = None, watchdog: bool = True) -> DistInfo:
    """Join the process group that ``torchrun`` describes in the environment.

    Reads ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``. The
    backend is NCCL when CUDA is used, else gloo. Every collective and point-to-point
    operation fails after ``timeout_s`` seconds, and a :class:`RankWatchdog` with the same
    timeout names a rank that died or hangs.

    Args:
        backend: "gloo" or "nccl" (default: by device).
        timeout_s: seconds (> 0) a rank waits for the others before failing.
        device: torch device (default ``cuda:LOCAL_RANK`` if CUDA is available, else cpu).
        watchdog: start the heartbeat watchdog.

    Raises:
        RuntimeError: not launched by torchrun (the variables are missing) or the
            rendezvous fails within ``timeout_s``. ValueError: bad ``timeout_s``/``backend``.
    """
    global _CURRENT
    if not timeout_s > 0:
        raise ValueError(f"timeout_s must be > 0 seconds, got {timeout_s!r}")
    missing = [k for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise RuntimeError(f"--parallel needs the torchrun environment ({', '.join(missing)} not "
                           f"set); launch with torchrun --nproc-per-node N -m contsup_fast.train ...")
    rank, world = _env_int("RANK"), _env_int("WORLD_SIZE")
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    if device is None:
        device = f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda":
        if dev.index is None:
            dev = torch.device("cuda", local_rank)
        torch.cuda.set_device(dev)
    backend = backend or ("nccl" if dev.type == "cuda" else "gloo")
    if backend not in ("gloo", "nccl"):
        raise ValueError(f"backend must be 'gloo' or 'nccl', got {backend!r}")
    timeout = datetime.timedelta(seconds=timeout_s)
    use_agent_store = os.environ.get("TORCHELASTIC_USE_AGENT_STORE", "").lower() == "true"
    try:
        store = dist.TCPStore(os.environ["MASTER_ADDR"], _env_int("MASTER_PORT"), world,
                              is_master=rank == 0 and not use_agent_store, timeout=timeout,
                              wait_for_workers=False)
        pg_store = dist.PrefixStore("contsup_pg", store)
        dist.init_process_group(backend, store=pg_store, rank=rank, world_size=world, timeout=timeout)
    except Exception as exc:
        raise RuntimeError(f"rank {rank}: could not join the {world}-process group at "
                           f"{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']} within "
                           f"{timeout_s:g} s ({type(exc).__name__}: {exc})") from exc
    control = dist.new_group(backend="gloo", timeout=timeout) if backend != "gloo" else None
    wd = RankWatchdog(store, rank, world, timeout_s) if watchdog and world > 1 else None
    _CURRENT = DistInfo(rank, world, local_rank, dev, backend, wd, control, float(timeout_s))
    return _CURRENT


def shutdown_distributed(clean: bool = True) -> None:
    """Leave the process group set up by :func:`init_distributed` (marks this rank finished
    for the watchdogs first when ``clean``)."""
    global _CURRENT
    info, _CURRENT = _CURRENT, None
    if info is not None and info.watchdog is not None:
        if clean:
            info.watchdog.close()
        else:
            info.watchdog._stop.set()
    if dist.is_available() and dist.is_initialized():
        with contextlib.suppress(Exception):
            dist.destroy_process_group()


def _control_group(process_group=None):
    info = current()
    if process_group is None and info is not None and info.control_group is not None:
        return info.control_group
    return process_group


def comm_failure(exc: BaseException, what: str, peers: Optional[Sequence[int]] = None) -> DeadRankError:
    """A :class:`DeadRankError` for a failed collective/point-to-point ``what``: names the
    dead rank(s) found by the watchdog's heartbeats, else the ``peers`` involved."""
    info = current()
    dead: List[int] = []
    if info is not None and info.watchdog is not None:
        dead = info.watchdog.dead or info.watchdog.dead_ranks()
    if not dead and peers is not None and len(peers) == 1:
        dead = list(peers)
    me = dist.get_rank() if dist.is_initialized() else "?"
    who = (f"rank {', '.join(map(str, dead))} died or stopped responding" if dead
           else "a peer rank failed")
    return DeadRankError(f"rank {me}: {what} failed: {who} ({type(exc).__name__}: "
                         f"{str(exc).splitlines()[0] if str(exc) else ''})", dead)


class StopVote:
    """Turns a stop request on any rank (Ctrl-C, SIGTERM) into a stop on all ranks at the
    same step. Each :meth:`poll` starts an asynchronous MAX all-reduce of this rank's flag
    on the gloo control group and returns the result of the previous poll, so no call waits
    on the network for longer than one step's worth of latency and every rank gets the same
    answer at the same call."""

    def __init__(self, process_group=None):
        self.group = _control_group(process_group)
        self._pending: Optional[Tuple[object, Tensor]] = None

    def poll(self, requested: bool) -> bool:
        result = False
        if self._pending is not None:
            work, flag = self._pending
            try:
                work.wait()
            except Exception as exc:
                raise comm_failure(exc, "the stop vote") from exc
            result = bool(flag.item())
        flag = torch.tensor([1 if requested else 0], dtype=torch.int32)
        self._pending = (dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.group,
                                         async_op=True), flag)
        return result

    def finish(self) -> bool:
        """Wait for the last poll; returns its result (call it on every rank, or none)."""
        if self._pending is None:
            return False
        work, flag = self._pending
        self._pending = None
        try:
            work.wait()
        except Exception as exc:
            raise comm_failure(exc, "the stop vote") from exc
        return bool(flag.item())


def _require_process_group(what: str, process_group) -> None:
    if not (dist.is_available() and dist.is_initialized()):
        raise ValueError(f"{what}: process_group: torch.distributed has no initialised process "
                         f"group; call torch.distributed.init_process_group (or "
                         f"contsup_fast.distributed.init_distributed under torchrun) first")


def _check_local(what: str, local) -> None:
    if not isinstance(local, LocalSequential):
        raise ValueError(f"{what}: local must be a LocalSequential, got {type(local).__name__}")


# ============================================================================================
# data parallel


class _CPUSyncBatchNorm(nn.SyncBatchNorm):
    """``nn.SyncBatchNorm`` that also works on the CPU (gloo): in training the per-channel
    sum, sum of squares and count are all-reduced with the autograd-aware
    ``torch.distributed.nn.functional.all_reduce``, so the normalisation and its gradient use
    the statistics of the concatenated batch. CUDA inputs use ``nn.SyncBatchNorm`` itself."""

    def forward(self, input: Tensor) -> Tensor:
        group = self.process_group or dist.group.WORLD
        if (input.device.type == "cuda" or not self.training or not dist.is_initialized()
                or dist.get_world_size(group) == 1):
            return super().forward(input)
        import warnings
        from torch.distributed.nn.functional import all_reduce  # autograd-aware (sums gradients)
        dims = [d for d in range(input.dim()) if d != 1]
        x = input.float()
        count = torch.tensor([x.numel() / x.shape[1]], dtype=torch.float32, device=x.device)
        stats = torch.cat([x.sum(dims), (x * x).sum(dims), count])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # its successor has no autograd on gloo
            stats = all_reduce(stats, group=group)
        C = x.shape[1]
        n = stats[-1]
        mean = stats[:C] / n
        var = (stats[C:2 * C] / n - mean * mean).clamp_min(0)
        shape = [1, C] + [1] * (input.dim() - 2)
        out = (x - mean.view(shape)) * torch.rsqrt(var.view(shape) + self.eps)
        if self.affine:
            out = out * self.weight.view(shape) + self.bias.view(shape)
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked += 1
                m = (self.momentum if self.momentum is not None
                     else 1.0 / float(self.num_batches_tracked))
                nn_ = float(n)
                self.running_mean.mul_(1 - m).add_(mean.detach(), alpha=m)
                self.running_var.mul_(1 - m).add_(var.detach() * nn_ / max(nn_ - 1, 1), alpha=m)
        return out.to(input.dtype)


def convert_sync_batchnorm(local: LocalSequential, process_group=None) -> LocalSequential:
    """Every BatchNorm of ``local`` (bodies, auxiliary heads, context encoders, decoders)
    becomes a synchronised one (statistics of the whole, all-process batch), and the
    boundary ops switch to the eager "torch" backend: the fused backends compute batch
    statistics themselves, per process. In place; returns ``local``."""
    nn.SyncBatchNorm.convert_sync_batchnorm(local, process_group)
    for mod in local.modules():
        if type(mod) is nn.SyncBatchNorm:
            mod.__class__ = _CPUSyncBatchNorm
    from .fused import resolve_backend
    local.backend_name = "torch"
    local._backends = {d: resolve_backend("torch", d) for d in local._backends}
    return local


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


# ============================================================================================
# pipeline parallel: placement


def module_costs(local: LocalSequential) -> List[int]:
    """The splitter's cost of each local module: the bytes autograd saves for backward in
    its body at the example input (batch 2), as measured by :mod:`contsup_fast.splitting`.
    Parameters on the meta device (other pipeline stages) are not measurable: call this on
    the whole model."""
    from .splitting import _propagate_shapes
    costs = []
    shape = tuple(local.input_size)
    for m in local.local_modules:
        _, c = _propagate_shapes(m.body, shape)
        costs.append(int(sum(c.values())))
        shape = tuple(m.out_shape)
    return costs


def balance_stages(costs: Sequence[float], num_stages: int) -> List[int]:
    """Module counts of ``num_stages`` contiguous stages minimising the largest stage's
    total cost (exact dynamic programme over the cut positions).

    Raises:
        ValueError: ``num_stages`` < 1 or larger than ``len(costs)``.
    """
    K = len(costs)
    if not isinstance(num_stages, int) or not 1 <= num_stages <= K:
        raise ValueError(f"stages: {num_stages} stages for K={K} local modules; a stage needs "
                         f"at least one module, so use 1..{K} processes")
    prefix = [0.0]
    for c in costs:
        prefix.append(prefix[-1] + float(c))
    INF = float("inf")
    best = [[INF] * (K + 1) for _ in range(num_stages + 1)]
    back = [[0] * (K + 1) for _ in range(num_stages + 1)]
    best[0][0] = 0.0
    for s in range(1, num_stages + 1):
        for e in range(s, K + 1):
            for b in range(s - 1, e):
                v = max(best[s - 1][b], prefix[e] - prefix[b])
                if v < best[s][e]:
                    best[s][e], back[s][e] = v, b
    counts, e = [], K
    for s in range(num_stages, 0, -1):
        b = back[s][e]
        counts.append(e - b)
        e = b
    return counts[::-1]


def _stage_counts(local: LocalSequential, stages, P: int) -> List[int]:
    K = local.K
    if P > K:
        raise ValueError(f"LocalPipeline: stages: {P} processes (stages) but only K={K} local "
                         f"modules; use at most {K} processes or a larger K")
    if stages is None:
        return balance_stages(module_costs(local), P)
    counts = list(stages)
    if not all(isinstance(c, int) and not isinstance(c, bool) and c >= 1 for c in counts):
        raise ValueError(f"LocalPipeline: stages must be module counts >= 1, got {counts!r}")
    if len(counts) != P:
        raise ValueError(f"LocalPipeline: stages lists {len(counts)} stages but the process group "
                         f"has {P} processes (one stage each)")
    if sum(counts) != K:
        raise ValueError(f"LocalPipeline: stages {counts!r} sums to {sum(counts)}, not K={K}")
    return counts


# ============================================================================================
# pipeline parallel: wire format

_DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.float64]
_SLOT = 8  # per tensor: tag, dtype code, ndim, channels_last, 4 dims
_TAG_H, _TAG_X, _TAG_Y, _TAG_A = 0, 1, 2, 3  # a_i has tag 3 + i
_EMPTY, _BATCH = 0, 1


def _wire(t: Tensor) -> Tuple[Tensor, bool]:
    cl = t.dim() == 4 and not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last)
    return (t.permute(0, 2, 3, 1) if cl else t).contiguous(), cl


@dataclass
class StageOutput:
    """What one :meth:`LocalPipeline.step` did on this process.

    Attributes:
        batch: index of the batch this stage processed, counting the batches rank 0 fed
            (one per tick) since the last :meth:`LocalPipeline.flush`; None if the stage
            idled this tick (filling or draining).
        local_losses: (modules of this stage,) detached losses, on the device (no sync).
        logits: (N, classes) detached logits, on the last stage only (else None).
        labels: (N,) the labels that travelled with the batch (last stage), or None.
    """

    batch: Optional[int] = None
    local_losses: Optional[Tensor] = None
    logits: Optional[Tensor] = None
    labels: Optional[Tensor] = None


class LocalPipeline:
    """Pipeline-parallel :class:`LocalSequential`: contiguous stages of local modules, one
    per process of the group, streaming mini-batches forward.

    Every process builds the same ``local`` (same seed). The constructor keeps this
    process's stage on ``device`` and moves the other stages' modules to the meta device
    (no memory), so each process holds only its own parameters and optimizer state.

    Each :meth:`step` is one *tick*, called on every process: rank 0 passes the next batch
    ``(x, y)`` (or nothing, to drain), every stage ``s`` processes batch ``t - s``: for each of
    its modules the context, body, local loss and local backward (:meth:`LocalSequential.module_step`),
    then its optimizer and LR scheduler step, and it sends forward (point to point) the
    detached ``h``, the stored inputs ``a_i`` later R terms read, the image (E terms,
    reconstruction) and the labels. No message goes backward. :meth:`flush` drains the
    pipeline so that every fed batch has passed every stage. After n batches the parameters
    are those of single-process ``LocalSequential`` training on the same batches with the
    same per-module optimizer (bit-identical on the CPU with gloo: the same ops run on the
    same tensors, see tests/test_distributed.py).

    Args:
        local: the :class:`LocalSequential` (identical on every process).
        stages: None (balance the splitter's cost, :func:`module_costs`) or a list of module
            counts per stage (one per process, summing to K).
        process_group: the group whose ranks are the stages in order (default: world).
        opt_factory: ``params -> torch.optim.Optimizer`` for this stage's parameters (None:
            no optimizer; gradients accumulate and the caller steps).
        sched_factory: ``optimizer -> LR scheduler`` stepped after each batch (optional).
        device: device of this stage (default: where ``local``'s parameters are).
        grad_scaler: use a ``torch.amp.GradScaler`` per stage (fp16 autocast).

    Raises:
        ValueError: no process group, more stages than modules, a stage list of the wrong
            length or sum, or a factory that is not callable.
        DeadRankError: a neighbour stage died (named) while sending or receiving.
    """

    def __init__(self, local: LocalSequential, stages: Optional[Sequence[int]] = None,
                 process_group=None, opt_factory: Optional[Callable] = None,
                 sched_factory: Optional[Callable] = None, device=None, grad_scaler: bool = False):
        _check_local("LocalPipeline", local)
        _require_process_group("LocalPipeline", process_group)
        for name, f in (("opt_factory", opt_factory), ("sched_factory", sched_factory)):
            if f is not None and not callable(f):
                raise ValueError(f"LocalPipeline: {name} must be callable, got {type(f).__name__}")
        if sched_factory is not None and opt_factory is None:
            raise ValueError("LocalPipeline: sched_factory needs opt_factory (it schedules the "
                             "stage's optimizer)")
        self.local = local
        self.group = process_group
        self.num_stages = dist.get_world_size(process_group)
        self.stage = dist.get_rank(process_group)
        self.counts = _stage_counts(local, stages, self.num_stages)
        starts = [sum(self.counts[:s]) for s in range(self.num_stages)]
        self.bounds = [(a, a + c) for a, c in zip(starts, self.counts)]
        self.start, self.stop = self.bounds[self.stage]
        self.device = torch.device(device) if device is not None else next(local.parameters()).device
        self._ranks = [dist.get_global_rank(process_group, s) if process_group is not None else s
                       for s in range(self.num_stages)]
        self._ctrl = _control_group(process_group)
        # headers are CPU tensors: on the gloo control group when the data group is NCCL
        self._header_group = self._ctrl if self._ctrl is not None else self.group
        self._plan_messages()
        for m in local.local_modules:
            if self.start <= m.index < self.stop:
                m.to(self.device)
            else:
                m.to("meta")
        self.modules = [local.local_modules[j] for j in range(self.start, self.stop)]
        params = [p for m in self.modules for p in m.parameters()]
        self.optimizer = opt_factory(params) if opt_factory is not None else None
        self.scheduler = sched_factory(self.optimizer) if sched_factory is not None else None
        self.scaler = torch.amp.GradScaler(self.device.type) if grad_scaler else None
        self._tick = 0
        self._inflight: List[Tuple[object, Tensor]] = []
        #: running totals: bytes sent forward, seconds blocked receiving or finishing sends
        self.stats = {"bytes_sent": 0, "wait_s": 0.0}
        self.reset_metrics()

    # -------------------------------------------------------------- placement
    def _plan_messages(self) -> None:
        K = self.local.K
        reads = [set(m.context.sources) if m.context is not None else set() for m in self.local]
        # i -> is a_i read by a module after j
        self._reads_after = [set().union(*reads[j + 1:]) if j + 1 < K else set() for j in range(K)]
        needs_x = [(m.context is not None and m.context.image is not None) or m.decoder is not None
                   or 0 in reads[m.index] for m in self.local]
        self._send_x = [any(needs_x[self.bounds[s][1]:]) for s in range(self.num_stages)]
        self._send_a = [sorted(i for i in self._reads_after[self.bounds[s][1] - 1]
                               if 0 < i < self.bounds[s][1])
                        for s in range(self.num_stages)]
        most = max([len(a) for a in self._send_a] + [0])
        self._header_len = 2 + _SLOT * (3 + most)

    def describe(self) -> str:
        """One line per stage: its modules and what it sends forward."""
        lines = []
        for s, (a, b) in enumerate(self.bounds):
            sends = "logits" if s == self.num_stages - 1 else ", ".join(
                ["h"] + (["x"] if self._send_x[s] else []) + ["y"] + [f"a_{i}" for i in self._send_a[s]])
            lines.append(f"stage {s}: local modules {a}..{b - 1}  sends {sends}")
        return "\n".join(lines)

    # -------------------------------------------------------------- modes, state
    @property
    def in_flight(self) -> bool:
        """True between the first :meth:`step` and :meth:`flush` (batches may be in flight)."""
        return self._tick != 0

    @property
    def training(self) -> bool:
        return self.local.training

    def train(self, mode: bool = True) -> "LocalPipeline":
        if self._tick != 0:
            raise RuntimeError("LocalPipeline: call flush() before switching train/eval mode "
                               "(batches are still in flight)")
        for m in self.modules:
            m.train(mode)
        self.local.training = mode
        return self

    def eval(self) -> "LocalPipeline":
        return self.train(False)

    def parameters(self):
        """This stage's parameters."""
        return [p for m in self.modules for p in m.parameters()]

    def state_dict(self) -> Dict[str, object]:
        """This stage's modules (``local.state_dict()`` keys of its modules), optimizer,
        scheduler and grad scaler states."""
        return {"stage": self.stage, "num_stages": self.num_stages, "counts": list(self.counts),
                "model": self._stage_model(self.local.state_dict()),
                "optimizer": self.optimizer.state_dict() if self.optimizer is not None else None,
                "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
                "scaler": self.scaler.state_dict() if self.scaler is not None else None}

    def _stage_model(self, full: Dict[str, Tensor]) -> Dict[str, Tensor]:
        """The entries of ``full`` (a ``local.state_dict()``) that belong to this stage's modules."""
        prefix = tuple(f"local_modules.{j}." for j in range(self.start, self.stop))
        return {k: v for k, v in full.items() if k.startswith(prefix)}

    def gather_state_dict(self, dst: int = 0) -> Optional[Dict[str, Tensor]]:
        """Collective (call on every process): the whole model's ``local.state_dict()``
        assembled on stage ``dst`` from every stage's modules, as CPU tensors in
        ``state_dict`` order, ready for ``LocalSequential.load_state_dict`` in any parallel
        mode (or none); None on the other stages. Keys outside the local modules (the ramp
        gate's step counter) are stage ``dst``'s, equal on every stage. One ``gather_object``
        on the control group; parameters, not optimizer state.

        Raises:
            ValueError: ``dst`` is not a stage index.
            DeadRankError: a stage died during the gather (named).
        """
        if not isinstance(dst, int) or isinstance(dst, bool) or not 0 <= dst < self.num_stages:
            raise ValueError(f"LocalPipeline.gather_state_dict: dst must be a stage index in "
                             f"[0, {self.num_stages}), got {dst!r}")
        full = self.local.state_dict()
        mine = {k: v.detach().cpu() for k, v in self._stage_model(full).items()}
        parts = [None] * self.num_stages if self.stage == dst else None
        try:
            dist.gather_object(mine, parts, dst=self._ranks[dst], group=self._ctrl)
        except Exception as exc:
            raise comm_failure(exc, "the model gather") from exc
        if self.stage != dst:
            return None
        merged = {k: v.detach().cpu() for k, v in full.items() if not k.startswith("local_modules.")}
        for part in parts:
            merged.update(part)
        missing = [k for k in full if k not in merged]
        if missing:  # a stage sent fewer modules than its placement says: never expected
            raise RuntimeError(f"LocalPipeline.gather_state_dict: no stage sent {missing[:3]}")
        return {k: merged[k] for k in full}

    def load_state_dict(self, state: Dict[str, object]) -> None:
        """Restore :meth:`state_dict` of the same stage of the same placement.

        Raises:
            ValueError: the state belongs to another stage or another placement."""
        if (state.get("stage") != self.stage or state.get("num_stages") != self.num_stages
                or list(state.get("counts", [])) != list(self.counts)):
            raise ValueError(f"LocalPipeline: state of stage {state.get('stage')} of "
                             f"{state.get('num_stages')} (modules per stage {state.get('counts')}) "
                             f"cannot load into stage {self.stage} of {self.num_stages} "
                             f"({self.counts})")
        for j in range(self.start, self.stop):
            prefix = f"local_modules.{j}."
            own = {k[len(prefix):]: v for k, v in state["model"].items() if k.startswith(prefix)}
            try:
                self.local.local_modules[j].load_state_dict(own)
            except RuntimeError as exc:
                raise ValueError(f"LocalPipeline: the stage state does not fit local module {j}: "
                                 f"{str(exc).splitlines()[0]}") from exc
        for name, obj in (("optimizer", self.optimizer), ("scheduler", self.scheduler),
                          ("scaler", self.scaler)):
            if obj is not None and state.get(name) is not None:
                obj.load_state_dict(state[name])

    # -------------------------------------------------------------- messages
    def _peer_failure(self, exc: BaseException, what: str, peer_stage: int) -> DeadRankError:
        return comm_failure(exc, f"stage {self.stage} {what} stage {peer_stage} "
                                 f"(rank {self._ranks[peer_stage]})", [self._ranks[peer_stage]])

    def _wait_sends(self) -> None:
        inflight, self._inflight = self._inflight, []
        t0 = time.perf_counter()
        for work, _ in inflight:
            try:
                work.wait()
            except Exception as exc:
                raise self._peer_failure(exc, "sending to", self.stage + 1) from exc
        self.stats["wait_s"] += time.perf_counter() - t0

    def _send(self, tensors: List[Tuple[int, Tensor]]) -> None:
        self._wait_sends()
        header = torch.zeros(self._header_len, dtype=torch.int64)
        header[0] = _BATCH if tensors else _EMPTY
        header[1] = len(tensors)
        wires = []
        for k, (tag, t) in enumerate(tensors):
            w, cl = _wire(t)
            shape = list(t.shape)
            header[2 + _SLOT * k: 2 + _SLOT * (k + 1)] = torch.tensor(
                [tag, _DTYPES.index(t.dtype), t.dim(), int(cl)] + shape + [0] * (4 - len(shape)))
            wires.append(w)
        dst = self._ranks[self.stage + 1]
        try:
            self._inflight.append((dist.isend(header, dst, group=self._header_group), header))
            for w in wires:
                self._inflight.append((dist.isend(w, dst, group=self.group), w))
            self.stats["bytes_sent"] += header.numel() * 8 + sum(w.numel() * w.element_size() for w in wires)
        except Exception as exc:
            raise self._peer_failure(exc, "sending to", self.stage + 1) from exc

    def _recv(self) -> Optional[Dict[int, Tensor]]:
        src = self._ranks[self.stage - 1]
        header = torch.zeros(self._header_len, dtype=torch.int64)
        t0 = time.perf_counter()
        try:
            dist.recv(header, src, group=self._header_group)
            if int(header[0]) == _EMPTY:
                return None
            out: Dict[int, Tensor] = {}
            meta = header[2:2 + _SLOT * int(header[1])].view(-1, _SLOT).tolist()
            for tag, code, ndim, cl, *dims in meta:
                shape = dims[:ndim]
                wire_shape = [shape[0], shape[2], shape[3], shape[1]] if cl else shape
                buf = torch.empty(wire_shape, dtype=_DTYPES[code], device=self.device)
                dist.recv(buf, src, group=self.group)
                out[tag] = buf.permute(0, 3, 1, 2) if cl else buf
        except Exception as exc:
            raise self._peer_failure(exc, "receiving from", self.stage - 1) from exc
        finally:
            self.stats["wait_s"] += time.perf_counter() - t0
        return out

    # -------------------------------------------------------------- ticks
    def step(self, x: Optional[Tensor] = None, y: Optional[Tensor] = None) -> StageOutput:
        """One tick on this process (call it on every process, the same number of times).

        Args:
            x: on rank 0 of the group, (N, C, H, W) the next batch, or None to feed nothing
                (draining); ignored elsewhere.
            y: on rank 0, (N,) int64 labels (required in training mode).

        Returns:
            :class:`StageOutput` of the batch this stage processed this tick (``batch`` is None
            while the pipeline fills or drains).
        """
        tick, self._tick = self._tick, self._tick + 1
        msg: Optional[Dict[int, Tensor]] = None
        if self.stage == 0:
            if x is not None:
                self.local._check_inputs(x, y)
                if self.training and y is None:
                    raise ValueError("LocalPipeline.step: y: training needs labels on rank 0")
                msg = {_TAG_X: x.detach()}
                if y is not None:
                    msg[_TAG_Y] = y
        elif tick > 0:
            msg = self._recv()
        out = StageOutput()
        send: List[Tuple[int, Tensor]] = []
        if msg is not None:
            out, send = self._process(msg, tick - self.stage)
        if self.stage < self.num_stages - 1:
            self._send(send)
        return out

    def _process(self, msg: Dict[int, Tensor], batch: int) -> Tuple[StageOutput, List[Tuple[int, Tensor]]]:
        local, train = self.local, self.training
        x, y = msg.get(_TAG_X), msg.get(_TAG_Y)
        h = msg.get(_TAG_H)
        inputs = {tag - _TAG_A: t for tag, t in msg.items() if tag >= _TAG_A}
        if x is not None and 0 not in inputs:
            inputs[0] = x
        if train:
            if y is None:
                raise RuntimeError(f"LocalPipeline stage {self.stage}: training batch without labels")
            if self.optimizer is not None:
                self.optimizer.zero_grad(set_to_none=True)
        backend = local.backend_for(self.device)
        losses = []
        ctx = torch.enable_grad() if train else torch.no_grad()
        with ctx:
            for m in self.modules:
                h, a, loss = local.module_step(m, h, inputs, x, y, self.scaler, train, backend)
                if loss is not None:
                    losses.append(loss)
                keep = self._reads_after[m.index]
                inputs[m.index] = a
                inputs = {i: t for i, t in inputs.items() if i in keep}
        if train and self.optimizer is not None:
            if self.scaler is not None:
                self.scaler.step(self.optimizer)
                self.scaler.update()
            else:
                self.optimizer.step()
            if self.scheduler is not None:
                self.scheduler.step()
        loss_vec = torch.stack(losses).float() if losses else None
        last = self.stage == self.num_stages - 1
        self._account(loss_vec, h if last else None, y if last else None)
        out = StageOutput(batch, loss_vec, h if last else None, y if last else None)
        send: List[Tuple[int, Tensor]] = []
        if not last:
            send.append((_TAG_H, h))
            if self._send_x[self.stage]:
                send.append((_TAG_X, x))
            if y is not None:
                send.append((_TAG_Y, y))
            send += [(_TAG_A + i, inputs[i]) for i in self._send_a[self.stage]]
        return out, send

    def flush(self) -> List[StageOutput]:
        """Drain: ``P - 1`` ticks feeding nothing, then one tick that collects the last
        (empty) messages. Afterwards every fed batch has passed every stage and no message
        is in flight. Call on every process. Returns this stage's outputs of those ticks."""
        outs = [self.step() for _ in range(self.num_stages - 1)]
        if self.stage > 0 and self._tick > 0:
            leftover = self._recv()
            if leftover is not None:  # pragma: no cover - protocol invariant
                raise RuntimeError("LocalPipeline.flush: a batch arrived after draining")
        self._wait_sends()
        self._tick = 0
        return [o for o in outs if o.batch is not None]

    # -------------------------------------------------------------- metrics
    def reset_metrics(self) -> None:
        """Zero the running sums that :meth:`reduce_metrics` reports."""
        n = self.stop - self.start
        self._loss_sum = torch.zeros(n, dtype=torch.float32, device=self.device)
        self._correct = torch.zeros((), dtype=torch.int64, device=self.device)
        self._batches = 0
        self._images = 0

    def _account(self, loss_vec: Optional[Tensor], logits: Optional[Tensor], y: Optional[Tensor]) -> None:
        self._batches += 1
        if loss_vec is not None:
            self._loss_sum += loss_vec
        if logits is not None and y is not None:
            self._correct += (logits.argmax(1) == y).sum()
            self._images += y.shape[0]

    def reduce_metrics(self, reset: bool = True) -> Dict[str, object]:
        """Collective (call on every process): the mean local losses of all K modules over
        the batches processed since the last reset, the last module's loss, and the number of
        correct predictions and images seen by the last stage. One all-reduce of K + 3 numbers
        on the control group (one host sync per call, none per module)."""
        K = self.local.K
        vec = torch.zeros(K + 3, dtype=torch.float64)
        vec[self.start:self.stop] = self._loss_sum.double().cpu() / max(1, self._batches)
        if self.stage == self.num_stages - 1:
            vec[K] = float(self._correct)
            vec[K + 1] = self._images
            vec[K + 2] = self._batches
        try:
            dist.all_reduce(vec, group=self._ctrl)
        except Exception as exc:
            raise comm_failure(exc, "the metrics all-reduce") from exc
        if reset:
            self.reset_metrics()
        local_losses = vec[:K].tolist()
        images = int(vec[K + 1])
        return {"local_losses": local_losses, "loss": local_losses[-1], "correct": int(vec[K]),
                "images": images, "batches": int(vec[K + 2]),
                "accuracy": 100.0 * vec[K].item() / images if images else None}
