"""Memory accounting for a training step: the saved-tensor peak and the true allocation peak.

Two measures, reported side by side and labelled:

* **saved peak** (:class:`SavedTensorMeter`): the peak of *live saved-for-backward bytes*,
  from ``torch.autograd.graph.saved_tensors_hooks``. Every tensor autograd saves is counted
  once per storage (views and repeated saves share), from the moment it is saved until its
  graph is freed. Parameters and buffers are excluded. It is what activation checkpointing
  and greedy local learning cut, but it is a lower bound of what a step really holds.
* **true peak** (:class:`AllocationPeak`): the peak of *every tensor allocation* of the step,
  above what was allocated when it started. On CPU it sums the bytes of the allocator events
  that ``torch.profiler`` records with ``profile_memory=True`` (the ``[memory]`` events, +bytes
  on allocation, -bytes on free) in time order and takes the maximum of the running sum; on
  CUDA it is ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``, minus the
  bytes allocated at the start.

  The true peak **includes** everything the step allocates while it runs: activations (saved
  or not), activation gradients, the workspaces and temporaries of every op (convolution
  im2col buffers, recomputation in backward, BatchNorm statistics), context-encoder outputs,
  the losses, and the parameter gradients created by the step (``.grad`` is allocated on the
  first backward that reaches a parameter when it was None, so zero gradients with
  ``set_to_none=True`` before measuring to count them). It **leaves out** what exists before
  the step starts: the parameters and buffers, gradients that already exist (accumulated
  into in place), the optimizer state, and the input batch; and on CPU memory that is not a
  tensor allocation (Python objects, the allocator's caching, library-internal buffers such
  as oneDNN's primitive caches). On CUDA it also counts the caching allocator's rounding of
  each block (to 512 bytes), on CPU the exact requested bytes.

Command: ``python -m contsup_fast.memory`` prints, for resnet32 and resnet110, the saved and
the true peak of E2E (K=1) and of K = 2, 4, 8, 16 for each context mode, each with its ratio
to E2E, and can write the table as JSON.
"""
from __future__ import annotations

import argparse
import json
import platform
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Dict, Iterable, List, Optional

import torch
from torch import Tensor, nn
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

__all__ = ["SavedTensorMeter", "AllocationPeak", "StepMemory", "measure_step", "memory_table",
           "METHODS", "method_table", "main"]


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


class AllocationPeak:
    """Context manager measuring the true allocation peak of the code it wraps (bytes).

    On CPU it runs ``torch.profiler.profile(activities=[CPU], profile_memory=True)`` and, on
    exit, sums the ``[memory]`` allocator events of CPU tensors in time order; on CUDA it
    resets the peak statistics of ``device`` and reads ``torch.cuda.max_memory_allocated``.
    See the module docstring for what the true peak includes and leaves out.

    Args:
        device: the device whose allocations are counted (``"cpu"`` or a CUDA device).
        timeline: CPU only: also keep ``(time_ns, live_bytes)`` after every allocator event
            in :attr:`timeline` (to find what is live at the peak).

    Attributes:
        peak: maximum bytes allocated above the level at entry (int, set on exit).
        end: bytes still allocated at exit above the level at entry (parameter gradients...).
        peak_ns: CPU only: profiler timestamp of the peak (ns), else None.
        timeline: list of ``(time_ns, live_bytes)`` when asked for, else None.
        source: ``"profiler"`` (CPU) or ``"cuda"``.

    Raises:
        ValueError: ``device`` is neither CPU nor CUDA.
        RuntimeError: another ``torch.profiler`` session is active (CPU).
    """

    def __init__(self, device: torch.device | str = "cpu", timeline: bool = False):
        self.device = torch.device(device)
        if self.device.type not in ("cpu", "cuda"):
            raise ValueError(f"device must be a CPU or CUDA device, got {str(device)!r}")
        self.keep_timeline = timeline
        self.source = "cuda" if self.device.type == "cuda" else "profiler"
        self.peak = self.end = 0
        self.peak_ns: Optional[int] = None
        self.timeline: Optional[List[tuple]] = None
        self._prof = None
        self._base = 0

    def __enter__(self) -> "AllocationPeak":
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
        else:
            self._prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
            self._prof.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device) - self._base
            self.end = torch.cuda.memory_allocated(self.device) - self._base
            return
        self._prof.__exit__(*exc)
        events = [(e.start_ns(), e.nbytes()) for e in self._prof.profiler.kineto_results.events()
                  if e.name() == "[memory]" and e.device_type() == DeviceType.CPU]
        self._prof = None
        self._summarise(events)

    def _summarise(self, events: List[tuple]) -> None:
        events.sort(key=lambda e: e[0])  # stable: same-time events keep their recorded order
        live = peak = 0
        peak_ns = None
        timeline = [] if self.keep_timeline else None
        for t, nbytes in events:
            live += nbytes
            if live > peak:
                peak, peak_ns = live, t
            if timeline is not None:
                timeline.append((t, live))
        self.peak, self.end, self.peak_ns, self.timeline = peak, live, peak_ns, timeline


