"""Parity against the authors' ContSup code (github.com/Tab-ct/ContSup, ``networks_dev/`` and
``train.py``; Yu et al., arXiv 2312.07636), imported at run time from ``<ref-dir>/ContSup``.

Configurations are read from the reference's own ``command.sh`` (every ``python train.py``
line, deduplicated); :data:`EXTRA` adds the memory-balanced splits with the reconstruction
loss, which ``command.sh`` never combines but ``train.py`` supports (its
``local_loss_scale_for_memory_balance``).

Both sides are built from one :class:`Config` the way each codebase's user would: the
reference as its ``train.py`` builds it (``--aux_net_config 1c2f --aux_net_widen 1
--aux_net_feature_dim 128 --droprate 0``), ours as ``LocalSequential(CifarResNet(depth),
K, context, loss, reconstruct, split="balanced" if --balanced_memory, backend,
context_mean=None, image_mean/std = the reference's constants, preset_dataset=--dataset)``,
every other option at its default (so our split tables, head widths and loss weights, those of
STL-10 and SVHN included, are under test).

Run-time shims (nothing in the reference's files is changed): while the reference is
constructed, ``Tensor.cuda()`` returns the tensor (its constructor moves two normalisation
constants to the GPU); while it runs a training step, ``Tensor.backward`` is wrapped to
record each tensor it is called on (the reference computes and back-propagates its local
losses inside ``forward`` and returns none of them).
"""
from __future__ import annotations

import contextlib
import importlib
import re
import shlex
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch
from torch import Tensor, nn

from ..reference_contsup import _cuda_call_is_identity, load_reference
from .core import (MapReport, copy_by_map, named_grads, randomize_bn, record_ours_step, recording_backward, sgd)

__all__ = ["Config", "command_configs", "EXTRA", "load", "build_reference", "build_ours", "name_map",
           "record_ref_step", "loss_scale", "REF_CIFAR_MEAN", "REF_CIFAR_STD"]

REFERENCE = "ContSup"
DIRNAME = "ContSup"  # the checkout's folder under --ref-dir

#: the reference train.py's normalisation constants (CIFAR; other datasets use 127.5/255).
REF_CIFAR_MEAN = tuple(v / 255.0 for v in (125.3, 123.0, 113.9))
REF_CIFAR_STD = tuple(v / 255.0 for v in (63.0, 62.1, 66.7))
REF_OTHER = tuple(v / 255.0 for v in (127.5, 127.5, 127.5))

#: the reference's first-epoch learning rate under its cosine schedule with warm-up
#: (train.py ``adjust_learning_rate`` at epoch 1: 0.01 * (11 - 1) / 10).
REF_LR = 0.01


@dataclass(frozen=True)
class Config:
    """One reference configuration (the ``train.py`` arguments that change the model)."""

    model: str          # "resnet32" | "resnet110"
    K: int
    context: str        # R0 E R1 R1E R2 R4 R8 R16
    loss: str           # "cross_entropy" | "contrast"
    h_reconstruct: bool = False
    balanced: bool = False
    dataset: str = "cifar10"
    source: str = "command.sh"

    @property
    def name(self) -> str:
        return (f"{self.model} K={self.K} {self.context} {'ce' if self.loss == 'cross_entropy' else 'supcon'}"
                + (" +recon" if self.h_reconstruct else "") + (" balanced" if self.balanced else "")
                + ("" if self.dataset == "cifar10" else f" {self.dataset}"))

    @property
    def image_size(self) -> int:
        return 96 if "stl" in self.dataset else 32

    @property
    def classes(self) -> int:
        # train.py: ``args.dataset in ['cifar10', 'sl10', 'svhn'] and 10 or 100`` (sic: STL-10
        # gets 100 classes there; both sides are built with what the reference builds)
        return 10 if self.dataset in ("cifar10", "sl10", "svhn") else 100

    @property
    def normalisation(self) -> Tuple[tuple, tuple]:
        return (REF_CIFAR_MEAN, REF_CIFAR_STD) if "cifar" in self.dataset else (REF_OTHER, REF_OTHER)


#: balanced splits with the reconstruction loss (train.py supports them; command.sh has none)
EXTRA = [Config("resnet32", k, "R1E", "cross_entropy", True, True, source="extra") for k in (2, 4, 8)] + \
        [Config("resnet110", k, "E", "contrast", True, True, source="extra") for k in (2, 3, 4)]


def _truthy(v: str) -> bool:
    return bool(v)  # argparse ``type=bool``: any non-empty string is True


