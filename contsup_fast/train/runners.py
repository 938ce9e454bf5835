"""How this process takes part in a run (:class:`_Parallel`: alone, a data-parallel rank or a
pipeline stage) and the trainers that step, evaluate, save and load: :class:`_LocalTrainer`
(single process and data parallel) and :class:`_PipelineTrainer` (one pipeline stage)."""
from __future__ import annotations

import contextlib
import os
from typing import Any, Dict, List, Optional, Sequence

import torch

from ..checkpoint import get_rng_state, load_checkpoint, save_checkpoint, set_rng_state
from .args import _fail


class _Parallel:
    """How this process takes part in the run: alone (``--parallel none``), as one rank of
    data-parallel training, or as one pipeline stage. Owns the process group (through
    :mod:`contsup_fast.distributed`), the batch sharding and the stop vote."""

    def __init__(self, mode: str, device: torch.device, info=None):
        self.mode, self.device, self.info = mode, device, info
        self.rank = info.rank if info is not None else 0
        self.world = info.world_size if info is not None else 1
        self.is_main = self.rank == 0
        self.stages: Optional[List[int]] = None
        self._vote = None
        if info is not None:
            from ..distributed import StopVote
            self._vote = StopVote()

    @classmethod
    def start(cls, args, parser, ckpt) -> "_Parallel":
        if args.parallel == "none":
            device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
            if device.type == "cuda" and not torch.cuda.is_available():
                parser.error(f"--device {args.device}: CUDA is not available")
            return cls("none", device)
        from ..distributed import init_distributed
        if args.device and torch.device(args.device).type == "cuda" and not torch.cuda.is_available():
            parser.error(f"--device {args.device}: CUDA is not available")
        try:
            info = init_distributed(timeout_s=args.dist_timeout, device=args.device)
        except (RuntimeError, ValueError) as exc:
            _fail(parser, str(exc))
        small = args.batch_size < 2 * info.world_size
        if args.parallel == "data" and args.dataset != "imagefolder" and small:
            parser.error(f"--batch-size {args.batch_size}: data parallel on {info.world_size} "
                         f"processes needs at least {2 * info.world_size} images per step")
        return cls(args.parallel, info.device, info)

    # ---------------------------------------------------------------- process lifetime
    def quiet(self):
        """Inside: ranks other than 0 print nothing to stdout."""
        if self.is_main:
            return contextlib.nullcontext()
        return contextlib.redirect_stdout(open(os.devnull, "w"))

    def close(self, clean: bool) -> None:
        if self.info is None:
            return
        from ..distributed import shutdown_distributed
        if clean:
            self.barrier()
            if self.info.watchdog is not None:
                self.info.watchdog.close()
            self.barrier()  # every watchdog stopped before the store's host leaves
        shutdown_distributed(clean)

    def barrier(self) -> None:
        if self.info is None:
            return
        import torch.distributed as dist
        from ..distributed import comm_failure
        try:
            dist.barrier(group=self.info.control_group)
        except Exception as exc:
            raise comm_failure(exc, "a barrier") from exc

    def all_sum(self, values: Sequence[float]) -> List[float]:
        """Element-wise sum over the ranks (one small gloo all-reduce)."""
        if self.info is None:
            return list(values)
        import torch.distributed as dist
        from ..distributed import comm_failure
        t = torch.tensor(list(values), dtype=torch.float64)
        try:
            dist.all_reduce(t, group=self.info.control_group)
        except Exception as exc:
            raise comm_failure(exc, "a metrics all-reduce") from exc
        return t.tolist()

    def should_stop(self, requested: bool) -> bool:
        """All ranks stop at the same step when any rank was asked to (one step later)."""
        return requested if self._vote is None else self._vote.poll(requested)

    def finish_votes(self) -> None:
        if self._vote is not None:
            self._vote.finish()

    # ---------------------------------------------------------------- batches
    def steps_per_epoch(self, loader, batch_size: int, n_train: int) -> int:
        n = len(loader)
        if self.mode == "data" and not getattr(loader, "sharded", False) and n > 0:
            last = n_train - (n - 1) * batch_size
            if last < 2 * self.world:  # a rank would get fewer than 2 images
                n -= 1
        return n

    def batches(self, loader, start: int, steps: int):
        """``(x, y, images in the global batch)`` for steps ``start..steps-1``: this rank's
        share in data-parallel mode, nothing on pipeline stages other than the first."""
        if self.mode == "pipeline" and self.rank != 0:
            for _ in range(start, steps):
                yield None, None, 0
            return
        sharded = getattr(loader, "sharded", False)
        for _, (x, y) in zip(range(start, steps), loader.iter_from(start)):
            n = len(y) * (self.world if sharded else 1)
            if self.mode == "data" and not sharded:
                x, y = x[self.rank::self.world], y[self.rank::self.world]
            yield x, y, n

    def trainer(self, local, args, opt_factory, sched_factory, autocast):
        if self.mode == "pipeline":
            return _PipelineTrainer(local, args, self, opt_factory, sched_factory, autocast)
        return _LocalTrainer(local, args, self, opt_factory, sched_factory, autocast)

    def describe(self) -> Dict[str, Any]:
        return {"parallel": self.mode, "world_size": self.world, "stages": self.stages}

    def label(self) -> str:
        if self.mode == "none":
            return ""
        extra = f", stages {self.stages}" if self.stages else ""
        return f", {self.mode} parallel on {self.world} processes{extra}"


