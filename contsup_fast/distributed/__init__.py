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
:class:`StopVote` (one rank's Ctrl-C/SIGTERM becomes every rank's stop at the same ste

Modules: :mod:`.watchdog` (heartbeats), :mod:`.group` (process group, failures, stop vote),
:mod:`.sync_bn` (SyncBatchNorm on CPU and CUDA), :mod:`.ddp` (:class:`LocalDDP`),
:mod:`.balance` (stage balancing), :mod:`.pipeline` (:class:`LocalPipeline`). Every public name
is importable from ``contsup_fast.distributed``.
"""
from .balance import balance_stages, module_costs
from .ddp import LocalDDP
from .group import DistInfo, StopVote, comm_failure, current, init_distributed, shutdown_distributed
from .pipeline import LocalPipeline, StageOutput
from .sync_bn import convert_sync_batchnorm
from .watchdog import EXIT_PEER_DEAD, DeadRankError, RankWatchdog

__all__ = ["LocalDDP", "LocalPipeline", "StageOutput", "DeadRankError", "RankWatchdog",
           "DistInfo", "init_distributed", "shutdown_distributed", "current", "comm_failure",
           "StopVote", "convert_sync_batchnorm", "module_costs", "balance_stages", "EXIT_PEER_DEAD"]