def command_configs(ref_dir: str) -> List[Config]:
    """Every ``python train.py`` line of ``<ref_dir>/command.sh``, parsed as its argparse
    would, deduplicated in file order."""
    text = (Path(ref_dir) / "command.sh").read_text()
    seen, out = set(), []
    for line in text.splitlines():
        if "train.py" not in line or line.lstrip().startswith("#"):
            continue
        toks = shlex.split(line)
        args = {}
        for i, t in enumerate(toks):
            if t.startswith("--") and i + 1 < len(toks) and not toks[i + 1].startswith("--"):
                args[t[2:]] = toks[i + 1]
        cfg = Config(model=f"{args.get('model', 'resnet')}{args['layers']}", K=int(args["local_module_num"]),
                     context=args.get("context_mode", "E"), loss=args.get("local_loss_mode", "contrast"),
                     h_reconstruct=_truthy(args.get("h_reconstruct", "")),
                     balanced=_truthy(args.get("balanced_memory", "")), dataset=args.get("dataset", "cifar10"))
        if cfg not in seen:
            seen.add(cfg)
            out.append(cfg)
    return out


def load(ref_dir: str):
    """``(networks_dev.resnet, networks_dev.configs)`` imported from the checkout ``ref_dir``."""
    resnet = load_reference(ref_dir)
    return resnet, importlib.import_module("networks_dev.configs")


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype):
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def build_reference(resnet_mod, cfg: Config, batch: int) -> nn.Module:
    """The reference model as its ``train.py`` builds it, in float64 on the CPU."""
    with _default_dtype(torch.float64), _cuda_call_is_identity(torch.device("cpu")):
        net = getattr(resnet_mod, cfg.model)(
            local_module_num=cfg.K, batch_size=batch, image_size=cfg.image_size, balanced_memory=cfg.balanced,
            dataset=cfg.dataset, class_num=cfg.classes, wide_list=(16, 16, 32, 64), dropout_rate=0.0,
            aux_net_config="1c2f", local_loss_mode=cfg.loss, aux_net_widen=1, aux_net_feature_dim=128,
            context_mode=cfg.context, h_reconstruct=cfg.h_reconstruct)
    return net.double()


def loss_scale(configs_mod, cfg: Config) -> Tuple[float, float, float, float]:
    """``(ixx_1, ixy_1, ixx_2, ixy_2)`` as the reference's ``train.py`` picks them (zeros when
    its table has no entry: they are then unused, since without ``--h_reconstruct`` the local
    loss is the classifier's alone)."""
    table = configs_mod.local_loss_scale_for_memory_balance if cfg.balanced else configs_mod.local_loss_scale
    try:
        return tuple(float(v) for v in table[cfg.model][cfg.dataset][cfg.K])
    except KeyError:
        if cfg.h_reconstruct:
            raise
        return (0.0, 0.0, 0.0, 0.0)


def build_ours(cfg: Config, backend: str, configs_mod=None) -> nn.Module:
    """Our ``LocalSequential`` for ``cfg`` (see the module docstring), float64."""
    from contsup_fast import LocalSequential
    from contsup_fast.models.cifar_resnet import CifarResNet
    from contsup_fast.local import REFERENCE_CIFAR_MEAN, REFERENCE_CIFAR_STD
    # the library's option for the reference's constants (CLI --normalization reference)
    from contsup_fast.presets import PRESET_DATASETS
    mean, std = (REFERENCE_CIFAR_MEAN, REFERENCE_CIFAR_STD) if "cifar" in cfg.dataset else cfg.normalisation
    with _default_dtype(torch.float64):
        model = CifarResNet(int(cfg.model[len("resnet"):]), num_classes=cfg.classes)
        # the dataset's preset tables (split, loss weights), as the CLI's --dataset selects them
        local = LocalSequential(model, K=cfg.K, context=cfg.context,
                                loss="ce" if cfg.loss == "cross_entropy" else "supcon",
                                reconstruct=cfg.h_reconstruct,
                                preset_dataset=cfg.dataset if cfg.dataset in PRESET_DATASETS else "cifar10",
                                split="balanced" if cfg.balanced else None, backend=backend,
                                feature_dim=128, input_size=(3, cfg.image_size, cfg.image_size),
                                image_mean=mean, image_std=std, context_mean=None)
    return local.double()


