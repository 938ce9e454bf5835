"""Parity against the authors' GN-DGL code (github.com/adeetyapatel12/GN-DGL,
``Multilayer_GN_DGL/``: ``networks/resnet.py``, ``networks/split_auxiliary_nets.py``,
``utils.py`` and ``commands.sh``; Patel et al., "Local Learning with Neuron Groups"), imported at
run time from ``<ref-dir>/GN-DGL``.

Configurations: every ``commands.sh`` line with ``--groups G > 1`` (GN-DGL itself: ResNet-32
and ResNet-32x2, ``--detach --detach-ratio 1.0 --div-reg --div-temp 3.0 --div-weight 0.5``,
1c2f heads). The reference builds ``InfoProResNet(groups=G, ...)`` as its ``train.py`` does; ours
is ``LocalSequential(CifarResNet(32, widths=--wide-list), K, context="R0", aux="1c2f",
loss="ce", width_groups=G, feature_dim=128 * wide_list[0] / 16)`` with our default split.

**What the two share, and so what is compared.** The reference's ``--local_module_num K``
(its ``configs.py``, ``DWM_DGL``) cuts at our preset K's cut points *plus one at the end of the
network*: its K-th local module (the blocks after the last inner cut) trains with G group heads
and the diversity term, and a separate 1c2f classifier (``self.head``) trains on that module's
detached output and is what evaluates. Ours trains the last module with the model's classifier
(global pool + linear). So, in float64 after the reference's BatchNorms are randomised and its
state copied into ours through :func:`name_map`:

* compared: the grouped structure of every block (a conv with other ``groups`` is a shape
  mismatch in the name map), the features at every cut and at the network's end (train and
  eval mode), each group head's logits and each local loss of modules 0..K-2, every gradient
  of modules 0..K-2 (bodies and group heads), every BatchNorm's running statistics, and the
  parameters of modules 0..K-2 after 3 SGD steps (the reference's optimiser; its first-epoch
  learning rate 0.01);
* not compared (different by construction; listed in the row's ``not_compared``): the last
  module's gradients and parameter updates, the reference's group heads at the end cut and
  its ``self.head`` (no counterpart), our classifier's gradients (the reference's ``fc`` is
  built but unused), the logits and the layer-wise ensemble.

Run-time shim: the reference imports ``ptflops`` (FLOP counting, not used in a training step);
when it is not installed a stand-in module is registered while the reference is imported,
whose ``get_model_complexity_info`` raises if called.
"""
from __future__ import annotations

import importlib
import re
import sys
import time
import types
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch
from torch import Tensor, nn

from .contsup import REF_CIFAR_MEAN, REF_CIFAR_STD, REF_LR, _default_dtype
from .core import (compare_records, copy_by_map, labels_with_positives, randomize_bn, recording_backward, sgd,
                   train_py_lines, verdict)

__all__ = ["REFERENCE", "DIRNAME", "SUBDIR", "GNConfig", "command_configs", "load", "build_reference",
           "build_ours", "name_map", "cut_names", "run_model"]

REFERENCE = "GN-DGL"
DIRNAME = "GN-DGL"
SUBDIR = "Multilayer_GN_DGL"

_HEAD = {"0": "convs.0", "1": "norm", "5": "mlp.0", "7": "mlp.2"}  # 1c2f: conv, BN, linear, linear


@dataclass(frozen=True)
class GNConfig:
    """One ``commands.sh`` line: ``--local_module_num K --groups G --wide-list widths``."""

    K: int
    G: int
    widths: Tuple[int, int, int, int] = (16, 16, 32, 64)
    model: str = "resnet32"
    dataset: str = "cifar10"
    source: str = "commands.sh"

    @property
    def name(self) -> str:
        x2 = "x2" if self.widths[0] == 32 else ("" if self.widths[0] == 16 else f" widths={self.widths}")
        return f"GN-DGL {self.model}{x2} K={self.K} G={self.G}"

    @property
    def image_size(self) -> int:
        return 32

    @property
    def classes(self) -> int:
        return 10 if self.dataset == "cifar10" else 100

    @property
    def normalisation(self):
        return REF_CIFAR_MEAN, REF_CIFAR_STD

    @property
    def head_width(self) -> int:
        """The reference's auxiliary hidden width: ``feature_dim * wide_list[0] / 16`` (its
        ``InfoProResNet`` overrides ``--aux_net_widen`` with ``wide_list[0] / 16``)."""
        return int(128 * self.widths[0] / 16)


