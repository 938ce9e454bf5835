"""The fused backends against the torch backend: ``python -m bench.parity --against-torch``.

    python -m bench.parity --against-torch --device cuda --dtypes fp32 bf16   # on a GPU
    python -m bench.parity --against-torch --device cpu --dtypes fp32 --only 'resnet32 K=4 R1E'

No authors' code is involved: for each configuration of :data:`CONFIGS` (or those ``--only``
names, regular expressions) and each fused backend available on ``--device`` (or
``--backends``), three copies of one :class:`~contsup_fast.LocalSequential` (same state dict)
run one training step on the same batch: on the fused backend and on the ``torch`` backend in
the dtype under test (fp32 with TF32 off, so both sides do full fp32 dots; or bf16 under
``torch.autocast``, as training does), and on the ``torch`` backend in float64, the exact
result. Compared per category with :func:`bench.parity.core.compare_records` (the largest
relative error over its tensors, each tensor's scale floored at 1e-6 of its category's largest
magnitude): the local losses, every module's input and output, the logits, every parameter's
gradient, the running statistics after the step, and the eval-mode logits.

Both low-precision runs are compared with the float64 one, and a row is ``MATCH`` when, in
every category, the fused backend's error is at most :data:`FACTOR` times the torch backend's
plus :data:`SLACK` of its dtype: the fused ops may round differently, not worse. (Comparing
the two low-precision runs with each other says little in bf16: at batch 4 on the CPU, the
gradient of a body BatchNorm's bias differs between two correct backends by 48% of its largest
value, measured.) A wrong kernel gives errors of order 1.

JSON: ``bench/results/parity_backends_<device>.json`` (schema ``contsup_fast.bench/1``).
"""
from __future__ import annotations

import contextlib
import re
import time
from typing import Dict, List, Optional, Sequence

import torch

from .core import compare_records, named_grads, record_ours_step

#: (name, model, K, context, auxiliary head): every context kind, both head shapes, the
#: paper's K=16 boundaries and ResNet-110
CONFIGS = [("resnet32 K=16 R1E", "resnet32", 16, "R1E", "1c2f"),
           ("resnet32 K=4 R1E", "resnet32", 4, "R1E", "1c2f"),
           ("resnet32 K=4 E", "resnet32", 4, "E", "2c2f"),
           ("resnet32 K=4 R2", "resnet32", 4, "R2", "0c2f"),
           ("resnet32 K=16 R0", "resnet32", 16, "R0", "1c1f"),
           ("resnet110 K=16 R1E", "resnet110", 16, "R1E", "1c2f")]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
#: MATCH: in every category, error(fused) <= FACTOR * error(torch) + SLACK[dtype] (both against
#: float64)
FACTOR = 4.0
SLACK = {"fp32": 1e-4, "bf16": 1e-2}
COLUMNS = ["config", "backend", "dtype", "batch", "verdict", "worst", "worst_rel", "worst_torch_rel",
           "grads_rel", "grads_torch_rel", "logits_rel", "logits_torch_rel", "seconds"]


@contextlib.contextmanager
def _full_fp32():
    """TF32 off (the kernels and cuDNN follow these flags)."""
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


def _record(local, x, y, dtype: str) -> Dict[str, Dict[str, torch.Tensor]]:
    amp = (torch.autocast(x.device.type, dtype=DTYPES[dtype]) if dtype != "fp32"
           else contextlib.nullcontext())
    with amp:
        rec = record_ours_step(local, x, y)
    rec.update(named_grads(local, lambda n: n))
    rec["running_stats"] = {n: b.detach().clone() for n, b in local.named_buffers()
                            if n.endswith(("running_mean", "running_var"))}
    local.eval()
    with amp, torch.no_grad():
        rec["eval_logits"] = {"logits": local(x)}
    return rec


