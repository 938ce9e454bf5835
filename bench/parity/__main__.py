"""``python -m bench.parity``: float64 parity of LocalSequential against the authors' code (ContSup, InfoPro, AugLocal, DGL, GN-DGL).

    python -m bench.parity --ref-dir .refs                       # every command.sh line, torch + native
    python -m bench.parity --backends triton --only 'resnet32 K=4 R1E'   # Triton interpreter, a subset
    CONTSUP_REFERENCE_DIR=.refs python -m bench.parity --quick    # the representative subset
    python -m bench.parity --against-torch --device cuda         # fused backends vs torch, fp32/bf16

``--against-torch`` compares the fused backends with the torch backend on a device in fp32 and
bf16, without the authors' code (:mod:`bench.parity.backends`); the rest of this docstring is
about the float64 comparison with the authors' code.

``--ref-dir`` (default ``$CONTSUP_REFERENCE_DIR``, else ``.refs``) holds the checkouts by
repository name (``ContSup/`` here); ``scripts/fetch-references.sh`` fills it. Per configuration
and backend: one training step in float64 on the same batch (labels with at least two examples
per class present) after the reference's BatchNorms are randomised and its state copied into
ours through an explicit name map, then two more SGD steps (the reference's optimiser: momentum
0.9, Nesterov, weight decay 1e-4, its first-epoch learning rate 0.01). The table shows the
largest relative error per compared quantity; MATCH is every one <= 1e-9 and a clean name map.
JSON: ``bench/results/parity_cpu.json`` (``--name`` to change), in the results schema
``contsup_fast.bench/1`` (:func:`bench.common.write_results`; ``--append`` also reads the legacy
form).
"""
from __future__ import annotations

import argparse
import dataclasses
import gc
import os
import re
import shlex
import sys
import time
from pathlib import Path
from typing import List, Optional

import torch

#: a small set covering every context mode, both losses, the decoder, both models, the balanced
#: split and the K without a cut in the widest stage (K=2), AugLocal's split preset, InfoPro's one
#: line with explicit weights and GN-DGL; used by ``--quick`` and the tests.
QUICK = ["resnet32 K=2 R1E ce", "resnet32 K=4 E supcon", "resnet32 K=4 R1E ce +recon",
         "resnet32 K=8 R2 ce", "resnet32 K=16 R0 ce", "resnet32 K=16 R1 supcon",
         "resnet110 K=3 E supcon balanced", "InfoPro resnet32 K=4 R0 supcon \\+recon",
         "DGL mlp-sr head 32x16x16", r"AugLocal resnet32 K=16 d=1 gamma=0.5 \(15 modules, ref split\)",
         r"AugLocal resnet32 K=16 d=3 gamma=0.5 \(13 modules, our split\)",
         "InfoPro resnet110 K=4 R0 supcon \\+recon balanced", "GN-DGL resnet32 K=4 G=2", "GN-DGL resnet32 K=1 G=4"]

REFERENCES = {"ContSup": "github.com/Tab-ct/ContSup (networks_dev, train.py, command.sh)",
              "InfoPro": "github.com/blackfeather-wang/InfoPro-Pytorch (Experiments on CIFAR-SVHN-STL10: "
                         "networks, train.py, comand.sh)",
              "DGL": "github.com/eugenium/DGL (auxiliary_nets_study/models.py, mlp-sr head)",
              "AugLocal": "github.com/ChenxiangMA/AugLocal (networks, train.py, run.sh)",
              "GN-DGL": "github.com/adeetyapatel12/GN-DGL (Multilayer_GN_DGL: networks, utils.py, commands.sh)"}

#: the references this harness runs, by ``--references`` name
SIDES = {"contsup": "contsup", "infopro": "infopro", "dgl": "dgl", "auglocal": "auglocal", "gndgl": "gndgl"}


def reference_dir(arg: Optional[str]) -> str:
    """``--ref-dir``, else ``$CONTSUP_REFERENCE_DIR``, else ``.refs``."""
    return arg or os.environ.get("CONTSUP_REFERENCE_DIR") or ".refs"


def _batches(cfg, n: int, steps: int, seed: int):
    from .core import labels_with_positives
    gen = torch.Generator().manual_seed(seed)
    mean, std = (torch.tensor(v, dtype=torch.float64).view(1, 3, 1, 1) for v in cfg.normalisation)
    out = []
    for _ in range(steps):
        x01 = torch.rand(n, 3, cfg.image_size, cfg.image_size, generator=gen, dtype=torch.float64)
        out.append(((x01 - mean) / std, labels_with_positives(n, cfg.classes, gen)))
    return out


