"""The measurement behind the token context's norm and initial scale (docs/transformers.md).

A tiny ViT (torchvision ``VisionTransformer``: 32x32 images, patch 4, D=64, 4 blocks, 2 heads)
is trained with ``LocalSequential(K=3, context="R1E")`` on a CIFAR-10 subset for a few epochs
with SGD, once per (norm, initial scale) of the token context terms
(:data:`contsup_fast.tokens.NORMS` x ``--scales``) and per seed, plus R0 (no context) for
reference. Reported: test accuracy on a fixed test subset and the last module's mean training
loss over the last epoch.

    python -m bench.token_context --json bench/results/token_context.json

Needs the CIFAR-10 files (``--data-dir``, default the tests' cache). A few minutes on 2 CPU cores.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import List, Optional

import numpy as np
import torch

from contsup_fast import LocalSequential, tokens
from contsup_fast.data import find_data_dir, load_cifar, subset_indices
from contsup_fast.local import CIFAR10_MEAN, CIFAR10_STD

from .common import environment, write_results


def _tensor(images: np.ndarray) -> torch.Tensor:
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
    mean, std = torch.tensor(CIFAR10_MEAN).view(1, 3, 1, 1), torch.tensor(CIFAR10_STD).view(1, 3, 1, 1)
    return (x - mean) / std


def run(norm: Optional[str], scale: float, seed: int, data, epochs: int, batch: int, lr: float) -> dict:
    """One training run; ``norm=None`` is R0 (no context)."""
    from torchvision.models import VisionTransformer

    (xtr, ytr), (xte, yte) = data
    torch.manual_seed(seed)
    model = VisionTransformer(image_size=32, patch_size=4, num_layers=4, num_heads=2, hidden_dim=64,
                              mlp_dim=128, num_classes=10)
    tokens.DEFAULT_NORM, tokens.DEFAULT_SCALE = norm or "layer", scale
    local = LocalSequential(model, K=3, context="R1E" if norm else "R0", backend="torch")
    opt = torch.optim.SGD(local.parameters(), lr=lr, momentum=0.9, weight_decay=1e-4)
    steps = epochs * (len(xtr) // batch)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, lr, total_steps=steps, pct_start=0.2)
    g = torch.Generator().manual_seed(seed)
    last = []
    start = time.time()
    for epoch in range(epochs):
        perm = torch.randperm(len(xtr), generator=g)
        last = []
        for i in range(len(xtr) // batch):
            idx = perm[i * batch:(i + 1) * batch]
            x = xtr[idx]
            flip = torch.rand(len(idx), generator=g) < 0.5
            x = torch.where(flip.view(-1, 1, 1, 1), x.flip(3), x)
            opt.zero_grad(set_to_none=True)
            out = local(x, ytr[idx])
            opt.step()
            sched.step()
            last.append(float(out.loss))
    local.eval()
    with torch.no_grad():
        correct = sum(int((local(xte[i:i + 500]).argmax(1) == yte[i:i + 500]).sum())
                      for i in range(0, len(xte), 500))
    return {"norm": norm, "scale": scale if norm else None, "seed": seed, "test_acc": correct / len(xte),
            "last_loss": float(np.mean(last)), "seconds": time.time() - start}


def main(argv: Optional[List[str]] = None) -> List[dict]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-dir", default=None)
    p.add_argument("--train", type=int, default=5000, help="training images (class-balanced subset)")
    p.add_argument("--test", type=int, default=2000, help="test images (the first ones)")
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--scales", type=float, nargs="+", default=[1.0, 0.1])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    root = find_data_dir("cifar10", args.data_dir)
    images, labels = load_cifar(root, train=True, verify=False)
    idx = subset_indices(labels, args.train, seed=0)
    timages, tlabels = load_cifar(root, train=False, verify=False)
    data = ((_tensor(images[idx]), torch.from_numpy(labels[idx]).long()),
            (_tensor(timages[: args.test]), torch.from_numpy(tlabels[: args.test]).long()))
    configs = [(None, 0.0)] + [(n, s) for n in tokens.NORMS for s in args.scales]
    rows = []
    for norm, scale in configs:
        for seed in args.seeds:
            r = run(norm, scale, seed, data, args.epochs, args.batch, args.lr)
            rows.append(r)
            label = "R0" if norm is None else f"R1E {norm} scale={scale}"
            print(f"{label:<24} seed {seed}: test {r['test_acc']:.2%}  last-module loss "
                  f"{r['last_loss']:.3f}  ({r['seconds']:.0f} s)", flush=True)
    if args.json:
        out = Path(args.json)
        write_results(out.stem, "token_context", environment(torch.device("cpu")), vars(args), rows, out.parent)
    return rows


if __name__ == "__main__":
    main()
