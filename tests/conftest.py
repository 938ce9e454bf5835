"""Shared fixtures and markers.

Markers: ``cuda`` (needs an NVIDIA GPU; skipped without one), ``slow`` (seconds to minutes;
CI runs them). ``cifar10_root`` unpacks the shared CIFAR-10 copy once into a cache.
"""
import os
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