def run_config(mods, cfg, backend: str, batch: int, steps: int = 3, seed: int = 0, side=None) -> dict:
    """One configuration on one backend: the row of the table (with the full comparison).
    ``side`` is the reference's module (:mod:`bench.parity.contsup` by default, or
    :mod:`bench.parity.infopro`) giving ``build_reference``, ``build_ours`` and ``loss_scale``."""
    from . import contsup as C
    from .core import compare_records, verdict
    side = side or C
    resnet_mod, configs_mod = mods
    t0 = time.perf_counter()
    torch.manual_seed(seed)
    ref = side.build_reference(resnet_mod, cfg, batch)
    ours = side.build_ours(cfg, backend, configs_mod)
    nmap = getattr(side, "name_map", C.name_map)(ref, ours)
    split_same = C.split_of(ref) == list(ours.cut_points)
    batches = _batches(cfg, batch, steps, seed)
    gen = torch.Generator().manual_seed(seed + 1)
    rec_ours, rec_ref, report = C.run_pair(ref, ours, nmap, batches, side.loss_scale(configs_mod, cfg), gen)
    cmp = compare_records(rec_ours, rec_ref)
    row = {"reference": side.REFERENCE, "config": cfg.name, **C.config_dict(cfg), "backend": backend,
           "batch": batch, "steps": steps, "split_same": split_same, "ref_split": C.split_of(ref),
           "our_split": list(ours.cut_points), "verdict": verdict(cmp, report) if split_same else "DIFFER",
           "max_rel": max(c["rel"] for c in cmp.values()),
           **{f"{k}_rel": v["rel"] for k, v in cmp.items()}, "comparison": cmp, "name_map": report.summary(),
           **(side.row_notes(cfg) if hasattr(side, "row_notes") else {}), "seconds": time.perf_counter() - t0}
    del ref, ours, rec_ours, rec_ref
    gc.collect()
    return row


COLUMNS = ["config", "backend", "batch", "verdict", "losses_rel", "inputs_rel", "outputs_rel", "logits_rel",
           "grads_rel", "grads_zero_rel", "running_stats_rel", "eval_logits_rel", "eval_outputs_rel", "params_rel", "updates_rel", "seconds"]


def select(cfgs, only: Optional[List[str]]):
    if not only:
        return cfgs
    return [c for c in cfgs if any(re.fullmatch(o, c.name) or o == c.name for o in only)]


def _against_torch(args) -> List[dict]:
    from ..common import RESULTS, environment, format_table, write_results
    from .backends import COLUMNS, FACTOR, SLACK, run
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    name = args.name if args.name != "parity_cpu" else f"parity_backends_{device.type}"
    settings = {"device": str(device), "dtypes": args.dtypes, "backends": args.backends, "only": args.only,
                "batch": args.batch, "factor": FACTOR, "slack": SLACK, "threads": args.threads}
    rows: List[dict] = []

    def add(row):  # saved after every row, so that a run stopped by a time limit keeps its rows
        rows.append(row)
        write_results(name, "parity_backends", environment(device), settings, rows, args.out)
        print(format_table([row], COLUMNS).splitlines()[-1], flush=True)

    run(device, args.dtypes, args.backends, args.only, batch=args.batch, log=add)
    if not rows:
        raise SystemExit("bench.parity: nothing was compared")
    print()
    print(format_table(rows, COLUMNS))
    n_match = sum(r["verdict"] == "MATCH" for r in rows)
    print(f"\n{n_match}/{len(rows)} MATCH (error against float64 per category <= {FACTOR} x the torch "
          f"backend's + {SLACK})")
    print(f"wrote {Path(args.out or RESULTS) / (name + '.json')}")
    if n_match < len(rows):
        raise SystemExit(1)
    return rows


