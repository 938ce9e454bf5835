"""Memory accounting for a training step.

:class:`SavedTensorMeter` measures the peak of *live saved-for-backward bytes* with
``torch.autograd.graph.saved_tensors_hooks``: every tensor autograd saves is counted once
per storage (views and repeated saves share), from the moment it is saved until its graph is
freed (after the local backward that consumes it). Parameters and buffers are excluded: this
is the activation memory that greedy local learning exists to cut, and it works on any
device, CPU included. On CUDA, :func:`measure_step` also reports
``torch.cuda.max_memory_allocated`` (everything: weights, gradients, optimizer-free).

Command: ``python -m contsup_fast.memory`` prints, for resnet32 and resnet110, the
saved-activation peak of E2E (K=1) and of K = 2, 4, 8, 16 for each context mode, and its
ratio to E2E, and can write the table as JSON.
"""
from __future__ import annotations

import argparse
import json
import platform
from dataclasses import dataclass
from typing import Dict, Iterable, List, Optional

import torch
from torch import Tensor, nn

__all__ = ["SavedTensorMeter", "StepMemory", "measure_step", "memory_table", "METHODS", "method_table", "main"]


class _Handle:
    """Stands in for a saved tensor; its deletion (graph freed) releases the count."""

    __slots__ = ("meter", "key", "tensor", "__weakref__")

    def __init__(self, meter: "SavedTensorMeter", key, tensor: Tensor):
        self.meter, self.key, self.tensor = meter, key, tensor

    def __del__(self):
        self.meter._release(self.key)


class SavedTensorMeter:
    """Context manager counting live saved-for-backward bytes and their peak.

    Args:
        ignore: tensors whose storages are not counted (the model's parameters and buffers).

    Attributes:
        current: bytes of distinct storages currently saved by live autograd graphs.
        peak: the maximum of ``current`` while the meter was active (bytes).
    """

    def __init__(self, ignore: Iterable[Tensor] = ()):
        self._ignore = {self._key(t) for t in ignore}
        self._live: Dict[tuple, List[int]] = {}  # key -> [refcount, nbytes]
        self.current = 0
        self.peak = 0
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)

    @staticmethod
    def _key(t: Tensor):
        return (t.device, t.untyped_storage().data_ptr())

    def _pack(self, t: Tensor):
        key = self._key(t)
        if key in self._ignore or t.untyped_storage().nbytes() == 0:
            return t
        entry = self._live.get(key)
        if entry is None:
            nbytes = t.untyped_storage().nbytes()
            self._live[key] = [1, nbytes]
            self.current += nbytes
            self.peak = max(self.peak, self.current)
        else:
            entry[0] += 1
        return _Handle(self, key, t)

    @staticmethod
    def _unpack(packed):
        return packed.tensor if isinstance(packed, _Handle) else packed

    def _release(self, key) -> None:
        entry = self._live.get(key)
        if entry is None:
            return
        entry[0] -= 1
        if entry[0] == 0:
            del self._live[key]
            self.current -= entry[1]

    def __enter__(self) -> "SavedTensorMeter":
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._hooks.__exit__(*exc)


@dataclass
class StepMemory:
    """Memory of one training step: ``saved_peak`` (bytes, saved-tensor hooks) and, on CUDA,
    ``cuda_peak`` (bytes, ``torch.cuda.max_memory_allocated`` during the step) else None."""

    saved_peak: int
    cuda_peak: Optional[int]


def measure_step(local: nn.Module, x: Tensor, y: Tensor) -> StepMemory:
    """Run one training step ``local(x, y)`` and return its :class:`StepMemory`.

    ``local`` is a :class:`~contsup_fast.LocalSequential` (K=1 for end-to-end); gradients
    are accumulated into ``.grad`` as in a real step, so zero them before and after.
    """
    weights = list(local.parameters()) + list(local.buffers())
    cuda = x.is_cuda
    if cuda:
        torch.cuda.synchronize(x.device)
        torch.cuda.reset_peak_memory_stats(x.device)
        base = torch.cuda.memory_allocated(x.device)
    with SavedTensorMeter(ignore=weights) as meter:
        local(x, y)
    cuda_peak = None
    if cuda:
        torch.cuda.synchronize(x.device)
        cuda_peak = torch.cuda.max_memory_allocated(x.device) - base
    return StepMemory(saved_peak=meter.peak, cuda_peak=cuda_peak)


def memory_table(models: List[str], Ks: List[int], contexts: List[str], batch: int, device: str,
                 backend: str = "torch", seed: int = 0) -> List[dict]:
    """Measure E2E and every (model, K, context) once; return rows with ratios to E2E."""
    from .local import LocalSequential
    from .models import build_model

    rows = []
    for name in models:
        gen = torch.Generator().manual_seed(seed)
        x = torch.randn(batch, 3, 32, 32, generator=gen).to(device)
        y = torch.randint(0, 10, (batch,), generator=gen).to(device)
        e2e = None
        for K, context in [(1, "R0")] + [(K, c) for K in Ks for c in contexts]:
            torch.manual_seed(seed)
            local = LocalSequential(build_model(name), K=K, context=context, backend=backend).to(device)
            mem = measure_step(local, x, y)
            if e2e is None:
                e2e = mem
            rows.append({
                "model": name, "K": K, "context": "E2E" if K == 1 else context,
                "backend": local.backend_for(x.device).name, "batch": batch,
                "saved_peak_MiB": mem.saved_peak / 2**20,
                "saved_ratio": mem.saved_peak / e2e.saved_peak,
                "cuda_peak_MiB": None if mem.cuda_peak is None else mem.cuda_peak / 2**20,
                "cuda_ratio": None if mem.cuda_peak is None else mem.cuda_peak / e2e.cuda_peak,
            })
            del local
    return rows