def command_configs(ref_dir: str) -> List[GNConfig]:
    """Every ``python train.py`` line of ``Multilayer_GN_DGL/commands.sh`` with ``--groups`` > 1
    (the ``--groups 1`` lines are its DGL and end-to-end baselines), deduplicated in file order.
    Every such line has ``--detach --detach-ratio 1.0 --div-reg --div-temp 3.0 --div-weight 0.5
    --aux_net_config 1c2f --local_loss_mode cross_entropy``; a line without them is refused."""
    seen, out = set(), []
    for args in train_py_lines(Path(ref_dir) / SUBDIR / "commands.sh"):
        if int(args["groups"]) < 2:
            continue
        expected = {"detach": True, "detach-ratio": "1.0", "div-reg": True, "div-temp": "3.0", "div-weight": "0.5",
                    "aux_net_config": "1c2f", "local_loss_mode": "cross_entropy", "aux_net_feature_dim": "128"}
        if any(args.get(k) != v for k, v in expected.items()):
            raise ValueError(f"commands.sh line with settings this harness does not build: {args!r}")
        cfg = GNConfig(K=int(args["local_module_num"]), G=int(args["groups"]),
                       widths=tuple(int(v) for v in args["wide-list"].split(",")),
                       model=f"resnet{args['layers']}", dataset=args.get("dataset", "cifar10"))
        if cfg not in seen:
            seen.add(cfg)
            out.append(cfg)
    return out


def load(ref_dir: str):
    """``(networks.resnet, utils)`` from ``<ref_dir>/Multilayer_GN_DGL``. Other references also
    name their package ``networks``: the modules ``networks*``, ``utils`` and ``ptflops`` already
    imported are set aside while GN-DGL's are imported, then put back.

    Raises:
        FileNotFoundError: no ``networks/resnet.py`` there.
    """
    path = (Path(ref_dir) / SUBDIR).resolve()
    if not (path / "networks" / "resnet.py").is_file():
        raise FileNotFoundError(f"{path} holds no networks/resnet.py: fetch github.com/adeetyapatel12/GN-DGL "
                                "(scripts/fetch-references.sh)")

    def ours(k):
        return k in ("networks", "utils", "ptflops") or k.startswith("networks.")

    saved = {k: sys.modules.pop(k) for k in list(sys.modules) if ours(k)}
    try:
        importlib.import_module("ptflops")
    except ImportError:
        stub = types.ModuleType("ptflops")

        def get_model_complexity_info(*_a, **_k):
            raise RuntimeError("ptflops stand-in: FLOP counting is not part of the parity run")

        stub.get_model_complexity_info = get_model_complexity_info
        sys.modules["ptflops"] = stub
    sys.path.insert(0, str(path))
    try:
        resnet = importlib.import_module("networks.resnet")
        utils = importlib.import_module("utils")
    finally:
        sys.path.remove(str(path))
        for k in [k for k in sys.modules if ours(k)]:
            del sys.modules[k]
        sys.modules.update(saved)
    return resnet, utils


def build_reference(resnet_mod, cfg: GNConfig, batch: int) -> nn.Module:
    """``InfoProResNet`` as GN-DGL's ``train.py`` builds it for ``cfg``, float64, CPU."""
    with _default_dtype(torch.float64):
        net = getattr(resnet_mod, cfg.model)(
            local_module_num=str(cfg.K), batch_size=batch, image_size=cfg.image_size, balanced_memory=False,
            dataset=cfg.dataset, class_num=cfg.classes, wide_list=cfg.widths, dropout_rate=0.0,
            aux_net_config="1c2f", local_loss_mode="cross_entropy", aux_net_widen=1, aux_net_feature_dim=128,
            cuda=False, infopro=False, groups=cfg.G, lambdas=False, detach=True, detach_ratio=1.0,
            div_reg=True, div_temp=3.0, div_weight=0.5, device="cpu")
    return net.double()


def build_ours(cfg: GNConfig, backend: str) -> nn.Module:
    """Our ``LocalSequential`` for ``cfg`` (module docstring), float64."""
    from contsup_fast import LocalSequential
    from contsup_fast.local import REFERENCE_CIFAR_MEAN, REFERENCE_CIFAR_STD
    from contsup_fast.models.cifar_resnet import CifarResNet
    with _default_dtype(torch.float64):
        model = CifarResNet(int(cfg.model[len("resnet"):]), num_classes=cfg.classes, widths=cfg.widths)
        local = LocalSequential(model, K=cfg.K, context="R0", aux="1c2f", loss="ce", width_groups=cfg.G,
                                backend=backend, feature_dim=cfg.head_width, image_mean=REFERENCE_CIFAR_MEAN,
                                image_std=REFERENCE_CIFAR_STD)
    return local.double()


