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
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import math
import os
import platform
import signal
import sys
import time
import warnings
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from . import data as D
from .checkpoint import (CHECKPOINT_NAME, atomic_write_json, get_rng_state, load_checkpoint,
                         resolve_checkpoint, save_checkpoint, set_rng_state)

__all__ = ["build_parser", "main", "run", "RESULT_ARGS", "NonFiniteLossError"]

AUX_CHOICES = ("0c1f", "0c2f", "1c1f", "1c2f", "1c3f", "2c2f", "auglocal", "dgl")
CIFAR_RESNETS = ("resnet20", "resnet32", "resnet44", "resnet56", "resnet110")

#: arguments that change the trained parameters: on --resume they come from the checkpoint,
#: and giving a different value is refused
RESULT_ARGS = ("model", "K", "context", "n", "aux", "loss", "reconstruct", "split", "dataset",
               "epochs", "batch_size", "lr", "momentum", "wd", "warmup_epochs", "seed", "subset",
               "amp", "context_gate", "context_gate_epochs", "context_gate_init", "context_mean", "warmup_start",
               "aux_depth", "aux_pyramid", "width_groups", "normalization")


#: the value a result argument had in runs written before the option existed (their checkpoints
#: lack the key): a resume continues them with it, not with today's default
OPTION_ABSENT_MEANS = {"context_mean": "none", "normalization": "dataset"}


def param_groups(params, local: torch.nn.Module) -> List[dict]:
    """Optimizer parameter groups of ``params`` (all or some of ``local``'s parameters): the
    learned context gates (``*.context.gate``) in a group of their own without weight decay,
    every other parameter in the first group."""
    gate_ids = {id(p) for k, p in local.named_parameters() if k.endswith(".context.gate")}
    params = list(params)
    groups = [{"params": [p for p in params if id(p) not in gate_ids]}]
    gates = [p for p in params if id(p) in gate_ids]
    if gates:
        groups.append({"params": gates, "weight_decay": 0.0})
    return groups


def _positive_int(s: str) -> int:
    v = int(s)
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {s}")
    return v


def _nonneg_int(s: str) -> int:
    v = int(s)
    if v < 0:
        raise argparse.ArgumentTypeError(f"must be an integer >= 0, got {s}")
    return v


def _nonneg_float(s: str) -> float:
    v = float(s)
    if not v >= 0:
        raise argparse.ArgumentTypeError(f"must be a number >= 0, got {s}")
    return v


def _pyramid_arg(s: str) -> Optional[float]:
    if s.strip().lower() == "none":
        return None
    try:
        v = float(s)
    except ValueError:
        v = float("nan")
    if not 0.0 <= v <= 1.0:
        raise argparse.ArgumentTypeError(f"must be a number in [0, 1] or none, got {s}")
    return v