_HEAD_1C2F = {"0": "convs.0", "1": "norm", "5": "mlp.0", "7": "mlp.2"}
_ENCODER = {"0": "conv1", "1": "bn1", "3": "conv2", "4": "bn2"}
_RESENCODER = {"0": "conv", "1": "bn"}


def _head_1c2f(ref: nn.Module, cut: str, index: str) -> str:
    return _HEAD_1C2F[index]


def name_map(ref: nn.Module, ours: nn.Module, head_target=_head_1c2f) -> Dict[str, Optional[str]]:
    """Reference state name -> our state name (None: no counterpart).

    * backbone ``conv1 bn1 layerS.B.* fc`` -> ``local_modules.j.body.<same>`` for the module j
      whose body holds it;
    * ``aux_classifier_S_B.head.{0,1,5,7}`` (1c2f: conv, BN, linear, linear) of the c-th cut
      ``(S, B)`` of the reference's table -> ``local_modules.c.head.{convs.0,norm,mlp.0,mlp.2}``;
    * ``decoder_S_B.decoder.{0,1,3}`` -> ``local_modules.c.decoder.net.{0,1,3}``;
    * ``cont_sup_node.encoder_j.encoder.{0,1,3,4}`` (node j feeds module j+1) ->
      ``local_modules.(j+1).context.image.{conv1,bn1,conv2,bn2}``;
    * ``cont_sup_node.resencoder_j_r.encoder.{0,1}`` (reads the r-th context, ``a_{j-r}``) ->
      ``local_modules.(j+1).context.residual.r.{conv,bn}``.

    The reference builds a decoder, an image encoder and a residual encoder at every cut
    whether its options use them or not; those map to our tensors only when ours builds them.
    ``head_target(ref, "S_B", index)`` names our head's submodule for the reference head's
    ``head.<index>`` (default: the 1c2f table above).
    """
    ours_names = set(ours.state_dict())
    body_of = {}
    for n in ours_names:
        m = re.match(r"local_modules\.(\d+)\.body\.(.+)$", n)
        if m:
            body_of[m.group(2)] = f"local_modules.{m.group(1)}.body.{m.group(2)}"
    cuts = {f"{s}_{b}": c for c, (s, b) in enumerate(cut_table(ref))}
    out: Dict[str, Optional[str]] = {}
    for rname in ref.state_dict():
        target = None
        m = re.match(r"(aux_classifier|decoder)_(\d+_\d+)\.(head|decoder)\.(\d+)\.(.+)$", rname)
        e = re.match(r"cont_sup_node\.encoder_(\d+)\.encoder\.(\d+)\.(.+)$", rname)
        r = re.match(r"cont_sup_node\.resencoder_(\d+)_(\d+)\.encoder\.(\d+)\.(.+)$", rname)
        if m:
            c = cuts[m.group(2)]
            if m.group(1) == "aux_classifier":
                target = f"local_modules.{c}.head.{head_target(ref, m.group(2), m.group(4))}.{m.group(5)}"
            else:
                target = f"local_modules.{c}.decoder.net.{m.group(4)}.{m.group(5)}"
        elif e:
            target = f"local_modules.{int(e.group(1)) + 1}.context.image.{_ENCODER[e.group(2)]}.{e.group(3)}"
        elif r:
            target = (f"local_modules.{int(r.group(1)) + 1}.context.residual.{r.group(2)}."
                      f"{_RESENCODER[r.group(3)]}.{r.group(4)}")
        else:
            target = body_of.get(rname, f"local_modules.?.body.{rname}")
        # a tensor the reference builds for an option this configuration does not use
        out[rname] = target if (target in ours_names or not _optional(rname)) else None
    return out


def _optional(rname: str) -> bool:
    return rname.startswith(("decoder_", "cont_sup_node."))


def cut_table(ref: nn.Module) -> List[Tuple[int, int]]:
    """The reference's ``(stage, block)`` cuts: ContSup's ``ContSup_config``, InfoPro's
    ``infopro_config`` or AugLocal's ``net_config`` (``(stage, block, layer)``; the same code
    lineage)."""
    for attr in ("ContSup_config", "infopro_config", "net_config"):  # ContSup, InfoPro, AugLocal
        table = getattr(ref, attr, None)
        if table is not None:
            return [(c[0], c[1]) for c in table]
    raise ValueError(f"{type(ref).__name__} has no table of cuts")


def split_of(ref: nn.Module) -> List[str]:
    """The reference's cuts as our fx node names (``(S, B)`` -> ``layerS_B``, ``(0, 0)`` -> ``relu``)."""
    return ["relu" if s == 0 else f"layer{s}_{b}" for s, b in cut_table(ref)]


