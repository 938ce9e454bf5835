"""The parity machinery shared by every reference: the name map, BatchNorm randomisation,
the record of one training step, and the comparison.

A *name map* is a dict ``reference state name -> our state name`` (parameters and buffers),
built explicitly per reference from the structure both codebases document (never by matching
shapes). :func:`copy_by_map` copies through it and reports what has no counterpart on either
side and what has a different shape. :func:`randomize_bn` gives every BatchNorm random affine
parameters and running statistics first, so that two BatchNorms of one shape swapped by a
wrong map give different numbers (freshly built ones are all 1 / 0 and would hide the swap).

A *record* is ``{category: {name: tensor}}`` (categories: ``losses``, ``inputs``,
``outputs``, ``logits``, ``grads``, ``running_stats``, ``eval_logits``, ``params``,
``updates``). :func:`compare_records` gives, per category, the largest relative error over
its tensors, ``max|ours - ref| / max(max|ref|, max|ours|, 1e-6 x the largest |ref| in the
category)`` (see :data:`CATEGORY_FLOOR`), and the name of the worst tensor. A configuration MATCHes when every category is at most
:data:`TOLERANCE` (float64).
"""
from __future__ import annotations

import contextlib
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, Iterable, Iterator, List, Mapping, Optional, Tuple

import torch
from torch import Tensor, nn

__all__ = ["TOLERANCE", "MapReport", "rel_err", "copy_by_map", "randomize_bn", "compare_records",
           "verdict", "record_ours_step", "sgd", "labels_with_positives", "STEP_CATEGORIES", "train_py_lines",
           "recording_backward"]

#: relative error at or below which a float64 quantity counts as matching.
TOLERANCE = 1e-9

#: the categories of one training step, then the parameter comparison after the SGD steps.
STEP_CATEGORIES = ("losses", "inputs", "outputs", "logits", "grads", "grads_zero", "running_stats",
                   "eval_logits", "params", "updates")

#: gradients that are zero in exact arithmetic: the bias of a convolution that a training-mode
#: BatchNorm follows (the BatchNorm subtracts the batch mean). Both sides hold rounding noise
#: there; they are compared in their own category, ``grads_zero``, relative to the largest
#: gradient of the model (see :func:`compare_records`).
ZERO_GRAD = re.compile(r"(context\.image\.conv[12]|context\.residual\.\d+\.conv|decoder\.net\.0)\.bias$")


def rel_err(ours: Tensor, ref: Tensor, floor: float = 0.0) -> float:
    """``max|ours - ref| / max(max|ref|, max|ours|, floor)`` in float64; 0 when the two are
    equal, ``inf`` for different shapes or a non-finite difference."""
    if tuple(ours.shape) != tuple(ref.shape):
        return float("inf")
    a, b = ours.detach().to(torch.float64).cpu(), ref.detach().to(torch.float64).cpu()
    if a.numel() == 0:
        return 0.0
    diff = (a - b).abs().max().item()
    if diff != diff or diff == float("inf"):
        return float("inf")
    scale = max(a.abs().max().item(), b.abs().max().item(), floor)
    return 0.0 if diff == 0 else diff / scale


#: a tensor's scale is floored at this fraction of the largest magnitude in its category, so
#: that a quantity that is zero in exact arithmetic (the gradient of a convolution bias that a
#: training-mode BatchNorm follows) compares as rounding noise, not as a 100% error.
CATEGORY_FLOOR = 1e-6


