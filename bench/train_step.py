"""End-to-end training-step benchmark: LocalSequential against what users would otherwise run.

    python -m bench.train_step            # full run (sized for a GPU)
    python -m bench.train_step --quick    # CPU-sized subset, as run in CI

For each model, on the same inputs: E2E eager, E2E with ``torch.utils.checkpoint`` over the
same K segments, E2E ``torch.compile``, and LocalSequential for every K, context and
available backend. A step is ``zero_grad`` + forward/backward (every local backward for
LocalSequential) + ``SGD.step`` (momentum, Nesterov, foreach). Reported per configuration:
median step time (CUDA events on GPU, ``perf_counter`` on CPU) after warm-up, images/s, and
two memory peaks of one step, each also as a ratio to E2E eager: ``mem_MiB``, the *true*
peak of all tensor allocations (:class:`contsup_fast.memory.AllocationPeak`:
``torch.cuda.max_memory_allocated`` over the timed steps on GPU, the profiler's allocator
events of one step on CPU; activation gradients, workspaces and the optimizer step's
temporaries included, weights and optimizer state left out), and ``saved_MiB``, the peak of
saved-for-backward bytes (saved-tensor hooks; not measurable for E2E checkpoint). Writes
``bench/results/train_step_<device>.json`` and a PNG plot of memory and throughput against K.
"""
from __future__ import annotations

import argparse
import gc
from typing import Callable, Dict, List

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from contsup_fast import LocalSequential
from contsup_fast.fused import available_backends
from contsup_fast.memory import AllocationPeak, SavedTensorMeter
from contsup_fast.models import build_model
from contsup_fast.splitting import plan_split

from .common import environment, format_table, median_time, write_results

MODELS = {  # name: (image size, batch on GPU, batch on CPU)
    "resnet32": (32, 1024, 64),
    "resnet110": (32, 1024, 32),
    "resnet18": (224, 256, 8),
    "resnet50": (224, 128, 4),
    "vit_b_16": (224, 64, 2),  # 12 encoder blocks: K <= 12 (named with --models, not by default)
    "swin_t": (224, 64, 2),
}
#: the models of a run without --models (the CNNs: their K of 2..16 all exist)
DEFAULT_MODELS = ("resnet32", "resnet110", "resnet18", "resnet50")


def _optimizer(params) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=0.01, momentum=0.9, nesterov=True, weight_decay=1e-4, foreach=True)


def _e2e_step(model: nn.Module, amp: torch.dtype | None) -> Callable:
    def step(x, y):
        with torch.autocast(x.device.type, dtype=amp, enabled=amp is not None):
            loss = F.cross_entropy(model(x).float(), y)
        loss.backward()
    return step


def _checkpoint_step(model: nn.Module, K: int, size: int, amp) -> Callable:
    pieces = plan_split(model, K, input_size=(3, size, size)).pieces

    def step(x, y):
        with torch.autocast(x.device.type, dtype=amp, enabled=amp is not None):
            h = x
            for piece in pieces[:-1]:
                h = checkpoint(piece, h, use_reentrant=False)
            loss = F.cross_entropy(pieces[-1](h).float(), y)
        loss.backward()
    return step


def _local_step(local: LocalSequential, amp) -> Callable:
    def step(x, y):
        with torch.autocast(x.device.type, dtype=amp, enabled=amp is not None):
            local(x, y)
    return step


def _measure(module: nn.Module, step: Callable, x, y, warmup: int, steps: int,
             hooks_see_all: bool = True) -> Dict[str, float]:
    opt = _optimizer(module.parameters())

    def full():
        opt.zero_grad(set_to_none=True)
        step(x, y)
        opt.step()

    dev = x.device
    if dev.type == "cuda":
        full()
        with AllocationPeak(dev) as true:
            seconds = median_time(full, dev, warmup, steps)
    else:
        seconds = median_time(full, dev, warmup, steps)
        with AllocationPeak(dev) as true:
            full()
    weights = list(module.parameters()) + list(module.buffers())
    with SavedTensorMeter(ignore=weights) as meter:
        full()
    # checkpoint() keeps its recomputed activations behind hooks of its own, invisible here
    saved = meter.peak if hooks_see_all else None
    return {"step_ms": seconds * 1e3, "img_s": x.shape[0] / seconds, "mem_MiB": true.peak / 2**20,
            "saved_MiB": None if saved is None else saved / 2**20}


def run(models: List[str], Ks: List[int], contexts: List[str], backends: List[str], device: torch.device,
        amp, channels_last: bool, compile_e2e: bool, warmup: int, steps: int, batch: int | None) -> List[dict]:
    rows: List[dict] = []
    for name in models:
        size, gpu_batch, cpu_batch = MODELS[name]
        n = batch or (gpu_batch if device.type == "cuda" else cpu_batch)
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(n, 3, size, size, generator=gen).to(device)
        y = torch.randint(0, 10, (n,), generator=gen).to(device)
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        x = x.contiguous(memory_format=fmt)

        def fresh() -> nn.Module:
            torch.manual_seed(0)
            return build_model(name, num_classes=10).to(device, memory_format=fmt)

        configs = [("E2E eager", 1, "-", "-", lambda: (lambda m: (m, _e2e_step(m, amp)))(fresh()))]
        if compile_e2e:
            configs.append(("E2E compile", 1, "-", "-",
                            lambda: (lambda m: (m, _e2e_step(torch.compile(m), amp)))(fresh())))
        for K in Ks:
            configs.append(("E2E checkpoint", K, "-", "-",
                            lambda K=K: (lambda m: (m, _checkpoint_step(m, K, size, amp)))(fresh())))
            for ctx in contexts:
                for b in backends:
                    def make(K=K, ctx=ctx, b=b):
                        local = LocalSequential(fresh(), K=K, context=ctx, backend=b,
                                                input_size=(3, size, size)).to(device, memory_format=fmt)
                        return local, _local_step(local, amp)
                    configs.append(("LocalSequential", K, ctx, b, make))
        base = None
        for method, K, ctx, b, make in configs:
            module, step = make()
            r = {"model": name, "method": method, "K": K, "context": ctx, "backend": b, "batch": n,
                 **_measure(module, step, x, y, warmup, steps, hooks_see_all=method != "E2E checkpoint")}
            base = base or r
            r["speed_vs_e2e"] = r["img_s"] / base["img_s"]
            r["mem_vs_e2e"] = r["mem_MiB"] / base["mem_MiB"]
            r["saved_vs_e2e"] = None if r["saved_MiB"] is None else r["saved_MiB"] / base["saved_MiB"]
            rows.append(r)
            print(format_table([r], list(r.keys())).splitlines()[-1], flush=True)
            del module, step
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return rows


