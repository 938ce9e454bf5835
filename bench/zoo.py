"""Model zoo: does every torchvision classification model (and a named list of timm models)
wrap, train, evaluate and export with LocalSequential, and what does it save against E2E?

    python -m bench.zoo                                  # the whole zoo (hours on a 2-core CPU)
    python -m bench.zoo --models resnet18 timm:convnext_atto --K 2 4

For each model, in its OWN subprocess (``RLIMIT_AS`` memory cap ``--memory-gib``, wall-clock
limit ``--timeout``; a crash, a timeout or running out of memory becomes a row, never a hang):

1. build it with fresh weights (:func:`contsup_fast.models.build_model`: torchvision with
   ``weights=None``, timm with ``pretrained=False``, 10 classes) and count its parameters;
2. find the smallest square input it accepts among ``--sizes`` (one eval forward of one image
   per size; ViT and Swin need 224, most CNNs take 32);
3. E2E (``LocalSequential(K=1)``), then every ``--K`` x ``--contexts``: wrap it (a refusal is a
   row with the ValueError's message), ``--warmup`` unmeasured training steps, one measured
   training step (batch ``--batch``) with :func:`contsup_fast.memory.measure_step` (saved peak:
   live saved-for-backward bytes; true peak: every CPU tensor allocation of the step, from the
   profiler's allocator events), one evaluation (``local.eval()(x)``, finite logits of shape
   (N, 10)), and ``to_module()``, whose logits must equal the evaluation's (``torch.allclose``,
   rtol 1e-4, atol 1e-5).

Statuses: ``ok``; ``refused`` (LocalSequential raised ValueError: the reason is its message);
``error`` (any other exception, e.g. the model rejects every input size); ``mismatch``
(``to_module()`` differs from eval, or non-finite logits); ``oom`` (an allocation failed
under the memory cap); ``timeout``; ``crashed`` (the process died, e.g. killed by a signal);
``not run`` (the model's process ended before reaching this configuration); ``wrong layout``
(it ran, but a version without layout support read a channels-last cut tensor, shape
(N, H, W, C) with H == W != C, as (N, C, H, W): Swin before issue 22).

Writes ``bench/results/zoo_<tag>.json`` (rows, settings, environment) and
``bench/results/zoo_<tag>.md`` (the table), rewritten after every model, so a stopped sweep
keeps what it measured.
"""
from __future__ import annotations

import argparse
import gc
import json
import math
import os
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

#: timm models of the zoo: ResNet, ConvNeXt, EfficientNet, MobileNet, ViT, DeiT (with and
#: without a distillation token), Swin and MaxViT, the smallest member of each family.
TIMM_MODELS = ("resnet18", "convnext_atto", "efficientnet_b0", "mobilenetv3_small_100",
               "vit_tiny_patch16_224", "deit_tiny_patch16_224", "deit_tiny_distilled_patch16_224",
               "swin_tiny_patch4_window7_224", "maxvit_rmlp_pico_rw_256")
#: one small member of every torchvision family, run first so that a stopped sweep covers
#: every family (then the timm list, the other torchvision models, and LARGE last).
FIRST = ("resnet18", "mobilenet_v3_small", "squeezenet1_0", "shufflenet_v2_x0_5", "mnasnet0_5",
         "regnet_x_400mf", "efficientnet_b0", "googlenet", "inception_v3", "densenet121", "alexnet",
         "vgg11", "convnext_tiny", "maxvit_t", "swin_t", "swin_v2_t", "vit_b_32", "vit_b_16",
         "resnext50_32x4d", "wide_resnet50_2", "efficientnet_v2_s", "mobilenet_v2")
#: the largest torchvision models (parameters or compute), run last so that a stopped sweep has
#: the most rows; several exceed a 10 GiB cap or a 2-core CPU's timeout.
LARGE = ("vit_h_14", "regnet_y_128gf", "vit_l_16", "vit_l_32", "swin_v2_b", "swin_b", "regnet_y_32gf",
         "regnet_x_32gf", "efficientnet_v2_l", "efficientnet_b7", "efficientnet_b6", "convnext_large",
         "resnext101_64x4d", "wide_resnet101_2")
SIZES = (32, 64, 75, 96, 128, 160, 192, 224, 256)
ROW_TAG = "ZOO-ROW "
STATUSES = ("ok", "wrong layout", "refused", "error", "mismatch", "oom", "timeout", "crashed", "not run")


