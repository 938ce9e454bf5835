"""The training loop of one process (every form of run: single process, a data-parallel rank, a
pipeline stage): :func:`_train` builds the run, then :class:`_EpochLoop` runs its epochs (steps,
the epoch's record, checkpoint and log), stops cleanly on Ctrl-C/SIGTERM and reports the end."""
from __future__ import annotations

import os
import sys
import time
from typing import Any, Dict, Optional

import torch

from .args import _context_name
from .build import _build_trainer, _load_data
from .rundir import (NonFiniteLossError, RunFolder, _FiniteGuard, _fmt_time, _Interrupted, _peak_memory,
                     _StopFlag)


def _configure_backends(args, device: torch.device) -> None:
    """``--deterministic``: deterministic algorithms (cuDNN benchmark off); else, on CUDA,
    cuDNN picks the fastest convolution algorithms."""
    if args.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    elif device.type == "cuda":
        torch.backends.cudnn.benchmark = True


class _EpochLoop:
    """The epochs of one run, from the position in ``run`` (fresh or resumed) to the end, an
    early stop (``--stop-after-epochs``) or an interruption."""

    def __init__(self, args, par, run: RunFolder, data, K: int):
        self.args, self.par, self.run, self.data, self.K = args, par, run, data, K
        self.trainer = run.trainer
        self.device = par.device
        self.guard = _FiniteGuard(run.ckpt_path, run.steps_per_epoch)
        self.check_every = 1 if self.device.type == "cpu" else args.log_every
        self.bar = None
        self.last: Optional[Dict[str, Any]] = None

    def evaluate(self) -> float:
        """Test accuracy in percent."""
        correct, seen = self.trainer.evaluate(self.data.test_loader)
        return 100.0 * correct / max(1, seen)

    # ---------------------------------------------------------------- one epoch
    def _steps(self, epoch: int, b0: int, stop: _StopFlag) -> float:
        """Train steps ``b0..steps_per_epoch-1`` of ``epoch``; returns the start time."""
        from tqdm import tqdm
        args, par, run, acc = self.args, self.par, self.run, self.run.acc
        steps_per_epoch = run.steps_per_epoch
        self.bar = bar = tqdm(total=steps_per_epoch, initial=b0, desc=f"epoch {epoch + 1}/{args.epochs}",
                              leave=False, dynamic_ncols=True, disable=args.no_progress or not par.is_main,
                              file=sys.stderr, mininterval=0.5)
        t0 = time.time()
        seen0 = acc["images"]
        for i, (x, y, n_img) in enumerate(par.batches(self.data.loader, b0, steps_per_epoch), start=b0):
            lr_now = self.trainer.lr()
            out = self.trainer.step(x, y)
            if out is not None:
                self.guard.add(epoch, i + 1, lr_now, out.local_losses)
                if (i + 1) % self.check_every == 0:
                    self.guard.check()
                acc["loss"] += out.loss.detach().float()
                acc["step_losses"].append(out.loss.detach().float())  # read at epoch end
                acc["local"] += out.local_losses.detach().float()
            acc["steps"] += 1
            acc["images"] += n_img
            run.pos["batch"] = i + 1
            bar.update(1)
            if (i + 1) % args.log_every == 0 and par.is_main:
                rate = (acc["images"] - seen0) / max(1e-9, time.time() - t0)
                if out is not None:
                    loss_now = out.loss.item()  # the one host sync per log_every steps
                    bar.set_postfix(loss=f"{loss_now:.3f}", img_s=f"{rate:.0f}", refresh=False)
                else:
                    bar.set_postfix(img_s=f"{rate:.0f}", refresh=False)
            if par.should_stop(stop.requested):
                raise _Interrupted
        return t0

    def _record(self, epoch: int, t0: float) -> Dict[str, Any]:
        """Close ``epoch``: check the losses, evaluate when due, print its line and return its
        record (also appended to the run's history)."""
        args, run, acc, device = self.args, self.run, self.run.acc, self.device
        self.trainer.end_epoch()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        self.guard.check()
        acc["time"] += time.time() - t0
        self.bar.close()
        steps = max(1, acc["steps"])
        loss_sum, local_sum = self.trainer.loss_sums(acc)
        train_loss = loss_sum / steps
        local_means = [v / steps for v in local_sum]
        ips = acc["images"] / max(1e-9, acc["time"])
        do_eval = (epoch + 1) % args.eval_every == 0 or epoch + 1 == args.epochs
        test_acc = self.evaluate() if do_eval else None
        if test_acc is not None:
            run.best_acc = test_acc if run.best_acc is None else max(run.best_acc, test_acc)
        mem, mem_kind = _peak_memory(device)
        elapsed = run.elapsed()
        step_losses = (torch.stack(acc["step_losses"]).cpu().tolist()
                       if acc["step_losses"] else [])
        record = {"epoch": epoch + 1, "train_loss": train_loss, "local_losses": local_means,
                  "step_losses": step_losses,
                  "test_acc": test_acc, "lr": self.trainer.lr(),
                  "images_per_s": ips, "train_time_s": acc["time"],
                  "peak_mem_mib": mem, "peak_mem_kind": mem_kind, "elapsed_s": elapsed}
        run.history.append(record)
        acc_txt = f"{test_acc:.2f}%" if test_acc is not None else "-"
        print(f"epoch {epoch + 1}/{args.epochs}  loss {train_loss:.4f}  local "
              f"[first {local_means[0]:.3f} mean {sum(local_means) / self.K:.3f} "
              f"last {local_means[-1]:.3f}]  test acc {acc_txt}  {ips:.0f} img/s  "
              f"peak mem {mem:.0f} MiB ({mem_kind})  elapsed {_fmt_time(elapsed)}",
              flush=True)
        return record

    # ---------------------------------------------------------------- every epoch
    def _epochs(self, stop: _StopFlag) -> Optional[Dict[str, Any]]:
        """Run the remaining epochs; returns the early-stop result, or None at the end."""
        args, par, run = self.args, self.par, self.run
        epochs_this_call = 0
        for epoch in range(run.start_epoch, args.epochs):
            run.pos["epoch"], first = epoch, (epoch == run.start_epoch)
            b0 = run.start_batch if first else 0
            run.pos["batch"] = b0
            run.reset_acc(run.partial if first and b0 > 0 else None)
            self.data.loader.set_epoch(epoch)
            if self.device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(self.device)
            t0 = self._steps(epoch, b0, stop)
            self.last = self._record(epoch, t0)
            run.pos["epoch"], run.pos["batch"] = epoch + 1, 0
            run.checkpoint(mid_epoch=False)
            run.write_log()
            epochs_this_call += 1
            if (args.stop_after_epochs and epochs_this_call >= args.stop_after_epochs
                    and epoch + 1 < args.epochs):
                par.finish_votes()
                print(f"stopping after {epochs_this_call} epoch(s) as asked; continue with "
                      f"--resume {args.out}", flush=True)
                return {"stopped": True, "epoch": epoch + 1, "out": args.out,
                        "checkpoint": run.ckpt_path, "test_acc": self.last["test_acc"]}
        par.finish_votes()
        return None

    def _save_on_stop(self, exc: BaseException) -> None:
        """A stop (Ctrl-C, SIGTERM, any rank's vote): save where the loop stands and raise
        ``KeyboardInterrupt``. A second Ctrl-C on several processes aborts without saving."""
        args, par, run = self.args, self.par, self.run
        if isinstance(exc, KeyboardInterrupt) and par.world > 1:
            print(f"\nrank {par.rank}: aborted without saving; the last checkpoint is "
                  f"{run.ckpt_path}", file=sys.stderr, flush=True)
            raise exc
        self.trainer.end_epoch()
        mid = 0 < run.pos["batch"] and run.pos["epoch"] < args.epochs
        run.checkpoint(mid_epoch=mid)
        run.write_log()
        if par.is_main:
            print(f"\ninterrupted at epoch {run.pos['epoch'] + 1}, step {run.pos['batch']}/"
                  f"{run.steps_per_epoch}: checkpoint saved to {run.ckpt_path}; continue with "
                  f"--resume {args.out}", file=sys.stderr, flush=True)
        raise KeyboardInterrupt

    def __call__(self) -> Optional[Dict[str, Any]]:
        """Train; returns the early-stop result or None when every epoch is done."""
        self.trainer.train()
        stop = _StopFlag()
        try:
            with stop:
                return self._epochs(stop)
        except NonFiniteLossError:
            if self.bar is not None:
                self.bar.close()
            raise
        except (KeyboardInterrupt, _Interrupted) as exc:
            if self.bar is not None:
                self.bar.close()
            self._save_on_stop(exc)


