"""What is alive at the true peak of one training step, from the profiler's memory timeline.

    python -m bench.peak_timeline --model resnet32 --K 16 --context R0 --batch 32

Runs one warm-up step, then one step under ``torch.profiler`` (``profile_memory=True``,
``with_stack=True``, CPU). Every allocator event of the profiler's event tree is paired with
its free by address; at the moment the running sum of allocated bytes peaks, the live
allocations are grouped by *site*: the innermost ATen op that allocated them, the autograd
node running it (for allocations of a backward), and the innermost line of this package
(``contsup_fast/...``) on the Python stack. Prints the peak, the op chain at the peak and the
sites by bytes; ``--json`` writes them. CPU only (the profiler's allocator events are the
measure; see :mod:`contsup_fast.memory`).
"""
from __future__ import annotations

import argparse
from collections import defaultdict
from typing import Dict, List, Optional, Tuple

import torch
from torch._C._profiler import _EventType
from torch.profiler import ProfilerActivity, profile

from contsup_fast import LocalSequential
from contsup_fast.models import build_model

from .common import environment, write_results


def _site(event) -> Tuple[str, str, str]:
    """(ATen op, autograd node, package source line) of an allocation event's parents."""
    op = node = line = ""
    e = event.parent
    while e is not None:
        name = e.name
        if not op and e.tag == _EventType.TorchOp and name.startswith("aten::"):
            op = name
        if not node and name.startswith("autograd::engine::evaluate_function: "):
            node = name.split(": ", 1)[1]
        if not line and e.tag == _EventType.PyCall and "contsup_fast/" in name:
            line = name[name.index("contsup_fast/"):]
        e = e.parent
    return op or "(python)", node or "-", line or "-"


def _allocations(prof) -> List[tuple]:
    """(time_ns, ptr, bytes, event) of every CPU allocator event, in time order."""
    out = []

    def walk(events):
        for e in events:
            if e.tag == _EventType.Allocation and e.extra_fields.device.type == "cpu":
                out.append((e.start_time_ns, e.extra_fields.ptr, e.extra_fields.alloc_size, e))
            walk(e.children)

    walk(prof.profiler.kineto_results.experimental_event_tree())
    out.sort(key=lambda a: a[0])
    return out


def live_at_peak(allocs: List[tuple]) -> Tuple[int, Optional[tuple], Dict[int, tuple]]:
    """Replay the allocator events: the peak (bytes), the event that reached it and the live
    allocations then (ptr -> (bytes, event))."""
    live: Dict[int, tuple] = {}
    total = peak = 0
    snapshot: Dict[int, tuple] = {}
    at = None
    for t, ptr, nbytes, e in allocs:
        total += nbytes
        if nbytes > 0:
            live[ptr] = (nbytes, e)
        else:
            live.pop(ptr, None)
        if total > peak:
            peak, at, snapshot = total, (t, ptr, nbytes, e), dict(live)
    return peak, at, snapshot


def _chain(event) -> List[str]:
    names = []
    e = event.parent
    while e is not None:
        if e.tag == _EventType.TorchOp or "contsup_fast/" in e.name:
            names.append(e.name)
        e = e.parent
    return names


def analyse(model: str, K: int, context: str, batch: int, backend: str, top: int, stack: bool = True) -> dict:
    torch.manual_seed(0)
    local = LocalSequential(build_model(model), K=K, context=context, backend=backend)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(batch, 3, 32, 32, generator=g), torch.randint(0, 10, (batch,), generator=g)
    local(x, y)  # warm-up
    for p in local.parameters():
        p.grad = None
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, with_stack=stack) as prof:
        local(x, y)
    peak, at, snapshot = live_at_peak(_allocations(prof))
    sites: Dict[tuple, List[int]] = defaultdict(lambda: [0, 0])
    for nbytes, e in snapshot.values():
        s = sites[_site(e)]
        s[0] += nbytes
        s[1] += 1
    rows = sorted(({"op": k[0], "autograd_node": k[1], "source": k[2], "MiB": v[0] / 2**20, "tensors": v[1]}
                   for k, v in sites.items()), key=lambda r: -r["MiB"])
    grads = sum(p.numel() * p.element_size() for p in local.parameters() if p.grad is not None)
    return {"model": model, "K": K, "context": context, "batch": batch, "backend": backend,
            "peak_MiB": peak / 2**20, "param_grads_MiB": grads / 2**20,
            "at_peak": _chain(at[3]) if at else [], "sites": rows[:top]}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="resnet32")
    p.add_argument("--K", type=int, default=16)
    p.add_argument("--context", default="R0")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--backend", default="torch", choices=["torch", "native", "triton"])
    p.add_argument("--top", type=int, default=15)
    p.add_argument("--no-stack", action="store_true",
                   help="no Python stacks (much faster on long steps; no source column)")
    p.add_argument("--json", default=None, help="write the result under bench/results/<name>.json")
    args = p.parse_args(argv)
    try:
        res = analyse(args.model, args.K, args.context, args.batch, args.backend, args.top, stack=not args.no_stack)
    except (ValueError, RuntimeError) as exc:
        p.exit(2, f"error: {exc}\n")
    print(f"{res['model']} K={res['K']} {res['context']} batch {res['batch']} backend {res['backend']}: "
          f"true peak {res['peak_MiB']:.2f} MiB (parameter gradients at the end: {res['param_grads_MiB']:.2f} MiB)")
    print("at the peak: " + " <- ".join(res["at_peak"][:6]))
    print(f"{'MiB':>7} {'n':>4}  {'op':<28} {'autograd node':<32} source")
    for r in res["sites"]:
        print(f"{r['MiB']:7.2f} {r['tensors']:4d}  {r['op']:<28} {r['autograd_node']:<32} {r['source']}")
    if args.json:
        write_results(args.json, "peak_timeline", environment(torch.device("cpu")), vars(args), res["sites"],
                      peak={k: v for k, v in res.items() if k != "sites"})
    return res


if __name__ == "__main__":
    main()
