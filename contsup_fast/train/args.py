"""The command line of ``python -m contsup_fast.train``: the parser, the argument types and the
checks of the arguments against each other, the data folder and a checkpoint being resumed."""
from __future__ import annotations

import argparse
import os
import sys
from typing import Optional, Sequence


from .. import data as D
from ..checkpoint import load_checkpoint, resolve_checkpoint

AUX_CHOICES = ("0c1f", "0c2f", "1c1f", "1c2f", "1c3f", "2c2f", "auglocal", "dgl", "token")
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

#: what ``--aux`` left at its default (None: the layout's head) resolves to, and is recorded as,
#: once the model is built: ``"1c2f"`` where the boundaries carry (N, C, H, W) maps, ``"token"``
#: where they carry tokens or NHWC maps (:func:`contsup_fast.tokens.resolve_aux`)
AUX_LAYOUT_DEFAULTS = ("1c2f", "token")


def result_arg_differences(ours: dict, theirs: dict) -> list:
    """The :data:`RESULT_ARGS` on which two runs' arguments differ, as ``"name: a here, b there"``.

    ``ours`` may be a parsed command line, where ``aux=None`` means the layout's default head;
    ``theirs`` a finished run's recorded arguments (``log.json``), where the head is recorded
    resolved. ``None`` matches a recorded :data:`AUX_LAYOUT_DEFAULTS` entry (the same model gives
    the same resolution; a CNN refuses ``"token"`` and a transformer the convolutional heads, so a
    recorded default is always that model's). Options absent from ``theirs`` take
    :data:`OPTION_ABSENT_MEANS`.
    """
    theirs = {**OPTION_ABSENT_MEANS, **theirs}
    out = []
    for k in RESULT_ARGS:
        a, b = ours.get(k), theirs.get(k)
        if k == "aux" and a is None and b in AUX_LAYOUT_DEFAULTS:
            continue
        if a != b:
            out.append(f"{k}: {a!r} here, {b!r} there")
    return out


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
    if s.lower() in ("balanced", "cost"):
        return s.lower()
    items = [t.strip() for t in s.split(",") if t.strip()]
    try:
        return [int(t) if t.lstrip("-").isdigit() else t for t in items]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--split: expected none, balanced, cost or a comma list, "
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
                        f"classification model name (resnet18, vgg11_bn, ...) or timm:<name>")
    g.add_argument("--K", type=_positive_int, default=16, help="number of local modules")
    g.add_argument("--context", default="RnE",
                   help="context supply: R0 (none), E, Rn, RnE (n from --n) or R<k>, R<k>E")
    g.add_argument("--n", type=_positive_int, default=None,
                   help="residual context depth for Rn/RnE (default 1)")
    g.add_argument("--aux", default=None, choices=AUX_CHOICES,
                   help="auxiliary head: <convs>c<fc layers>f, auglocal (AugLocal: copies of later "
                        "layers), dgl (DGL mlp-sr) or token (ViT/Swin: class token or mean -> LN -> MLP); "
                        "default: the layout's head, 1c2f for CNNs and token for transformers "
                        "(recorded resolved in the run's log)")
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
                   help="where to cut: none (paper preset / cost-balanced; --aux auglocal: AugLocal's "
                        "split), balanced (memory-balanced; per --dataset where the paper has a table), "
                        "cost (cost-balanced, no preset), or a comma list of cut indices or node names")
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


def _context_name(context: str, n: Optional[int]) -> str:
    try:
        from ..context import parse_context
        return parse_context(context, n).name
    except ImportError:  # pragma: no cover
        return context.replace("n", str(n or 1))


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