def main(argv=None) -> List[dict]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ref-dir", default=None, help="folder holding the checkouts by repository name "
                                                    "(default $CONTSUP_REFERENCE_DIR, else .refs)")
    p.add_argument("--backends", nargs="+", default=None,
                   help="default: every backend available on the CPU but triton (use --backends triton)")
    p.add_argument("--references", nargs="+", default=None, choices=list(SIDES),
                   help="which authors' code to compare against (default: every one whose checkout is there)")
    p.add_argument("--only", nargs="+", default=None, help="configuration names (regular expressions)")
    p.add_argument("--skip", nargs="+", default=None, help="configuration names to leave out (regular expressions)")
    p.add_argument("--quick", action="store_true", help="the representative subset QUICK")
    p.add_argument("--no-extra", action="store_true", help="only command.sh lines (no balanced+recon extras)")
    p.add_argument("--batch", type=int, default=8, help="batch for ResNet-32 (default 8)")
    p.add_argument("--batch-110", type=int, default=4, help="batch for ResNet-110 at 32x32 (default 4)")
    p.add_argument("--batch-96", type=int, default=2, help="batch for ResNet-110 at 96x96, STL-10 (default 2)")
    p.add_argument("--steps", type=int, default=3, help="SGD steps (the first is the compared step)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (default 1: on a shared 2-core machine more threads are slower)")
    p.add_argument("--name", default="parity_cpu", help="JSON name under --out")
    p.add_argument("--out", default=None, help="results folder (default bench/results)")
    p.add_argument("--append", action="store_true",
                   help="keep the rows already in the JSON and skip the (configuration, backend) pairs it has")
    p.add_argument("--against-torch", action="store_true",
                   help="the fused backends against the torch backend on --device in --dtypes, no "
                        "authors' code (bench/parity/backends.py); --only selects its configurations")
    p.add_argument("--device", default=None, help="with --against-torch (default: cuda if available, else cpu)")
    p.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"],
                   help="with --against-torch")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.backends and "triton" in args.backends and not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported
    if args.against_torch:
        return _against_torch(args)
    from contsup_fast.fused import available_backends
    from ..common import RESULTS, environment, format_table, load_results, write_results
    import importlib
    from . import contsup as C
    root = reference_dir(args.ref_dir)
    avail = available_backends("cpu")
    backends = args.backends or [b for b in avail if b != "triton"]
    for b in backends:
        if b not in avail:
            raise SystemExit(f"bench.parity: backend {b!r} is not available on the CPU (available: {avail})")
    rows: List[dict] = []
    command = "python -m bench.parity " + shlex.join(sys.argv[1:] if argv is None else argv)
    commands = [command]
    done = set()
    previous = Path(args.out or RESULTS) / f"{args.name}.json"
    if args.append and previous.is_file():
        old = load_results(previous)  # the current schema or the legacy form
        rows += old["rows"]
        commands = old.get("commands") or [old.get("command")]
        commands = [c for c in commands if c] + [command]
        done = {(r["config"], r["backend"]) for r in rows}

    def save():
        settings = {"backends": backends, "batch": args.batch, "batch_110": args.batch_110,
                    "batch_96": args.batch_96, "steps": args.steps, "threads": args.threads,
                    "lr": C.REF_LR, "dtype": "float64", "tolerance": 1e-9,
                    "triton_interpret": os.environ.get("TRITON_INTERPRET")}
        return write_results(args.name, "parity", environment(torch.device("cpu")), settings, rows, args.out,
                             references=REFERENCES, commands=commands)

    def add(row):
        rows.append(row)
        save()  # after every row, so that a long run that is stopped keeps what it measured
        print(format_table([row], COLUMNS).splitlines()[-1], flush=True)

    for ref_name in args.references or list(SIDES):
        side = importlib.import_module(f"bench.parity.{SIDES[ref_name]}")
        folder = os.path.join(root, side.DIRNAME)
        try:
            mods = side.load(folder)
        except (FileNotFoundError, ImportError) as exc:
            if args.references:  # named on the command line: its absence is an error
                raise SystemExit(f"bench.parity: {exc}")
            print(f"bench.parity: skipping {side.REFERENCE}: {exc}", flush=True)
            continue
        cfgs = side.command_configs(folder) + ([] if args.no_extra else getattr(side, "EXTRA", []))
        cfgs = select(cfgs, QUICK if args.quick else args.only)
        if args.skip:
            cfgs = [c for c in cfgs if c not in select(cfgs, args.skip)]
        if hasattr(side, "run_head"):  # head-level comparison (no backend involved)
            for cfg in cfgs:
                if (cfg.name, "-") not in done:
                    add(side.run_head(mods, cfg, args.batch))
            continue
        for cfg in cfgs:
            batch = args.batch if cfg.model == "resnet32" else (args.batch_96 if cfg.image_size == 96
                                                                 else args.batch_110)
            for b in backends:
                if (cfg.name, b) in done:
                    continue
                try:
                    if hasattr(side, "run_model"):  # a reference with its own comparison (GN-DGL)
                        row = side.run_model(mods, cfg, b, batch, args.steps)
                    else:
                        row = run_config(mods, cfg, b, batch, args.steps, side=side)
                except Exception as exc:  # a configuration that cannot be built or run is a result too
                    row = {"reference": side.REFERENCE, "config": cfg.name, **dataclasses.asdict(cfg), "backend": b,
                           "batch": batch, "verdict": "ERROR", "error": f"{type(exc).__name__}: {exc}"}
                add(row)
    print()
    print(format_table(rows, COLUMNS))
    n_match = sum(r["verdict"] == "MATCH" for r in rows)
    print(f"\n{n_match}/{len(rows)} MATCH (relative error <= 1e-9 in float64 on every quantity)")
    print(f"wrote {save()}")
    return rows


if __name__ == "__main__":
    main()
