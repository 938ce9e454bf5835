"""The CIFAR-style loaders of whole uint8 datasets held in memory: augmenting training loaders
(on the device, :class:`GPUAugmentLoader`, or prepared ahead by DataLoader workers,
:class:`CPUAugmentLoader`; both draw the same epoch plan) and the evaluation loader."""
from __future__ import annotations

import os
from typing import Iterator, Optional, Tuple

import numpy as np
import torch

from .augment import augment_batch, epoch_plan, normalize_batch

__all__ = ["GPUAugmentLoader", "CPUAugmentLoader", "EvalLoader", "make_train_loader"]


def _images_to_tensor(images) -> torch.Tensor:
    """uint8 NHWC numpy/tensor -> contiguous uint8 NCHW tensor."""
    t = torch.as_tensor(np.asarray(images)) if not isinstance(images, torch.Tensor) else images
    if t.dtype != torch.uint8:
        raise TypeError(f"images must be uint8, got {t.dtype}")
    if t.ndim != 4:
        raise ValueError(f"images must be (N, H, W, C), got shape {tuple(t.shape)}")
    if t.shape[-1] in (1, 3) and t.shape[1] not in (1, 3):
        t = t.permute(0, 3, 1, 2)
    return t.contiguous()


class _Batches:
    """Shared bookkeeping of the train loaders: batch boundaries of an epoch plan."""

    def __init__(self, n: int, batch_size: int, seed: int, padding: int, flip: bool,
                 drop_last: bool):
        if batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        self.n, self.batch_size, self.seed = n, int(batch_size), int(seed)
        self.padding, self.flip, self.drop_last = int(padding), bool(flip), bool(drop_last)
        self.epoch = 0

    def __len__(self) -> int:
        full, rem = divmod(self.n, self.batch_size)
        # a final batch of a single example is always dropped: BatchNorm cannot train on it
        return full + (1 if rem >= 2 and not self.drop_last else 0)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def _plan(self):
        return epoch_plan(self.n, self.seed, self.epoch, self.padding, self.flip)

    def _slice(self, i: int) -> slice:
        return slice(i * self.batch_size, min((i + 1) * self.batch_size, self.n))


class GPUAugmentLoader(_Batches):
    """Training batches augmented on the device; the whole uint8 dataset stays resident there.

    Iterating yields ``(x, y)``: ``x`` float32 (B, C, H, W) normalised (channels_last if asked),
    ``y`` int64, both on ``device``. Call :meth:`set_epoch` before each epoch; ``iter_from(i)``
    starts at batch ``i`` (exact mid-epoch resume). Works on any device (the tests run it on
    the CPU), but is meant for CUDA.
    """

    def __init__(self, images, labels, batch_size: int, mean, std, device="cuda", seed: int = 0,
                 padding: int = 4, flip: bool = True, channels_last: bool = False,
                 drop_last: bool = False):
        self.device = torch.device(device)
        self.images = _images_to_tensor(images).to(self.device)
        self.labels = torch.as_tensor(np.asarray(labels), dtype=torch.int64).to(self.device)
        super().__init__(len(self.labels), batch_size, seed, padding, flip, drop_last)
        self.mean = torch.as_tensor(mean, dtype=torch.float32, device=self.device)
        self.std = torch.as_tensor(std, dtype=torch.float32, device=self.device)
        self.channels_last = channels_last

    def __iter__(self) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
        return self.iter_from(0)

    def iter_from(self, start: int = 0):
        plan = {k: v.to(self.device, non_blocking=True) for k, v in self._plan().items()}
        for i in range(start, len(self)):
            s = self._slice(i)
            idx = plan["perm"][s]
            x = augment_batch(self.images[idx], plan["dy"][s], plan["dx"][s], plan["flip"][s],
                              self.padding)
            yield normalize_batch(x, self.mean, self.std, self.channels_last), self.labels[idx]


