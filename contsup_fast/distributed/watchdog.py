"""Heartbeats that name a dead or hung rank (:class:`RankWatchdog`) and the error and exit
status a process gets when a peer dies."""
from __future__ import annotations

import os
import sys
import threading
import time
from typing import List, Optional, Sequence

import torch.distributed as dist

__all__ = ["EXIT_PEER_DEAD", "DeadRankError", "RankWatchdog"]

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
