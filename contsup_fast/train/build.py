"""Building a run from its arguments: the data loaders, the model wrapped as local modules, its
optimizer parameter groups and learning-rate schedule, and the trainer of the run's form."""
from __future__ import annotations

import contextlib
import math
import sys
import warnings
from types import SimpleNamespace
from typing import TYPE_CHECKING, List, Tuple

import numpy as np
import torch

from .. import data as D
from ..presets import PRESET_DATASETS
from .args import _fail

if TYPE_CHECKING:
    from .runners import _Parallel


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
    from .. import LocalSequential
    return LocalSequential


def _build_model(name: str, num_classes: int) -> torch.nn.Module:
    from ..models import build_model
    return build_model(name, num_classes=num_classes)


class _Data:
    """The loaders and facts about the data that the training loop needs."""

    def __init__(self, **kw):
        self.__dict__.update(kw)


def _normalization(args) -> Tuple[Tuple[float, ...], Tuple[float, ...]]:
    """(mean, std) of ``--normalization``: the dataset's statistics (ImageNet's for an
    ImageFolder), or the ContSup reference ``train.py``'s constants (CIFAR: its own; any other
    dataset: 0.5 and 0.5, as the reference does)."""
    if args.normalization == "reference":
        from ..local import REFERENCE_CIFAR_MEAN, REFERENCE_CIFAR_STD
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


def _build_trainer(parser, args, par, data, steps_per_epoch: int) -> SimpleNamespace:
    """Seed the generators, build the model wrapped as local modules and the trainer of the
    run's form (``parser.error`` for a model or an option it refuses). Returns a namespace with
    ``local``, ``K``, ``n_params``, ``warmup_epochs``, ``warmup_iters``, ``trainer`` and
    ``autocast`` (a context-manager factory for ``--amp``)."""
    device = par.device
    total_steps = steps_per_epoch * args.epochs
    torch.manual_seed(args.seed)
    np.random.seed(args.seed % 2**32)
    import random
    random.seed(args.seed)
    try:
        model = _build_model(args.model, data.num_classes)
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
                        preset_dataset=args.dataset.lower() if args.dataset.lower() in PRESET_DATASETS else "cifar10",
                        n=args.n, input_size=(3,) + tuple(data.image_size),
                        image_mean=data.mean, image_std=data.std)
    try:
        local = _local_class()(model, **local_kwargs)
    except ValueError as exc:
        parser.error(str(exc))
    args.aux = local.aux  # --aux left at None: record the head the layout resolved to
    if args.parallel != "pipeline":
        local = local.to(device)
        if args.channels_last:
            local = local.to(memory_format=torch.channels_last)
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

    built = SimpleNamespace(local=local, K=len(local), n_params=sum(p.numel() for p in local.parameters()),
                            warmup_epochs=warmup_epochs, warmup_iters=warmup_iters, autocast=autocast)
    try:
        built.trainer = par.trainer(local, args, opt_factory, sched_factory, autocast)
    except ValueError as exc:
        parser.error(f"--parallel {args.parallel}: {exc}")
    return built
