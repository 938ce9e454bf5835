"""Datasets and augmenting loaders for ContSup training.

Reading
-------
:func:`load_cifar` reads CIFAR-10/100 from the official python pickle layout
(``cifar-10-batches-py/`` or ``cifar-100-python/``) without insisting on the official
checksums: they are verified, and a mismatch (for instance the JPEG-lossy shared copy) only
raises a :class:`UserWarning`. :func:`load_dataset` dispatches by name and falls back to
``torchvision.datasets`` (``download=False``) for other datasets (``svhn``, ``stl10``,
``mnist``, ...). Every reader returns ``(images, labels)``: ``images`` a uint8 numpy array of
shape (N, H, W, 3) (grayscale data is repeated to three channels), ``labels`` int64 (N,).

Augmenting
----------
Training batches are drawn from an *epoch plan* that is a pure function of
``(seed, epoch)``: a shuffling permutation plus, for every position, a random translation in
``[-padding, padding]`` (pad-and-random-crop with zero fill) and a horizontal-flip bit. The
augmentation itself (:func:`augment_batch`) is a vectorised gather with torch ops, so the same
code runs on CUDA (:class:`GPUAugmentLoader`, whole dataset resident on the device as uint8)
and on the CPU (:class:`CPUAugmentLoader`, a ``DataLoader`` over whole batches, so workers
prepare batches ahead). Consequences:

* the two loaders yield identical batches for the same seed (up to the float normalisation);
* batch ``i`` of epoch ``e`` does not depend on the number of workers, on earlier epochs or on
  whether the run was interrupted: resuming mid-epoch is exact (``start_batch``).
"""
from __future__ import annotations

import hashlib
import os
import pickle
import warnings
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch

__all__ = [
    "DATASET_STATS", "NUM_CLASSES", "dataset_stats", "num_classes", "load_cifar", "load_dataset",
    "default_data_dir", "find_data_dir", "subset_indices", "augment_batch", "normalize_batch",
    "epoch_plan", "GPUAugmentLoader", "CPUAugmentLoader", "EvalLoader", "make_train_loader",
    "CIFAR10_MD5", "CIFAR100_MD5", "IMAGEFOLDER_LAYOUT", "check_imagefolder",
    "imagefolder_transforms", "ImageFolderLoader", "imagefolder_loaders",
]

# --------------------------------------------------------------------------------------------
# constants

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


# --------------------------------------------------------------------------------------------
# augmentation


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


# --------------------------------------------------------------------------------------------
# ImageFolder (ImageNet-scale data: decoded and augmented per image by DataLoader workers)

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
