"""Parity against the authors' InfoPro code (github.com/blackfeather-wang/InfoPro-Pytorch,
``Experiments on CIFAR-SVHN-STL10/``: ``networks/`` and ``train.py``; Wang et al., ICLR 2021),
imported at run time from ``<ref-dir>/InfoPro-Pytorch``.

InfoPro is ContSup's ancestor without context: every local module's loss is
``ixx * reconstruction + ixy * classifier`` (its decoder is always on), with the weights
interpolated linearly from the first to the (K-1)-th module. Configurations are its own
``comand.sh`` lines (sic), whose weights are given on the command line; ours is built as a
user would, ``LocalSequential(CifarResNet(depth), K, context="R0", loss, reconstruct=True,
split="balanced" if --balanced_memory, context_mean=None, image_mean/std = the reference's)``
with ``preset_dataset`` the line's dataset and OUR preset weights (so the K presets and the
per-dataset tables are under test) wherever they equal the line's; where they do not (ContSup's
table and InfoPro's command line disagree: :func:`row_notes`) ours gets the line's weights and
the row records the deliberate difference. The name map and the step recorder
are :mod:`bench.parity.contsup`'s (the InfoPro model has the same attribute names, less the
context node).
"""
from __future__ import annotations

import importlib
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Tuple

import torch
from torch import nn

from ..reference_contsup import _cuda_call_is_identity
from .contsup import Config, _default_dtype
from .core import train_py_lines

__all__ = ["REFERENCE", "SUBDIR", "InfoProConfig", "command_configs", "load", "build_reference", "build_ours",
           "loss_scale"]

REFERENCE = "InfoPro"
DIRNAME = "InfoPro-Pytorch"  # the checkout's folder under --ref-dir
SUBDIR = "Experiments on CIFAR-SVHN-STL10"


@dataclass(frozen=True)
class InfoProConfig(Config):
    """A ``comand.sh`` line: a ContSup-style :class:`Config` (context R0, decoder on) plus the
    line's loss weights ``(ixx_1, ixy_1, ixx_2, ixy_2)``."""

    weights: Optional[Tuple[float, float, float, float]] = None

    @property
    def name(self) -> str:
        return "InfoPro " + super().name


def command_configs(ref_dir: str) -> List[InfoProConfig]:
    """Every ``python train.py`` line of InfoPro's ``comand.sh``, deduplicated in file order."""
    seen, out = set(), []
    for args in train_py_lines(Path(ref_dir) / SUBDIR / "comand.sh"):
        cfg = InfoProConfig(model=f"resnet{args['layers']}", K=int(args["local_module_num"]), context="R0",
                            loss=args.get("local_loss_mode", "contrast"), h_reconstruct=True,
                            balanced=bool(args.get("balanced_memory", False)),  # store_true there
                            dataset=args.get("dataset", "cifar10"), source="comand.sh",
                            weights=tuple(float(args.get(k, 0.0)) for k in ("ixx_1", "ixy_1", "ixx_2", "ixy_2")))
        if cfg not in seen:
            seen.add(cfg)
            out.append(cfg)
    return out


def load(ref_dir: str):
    """``(networks.resnet, None)`` imported from ``<ref_dir>/Experiments on CIFAR-SVHN-STL10``.

    Raises:
        FileNotFoundError: no ``networks/resnet.py`` there.
    """
    path = (Path(ref_dir) / SUBDIR).resolve()
    if not (path / "networks" / "resnet.py").is_file():
        raise FileNotFoundError(f"{path} holds no networks/resnet.py: fetch "
                                "github.com/blackfeather-wang/InfoPro-Pytorch (scripts/fetch-references.sh)")
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))
    return importlib.import_module("networks.resnet"), None


def build_reference(resnet_mod, cfg: InfoProConfig, batch: int) -> nn.Module:
    """The InfoPro model as its ``train.py`` builds it, in float64 on the CPU."""
    with _default_dtype(torch.float64), _cuda_call_is_identity(torch.device("cpu")):
        net = getattr(resnet_mod, cfg.model)(
            local_module_num=cfg.K, batch_size=batch, image_size=cfg.image_size, balanced_memory=cfg.balanced,
            dataset=cfg.dataset, class_num=cfg.classes, wide_list=(16, 16, 32, 64), dropout_rate=0.0,
            aux_net_config="1c2f", local_loss_mode=cfg.loss, aux_net_widen=1, aux_net_feature_dim=128)
    return net.double()


def loss_scale(_configs_mod, cfg: InfoProConfig):
    """The line's ``--ixx_1 --ixy_1 --ixx_2 --ixy_2``."""
    return cfg.weights


def preset_weights(cfg: InfoProConfig):
    """Our preset reconstruction weights for ``cfg`` (ContSup's reference tables)."""
    from contsup_fast.presets import reconstruction_weights
    w = reconstruction_weights(cfg.model, cfg.K, cfg.balanced, cfg.dataset)
    return None if w is None else tuple(float(v) for v in w)


def row_notes(cfg: InfoProConfig) -> dict:
    """A deliberate difference this row works around: where InfoPro's command line gives other
    loss weights than our preset (ContSup's table), ours is built with the line's weights, as
    a user reproducing that line would pass them (``reconstruct_weights=``)."""
    ours = preset_weights(cfg)
    if ours == cfg.weights:
        return {"weights": "preset"}
    return {"weights": "explicit", "deliberate": f"InfoPro's comand.sh gives the loss weights {cfg.weights}; our "
            f"preset {ours} is ContSup's table (networks_dev/configs.py); built with reconstruct_weights={cfg.weights}"}


def build_ours(cfg: InfoProConfig, backend: str, _configs_mod=None) -> nn.Module:
    """Our ``LocalSequential`` for ``cfg`` (see the module docstring), float64."""
    from contsup_fast import LocalSequential
    from contsup_fast.local import REFERENCE_CIFAR_MEAN, REFERENCE_CIFAR_STD
    from contsup_fast.models.cifar_resnet import CifarResNet
    mean, std = (REFERENCE_CIFAR_MEAN, REFERENCE_CIFAR_STD) if "cifar" in cfg.dataset else cfg.normalisation
    weights = None if preset_weights(cfg) == cfg.weights else cfg.weights
    with _default_dtype(torch.float64):
        model = CifarResNet(int(cfg.model[len("resnet"):]), num_classes=cfg.classes)
        local = LocalSequential(model, K=cfg.K, context="R0", loss="ce" if cfg.loss == "cross_entropy" else "supcon",
                                reconstruct=True, reconstruct_weights=weights, preset_dataset=cfg.dataset,
                                split="balanced" if cfg.balanced else None, backend=backend, feature_dim=128,
                                input_size=(3, cfg.image_size, cfg.image_size), image_mean=mean, image_std=std,
                                context_mean=None)
    return local.double()
