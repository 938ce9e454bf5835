"""Parity against the authors' AugLocal code (github.com/ChenxiangMA/AugLocal, ``networks/`` and
``train.py``; Ma et al., ICLR 2024), imported at run time from ``<ref-dir>/AugLocal``.

Configurations: the AugLocal lines of its ``run.sh`` (``--local_module_num 16`` for ResNet-32,
55 for ResNet-110, ``--aux_net_depth d --pyramid --pyramid_coeff 0.5``, d = 1, 3, 5). Its
``train.py`` turns ``--rule AugLocal`` into ``local_module_num - aux_net_depth`` local modules, cut at the first
entries of its finest split (``network_config[arch]['net_config'][:K-1]``). Each line gives
two rows:

* ``ref split``: ours is ``LocalSequential(CifarResNet(32), K=16-d, aux="auglocal",
  aux_depth=d, aux_pyramid=0.5, context="R0", split=<the reference's cuts>,
  context_mean=None)``: heads, depth schedule and losses under test;
* ``our split``: the same with ``split=None`` (what a user of ours gets for that K, AugLocal's
  split preset :func:`contsup_fast.presets.auglocal_cuts`): the K mapping under test.
"""
from __future__ import annotations

import importlib
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional

import torch
from torch import nn

from ..reference_contsup import _cuda_call_is_identity
from .contsup import Config, _default_dtype
from . import contsup as C

__all__ = ["REFERENCE", "DIRNAME", "AugLocalConfig", "command_configs", "load", "build_reference", "build_ours",
           "loss_scale", "name_map", "reference_cuts"]

REFERENCE = "AugLocal"
DIRNAME = "AugLocal"


@dataclass(frozen=True)
class AugLocalConfig(Config):
    """A ``run.sh`` line: ``K`` is the line's ``--local_module_num`` (the reference trains
    ``K - depth`` modules), ``depth`` its ``--aux_net_depth``, ``gamma`` its ``--pyramid_coeff``;
    ``ref_split`` whether ours takes the reference's cuts explicitly."""

    depth: int = 1
    gamma: Optional[float] = 0.5
    ref_split: bool = True

    @property
    def modules(self) -> int:
        return self.K - self.depth

    @property
    def name(self) -> str:
        return (f"AugLocal {self.model} K={self.K} d={self.depth} gamma={self.gamma} "
                f"({self.modules} modules, {'ref' if self.ref_split else 'our'} split)")


#: ``--local_module_num`` of run.sh's AugLocal lines per model
RUN_SH_K = {"resnet32": 16, "resnet110": 55}


def command_configs(_ref_dir: str) -> List[AugLocalConfig]:
    """The AugLocal lines of ``run.sh`` (ResNet-32 and ResNet-110, d = 1, 3, 5), each with the
    reference's split and with ours."""
    return [AugLocalConfig(model, k, "R0", "cross_entropy", source="run.sh", depth=d, gamma=0.5, ref_split=r)
            for model, k in RUN_SH_K.items() for d in (1, 3, 5) for r in (True, False)]


def load(ref_dir: str):
    """``(networks.resnet, None)`` from the AugLocal checkout. InfoPro's code also names its
    package ``networks``: any ``networks`` modules already imported are set aside while
    AugLocal's is imported, then put back.

    Raises:
        FileNotFoundError: no ``networks/resnet.py`` there.
    """
    path = Path(ref_dir).resolve()
    if not (path / "networks" / "resnet.py").is_file():
        raise FileNotFoundError(f"{path} holds no networks/resnet.py: fetch github.com/ChenxiangMA/AugLocal "
                                "(scripts/fetch-references.sh)")
    saved = {k: sys.modules.pop(k) for k in list(sys.modules) if k == "networks" or k.startswith("networks.")}
    sys.path.insert(0, str(path))
    try:
        mod = importlib.import_module("networks.resnet")
    finally:
        sys.path.remove(str(path))
        for k in [k for k in sys.modules if k == "networks" or k.startswith("networks.")]:
            del sys.modules[k]
        sys.modules.update(saved)
    global _NETWORK_CONFIG
    _NETWORK_CONFIG = mod.network_config  # networks/resnet.py imports it from its configs.py
    return mod, None


def build_reference(resnet_mod, cfg: AugLocalConfig, batch: int) -> nn.Module:
    """AugLocal's ``LocalResNet`` as its ``train.py`` builds it for ``--rule AugLocal``, float64."""
    with _default_dtype(torch.float64), _cuda_call_is_identity(torch.device("cpu")):
        net = getattr(resnet_mod, cfg.model)(
            local_module_num=cfg.modules, batch_size=batch, image_size=32, dataset="cifar10", class_num=10,
            wide_list=(16, 16, 32, 64), dropout_rate=0.0, aux_net_config="unifSamp", aux_net_config_aux_loss="0c1f",
            aux_net_widen=1, aux_net_widen_aux_loss=1, aux_net_feature_dim=128, hidden_dim=512,
            hidden_dim_aux_loss=512, rule="AugLocal", aux_net_depth=cfg.depth, is_pyramid=cfg.gamma is not None,
            paramid_coeff=cfg.gamma if cfg.gamma is not None else 0.5)
    return net.double()


def loss_scale(_configs_mod, _cfg):
    """train.py's defaults ``--ixx_1 0 --ixy_1 1 --ixx_2 0 --ixy_2 1`` (run.sh gives none)."""
    return (0.0, 1.0, 0.0, 1.0)


def build_ours(cfg: AugLocalConfig, backend: str, _configs_mod=None, ref: Optional[nn.Module] = None) -> nn.Module:
    """Our ``LocalSequential`` for ``cfg`` (module docstring), float64. The reference's cuts are
    read from ``cfg`` through :func:`reference_cuts` when ``cfg.ref_split``."""
    from contsup_fast import LocalSequential
    from contsup_fast.local import REFERENCE_CIFAR_MEAN, REFERENCE_CIFAR_STD
    from contsup_fast.models.cifar_resnet import CifarResNet
    split = reference_cuts(cfg) if cfg.ref_split else None
    with _default_dtype(torch.float64):
        model = CifarResNet(int(cfg.model[len("resnet"):]), num_classes=10)
        local = LocalSequential(model, K=cfg.modules, context="R0", aux="auglocal", aux_depth=cfg.depth,
                                aux_pyramid=cfg.gamma, loss="ce", split=split, backend=backend,
                                image_mean=REFERENCE_CIFAR_MEAN, image_std=REFERENCE_CIFAR_STD, context_mean=None)
    return local.double()


_NETWORK_CONFIG = None


def reference_cuts(cfg: AugLocalConfig) -> List[str]:
    """The reference's cuts for ``cfg`` as our node names (its ``net_config[:modules-1]``)."""
    table = _NETWORK_CONFIG[cfg.model]["net_config"][:cfg.modules - 1]
    return ["relu" if s == 0 else f"layer{s}.{b}" for s, b, _ in table]


def name_map(ref: nn.Module, ours: nn.Module):
    """:func:`bench.parity.contsup.name_map` with AugLocal's heads: ``head.i`` for each residual
    block i -> ``head.blocks.i``, its ``BatchNorm1d`` -> ``head.norm``, its ``Linear`` -> ``head.fc``."""
    def head_target(net, cut: str, index: str) -> str:
        m = getattr(net, f"aux_classifier_{cut}").head[int(index)]
        if isinstance(m, nn.BatchNorm1d):
            return "norm"
        if isinstance(m, nn.Linear):
            return "fc"
        return f"blocks.{index}"
    return C.name_map(ref, ours, head_target)