class _LocalTrainer:
    """One optimizer over the whole model: single process, or data parallel (LocalDDP)."""

    def __init__(self, local, args, par: _Parallel, opt_factory, sched_factory, autocast):
        self.local, self.par, self.autocast = local, par, autocast
        self.model = local
        if par.mode == "data":
            from ..distributed import LocalDDP
            self.model = LocalDDP(local, sync_bn=args.sync_bn)
        self.opt = opt_factory(local.parameters())
        self.sched = sched_factory(self.opt)
        self.scaler = torch.amp.GradScaler(par.device.type) if args.amp == "fp16" else None

    def train(self) -> None:
        self.model.train()

    def step(self, x, y):
        self.opt.zero_grad(set_to_none=True)
        with self.autocast():
            out = self.model(x, y, scaler=self.scaler)
        if self.scaler is not None:
            self.scaler.step(self.opt)
            self.scaler.update()
        else:
            self.opt.step()
        self.sched.step()
        return out

    def end_epoch(self) -> None:
        pass

    def reset_metrics(self) -> None:
        pass

    def loss_sums(self, acc):
        """(sum of last-module losses, per-module sums) over this epoch's steps, averaged
        over the ranks."""
        values = [float(acc["loss"])] + acc["local"].float().cpu().tolist()
        if self.par.world > 1:
            values = [v / self.par.world for v in self.par.all_sum(values)]
        return values[0], values[1:]

    def lr(self) -> float:
        return self.sched.get_last_lr()[0]

    def evaluate(self, test_loader):
        self.model.eval()
        par = self.par
        correct = torch.zeros((), dtype=torch.int64, device=par.device)
        seen = 0
        shard = par.mode == "data" and not getattr(test_loader, "sharded", False)
        with torch.no_grad(), self.autocast():
            for x, y in test_loader:
                if shard:
                    x, y = x[par.rank::par.world], y[par.rank::par.world]
                if len(y) == 0:
                    continue
                logits = self.model(x)
                correct += (logits.argmax(1) == y).sum()
                seen += len(y)
        self.model.train()
        if par.world > 1:
            c, n = par.all_sum([float(correct), float(seen)])
            return int(c), int(n)
        return int(correct), seen

    def save(self, state, path: str) -> None:
        state.update(model=self.local.state_dict(), optimizer=self.opt.state_dict(),
                     scheduler=self.sched.state_dict(),
                     scaler=self.scaler.state_dict() if self.scaler is not None else None)
        if self.par.is_main:
            save_checkpoint(state, path)
        self.par.barrier()

    def load(self, ckpt, out_dir: str) -> None:
        self.local.load_state_dict(ckpt["model"])
        self.opt.load_state_dict(ckpt["optimizer"])
        self.sched.load_state_dict(ckpt["scheduler"])
        if self.scaler is not None and ckpt.get("scaler"):
            self.scaler.load_state_dict(ckpt["scaler"])
        set_rng_state(ckpt.get("rng"))