def zoo_models(timm_models: Sequence[str] = TIMM_MODELS) -> List[str]:
    """Every torchvision classification model (``torchvision.models.list_models``) and
    ``timm:<name>`` for each of ``timm_models`` (left out when timm is not installed), in the
    order: :data:`FIRST`, the timm models, the other torchvision models, :data:`LARGE`."""
    import torchvision

    names = list(torchvision.models.list_models(module=torchvision.models))
    try:
        import timm  # noqa: F401
        extra = [f"timm:{n}" for n in timm_models]
    except ImportError:
        extra = []
    first = [n for n in FIRST if n in names]
    return (first + extra + [n for n in names if n not in LARGE and n not in first]
            + [n for n in LARGE if n in names])


def configs(Ks: Sequence[int], contexts: Sequence[str]) -> List[tuple]:
    """``(K, context)`` of every row of one model, E2E ``(1, "E2E")`` first."""
    return [(1, "E2E")] + [(K, c) for K in Ks for c in contexts]


# ---------------------------------------------------------------------------- child process
def smallest_input(model, sizes: Sequence[int]) -> int:
    """The smallest ``s`` in ``sizes`` for which ``model`` (eval mode, no grad) maps one
    (1, 3, s, s) image to logits. Raises: ValueError listing the sizes tried."""
    import torch

    was_training = model.training
    model.eval()
    errors = []
    try:
        for s in sorted(sizes):
            try:
                with torch.no_grad():
                    out = model(torch.randn(1, 3, s, s))
                if isinstance(out, torch.Tensor) and out.dim() == 2:
                    return s
                errors.append(f"{s}: returns {type(out).__name__}")
            except Exception as exc:  # the model rejects this size: try the next
                if _is_oom(exc):
                    raise
                errors.append(f"{s}: {type(exc).__name__}")
    finally:
        model.train(was_training)
    raise ValueError(f"the model accepts none of the input sizes {sorted(sizes)} ({'; '.join(errors[-2:])})")


def _is_oom(exc: BaseException) -> bool:
    return isinstance(exc, MemoryError) or "can't allocate memory" in str(exc) or "out of memory" in str(exc)


