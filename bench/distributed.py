"""Multi-process throughput: ``python -m bench.distributed [--quick]``.

Measures training images/s of one process (plain ``LocalSequential``, the baseline) and of
data-parallel (:class:`~contsup_fast.distributed.LocalDDP`) and pipeline-parallel
(:class:`~contsup_fast.distributed.LocalPipeline`) training on 1, 2 and 4 processes, all in
one run, with the bytes each rank sends per step and the seconds it waits for the others.
Every configuration is a fresh set of processes (gloo on 127.0.0.1 on the CPU, NCCL with one
GPU per process when CUDA is there), started by this script with the torchrun environment.

* data parallel: the global batch ``--batch`` is split over the P ranks;
* pipeline: rank 0 feeds whole ``--batch`` batches; stages are balanced by measured
  per-module step time (``--balance time``, default) or by the splitter's cost (``cost``).

Images/s is ``batch * steps / seconds`` between two barriers after ``--warmup`` steps (for the
pipeline: in steady state, the pipeline full). ``cpu_bound_speedup`` is the one-process CPU
time per step over the busiest rank's CPU time per step: the speed-up the configuration would
reach if every process had a core to itself (a measured figure that other programs sharing the
cores do not change much, unlike images/s). Writes ``bench/results/distributed_<tag>.json``
and a bar plot ``.png``; prints a table with each configuration's speed-up over the
one-process baseline of the same run. ``--quick`` (a tiny model, 1 and 2 processes) is what CI
runs.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

from bench.common import RESULTS, environment, format_table, results_payload, write_payload

ROOT = Path(__file__).resolve().parent.parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _build(args):
    import torch
    from contsup_fast import LocalSequential
    from contsup_fast.models import build_model
    torch.manual_seed(0)
    return LocalSequential(build_model(args.model, 10), K=args.K, context=args.context,
                           backend=args.backend, input_size=(3, args.size, args.size))


def _batch(args, n: int, seed: int, device):
    import torch
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, args.size, args.size, generator=g)
    y = torch.randint(0, 10, (n,), generator=g)
    return x.to(device), y.to(device)


def module_step_times(args) -> List[float]:
    """Median seconds of each local module's step (context, body, loss, backward) at
    ``--batch`` in this process (used to balance the pipeline stages by time)."""
    import statistics
    local = _build(args)
    x, y = _batch(args, args.batch, 0, "cpu")
    times: List[List[float]] = [[] for _ in range(args.K)]
    backend = local.backend_for(x.device)
    for rep in range(3):
        h, inputs = None, {}
        for m in local.local_modules:
            t0 = time.perf_counter()
            h, a, _ = local.module_step(m, h, inputs, x, y, None, True, backend)
            times[m.index].append(time.perf_counter() - t0)
            inputs[m.index] = a
        local.zero_grad(set_to_none=True)
    return [statistics.median(t) for t in times]


# ------------------------------------------------------------------------------ one rank
def worker(args) -> None:
    import torch
    import torch.distributed as dist
    torch.set_num_threads(args.threads)
    from contsup_fast import distributed as D
    mode = args.worker
    device = "cpu"
    if mode == "single":
        info = None
        rank, world = 0, 1
        if torch.cuda.is_available():
            device = "cuda:0"
    else:
        info = D.init_distributed(timeout_s=120)
        rank, world, device = info.rank, info.world_size, info.device
    local = _build(args)
    sync = (lambda: torch.cuda.synchronize()) if torch.device(device).type == "cuda" else (lambda: None)
    stats: Dict[str, float] = {"bytes_sent": 0, "wait_s": 0.0}
    if mode == "pipeline":
        stages = json.loads(args.stages) if args.stages else None
        pipe = D.LocalPipeline(local, stages=stages, device=device,
                               opt_factory=lambda ps: torch.optim.SGD(ps, lr=0.01, momentum=0.9))
        x, y = _batch(args, args.batch, 0, device)

        def step():
            pipe.step(x, y) if rank == 0 else pipe.step()
        target = pipe
    else:
        local = local.to(device)
        model = D.LocalDDP(local) if mode == "data" else local
        opt = torch.optim.SGD(local.parameters(), lr=0.01, momentum=0.9)
        n = args.batch // world
        x, y = _batch(args, n, rank, device)

        def step():
            opt.zero_grad(set_to_none=True)
            model(x, y)
            opt.step()
        target = model if mode == "data" else None
    for _ in range(args.warmup):
        step()
    sync()
    if info is not None:
        dist.barrier()
        if target is not None:
            target.stats.update(bytes_sent=0, wait_s=0.0)
    t0, c0 = time.perf_counter(), time.process_time()
    for _ in range(args.steps):
        step()
    sync()
    if info is not None:
        dist.barrier()
    seconds = time.perf_counter() - t0
    cpu_seconds = time.process_time() - c0
    if target is not None:
        stats = dict(target.stats)
    if mode == "pipeline":
        pipe.flush()
    record = {"rank": rank, "seconds": seconds, "cpu_s_per_step": cpu_seconds / args.steps,
              "bytes_per_step": stats["bytes_sent"] / args.steps,
              "wait_s_per_step": stats["wait_s"] / args.steps}
    if mode == "pipeline":
        record["stages"] = pipe.counts
    if info is not None:
        records = [None] * world
        dist.all_gather_object(records, record)
        D.shutdown_distributed()
    else:
        records = [record]
    if rank == 0:
        print("RESULT " + json.dumps(records), flush=True)


# ------------------------------------------------------------------------------ driver
def run_config(args, mode: str, procs: int, stages: Optional[List[int]]) -> Dict[str, object]:
    port = _free_port()
    argv = [sys.executable, "-m", "bench.distributed", "--worker", mode]
    for k in ("model", "K", "context", "size", "batch", "steps", "warmup", "threads", "backend"):
        argv += [f"--{k}", str(getattr(args, k))]
    if stages:
        argv += ["--stages", json.dumps(stages)]
    procs_list = []
    for rank in range(procs):
        env = dict(os.environ, RANK=str(rank), WORLD_SIZE=str(procs), LOCAL_RANK=str(rank),
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS=str(args.threads),
                   PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
        procs_list.append(subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                           stderr=subprocess.PIPE, text=True))
    outs = []
    try:
        for p in procs_list:
            outs.append(p.communicate(timeout=args.timeout))
    except subprocess.TimeoutExpired:
        outs = []
    finally:
        for p in procs_list:
            if p.poll() is None:
                p.kill()
                p.wait()
    line = next((ln for out, _ in outs for ln in out.splitlines() if ln.startswith("RESULT ")), None)
    if line is None:
        err = "\n".join(e[-800:] for _, e in outs) or f"timed out after {args.timeout} s"
        last = err.strip().splitlines()[-1] if err.strip() else "failed"
        return {"mode": mode, "procs": procs, "error": last}
    records = json.loads(line[len("RESULT "):])
    seconds = max(r["seconds"] for r in records)
    return {"mode": mode, "procs": procs, "images_per_s": args.batch * args.steps / seconds,
            "step_ms": 1e3 * seconds / args.steps,
            "bytes_per_step": [r["bytes_per_step"] for r in records],
            "wait_ms_per_step": [1e3 * r["wait_s_per_step"] for r in records],
            "cpu_ms_per_step": [1e3 * r["cpu_s_per_step"] for r in records],
            "stages": records[0].get("stages")}


def plot(rows, path: Path, title: str) -> Optional[Path]:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    ok = [r for r in rows if "images_per_s" in r]
    fig, ax = plt.subplots(figsize=(7, 3.5))
    labels = [f"{r['mode']}\n{r['procs']} proc" for r in ok]
    ax.bar(range(len(ok)), [r["images_per_s"] for r in ok],
           color=["gray" if r["mode"] == "single" else "C0" if r["mode"] == "data" else "C1" for r in ok])
    ax.set_xticks(range(len(ok)), labels, fontsize=8)
    ax.set_ylabel("training images / s")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main(argv=None) -> Dict[str, object]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny model, 1 and 2 processes (CI)")
    p.add_argument("--model", default="resnet32")
    p.add_argument("--K", type=int, default=16)
    p.add_argument("--context", default="R0")
    p.add_argument("--size", type=int, default=32, help="image side in pixels")
    p.add_argument("--batch", type=int, default=64, help="global batch (images per step)")
    p.add_argument("--steps", type=int, default=None, help="timed steps (default 12; quick 4)")
    p.add_argument("--warmup", type=int, default=None,
                   help="untimed steps first, filling the pipeline (default 4; quick 2)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per process")
    p.add_argument("--procs", default=None,
                   help="process counts for data and pipeline mode (default 1,2,4; quick 1,2)")
    p.add_argument("--modes", default="data,pipeline")
    p.add_argument("--balance", default="time", choices=("time", "cost"),
                   help="pipeline stages: balanced by measured module step time or splitter cost")
    p.add_argument("--backend", default="auto")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds per configuration")
    p.add_argument("--tag", default=None, help="output name suffix (default cpu/cuda + quick)")
    p.add_argument("--out", default=None, help="folder for the JSON and plot (default bench/results)")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--stages", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        worker(args)
        return {}
    if args.quick:
        args.model, args.K, args.size, args.batch = "resnet20", 4, 16, 16
    for k, normal, quick in (("steps", 12, 4), ("warmup", 4, 2), ("procs", "1,2,4", "1,2")):
        if getattr(args, k) is None:
            setattr(args, k, quick if args.quick else normal)
    import torch
    load_start = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    procs = [int(n) for n in args.procs.split(",")]
    modes = args.modes.split(",")
    rows = [run_config(args, "single", 1, None)]
    for mode in modes:
        for n in procs:
            stages = None
            if mode == "pipeline" and n > 1 and args.balance == "time":
                from contsup_fast.distributed import balance_stages
                torch.set_num_threads(args.threads)
                stages = balance_stages(module_step_times(args), n)
            if mode == "pipeline" and n > args.K:
                continue
            rows.append(run_config(args, mode, n, stages))
    base = rows[0].get("images_per_s")
    base_cpu = max(rows[0]["cpu_ms_per_step"]) if rows[0].get("cpu_ms_per_step") else None
    for r in rows:
        if base and "images_per_s" in r:
            r["speedup"] = r["images_per_s"] / base
            r["efficiency"] = r["speedup"] / r["procs"]
        if base_cpu and r.get("cpu_ms_per_step"):
            # throughput bound if every process had a core to itself: the busiest rank's CPU
            # time per step limits it (insensitive to other programs sharing the cores)
            r["cpu_bound_speedup"] = base_cpu / max(r["cpu_ms_per_step"])
        r["bytes/step (max rank)"] = max(r["bytes_per_step"]) if r.get("bytes_per_step") else None
        r["wait ms/step (max rank)"] = max(r["wait_ms_per_step"]) if r.get("wait_ms_per_step") else None
    device = "cuda" if torch.cuda.is_available() else "cpu"
    env = environment(torch.device(device))
    try:  # other programs on the machine change the result: record how busy it was
        env["load_average_1m_at_start"] = load_start
        env["load_average_1m_at_end"] = os.getloadavg()[0]
    except (OSError, AttributeError):
        pass
    tag = args.tag or (device + ("_quick" if args.quick else ""))
    settings = {k: getattr(args, k) for k in ("model", "K", "context", "size", "batch", "steps",
                                              "warmup", "threads", "procs", "balance", "backend")}
    title = (f"{args.model} K={args.K} {args.context}, batch {args.batch}, {args.threads} thread(s)/process, "
             f"{env['device_name']}")
    print(title)
    print(format_table(rows, ["mode", "procs", "stages", "images_per_s", "speedup", "efficiency",
                              "cpu_bound_speedup",
                              "bytes/step (max rank)", "wait ms/step (max rank)", "error"]))
    payload = results_payload("distributed", env, settings, rows)
    out_dir = Path(args.out) if args.out else RESULTS
    path = write_payload(f"distributed_{tag}", payload, out_dir)
    png = plot(rows, out_dir / f"distributed_{tag}.png", title)
    print(f"wrote {path}" + (f" and {png}" if png else ""))
    return payload


if __name__ == "__main__":
    main()