def _train(parser, args, ckpt, par, t_start: float) -> Dict[str, Any]:
    """Build the run described by ``args`` (resuming ``ckpt`` if given), train it and return the
    final metrics (or the early-stop result)."""
    device = par.device
    _configure_backends(args, device)
    try:
        ctx_name = _context_name(args.context, args.n)  # validates --context/--n
    except ValueError as exc:
        parser.error(f"--context/--n: {exc}")
    data = _load_data(parser, args, par)
    steps_per_epoch = par.steps_per_epoch(data.loader, args.batch_size, data.n_train)
    if steps_per_epoch < 1:
        parser.error(f"--batch-size {args.batch_size}: no training step of at least 2 images per "
                     f"process fits {data.n_train} images on {par.world} processes")
    built = _build_trainer(parser, args, par, data, steps_per_epoch)
    K = built.K
    run_info = {"device": str(device), "data_dir": os.path.abspath(data.data_dir),
                "train_images": int(data.n_train), "test_images": int(data.n_test),
                "num_classes": data.num_classes, "K": K, "context": ctx_name,
                "steps_per_epoch": steps_per_epoch, "warmup_iters": built.warmup_iters,
                "parameters": built.n_params, "data_warnings": data.warnings, **par.describe()}
    run = RunFolder(args, par, built.trainer, t_start, steps_per_epoch, K, run_info)
    if ckpt is not None:
        run.resume(ckpt, parser)
    run.open()

    label = (f"{args.model}, K={K}, context={ctx_name}, {args.epochs} epochs"
             + (f", subset {args.subset}" if args.subset else "") + f", {device.type}"
             + par.label())
    print(f"contsup-train: {label}; {data.n_train} train / {data.n_test} test images, "
          f"batch {args.batch_size}, lr {args.lr:g}, warm-up {built.warmup_epochs:g} epochs, "
          f"{steps_per_epoch} steps/epoch, out {args.out}"
          + (f" (resumed at epoch {run.start_epoch + 1}, step {run.start_batch})" if ckpt else ""),
          flush=True)

    loop = _EpochLoop(args, par, run, data, K)
    stopped = loop()
    if stopped is not None:
        return stopped
    last = loop.last
    if last is None:  # resumed a finished run
        last = run.history[-1] if run.history else {}
        final_acc = last.get("test_acc")
        if final_acc is None:
            final_acc = loop.evaluate()
    else:
        final_acc = last["test_acc"]
    final = {"final_test_acc": final_acc, "best_test_acc": run.best_acc,
             "train_loss": last.get("train_loss"), "epochs": args.epochs,
             "images_per_s": last.get("images_per_s"),
             "elapsed_s": run.elapsed(), "out": args.out,
             "checkpoint": run.ckpt_path, "log": run.log_path, "device": str(device),
             "context": ctx_name, "K": K}
    run.write_log(final)
    print(f"final test accuracy: {final_acc:.2f}% ({label})", flush=True)
    return final
