"""Split tables and loss weights of the ContSup paper (arXiv 2312.07636) and its reference code.

A cut is written ``(stage, block)``: the boundary right after block ``block`` of stage
``stage`` of a CIFAR ResNet, where stage 0 is the stem (Conv -> BN -> ReLU) and stages 1-3
are ``layer1..layer3``. ``K`` modules need ``K - 1`` cuts.

The reference (github.com/Tab-ct/ContSup, ``networks_dev/configs.py``) keys its tables by
dataset: CIFAR-10's are the defaults; STL-10 has its own memory-balanced splits for ResNet-110,
STL-10 and SVHN their own reconstruction weights (``preset_dataset=`` selects them). Where the
reference has no table for a dataset, CIFAR-10's is used (the reference's ``train.py`` would
stop with a KeyError there). With AugLocal heads the default split is AugLocal's own
(github.com/ChenxiangMA/AugLocal, ``networks/configs.py``: the first K-1 boundaries of the finest
split, stem then every block; see :func:`auglocal_cuts`).
"""
from __future__ import annotations

from typing import Dict, List, Optional, Tuple

Cut = Tuple[int, int]

#: Equal-layer splits (paper Tables 1-3; InfoPro's partitioning).
EQUAL_LAYERS: Dict[str, Dict[int, List[Cut]]] = {
    "resnet32": {
        1: [],
        2: [(2, 1)],
        3: [(1, 4), (2, 4)],
        4: [(1, 2), (2, 1), (3, 0)],
        8: [(1, 0), (1, 2), (1, 4), (2, 1), (2, 3), (3, 0), (3, 2)],
        16: [(0, 0), (1, 0), (1, 1), (1, 2), (1, 3), (1, 4), (2, 0), (2, 1), (2, 2), (2, 3),
             (2, 4), (3, 0), (3, 1), (3, 2), (3, 3)],
    },
    "resnet110": {
        1: [],
        2: [(2, 8)],
        3: [(1, 17), (2, 17)],
        4: [(1, 11), (2, 7), (3, 3)],
        8: [(1, 4), (1, 11), (2, 0), (2, 7), (2, 14), (3, 3), (3, 10)],
        16: [(1, 1), (1, 4), (1, 7), (1, 10), (1, 13), (1, 16), (2, 1), (2, 4), (2, 7), (2, 11),
             (2, 15), (3, 1), (3, 5), (3, 9), (3, 13)],
    },
}

#: Memory-balanced splits (paper's GPU-memory-balanced partitioning, CIFAR-10).
MEMORY_BALANCED: Dict[str, Dict[int, List[Cut]]] = {
    "resnet32": {
        1: [],
        2: [(1, 3)],
        4: [(1, 2), (1, 4), (2, 2)],
        8: [(1, 1), (1, 2), (1, 3), (2, 1), (2, 2), (3, 1), (3, 2)],
        16: EQUAL_LAYERS["resnet32"][16],
    },
    "resnet110": {
        1: [],
        2: [(1, 14)],
        3: [(1, 9), (2, 2)],
        4: [(1, 6), (1, 14), (2, 8)],
    },
}

#: Memory-balanced splits for other datasets (the reference's ``iso_module_loc_for_memory_balance``).
MEMORY_BALANCED_BY_DATASET: Dict[str, Dict[str, Dict[int, List[Cut]]]] = {
    "stl10": {
        "resnet110": {1: [], 2: [(1, 14)], 3: [(1, 8), (2, 1)], 4: [(1, 6), (1, 14), (2, 8)]},
    },
}

#: InfoPro-style loss weights ``(recon_first, cls_first, recon_last, cls_last)`` used with
#: ``reconstruct=True``, interpolated linearly over the local modules (CIFAR-10, equal layers;
#: the reference's ``networks_dev/configs.py``, ``local_loss_scale``).
RECONSTRUCTION_WEIGHTS: Dict[str, Dict[int, Tuple[float, float, float, float]]] = {
    "resnet32": {2: (5.0, 1.0, 0.0, 0.0), 4: (6.0, 0.0, 1.0, 2.0), 8: (5.0, 0.0, 0.0, 2.0),
                 16: (5.0, 0.05, 0.2, 0.5)},
    "resnet110": {2: (5.0, 0.5, 0.0, 0.0), 4: (1.0, 0.0, 0.0, 1.0), 8: (5.0, 0.0, 0.0, 1.0),
                  16: (5.0, 0.0, 0.5, 1.0)},
}


#: The same weights for the memory-balanced splits (the reference's
#: ``local_loss_scale_for_memory_balance``, which its ``train.py`` reads with ``--balanced_memory``).
RECONSTRUCTION_WEIGHTS_BALANCED: Dict[str, Dict[int, Tuple[float, float, float, float]]] = {
    "resnet32": {2: (5.0, 0.1, 0.0, 0.0), 3: (5.0, 0.0, 5.0, 0.1), 4: (5.0, 0.0, 0.0, 0.1),
                 8: (5.0, 0.0, 0.0, 2.0)},
    "resnet110": {2: (5.0, 0.1, 0.0, 0.0), 3: (5.0, 0.0, 5.0, 0.1), 4: (5.0, 0.0, 0.0, 0.1)},
}


