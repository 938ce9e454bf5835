"""The epoch plan (a pure function of ``(seed, epoch)``: shuffle, crop offsets, flip bits) and
the vectorised pad-and-random-crop + horizontal-flip augmentation and normalisation of uint8
batches, the same torch ops on CUDA and on the CPU."""
from __future__ import annotations

from typing import Dict

import torch

__all__ = ["epoch_plan", "augment_batch", "normalize_batch"]


def _plan_seed(seed: int, epoch: int) -> int:
    """A 63-bit generator seed mixed from (seed, epoch) (SplitMix64 finaliser)."""
    z = (int(seed) * 0x9E3779B97F4A7C15 + int(epoch) * 0xBF58476D1CE4E5B9 + 0x94D049BB133111EB)
    z &= (1 << 64) - 1
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & ((1 << 64) - 1)
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & ((1 << 64) - 1)
    return (z ^ (z >> 31)) & ((1 << 63) - 1)


def epoch_plan(n: int, seed: int, epoch: int, padding: int = 4, flip: bool = True,
               shuffle: bool = True) -> Dict[str, torch.Tensor]:
    """The shuffle and augmentation draws of one epoch (CPU int64/bool tensors of length n).

    ``perm``: sample order; ``dy``, ``dx``: crop offsets in ``[0, 2*padding]`` of the padded
    image (``padding`` = centre); ``flip``: horizontal flip bits. A pure function of its
    arguments.
    """
    g = torch.Generator().manual_seed(_plan_seed(seed, epoch))
    perm = torch.randperm(n, generator=g) if shuffle else torch.arange(n)
    shifts = torch.randint(0, 2 * padding + 1, (2, n), generator=g)
    flips = (torch.randint(0, 2, (n,), generator=g).bool() if flip
             else torch.zeros(n, dtype=torch.bool))
    return {"perm": perm, "dy": shifts[0], "dx": shifts[1], "flip": flips}


def normalize_batch(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor,
                    channels_last: bool = False) -> torch.Tensor:
    """uint8 (N, C, H, W) -> float32 normalised, optionally channels_last."""
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    y = x.float().div_(255.0).sub_(mean.view(1, -1, 1, 1)).div_(std.view(1, -1, 1, 1))
    return y


def augment_batch(x: torch.Tensor, dy: torch.Tensor, dx: torch.Tensor, flip: torch.Tensor,
                  padding: int = 4) -> torch.Tensor:
    """Pad-``padding`` random crop + horizontal flip of a uint8 (N, C, H, W) batch.

    ``dy``/``dx`` (N,) are crop offsets in ``[0, 2*padding]`` into the zero-padded image and
    ``flip`` (N,) bools; all on ``x``'s device. One vectorised gather, no Python loop.
    Equals ``RandomCrop(H, padding)`` followed by ``RandomHorizontalFlip`` for those draws.
    """
    N, C, H, W = x.shape
    p = padding
    if p > 0:
        x = torch.nn.functional.pad(x, (p, p, p, p))
    dev = x.device
    rows = dy.view(N, 1) + torch.arange(H, device=dev).view(1, H)            # (N, H)
    cols_base = torch.arange(W, device=dev).view(1, W)
    cols_base = torch.where(flip.view(N, 1), (W - 1) - cols_base, cols_base)  # (N, W)
    cols = dx.view(N, 1) + cols_base
    Wp = W + 2 * p
    flat = (rows.view(N, H, 1) * Wp + cols.view(N, 1, W)).view(N, 1, H * W).expand(N, C, H * W)
    out = torch.gather(x.reshape(N, C, -1), 2, flat)
    return out.view(N, C, H, W)