def _short(exc: BaseException, limit: int = 300) -> str:
    text = " ".join(str(exc).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _emit(row: Dict[str, object]) -> None:
    print(ROW_TAG + json.dumps(row), flush=True)


def _run_config(model, K: int, context: str, size: int, batch: int, warmup: int) -> Dict[str, object]:
    """One configuration of one model in this process: wrap, train a step, evaluate, export."""
    import torch

    from contsup_fast import LocalSequential
    from contsup_fast.memory import measure_step

    torch.manual_seed(0)
    x, y = torch.randn(batch, 3, size, size), torch.randint(0, 10, (batch,))
    row: Dict[str, object] = {}
    try:
        local = LocalSequential(model, K=K, context="R0" if K == 1 else context, input_size=(3, size, size))
    except ValueError as exc:  # an allocation failure while tracing the example input is not a refusal
        return {"status": "oom" if _is_oom(exc) else "refused", "reason": _short(exc)}
    row["split"] = local.split_source if K > 1 else "-"
    row["cuts"] = list(local.cut_points)
    row["cut_shapes"] = [list(m.out_shape) for m in local.local_modules[:-1]]
    row["local_params"] = sum(p.numel() for p in local.parameters())
    for _ in range(warmup):
        local(x, y)
    mem = measure_step(local, x, y)
    row.update(saved_peak_MiB=mem.saved_peak / 2**20, true_peak_MiB=mem.true_peak / 2**20,
               true_source=mem.true_source)
    for p in local.parameters():
        p.grad = None
    local.eval()
    with torch.no_grad():
        logits = local(x)
        exported = local.to_module()(x)
    ok_eval = tuple(logits.shape) == (batch, 10) and bool(torch.isfinite(logits).all())
    row["to_module_max_abs_diff"] = float((exported - logits).abs().max())
    if not ok_eval:
        row.update(status="mismatch", reason=f"eval logits of shape {tuple(logits.shape)}, finite={ok_eval}")
    elif not torch.allclose(exported, logits, rtol=1e-4, atol=1e-5):
        row.update(status="mismatch", reason=f"to_module() differs from eval by {row['to_module_max_abs_diff']:.3g}")
    else:
        row["status"] = "ok"
    del local
    return row


def child(name: str, Ks: Sequence[int], contexts: Sequence[str], batch: int, sizes: Sequence[int],
          warmup: int, threads: int) -> None:
    """Run every configuration of ``name`` here, printing one ``ZOO-ROW {json}`` line each."""
    import warnings

    import torch

    from contsup_fast.models import build_model

    torch.set_num_threads(threads)
    warnings.simplefilter("ignore")  # torchvision init warnings, googlenet's aux_logits note
    base = {"model": name}
    t0 = time.perf_counter()
    try:
        torch.manual_seed(0)
        model = build_model(name, num_classes=10)
        base["params"] = sum(p.numel() for p in model.parameters())
        base["input"] = smallest_input(model, sizes)
    except Exception as exc:
        _emit({**base, "K": 1, "context": "E2E", "status": "oom" if _is_oom(exc) else "error",
               "reason": f"{type(exc).__name__}: {_short(exc)}", "seconds": time.perf_counter() - t0})
        return
    for K, context in configs(Ks, contexts):
        t1 = time.perf_counter()
        try:
            row = _run_config(model, K, context, base["input"], batch, warmup)
        except Exception as exc:
            row = {"status": "oom" if _is_oom(exc) else "error", "reason": f"{type(exc).__name__}: {_short(exc)}"}
        for p in model.parameters():
            p.grad = None
        gc.collect()
        _emit({**base, "K": K, "context": context, "batch": batch, **row, "seconds": time.perf_counter() - t1})


# ---------------------------------------------------------------------------- parent process
def _limit_memory(gib: float):
    def set_limit():
        cap = int(gib * 2**30)
        resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
    return set_limit


def run_isolated(name: str, args: argparse.Namespace) -> List[Dict[str, object]]:
    """Run :func:`child` for ``name`` in a subprocess under the memory cap and the timeout;
    return its rows, with a row for every configuration it did not report (timeout, crash)."""
    cmd = [sys.executable, "-m", "bench.zoo", "--child", name, "--K", *map(str, args.K),
           "--contexts", *args.contexts, "--batch", str(args.batch), "--sizes", *map(str, args.sizes),
           "--warmup", str(args.warmup), "--threads", str(args.threads)]
    root = str(Path(__file__).resolve().parent.parent)
    env = dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=root, env=env,
                            preexec_fn=_limit_memory(args.memory_gib), start_new_session=True)
    try:
        out, err = proc.communicate(timeout=args.timeout)
        failure = None if proc.returncode == 0 else (
            "crashed", f"exit code {proc.returncode}: {_short(err.strip().splitlines()[-1] if err.strip() else '', 200)}")
        if proc.returncode and proc.returncode < 0:
            failure = ("crashed", f"killed by signal {-proc.returncode} (memory cap {args.memory_gib:g} GiB)")
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)
        out, err = proc.communicate()
        failure = ("timeout", f"no result within {args.timeout:g} s")
    rows = [json.loads(line[len(ROW_TAG):]) for line in out.splitlines() if line.startswith(ROW_TAG)]
    built = not rows or "input" in rows[0]  # else: its one row says why it was not built
    done = {(r["K"], r["context"]) for r in rows}
    missing = [c for c in configs(args.K, args.contexts) if c not in done] if built else []
    known = {k: rows[0][k] for k in ("params", "input") if rows and k in rows[0]}
    for i, (K, context) in enumerate(missing):
        status, reason = failure or ("crashed", "its process reported no row")
        if i:
            status, reason = "not run", f"its process ended before ({missing[0][1]} at K={missing[0][0]}: {status})"
        rows.append({"model": name, "K": K, "context": context, "status": status, "reason": reason, **known})
    for r in rows:
        r.setdefault("seconds", None)
    rows[0]["model_seconds"] = time.perf_counter() - t0
    _add_ratios(rows)
    flag_channels_last(rows)
    return rows


def _has_layout_support() -> bool:
    """Whether this contsup_fast records each cut's layout (NCHW, NHWC, tokens: issue 22)."""
    import importlib.util

    return importlib.util.find_spec("contsup_fast.layouts") is not None