#: Equal-layer reconstruction weights for other datasets (the reference's ``local_loss_scale``).
RECONSTRUCTION_WEIGHTS_BY_DATASET: Dict[str, Dict[str, Dict[int, Tuple[float, float, float, float]]]] = {
    "stl10": {"resnet110": {2: (10.0, 1.0, 0.0, 0.0), 4: (20.0, 0.2, 5.0, 2.0), 8: (20.0, 0.2, 5.0, 1.0),
                            16: (20.0, 0.5, 10.0, 0.1)}},
    "svhn": {"resnet110": {2: (1.0, 0.1, 0.0, 0.0), 4: (5.0, 0.0, 0.5, 0.0), 8: (5.0, 0.0, 0.5, 2.0),
                           16: (5.0, 0.2, 0.5, 1.0)}},
}

#: datasets with preset tables (``preset_dataset=``); others use CIFAR-10's.
PRESET_DATASETS = ("cifar10", "stl10", "svhn")


def check_preset_dataset(dataset) -> str:
    """Validate ``preset_dataset``; returns it.

    Raises:
        ValueError: naming the option, the value and what is allowed.
    """
    if dataset not in PRESET_DATASETS:
        raise ValueError(f"preset_dataset must be one of {PRESET_DATASETS} (whose split and loss-weight tables "
                         f"to use), got {dataset!r}")
    return dataset


def _table(by_dataset, default, dataset: str, arch: Optional[str]):
    """``by_dataset[dataset][arch]`` when the reference has one, else ``default[arch]``."""
    own = by_dataset.get(dataset, {}).get(arch or "")
    return own if own is not None else default.get(arch or "", {})


def reconstruction_weights(arch: Optional[str], K: int, balanced: bool,
                           dataset: str = "cifar10") -> Optional[Tuple[float, float, float, float]]:
    """The reference's reconstruction loss weights for ``arch`` at ``K``, or None.

    With ``balanced`` (``split="balanced"``, the reference's ``--balanced_memory``) the
    memory-balance table is read (CIFAR-10's: the reference has no other); where it has no
    entry but the memory-balanced split is the equal-layer one (ResNet-32 at K = 16, where the
    reference's table has none and its ``train.py`` would stop with a KeyError), the
    equal-layer weights are returned. Without ``balanced``: ``dataset``'s table where the
    reference has one (STL-10, SVHN for ResNet-110), else CIFAR-10's.
    """
    if balanced:
        weights = RECONSTRUCTION_WEIGHTS_BALANCED.get(arch or "", {}).get(K)
        if weights is not None or preset_cuts(arch, K, True, dataset) != preset_cuts(arch, K, False, dataset):
            return weights
    return _table(RECONSTRUCTION_WEIGHTS_BY_DATASET, RECONSTRUCTION_WEIGHTS, dataset, arch).get(K)


def auglocal_cuts(arch: Optional[str], K: int) -> Optional[List[Cut]]:
    """AugLocal's cuts for K local modules of a CIFAR ResNet ``arch`` (``resnet<6n+2>``): the
    first K-1 boundaries of its finest split, the stem then every block (its ``train.py`` with
    ``--rule AugLocal``: ``net_config[:local_module_num - 1]``, with ``local_module_num`` =
    the paper's K minus the head depth d). None for another ``arch`` or K > 3n + 1."""
    if not arch or not arch.startswith("resnet") or not arch[len("resnet"):].isdigit():
        return None
    depth = int(arch[len("resnet"):])
    if depth < 8 or (depth - 2) % 6:
        return None
    n = (depth - 2) // 6
    finest = [(0, 0)] + [(s, b) for s in (1, 2, 3) for b in range(n)][:-1]  # not the network's end
    return finest[:K - 1] if K - 1 <= len(finest) else None


def preset_cuts(arch: Optional[str], K: int, balanced: bool, dataset: str = "cifar10",
                aux: Optional[str] = None) -> Optional[List[Cut]]:
    """The reference's ``(stage, block)`` cuts for ``arch`` and ``K``, or None when it has none:
    AugLocal's (:func:`auglocal_cuts`) for ``aux="auglocal"`` without ``balanced``; else the
    memory-balanced table (``dataset``'s where the reference has one) or the equal-layer one."""
    if aux == "auglocal" and not balanced:
        return auglocal_cuts(arch, K)
    if balanced:
        return _table(MEMORY_BALANCED_BY_DATASET, MEMORY_BALANCED, dataset, arch).get(K)
    return EQUAL_LAYERS.get(arch or "", {}).get(K)


def cut_to_node_name(cut: Cut) -> str:
    """``(stage, block)`` -> the qualified name of the module whose output is cut."""
    stage, block = cut
    return "relu" if stage == 0 else f"layer{stage}.{block}"
