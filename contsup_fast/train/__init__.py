"""Train a model with ContSup greedy local learning (``python -m contsup_fast.train``).

Example (CIFAR-10, the paper's ResNet-32 at K=16 with RnE context)::

    python -m contsup_fast.train --model resnet32 --K 16 --context RnE --data-dir DATA \\
        --epochs 160 --batch-size 1024

Schedule: SGD (Nesterov, momentum 0.9, weight decay 1e-4), learning rate ``0.8 * batch/1024``
unless ``--lr`` is given, linear warm-up for ``min(--warmup-epochs, epochs/4)`` epochs (so a
short run spends at most a quarter of its steps warming up), then cosine decay to zero, both
per iteration.

Every epoch: one summary line, ``<out>/log.json`` (arguments, versions, per-epoch records)
and ``<out>/checkpoint.pt`` (model, optimiser, scheduler, grad scaler, RNG states, position),
both written atomically. Ctrl-C finishes the current step, saves a checkpoint and exits
(status 130); a second Ctrl-C aborts at once. ``--resume RUN_DIR`` (or a checkpoint file)
continues from the saved position, mid-epoch included, and produces exactly the parameters
an uninterrupted run would have produced (bit-identical on the CPU; on CUDA with
``--deterministic``). Settings that change the result (model, K, context, schedule, seed,
data...) are taken from the checkpoint; giving a different value for one of them is an error.

Modules: :mod:`.args` (the command line and its checks), :mod:`.build` (data, model, schedule,
trainer), :mod:`.rundir` (the run folder: checkpoint, log, stop flag, non-finite-loss guard),
:mod:`.runners` (single process, data parallel, pipeline stage), :mod:`.loop` (the epoch loop).
"""
from __future__ import annotations

import sys
import time
from typing import Any, Dict, Optional, Sequence

import torch

from .args import (AUX_CHOICES, AUX_LAYOUT_DEFAULTS, CIFAR_RESNETS, OPTION_ABSENT_MEANS,
                   PARALLEL_RESULT_ARGS, RESULT_ARGS, _prepare_args, build_parser, result_arg_differences)
from .build import _build_model, _local_class, _lr_lambda, param_groups
from .loop import _train
from .rundir import NonFiniteLossError
from .runners import _LocalTrainer, _Parallel, _PipelineTrainer

__all__ = ["build_parser", "main", "run", "RESULT_ARGS", "NonFiniteLossError", "result_arg_differences"]


def run(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    """Parse ``argv`` and train; returns the final metrics. Raises KeyboardInterrupt after
    saving a checkpoint when interrupted (:func:`main` turns that into exit status 130).
    Under torchrun with ``--parallel data|pipeline`` every rank runs this; only rank 0 prints."""
    parser, args, ckpt = _prepare_args(argv)
    t_start = time.time()

    if args.threads:
        torch.set_num_threads(args.threads)
    par = _Parallel.start(args, parser, ckpt)
    try:
        with par.quiet():
            result = _train(parser, args, ckpt, par, t_start)
    except BaseException:
        par.close(clean=False)
        raise
    par.close(clean=True)
    return result


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    """Console entry point (``contsup-train``): :func:`run`, with exit status 130 on Ctrl-C
    (after the checkpoint is saved), and one line (status 1) when another rank died or a local
    loss became non-finite."""
    from ..distributed import DeadRankError
    try:
        return run(argv)
    except KeyboardInterrupt:
        raise SystemExit(130)
    except (DeadRankError, NonFiniteLossError) as exc:
        print(f"contsup-train: error: {exc}", file=sys.stderr, flush=True)
        raise SystemExit(1)