#: local-learning methods of ``--methods``: LocalSequential keyword arguments beside ContSup's R1E.
METHODS = {
    "ContSup R1E, 1c2f": dict(context="R1E"),
    "greedy R0, 1c2f": dict(context="R0"),
    "DGL mlp-sr": dict(context="R0", aux="dgl"),
    "AugLocal d=2": dict(context="R0", aux="auglocal", aux_depth=2),
    "AugLocal d=3": dict(context="R0", aux="auglocal", aux_depth=3),
    "AugLocal d=5": dict(context="R0", aux="auglocal", aux_depth=5),
    "GN-DGL G=4": dict(context="R0", width_groups=4),
}


def method_table(models: List[str], K: int, batch: int, device: str, backend: str = "torch",
                 seed: int = 0) -> List[dict]:
    """Saved-activation peak of one training step for each of :data:`METHODS` at ``K``, with
    its ratio to E2E and to ContSup R1E (same model, batch and backend)."""
    import warnings

    from .local import LocalSequential
    from .models import build_model

    rows = []
    for name in models:
        gen = torch.Generator().manual_seed(seed)
        x = torch.randn(batch, 3, 32, 32, generator=gen).to(device)
        y = torch.randint(0, 10, (batch,), generator=gen).to(device)
        peaks = {}
        for label, kwargs in [("E2E", dict(K=1, context="R0"))] + [(k, dict(K=K, **v)) for k, v in METHODS.items()]:
            torch.manual_seed(seed)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # GN-DGL at one block per module: nothing grouped
                local = LocalSequential(build_model(name), backend=backend, **kwargs).to(device)
            peaks[label] = measure_step(local, x, y).saved_peak
            rows.append({"model": name, "K": kwargs["K"], "method": label, "batch": batch,
                         "backend": local.backend_for(x.device).name,
                         "saved_peak_MiB": peaks[label] / 2**20,
                         "vs_e2e": peaks[label] / peaks["E2E"],
                         "vs_contsup": peaks[label] / peaks.get("ContSup R1E, 1c2f", peaks[label])})
            del local
    return rows


def format_table(rows: List[dict]) -> str:
    """Rows of :func:`memory_table` (or :func:`method_table`) as an aligned text table."""
    if rows and "method" in rows[0]:
        lines = [["model", "K", "method", "backend", "saved MiB", "vs E2E", "vs ContSup R1E"]]
        lines += [[r["model"], str(r["K"]), r["method"], r["backend"], f"{r['saved_peak_MiB']:.1f}",
                   f"{r['vs_e2e']:.1%}", f"{r['vs_contsup']:.2f}x"] for r in rows]
        widths = [max(len(line[i]) for line in lines) for i in range(len(lines[0]))]
        return "\n".join("  ".join(c.rjust(w) for c, w in zip(line, widths)) for line in lines)
    head = ["model", "K", "context", "backend", "saved MiB", "vs E2E", "CUDA MiB", "vs E2E"]
    lines = [head]
    for r in rows:
        lines.append([r["model"], str(r["K"]), r["context"], r["backend"], f"{r['saved_peak_MiB']:.1f}",
                      f"{r['saved_ratio']:.1%}",
                      "-" if r["cuda_peak_MiB"] is None else f"{r['cuda_peak_MiB']:.1f}",
                      "-" if r["cuda_ratio"] is None else f"{r['cuda_ratio']:.1%}"])
    widths = [max(len(line[i]) for line in lines) for i in range(len(head))]
    return "\n".join("  ".join(c.rjust(w) for c, w in zip(line, widths)) for line in lines)


def main(argv: Optional[List[str]] = None) -> List[dict]:
    """``python -m contsup_fast.memory``: print the E2E vs K table (see module docstring)."""
    p = argparse.ArgumentParser(description="Saved-activation peak of one training step: E2E vs LocalSequential")
    p.add_argument("--models", nargs="+", default=["resnet32", "resnet110"])
    p.add_argument("--K", nargs="+", type=int, default=[2, 4, 8, 16])
    p.add_argument("--contexts", nargs="+", default=["R0", "E", "R1", "R1E"])
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--backend", default="torch", choices=["auto", "torch", "triton", "native"])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--json", default=None, help="write the rows, versions and settings here")
    p.add_argument("--methods", action="store_true",
                   help="instead: each local-learning method (ContSup, DGL, AugLocal, GN-DGL) at the last --K")
    args = p.parse_args(argv)
    if args.methods:
        rows = method_table(args.models, args.K[-1], args.batch, args.device, args.backend)
    else:
        rows = memory_table(args.models, args.K, args.contexts, args.batch, args.device, args.backend)
    print(format_table(rows))
    if args.json:
        meta = {"torch": torch.__version__, "python": platform.python_version(), "device": args.device,
                "device_name": torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.processor(),
                "settings": vars(args)}
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=2)
    return rows


if __name__ == "__main__":
    main()
