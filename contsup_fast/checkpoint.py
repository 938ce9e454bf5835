"""Atomic checkpoints and RNG-state capture for exact resumption.

:func:`save_checkpoint` writes to a temporary file in the target folder, flushes it to disk
and renames it over the target (``os.replace`` is atomic on POSIX and Windows), so a crash or
an interrupt during the save leaves the previous checkpoint intact. Everything stored is
plain data or tensors (numpy/python RNG states are converted), so :func:`load_checkpoint`
loads with ``torch.load(weights_only=True)``.
"""
from __future__ import annotations

import json
import os
import random
import tempfile
from typing import Any, Dict, Optional

import numpy as np
import torch

__all__ = ["CHECKPOINT_NAME", "save_checkpoint", "load_checkpoint", "resolve_checkpoint",
           "atomic_write_json", "get_rng_state", "set_rng_state"]

CHECKPOINT_NAME = "checkpoint.pt"


def _fsync_dir(folder: str) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # e.g. Windows: directories cannot be opened
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _atomic_write(path: str, write) -> None:
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp",
                               dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the usual permissions
        os.replace(tmp, path)
    except BaseException:  # also KeyboardInterrupt: never leave a half-written file behind
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    _fsync_dir(folder)


def save_checkpoint(state: Dict[str, Any], path: str) -> str:
    """Write ``state`` with ``torch.save`` to ``path`` atomically; returns ``path``."""
    _atomic_write(path, lambda f: torch.save(state, f))
    return path


def atomic_write_json(obj: Any, path: str) -> str:
    """Write ``obj`` as indented JSON to ``path`` atomically; returns ``path``."""
    data = json.dumps(obj, indent=2, sort_keys=False, default=str).encode() + b"\n"
    _atomic_write(path, lambda f: f.write(data))
    return path


def resolve_checkpoint(path: str) -> str:
    """``path`` itself if it is a file, ``path/checkpoint.pt`` if it is a run folder."""
    path = os.path.expanduser(str(path))
    if os.path.isdir(path):
        cand = os.path.join(path, CHECKPOINT_NAME)
        if not os.path.isfile(cand):
            raise FileNotFoundError(f"run folder {path!r} holds no {CHECKPOINT_NAME}")
        return cand
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no checkpoint at {path!r} (give a checkpoint file or a run "
                                f"folder containing {CHECKPOINT_NAME})")
    return path


def load_checkpoint(path: str, map_location: Any = "cpu") -> Dict[str, Any]:
    """Load a checkpoint written by :func:`save_checkpoint` (file or run folder)."""
    path = resolve_checkpoint(path)
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:
        raise RuntimeError(f"cannot read checkpoint {path!r}: {exc}") from exc


def get_rng_state() -> Dict[str, Any]:
    """RNG states of torch (CPU and every CUDA device), numpy and python ``random``."""
    np_state = np.random.get_state()
    py_version, py_internal, py_gauss = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"name": np_state[0], "keys": torch.from_numpy(np_state[1].astype(np.int64)),
                  "pos": int(np_state[2]), "has_gauss": int(np_state[3]),
                  "cached_gaussian": float(np_state[4])},
        "python": {"version": py_version, "internal": list(py_internal), "gauss": py_gauss},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Optional[Dict[str, Any]]) -> None:
    """Restore what :func:`get_rng_state` captured (CUDA states only if CUDA is in use)."""
    if not state:
        return
    torch.set_rng_state(state["torch"].cpu())
    npst = state["numpy"]
    np.random.set_state((npst["name"], npst["keys"].numpy().astype(np.uint32), npst["pos"],
                         npst["has_gauss"], npst["cached_gaussian"]))
    py = state["python"]
    random.setstate((py["version"], tuple(py["internal"]), py["gauss"]))
    cuda = state.get("cuda")
    if cuda is not None and torch.cuda.is_available():
        n = min(len(cuda), torch.cuda.device_count())
        for i in range(n):
            torch.cuda.set_rng_state(cuda[i].cpu(), i)