def ref_cuts(ref: nn.Module) -> List[Tuple[int, int]]:
    """The reference's ``(stage, block)`` cuts, the one at the network's end included."""
    return [(int(s), int(b)) for s, b in ref.infopro_config]


def cut_names(cuts) -> List[str]:
    """``(S, B)`` -> our module name ``layerS.B`` (``(0, 0)``: the stem's ``relu``)."""
    return ["relu" if s == 0 else f"layer{s}.{b}" for s, b in cuts]


def _end(ref: nn.Module) -> Tuple[int, int]:
    return 3, len(ref.layer3) - 1


def name_map(ref: nn.Module, ours: nn.Module) -> Dict[str, Optional[str]]:
    """Reference state name -> our state name (None: no counterpart).

    * ``conv1 bn1 layerS.B.* fc`` -> ``local_modules.j.body.<same>`` for the module j whose
      body holds it (the reference's ``fc`` is built but unused; it fills ours);
    * ``aux_classifier_S_B_g.head.{0,1,5,7}`` of the c-th cut, c < K-1 ->
      ``local_modules.c.head.heads.g.{convs.0,norm,mlp.0,mlp.2}``;
    * the group heads at the cut at the network's end and the final ``head`` -> None.
    """
    ours_names = set(ours.state_dict())
    body_of = {}
    for n in ours_names:
        m = re.match(r"local_modules\.(\d+)\.body\.(.+)$", n)
        if m:
            body_of[m.group(2)] = n
    inner = {f"{s}_{b}": c for c, (s, b) in enumerate(ref_cuts(ref)) if (s, b) != _end(ref)}
    out: Dict[str, Optional[str]] = {}
    for rname in ref.state_dict():
        m = re.match(r"aux_classifier_(\d+_\d+)_(\d+)\.head\.(\d+)\.(.+)$", rname)
        if m:
            c = inner.get(m.group(1))
            out[rname] = None if c is None else f"local_modules.{c}.head.heads.{m.group(2)}.{_HEAD[m.group(3)]}.{m.group(4)}"
        elif rname.startswith("head."):
            out[rname] = None
        else:
            out[rname] = body_of.get(rname, f"local_modules.?.body.{rname}")
    return out


def _feature_hooks(root: nn.Module, names: List[str], store: Dict[str, Tensor], prefix: str):
    """Forward hooks recording the output of the submodules ``names`` (found anywhere under ``root``)."""
    handles = []
    found = {n: m for n, m in root.named_modules()}
    for name in names:
        mod = found.get(name)
        if mod is None:
            mod = next(m for n, m in root.named_modules() if n.endswith(".body." + name))
        handles.append(mod.register_forward_hook(
            lambda _m, _a, out, k=name: store.__setitem__(f"{prefix}{k}", out.detach().clone())))
    return handles


def _head_hooks(heads: List[Tuple[int, List[nn.Module]]], store: Dict[str, Tensor]):
    handles = []
    for c, mods in heads:
        for g, mod in enumerate(mods):
            handles.append(mod.register_forward_hook(
                lambda _m, _a, out, k=f"z{c}.{g}": store.__setitem__(k, (out[1] if isinstance(out, tuple) else out)
                                                                       .detach().clone())))
    return handles


def _step(side: str, net: nn.Module, x: Tensor, y: Tensor, cuts: List[str], heads, K: int):
    """One training call; returns ``(losses, features, group logits)``."""
    feats: Dict[str, Tensor] = {}
    logits: Dict[str, Tensor] = {}
    handles = _feature_hooks(net, cuts, feats, "h ") + _head_hooks(heads, logits)
    losses: List[Tensor] = []
    try:
        if side == "ref":
            with recording_backward(losses):
                net(img=x, target=y)
        else:
            losses = list(net(x, y).local_losses.detach().unbind(0))
    finally:
        for h in handles:
            h.remove()
    return {f"loss{j}": losses[j] for j in range(K - 1)}, feats, logits


