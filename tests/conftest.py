"""Shared fixtures and markers.

Markers: ``cuda`` (needs an NVIDIA GPU; skipped without one), ``slow`` (seconds to minutes;
CI runs them), ``reference`` (needs the authors' checkouts in ``$CONTSUP_REFERENCE_DIR``, see
``scripts/fetch-references.sh``; skipped without them, so CI skips them). ``cifar10_root`` unpacks the shared CIFAR-10 copy once into a cache.
"""
import os
import pickle
import subprocess
import sys
from pathlib import Path

# Triton kernels run on the CPU in Triton's interpreter; it must be chosen before triton loads.
try:
    import torch as _torch_probe
    if not _torch_probe.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")
except ImportError:  # pragma: no cover
    pass

import numpy as np
import pytest
import torch


def pytest_configure(config):
    config.addinivalue_line("markers", "cuda: needs a CUDA GPU (skipped without one)")
    config.addinivalue_line("markers", "slow: takes seconds to minutes")
    config.addinivalue_line("markers", "reference: needs the authors' code in $CONTSUP_REFERENCE_DIR "
                                       "(skipped without it)")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


def _shared_pack() -> Path:
    env = os.environ.get("CONTSUP_SHARED")
    here = Path(__file__).resolve().parent.parent
    candidates = [Path(env)] if env else []
    candidates += [here.parent / "shared" / "data" / "cifar10", here / "shared" / "data" / "cifar10"]
    for c in candidates:
        if (c / "unpack.py").exists():
            return c
    return None


@pytest.fixture(scope="session")
def cifar10_root() -> Path:
    """Directory holding ``cifar-10-batches-py`` (unpacked from ../shared once, cached)."""
    cache = Path(os.environ.get("CONTSUP_DATA_CACHE", Path.home() / ".cache" / "contsup_fast" / "cifar10"))
    if (cache / "cifar-10-batches-py" / "test_batch").exists():
        return cache
    pack = _shared_pack()
    if pack is None:
        pytest.skip("CIFAR-10 not found: set CONTSUP_DATA_CACHE to a dir with cifar-10-batches-py, "
                    "or put the shared pack at ../shared/data/cifar10")
    cache.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, str(pack / "unpack.py"), "--out", str(cache)], check=True)
    return cache


def write_tiny_cifar(root, per_batch: int = 40, n_test: int = 100) -> str:
    """Write a learnable synthetic CIFAR-10 in the official python layout under ``root``:
    5 training batches of ``per_batch`` and ``n_test`` test 32x32 images whose class sets the
    mean colour. Returns ``root`` as a string."""
    folder = Path(root) / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    palette = rng.integers(30, 225, (10, 3))

    def make(n):
        y = np.arange(n) % 10
        rng.shuffle(y)
        x = palette[y][:, :, None, None] + rng.normal(0, 25, (n, 3, 32, 32))
        return {b"data": np.clip(x, 0, 255).astype(np.uint8).reshape(n, 3072), b"labels": y.tolist()}

    for name, n in [(f"data_batch_{b}", per_batch) for b in range(1, 6)] + [("test_batch", n_test)]:
        with open(folder / name, "wb") as f:
            pickle.dump(make(n), f, protocol=2)
    return str(root)


@pytest.fixture(scope="module")
def tiny_cifar(tmp_path_factory):
    """A learnable synthetic CIFAR-10 in the official layout: 200 train, 100 test images whose
    class sets the mean colour."""
    return write_tiny_cifar(tmp_path_factory.mktemp("tinycifar"), per_batch=40, n_test=100)