def _split_arg(s: str):
    s = s.strip()
    if s.lower() in ("", "none"):
        return None
    if s.lower() == "balanced":
        return "balanced"
    items = [t.strip() for t in s.split(",") if t.strip()]
    try:
        return [int(t) if t.lstrip("-").isdigit() else t for t in items]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--split: expected none, balanced or a comma list, "
                                         f"got {s!r}")


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Appends "(default: X)" only where the help text does not already give the default."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "default" in text or any(action.default is v for v in (None, False, argparse.SUPPRESS)):
            return text
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="contsup-train", description="ContSup greedy local learning on image classification.",
        formatter_class=_HelpFormatter,
        epilog="Resume an interrupted or stopped run with --resume RUN_DIR; settings that change "
               "the result are taken from its checkpoint.")
    g = p.add_argument_group("model")
    g.add_argument("--model", default="resnet32",
                   help=f"CIFAR ResNet ({'/'.join(CIFAR_RESNETS)}) or a torchvision "
                        f"classification model name (resnet18, vgg11_bn, ...)")
    g.add_argument("--K", type=_positive_int, default=16, help="number of local modules")
    g.add_argument("--context", default="RnE",
                   help="context supply: R0 (none), E, Rn, RnE (n from --n) or R<k>, R<k>E")
    g.add_argument("--n", type=_positive_int, default=None,
                   help="residual context depth for Rn/RnE (default 1)")
    g.add_argument("--aux", default="1c2f", choices=AUX_CHOICES,
                   help="auxiliary head: <convs>c<fc layers>f, auglocal (AugLocal: copies of later "
                        "layers) or dgl (DGL mlp-sr)")
    g.add_argument("--aux-depth", type=_positive_int, default=2,
                   help="AugLocal head depth d (layers copied into each head)")
    g.add_argument("--aux-pyramid", type=_pyramid_arg, default=0.5,
                   help="AugLocal pyramid coefficient gamma in [0, 1], or none for depth d everywhere")
    g.add_argument("--width-groups", type=_positive_int, default=None,
                   help="GN-DGL width-wise groups G: grouped convolutions inside each local module, "
                        "G heads per module (evaluation reports the final classifier)")
    g.add_argument("--loss", default="ce", choices=("ce", "supcon"), help="local loss")
    g.add_argument("--reconstruct", action="store_true",
                   help="add the InfoPro-style image-reconstruction local loss")
    g.add_argument("--split", type=_split_arg, default=None,
                   help="where to cut: none (paper preset / cost-balanced), balanced "
                        "(memory-balanced), or a comma list of cut indices or node names")
    g.add_argument("--context-gate", default="none", choices=("none", "ramp", "learned"),
                   help="scale every context term by a gate g: none (the paper's form, g=1), ramp "
                        "(g rises linearly from 0 to 1 over --context-gate-epochs), learned (one "
                        "learnable |theta| per term, no weight decay)")
    g.add_argument("--context-gate-epochs", type=_nonneg_float, default=None,
                   help="length of the ramp gate in epochs (default: the warm-up length)")
    g.add_argument("--context-gate-init", type=float, default=0.1,
                   help="initial value of learned gates")
    g.add_argument("--context-mean", default="last", choices=("none", "last", "all"),
                   help="a boundary takes the mean (h + terms) / (1 + terms) instead of the sum: "
                        "last (default: the boundary feeding the last module, whose classifier "
                        "then reads the scale it has without context: no loss spike), none (the "
                        "paper's exact form, with --context-gate none), all")
    g.add_argument("--backend", default="auto", choices=("auto", "torch", "triton", "native"),
                   help="implementation of the fused boundary ops")
    g = p.add_argument_group("data")
    g.add_argument("--normalization", default="dataset", choices=("dataset", "reference"),
                   help="input normalisation: dataset (the training set's per-channel statistics) "
                        "or reference (the ContSup reference train.py's constants: "
                        "(125.3, 123.0, 113.9)/255 and (63.0, 62.1, 66.7)/255 for CIFAR, 0.5/0.5 "
                        "otherwise)")
    g.add_argument("--dataset", default="cifar10",
                   help="cifar10, cifar100, or a torchvision dataset present in --data-dir "
                        "(svhn, stl10, ...)")
    g.add_argument("--data-dir", default=None,
                   help="folder holding the dataset (for CIFAR-10 the one containing "
                        "cifar-10-batches-py/); default: $CONTSUP_DATA_CACHE/<dataset> or "
                        "~/.cache/contsup_fast/<dataset> if the dataset is there")
    g.add_argument("--subset", type=_positive_int, default=None,
                   help="train on a fixed class-balanced subset of this many images (the same "
                        "subset for every --seed)")
    g.add_argument("--num-workers", type=_nonneg_int, default=None,
                   help="CPU loader worker processes (default 0: the batched tensor "
                        "augmentation costs well under 1%% of a CPU step; unused on CUDA)")
    g = p.add_argument_group("optimisation")
    g.add_argument("--epochs", type=_positive_int, default=160, help="training epochs")
    g.add_argument("--batch-size", type=_positive_int, default=1024, help="images per step")
    g.add_argument("--lr", type=_nonneg_float, default=None,
                   help="peak learning rate (default 0.8 * batch_size / 1024)")
    g.add_argument("--momentum", type=_nonneg_float, default=0.9,
                   help="SGD momentum (Nesterov when > 0)")
    g.add_argument("--wd", type=_nonneg_float, default=1e-4, help="weight decay")
    g.add_argument("--warmup-epochs", type=_nonneg_float, default=10.0,
                   help="linear warm-up length, capped at epochs/4; cosine decay after it")
    g.add_argument("--warmup-start", type=_nonneg_float, default=0.0,
                   help="learning-rate multiplier the warm-up starts from (0: from lr/steps, "
                        "0.0125: the reference recipe's 0.01 at lr 0.8)")
    g.add_argument("--seed", type=int, default=0,
                   help="seeds the initialisation, the shuffling and the augmentation")
    g.add_argument("--amp", default="none", choices=("none", "bf16", "fp16"),
                   help="autocast precision; fp16 uses a GradScaler")
    g = p.add_argument_group("runtime")
    g.add_argument("--device", default=None,
                   help="torch device (default cuda if available, else cpu)")
    g.add_argument("--channels-last", action="store_true", help="NHWC memory format")
    g.add_argument("--deterministic", action="store_true",
                   help="torch.use_deterministic_algorithms (exact resume on CUDA; slower)")
    g.add_argument("--threads", type=_positive_int, default=None,
                   help="torch.set_num_threads (default: torch's choice)")
    g.add_argument("--out", default=None,
                   help="run folder (default runs/<model>_K<K>_<context>_<seed>; on --resume the "
                        "checkpoint's folder)")
    g.add_argument("--resume", default=None, help="checkpoint file or run folder to continue")
    g.add_argument("--eval-every", type=_positive_int, default=1,
                   help="evaluate on the test set every this many epochs (and after the last)")
    g.add_argument("--log-every", type=_positive_int, default=20,
                   help="read losses back from the device (one host sync) every this many steps "
                        "to update the progress bar")
    g.add_argument("--no-progress", action="store_true", help="no tqdm progress bar")
    g.add_argument("--stop-after-epochs", type=_positive_int, default=None,
                   help="checkpoint and stop after this many epochs of this invocation (for "
                        "time-limited jobs; continue with --resume)")
    _add_parallel_args(p)
    return p


