"""What a run leaves behind and how it stops: the versions and peak memory written to the log,
the stop flag (Ctrl-C, SIGTERM), the non-finite-loss guard, and :class:`RunFolder` (the run
folder's ``checkpoint.pt`` and ``log.json``, the loop's position and the running sums)."""
from __future__ import annotations

import datetime
import os
import platform
import signal
import sys
import time
from typing import Any, Dict, List, Optional

import torch

from ..checkpoint import CHECKPOINT_NAME, atomic_write_json, get_rng_state


def _versions(device: torch.device) -> Dict[str, Any]:
    from importlib import metadata
    v: Dict[str, Any] = {"python": platform.python_version(), "torch": torch.__version__,
                         "platform": platform.platform()}
    for pkg in ("torchvision", "triton", "numpy"):
        try:
            v[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            v[pkg] = None
    if device.type == "cuda":
        v["device_name"] = torch.cuda.get_device_name(device)
        v["cuda"] = torch.version.cuda
    else:
        name = platform.processor() or platform.machine()
        try:
            with open("/proc/cpuinfo") as f:
                for line in f:
                    if line.startswith("model name"):
                        name = line.split(":", 1)[1].strip()
                        break
        except OSError:
            pass
        v["device_name"] = f"{name} ({os.cpu_count()} logical cores, " \
                           f"{torch.get_num_threads()} torch threads)"
    return v


def _peak_memory(device: torch.device):
    """(MiB, what it is) for the epoch that just ended."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20, "CUDA max allocated"
    try:
        import resource
        kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        scale = 1 if sys.platform == "darwin" else 1024  # bytes on macOS, KiB on Linux
        return kb * scale / 2**20, "CPU peak RSS of the process"
    except ImportError:  # pragma: no cover - Windows
        return float("nan"), "unavailable"


def _fmt_time(s: float) -> str:
    return str(datetime.timedelta(seconds=int(round(s))))


class _StopFlag:
    """First SIGINT or any SIGTERM: stop at the next step boundary (after saving). A second
    SIGINT: KeyboardInterrupt at once. (torchrun answers Ctrl-C by sending SIGTERM to the
    workers, which must not turn a clean stop into an abort.)"""

    def __init__(self):
        self.requested = False
        self._old = {}

    def _handler(self, signum, frame):
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        if not self.requested:
            print(f"\n{signal.Signals(signum).name}: finishing the current step and saving a "
                  "checkpoint (Ctrl-C again to abort without saving)", file=sys.stderr, flush=True)
        self.requested = True

    def __enter__(self):
        import threading
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handler)
        return self

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)
        self._old = {}
        return False


class _Interrupted(Exception):
    pass


class NonFiniteLossError(RuntimeError):
    """A local loss became NaN or infinite: the run stops without writing a checkpoint, so the
    last one on disk (if any) holds the last good state."""


class _FiniteGuard:
    """Checks every step's local losses for NaN/inf. The losses stay on the device until
    :meth:`check`, which the loop calls after every step on CPU and every ``--log-every``
    steps and at each epoch's end on a GPU (one host synchronisation, where the loop already
    has one), so the first bad step is still named exactly."""

    def __init__(self, ckpt_path: str, steps_per_epoch: int):
        self.ckpt_path, self.steps_per_epoch = ckpt_path, steps_per_epoch
        self.pending: List[tuple] = []

    def add(self, epoch: int, step: int, lr: float, local_losses: torch.Tensor) -> None:
        self.pending.append((epoch, step, lr, local_losses.detach()))

    def check(self) -> None:
        """Raises:
            NonFiniteLossError: one line naming the first bad step's local module, epoch, step,
                learning rate and the checkpoint kept."""
        if not self.pending:
            return
        losses = torch.stack([p[3] for p in self.pending])
        bad = ~torch.isfinite(losses)
        if not bool(bad.any()):
            self.pending.clear()
            return
        row = int(bad.any(dim=1).nonzero()[0])
        j = int(bad[row].nonzero()[0])
        epoch, step, lr, _ = self.pending[row]
        kept = (f"the last good checkpoint is kept: {self.ckpt_path}" if os.path.exists(self.ckpt_path)
                else "no checkpoint had been written yet")
        raise NonFiniteLossError(
            f"non-finite local loss ({float(losses[row, j])}) in local module {j} at epoch {epoch + 1}, "
            f"step {step}/{self.steps_per_epoch}, lr {lr:.4g}: training stopped; {kept}")


class RunFolder:
    """The run folder ``args.out`` and the loop's bookkeeping that goes into it.

    Holds the loop's position (``pos``: epoch and batch, read when a stop saves mid-epoch), this
    epoch's running sums (``acc``: losses on the device, steps, images, seconds), the per-epoch
    records (``history``), the best test accuracy and the seconds spent by earlier calls of a
    resumed run. Writes ``<out>/checkpoint.pt`` through the trainer (which adds the model,
    optimizer, scheduler and scaler state) and ``<out>/log.json`` (rank 0 only), both atomically.
    """

    def __init__(self, args, par, trainer, t_start: float, steps_per_epoch: int, K: int,
                 run_info: Dict[str, Any]):
        self.args, self.par, self.trainer, self.t_start = args, par, trainer, t_start
        self.device = par.device
        self.steps_per_epoch, self.K, self.run_info = steps_per_epoch, K, run_info
        self.start_epoch, self.start_batch = 0, 0
        self.history: List[Dict[str, Any]] = []
        self.best_acc: Optional[float] = None
        self.elapsed_before = 0.0
        self.partial: Optional[Dict[str, Any]] = None
        self.pos = {"epoch": 0, "batch": 0}
        self.acc: Dict[str, Any] = {}
        self.ckpt_path = os.path.join(args.out, CHECKPOINT_NAME)
        self.log_path = os.path.join(args.out, "log.json")

    def resume(self, ckpt: Dict[str, Any], parser) -> None:
        """Load the trainer's state and the loop's position and records from ``ckpt``
        (``parser.error`` when they do not fit this run)."""
        try:
            self.trainer.load(ckpt, self.args.out)
        except (FileNotFoundError, ValueError, RuntimeError) as exc:
            parser.error(f"--resume: {exc}")
        self.start_epoch, self.start_batch = int(ckpt["epoch"]), int(ckpt.get("batch", 0))
        self.history = list(ckpt.get("history", []))
        self.best_acc = ckpt.get("best_acc")
        self.elapsed_before = float(ckpt.get("elapsed_s", 0.0))
        self.partial = ckpt.get("partial")
        if ckpt.get("steps_per_epoch", self.steps_per_epoch) != self.steps_per_epoch:
            parser.error("--resume: the checkpoint's run had a different number of steps per "
                         "epoch (different data?)")

    def open(self) -> None:
        """Create the folder (rank 0; every rank waits) and fix what the log records."""
        if self.par.is_main:
            os.makedirs(self.args.out, exist_ok=True)
        self.par.barrier()
        self.arg_dict = {k: v for k, v in vars(self.args).items()}
        self.versions = _versions(self.device)
        self.pos = {"epoch": self.start_epoch, "batch": self.start_batch}

    def elapsed(self) -> float:
        """Seconds of training over every call of this run."""
        return self.elapsed_before + time.time() - self.t_start

    def write_log(self, final: Optional[Dict[str, Any]] = None) -> None:
        """Write ``log.json``: arguments, versions, the run's facts, every epoch's record and,
        at the end, ``final`` (rank 0 only)."""
        if not self.par.is_main:
            return
        obj = {"args": self.arg_dict, "versions": self.versions, "run": self.run_info,
               "epochs": self.history}
        if final is not None:
            obj["final"] = final
        atomic_write_json(obj, self.log_path)

    def reset_acc(self, p: Optional[Dict[str, Any]] = None) -> None:
        """Zero the running sums, or start them from a mid-epoch checkpoint's ``partial``."""
        acc, device = self.acc, self.device
        acc.clear()
        acc.update(loss=torch.zeros((), device=device), local=torch.zeros(self.K, device=device),
                   steps=0, images=0, time=0.0, step_losses=[])
        if p:
            acc["loss"] += p["loss_sum"]
            acc["local"] += torch.as_tensor(p["local_sum"], dtype=torch.float32, device=device)
            acc.update(steps=p["steps"], images=p["images"], time=p["time"])
            acc["step_losses"] = [torch.tensor(v, device=device) for v in p.get("step_losses", [])]
        self.trainer.reset_metrics()

    def checkpoint(self, mid_epoch: bool) -> None:
        """Save the run at ``pos`` (with this epoch's running sums when ``mid_epoch``)."""
        args, acc = self.args, self.acc
        state = {
            "format": 1, "epoch": self.pos["epoch"], "batch": self.pos["batch"],
            "steps_per_epoch": self.steps_per_epoch, "args": self.arg_dict, "rng": get_rng_state(),
            "best_acc": self.best_acc, "history": self.history,
            "elapsed_s": self.elapsed(), "partial": None,
            "parallel": args.parallel, "world_size": self.par.world,
        }
        if mid_epoch:
            loss_sum, local_sum = self.trainer.loss_sums(acc)
            state["partial"] = {"loss_sum": loss_sum, "local_sum": local_sum,
                                "steps": acc["steps"], "images": acc["images"],
                                "time": acc["time"],
                                "step_losses": [float(v) for v in acc["step_losses"]]}
        self.trainer.save(state, self.ckpt_path)