@dataclass
class StepMemory:
    """Memory of one training step (bytes).

    Attributes:
        saved_peak: peak of live saved-for-backward bytes (:class:`SavedTensorMeter`).
        true_peak: peak of all tensor allocations (:class:`AllocationPeak`: profiler
            allocator events on CPU, ``max_memory_allocated`` on CUDA).
        true_source: ``"profiler"`` or ``"cuda"``, how ``true_peak`` was measured.
    """

    saved_peak: int
    true_peak: int
    true_source: str

    @property
    def cuda_peak(self) -> Optional[int]:
        """``true_peak`` when measured with ``torch.cuda.max_memory_allocated``, else None."""
        return self.true_peak if self.true_source == "cuda" else None


def measure_step(local: nn.Module, x: Tensor, y: Tensor) -> StepMemory:
    """Run one training step ``local(x, y)`` and return its :class:`StepMemory`.

    ``local`` is a :class:`~contsup_fast.LocalSequential` (K=1 for end-to-end). Gradients are
    set to None first, so the parameter gradients the step creates count in the true peak,
    and accumulate into ``.grad`` as in a real step. The saved and the true peak come from
    the same step (the saved-tensor hooks do not allocate tensors).
    """
    weights = list(local.parameters()) + list(local.buffers())
    for p in local.parameters():
        p.grad = None
    with AllocationPeak(x.device) as true, SavedTensorMeter(ignore=weights) as meter:
        local(x, y)
    return StepMemory(saved_peak=meter.peak, true_peak=true.peak, true_source=true.source)


