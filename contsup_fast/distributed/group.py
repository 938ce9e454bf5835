"""The process group: joining the one ``torchrun`` describes (:func:`init_distributed`), leaving
it, naming the failed rank of a failed collective (:func:`comm_failure`) and the coordinated stop
(:class:`StopVote`: one rank's Ctrl-C/SIGTERM becomes every rank's stop at the same step)."""
from __future__ import annotations

import contextlib
import datetime
import os
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
from torch import Tensor

from ..local import LocalSequential
from .watchdog import DeadRankError, RankWatchdog

__all__ = ["DistInfo", "init_distributed", "shutdown_distributed", "current", "comm_failure", "StopVote"]


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