def record_ref_step(net: nn.Module, x: Tensor, y: Tensor, scale) -> Dict[str, Dict[str, Tensor]]:
    """One reference training call ``net(img=x, target=y, ixx_1=..)`` (gradients accumulate),
    recorded in the categories of :func:`~bench.parity.core.record_ours_step`: the tensor of
    each ``backward`` call in order (K local losses), module outputs ``h_j`` (the input of cut
    j's auxiliary classifier; the last module's is the logits) and inputs ``a_j`` (the image,
    then ContSup's node outputs, or for InfoPro, which has no context, ``h_{j-1}``)."""
    node = getattr(net, "cont_sup_node", None)
    losses: List[Tensor] = []
    hs: List[Tensor] = []
    As: List[Tensor] = [x.detach().clone()]
    hooks = [getattr(net, f"aux_classifier_{s}_{b}").register_forward_pre_hook(
        lambda mod, args: hs.append(args[0].detach().clone())) for s, b in cut_table(net)]
    if node is not None:
        hooks.append(node.register_forward_hook(lambda mod, args, out: As.append(out[0].detach().clone())))
    try:
        with recording_backward(losses):
            logits = net(img=x, target=y, ixx_1=scale[0], ixy_1=scale[1], ixx_2=scale[2], ixy_2=scale[3])[0]
    finally:
        for h in hooks:
            h.remove()
    if node is None:
        As += hs
    hs.append(logits.detach())
    return {"losses": {f"loss{j}": l for j, l in enumerate(losses)},
            "inputs": {f"a{j}": a for j, a in enumerate(As)},
            "outputs": {f"h{j}": h for j, h in enumerate(hs)},
            "logits": {"logits": logits.detach().clone()}}


def _buffers(module: nn.Module, names) -> Dict[str, Tensor]:
    return {names(n): b.detach().clone() for n, b in module.named_buffers() if names(n) is not None}


def _params(module: nn.Module, names) -> Dict[str, Tensor]:
    return {names(n): p.detach().clone() for n, p in module.named_parameters() if names(n) is not None}


def run_pair(ref: nn.Module, ours: nn.Module, nmap: Dict[str, Optional[str]], batches, scale,
             generator: torch.Generator, lr: float = REF_LR):
    """Randomise the reference's BatchNorms, copy it into ours through ``nmap``, run one
    training step on ``batches[0]`` and record everything, eval-mode logits, then SGD steps on
    the remaining batches. Returns ``(ours_record, ref_record, MapReport)``."""
    randomize_bn(ref, generator)
    report = copy_by_map(ref, ours, nmap)
    ref_key = lambda n: nmap.get(n)  # noqa: E731
    our_key = lambda n: n  # noqa: E731
    start_ref, start_ours = _params(ref, ref_key), _params(ours, our_key)
    opt_ref, opt_ours = sgd(ref.parameters(), lr), sgd(ours.parameters(), lr)
    ref.train()
    ours.train()
    rec: List[Dict[str, Dict[str, Tensor]]] = []
    for side, net, opt in (("ref", ref, opt_ref), ("ours", ours, opt_ours)):
        x, y = batches[0]
        opt.zero_grad(set_to_none=True)
        r = record_ref_step(net, x, y, scale) if side == "ref" else record_ours_step(net, x, y)
        key = ref_key if side == "ref" else our_key
        r.update(named_grads(net, key))
        r["running_stats"] = _buffers(net, key)
        if side == "ref":
            report.ref_only_used = [n for n, p in net.named_parameters() if nmap.get(n) is None
                                    and p.grad is not None and bool(p.grad.abs().sum() > 0)]
        net.eval()
        with torch.no_grad():
            ev = net(img=x, target=y)[0] if side == "ref" else net(x)
        net.train()
        r["eval_logits"] = {"logits": ev.detach().clone()}
        opt.step()
        for xb, yb in batches[1:]:
            opt.zero_grad(set_to_none=True)
            if side == "ref":
                net(img=xb, target=yb, ixx_1=scale[0], ixy_1=scale[1], ixx_2=scale[2], ixy_2=scale[3])
            else:
                net(xb, yb)
            opt.step()
        p = _params(net, key)
        start = start_ref if side == "ref" else start_ours
        r["params"] = p
        r["updates"] = {n: p[n] - start[n] for n in p}
        rec.append(r)
    return rec[1], rec[0], report


def config_dict(cfg: Config) -> dict:
    return asdict(cfg)
