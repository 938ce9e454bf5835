"""Parity of our DGL auxiliary head against the authors' (github.com/eugenium/DGL,
``auxiliary_nets_study/models.py``, ``auxillary_classifier2`` with ``aux_type='mlp-sr'``:
``n_lin=3, mlp_layers=3, cnn=False``; Belilovsky et al., ICML 2020), imported at run time from
``<ref-dir>/DGL``.

Head level only: the reference's training script trains its own VGG-style network, not a
ResNet, so the comparison is of the auxiliary network itself, on every input shape it has in
the reference's CIFAR network (feature_size 128, downsampling before blocks 1 and 3: 128x32x32,
256x16x16, 512x8x8) and in a CIFAR ResNet (16x32x32, 32x16x16, 64x8x8). Per shape: the
reference's BatchNorms randomised, its state copied into :class:`contsup_fast.heads.DGLHead`
through an explicit name map, one training step in float64 (cross-entropy of the head's
logits) comparing the logits, the loss, the gradient of the input and of every parameter and
the running statistics, then eval-mode logits.
"""
from __future__ import annotations

import importlib
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional

import torch
import torch.nn.functional as F
from torch import nn

from .core import compare_records, copy_by_map, labels_with_positives, randomize_bn, verdict

__all__ = ["REFERENCE", "DIRNAME", "HeadConfig", "SHAPES", "load", "name_map", "run_head"]

REFERENCE = "DGL"
DIRNAME = "DGL"

#: (channels, spatial size) of the head's input
SHAPES = [(128, 32), (256, 16), (512, 8), (16, 32), (32, 16), (64, 8)]


@dataclass(frozen=True)
class HeadConfig:
    channels: int
    size: int

    @property
    def name(self) -> str:
        return f"DGL mlp-sr head {self.channels}x{self.size}x{self.size}"


def load(ref_dir: str):
    """``auxiliary_nets_study.models`` from the DGL checkout ``ref_dir``.

    Raises:
        FileNotFoundError: no ``auxiliary_nets_study/models.py`` there.
    """
    path = (Path(ref_dir) / "auxiliary_nets_study").resolve()
    if not (path / "models.py").is_file():
        raise FileNotFoundError(f"{path} holds no models.py: fetch github.com/eugenium/DGL "
                                "(scripts/fetch-references.sh)")
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))
    return importlib.import_module("models")


def name_map(ref: nn.Module) -> Dict[str, Optional[str]]:
    """``blocks.i.{0,1}`` (conv, BN) -> ``convs.{3i, 3i+1}``; ``classifier.k`` -> ``mlp.k`` (the
    same Linear/BN1d/ReLU layout); ``bn`` (used by the reference only without an MLP) -> None."""
    out: Dict[str, Optional[str]] = {}
    for n in ref.state_dict():
        parts = n.split(".")
        if parts[0] == "blocks":
            out[n] = f"convs.{3 * int(parts[1]) + int(parts[2])}.{parts[3]}"
        elif parts[0] == "classifier":
            out[n] = "mlp." + ".".join(parts[1:])
        else:
            out[n] = None
    return out


def run_head(models_mod, cfg: HeadConfig, batch: int = 8, seed: int = 0) -> dict:
    """One shape: the table row with the full comparison (float64, CPU)."""
    from contsup_fast.heads import DGLHead
    t0 = time.perf_counter()
    torch.manual_seed(seed)
    ref = models_mod.auxillary_classifier2(input_features=cfg.channels, in_size=cfg.size, cnn=False,
                                           num_classes=10, n_lin=3, mlp_layers=3).double()
    ours = DGLHead(cfg.channels, (cfg.size, cfg.size), 10).double()
    gen = torch.Generator().manual_seed(seed + 1)
    randomize_bn(ref, gen)
    nmap = name_map(ref)
    report = copy_by_map(ref, ours, nmap)
    x = torch.randn(batch, cfg.channels, cfg.size, cfg.size, dtype=torch.float64, generator=gen).relu()
    y = labels_with_positives(batch, 10, gen)
    recs = []
    for side, net, key in (("ref", ref, nmap.get), ("ours", ours, lambda n: n)):
        net.train()
        xi = x.clone().requires_grad_(True)
        logits = net(xi)
        loss = F.cross_entropy(logits, y)
        loss.backward()
        rec = {"logits": {"logits": logits.detach()}, "losses": {"loss": loss.detach()},
               "inputs": {"dL/dx": xi.grad.detach()},
               "grads": {key(n): p.grad.detach().clone() for n, p in net.named_parameters()
                         if key(n) is not None and p.grad is not None},
               "running_stats": {key(n): b.detach().clone() for n, b in net.named_buffers() if key(n) is not None}}
        if side == "ref":
            report.ref_only_used = [n for n, p in net.named_parameters() if nmap.get(n) is None
                                    and p.grad is not None and bool(p.grad.abs().sum() > 0)]
        net.eval()
        with torch.no_grad():
            rec["eval_logits"] = {"logits": net(x)}
        recs.append(rec)
    cmp = compare_records(recs[1], recs[0])
    return {"reference": REFERENCE, "config": cfg.name, "channels": cfg.channels, "size": cfg.size,
            "backend": "-", "batch": batch, "verdict": verdict(cmp, report),
            "max_rel": max(c["rel"] for c in cmp.values()), **{f"{k}_rel": v["rel"] for k, v in cmp.items()},
            "comparison": cmp, "name_map": report.summary(), "seconds": time.perf_counter() - t0}


def command_configs(_ref_dir: str) -> List[HeadConfig]:
    """The head shapes compared (:data:`SHAPES`)."""
    return [HeadConfig(c, s) for c, s in SHAPES]
