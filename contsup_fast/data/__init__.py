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

Modules: :mod:`.stats` (normalisation statistics, class counts), :mod:`.cifar` (the CIFAR
reader), :mod:`.datasets` (reading by name, the data folder, subsets), :mod:`.augment` (the
epoch plan and the augmentation), :mod:`.loaders` (the in-memory loaders), :mod:`.imagefolder`
(ImageFolder data). Every public name is importable from ``contsup_fast.data``.
"""
from .augment import augment_batch, epoch_plan, normalize_batch
from .cifar import CIFAR10_MD5, CIFAR100_MD5, load_cifar
from .datasets import default_data_dir, find_data_dir, load_dataset, subset_indices
from .imagefolder import (IMAGEFOLDER_LAYOUT, ImageFolderLoader, check_imagefolder, imagefolder_loaders,
                          imagefolder_transforms)
from .loaders import CPUAugmentLoader, EvalLoader, GPUAugmentLoader, make_train_loader
from .stats import DATASET_STATS, IMAGENET_STATS, NUM_CLASSES, dataset_stats, num_classes

__all__ = [
    "DATASET_STATS", "NUM_CLASSES", "dataset_stats", "num_classes", "load_cifar", "load_dataset",
    "default_data_dir", "find_data_dir", "subset_indices", "augment_batch", "normalize_batch",
    "epoch_plan", "GPUAugmentLoader", "CPUAugmentLoader", "EvalLoader", "make_train_loader",
    "CIFAR10_MD5", "CIFAR100_MD5", "IMAGEFOLDER_LAYOUT", "check_imagefolder",
    "imagefolder_transforms", "ImageFolderLoader", "imagefolder_loaders",
]
