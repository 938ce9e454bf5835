"""Compile report of the boundary ops' real launches, for GPUs this machine does not have.

``python -m contsup_fast.kernels.compile_report`` (or ``python -m contsup_fast.check
--compile sm_90``):

1. **records** the Triton launches of real :class:`~contsup_fast.LocalSequential` steps
   (training: forward and every local backward; eval: forward) at the named configurations
   (default: ResNet-32 and ResNet-110 at K=16, batch 1024, 32x32; torchvision ResNet-50 at
   K=4, batch 256, 224x224; all R1E; fp32, and bf16/fp16 under ``torch.autocast``; NCHW and
   channels_last; train and eval). The steps run on *fake* tensors
   (``torch._subclasses.FakeTensorMode``: shapes, dtypes and strides, no data, no arithmetic),
   so batch 1024 costs seconds on a CPU; the ops run their real launch planning, with the
   plans made for the target GPU (:data:`kernels._common.RECORDER`), and each launch's
   grid, arguments (dtypes, integer values, alignment of the storage offsets) and
   constexprs are kept instead of launching;
2. **compiles** every launch through Triton's own launch path (``JITFunction.warmup``, the
   binder that applies Triton's argument specialisation: integers equal to 1 and divisible by
   16, pointers aligned to 16 bytes) with a stand-in driver for ``sm_90`` / ``sm_80`` and
   Triton's bundled ptxas, each distinct specialisation once (Triton's cache dir caches it);
3. **reports** per kernel and specialisation: registers per thread, spill (stack frame) bytes
   per thread (``cuobjdump --dump-resource-usage``), shared memory, warps, the MMA
   instructions in the PTX, theoretical occupancy (:func:`kernels.occupancy.blocks_per_sm`),
   and for grids planned from the SM count (split reductions, persistent programs) whether
   they fit the resident blocks (one wave). Writes JSON (schema ``contsup_fast.bench/1``, with
   the per-arch ``summary``) and prints a table; ``--render JSON`` prints the Markdown tables
   of a written report (docs/gpu-validation.md).

Raises ``RuntimeError`` under ``TRITON_INTERPRET=1`` (nothing is compiled there).
"""
from __future__ import annotations

import argparse
import contextlib
import os
import re
import subprocess
import sys
import tempfile
import time
from typing import Dict, List, Optional, Sequence

import torch

from . import _common
from .occupancy import GPUS, blocks_per_sm

__all__ = ["CONFIGS", "Recorder", "record_step", "compile_launches", "report", "table", "markdown", "main"]

