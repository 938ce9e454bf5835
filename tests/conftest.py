"""Shared fixtures and markers.

Markers: ``cuda`` (needs an NVIDIA GPU; skipped without one), ``slow`` (seconds to minutes;
CI runs them). ``cifar10_root`` unpacks the shared CIFAR-10 copy once into a cache.
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


def _write_pickle(path, obj):
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=2)


@pytest.fixture(scope="module")
def tiny_cifar(tmp_path_factory):
    """A learnable synthetic CIFAR-10 in the official layout: 200 train, 100 test images whose
    class sets the mean colour."""
    root = tmp_path_factory.mktemp("tinycifar")
    folder = root / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(0)
    palette = rng.integers(30, 225, (10, 3))

    def make(n):
        y = np.arange(n) % 10
        rng.shuffle(y)
        x = palette[y][:, :, None, None] + rng.normal(0, 25, (n, 3, 32, 32))
        return np.clip(x, 0, 255).astype(np.uint8).reshape(n, 3072), y

    for b in range(1, 6):
        x, y = make(40)
        _write_pickle(folder / f"data_batch_{b}", {b"data": x, b"labels": y.tolist()})
    x, y = make(100)
    _write_pickle(folder / "test_batch", {b"data": x, b"labels": y.tolist()})
    return str(root)
