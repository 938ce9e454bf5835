"""ImageFolder datasets (ImageNet-scale data: decoded and augmented per image by DataLoader
workers, seeded per image so that resuming mid-epoch is exact)."""
from __future__ import annotations

import os
from typing import List, Optional, Tuple

import torch

from .augment import _plan_seed
from .stats import IMAGENET_STATS

__all__ = ["IMAGEFOLDER_LAYOUT", "check_imagefolder", "imagefolder_transforms", "ImageFolderLoader",
           "imagefolder_loaders"]

#: the folder layout ``--dataset imagefolder --data-dir DIR`` reads
IMAGEFOLDER_LAYOUT = "DIR/train/<class>/<image> and DIR/val/<class>/<image> (torchvision ImageFolder)"


def check_imagefolder(root) -> Tuple[str, str]:
    """``(train_dir, val_dir)`` of an ImageFolder dataset under ``root``.

    Raises:
        FileNotFoundError: ``root`` is missing, or ``train/`` or ``val/`` is missing or holds
            no class folder; the message names the path and :data:`IMAGEFOLDER_LAYOUT`.
    """
    root = os.path.expanduser(str(root))
    if not os.path.isdir(root):
        raise FileNotFoundError(f"--data-dir {root!r} does not exist; --dataset imagefolder "
                                f"expects {IMAGEFOLDER_LAYOUT}")
    dirs = []
    for split in ("train", "val"):
        d = os.path.join(root, split)
        if not os.path.isdir(d):
            raise FileNotFoundError(f"{d!r} is missing; --dataset imagefolder expects "
                                    f"{IMAGEFOLDER_LAYOUT}")
        if not any(e.is_dir() for e in os.scandir(d)):
            raise FileNotFoundError(f"{d!r} holds no class folders; --dataset imagefolder "
                                    f"expects {IMAGEFOLDER_LAYOUT}")
        dirs.append(d)
    return dirs[0], dirs[1]


def imagefolder_transforms(train: bool, size: int = 224, resize: int = 256, mean=IMAGENET_STATS[0],
                           std=IMAGENET_STATS[1]):
    """The standard torchvision ImageNet transforms: ``RandomResizedCrop(size)`` and a
    horizontal flip for training, ``Resize(resize)`` and ``CenterCrop(size)`` for evaluation;
    then ``ToTensor`` and ``Normalize(mean, std)`` (float32 (3, size, size))."""
    from torchvision import transforms as T
    head = ([T.RandomResizedCrop(size), T.RandomHorizontalFlip()] if train
            else [T.Resize(resize), T.CenterCrop(size)])
    return T.Compose(head + [T.ToTensor(), T.Normalize(mean, std)])


class _EpochSeeded(torch.utils.data.Dataset):
    """Item ``i`` of ``dataset`` with its random transform drawn from a generator seeded by
    ``(seed, epoch, i)``: the augmentation of an image does not depend on the worker, the
    order or on an interruption (exact mid-epoch resume)."""

    def __init__(self, dataset, seed: int):
        self.dataset, self.seed, self.epoch = dataset, int(seed), 0

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, i):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(_plan_seed(self.seed * 1000003 + int(i), self.epoch))
            return self.dataset[i]