def _explicit_keys(parser: argparse.ArgumentParser, argv: Sequence[str]) -> set:
    """Names of the options given on the command line (not left at their default)."""
    probe = argparse.ArgumentParser(add_help=False)
    for a in parser._actions:
        if a.option_strings and a.dest != "help":
            kw = dict(dest=a.dest, default=argparse.SUPPRESS)
            if isinstance(a, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
                kw["action"] = "store_true"
            else:
                kw["nargs"] = a.nargs
            probe.add_argument(*a.option_strings, **kw)
    ns, _ = probe.parse_known_args(list(argv))
    return set(vars(ns))


# --------------------------------------------------------------------------------------------
# helpers


def _context_name(context: str, n: Optional[int]) -> str:
    try:
        from .context import parse_context
        return parse_context(context, n).name
    except ImportError:  # pragma: no cover
        return context.replace("n", str(n or 1))


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


def _lr_lambda(warmup_iters: int, total_iters: int, start: float = 0.0):
    """Multiplier of the peak learning rate at ``step``: linear warm-up from ``start`` (plus one
    step's increment) to 1 over ``warmup_iters`` steps, then cosine decay to 0 at
    ``total_iters``."""
    def f(step: int) -> float:
        if step < warmup_iters:
            return start + (1.0 - start) * (step + 1) / warmup_iters
        span = max(1, total_iters - warmup_iters)
        t = min(1.0, (step - warmup_iters) / span)
        return 0.5 * (1.0 + math.cos(math.pi * t))
    return f


def _local_class():
    from . import LocalSequential
    return LocalSequential


def _build_model(name: str, num_classes: int) -> torch.nn.Module:
    from .models import build_model
    return build_model(name, num_classes=num_classes)


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


# --------------------------------------------------------------------------------------------
# data, and multi-process runs (--parallel data|pipeline under torchrun)


def _add_parallel_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("multi-process (launch with torchrun --nproc-per-node N -m contsup_fast.train)")
    g.add_argument("--parallel", default="none", choices=("none", "data", "pipeline"),
                   help="data: every process trains the whole model on its share of each batch "
                        "(gradients averaged after each local module); pipeline: each process "
                        "trains a contiguous stage of local modules, batches stream through")
    g.add_argument("--stages", type=_stages_arg, default=None,
                   help="pipeline: comma list of local modules per stage, one per process "
                        "(default: balance the splitter's cost)")
    g.add_argument("--sync-bn", action="store_true",
                   help="data: BatchNorm statistics over the whole batch of all processes")
    g.add_argument("--image-size", type=_positive_int, default=224,
                   help="--dataset imagefolder: training crop and evaluation centre crop (the "
                        "evaluation resize is 256/224 of it)")
    g.add_argument("--dist-timeout", type=float, default=300.0,
                   help="seconds a process waits for the others before failing; a dead or hung "
                        "rank is named")


def _stages_arg(s: str):
    if s.strip().lower() in ("", "none", "balanced"):
        return None
    try:
        counts = [int(t) for t in s.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a comma list of module counts, got {s!r}")
    if not counts or min(counts) < 1:
        raise argparse.ArgumentTypeError(f"module counts must be >= 1, got {s!r}")
    return counts


#: settings of a multi-process run that change its result (refused on --resume if changed)
PARALLEL_RESULT_ARGS = ("parallel", "stages", "sync_bn", "image_size")


def _env_rank() -> int:
    try:
        return int(os.environ.get("RANK", "0"))
    except ValueError:
        return 0


def _silence_parser_off_rank0(parser: argparse.ArgumentParser) -> None:
    """Under torchrun every rank parses the same arguments; only rank 0 reports an error."""
    if _env_rank() > 0:
        parser.print_usage = lambda file=None: None
        parser.exit = lambda status=0, message=None: sys.exit(status)


def _fail(parser: argparse.ArgumentParser, message: str) -> None:
    """Exit with status 2 and one line ``contsup-train: error: message`` (no usage text)."""
    parser.exit(2, f"{parser.prog}: error: {message}\n")


def _check_data_dir(args) -> None:
    """One-line FileNotFoundError for a missing --data-dir or a wrong ImageFolder layout."""
    if args.dataset == "imagefolder":
        if not args.data_dir:
            raise FileNotFoundError(f"--dataset imagefolder needs --data-dir DIR holding "
                                    f"{D.IMAGEFOLDER_LAYOUT}")
        D.check_imagefolder(args.data_dir)
        return
    if args.data_dir and not os.path.isdir(os.path.expanduser(args.data_dir)):
        raise FileNotFoundError(f"--data-dir {args.data_dir!r} does not exist")
    D.find_data_dir(args.dataset, args.data_dir)


def _check_parallel_args(parser, args, ckpt) -> None:
    if not args.dist_timeout > 0:
        _fail(parser, f"--dist-timeout must be > 0 seconds, got {args.dist_timeout}")
    if args.parallel != "pipeline" and args.stages is not None:
        _fail(parser, "--stages is for --parallel pipeline")
    if args.parallel != "data" and args.sync_bn:
        _fail(parser, "--sync-bn is for --parallel data")
    if ckpt is None:
        return
    world = int(os.environ.get("WORLD_SIZE", "1")) if args.parallel != "none" else 1
    saved_mode, saved_world = ckpt.get("parallel", "none"), int(ckpt.get("world_size", 1))
    if (saved_mode, saved_world) != (args.parallel, world):
        _fail(parser, f"--resume: the checkpoint was written by --parallel {saved_mode} on "
                     f"{saved_world} process(es); this run is --parallel {args.parallel} on {world}. "
                     f"Resume it with the same launch (torchrun --nproc-per-node {saved_world} ... "
                     f"--parallel {saved_mode})" if saved_mode != "none" else
                     f"--resume: the checkpoint was written by a single-process run; resume it "
                     f"without --parallel and without torchrun")
    for k in PARALLEL_RESULT_ARGS:
        if ckpt["args"].get(k, getattr(args, k)) != getattr(args, k):
            _fail(parser, f"--resume: --{k.replace('_', '-')}: checkpoint has "
                         f"{ckpt['args'].get(k)!r}, command line {getattr(args, k)!r}")


class _Data:
    """The loaders and facts about the data that the training loop needs."""

    def __init__(self, **kw):
        self.__dict__.update(kw)


def _normalization(args) -> Tuple[Tuple[float, ...], Tuple[float, ...]]:
    """(mean, std) of ``--normalization``: the dataset's statistics (ImageNet's for an
    ImageFolder), or the ContSup reference ``train.py``'s constants (CIFAR: its own; any other
    dataset: 0.5 and 0.5, as the reference does)."""
    if args.normalization == "reference":
        from .local import REFERENCE_CIFAR_MEAN, REFERENCE_CIFAR_STD
        if args.dataset.lower().startswith("cifar"):
            return REFERENCE_CIFAR_MEAN, REFERENCE_CIFAR_STD
        return (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)
    return D.dataset_stats(args.dataset)


def _load_data(parser, args, par: "_Parallel") -> _Data:
    """Train and test loaders: the in-memory tensor loaders (CIFAR and torchvision datasets)
    or the ImageFolder loaders; data parallel shards the ImageFolder ones per rank."""
    device = par.device
    if args.dataset == "imagefolder":
        if args.subset is not None:
            parser.error("--subset is not supported with --dataset imagefolder")
        if args.normalization != "dataset":
            parser.error(f"--normalization {args.normalization} is not supported with --dataset "
                         f"imagefolder (its loader normalises with ImageNet statistics); allowed: dataset")
        shard = args.parallel == "data"
        try:
            loader, test_loader, classes = D.imagefolder_loaders(
                args.data_dir, args.batch_size, max(args.batch_size, 256), device, seed=args.seed,
                rank=par.rank if shard else 0, world_size=par.world if shard else 1,
                num_workers=args.num_workers, channels_last=args.channels_last,
                size=args.image_size)
        except (FileNotFoundError, ValueError) as exc:
            _fail(parser, str(exc))
        n_train = len(loader.dataset)
        base = test_loader.dataset
        n_test = len(base.dataset if isinstance(base, torch.utils.data.Subset) else base)
        mean, std = D.IMAGENET_STATS
        return _Data(loader=loader, test_loader=test_loader, num_classes=len(classes),
                     data_dir=args.data_dir, warnings=[], mean=mean, std=std, n_train=n_train,
                     n_test=n_test, image_size=(args.image_size, args.image_size))
    data_dir = D.find_data_dir(args.dataset, args.data_dir)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            x_train, y_train = D.load_dataset(data_dir, args.dataset, train=True)
            x_test, y_test = D.load_dataset(data_dir, args.dataset, train=False)
        except (FileNotFoundError, ValueError) as exc:
            _fail(parser, f"--data-dir {data_dir!r}: {str(exc).splitlines()[0]}")
    data_warnings = [str(w.message) for w in caught]
    if par.is_main:
        for msg in data_warnings:  # once each, without a source line
            print(f"warning: {msg}", file=sys.stderr, flush=True)
    n_classes = D.num_classes(args.dataset, y_train)
    if args.subset is not None:
        if args.subset > len(y_train):
            parser.error(f"--subset {args.subset} exceeds the {len(y_train)} training images of "
                         f"{args.dataset}")
        idx = D.subset_indices(y_train, args.subset, seed=0)
        x_train, y_train = x_train[idx], y_train[idx]
    if len(y_train) < 2:
        parser.error("need at least 2 training images")
    mean, std = _normalization(args)
    loader = D.make_train_loader(x_train, y_train, args.batch_size, mean, std, device,
                                 seed=args.seed, channels_last=args.channels_last,
                                 num_workers=0 if args.num_workers is None else args.num_workers)
    test_loader = D.EvalLoader(x_test, y_test, max(args.batch_size, 256), mean, std, device,
                               channels_last=args.channels_last)
    return _Data(loader=loader, test_loader=test_loader, num_classes=n_classes, data_dir=data_dir,
                 warnings=data_warnings, mean=mean, std=std, n_train=len(y_train),
                 n_test=len(y_test), image_size=tuple(x_train.shape[1:3]))


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
            from .distributed import StopVote
            self._vote = StopVote()

    @classmethod
    def start(cls, args, parser, ckpt) -> "_Parallel":
        if args.parallel == "none":
            device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
            if device.type == "cuda" and not torch.cuda.is_available():
                parser.error(f"--device {args.device}: CUDA is not available")
            return cls("none", device)
        from .distributed import init_distributed
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
        from .distributed import shutdown_distributed
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
        from .distributed import comm_failure
        try:
            dist.barrier(group=self.info.control_group)
        except Exception as exc:
            raise comm_failure(exc, "a barrier") from exc

    def all_sum(self, values: Sequence[float]) -> List[float]:
        """Element-wise sum over the ranks (one small gloo all-reduce)."""
        if self.info is None:
            return list(values)
        import torch.distributed as dist
        from .distributed import comm_failure
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
            from .distributed import LocalDDP
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
        from .distributed import LocalPipeline
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


# --------------------------------------------------------------------------------------------
# main


def _prepare_args(argv: Optional[Sequence[str]]):
    parser = build_parser()
    _silence_parser_off_rank0(parser)
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    explicit = _explicit_keys(parser, argv)
    ckpt = None
    if args.resume:
        try:
            ckpt_path = resolve_checkpoint(args.resume)
            ckpt = load_checkpoint(ckpt_path)
        except (FileNotFoundError, RuntimeError) as exc:
            parser.error(f"--resume: {exc}")
        saved = {**OPTION_ABSENT_MEANS, **ckpt["args"]}
        bad = [f"--{k.replace('_', '-')}: checkpoint has {saved.get(k)!r}, command line "
               f"{getattr(args, k)!r}" for k in RESULT_ARGS
               if k in explicit and saved.get(k) != getattr(args, k)]
        if bad:
            parser.error("--resume: these settings differ from the checkpoint's run (resuming "
                         "must continue the same run; start a new run with another --out "
                         "instead):\n  " + "\n  ".join(bad))
        for k, v in saved.items():  # the saved run's settings unless given now
            if k not in explicit and k not in ("resume", "stop_after_epochs") and hasattr(args, k):
                setattr(args, k, v)
        if "out" not in explicit:
            args.out = os.path.dirname(os.path.abspath(ckpt_path))
    if args.lr is None:
        args.lr = 0.8 * args.batch_size / 1024
    if args.out is None:
        try:
            ctx = _context_name(args.context, args.n)
        except ValueError:
            ctx = args.context  # reported as an error later
        args.out = os.path.join("runs", f"{args.model}_K{args.K}_{ctx}_{args.seed}")
    try:
        _check_data_dir(args)
    except FileNotFoundError as exc:
        _fail(parser, str(exc))
    _check_parallel_args(parser, args, ckpt)
    return parser, args, ckpt


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


def _train(parser, args, ckpt, par: "_Parallel", t_start: float) -> Dict[str, Any]:
    device = par.device
    if args.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    elif device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    try:
        ctx_name = _context_name(args.context, args.n)  # validates --context/--n
    except ValueError as exc:
        parser.error(f"--context/--n: {exc}")

    # ---- data
    data = _load_data(parser, args, par)
    loader, test_loader, n_classes = data.loader, data.test_loader, data.num_classes
    data_dir, data_warnings, mean, std = data.data_dir, data.warnings, data.mean, data.std
    n_train, n_test = data.n_train, data.n_test
    steps_per_epoch = par.steps_per_epoch(loader, args.batch_size, n_train)
    if steps_per_epoch < 1:
        parser.error(f"--batch-size {args.batch_size}: no training step of at least 2 images per "
                     f"process fits {n_train} images on {par.world} processes")
    total_steps = steps_per_epoch * args.epochs

    # ---- model
    torch.manual_seed(args.seed)
    np.random.seed(args.seed % 2**32)
    import random
    random.seed(args.seed)
    try:
        model = _build_model(args.model, n_classes)
    except ValueError as exc:
        parser.error(f"--model: {exc}")
    warmup_epochs = min(args.warmup_epochs, args.epochs / 4)
    warmup_iters = int(round(warmup_epochs * steps_per_epoch))
    gate = None if args.context_gate in (None, "none") else args.context_gate
    gate_epochs = warmup_epochs if args.context_gate_epochs is None else args.context_gate_epochs
    local_kwargs = dict(K=args.K, context=args.context, aux=args.aux, loss=args.loss,
                        context_gate=gate, context_gate_init=args.context_gate_init,
                        context_mean=None if args.context_mean in (None, "none") else args.context_mean,
                        context_gate_steps=max(1, int(round(gate_epochs * steps_per_epoch)))
                        if gate == "ramp" else None,
                        reconstruct=args.reconstruct, split=args.split, backend=args.backend,
                        aux_depth=args.aux_depth, aux_pyramid=args.aux_pyramid,
                        width_groups=args.width_groups,
                        n=args.n, input_size=(3,) + tuple(data.image_size),
                        image_mean=mean, image_std=std)
    try:
        local = _local_class()(model, **local_kwargs)
    except ValueError as exc:
        parser.error(str(exc))
    if args.parallel != "pipeline":
        local = local.to(device)
        if args.channels_last:
            local = local.to(memory_format=torch.channels_last)
    K = len(local)
    n_params = sum(p.numel() for p in local.parameters())

    amp_dtype = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}[args.amp]

    def autocast():
        if amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device.type, dtype=amp_dtype)

    def opt_factory(params):
        return torch.optim.SGD(param_groups(params, local), lr=args.lr, momentum=args.momentum,
                               nesterov=args.momentum > 0, weight_decay=args.wd)

    def sched_factory(opt):
        return torch.optim.lr_scheduler.LambdaLR(
            opt, _lr_lambda(warmup_iters, total_steps, args.warmup_start))

    try:
        trainer = par.trainer(local, args, opt_factory, sched_factory, autocast)
    except ValueError as exc:
        parser.error(f"--parallel {args.parallel}: {exc}")

    # ---- state (fresh or resumed)
    start_epoch, start_batch = 0, 0
    history: List[Dict[str, Any]] = []
    best_acc, elapsed_before = None, 0.0
    partial = None
    if ckpt is not None:
        try:
            trainer.load(ckpt, args.out)
        except (FileNotFoundError, ValueError, RuntimeError) as exc:
            parser.error(f"--resume: {exc}")
        start_epoch, start_batch = int(ckpt["epoch"]), int(ckpt.get("batch", 0))
        history = list(ckpt.get("history", []))
        best_acc = ckpt.get("best_acc")
        elapsed_before = float(ckpt.get("elapsed_s", 0.0))
        partial = ckpt.get("partial")
        if ckpt.get("steps_per_epoch", steps_per_epoch) != steps_per_epoch:
            parser.error("--resume: the checkpoint's run had a different number of steps per "
                         "epoch (different data?)")

    if par.is_main:
        os.makedirs(args.out, exist_ok=True)
    par.barrier()
    ckpt_path = os.path.join(args.out, CHECKPOINT_NAME)
    log_path = os.path.join(args.out, "log.json")
    arg_dict = {k: v for k, v in vars(args).items()}
    versions = _versions(device)
    run_info = {"device": str(device), "data_dir": os.path.abspath(data_dir),
                "train_images": int(n_train), "test_images": int(n_test),
                "num_classes": n_classes, "K": K, "context": ctx_name,
                "steps_per_epoch": steps_per_epoch, "warmup_iters": warmup_iters,
                "parameters": n_params, "data_warnings": data_warnings, **par.describe()}

    def write_log(final=None):
        if not par.is_main:
            return
        obj = {"args": arg_dict, "versions": versions, "run": run_info, "epochs": history}
        if final is not None:
            obj["final"] = final
        atomic_write_json(obj, log_path)

    # position of the loop, updated as it goes (read by the interrupt handler)
    pos = {"epoch": start_epoch, "batch": start_batch}
    acc = {}

    def reset_acc(p=None):
        acc.clear()
        acc.update(loss=torch.zeros((), device=device), local=torch.zeros(K, device=device),
                   steps=0, images=0, time=0.0, step_losses=[])
        if p:
            acc["loss"] += p["loss_sum"]
            acc["local"] += torch.as_tensor(p["local_sum"], dtype=torch.float32, device=device)
            acc.update(steps=p["steps"], images=p["images"], time=p["time"])
            acc["step_losses"] = [torch.tensor(v, device=device) for v in p.get("step_losses", [])]
        trainer.reset_metrics()

    def checkpoint(mid_epoch: bool):
        state = {
            "format": 1, "epoch": pos["epoch"], "batch": pos["batch"],
            "steps_per_epoch": steps_per_epoch, "args": arg_dict, "rng": get_rng_state(),
            "best_acc": best_acc, "history": history,
            "elapsed_s": elapsed_before + time.time() - t_start, "partial": None,
            "parallel": args.parallel, "world_size": par.world,
        }
        if mid_epoch:
            loss_sum, local_sum = trainer.loss_sums(acc)
            state["partial"] = {"loss_sum": loss_sum, "local_sum": local_sum,
                                "steps": acc["steps"], "images": acc["images"],
                                "time": acc["time"],
                                "step_losses": [float(v) for v in acc["step_losses"]]}
        trainer.save(state, ckpt_path)

    def evaluate() -> float:
        correct, seen = trainer.evaluate(test_loader)
        return 100.0 * correct / max(1, seen)

    label = (f"{args.model}, K={K}, context={ctx_name}, {args.epochs} epochs"
             + (f", subset {args.subset}" if args.subset else "") + f", {device.type}"
             + par.label())
    print(f"contsup-train: {label}; {n_train} train / {n_test} test images, "
          f"batch {args.batch_size}, lr {args.lr:g}, warm-up {warmup_epochs:g} epochs, "
          f"{steps_per_epoch} steps/epoch, out {args.out}"
          + (f" (resumed at epoch {start_epoch + 1}, step {start_batch})" if ckpt else ""),
          flush=True)

    from tqdm import tqdm
    trainer.train()
    guard = _FiniteGuard(ckpt_path, steps_per_epoch)
    check_every = 1 if device.type == "cpu" else args.log_every
    stop = _StopFlag()
    epochs_this_call = 0
    last = None
    bar = None
    try:
        with stop:
            for epoch in range(start_epoch, args.epochs):
                pos["epoch"], first = epoch, (epoch == start_epoch)
                b0 = start_batch if first else 0
                pos["batch"] = b0
                reset_acc(partial if first and b0 > 0 else None)
                loader.set_epoch(epoch)
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(device)
                bar = tqdm(total=steps_per_epoch, initial=b0, desc=f"epoch {epoch + 1}/{args.epochs}",
                           leave=False, dynamic_ncols=True, disable=args.no_progress or not par.is_main,
                           file=sys.stderr, mininterval=0.5)
                t0 = time.time()
                seen0 = acc["images"]
                for i, (x, y, n_img) in enumerate(par.batches(loader, b0, steps_per_epoch), start=b0):
                    lr_now = trainer.lr()
                    out = trainer.step(x, y)
                    if out is not None:
                        guard.add(epoch, i + 1, lr_now, out.local_losses)
                        if (i + 1) % check_every == 0:
                            guard.check()
                        acc["loss"] += out.loss.detach().float()
                        acc["step_losses"].append(out.loss.detach().float())  # read at epoch end
                        acc["local"] += out.local_losses.detach().float()
                    acc["steps"] += 1
                    acc["images"] += n_img
                    pos["batch"] = i + 1
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
                trainer.end_epoch()
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                guard.check()
                acc["time"] += time.time() - t0
                bar.close()
                steps = max(1, acc["steps"])
                loss_sum, local_sum = trainer.loss_sums(acc)
                train_loss = loss_sum / steps
                local_means = [v / steps for v in local_sum]
                ips = acc["images"] / max(1e-9, acc["time"])
                do_eval = (epoch + 1) % args.eval_every == 0 or epoch + 1 == args.epochs
                test_acc = evaluate() if do_eval else None
                if test_acc is not None:
                    best_acc = test_acc if best_acc is None else max(best_acc, test_acc)
                mem, mem_kind = _peak_memory(device)
                elapsed = elapsed_before + time.time() - t_start
                step_losses = (torch.stack(acc["step_losses"]).cpu().tolist()
                               if acc["step_losses"] else [])
                last = {"epoch": epoch + 1, "train_loss": train_loss, "local_losses": local_means,
                        "step_losses": step_losses,
                        "test_acc": test_acc, "lr": trainer.lr(),
                        "images_per_s": ips, "train_time_s": acc["time"],
                        "peak_mem_mib": mem, "peak_mem_kind": mem_kind, "elapsed_s": elapsed}
                history.append(last)
                acc_txt = f"{test_acc:.2f}%" if test_acc is not None else "-"
                print(f"epoch {epoch + 1}/{args.epochs}  loss {train_loss:.4f}  local "
                      f"[first {local_means[0]:.3f} mean {sum(local_means) / K:.3f} "
                      f"last {local_means[-1]:.3f}]  test acc {acc_txt}  {ips:.0f} img/s  "
                      f"peak mem {mem:.0f} MiB ({mem_kind})  elapsed {_fmt_time(elapsed)}",
                      flush=True)
                pos["epoch"], pos["batch"] = epoch + 1, 0
                checkpoint(mid_epoch=False)
                write_log()
                epochs_this_call += 1
                if (args.stop_after_epochs and epochs_this_call >= args.stop_after_epochs
                        and epoch + 1 < args.epochs):
                    par.finish_votes()
                    print(f"stopping after {epochs_this_call} epoch(s) as asked; continue with "
                          f"--resume {args.out}", flush=True)
                    return {"stopped": True, "epoch": epoch + 1, "out": args.out,
                            "checkpoint": ckpt_path, "test_acc": test_acc}
            par.finish_votes()
    except NonFiniteLossError:
        if bar is not None:
            bar.close()
        raise
    except (KeyboardInterrupt, _Interrupted) as exc:
        if bar is not None:
            bar.close()
        if isinstance(exc, KeyboardInterrupt) and par.world > 1:
            print(f"\nrank {par.rank}: aborted without saving; the last checkpoint is "
                  f"{ckpt_path}", file=sys.stderr, flush=True)
            raise
        trainer.end_epoch()
        mid = 0 < pos["batch"] and pos["epoch"] < args.epochs
        checkpoint(mid_epoch=mid)
        write_log()
        if par.is_main:
            print(f"\ninterrupted at epoch {pos['epoch'] + 1}, step {pos['batch']}/{steps_per_epoch}:"
                  f" checkpoint saved to {ckpt_path}; continue with --resume {args.out}",
                  file=sys.stderr, flush=True)
        raise KeyboardInterrupt

    if last is None:  # resumed a finished run
        last = history[-1] if history else {}
        final_acc = last.get("test_acc")
        if final_acc is None:
            final_acc = evaluate()
    else:
        final_acc = last["test_acc"]
    final = {"final_test_acc": final_acc, "best_test_acc": best_acc,
             "train_loss": last.get("train_loss"), "epochs": args.epochs,
             "images_per_s": last.get("images_per_s"),
             "elapsed_s": elapsed_before + time.time() - t_start, "out": args.out,
             "checkpoint": ckpt_path, "log": log_path, "device": str(device),
             "context": ctx_name, "K": K}
    write_log(final)
    print(f"final test accuracy: {final_acc:.2f}% ({label})", flush=True)
    return final


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    """Console entry point (``contsup-train``): :func:`run`, with exit status 130 on Ctrl-C
    (after the checkpoint is saved), and one line (status 1) when another rank died or a local
    loss became non-finite."""
    from .distributed import DeadRankError
    try:
        return run(argv)
    except KeyboardInterrupt:
        raise SystemExit(130)
    except (DeadRankError, NonFiniteLossError) as exc:
        print(f"contsup-train: error: {exc}", file=sys.stderr, flush=True)
        raise SystemExit(1)


if __name__ == "__main__":
    main()