def run_model(mods, cfg: GNConfig, backend: str, batch: int = 8, steps: int = 3, seed: int = 0) -> dict:
    """One configuration on one backend: the table row with the full comparison (float64, CPU)."""
    resnet_mod, _utils = mods
    t0 = time.perf_counter()
    torch.manual_seed(seed)
    ref = build_reference(resnet_mod, cfg, batch)
    ours = build_ours(cfg, backend)
    gen = torch.Generator().manual_seed(seed + 1)
    randomize_bn(ref, gen)
    nmap = name_map(ref, ours)
    report = copy_by_map(ref, ours, nmap)
    K = len(ours)
    cuts = ref_cuts(ref)
    inner = [c for c in cuts if c != _end(ref)]
    split_same = cut_names(inner) == [n.replace("_", ".") for n in ours.cut_points]
    feature_names = cut_names(inner + [_end(ref)])
    ref_heads = [(c, [getattr(ref, f"aux_classifier_{s}_{b}_{g}") for g in range(cfg.G)])
                 for c, (s, b) in enumerate(inner)]
    our_heads = [(c, list(ours[c].head.heads)) for c in range(K - 1)]
    # our parameters under comparison: modules 0..K-2 (bodies and heads)
    compared = lambda n: n is not None and not n.startswith(f"local_modules.{K - 1}.")  # noqa: E731
    mean, std = (torch.tensor(v, dtype=torch.float64).view(1, 3, 1, 1) for v in cfg.normalisation)
    batches = []
    for _ in range(steps):
        x01 = torch.rand(batch, 3, cfg.image_size, cfg.image_size, generator=gen, dtype=torch.float64)
        batches.append(((x01 - mean) / std, labels_with_positives(batch, cfg.classes, gen)))
    recs = []
    for side, net, key, heads in (("ref", ref, nmap.get, ref_heads), ("ours", ours, lambda n: n, our_heads)):
        start = {key(n): p.detach().clone() for n, p in net.named_parameters() if compared(key(n))}
        opt = sgd(net.parameters(), REF_LR)
        net.train()
        x, y = batches[0]
        opt.zero_grad(set_to_none=True)
        with _default_dtype(torch.float64):
            losses, feats, zs = _step(side, net, x, y, feature_names, heads, K)
        rec = {"losses": losses, "outputs": feats, "logits": zs,
               "grads": {key(n): (p.grad if p.grad is not None else torch.zeros_like(p)).detach().clone()
                         for n, p in net.named_parameters() if compared(key(n))},
               "running_stats": {key(n): b.detach().clone() for n, b in net.named_buffers() if key(n) is not None}}
        if side == "ref":
            used = [n for n, p in net.named_parameters() if nmap.get(n) is None
                    and p.grad is not None and bool(p.grad.abs().sum() > 0)]
            # by construction (module docstring): the group heads at the end cut and self.head
            structural = [n for n in used if n.startswith("head.") or re.match(r"aux_classifier_3_%d_" % _end(ref)[1], n)]
            report.ref_only_used = [n for n in used if n not in structural]
            not_compared = sorted({n.split(".")[0] for n in structural})
        net.eval()
        ev: Dict[str, Tensor] = {}
        handles = _feature_hooks(net, feature_names, ev, "eval h ")
        with torch.no_grad(), _default_dtype(torch.float64):
            net(img=x, target=y) if side == "ref" else net(x)
        for h in handles:
            h.remove()
        net.train()
        rec["eval_outputs"] = ev
        opt.step()
        for xb, yb in batches[1:]:
            opt.zero_grad(set_to_none=True)
            with _default_dtype(torch.float64):
                net(img=xb, target=yb) if side == "ref" else net(xb, yb)
            opt.step()
        p = {key(n): q.detach().clone() for n, q in net.named_parameters() if compared(key(n))}
        rec["params"] = p
        rec["updates"] = {n: p[n] - start[n] for n in p}
        recs.append(rec)
    cmp = compare_records(recs[1], recs[0])
    not_compared += [f"local_modules.{K - 1} (last module): gradients and updates", "logits (classifier)",
                     "layer-wise ensemble"]
    row = {"reference": REFERENCE, "config": cfg.name, **asdict(cfg), "backend": backend, "batch": batch,
           "steps": steps, "split_same": split_same, "ref_split": cut_names(cuts), "our_split": list(ours.cut_points),
           "verdict": verdict(cmp, report) if split_same else "DIFFER",
           "max_rel": max(c["rel"] for c in cmp.values()), **{f"{k}_rel": v["rel"] for k, v in cmp.items()},
           "comparison": cmp, "name_map": report.summary(), "not_compared": not_compared,
           "seconds": time.perf_counter() - t0}
    return row