def memory_table(models: List[str], Ks: List[int], contexts: List[str], batch: int, device: str,
                 backend: str = "torch", seed: int = 0, warmup: int = 1,
                 split: Optional[str] = None) -> List[dict]:
    """Measure E2E and every (model, K, context) once; return rows with ratios to E2E.

    ``split`` is :class:`~contsup_fast.LocalSequential`'s: None (the paper's equal-layer
    preset where one exists) or ``"balanced"`` (the paper's memory-balanced preset, else the
    split minimising the largest local module's saved activations).

    Each configuration runs ``warmup`` unmeasured training steps first (one-time allocations
    of the first call are not part of a step's peak), then one measured step. Rows hold the
    saved peak and the true peak (MiB) and each one's ratio to E2E's.
    """
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
            local = LocalSequential(build_model(name), K=K, context=context, backend=backend,
                                    split=split if K > 1 else None).to(device)
            for _ in range(warmup):
                local(x, y)
            mem = measure_step(local, x, y)
            if e2e is None:
                e2e = mem
            rows.append({
                "model": name, "K": K, "context": "E2E" if K == 1 else context,
                "backend": local.backend_for(x.device).name, "batch": batch,
                "split": local.split_source if K > 1 else "-",
                "saved_peak_MiB": mem.saved_peak / 2**20,
                "saved_ratio": mem.saved_peak / e2e.saved_peak,
                "true_peak_MiB": mem.true_peak / 2**20,
                "true_ratio": mem.true_peak / e2e.true_peak,
                "true_source": mem.true_source,
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
    """Saved-activation and true allocation peak of one training step for each of
    :data:`METHODS` at ``K``, with their ratios to E2E and to ContSup R1E (same model, batch
    and backend)."""
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
            step = measure_step(local, x, y)
            peaks[label] = step
            ref = peaks.get("ContSup R1E, 1c2f", step)
            rows.append({"model": name, "K": kwargs["K"], "method": label, "batch": batch,
                         "backend": local.backend_for(x.device).name,
                         "saved_peak_MiB": step.saved_peak / 2**20,
                         "vs_e2e": step.saved_peak / peaks["E2E"].saved_peak,
                         "vs_contsup": step.saved_peak / ref.saved_peak,
                         "true_peak_MiB": step.true_peak / 2**20, "true_source": step.true_source,
                         "true_vs_e2e": step.true_peak / peaks["E2E"].true_peak,
                         "true_vs_contsup": step.true_peak / ref.true_peak})
            del local
    return rows


def format_table(rows: List[dict]) -> str:
    """Rows of :func:`memory_table` (or :func:`method_table`) as an aligned text table."""
    if rows and "method" in rows[0]:
        lines = [["model", "K", "method", "backend", "saved MiB", "vs E2E", "true MiB", "vs E2E",
                  "true vs ContSup R1E"]]
        lines += [[r["model"], str(r["K"]), r["method"], r["backend"], f"{r['saved_peak_MiB']:.1f}",
                   f"{r['vs_e2e']:.1%}", f"{r['true_peak_MiB']:.1f}", f"{r['true_vs_e2e']:.1%}",
                   f"{r['true_vs_contsup']:.2f}x"] for r in rows]
        widths = [max(len(line[i]) for line in lines) for i in range(len(lines[0]))]
        return "\n".join("  ".join(c.rjust(w) for c, w in zip(line, widths)) for line in lines)
    head = ["model", "K", "context", "split", "backend", "saved MiB", "vs E2E", "true MiB", "vs E2E"]
    lines = [head]
    for r in rows:
        lines.append([r["model"], str(r["K"]), r["context"], r.get("split", "-"), r["backend"],
                      f"{r['saved_peak_MiB']:.1f}",
                      f"{r['saved_ratio']:.1%}", f"{r['true_peak_MiB']:.1f}", f"{r['true_ratio']:.1%}"])
    widths = [max(len(line[i]) for line in lines) for i in range(len(head))]
    return "\n".join("  ".join(c.rjust(w) for c, w in zip(line, widths)) for line in lines)


MEASURES = ("saved MiB: peak of live saved-for-backward bytes (saved-tensor hooks, weights excluded); "
            "true MiB: peak of all tensor allocations of the step above its start ({source}), "
            "activation gradients, workspaces and new parameter gradients included, "
            "parameters, optimizer state and the input batch left out")


def main(argv: Optional[List[str]] = None) -> List[dict]:
    """``python -m contsup_fast.memory``: print the E2E vs K table (see module docstring)."""
    p = argparse.ArgumentParser(description="Saved and true memory peak of one training step: E2E vs LocalSequential")
    p.add_argument("--models", nargs="+", default=["resnet32", "resnet110"])
    p.add_argument("--K", nargs="+", type=int, default=[2, 4, 8, 16])
    p.add_argument("--contexts", nargs="+", default=["R0", "E", "R1", "R1E"])
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--backend", default="torch", choices=["auto", "torch", "triton", "native"])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--warmup", type=int, default=1, help="unmeasured steps before the measured one")
    p.add_argument("--split", default="paper", choices=["paper", "balanced"],
                   help="paper: the paper's equal-layer preset (LocalSequential's default); balanced: "
                        "the paper's memory-balanced preset, else the smallest largest-module activations")
    p.add_argument("--json", default=None, help="write the rows, versions and settings here")
    p.add_argument("--methods", action="store_true",
                   help="instead: each local-learning method (ContSup, DGL, AugLocal, GN-DGL) at the last --K")
    args = p.parse_args(argv)
    try:
        if args.methods:
            rows = method_table(args.models, args.K[-1], args.batch, args.device, args.backend)
        else:
            rows = memory_table(args.models, args.K, args.contexts, args.batch, args.device,
                                args.backend, warmup=args.warmup,
                                split=None if args.split == "paper" else args.split)
    except (ValueError, RuntimeError) as exc:  # bad model/K/context/backend: one line, no traceback
        p.exit(2, f"error: {exc}\n")
    print(format_table(rows))
    source = ("profiler allocator events, CPU" if rows[0]["true_source"] == "profiler"
              else "torch.cuda.max_memory_allocated")
    print(MEASURES.format(source=source))
    if args.json:
        # bench/results' schema (bench.common.SCHEMA, docs/performance.md), without importing bench
        env = {"time_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
               "python": platform.python_version(), "torch": torch.__version__, "device": args.device,
               "device_name": torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.processor()}
        with open(args.json, "w") as f:
            json.dump({"schema": "contsup_fast.bench/1", "benchmark": "memory", "environment": env,
                       "settings": vars(args), "rows": rows, "measures": MEASURES.format(source=source)},
                      f, indent=2)
    return rows


if __name__ == "__main__":
    main()