@dataclass
class MapReport:
    """What :func:`copy_by_map` found.

    Attributes:
        copied: reference names copied.
        ref_unmapped: reference tensors with no counterpart (the map has no entry for them).
        ref_missing_target: reference tensors whose mapped name is not one of ours.
        ours_unfilled: our tensors that no reference tensor was copied into.
        shape_mismatch: ``(ref name, our name, ref shape, our shape)``.
        ref_only_used: reference parameters with no counterpart that received a nonzero
            gradient in the step (filled in after the step; nonempty means a real difference).
    """

    copied: List[str] = field(default_factory=list)
    ref_unmapped: List[str] = field(default_factory=list)
    ref_missing_target: List[Tuple[str, str]] = field(default_factory=list)
    ours_unfilled: List[str] = field(default_factory=list)
    shape_mismatch: List[Tuple[str, str, tuple, tuple]] = field(default_factory=list)
    ref_only_used: List[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """No tensor of ours left unfilled, no bad target, no shape mismatch, no used orphan."""
        return not (self.ref_missing_target or self.ours_unfilled or self.shape_mismatch or self.ref_only_used)

    def summary(self) -> Dict[str, object]:
        return {"copied": len(self.copied), "ref_unmapped": self.ref_unmapped,
                "ref_missing_target": [list(p) for p in self.ref_missing_target],
                "ours_unfilled": self.ours_unfilled,
                "shape_mismatch": [[a, b, list(s), list(t)] for a, b, s, t in self.shape_mismatch],
                "ref_only_used": self.ref_only_used}


def copy_by_map(ref: nn.Module, ours: nn.Module, name_map: Mapping[str, Optional[str]]) -> MapReport:
    """Copy every reference parameter and buffer into ours through ``name_map``.

    ``name_map[ref_name]`` is our state name, or None for a reference tensor with no
    counterpart (for instance a head the reference builds but never uses); a reference name
    absent from the map also counts as having no counterpart. Nothing is copied into a tensor
    of another shape. Returns the :class:`MapReport`.
    """
    rep = MapReport()
    ref_state = ref.state_dict(keep_vars=True)
    our_state = ours.state_dict(keep_vars=True)
    filled = set()
    with torch.no_grad():
        for rname, rt in ref_state.items():
            oname = name_map.get(rname)
            if oname is None:
                rep.ref_unmapped.append(rname)
                continue
            if oname not in our_state:
                rep.ref_missing_target.append((rname, oname))
                continue
            ot = our_state[oname]
            if tuple(ot.shape) != tuple(rt.shape):
                rep.shape_mismatch.append((rname, oname, tuple(rt.shape), tuple(ot.shape)))
                continue
            ot.copy_(rt.detach().to(ot.dtype))
            filled.add(oname)
            rep.copied.append(rname)
    rep.ours_unfilled = [n for n in our_state if n not in filled]
    return rep


def randomize_bn(module: nn.Module, generator: torch.Generator) -> int:
    """Give every BatchNorm in ``module`` random state: weight in U(0.5, 1.5), bias and
    running mean in N(0, 0.2), running variance in U(0.5, 1.5), ``num_batches_tracked`` a
    random count. Returns how many BatchNorms were changed."""
    n = 0
    with torch.no_grad():
        for m in module.modules():
            if not isinstance(m, nn.modules.batchnorm._BatchNorm):
                continue
            c = m.num_features
            if m.weight is not None:
                m.weight.copy_(0.5 + torch.rand(c, generator=generator, dtype=torch.float64))
                m.bias.copy_(0.2 * torch.randn(c, generator=generator, dtype=torch.float64))
            if m.running_mean is not None:
                m.running_mean.copy_(0.2 * torch.randn(c, generator=generator, dtype=torch.float64))
                m.running_var.copy_(0.5 + torch.rand(c, generator=generator, dtype=torch.float64))
                m.num_batches_tracked.fill_(int(torch.randint(1, 1000, (1,), generator=generator)))
            n += 1
    return n


def _scale(tensors: Mapping[str, Tensor]) -> float:
    return max((t.detach().abs().max().item() for t in tensors.values() if t.numel()), default=0.0)


def compare_records(ours: Mapping[str, Mapping[str, Tensor]], ref: Mapping[str, Mapping[str, Tensor]],
                    floor_from: Optional[Mapping[str, str]] = None) -> Dict[str, Dict[str, object]]:
    """Per category present in ``ref``: ``{"rel": largest relative error, "worst": name,
    "n": tensors compared, "missing": names ref has and ours lacks}``; a missing tensor counts
    as an infinite error. A tensor's scale is floored at :data:`CATEGORY_FLOOR` times the
    largest magnitude in its category, or, for a category ``c`` in ``floor_from`` (default
    ``{"grads_zero": "grads"}``), at the largest magnitude in category ``floor_from[c]``."""
    floor_from = {"grads_zero": "grads"} if floor_from is None else floor_from
    out: Dict[str, Dict[str, object]] = {}
    for cat, ref_t in ref.items():
        ours_t = ours.get(cat, {})
        worst, worst_name, missing = 0.0, None, []
        if cat in floor_from:
            floor = _scale(ref.get(floor_from[cat], {}))
        else:
            floor = CATEGORY_FLOOR * _scale(ref_t)
        for name, rt in ref_t.items():
            if name not in ours_t:
                missing.append(name)
                worst, worst_name = float("inf"), name
                continue
            e = rel_err(ours_t[name], rt, floor)
            if worst_name is None or e > worst:
                worst, worst_name = e, name
        out[cat] = {"rel": worst, "worst": worst_name, "n": len(ref_t), "missing": missing}
    return out


def verdict(comparison: Mapping[str, Mapping[str, object]], report: Optional[MapReport] = None,
            tol: float = TOLERANCE) -> str:
    """``"MATCH"`` when every category is within ``tol`` and the map report is clean, else
    ``"DIFFER"``."""
    ok = all(c["rel"] <= tol for c in comparison.values())
    return "MATCH" if ok and (report is None or report.ok) else "DIFFER"


def labels_with_positives(n: int, classes: int, generator: torch.Generator) -> Tensor:
    """(n,) int64 labels where every class present appears at least twice (n >= 2): the
    supervised contrastive losses then agree whatever they do with an anchor that has no
    positive (see docs/fidelity.md)."""
    if n < 2:
        raise ValueError(f"n must be >= 2 so every label has a positive, got {n}")
    base = (torch.arange(n) // 2) % classes
    if n % 2:
        base[-1] = base[-2]
    return base[torch.randperm(n, generator=generator)]


def sgd(params: Iterable[Tensor], lr: float) -> torch.optim.Optimizer:
    """The ContSup reference's optimiser (its ``train.py``): SGD, momentum 0.9, Nesterov,
    weight decay 1e-4."""
    return torch.optim.SGD(params, lr=lr, momentum=0.9, nesterov=True, weight_decay=1e-4)


def record_ours_step(local: nn.Module, x: Tensor, y: Tensor) -> Dict[str, Dict[str, Tensor]]:
    """One training call ``local(x, y)`` of a :class:`~contsup_fast.LocalSequential` (gradients
    accumulate into ``.grad``): per module j its local loss, its body's input ``a_j`` and output
    ``h_j`` (module K-1's output is the logits), and the logits."""
    inputs: Dict[str, Tensor] = {}
    outputs: Dict[str, Tensor] = {}
    handles = []
    for m in local.local_modules:
        def hook(mod, args, out, j=m.index):
            inputs[f"a{j}"] = args[0].detach().clone()
            outputs[f"h{j}"] = out.detach().clone()
        handles.append(m.body.register_forward_hook(hook))
    try:
        res = local(x, y)
    finally:
        for h in handles:
            h.remove()
    losses = {f"loss{j}": l for j, l in enumerate(res.local_losses.unbind(0))}
    return {"losses": losses, "inputs": inputs, "outputs": outputs, "logits": {"logits": res.logits}}


def named_grads(module: nn.Module, names: Callable[[str], Optional[str]]) -> Dict[str, Dict[str, Tensor]]:
    """``{"grads": {key: grad}, "grads_zero": {key: grad}}`` for the parameters of ``module``
    whose key ``names(name)`` is not None (a parameter without a gradient gives zeros); keys
    matching :data:`ZERO_GRAD` go to ``grads_zero``."""
    out: Dict[str, Dict[str, Tensor]] = {"grads": {}, "grads_zero": {}}
    for n, p in module.named_parameters():
        k = names(n)
        if k is not None:
            g = p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p)
            out["grads_zero" if ZERO_GRAD.search(k) else "grads"][k] = g
    return out


def train_py_lines(path) -> Iterator[Dict[str, object]]:
    """The arguments of every ``python train.py`` line of a reference's shell script ``path``
    (comment lines skipped): ``{name: value}`` without the leading ``--``, a flag with no value
    (``store_true``) giving True."""
    for line in Path(path).read_text().splitlines():
        if "train.py" not in line or line.lstrip().startswith("#"):
            continue
        toks = shlex.split(line)
        yield {t[2:]: (toks[i + 1] if i + 1 < len(toks) and not toks[i + 1].startswith("--") else True)
               for i, t in enumerate(toks) if t.startswith("--")}


@contextlib.contextmanager
def recording_backward(losses: List[Tensor]):
    """While active, every ``Tensor.backward`` call also appends a detached copy of its tensor
    to ``losses`` (the references back-propagate their local losses inside ``forward`` and
    return none of them)."""
    original = torch.Tensor.backward

    def backward(self, *a, **k):
        losses.append(self.detach().clone())
        return original(self, *a, **k)

    torch.Tensor.backward = backward
    try:
        yield losses
    finally:
        torch.Tensor.backward = original