def flag_channels_last(rows: List[Dict[str, object]]) -> None:
    """Without layout support, mark ``ok`` rows whose cut tensors look (N, H, W, C) as
    ``wrong layout``: features of shape (H, W, C) with H == W != C at a square input are read
    as (C, H, W) by such a version (Swin: context terms and heads sized by a spatial extent)."""
    if _has_layout_support():
        return
    for r in rows:
        looks = [s for s in r.get("cut_shapes") or [] if len(s) == 3 and s[0] == s[1] != s[2]]
        if r.get("status") == "ok" and looks:
            r["status"] = "wrong layout"
            r["reason"] = (f"a cut tensor has shape (N, {', '.join(map(str, looks[0]))}), channels last "
                           f"(N, H, W, C), which this version reads as (N, C, H, W)")


def _add_ratios(rows: List[Dict[str, object]]) -> None:
    e2e = next((r for r in rows if r["K"] == 1 and r.get("status") == "ok"), None)
    for r in rows:
        for key, ratio in (("saved_peak_MiB", "saved_ratio"), ("true_peak_MiB", "true_ratio")):
            if e2e and r.get(key) is not None and e2e[key]:
                r[ratio] = r[key] / e2e[key]


def _fmt_ratio(r: Optional[Dict[str, object]]) -> str:
    if r is None:
        return "-"
    if r.get("status") != "ok":
        return str(r.get("status"))
    if "saved_ratio" not in r:
        return f"{r['saved_peak_MiB']:.3g} / {r['true_peak_MiB']:.3g} MiB"
    return f"{r['saved_ratio']:.0%} / {r['true_ratio']:.0%}"


def markdown(rows: List[Dict[str, object]], settings: Dict[str, object], machine: str) -> str:
    """The zoo table: one line per model (E2E peaks, then saved / true peak of every
    configuration as a share of E2E's), then the reason of every row that is not ``ok``."""
    cfgs = configs(settings["K"], settings["contexts"])[1:]
    by_model: Dict[str, Dict[tuple, Dict[str, object]]] = {}
    for r in rows:
        by_model.setdefault(r["model"], {})[(r["K"], r["context"])] = r
    head = (["model", "input", "params (M)", "wraps", "E2E saved / true MiB"]
            + [f"K={K} {c}" for K, c in cfgs])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    notes = []
    for name, cells in by_model.items():
        first = next(iter(cells.values()))
        e2e = cells.get((1, "E2E"))
        local = [cells.get(c) for c in cfgs]
        statuses = sorted({c["status"] for c in local if c}, key=STATUSES.index) or ["-"]
        wraps = "yes" if statuses == ["ok"] else ("no" if "ok" not in statuses else "partly")
        e2e_cell = (f"{e2e['saved_peak_MiB']:.3g} / {e2e['true_peak_MiB']:.3g}" if e2e and e2e["status"] == "ok"
                    else (e2e or {}).get("status", "-"))
        params = f"{first['params'] / 1e6:.1f}" if first.get("params") else "-"
        size = f"{first['input']}x{first['input']}" if first.get("input") else "-"
        lines.append("| " + " | ".join([name, size, params, wraps, e2e_cell] + [_fmt_ratio(c) for c in local]) + " |")
        reasons: Dict[str, List[str]] = {}
        for (K, c), r in cells.items():
            if r["status"] != "ok":
                reasons.setdefault(f"{r['status']}: {r.get('reason', '')}", []).append("E2E" if K == 1 else f"K={K} {c}")
        for reason, where in reasons.items():
            notes.append(f"- **{name}** ({', '.join(where)}) {reason}")
    text = [f"Machine: {machine}. Command: `{settings['command']}`. Batch {settings['batch']}, "
            f"{settings['warmup']} warm-up step(s), memory cap {settings['memory_gib']:g} GiB and "
            f"timeout {settings['timeout']:g} s per model process.", "",
            "Cells: saved peak / true peak of one training step as a share of E2E's (same model, "
            "input and batch); E2E in MiB. Saved: live saved-for-backward bytes; true: every CPU "
            "tensor allocation of the step (torch.profiler allocator events), weights and input left out.",
            "", *lines]
    if notes:
        text += ["", "Rows that are not `ok`:", "", *notes]
    not_run = [m for m in settings["models"] if m not in by_model]
    if not_run:
        text += ["", f"Not run (the sweep was stopped before them): {', '.join(not_run)}."]
    return "\n".join(text) + "\n"