class _BatchDataset(torch.utils.data.Dataset):
    """Item ``i`` = augmented uint8 batch ``i`` of the current epoch plan (for DataLoader)."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, owner: "CPUAugmentLoader",
                 plan, start: int):
        self.images, self.labels, self.owner, self.plan, self.start = (images, labels, owner,
                                                                        plan, start)

    def __len__(self):
        return len(self.owner) - self.start

    def __getitem__(self, i):
        s = self.owner._slice(i + self.start)
        idx = self.plan["perm"][s]
        x = augment_batch(self.images[idx], self.plan["dy"][s], self.plan["dx"][s],
                          self.plan["flip"][s], self.owner.padding)
        return x, self.labels[idx]


class CPUAugmentLoader(_Batches):
    """Training batches for the CPU: a ``torch.utils.data.DataLoader`` whose items are whole
    uint8 batches augmented by :func:`augment_batch` (identical draws to
    :class:`GPUAugmentLoader`); normalisation runs in the main process. ``num_workers``
    processes prepare batches ahead (default ``min(2, cpu_count)``; ``0`` = in-process).
    """

    def __init__(self, images, labels, batch_size: int, mean, std, device="cpu", seed: int = 0,
                 padding: int = 4, flip: bool = True, channels_last: bool = False,
                 drop_last: bool = False, num_workers: Optional[int] = None):
        self.images = _images_to_tensor(images)
        self.labels = torch.as_tensor(np.asarray(labels), dtype=torch.int64)
        super().__init__(len(self.labels), batch_size, seed, padding, flip, drop_last)
        self.device = torch.device(device)
        self.mean = torch.as_tensor(mean, dtype=torch.float32)
        self.std = torch.as_tensor(std, dtype=torch.float32)
        self.channels_last = channels_last
        self.num_workers = (min(2, os.cpu_count() or 1) if num_workers is None
                            else int(num_workers))

    def __iter__(self):
        return self.iter_from(0)

    def iter_from(self, start: int = 0):
        ds = _BatchDataset(self.images, self.labels, self, self._plan(), start)
        dl = torch.utils.data.DataLoader(
            ds, batch_size=None, shuffle=False, num_workers=self.num_workers,
            pin_memory=self.device.type == "cuda",
            prefetch_factor=2 if self.num_workers > 0 else None)
        for x, y in dl:
            x = normalize_batch(x.to(self.device, non_blocking=True), self.mean.to(self.device),
                                self.std.to(self.device), self.channels_last)
            yield x, y.to(self.device, non_blocking=True)


def make_train_loader(images, labels, batch_size: int, mean, std, device, seed: int = 0,
                      channels_last: bool = False, num_workers: Optional[int] = None,
                      padding: Optional[int] = None, flip: bool = True):
    """:class:`GPUAugmentLoader` on CUDA, :class:`CPUAugmentLoader` elsewhere.
    ``padding`` defaults to ``H // 8`` (4 for 32x32 images)."""
    device = torch.device(device)
    h = np.asarray(images).shape[1] if not isinstance(images, torch.Tensor) else images.shape[1]
    padding = max(1, int(h) // 8) if padding is None else padding
    if device.type == "cuda":
        return GPUAugmentLoader(images, labels, batch_size, mean, std, device, seed, padding,
                                flip, channels_last)
    return CPUAugmentLoader(images, labels, batch_size, mean, std, device, seed, padding, flip,
                            channels_last, num_workers=num_workers)


class EvalLoader:
    """Un-augmented, unshuffled normalised batches (test-set evaluation). On CUDA the uint8
    images are kept on the device."""

    def __init__(self, images, labels, batch_size: int, mean, std, device="cpu",
                 channels_last: bool = False):
        self.device = torch.device(device)
        keep = self.device if self.device.type == "cuda" else torch.device("cpu")
        self.images = _images_to_tensor(images).to(keep)
        self.labels = torch.as_tensor(np.asarray(labels), dtype=torch.int64).to(keep)
        self.batch_size = int(batch_size)
        self.mean = torch.as_tensor(mean, dtype=torch.float32, device=self.device)
        self.std = torch.as_tensor(std, dtype=torch.float32, device=self.device)
        self.channels_last = channels_last

    def __len__(self):
        return (len(self.labels) + self.batch_size - 1) // self.batch_size

    def __iter__(self):
        for i in range(0, len(self.labels), self.batch_size):
            x = self.images[i:i + self.batch_size].to(self.device, non_blocking=True)
            y = self.labels[i:i + self.batch_size].to(self.device, non_blocking=True)
            yield normalize_batch(x, self.mean, self.std, self.channels_last), y
