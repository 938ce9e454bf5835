"""Split tables and loss weights of the ContSup paper (arXiv 2312.07636) and its reference code.

A cut is written ``(stage, block)``: the boundary right after block ``block`` of stage
``stage`` of a CIFAR ResNet, where stage 0 is the stem (Conv -> BN -> ReLU) and stages 1-3
are ``layer1..layer3``. ``K`` modules need ``K - 1`` cuts.
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


def reconstruction_weights(arch: Optional[str], K: int,
                           balanced: bool) -> Optional[Tuple[float, float, float, float]]:
    """The reference's reconstruction loss weights for ``arch`` at ``K``, or None.

    With ``balanced`` (``split="balanced"``, the reference's ``--balanced_memory``) the
    memory-balance table is read; where it has no entry but the memory-balanced split is the
    equal-layer one (ResNet-32 at K = 16, where the reference's table has none and its
    ``train.py`` would stop with a KeyError), the equal-layer weights are returned.
    """
    if balanced:
        weights = RECONSTRUCTION_WEIGHTS_BALANCED.get(arch or "", {}).get(K)
        if weights is not None or preset_cuts(arch, K, True) != preset_cuts(arch, K, False):
            return weights
    return RECONSTRUCTION_WEIGHTS.get(arch or "", {}).get(K)


def preset_cuts(arch: Optional[str], K: int, balanced: bool) -> Optional[List[Cut]]:
    """The paper's ``(stage, block)`` cuts for ``arch`` and ``K``, or None when it has none."""
    table = MEMORY_BALANCED if balanced else EQUAL_LAYERS
    return table.get(arch or "", {}).get(K)


def cut_to_node_name(cut: Cut) -> str:
    """``(stage, block)`` -> the qualified name of the module whose output is cut."""
    stage, block = cut
    return "relu" if stage == 0 else f"layer{stage}.{block}"
