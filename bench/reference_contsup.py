"""Train-step benchmark of the authors' reference ContSup code, on the inputs of ``bench.train_step``.

    python -m bench.reference_contsup --ref-dir .gpuval/ContSup                 # GPU, fp32
    python -m bench.reference_contsup --ref-dir DIR --compare bench/results/train_step_cuda*.json

The reference implementation (github.com/Tab-ct/ContSup, ``networks_dev/``; Yu et al., arXiv
2312.07636) is NOT part of this project: fetch it into a git-ignored folder
(``scripts/gpuval-prepare.sh`` does) and pass that folder as ``--ref-dir``; it is imported at
run time from there and never copied. Its training step, as its ``train.py`` runs it:
``optimizer.zero_grad(); model(img=x, target=y)`` (the model runs every local backward itself)
``; optimizer.step()``, with SGD (momentum 0.9, Nesterov, weight decay 1e-4) and the paper's
configuration (``aux_net_config="1c2f"``, ``local_loss_mode="cross_entropy"``, no decoder).
No DataParallel wrapper (one GPU). fp32, contiguous: the reference has no mixed precision.

The inputs are those of ``bench.train_step`` (``torch.randn(n, 3, 32, 32)`` and
``torch.randint(0, 10, (n,))`` from a generator seeded 0, batch 1024 on GPU), the timing is
the same (:func:`bench.common.median_time`), and peak memory is
``torch.cuda.max_memory_allocated`` (saved-tensor bytes are not measured on CPU).
``--compare`` reads ``bench.train_step`` JSON files of the same run and prints, per configuration,
this project's images/s (best backend) over the reference's: the "at least 2x" target.

On CPU (``--device cpu``, the dry run) the reference's constructor calls ``.cuda()`` on two
constant normalisation tensors; there, and only while constructing, that call returns the
tensor unchanged.
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import importlib
import json
import sys
from pathlib import Path
from typing import Dict, List, Optional

import torch

from .common import environment, format_table, median_time, results_payload, write_payload

CONTEXTS = ("R0", "E", "R1", "R1E")


def load_reference(ref_dir: str):
    """Import ``networks_dev.resnet`` from the reference checkout at ``ref_dir``.

    Raises:
        FileNotFoundError: ``ref_dir`` has no ``networks_dev/resnet.py``.
    """
    path = Path(ref_dir).resolve()
    if not (path / "networks_dev" / "resnet.py").is_file():
        raise FileNotFoundError(f"--ref-dir {ref_dir!r} holds no networks_dev/resnet.py: fetch "
                                "github.com/Tab-ct/ContSup there (scripts/gpuval-prepare.sh does)")
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))
    return importlib.import_module("networks_dev.resnet")


@contextlib.contextmanager
def _cuda_call_is_identity(device: torch.device):
    """On CPU, make ``Tensor.cuda()`` return the tensor itself while the reference is built."""
    if device.type == "cuda":
        yield
        return
    original = torch.Tensor.cuda
    torch.Tensor.cuda = lambda self, *a, **k: self
    try:
        yield
    finally:
        torch.Tensor.cuda = original


def build_reference(resnet_mod, model: str, K: int, context: str, batch: int, device: torch.device):
    """The reference's ``resnet32``/``resnet110`` for K local modules and a context mode."""
    if context not in CONTEXTS:
        raise ValueError(f"context must be one of {CONTEXTS}, got {context!r}")
    if model not in ("resnet32", "resnet110"):
        raise ValueError(f"model must be resnet32 or resnet110 (the reference supports only these), got {model!r}")
    torch.manual_seed(0)
    with _cuda_call_is_identity(device):
        net = getattr(resnet_mod, model)(local_module_num=K, batch_size=batch, image_size=32,
                                         dataset="cifar10", class_num=10, aux_net_config="1c2f",
                                         local_loss_mode="cross_entropy", context_mode=context)
    return net.to(device)