def run_pair(config: str, backend: str, dtype: str, device: torch.device, batch: int,
             seed: int = 0) -> dict:
    """One row: ``config`` (a name of :data:`CONFIGS`) on ``backend`` and on the torch backend
    in ``dtype``, each against the torch backend in float64."""
    from contsup_fast import LocalSequential
    from contsup_fast.models import build_model

    _, model, K, context, aux = next(c for c in CONFIGS if c[0] == config)
    t0 = time.perf_counter()
    torch.manual_seed(seed)
    kw = dict(K=K, context=context, aux=aux)
    ref = LocalSequential(build_model(model), backend="torch", **kw).to(device)
    ours = LocalSequential(build_model(model), backend=backend, **kw).to(device)
    exact = LocalSequential(build_model(model), backend="torch", **kw).to(device, torch.float64)
    ours.load_state_dict(ref.state_dict())
    exact.load_state_dict(ref.state_dict())
    gen = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(batch, 3, 32, 32, generator=gen).to(device)
    y = torch.randint(0, 10, (batch,), generator=gen).to(device)
    with _full_fp32() if dtype == "fp32" else contextlib.nullcontext():
        rec_ref, rec_ours = _record(ref, x, y, dtype), _record(ours, x, y, dtype)
    rec_exact = _record(exact, x.double(), y, "fp32")
    used = ours.backend_for(x.device).name
    if used != backend:
        raise RuntimeError(f"LocalSequential(backend={backend!r}) ran the {used!r} backend")
    cmp_ours, cmp_torch = compare_records(rec_ours, rec_exact), compare_records(rec_ref, rec_exact)
    excess = {k: v["rel"] - FACTOR * cmp_torch[k]["rel"] for k, v in cmp_ours.items()}
    worst = max(excess, key=excess.get)
    ok = all(e <= SLACK[dtype] for e in excess.values())
    return {"config": config, "model": model, "K": K, "context": context, "aux": aux, "backend": backend,
            "dtype": dtype, "batch": batch, "device": str(device), "verdict": "MATCH" if ok else "DIFFER",
            "worst": f"{worst}:{cmp_ours[worst]['worst']}", "worst_rel": cmp_ours[worst]["rel"],
            "worst_torch_rel": cmp_torch[worst]["rel"],
            **{f"{k}_rel": v["rel"] for k, v in cmp_ours.items()},
            **{f"{k}_torch_rel": v["rel"] for k, v in cmp_torch.items()},
            "comparison": cmp_ours, "comparison_torch": cmp_torch, "seconds": time.perf_counter() - t0}


def run(device: torch.device, dtypes: Sequence[str], backends: Optional[Sequence[str]] = None,
        only: Optional[Sequence[str]] = None, batch: int = 16, log=print) -> List[dict]:
    """Every selected (configuration, backend, dtype); a configuration that raises is an
    ``ERROR`` row with the exception."""
    from contsup_fast.fused import available_backends

    avail = [b for b in available_backends(device) if b != "torch"]
    backends = list(backends) if backends else avail
    for b in backends:
        if b not in avail:
            raise SystemExit(f"bench.parity: fused backend {b!r} is not available on {device} "
                             f"(available: {avail or 'none'})")
    if not backends:
        raise SystemExit(f"bench.parity: no fused backend is available on {device}")
    names = [c[0] for c in CONFIGS if not only or any(re.fullmatch(o, c[0]) or o == c[0] for o in only)]
    if not names:
        raise SystemExit(f"bench.parity: --only {list(only)} selects none of {[c[0] for c in CONFIGS]}")
    rows = []
    for name in names:
        for b in backends:
            for dt in dtypes:
                try:
                    row = run_pair(name, b, dt, device, batch)
                except Exception as exc:  # a configuration that cannot run is a result too
                    row = {"config": name, "backend": b, "dtype": dt, "batch": batch, "device": str(device),
                           "verdict": "ERROR", "error": f"{type(exc).__name__}: {exc}"}
                rows.append(row)
                log(row)
    return rows
