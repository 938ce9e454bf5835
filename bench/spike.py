"""The context-supply start: the last module's loss over the first steps, per variant.

    python -m bench.spike --data-dir DIR --variants R0 R1E "R1E mean-last" --json

ContSup adds its context terms at full strength from initialisation; the identity paths of
the blocks carry the larger scale to the model's own classifier, whose loss spikes (issue
"Accuracy as evidence", measured with this tool). For each variant this trains a fresh model
(same seed, same batches) for ``--steps`` steps at a constant ``--lr`` with no warm-up, the
harshest start, and reports:

* ``classifier_input_rms``: the RMS of the model classifier's input (the pooled features of
  the last module) at step 0, before any update: the scale the classifier reads;
* ``loss_per_<chunk>``: the last module's loss averaged over each ``--chunk`` steps;
* ``loss_max``: its largest value.

Batches are drawn with replacement from a fixed class-balanced subset, normalised, without
augmentation. SGD with Nesterov momentum 0.9 and weight decay 1e-4, the training CLI's. The
final accuracy of each option is the business of ``bench.accuracy``; this is the cheap screen
(measured on the 2-core CPU, one thread, another run sharing it: about 3.7 s per R1E step
of ResNet-32 K=16 at batch 128).
"""
from __future__ import annotations

import argparse
import statistics
import time
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch
from torch import nn

from contsup_fast import LocalSequential
from contsup_fast import data as D
from contsup_fast.models import build_model
from contsup_fast.train import param_groups

from .common import environment, format_table, write_results

#: the variants: LocalSequential options (E2E is K=1); the R1E rows name both context options
VARIANTS: Dict[str, dict] = {
    "E2E": dict(K=1, context="R0"),
    "R0": dict(context="R0"),
    "R1E": dict(context="R1E", context_gate=None, context_mean=None),  # the paper's exact form
    "R1E learned": dict(context="R1E", context_gate="learned", context_mean=None),
    "R1E mean-last": dict(context="R1E", context_gate=None, context_mean="last"),
    "R1E mean-all": dict(context="R1E", context_gate=None, context_mean="all"),
}


def _classifier(local: LocalSequential) -> nn.Linear:
    linears = [m for m in local.local_modules[-1].body.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError("the model's last local module has no nn.Linear classifier")
    return linears[-1]


def run_variant(name: str, images: np.ndarray, labels: np.ndarray, model: str = "resnet32",
                K: int = 16, steps: int = 40, batch: int = 128, lr: float = 0.1, chunk: int = 10,
                seed: int = 0, dataset: str = "cifar10") -> dict:
    """Train variant ``name`` (a key of :data:`VARIANTS`) for ``steps`` steps on batches drawn
    from ``images`` (N, H, W, 3) uint8 and ``labels`` (N,) int ndarray; return its record."""
    opts = dict(VARIANTS[name])
    k = opts.pop("K", K)
    mean, std = (torch.tensor(v) for v in D.dataset_stats(dataset))
    torch.manual_seed(seed)
    local = LocalSequential(build_model(model, int(labels.max()) + 1), K=k,
                            input_size=(3,) + tuple(images.shape[1:3]), **opts)
    rms: List[float] = []
    hook = _classifier(local).register_forward_pre_hook(
        lambda mod, args: rms.append(float(args[0].detach().pow(2).mean().sqrt())))
    opt = torch.optim.SGD(param_groups(local.parameters(), local), lr=lr, momentum=0.9, nesterov=True,
                          weight_decay=1e-4)
    g = torch.Generator().manual_seed(seed)
    losses: List[float] = []
    t0 = time.perf_counter()
    for _ in range(steps):
        idx = torch.randint(len(labels), (batch,), generator=g).numpy()
        x = D.normalize_batch(torch.from_numpy(np.ascontiguousarray(images[idx])).permute(0, 3, 1, 2), mean, std)
        y = torch.from_numpy(labels[idx]).long()
        opt.zero_grad(set_to_none=True)
        losses.append(float(local(x, y).loss))
        opt.step()
    hook.remove()
    return {"variant": name, "options": VARIANTS[name], "classifier_input_rms": rms[0],
            f"loss_per_{chunk}": [statistics.fmean(losses[i:i + chunk]) for i in range(0, steps, chunk)],
            "loss_max": max(losses), "losses": losses, "seconds": time.perf_counter() - t0}


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m bench.spike", description=__doc__.split("\n\n")[0])
    ap.add_argument("--data-dir", default=None, help="folder holding cifar-10-batches-py")
    ap.add_argument("--variants", nargs="+", default=["R0", "R1E", "R1E mean-last"], choices=list(VARIANTS))
    ap.add_argument("--model", default="resnet32")
    ap.add_argument("--K", type=int, default=16)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--chunk", type=int, default=10, help="steps per reported loss mean")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--lr", type=float, default=0.1)
    ap.add_argument("--subset", type=int, default=10000, help="class-balanced training subset")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", action="store_true", help="write spike_<model>_K<K>.json under --out")
    ap.add_argument("--out", default=None, help="JSON folder (default bench/results)")
    return ap


def main(argv: Optional[Sequence[str]] = None) -> List[dict]:
    args = build_parser().parse_args(argv)
    for name in ("steps", "chunk", "batch_size", "subset"):
        if getattr(args, name) < 1:
            raise SystemExit(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        images, labels = D.load_dataset(D.find_data_dir("cifar10", args.data_dir), "cifar10", train=True)
    except (FileNotFoundError, ValueError) as exc:
        raise SystemExit(f"--data-dir: {exc}")
    idx = D.subset_indices(labels, min(args.subset, len(labels)), seed=0)
    images, labels = images[idx], np.asarray(labels)[idx]
    rows = []
    for name in args.variants:
        r = run_variant(name, images, labels, args.model, args.K, args.steps, args.batch_size,
                        args.lr, args.chunk, args.seed)
        rows.append(r)
        print(f"{name}: classifier input RMS {r['classifier_input_rms']:.2f}, loss per {args.chunk} steps "
              + ", ".join(f"{v:.2f}" for v in r[f"loss_per_{args.chunk}"]) + f", max {r['loss_max']:.1f}",
              flush=True)
    cols = ["variant", "classifier_input_rms", f"loss_per_{args.chunk}", "loss_max", "seconds"]
    print(format_table([{**r, f"loss_per_{args.chunk}": " ".join(f"{v:.2f}" for v in r[f"loss_per_{args.chunk}"])}
                        for r in rows], cols))
    if args.json:
        path = write_results(f"spike_{args.model}_K{args.K}", "spike", environment(torch.device("cpu")),
                             {k: v for k, v in vars(args).items() if k not in ("json", "out")}, rows, args.out)
        print(f"wrote {path}")
    return rows


if __name__ == "__main__":
    main()
