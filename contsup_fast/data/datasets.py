"""Reading a dataset by name (CIFAR through :mod:`.cifar`, others through
``torchvision.datasets`` with ``download=False``), where to find it, and fixed class-balanced
subsets."""
from __future__ import annotations

import os
from typing import Optional, Tuple

import numpy as np
import torch

from .cifar import _CIFAR_LAYOUT, _resolve_cifar_dir, load_cifar
from .stats import _canon

__all__ = ["load_dataset", "default_data_dir", "find_data_dir", "subset_indices"]

def _to_nhwc3(data) -> np.ndarray:
    a = data.numpy() if isinstance(data, torch.Tensor) else np.asarray(data)
    if a.ndim == 3:  # (N, H, W) grayscale
        a = a[..., None]
    elif a.shape[-1] not in (1, 3) and a.shape[1] in (1, 3):  # (N, C, H, W)
        a = a.transpose(0, 2, 3, 1)
    if a.shape[-1] == 1:
        a = np.repeat(a, 3, axis=-1)
    return np.ascontiguousarray(a.astype(np.uint8, copy=False))


def _load_torchvision(root, name: str, train: bool) -> Tuple[np.ndarray, np.ndarray]:
    import torchvision.datasets as tvd
    lookup = {n.lower(): n for n in dir(tvd) if isinstance(getattr(tvd, n), type)}
    key = _canon(name)
    if key not in lookup:
        raise ValueError(f"unknown dataset {name!r} (not cifar10/cifar100 and not in "
                         f"torchvision.datasets)")
    cls = getattr(tvd, lookup[key])
    root = os.path.expanduser(str(root))
    attempts = [dict(split="train" if train else "test"), dict(train=train)]
    errors = []
    for kw in attempts:
        try:
            ds = cls(root, download=False, **kw)
            break
        except TypeError as exc:  # the class takes the other keyword
            errors.append(exc)
        except RuntimeError as exc:  # torchvision: "Dataset not found or corrupted"
            raise FileNotFoundError(f"{name}: torchvision.datasets.{cls.__name__} found no data "
                                    f"under {root!r} (download=False): {exc}") from exc
    else:
        raise ValueError(f"{name}: cannot construct torchvision.datasets.{cls.__name__}: {errors}")
    data = getattr(ds, "data", None)
    labels = getattr(ds, "labels", None)
    if labels is None:
        labels = getattr(ds, "targets", None)
    if data is None or labels is None:  # generic (slow) path: decode item by item
        imgs, labs = [], []
        for img, lab in ds:
            imgs.append(np.asarray(img.convert("RGB") if hasattr(img, "convert") else img))
            labs.append(int(lab))
        data, labels = np.stack(imgs), labs
    labels = labels.numpy() if isinstance(labels, torch.Tensor) else np.asarray(labels)
    return _to_nhwc3(data), labels.astype(np.int64)


def load_dataset(root, name: str = "cifar10", train: bool = True
                 ) -> Tuple[np.ndarray, np.ndarray]:
    """``(images uint8 (N,H,W,3), labels int64)`` of dataset ``name`` under ``root``."""
    key = _canon(name)
    if key in _CIFAR_LAYOUT:
        return load_cifar(root, key, train)
    return _load_torchvision(root, name, train)


def default_data_dir(name: str = "cifar10") -> str:
    """The cache folder searched when no data folder is given:
    ``$CONTSUP_DATA_CACHE/<name>`` or ``~/.cache/contsup_fast/<name>``."""
    base = os.environ.get("CONTSUP_DATA_CACHE") or os.path.join("~", ".cache", "contsup_fast")
    return os.path.join(os.path.expanduser(base), _canon(name))


def find_data_dir(name: str = "cifar10", data_dir: Optional[str] = None) -> str:
    """``data_dir`` if given, else the default cache folder if the dataset is there."""
    if data_dir:
        return os.path.expanduser(data_dir)
    cand = default_data_dir(name)
    key = _canon(name)
    if key in _CIFAR_LAYOUT:
        try:
            _resolve_cifar_dir(cand, key)
            return cand
        except FileNotFoundError:
            pass
    elif os.path.isdir(cand):
        return cand
    hint = (" (for CIFAR-10: `python /work/shared/data/cifar10/unpack.py --out "
            f"{cand}` fills it)" if key == "cifar10" else "")
    raise FileNotFoundError(f"no --data-dir given and {name} was not found in the default cache "
                            f"{cand!r}{hint}")


def subset_indices(labels, n: int, seed: int = 0) -> np.ndarray:
    """A fixed, class-balanced subset of ``n`` indices (sorted ascending).

    The indices are permuted with ``seed``; then each class contributes its first examples
    in that order, round-robin, so every class gets ``n // C`` or ``n // C + 1`` examples
    (fewer only if the class is too small).
    """
    labels = np.asarray(labels)
    N = len(labels)
    if not 1 <= n <= N:
        raise ValueError(f"subset size must be in [1, {N}], got {n}")
    perm = np.random.default_rng(seed).permutation(N)
    lab = labels[perm]
    rank = np.empty(N, dtype=np.int64)  # rank of each permuted element within its class
    for c in np.unique(lab):
        m = lab == c
        rank[m] = np.arange(int(m.sum()))
    order = np.lexsort((np.arange(N), rank))  # by rank, ties by permuted position
    return np.sort(perm[order[:n]])