def measure(net, x, y, warmup: int, steps: int) -> Dict[str, Optional[float]]:
    """Median step time, images/s and (CUDA) peak allocated memory of the reference step."""
    opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9, nesterov=True, weight_decay=1e-4)
    net.train()

    def step():
        opt.zero_grad(set_to_none=True)
        net(img=x, target=y)
        opt.step()

    dev = x.device
    mem = None
    if dev.type == "cuda":
        step()
        torch.cuda.synchronize(dev)
        torch.cuda.reset_peak_memory_stats(dev)
    seconds = median_time(step, dev, warmup, steps)
    if dev.type == "cuda":
        mem = torch.cuda.max_memory_allocated(dev) / 2**20
    return {"step_ms": seconds * 1e3, "img_s": x.shape[0] / seconds, "mem_MiB": mem}


def compare(rows: List[dict], ours_json: List[str]) -> List[dict]:
    """Per (model, K, context): this project's best images/s (over the ``bench.train_step``
    JSON files ``ours_json``) over the reference's."""
    ours = [r for path in ours_json for r in json.loads(Path(path).read_text())["rows"]]
    out = []
    for r in rows:
        mine = [o for o in ours if o.get("method") == "LocalSequential" and o.get("model") == r["model"]
                and o.get("K") == r["K"] and o.get("context") == r["context"]]
        if not mine:
            continue
        best = max(mine, key=lambda o: o["img_s"])
        out.append({"model": r["model"], "K": r["K"], "context": r["context"], "backend": best["backend"],
                    "ours_img_s": best["img_s"], "ref_img_s": r["img_s"], "speed_vs_ref": best["img_s"] / r["img_s"],
                    "ours_mem_MiB": best.get("mem_MiB"), "ref_mem_MiB": r.get("mem_MiB")})
    return out


def main(argv=None) -> List[dict]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ref-dir", required=True, help="checkout of github.com/Tab-ct/ContSup (git-ignored)")
    p.add_argument("--models", nargs="+", default=["resnet32", "resnet110"], choices=["resnet32", "resnet110"])
    p.add_argument("--K", nargs="+", type=int, default=[16])
    p.add_argument("--contexts", nargs="+", default=["R0", "R1E"], choices=CONTEXTS)
    p.add_argument("--batch", type=int, default=None, help="default 1024 on GPU, 8 on CPU")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--compare", nargs="+", default=None, help="bench.train_step JSON files of the same run")
    p.add_argument("--out", default=None, help="results folder (default bench/results)")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    try:
        ref = load_reference(args.ref_dir)
    except (FileNotFoundError, ImportError) as exc:
        raise SystemExit(f"reference_contsup: {exc}")
    n = args.batch or (1024 if device.type == "cuda" else 8)
    gen = torch.Generator().manual_seed(0)  # the inputs of bench.train_step
    x = torch.randn(n, 3, 32, 32, generator=gen).to(device)
    y = torch.randint(0, 10, (n,), generator=gen).to(device)
    rows: List[dict] = []
    for model in args.models:
        for K in args.K:
            for ctx in args.contexts:
                net = build_reference(ref, model, K, ctx, n, device)
                r = {"model": model, "method": "reference ContSup", "K": K, "context": ctx, "batch": n,
                     "dtype": "fp32", **measure(net, x, y, args.warmup, args.steps)}
                rows.append(r)
                print(format_table([r], list(r)).splitlines()[-1], flush=True)
                del net
                gc.collect()
                if device.type == "cuda":
                    torch.cuda.empty_cache()
    cols = ["model", "method", "K", "context", "batch", "dtype", "step_ms", "img_s", "mem_MiB"]
    print()
    print(format_table(rows, cols))
    payload = results_payload("reference_contsup", environment(device),
                              dict(models=args.models, K=args.K, contexts=args.contexts, batch=n,
                                   warmup=args.warmup, steps=args.steps), rows,
                              source="github.com/Tab-ct/ContSup networks_dev (run time import)")
    if args.compare:
        cmp_rows = compare(rows, args.compare)
        payload["vs_ours"] = cmp_rows
        print()
        print(format_table(cmp_rows, ["model", "K", "context", "backend", "ours_img_s", "ref_img_s",
                                      "speed_vs_ref", "ours_mem_MiB", "ref_mem_MiB"]))
    path = write_payload(f"reference_contsup_{device.type}", payload, args.out)
    print(f"wrote {path}")
    return rows


if __name__ == "__main__":
    main()