def plot(rows: List[dict], path) -> None:
    """Memory and throughput relative to E2E eager against K, one panel pair per model."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(dict.fromkeys(r["model"] for r in rows))
    fig, axes = plt.subplots(2, len(models), figsize=(4.5 * len(models), 7), squeeze=False)
    for col, name in enumerate(models):
        mine = [r for r in rows if r["model"] == name]
        series: Dict[str, List[dict]] = {}
        for r in mine:
            if r["method"] == "LocalSequential":
                series.setdefault(f"{r['context']} ({r['backend']})", []).append(r)
            elif r["method"] == "E2E checkpoint":
                series.setdefault("E2E checkpoint", []).append(r)
        for i, (label, rs) in enumerate(series.items()):
            ks = [r["K"] for r in rs]
            style = dict(marker="o", label=label, color=f"C{i}")
            axes[0][col].plot(ks, [r["mem_vs_e2e"] for r in rs], **style)
            axes[1][col].plot(ks, [r["speed_vs_e2e"] for r in rs], **style)
        for row, key in ((0, "mem_vs_e2e"), (1, "speed_vs_e2e")):
            ax = axes[row][col]
            ax.axhline(1.0, color="k", lw=0.8, ls="--", label="E2E eager")
            comp = [r for r in mine if r["method"] == "E2E compile"]
            if comp:
                ax.axhline(comp[0][key], color="gray", lw=0.8, ls=":", label="E2E compile")
            ax.set_xscale("log", base=2)
            ax.set_xlabel("K (local modules)")
            ax.set_ylabel("true peak memory / E2E" if row == 0 else "images/s / E2E")
            ax.set_title(f"{name}, batch {mine[0]['batch']}")
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> List[dict]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="CPU-sized subset (resnet32, K 4/16, R0/R1E)")
    p.add_argument("--models", nargs="+", default=None, choices=sorted(MODELS))
    p.add_argument("--K", nargs="+", type=int, default=None)
    p.add_argument("--contexts", nargs="+", default=None)
    p.add_argument("--backends", nargs="+", default=None, help="default: every available backend")
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--amp", default=None, choices=["none", "bf16", "fp16"],
                   help="default bf16 on CUDA, none on CPU")
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None)
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="include the E2E torch.compile baseline (default: on, off with --quick)")
    p.add_argument("--warmup", type=int, default=None)
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--out", default=None, help="results folder (default bench/results)")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    quick = args.quick
    models = args.models or (["resnet32"] if quick else list(DEFAULT_MODELS))
    Ks = args.K or ([4, 16] if quick else [2, 4, 8, 16])
    contexts = args.contexts or (["R0", "R1E"] if quick else ["R0", "E", "R1", "R1E"])
    backends = args.backends or available_backends(device)
    amp_name = args.amp or ("bf16" if device.type == "cuda" else "none")
    amp = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}[amp_name]
    channels_last = device.type == "cuda" if args.channels_last is None else args.channels_last
    compile_e2e = (not quick) if args.compile is None else args.compile
    warmup = args.warmup if args.warmup is not None else (1 if quick else 5)
    steps = args.steps if args.steps is not None else (3 if quick else 20)
    settings = dict(models=models, K=Ks, contexts=contexts, backends=backends, amp=amp_name,
                    channels_last=channels_last, compile=compile_e2e, warmup=warmup, steps=steps,
                    batch=args.batch, quick=quick)
    print(f"settings: {settings}", flush=True)
    rows = run(models, Ks, contexts, backends, device, amp, channels_last, compile_e2e, warmup, steps, args.batch)
    cols = ["model", "method", "K", "context", "backend", "batch", "step_ms", "img_s", "mem_MiB",
            "speed_vs_e2e", "mem_vs_e2e", "saved_MiB", "saved_vs_e2e"]
    print()
    print(format_table(rows, cols))
    mem_kind = ("mem: true peak of all tensor allocations of a step (" +
                ("torch.cuda.max_memory_allocated" if device.type == "cuda" else "profiler allocator events, CPU") +
                "); saved: peak of saved-for-backward bytes (saved-tensor hooks; not measurable for E2E checkpoint)")
    print(f"memory: {mem_kind}")
    tag = f"train_step_{device.type}" + ("_quick" if quick else "")
    path = write_results(tag, "train_step", environment(device), settings, rows, args.out,
                         memory_measure=mem_kind)
    png = (path.parent / f"{tag}.png")
    plot(rows, png)
    print(f"wrote {path} and {png}")
    return rows


if __name__ == "__main__":
    main()