def _write(tag: str, payload: Dict[str, object], out_dir: Optional[Path]) -> None:
    """``zoo_<tag>.json`` (bench/results schema; ``machine`` and ``replaced_from`` extra keys)
    and ``zoo_<tag>.md``."""
    from .common import write_results

    extra = {k: v for k, v in payload.items() if k not in ("schema", "benchmark", "environment", "settings", "rows")}
    write_results(f"zoo_{tag}", "zoo", payload["environment"], payload["settings"], payload["rows"], out_dir,
                  **extra)
    md = (out_dir or Path(__file__).resolve().parent / "results") / f"zoo_{tag}.md"
    md.write_text(markdown(payload["rows"], payload["settings"], payload["machine"]))


def render(paths: Sequence[str], tag: Optional[str], out_dir: Optional[str]) -> List[Dict[str, object]]:
    """``--render``: the rows of ``paths[0]``, those of each later JSON replacing the rows of
    the same models (its settings noted in ``replaced_from``), flagged with
    :func:`flag_channels_last`, written as ``zoo_<tag>`` (default: the first file's name)."""
    from .common import load_results

    payload = load_results(paths[0])
    rows = payload["rows"]
    for extra in paths[1:]:
        other = load_results(extra)
        names = {r["model"] for r in other["rows"]}
        rows = [r for r in rows if r["model"] not in names] + other["rows"]
        payload.setdefault("replaced_from", []).append(
            {"file": Path(extra).name, "models": sorted(names), "settings": other["settings"],
             "environment": other["environment"]})
    flag_channels_last(rows)
    payload["rows"] = rows
    _write(tag or Path(paths[0]).stem[len("zoo_"):], payload, Path(out_dir) if out_dir else None)
    return rows


def main(argv: Optional[List[str]] = None) -> List[Dict[str, object]]:
    """``python -m bench.zoo`` (see module docstring). Returns every row."""
    p = argparse.ArgumentParser(description="LocalSequential over the torchvision (and timm) model zoo")
    p.add_argument("--models", nargs="+", default=None,
                   help="model names (torchvision, timm:<name>); default: every torchvision "
                        "classification model and the timm list TIMM_MODELS")
    p.add_argument("--K", nargs="+", type=int, default=[2, 4])
    p.add_argument("--contexts", nargs="+", default=["R0", "R1E"])
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--sizes", nargs="+", type=int, default=list(SIZES),
                   help="square input sizes tried, the smallest accepted is used")
    p.add_argument("--warmup", type=int, default=1, help="unmeasured training steps before the measured one")
    p.add_argument("--memory-gib", type=float, default=10.0,
                   help="address-space cap (RLIMIT_AS) of each model's process, GiB")
    p.add_argument("--timeout", type=float, default=900.0, help="wall-clock limit of each model's process, s")
    p.add_argument("--threads", type=int, default=2, help="torch threads in each model's process")
    p.add_argument("--tag", default=None, help="results name: bench/results/zoo_<tag>.json/.md")
    p.add_argument("--out-dir", default=None, help="folder of the results (default bench/results)")
    p.add_argument("--render", nargs="+", default=None, metavar="JSON",
                   help="measure nothing: rewrite the table of a zoo JSON; rows of later JSONs replace "
                        "those of the same models (keeps the first JSON's settings)")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        child(args.child, args.K, args.contexts, args.batch, args.sizes, args.warmup, args.threads)
        return []
    if args.render:
        return render(args.render, args.tag, args.out_dir)
    import torch

    from .common import environment

    models = args.models or zoo_models()
    tag = args.tag or ("cpu" if args.models is None else "cpu_subset")
    env = environment(torch.device("cpu"))
    machine = f"{os.cpu_count()}-core {env['cpu']} CPU, no GPU"
    settings = {**{k: v for k, v in vars(args).items() if k != "child"}, "models": models,
                "command": "python -m bench.zoo " + " ".join(argv if argv is not None else sys.argv[1:])}
    out_dir = Path(args.out_dir) if args.out_dir else None
    rows: List[Dict[str, object]] = []
    for i, name in enumerate(models):
        got = run_isolated(name, args)
        rows += got
        first = got[0]
        print(f"[{i + 1}/{len(models)}] {name}: " + ", ".join(
            f"{'E2E' if r['K'] == 1 else 'K=%d %s' % (r['K'], r['context'])} {r['status']}" for r in got)
            + f" ({first['model_seconds']:.0f} s)", flush=True)
        _write(tag, {"environment": env, "machine": machine, "settings": settings, "rows": rows}, out_dir)
    return rows


if __name__ == "__main__":
    main()