class ImageFolderLoader:
    """Batches ``(x float32 (B, 3, S, S) normalised, y int64 (B,))`` of an ImageFolder split,
    decoded and transformed by ``num_workers`` DataLoader worker processes.

    Training: a shuffle seeded by ``(seed, epoch)``; with ``world_size > 1`` a
    ``DistributedSampler`` gives each rank its own ``batch_size // world_size`` images per step
    (``sharded`` is True). Evaluation: in order; with ``world_size > 1`` rank r takes every
    world_size-th image (all images are seen exactly once over the ranks). ``set_epoch`` and
    ``iter_from(start_batch)`` as the CIFAR loaders (exact resume).

    Raises:
        ValueError: a per-rank batch below 1.
    """

    def __init__(self, dataset, batch_size: int, train: bool, device="cpu", seed: int = 0,
                 rank: int = 0, world_size: int = 1, num_workers: Optional[int] = None,
                 channels_last: bool = False):
        from torch.utils.data import DistributedSampler
        self.train, self.device, self.channels_last = bool(train), torch.device(device), channels_last
        self.world_size, self.rank = int(world_size), int(rank)
        self.sharded = self.world_size > 1
        self.batch_size = int(batch_size) // (self.world_size if train else 1)
        if self.batch_size < 1:
            raise ValueError(f"batch_size {batch_size} gives no image per rank on {world_size} ranks")
        self.num_workers = min(4, os.cpu_count() or 1) if num_workers is None else int(num_workers)
        self.epoch = 0
        if train:
            self.dataset = _EpochSeeded(dataset, seed)
            self.sampler = (DistributedSampler(self.dataset, world_size, rank, shuffle=True, seed=seed,
                                               drop_last=True) if self.sharded else None)
            self.seed = int(seed)
        else:
            self.dataset = (torch.utils.data.Subset(dataset, range(rank, len(dataset), world_size))
                            if self.sharded else dataset)
            self.sampler = None

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)
        if self.train:
            self.dataset.epoch = self.epoch
            if self.sampler is not None:
                self.sampler.set_epoch(self.epoch)

    def _order(self) -> List[int]:
        if self.sampler is not None:
            return list(iter(self.sampler))
        if self.train:
            g = torch.Generator().manual_seed(_plan_seed(self.seed, self.epoch))
            return torch.randperm(len(self.dataset), generator=g).tolist()
        return list(range(len(self.dataset)))

    def _num_images(self) -> int:
        return len(self.sampler) if self.sampler is not None else len(self.dataset)

    def __len__(self) -> int:
        full, rem = divmod(self._num_images(), self.batch_size)
        # training drops a last batch under 2 images: BatchNorm cannot train on one
        return full + (1 if rem >= (2 if self.train else 1) else 0)

    def __iter__(self):
        return self.iter_from(0)

    def iter_from(self, start: int = 0):
        order = self._order()[start * self.batch_size: len(self) * self.batch_size]
        dl = torch.utils.data.DataLoader(
            self.dataset, batch_size=self.batch_size, sampler=order, num_workers=self.num_workers,
            pin_memory=self.device.type == "cuda",
            persistent_workers=False, prefetch_factor=2 if self.num_workers > 0 else None)
        for x, y in dl:
            x = x.to(self.device, non_blocking=True)
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            yield x, y.to(self.device, non_blocking=True)


def imagefolder_loaders(root, batch_size: int, eval_batch_size: int, device="cpu", seed: int = 0,
                        rank: int = 0, world_size: int = 1, num_workers: Optional[int] = None,
                        channels_last: bool = False, size: int = 224):
    """``(train_loader, val_loader, classes)`` of the ImageFolder dataset under ``root``
    (:func:`check_imagefolder`, :func:`imagefolder_transforms`, :class:`ImageFolderLoader`).
    ``world_size > 1`` shards both splits over the ranks (data parallel).

    Raises:
        FileNotFoundError: wrong layout (one line naming the path and the expected layout).
        ValueError: train and val have different class folders.
    """
    from torchvision.datasets import ImageFolder
    train_dir, val_dir = check_imagefolder(root)
    resize = int(round(size * 256 / 224))
    train_ds = ImageFolder(train_dir, imagefolder_transforms(True, size, resize))
    val_ds = ImageFolder(val_dir, imagefolder_transforms(False, size, resize))
    if train_ds.classes != val_ds.classes:
        raise ValueError(f"{train_dir!r} and {val_dir!r} have different class folders "
                         f"({len(train_ds.classes)} vs {len(val_ds.classes)})")
    common = dict(device=device, seed=seed, rank=rank, world_size=world_size,
                  num_workers=num_workers, channels_last=channels_last)
    return (ImageFolderLoader(train_ds, batch_size, True, **common),
            ImageFolderLoader(val_ds, eval_batch_size, False, **common), train_ds.classes)
