"""The CIFAR-10/100 reader: the official python pickle layout (``cifar-10-batches-py/`` or
``cifar-100-python/``), with the official md5 sums checked (a mismatch, for instance the
JPEG-lossy shared copy, only raises a :class:`UserWarning`)."""
from __future__ import annotations

import hashlib
import os
import pickle
import warnings
from typing import Dict, Sequence, Tuple

import numpy as np

from .stats import _canon

__all__ = ["CIFAR10_MD5", "CIFAR100_MD5", "load_cifar"]

# Official md5 sums (torchvision's CIFAR10/CIFAR100 ``train_list``/``test_list``); the copy in
# torchvision wins when it is installed, these are the fallback.
CIFAR10_MD5 = {
    "data_batch_1": "c99cafc152244af753f735de768cd75f",
    "data_batch_2": "d4bba439e000b95fd0a9bffe97cbabec",
    "data_batch_3": "54ebc095f3ab1f0389bbae665268c751",
    "data_batch_4": "634d18415352ddfa80567beed471001a",
    "data_batch_5": "482c414d41f54cd18b22e5b47cb7c3cb",
    "test_batch": "40351d587109b95175f43aff81a1287e",
}
CIFAR100_MD5 = {
    "train": "16019d7e3df5f24257cddd939b257f8d",
    "test": "f0ef6b0ae62326f3e7ffdfab6717acfc",
}

_CIFAR_LAYOUT = {
    # name: (folder, train files, test files, label key)
    "cifar10": ("cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], ["test_batch"],
                b"labels"),
    "cifar100": ("cifar-100-python", ["train"], ["test"], b"fine_labels"),
}


def _official_md5(name: str) -> Dict[str, str]:
    try:
        from torchvision.datasets import CIFAR10, CIFAR100
        cls = CIFAR10 if name == "cifar10" else CIFAR100
        return {f: md5 for f, md5 in list(cls.train_list) + list(cls.test_list)}
    except Exception:  # torchvision missing or changed
        return dict(CIFAR10_MD5 if name == "cifar10" else CIFAR100_MD5)


def _md5(path: str, chunk: int = 1 << 22) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


# checked (path, size, mtime) -> ok, so that one process hashes each file once
_MD5_CACHE: Dict[Tuple[str, int, float], bool] = {}


def _verify(paths: Sequence[str], name: str) -> None:
    official = _official_md5(name)
    bad = []
    for p in paths:
        st = os.stat(p)
        key = (os.path.abspath(p), st.st_size, st.st_mtime)
        if key not in _MD5_CACHE:
            want = official.get(os.path.basename(p))
            _MD5_CACHE[key] = want is None or _md5(p) == want
        if not _MD5_CACHE[key]:
            bad.append(os.path.basename(p))
    if bad:
        warnings.warn(
            f"{name}: md5 of {', '.join(bad)} in {os.path.dirname(paths[0])} differs from the "
            f"official release; this copy is not the official one (e.g. the JPEG-lossy shared "
            f"copy), so accuracies are not comparable with published {name} numbers",
            UserWarning, stacklevel=3)


def _resolve_cifar_dir(root: str, name: str) -> str:
    folder, train_files, test_files, _ = _CIFAR_LAYOUT[name]
    root = os.path.expanduser(str(root))
    candidates = [os.path.join(root, folder), root]
    for c in candidates:
        if all(os.path.isfile(os.path.join(c, f)) for f in train_files + test_files):
            return c
    looked = " or ".join(repr(c) for c in candidates)
    raise FileNotFoundError(
        f"{name}: expected the official python layout ({folder}/ with "
        f"{', '.join(train_files + test_files)}) in {looked}; pass the folder that contains "
        f"{folder}/ (for CIFAR-10 the shared copy is written by "
        f"`python /work/shared/data/cifar10/unpack.py --out DIR`)")


def load_cifar(root, name: str = "cifar10", train: bool = True, verify: bool = True
               ) -> Tuple[np.ndarray, np.ndarray]:
    """Read CIFAR-10/100 from the official python layout.

    ``root`` is the folder that contains ``cifar-10-batches-py/`` (``cifar-100-python/``) or
    that folder itself. Returns ``(images, labels)``: uint8 (N, 32, 32, 3) and int64 (N,).
    With ``verify`` the files' md5 sums are compared with the official ones and a mismatch
    raises a ``UserWarning`` (never an error).
    """
    name = _canon(name)
    if name not in _CIFAR_LAYOUT:
        raise ValueError(f"load_cifar reads cifar10 or cifar100, not {name!r}")
    folder = _resolve_cifar_dir(root, name)
    _, train_files, test_files, label_key = _CIFAR_LAYOUT[name]
    paths = [os.path.join(folder, f) for f in (train_files if train else test_files)]
    if verify:
        _verify(paths, name)
    data, labels = [], []
    for p in paths:
        with open(p, "rb") as f:
            batch = pickle.load(f, encoding="bytes")
        data.append(np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
        labels.append(np.asarray(batch[label_key], dtype=np.int64))
    images = np.ascontiguousarray(np.concatenate(data).transpose(0, 2, 3, 1))
    return images, np.concatenate(labels)