#: name -> (model, K, batch, image size)
CONFIGS = {
    "resnet32": ("resnet32", 16, 1024, 32),
    "resnet110": ("resnet110", 16, 1024, 32),
    "resnet50": ("tv_resnet50", 4, 256, 224),
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class _ArgSpec:
    """A recorded tensor argument as Triton's binder sees it: dtype and address alignment
    (GPU allocations are 256-byte aligned, so the storage offset decides)."""

    def __init__(self, t: torch.Tensor):
        self.dtype = t.dtype
        self.offset = int(t.storage_offset()) * t.element_size() % 256
        self.shape = tuple(int(s) for s in t.shape)

    def data_ptr(self) -> int:
        return self.offset

    def __repr__(self):
        return f"{str(self.dtype)[6:]}{list(self.shape)}" + (f"@{self.offset}" if self.offset else "")


class _Driver:
    """Stand-in driver: Triton compiles for ``arch`` without a GPU (see tests/test_kernels_triton_build.py)."""

    def __new__(cls, arch: int):
        from triton.backends.compiler import GPUTarget
        from triton.backends.nvidia.driver import CudaDriver

        class Driver(CudaDriver):
            def __init__(self):
                pass

            def get_current_target(self):
                return GPUTarget("cuda", arch, 32)

            def get_current_device(self):
                return arch  # the JIT caches per device: one cache per architecture

            def get_current_stream(self, device=None):
                return 0

        return Driver()


@contextlib.contextmanager
def _target(arch: int):
    from triton.runtime.driver import driver

    prev = driver._active  # reset_active() would look for a real GPU driver
    driver.set_active(_Driver(arch))
    try:
        yield
    finally:
        driver._active = prev


_RESOURCES: Dict[tuple, dict] = {}


def _cuobjdump() -> str:
    import triton

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")


def compile_one(kernel, args: Sequence, meta: dict, arch: int) -> dict:
    """Compile ``kernel`` for ``sm_<arch>`` as ``kernel[grid](*args, **meta)`` would be, through
    Triton's binder; returns ``{"hash", "registers", "spill_bytes", "shared", "warps",
    "mma"}`` (cached per compiled specialisation)."""
    with _target(arch):
        compiled = kernel.warmup(*args, grid=(1,), **meta)
    key = (arch, compiled.hash)
    if key not in _RESOURCES:
        with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
            f.write(compiled.asm["cubin"])
            f.flush()
            usage = subprocess.run([_cuobjdump(), "--dump-resource-usage", f.name],
                                   capture_output=True, text=True, check=True, timeout=120).stdout
        regs, stack = re.search(r"REG:(\d+) STACK:(\d+)", usage).groups()
        ptx = compiled.asm["ptx"]
        _RESOURCES[key] = {
            "hash": compiled.hash[:12], "registers": int(regs), "spill_bytes": int(stack),
            "shared": int(compiled.metadata.shared), "warps": int(compiled.metadata.num_warps),
            "mma": len(re.findall(r"^\s*(?:wgmma\.mma_async|mma\.sync)", ptx, re.M)),
        }
    return _RESOURCES[key]


class Recorder:
    """Set as :data:`kernels._common.RECORDER`: keeps each launch (kernel, grid, argument specs,
    constexprs, whether its grid was planned from the SM count) and answers the launch plans'
    residency questions for ``gpu`` by compiling the kernel for it."""

    def __init__(self, gpu):
        self.gpu, self.sm_count = gpu, gpu.sms
        self.launches: List[dict] = []
        #: set by the launch plans (:func:`kernels._common.split_plan`, persistent grids) that
        #: size the next launch's grid from the SM count
        self.pending = False

    def resident(self, kernel, args, meta) -> int:
        res = compile_one(kernel, [_ArgSpec(a) if isinstance(a, torch.Tensor) else a for a in args],
                          meta, self.gpu.arch)
        return max(1, blocks_per_sm(res["registers"], res["shared"], res["warps"], self.gpu)["blocks"])

    def record(self, kernel, grid, args, meta) -> None:
        planned, self.pending = self.pending, False
        self.launches.append({"kernel": kernel, "grid": tuple(int(g) for g in grid), "meta": dict(meta),
                              "args": [_ArgSpec(a) if isinstance(a, torch.Tensor) else a for a in args],
                              "sm_planned": planned})


def _backend():
    from types import SimpleNamespace

    from . import bn_relu_gap, global_avg_pool, image_context, image_context_tail, residual_context

    return SimpleNamespace(name="triton", residual_context=residual_context, image_context=image_context,
                           image_context_tail=image_context_tail, bn_relu_gap=bn_relu_gap,
                           global_avg_pool=global_avg_pool)


def _build(model: str, image: int):
    if model.startswith("tv_"):
        import torchvision

        return getattr(torchvision.models, model[3:])(weights=None)
    from contsup_fast.models import build_model

    return build_model(model)


def record_step(config: str, dtype: str, channels_last: bool, train: bool, gpu,
                batch: Optional[int] = None) -> List[dict]:
    """The launches of one ``LocalSequential`` step (R1E) of ``config`` (:data:`CONFIGS`) on fake
    tensors, planned for ``gpu`` (:data:`kernels.occupancy.GPUS`). ``dtype`` "bf16"/"fp16" run
    under ``torch.autocast``, as training does."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from contsup_fast import LocalSequential

    model, K, default_batch, image = CONFIGS[config]
    batch = batch or default_batch
    rec = Recorder(gpu)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    prev = _common.RECORDER
    _common.RECORDER = rec
    try:
        with FakeTensorMode(allow_non_fake_inputs=True):
            local = LocalSequential(_build(model, image), K=K, context="RnE", backend="torch",
                                    input_size=(3, image, image))
            local._backends[torch.device("cpu")] = _backend()
            for p in local.parameters():
                if p.dim() == 4:
                    p.data = p.data.contiguous(memory_format=fmt)
            local.train(train)
            x = torch.randn(batch, 3, image, image).contiguous(memory_format=fmt)
            y = torch.randint(0, 10, (batch,))
            amp = (torch.autocast("cpu", dtype=DTYPES[dtype]) if dtype != "fp32"
                   else contextlib.nullcontext())
            with amp:
                if train:
                    local(x, y)
                else:
                    with torch.no_grad():
                        local(x)
    finally:
        _common.RECORDER = prev
    return rec.launches


def _spec(args: Sequence) -> str:
    """Triton's specialisation of the integer and pointer arguments: ``1`` (== 1), ``D``
    (divisible by 16 / 16-byte aligned), ``.`` (neither)."""
    out = []
    for a in args:
        if isinstance(a, _ArgSpec):
            out.append("D" if a.offset % 16 == 0 else ".")
        elif isinstance(a, int) and not isinstance(a, bool):
            out.append("1" if a == 1 else "D" if a % 16 == 0 else ".")
    return "".join(out)


def compile_launches(launches: Sequence[dict], gpu, where: str) -> Dict[tuple, dict]:
    """Compile every launch for ``gpu``; rows keyed by (kernel, specialisation hash)."""
    rows: Dict[tuple, dict] = {}
    for L in launches:
        res = compile_one(L["kernel"], L["args"], L["meta"], gpu.arch)
        occ = blocks_per_sm(res["registers"], res["shared"], res["warps"], gpu)
        name = L["kernel"].fn.__name__
        key = (name, res["hash"])
        programs = 1
        for g in L["grid"]:
            programs *= g
        resident = occ["blocks"] * gpu.sms
        row = rows.setdefault(key, {
            "gpu": gpu.name, "arch": f"sm_{gpu.arch}", "kernel": name, **res, **occ,
            "constexprs": {k: (str(v) if not isinstance(v, (int, float, bool)) else v)
                           for k, v in L["meta"].items()},
            "spec": _spec(L["args"]), "launches": 0, "where": [], "grids": [],
            "sm_planned_grids": [], "overfull_planned_grids": []})
        row["launches"] += 1
        if where not in row["where"]:
            row["where"].append(where)
        if L["grid"] not in row["grids"]:
            row["grids"].append(L["grid"])
        if L["sm_planned"]:
            if L["grid"] not in row["sm_planned_grids"]:
                row["sm_planned_grids"].append(L["grid"])
            if programs > resident and L["grid"] not in row["overfull_planned_grids"]:
                row["overfull_planned_grids"].append(L["grid"])
    return rows


def report(configs: Sequence[str] = tuple(CONFIGS), archs: Sequence[str] = ("sm_90", "sm_80"),
           dtypes: Sequence[str] = tuple(DTYPES), layouts: Sequence[str] = ("nchw", "nhwc"),
           modes: Sequence[str] = ("train", "eval"), batch: Optional[int] = None,
           log=print) -> dict:
    """Record and compile (see the module docstring); returns ``{"rows": [...], "summary":
    {arch: {...}}}``."""
    if _common.INTERPRETED:
        raise RuntimeError("the compile report needs TRITON_INTERPRET unset (nothing is compiled "
                           "in the interpreter); run it in a fresh process")
    for a in archs:
        if a not in GPUS:
            raise ValueError(f"arch {a!r} is not known; allowed: {sorted(GPUS)}")
    for c in configs:
        if c not in CONFIGS:
            raise ValueError(f"config {c!r} is not known; allowed: {sorted(CONFIGS)}")
    rows: Dict[tuple, dict] = {}
    for arch in archs:
        gpu = GPUS[arch]
        for cfg in configs:
            for dt in dtypes:
                for lay in layouts:
                    for mode in modes:
                        t0 = time.perf_counter()
                        where = f"{cfg}/{dt}/{lay}/{mode}"
                        launches = record_step(cfg, dt, lay == "nhwc", mode == "train", gpu, batch)
                        for k, r in compile_launches(launches, gpu, where).items():
                            if (arch,) + k in rows:
                                old = rows[(arch,) + k]
                                old["launches"] += r["launches"]
                                old["where"] += r["where"]
                                for f in ("grids", "sm_planned_grids", "overfull_planned_grids"):
                                    old[f] += [g for g in r[f] if g not in old[f]]
                            else:
                                rows[(arch,) + k] = r
                        log(f"  {arch} {where}: {len(launches)} launches "
                            f"({time.perf_counter() - t0:.1f} s)")
    out_rows = list(rows.values())
    summary = {}
    for arch in archs:
        mine = [r for r in out_rows if r["arch"] == arch]
        summary[arch] = {
            "specialisations": len(mine),
            "spilling": sum(r["spill_bytes"] > 0 for r in mine),
            "max_spill_bytes": max((r["spill_bytes"] for r in mine), default=0),
            "max_shared": max((r["shared"] for r in mine), default=0),
            "overfull_planned": sum(bool(r["overfull_planned_grids"]) for r in mine),
            "not_resident": sum(r["blocks"] == 0 for r in mine),
        }
    return {"rows": out_rows, "summary": summary}


def table(result: dict) -> str:
    """The report as a text table (one line per kernel specialisation)."""
    from bench.common import format_table

    head = ("arch", "kernel", "constexprs", "spec", "regs", "spill B", "smem KB", "warps", "blk/SM",
            "MMA", "planned grids", "fit")
    lines = []
    for r in sorted(result["rows"], key=lambda r: (r["arch"], r["kernel"], -r["spill_bytes"])):
        ce = ",".join(f"{k}={v}" for k, v in r["constexprs"].items()
                      if k.startswith("BLOCK") or k in ("LANES", "num_warps", "PREC"))
        planned = " ".join("x".join(map(str, g)) for g in r["sm_planned_grids"][:2])
        lines.append((r["arch"], r["kernel"], ce, r["spec"], str(r["registers"]), str(r["spill_bytes"]),
                      f"{r['shared'] / 1024:.1f}", str(r["warps"]), str(r["blocks"]), str(r["mma"]),
                      planned or "-",
                      "-" if not r["sm_planned_grids"] else ("no" if r["overfull_planned_grids"] else "yes")))
    return format_table([dict(zip(head, line)) for line in lines], list(head))


def _md(head: Sequence[str], lines: List[Sequence[str]]) -> str:
    return "\n".join(["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
                     + ["| " + " | ".join(map(str, line)) + " |" for line in lines])


def _span(values: List[int]) -> str:
    return f"{min(values)}-{max(values)}"


def markdown(result: dict) -> str:
    """Markdown tables of a report (as :func:`report` returns it or as its JSON holds it): per
    arch and dtype (a specialisation counts under each dtype whose steps launched it), then per
    arch and kernel."""
    rows = result["rows"]
    by_dtype = []
    for arch in sorted({r["arch"] for r in rows}, reverse=True):
        for dt in DTYPES:
            mine = [r for r in rows if r["arch"] == arch and any(w.split("/")[1] == dt for w in r["where"])]
            if mine:
                by_dtype.append((arch, dt, len(mine), sum(r["spill_bytes"] > 0 for r in mine),
                                 max(r["spill_bytes"] for r in mine),
                                 sum(bool(r["overfull_planned_grids"]) for r in mine),
                                 sum(r["blocks"] == 0 for r in mine)))
    by_kernel = []
    for arch in sorted({r["arch"] for r in rows}, reverse=True):
        for name in sorted({r["kernel"] for r in rows if r["arch"] == arch}):
            mine = [r for r in rows if r["arch"] == arch and r["kernel"] == name]
            by_kernel.append((arch, f"`{name}`", len(mine), sum(r["spill_bytes"] > 0 for r in mine),
                              max(r["spill_bytes"] for r in mine), _span([r["registers"] for r in mine]),
                              _span([r["blocks"] for r in mine]),
                              f"{max(r['shared'] for r in mine) / 1024:.0f}", _span([r["mma"] for r in mine]),
                              sum(bool(r["overfull_planned_grids"]) for r in mine)))
    return (_md(("arch", "dtype", "specialisations", "spilling", "max spill B",
                 "SM-planned grids over one wave", "not resident"), by_dtype) + "\n\n"
            + _md(("arch", "kernel", "specialisations", "spilling", "max spill B", "registers", "blocks/SM",
                   "max smem KB", "MMA (static)", "SM-planned grids over one wave"), by_kernel))


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="compile_report", description=__doc__.splitlines()[0])
    p.add_argument("--arch", nargs="+", default=["sm_90", "sm_80"], choices=sorted(GPUS))
    p.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=sorted(CONFIGS))
    p.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=sorted(DTYPES))
    p.add_argument("--layouts", nargs="+", default=["nchw", "nhwc"], choices=["nchw", "nhwc"])
    p.add_argument("--modes", nargs="+", default=["train", "eval"], choices=["train", "eval"])
    p.add_argument("--batch", type=int, default=None, help="override every configuration's batch")
    p.add_argument("--out", default=None, help="JSON folder (default bench/results)")
    p.add_argument("--name", default="compile_report", help="JSON file name (without .json)")
    p.add_argument("--strict", action="store_true",
                   help="exit 1 if a specialisation spills or a planned grid exceeds one wave")
    p.add_argument("--render", default=None, metavar="JSON",
                   help="print the Markdown tables of a written report and exit (compiles nothing)")
    a = p.parse_args(argv)
    if a.render:
        import json

        with open(a.render) as f:
            print(markdown(json.load(f)))
        return 0
    from bench.common import environment, write_results

    res = report(a.configs, a.arch, a.dtypes, a.layouts, a.modes, a.batch)
    print(table(res))
    for arch, s in res["summary"].items():
        print(f"{arch}: {s}")
    path = write_results(a.name, "compile_report", environment(torch.device("cpu")), vars(a),
                         res["rows"], a.out, summary=res["summary"])
    print(f"wrote {path}")
    bad = any(s["spilling"] or s["overfull_planned"] or s["not_resident"]
              for s in res["summary"].values())
    return 1 if (a.strict and bad) else 0


if __name__ == "__main__":
    sys.exit(main())