def _stage_file(out_dir: str, stage: int, stages: int) -> str:
    return os.path.join(out_dir, f"stage{stage}of{stages}.pt")


class _PipelineTrainer:
    """One stage of a :class:`~contsup_fast.distributed.LocalPipeline` with its own optimizer
    and LR schedule. A checkpoint is one file per stage (its modules, optimizer, scheduler and
    RNG: what resuming reads) plus rank 0's run checkpoint, which also holds the whole model's
    ``state_dict`` under ``"model"`` (gathered from the stages) as in the other modes."""

    def __init__(self, local, args, par: _Parallel, opt_factory, sched_factory, autocast):
        from ..distributed import LocalPipeline
        self.par, self.autocast = par, autocast
        self.pipe = LocalPipeline(local, stages=args.stages, opt_factory=opt_factory,
                                  sched_factory=sched_factory, device=par.device,
                                  grad_scaler=args.amp == "fp16")
        if args.channels_last:
            for m in self.pipe.modules:
                m.to(memory_format=torch.channels_last)
        par.stages = list(self.pipe.counts)

    def train(self) -> None:
        self.pipe.train()

    def step(self, x, y):
        with self.autocast():
            self.pipe.step(x, y)
        return None

    def end_epoch(self) -> None:
        if self.pipe.in_flight:
            self.pipe.flush()

    def reset_metrics(self) -> None:
        self.pipe.reset_metrics()

    def loss_sums(self, acc):
        m = self.pipe.reduce_metrics(reset=False)
        partial = acc["local"].float().cpu().tolist()
        local = [p + v * m["batches"] for p, v in zip(partial, m["local_losses"])]
        return float(acc["loss"]) + m["loss"] * m["batches"], local

    def lr(self) -> float:
        return self.pipe.scheduler.get_last_lr()[0]

    def evaluate(self, test_loader):
        pipe = self.pipe
        pipe.eval()
        pipe.reset_metrics()
        if pipe.stage == 0:
            for x, y in test_loader:
                with self.autocast():
                    pipe.step(x, y)
        else:
            for _ in range(len(test_loader)):
                with self.autocast():
                    pipe.step()
        pipe.flush()
        m = pipe.reduce_metrics()
        pipe.train()
        return m["correct"], m["images"]

    def save(self, state, path: str) -> None:
        pipe, par = self.pipe, self.par
        out_dir = os.path.dirname(path)
        save_id = [state["epoch"], state["batch"]]
        save_checkpoint({"pipeline": pipe.state_dict(), "rng": get_rng_state(), "save_id": save_id},
                        _stage_file(out_dir, pipe.stage, pipe.num_stages))
        model = pipe.gather_state_dict(dst=0)  # the whole model in rank 0's run checkpoint
        par.barrier()
        if par.is_main:
            state.update(model=model, optimizer=None, scheduler=None, scaler=None,
                         stages=list(pipe.counts), save_id=save_id,
                         stage_files=[os.path.basename(_stage_file(out_dir, s, pipe.num_stages))
                                      for s in range(pipe.num_stages)])
            save_checkpoint(state, path)
        par.barrier()

    def load(self, ckpt, out_dir: str) -> None:
        pipe = self.pipe
        if list(ckpt.get("stages") or []) != list(pipe.counts):
            raise ValueError(f"the checkpoint's stages {ckpt.get('stages')} differ from this "
                             f"run's {pipe.counts}")
        path = _stage_file(out_dir, pipe.stage, pipe.num_stages)
        st = load_checkpoint(path)
        if st.get("save_id") != ckpt.get("save_id"):
            raise ValueError(f"{path!r} is from another save ({st.get('save_id')}) than the run "
                             f"checkpoint ({ckpt.get('save_id')}); the save was interrupted")
        pipe.load_state_dict(st["pipeline"])
        set_rng_state(st.get("rng"))
