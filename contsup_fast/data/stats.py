"""Per-dataset normalisation statistics and class counts, by dataset name."""
from __future__ import annotations

from typing import Dict, Optional, Tuple

import numpy as np

__all__ = ["DATASET_STATS", "IMAGENET_STATS", "NUM_CLASSES", "dataset_stats", "num_classes"]

#: per-channel mean and std of the training images (in [0, 1] units)
DATASET_STATS: Dict[str, Tuple[Tuple[float, ...], Tuple[float, ...]]] = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "svhn": ((0.4377, 0.4438, 0.4728), (0.1980, 0.2010, 0.1970)),
    "stl10": ((0.4467, 0.4398, 0.4066), (0.2603, 0.2566, 0.2713)),
    "mnist": ((0.1307,) * 3, (0.3081,) * 3),
    "fashionmnist": ((0.2860,) * 3, (0.3530,) * 3),
    "kmnist": ((0.1918,) * 3, (0.3483,) * 3),
}
#: ImageNet statistics, used for datasets not listed above
IMAGENET_STATS = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))

NUM_CLASSES = {"cifar10": 10, "cifar100": 100, "svhn": 10, "stl10": 10, "mnist": 10,
               "fashionmnist": 10, "kmnist": 10}


def _canon(name: str) -> str:
    return name.lower().replace("-", "").replace("_", "")


def dataset_stats(name: str) -> Tuple[Tuple[float, ...], Tuple[float, ...]]:
    """(mean, std) per channel for dataset ``name`` (ImageNet statistics if unknown)."""
    return DATASET_STATS.get(_canon(name), IMAGENET_STATS)


def num_classes(name: str, labels: Optional[np.ndarray] = None) -> int:
    """Number of classes of dataset ``name`` (from ``labels`` if the name is unknown)."""
    key = _canon(name)
    if key in NUM_CLASSES:
        return NUM_CLASSES[key]
    if labels is None:
        raise ValueError(f"unknown dataset {name!r}: pass its labels to count the classes")
    return int(np.max(labels)) + 1
