"""Accuracy A/B harness: the project's accuracy evidence (``python -m bench.accuracy``).

A *protocol* fixes the model, K, the training recipe (epochs, subset, batch, lr, warm-up),
the seeds and a list of *variants*, each a set of training-CLI options (E2E is ``--K 1``).
Every (variant, seed) run goes through the real training code, ``python -m
contsup_fast.train``, in its own process and run folder, so a stopped harness resumes where
it stopped (finished runs are skipped, interrupted ones continue from their checkpoint).
Ctrl-C or SIGTERM stops every running run at its next step boundary, after it saves a
checkpoint.

Outputs, under ``--out`` (default ``bench/results``):

* ``accuracy_<preset>.json``: environment, protocol, every run's per-epoch records and the
  summary (test accuracy mean and spread over seeds at each evaluated epoch);
* ``accuracy_<preset>.png``: test accuracy against epoch, one line per variant (mean over
  seeds) with a band from the lowest to the highest seed;
* ``accuracy_<preset>_loss.png``: the last module's loss over the first epoch's steps
  (mean over seeds), where the context-supply loss spike shows.

Presets: ``cpu`` (the 2-core CPU machine, resumable across sessions: ResNet-32, K=16, a
10,000-image class-balanced subset, batch 128, lr 0.1, 3 warm-up epochs into cosine, 12 epochs,
2 seeds; rows E2E, R0, R1E in the paper's form, R1E with the learned gate, R1E with the default
context mean "last", R1E with the mean at every boundary, R1E and R0 with supervised
contrastive local losses, R1E and R0 with DGL's auxiliary heads, and R1E and R0 with
InfoPro's reconstruction loss, the reference's ``--h_reconstruct`` "decoder" rows), ``cpu-k``
(accuracy against K: the same protocol at K = 2, 4, 8, 16 for R0 and R1E with the default
options, plus E2E; the E2E and K=16 rows are read from ``accuracy_cpu.json``, checked to have
the same training arguments, not trained again; ``accuracy_cpu_k.png`` is final accuracy
against K, the epoch curves go to ``accuracy_cpu_k_epochs.png``), ``gpu``
(the paper's recipe: full data, 160 epochs, batch 1024, lr 0.8, 10 warm-up epochs, bf16,
channels_last; ``--epochs`` to fit a lease, the same for every row) and ``smoke`` (seconds,
for the tests).
Accuracies on the shared JPEG-lossy CIFAR-10 copy are comparable with each other only, never
with published CIFAR-10 numbers.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch

from .common import RESULTS, environment, format_table, write_json

__all__ = ["Protocol", "PRESETS", "reused_logs", "run_protocol", "summarize", "main"]


@dataclass
class Protocol:
    """What an A/B compares. ``variants`` maps a row name to its extra training-CLI options."""

    name: str
    model: str
    K: int
    variants: Dict[str, List[str]]
    epochs: int
    subset: Optional[int]
    seeds: List[int]
    batch_size: int
    lr: float
    warmup_epochs: float
    eval_every: int = 1
    extra: List[str] = field(default_factory=list)
    #: rows taken from another preset's committed results instead of being trained again:
    #: ``{row: "<preset>:<row there>"}``; :func:`reused_logs` checks that the two runs have the
    #: same training arguments (every :data:`contsup_fast.train.RESULT_ARGS` entry)
    reuse: Dict[str, str] = field(default_factory=dict)

    def k_of(self, variant: str) -> int:
        """The K a row trains with (its own ``--K`` if it has one, else the protocol's)."""
        opts = self.variants[variant]
        ks = [opts[i + 1] for i, o in enumerate(opts[:-1]) if o == "--K"]
        return int(ks[-1]) if ks else self.K

    def sweeps_k(self) -> bool:
        """True when the rows train at more than one K besides E2E's K=1."""
        return len({self.k_of(v) for v in self.variants} - {1}) > 1

    def argv(self, variant: str, seed: int, data_dir: str, out: str, threads: Optional[int]) -> List[str]:
        """Training-CLI arguments of one run (the variant's options come last and win)."""
        a = ["--model", self.model, "--K", str(self.K), "--epochs", str(self.epochs),
             "--batch-size", str(self.batch_size), "--lr", str(self.lr),
             "--warmup-epochs", str(self.warmup_epochs), "--seed", str(seed),
             "--eval-every", str(self.eval_every), "--data-dir", data_dir, "--out", out,
             "--no-progress"]
        if self.subset:
            a += ["--subset", str(self.subset)]
        if threads:
            a += ["--threads", str(threads)]
        return a + list(self.extra) + list(self.variants[variant])


_E2E = ["--K", "1", "--context", "R0"]


def _r0(*extra: str) -> List[str]:
    """An R0 row's CLI options (local learning without context), then ``extra``."""
    return ["--context", "R0", *extra]


def _r1e(gate: str = "none", mean: str = "none", *extra: str) -> List[str]:
    """An R1E row's CLI options. It names both context options, so that a row means the same
    run whatever the defaults; the defaults here are the paper's exact form."""
    return ["--context", "R1E", "--context-gate", gate, "--context-mean", mean, *extra]


CPU_K_VALUES = (2, 4, 8, 16)

PRESETS: Dict[str, Protocol] = {
    "cpu": Protocol(
        name="cpu", model="resnet32", K=16, epochs=12, subset=10000, seeds=[0, 1],
        batch_size=128, lr=0.1, warmup_epochs=3, eval_every=3,
        # the ramp gate is not a row: it only delays the spike (README demo, measured), and
        # each R1E row costs about 70 min of one core here
        variants={"E2E": _E2E, "R0": _r0(),
                  "R1E": _r1e(), "R1E learned": _r1e("learned"),
                  "R1E mean-last": _r1e(mean="last"), "R1E mean-all": _r1e(mean="all"),
                  "R1E supcon": _r1e("none", "last", "--loss", "supcon"),
                  "R0 supcon": _r0("--loss", "supcon"),
                  "R1E dgl": _r1e("none", "last", "--aux", "dgl"),
                  "R0 dgl": _r0("--aux", "dgl"),
                  "R1E decoder": _r1e("none", "last", "--reconstruct"),
                  "R0 decoder": _r0("--reconstruct")}),
    # accuracy against K (the paper's Tables 1-2 at CPU scale): the cpu protocol at K = 2..16,
    # R0 and R1E with the default options; E2E and the K=16 rows are the cpu preset's runs.
    # Without context terms the context mean changes nothing; E2E and R0 name "none", the
    # value those runs were trained with, so that reused_logs finds them identical
    "cpu-k": Protocol(
        name="cpu_k", model="resnet32", K=16, epochs=12, subset=10000, seeds=[0, 1],
        batch_size=128, lr=0.1, warmup_epochs=3, eval_every=3,
        variants={"E2E": [*_E2E, "--context-mean", "none"],
                  **{f"R0 K={k}": ["--K", str(k), *_r0("--context-mean", "none")] for k in CPU_K_VALUES},
                  **{f"R1E K={k}": ["--K", str(k), *_r1e(mean="last")] for k in CPU_K_VALUES}},
        reuse={"E2E": "cpu:E2E", "R0 K=16": "cpu:R0", "R1E K=16": "cpu:R1E mean-last"}),
    "gpu": Protocol(
        name="gpu", model="resnet32", K=16, epochs=160, subset=None, seeds=[0],
        batch_size=1024, lr=0.8, warmup_epochs=10, eval_every=5,
        extra=["--amp", "bf16", "--channels-last"],
        variants={"E2E": _E2E, "R0": _r0(), "E": ["--context", "E"],
                  "R1": ["--context", "R1"], "R1E": _r1e(), "R1E ramp": _r1e("ramp"),
                  "R1E learned": _r1e("learned"), "R1E mean-last": _r1e(mean="last"),
                  "R1E supcon": _r1e("none", "last", "--loss", "supcon")}),
    # a small ViT (contsup_fast.models.vit_cifar: patch 4, D=192, 6 blocks) on the cpu preset's
    # schedule; the SGD learning rate is halved for a model without BatchNorm (not tuned)
    "vit-cpu": Protocol(
        name="vit-cpu", model="vit_cifar", K=4, epochs=12, subset=10000, seeds=[0, 1],
        batch_size=128, lr=0.05, warmup_epochs=3, eval_every=3, extra=["--aux", "token"],
        variants={"E2E": _E2E, "R0": _r0(), "R1E": _r1e()}),
    "smoke": Protocol(
        name="smoke", model="resnet20", K=4, epochs=2, subset=64, seeds=[0, 1],
        batch_size=32, lr=0.05, warmup_epochs=0.5, eval_every=1,
        variants={"R0": _r0(), "R1E ramp": ["--context", "R1E", "--context-gate", "ramp"]}),
}


def _run_dir(root: Path, variant: str, seed: int) -> Path:
    slug = variant.replace(" ", "_").replace("/", "-")
    return root / f"{slug}_seed{seed}"


def _load_log(run_dir: Path) -> Optional[dict]:
    try:
        with open(run_dir / "log.json") as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def reused_logs(p: Protocol, results_dir: Path) -> Dict[str, Dict[int, dict]]:
    """The logs of ``p``'s reused rows, read from the committed ``accuracy_<preset>.json`` in
    ``results_dir``: ``{row: {seed: log.json contents}}``.

    Raises:
        ValueError: a reused run is missing or unfinished there, or was trained with other
            training arguments than the row would be (names every differing argument).
    """
    from contsup_fast.train import build_parser, result_arg_differences
    parser = build_parser()
    out: Dict[str, Dict[int, dict]] = {}
    for row, source in p.reuse.items():
        if row not in p.variants:
            continue
        preset, _, there = source.partition(":")
        path = results_dir / f"accuracy_{PRESETS[preset].name}.json"
        with open(path) as f:
            runs = json.load(f)["runs"].get(there, {})
        out[row] = {}
        for seed in p.seeds:
            log_ = runs.get(str(seed))
            if not log_ or "final" not in log_:
                raise ValueError(f"row {row!r} reuses {source!r} seed {seed}, which {path} has not finished")
            ours = vars(parser.parse_args(p.argv(row, seed, "data", "out", None)))
            diff = result_arg_differences(ours, log_["args"])
            if diff:
                raise ValueError(f"row {row!r} cannot reuse {source!r} seed {seed}: " + "; ".join(diff))
            out[row][seed] = log_
    return out


def run_protocol(p: Protocol, data_dir: str, runs_root: Path, jobs: int = 1,
                 threads: Optional[int] = None, log=print) -> Dict[str, Dict[int, dict]]:
    """Train every (variant, seed) of ``p`` that has not finished yet, ``jobs`` at a time.

    Each run is ``python -m contsup_fast.train`` in its own process; a run folder holding a
    checkpoint is resumed (``--resume``), one whose log has a ``final`` record is skipped.

    Returns:
        ``{variant: {seed: log.json contents}}`` for every run.

    Raises:
        RuntimeError: a run failed (its exit status and the tail of its output).
    """
    runs_root.mkdir(parents=True, exist_ok=True)
    todo = []
    for seed in p.seeds:  # seed-major: the first seed of every row finishes first
        for variant in p.variants:
            d = _run_dir(runs_root, variant, seed)
            log_ = _load_log(d)
            if log_ is not None and "final" in log_:
                continue
            argv = p.argv(variant, seed, data_dir, str(d), threads)
            if (d / "checkpoint.pt").exists():
                argv = ["--resume", str(d), "--no-progress"] + (["--threads", str(threads)] if threads else [])
            todo.append((variant, seed, d, argv))
    running: List[tuple] = []
    env = dict(os.environ)
    try:
        while todo or running:
            while todo and len(running) < jobs:
                variant, seed, d, argv = todo.pop(0)
                d.mkdir(parents=True, exist_ok=True)
                out = open(d / "train.out", "a")
                log(f"start {variant!r} seed {seed}: {' '.join(argv)}")
                proc = subprocess.Popen([sys.executable, "-m", "contsup_fast.train"] + argv,
                                        stdout=out, stderr=subprocess.STDOUT, env=env)
                running.append((variant, seed, d, proc, out, time.time()))
            for item in list(running):
                variant, seed, d, proc, out, t0 = item
                if proc.poll() is None:
                    continue
                out.close()
                running.remove(item)
                if proc.returncode != 0:
                    tail = (d / "train.out").read_text().strip().splitlines()[-5:]
                    raise RuntimeError(f"run {variant!r} seed {seed} exited with status "
                                       f"{proc.returncode}: " + " | ".join(tail))
                log(f"done  {variant!r} seed {seed} in {time.time() - t0:.0f} s")
            time.sleep(0.5)
    finally:  # interrupted: stop the children (each saves a checkpoint on SIGTERM; SIGINT
        # would do too, but a harness started in the background passes SIGINT on as ignored)
        for _, _, _, proc, out, _ in running:
            if proc.poll() is None:
                proc.terminate()
        for _, _, _, proc, out, _ in running:
            try:
                proc.wait(timeout=120)
            except subprocess.TimeoutExpired:
                proc.kill()
            out.close()
    return {v: {s: _load_log(_run_dir(runs_root, v, s)) for s in p.seeds} for v in p.variants}


def _mean_spread(values: Sequence[float]):
    values = [v for v in values if v is not None]
    if not values:
        return None, None
    mean = statistics.fmean(values)
    spread = (max(values) - min(values)) / 2 if len(values) > 1 else 0.0
    return mean, spread


def summarize(p: Protocol, logs: Dict[str, Dict[int, dict]]) -> Dict[str, dict]:
    """Per variant: the evaluated epochs, test accuracy mean/half-range over seeds at each, the
    final accuracy, the mean last-module loss of the first epoch, images/s and peak memory."""
    out = {}
    for variant, by_seed in logs.items():
        finished = {s: l for s, l in by_seed.items() if l}
        epochs = sorted({e["epoch"] for l in finished.values() for e in l["epochs"]
                         if e.get("test_acc") is not None})
        acc = {}
        for ep in epochs:
            vals = [e["test_acc"] for l in finished.values() for e in l["epochs"] if e["epoch"] == ep]
            mean, spread = _mean_spread(vals)
            acc[ep] = {"mean": mean, "spread": spread, "seeds": vals}
        first = [l["epochs"][0] for l in finished.values() if l["epochs"]]
        first_loss = [statistics.fmean(e["step_losses"]) for e in first if e.get("step_losses")]
        final = [l.get("final", {}).get("final_test_acc") for l in finished.values()]
        out[variant] = {
            "seeds_finished": sorted(s for s, l in finished.items() if "final" in l),
            "test_acc": acc,
            "final_test_acc": _mean_spread(final)[0] if any(v is not None for v in final) else None,
            "final_test_acc_spread": _mean_spread(final)[1],
            "first_epoch_last_module_loss": _mean_spread(first_loss)[0],
            "images_per_s": _mean_spread([e["images_per_s"] for e in first])[0],
            "peak_mem_mib": _mean_spread([e["peak_mem_mib"] for e in first])[0],
            "peak_mem_kind": first[0].get("peak_mem_kind") if first else None,
        }
    return out


def table(summary: Dict[str, dict]) -> str:
    """Text table: test accuracy (mean ± half-range over seeds) at each evaluated epoch; a
    cell over another number of seeds than the row's finished ones (a run still going) says
    how many, e.g. ``51.17±0.40 (n=2)``."""
    epochs = sorted({ep for s in summary.values() for ep in s["test_acc"]})
    rows = []
    for variant, s in summary.items():
        done = len(s["seeds_finished"])
        row = {"variant": variant, "seeds": done}
        for ep in epochs:
            a = s["test_acc"].get(ep)
            n = len(a["seeds"]) if a else 0
            row[f"ep{ep}"] = (f"{a['mean']:.2f}±{a['spread']:.2f}" + (f" (n={n})" if n != done else "")
                              if a else None)
        loss = s["first_epoch_last_module_loss"]
        row["ep1 last loss"] = f"{loss:.2f}" if loss is not None else None
        rows.append(row)
    return format_table(rows, ["variant", "seeds"] + [f"ep{e}" for e in epochs] + ["ep1 last loss"])


def plot(p: Protocol, logs: Dict[str, Dict[int, dict]], summary: Dict[str, dict], out_dir: Path) -> List[Path]:
    """The two PNGs: accuracy against epoch (band over seeds), first-epoch last-module loss."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for variant, s in summary.items():
        eps = sorted(s["test_acc"])
        if not eps:
            continue
        vals = [s["test_acc"][e]["seeds"] for e in eps]
        ax.plot(eps, [statistics.fmean(v) for v in vals], marker="o", label=variant)
        ax.fill_between(eps, [min(v) for v in vals], [max(v) for v in vals], alpha=0.2)
    ax.set_xlabel("epoch")
    ax.set_ylabel("test accuracy (%)")
    done = max((len(s["seeds_finished"]) for s in summary.values()), default=0)
    ax.set_title(f"{p.model}, K={p.K}, {p.subset or 'all'} train images, batch {p.batch_size}, "
                 f"seeds finished: up to {done} of {len(p.seeds)}\n"
                 f"(JPEG-lossy CIFAR-10 copy: not official numbers)", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    # a K sweep's accuracy_<preset>.png is the plot against K (plot_against_k)
    paths.append(out_dir / (f"accuracy_{p.name}_epochs.png" if p.sweeps_k() else f"accuracy_{p.name}.png"))
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for variant, by_seed in logs.items():
        curves = [l["epochs"][0]["step_losses"] for l in by_seed.values()
                  if l and l["epochs"] and l["epochs"][0].get("step_losses")]
        if not curves:
            continue
        n = min(len(c) for c in curves)
        ax.plot(range(1, n + 1), [statistics.fmean(c[i] for c in curves) for i in range(n)], label=variant)
    ax.set_yscale("log")
    ax.set_xlabel("step of epoch 1")
    ax.set_ylabel("last-module loss (mean over seeds)")
    ax.set_title("the context-supply start: last module's loss in the first epoch", fontsize=9)
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    fig.tight_layout()
    paths.append(out_dir / f"accuracy_{p.name}_loss.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)
    return paths


def plot_against_k(p: Protocol, summary: Dict[str, dict], out_dir: Path) -> Optional[Path]:
    """``accuracy_<preset>.png`` for a protocol whose rows sweep K: final test accuracy against K
    (log2 axis), one line per method (the row name before " K=", mean over seeds) with a band
    from the lowest to the highest seed, and each K=1 row (E2E) as a horizontal line. Only
    rows with a finished seed are drawn; None when no method has two K values yet."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lines: Dict[str, Dict[int, List[float]]] = {}
    flat: Dict[str, List[float]] = {}
    for variant, s in summary.items():
        finals = s["test_acc"].get(max(s["test_acc"]), {}).get("seeds", []) if s["test_acc"] else []
        if not finals or not s["seeds_finished"]:
            continue
        if p.k_of(variant) == 1:
            flat[variant] = finals
        else:
            lines.setdefault(variant.split(" K=")[0], {})[p.k_of(variant)] = finals
    if not lines or all(len(ks) < 2 for ks in lines.values()):
        return None
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for method, by_k in lines.items():
        ks = sorted(by_k)
        ax.plot(ks, [statistics.fmean(by_k[k]) for k in ks], marker="o", label=method)
        ax.fill_between(ks, [min(by_k[k]) for k in ks], [max(by_k[k]) for k in ks], alpha=0.2)
    for name, finals in flat.items():
        ax.axhline(statistics.fmean(finals), color="k", linestyle="--", label=f"{name} (K=1)")
    ax.set_xscale("log", base=2)
    all_k = sorted({k for by_k in lines.values() for k in by_k})
    ax.set_xticks(all_k, [str(k) for k in all_k])
    ax.set_xlabel("K (local modules)")
    ax.set_ylabel(f"test accuracy after {p.epochs} epochs (%)")
    ax.set_title(f"{p.model}, {p.subset or 'all'} train images, {p.epochs} epochs, seeds {p.seeds} "
                 f"(band: lowest to highest)\n(JPEG-lossy CIFAR-10 copy: not official numbers)", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path = out_dir / f"accuracy_{p.name}.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def run_table(logs: Dict[str, Dict[int, dict]]) -> str:
    """Markdown table, one row per (variant, seed) run that has started: test accuracy at each
    evaluated epoch ("-" not reached), the final accuracy in bold, and the run's mean
    last-module loss over epoch 1."""
    epochs = sorted({e["epoch"] for by_seed in logs.values() for l in by_seed.values() if l
                     for e in l["epochs"] if e.get("test_acc") is not None})
    head = ["variant", "seed"] + [f"epoch {e}" for e in epochs] + ["epoch-1 mean last-module loss"]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for variant, by_seed in logs.items():
        for seed, l in sorted(by_seed.items()):
            if not l or not l["epochs"]:
                continue
            acc = {e["epoch"]: e["test_acc"] for e in l["epochs"] if e.get("test_acc") is not None}
            cells = [(f"**{acc[e]:.2f}**" if e == epochs[-1] else f"{acc[e]:.2f}") if e in acc else "-"
                     for e in epochs]
            steps = l["epochs"][0].get("step_losses")
            loss = f"{statistics.fmean(steps):.2f}" if steps else "-"
            lines.append("| " + " | ".join([variant, str(seed)] + cells + [loss]) + " |")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m bench.accuracy", description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="cpu", choices=sorted(PRESETS), help="the protocol")
    ap.add_argument("--data-dir", default=None,
                    help="folder holding cifar-10-batches-py (default: the training CLI's default)")
    ap.add_argument("--runs", default=None, help="run folders (default runs/accuracy_<preset>)")
    ap.add_argument("--out", default=None, help="JSON/PNG folder (default bench/results)")
    ap.add_argument("--variants", nargs="+", default=None, help="only these rows (names of the preset)")
    ap.add_argument("--seeds", nargs="+", type=int, default=None, help="override the preset's seeds")
    ap.add_argument("--epochs", type=int, default=None, help="override the preset's epochs (all rows)")
    ap.add_argument("--jobs", type=int, default=1, help="runs at once")
    ap.add_argument("--threads", type=int, default=None, help="torch threads per run")
    ap.add_argument("--report-only", action="store_true", help="summarise the runs already there")
    return ap


class _TerminateAsInterrupt:
    """In the main thread, SIGTERM raises KeyboardInterrupt, so that ``kill`` stops the harness
    the way Ctrl-C does: its runs are stopped and checkpointed rather than left running."""

    def __enter__(self):
        self._old = None
        if threading.current_thread() is threading.main_thread():
            self._old = signal.signal(signal.SIGTERM, self._raise)
        return self

    @staticmethod
    def _raise(signum, frame):
        raise KeyboardInterrupt

    def __exit__(self, *exc):
        if self._old is not None:
            signal.signal(signal.SIGTERM, self._old)
        return False


def main(argv: Optional[Sequence[str]] = None) -> dict:
    args = build_parser().parse_args(argv)
    p = PRESETS[args.preset]
    if args.variants:
        unknown = [v for v in args.variants if v not in p.variants]
        if unknown:
            raise SystemExit(f"--variants: {unknown} not in preset {p.name!r} (has {list(p.variants)})")
        p = replace(p, variants={v: p.variants[v] for v in args.variants})
    if args.seeds:
        p = replace(p, seeds=list(args.seeds))
    if args.epochs:
        p = replace(p, epochs=args.epochs)
    runs_root = Path(args.runs or os.path.join("runs", f"accuracy_{p.name}"))
    out_dir = Path(args.out) if args.out else RESULTS
    out_dir.mkdir(parents=True, exist_ok=True)
    data_dir = args.data_dir
    if data_dir is None:
        from contsup_fast.data import find_data_dir
        try:
            data_dir = find_data_dir("cifar10", None)
        except FileNotFoundError as exc:
            raise SystemExit(f"--data-dir: {exc}")
    t0 = time.time()
    try:
        reused = reused_logs(p, RESULTS)
    except (OSError, ValueError) as exc:
        raise SystemExit(f"bench.accuracy: {exc}")
    trained = replace(p, variants={v: o for v, o in p.variants.items() if v not in reused})
    if args.report_only:
        logs = {v: {s: _load_log(_run_dir(runs_root, v, s)) for s in p.seeds} for v in trained.variants}
    else:
        try:
            with _TerminateAsInterrupt():
                logs = run_protocol(trained, str(data_dir), runs_root, jobs=args.jobs, threads=args.threads)
        except RuntimeError as exc:
            raise SystemExit(f"bench.accuracy: {exc}")
        except KeyboardInterrupt:
            raise SystemExit(f"bench.accuracy: interrupted; runs are checkpointed under {runs_root}, "
                             f"run the same command again to continue")
    logs = {v: reused[v] if v in reused else logs[v] for v in p.variants}
    summary = summarize(p, logs)
    print(table(summary))
    print(run_table(logs))
    payload = {"environment": environment(torch.device("cpu")), "protocol": asdict(p),
               "runs_root": str(runs_root), "wall_s": time.time() - t0, "summary": summary,
               "runs": {v: {str(s): l for s, l in by_seed.items()} for v, by_seed in logs.items()}}
    path = write_json(f"accuracy_{p.name}", payload, out_dir)
    pngs = plot(p, logs, summary, out_dir)
    if p.sweeps_k():
        against_k = plot_against_k(p, summary, out_dir)
        pngs = ([against_k] if against_k else []) + pngs
    print(f"wrote {path} and {', '.join(str(x) for x in pngs)}")
    return payload


if __name__ == "__main__":
    main()
