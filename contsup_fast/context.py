"""Context supply at a boundary (ContSup, arXiv 2312.07636, Sec. 3.2, Eq. 6-8 and Fig. 3).

At boundary j (between local modules j and j+1) the input of module j+1 is

    a_{j+1} = h_j.detach() + sum of context terms,

where ``h_j`` is module j's output, ``x = a_0`` the normalised image and ``a_i`` the
(context-augmented, detached) input of module i. Modes:

* ``R0``: no context (plain greedy local learning);
* ``E``: ``ImageEncoder_j(x)``;
* ``Rn`` (n >= 1): ``sum_{r<n} ResidualEncoder_{j,r}(a_{j-r})`` over the ``a`` that exist;
* ``RnE``: ``E`` plus the ``Rn`` terms without ``a_0`` (the image only goes through E).

The encoders belong to module j+1 and are trained by its local loss.

Context gate (an option of this library, not of the paper; see :data:`GATES`): every term
``T`` may be scaled, ``a_{j+1} = h_j.detach() + sum_t g_t * T_t``. ``g = 1`` is the paper's
form. Since every term ends in BN -> ReLU and ``g * relu(bn(z)) = relu(bn_{g*gamma, g*beta}(z))``
for ``g >= 0``, the scale is applied by passing ``g * gamma`` and ``g * beta`` to the boundary
ops: every backend (eager, Triton, C++/CUDA) supports it, and autograd gives ``g`` and
``gamma, beta`` their exact gradients, with no kernel change.

Context mean (an option of this library, not of the paper; see :data:`MEANS`): a boundary may
take the *mean* of ``h`` and its terms instead of their sum,
``a_{j+1} = (h_j.detach() + sum_t g_t T_t) / (1 + n_terms)``. Every term and ``h`` are
post-ReLU maps of BN-normalised values, so the sum of ``1 + n_terms`` of them is about
``1 + n_terms`` times the scale a module input has without context, and the identity paths
of the blocks carry that scale to the model's classifier (measured at initialisation, ResNet-32
K=16 R1E on a batch of 128 training images, ``bench.spike``: the classifier's input RMS is
4.00 against 1.41 for R0). That is the cause of the
last module's first-epoch loss spike: the classifier's effective learning rate grows with the
square of its input's scale. ``mean="last"`` averages at the boundary feeding the last module
only, so the classifier reads R0's scale (1.43) and every other module is the paper's form;
it is :class:`~contsup_fast.LocalSequential`'s default, chosen by the ``cpu`` accuracy A/B
(``bench.accuracy``: 62.44% against 61.83% for the paper's form, two seeds, README "Accuracy").
The mean is the per-term scale ``c = 1 / (1 + n_terms)`` folded into the BN affine like a gate
(``c * g`` with one), plus ``c * h``: every backend supports it.
"""
from __future__ import annotations

import contextlib
import re
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from .fused.chunked import image_context_chunked
from .fused.reference import update_running_stats

__all__ = ["ContextSpec", "parse_context", "ImageEncoder", "ResidualEncoder", "ContextTerms", "BoundaryContext",
           "GATES", "MEANS", "check_gate", "check_mean", "recomputed_term"]

#: context gates: None (the paper's form, g = 1), "ramp" (g = min(1, t / T) over the first T
#: training steps, no parameters), "learned" (one learnable scalar per term, g = |theta|,
#: theta initialised at ``gate_init``)
GATES = (None, "ramp", "learned")

#: context means: None (the paper's form, a sum at every boundary), "last" (LocalSequential's
#: default: the boundary feeding the last local module takes the mean of h and its terms),
#: "all" (every boundary does)
MEANS = (None, "last", "all")


def check_mean(mean) -> None:
    """Validate ``context_mean`` of :class:`~contsup_fast.LocalSequential`.

    Raises:
        ValueError: ``mean`` not in :data:`MEANS`.
    """
    if mean not in MEANS:
        raise ValueError(f"context_mean must be one of {MEANS} (None: the paper's sum at every "
                         f"boundary), got {mean!r}")


def check_gate(gate, gate_steps, gate_init) -> None:
    """Validate the context-gate options of :class:`~contsup_fast.LocalSequential`.

    Raises:
        ValueError: ``gate`` not in :data:`GATES`; ``gate="ramp"`` without an integer
            ``gate_steps >= 1``; ``gate="learned"`` with a ``gate_init`` that is not a
            positive finite number (|theta| has no gradient at 0).
    """
    if gate not in GATES:
        raise ValueError(f"context_gate must be one of {GATES}, got {gate!r}")
    if gate == "ramp" and (not isinstance(gate_steps, int) or isinstance(gate_steps, bool) or gate_steps < 1):
        raise ValueError(f"context_gate='ramp' needs context_gate_steps, an integer >= 1 (the "
                         f"training steps over which the gate rises from 0 to 1), got {gate_steps!r}")
    if gate == "learned":
        try:
            ok = float(gate_init) > 0 and float(gate_init) != float("inf")
        except (TypeError, ValueError):
            ok = False
        if not ok:
            raise ValueError(f"context_gate_init must be a positive finite number (the initial "
                             f"learned gate), got {gate_init!r}")


@dataclass(frozen=True)
class ContextSpec:
    """A parsed context mode: ``n`` residual sources and whether the image encoder E is used."""

    n: int
    image: bool

    @property
    def name(self) -> str:
        if self.n == 0 and not self.image:
            return "R0"
        return (f"R{self.n}" if self.n else "") + ("E" if self.image else "")

    def sources(self, j: int) -> List[int]:
        """Indices ``i`` of the module inputs ``a_i`` feeding boundary ``j`` (most recent first)."""
        first = 1 if self.image else 0
        return [j - r for r in range(self.n) if j - r >= first]


_MODE = re.compile(r"^(?:R(\d+|n))?(E)?$")


def parse_context(context: str, n: Optional[int] = None) -> ContextSpec:
    """Parse ``"R0"``, ``"E"``, ``"R1"``, ``"R4"``, ``"RnE"``, ``"R2E"``, ``"Rn"``...

    ``"Rn"`` and ``"RnE"`` take ``n`` from the keyword (default 1); a mode with a number uses
    that number, and a conflicting ``n`` keyword is an error.

    Raises:
        ValueError: unknown mode, ``n < 1``, or ``n`` conflicting with the mode.
    """
    if not isinstance(context, str):
        raise ValueError(f"context must be a string such as 'R0', 'E', 'R1', 'R1E' or 'RnE', got {context!r}")
    m = _MODE.match(context)
    if not m or context == "":
        raise ValueError(f"unknown context mode {context!r}: allowed are 'R0', 'E', 'Rn'/'RnE' "
                         f"(with n=...), or 'R<k>'/'R<k>E' for an integer k >= 1, e.g. 'R1', 'R2E'")
    if n is not None and (not isinstance(n, int) or isinstance(n, bool) or n < 1):
        raise ValueError(f"n must be an integer >= 1, got {n!r}")
    digits, image = m.group(1), bool(m.group(2))
    if digits is None:
        return ContextSpec(0, image)
    if digits == "n":
        return ContextSpec(1 if n is None else n, image)
    k = int(digits)
    if k == 0 and image:
        raise ValueError("context mode 'R0E' is not a mode: use 'E' for the image encoder alone")
    if n is not None and n != k:
        raise ValueError(f"context={context!r} fixes n={k}, but n={n} was also given")
    return ContextSpec(k, image)


def _pool(z: Tensor, size: Sequence[int]) -> Tensor:
    return F.adaptive_avg_pool2d(z, tuple(size))


class ImageEncoder(nn.Module):
    """E: Conv3x3(3->12, bias) -> BN -> ReLU -> Conv3x3(12->C, bias) -> BN -> ReLU -> avgpool to (H, W).

    Input ``x`` (N, 3, H_img, W_img), output (N, C, H, W) where (H, W) is the target size.
    """

    def __init__(self, in_channels: int, out_channels: int, hidden: int = 12):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, hidden, 3, padding=1, bias=True)
        self.bn1 = nn.BatchNorm2d(hidden)
        self.conv2 = nn.Conv2d(hidden, out_channels, 3, padding=1, bias=True)
        self.bn2 = nn.BatchNorm2d(out_channels)

    def forward(self, x: Tensor, size: Sequence[int]) -> Tensor:
        """The eager encoder (reference): materialises the (N, C, H_img, W_img) second convolution."""
        z = self.conv2(F.relu(self.bn1(self.conv1(x))))
        return _pool(F.relu(self.bn2(z)), size)

    def add_to(self, h: Tensor, x: Tensor, image_context: Callable,
               bn_weight: Optional[Tensor] = None, bn_bias: Optional[Tensor] = None) -> Tensor:
        """``h + self(x, h.shape[-2:])`` through a fused image-context op, without the
        full-resolution output of the second convolution.

        The first convolution, its BatchNorm and ReLU run eagerly (12 channels at the image
        resolution: ``u``); ``image_context`` (a backend's op with the signature of
        :func:`~contsup_fast.fused.reference.image_context_ref`) does conv2 -> BN -> ReLU ->
        pool -> add, and its batch statistics are folded into ``bn2``'s running buffers exactly
        as ``nn.BatchNorm2d`` does. Training and eval.

        In training with autograd recording, neither the first convolution's output nor ``u`` is kept for
        the backward (:class:`_RecomputedHidden`): both are recomputed from the image when the
        backward needs them, so this term keeps only the image (alive anyway) and per-channel
        statistics between forward and backward.

        Args:
            h: (N, C, H, W), with H_img = s*H and W_img = s*W for an integer s.
            x: (N, C_img, H_img, W_img) the normalised image.
            image_context: the op.
            bn_weight, bn_bias: (C,) affine parameters of ``bn2`` to use instead of its own
                (a caller may pass scaled ones); default ``bn2.weight``/``bn2.bias``.
        """
        bn = self.bn2
        # in training (not under tracing, where tensors have no storage to compare)
        checkpointed = self.training and torch.is_grad_enabled() and not torch.compiler.is_compiling()
        recompute = _RecomputedHidden(self, x) if checkpointed else contextlib.nullcontext()
        with recompute:
            t1 = self.conv1(x)
            u = F.relu(self.bn1(t1))
            out, mean, var = image_context(
                h, u, self.conv2.weight, self.conv2.bias, bn.weight if bn_weight is None else bn_weight,
                bn.bias if bn_bias is None else bn_bias, bn.running_mean, bn.running_var, bn.training, bn.eps)
        if isinstance(recompute, _RecomputedHidden):
            recompute.drop(t1=t1, u=u)
        update_running_stats(bn, mean, var, u.shape[0] * u.shape[2] * u.shape[3])
        return out


class _RecomputedHidden(torch.autograd.graph.saved_tensors_hooks):
    """Saved-tensor hooks for E's first half: what autograd saves of the first convolution's
    output ``t1`` and of the hidden map ``u = relu(bn1(t1))`` is replaced, after the forward,
    by a recipe, and recomputed from the image ``x`` (under the forward's autocast state) when
    the backward unpacks it. Activation checkpointing of two (N, 12, H_img, W_img) tensors; the
    recompute repeats the forward's own computation (batch statistics in training, running
    statistics in eval), so the backward sees the same values.
    """

    def __init__(self, enc: "ImageEncoder", x: Tensor):
        self.enc, self.x = enc, x
        dev = x.device.type
        self.autocast = (dev, torch.is_autocast_enabled(dev), torch.get_autocast_dtype(dev))
        self.training = enc.bn1.training
        self.holders: List[list] = []
        super().__init__(self._pack, self._unpack)

    def _pack(self, t: Tensor) -> list:
        holder = [t, None]  # [tensor, or None and the name of the recipe]
        self.holders.append(holder)
        return holder

    def _unpack(self, holder: list) -> Tensor:
        t, kind = holder
        return t if kind is None else self._recompute(kind)

    def drop(self, **tensors: Tensor) -> None:
        """Replace the saved copies of ``tensors`` (same storage, shape, strides and offset) by recipes."""
        def key(t):
            return (t.untyped_storage().data_ptr(), t.shape, t.stride(), t.storage_offset())
        recipes = {key(t): name for name, t in tensors.items()}
        for holder in self.holders:
            name = recipes.get(key(holder[0])) if holder[1] is None else None
            if name is not None:
                holder[0], holder[1] = None, name
        self.holders = []

    def _recompute(self, kind: str) -> Tensor:
        enc, (dev, enabled, dtype) = self.enc, self.autocast
        with torch.no_grad(), torch.autocast(dev, dtype=dtype, enabled=enabled):
            t1 = enc.conv1(self.x)
            if kind == "t1":
                return t1
            bn = enc.bn1
            mean, var = (None, None) if self.training else (bn.running_mean, bn.running_var)
            return F.relu(F.batch_norm(t1, mean, var, bn.weight, bn.bias, self.training, 0.0, bn.eps))


class ResidualEncoder(nn.Module):
    """R term: Conv1x1(C_src->C, bias) -> BN -> ReLU -> avgpool to (H, W).

    ``source`` is the index i of the module input ``a_i`` it reads.
    """

    def __init__(self, in_channels: int, out_channels: int, source: int):
        super().__init__()
        self.source = source
        self.conv = nn.Conv2d(in_channels, out_channels, 1, bias=True)
        self.bn = nn.BatchNorm2d(out_channels)

    def forward(self, a: Tensor, size: Sequence[int]) -> Tensor:
        return _pool(F.relu(self.bn(self.conv(a))), size)

    def extra_repr(self) -> str:
        return f"source=a_{self.source}"


def _integer_scale(src: Tensor, dst: Tensor) -> bool:
    (hs, ws), (hd, wd) = src.shape[-2:], dst.shape[-2:]
    return hs % hd == 0 and ws % wd == 0 and hs // hd == ws // wd


@contextlib.contextmanager
def _running_stats_frozen(enc: nn.Module):
    """Within the block, ``enc``'s BatchNorms update copies of their running buffers (and of
    ``num_batches_tracked``), thrown away at its end: the originals are left unchanged, and
    the BatchNorms save the same tensors for the backward as they do outside it."""
    names = ("running_mean", "running_var", "num_batches_tracked")
    kept = []
    for m in enc.modules():
        if isinstance(m, nn.BatchNorm2d) and m.track_running_stats:
            kept.append((m, [getattr(m, n) for n in names]))
            for n in names:
                setattr(m, n, getattr(m, n).clone())
    try:
        yield
    finally:
        for m, bufs in kept:
            for n, b in zip(names, bufs):
                setattr(m, n, b)


def recomputed_term(enc: nn.Module, src: Tensor, size: Sequence[int]) -> Tensor:
    """``enc(src, size)`` for a context term that no fused op covers (the source is not an
    integer multiple of the target size, e.g. AlexNet's 64x64 image to a 7x7 boundary),
    keeping only ``src`` for the backward.

    The eager encoders run at the source's resolution before pooling: E's second convolution
    makes (N, C, H_img, W_img) maps, an R term's 1x1 convolution (N, C, H_src, W_src), and
    autograd would keep several such maps until module j+1's backward, more than the whole
    network keeps end to end at a large target width and stride. Here the term runs under
    non-reentrant activation checkpointing (:func:`torch.utils.checkpoint.checkpoint`): its
    intermediate maps are recomputed from ``src`` in the backward. The recompute normalises
    with the same batch statistics but does not update the BatchNorms' running buffers a
    second time (:func:`_running_stats_frozen`), so values, gradients and running statistics
    equal the plain call's. Outside training with autograd recording, under tracing, or with
    a BatchNorm of another class (``SyncBatchNorm``, whose recompute would communicate in the
    backward), it is the plain call.

    Args:
        enc: an :class:`ImageEncoder` or :class:`ResidualEncoder`.
        src: (N, C_src, H_src, W_src) the image or the earlier module input it reads.
        size: the target (H, W).

    Returns:
        (N, C, H, W), as ``enc(src, size)``.
    """
    plain = all(type(m) is nn.BatchNorm2d for m in enc.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm))
    if not (enc.training and torch.is_grad_enabled() and plain) or torch.compiler.is_compiling():
        return enc(src, size)
    calls = []

    def run(s: Tensor) -> Tensor:
        calls.append(None)
        if len(calls) == 1:
            return enc(s, size)
        with _running_stats_frozen(enc):  # the backward's recompute
            return enc(s, size)

    return checkpoint(run, src, use_reentrant=False)


class ContextTerms(nn.Module):
    """What every boundary's context shares, whatever the layout: the encoders (``image``, E
    or None; ``residual``, the R terms, each with a ``source`` index), the context gate and
    the context mean (see the module docstring). Subclasses build the encoders, then call
    :meth:`_init_gating`, and implement ``forward(h, inputs, x, backend)`` and
    ``_forward_eager(h, inputs, x)``: :class:`BoundaryContext` for (N, C, H, W) maps,
    :class:`~contsup_fast.tokens.TokenContext` for tokens and (N, H, W, C) maps."""

    image: Optional[nn.Module]
    residual: nn.ModuleList

    def _init_gating(self, gate: Optional[str], gate_init: float, mean: bool) -> None:
        if gate not in GATES:
            raise ValueError(f"gate must be one of {GATES}, got {gate!r}")
        self.gate_mode = gate
        if gate == "ramp":  # g in [0, 1], set by LocalSequential from its step count
            self.register_buffer("ramp", torch.ones(()), persistent=False)
        # one learnable scalar per term, E first then the R terms in order
        self.gate = nn.Parameter(torch.full((self.n_terms,), float(gate_init))) if gate == "learned" else None
        self.mean = bool(mean)

    @property
    def n_terms(self) -> int:
        return (self.image is not None) + len(self.residual)

    def h_scale(self) -> Optional[float]:
        """The scale of ``h``: None for a sum (1), ``1 / (1 + n_terms)`` for a mean."""
        return 1.0 / (1 + self.n_terms) if self.mean else None

    def scales(self) -> List[Optional[Tensor]]:
        """The scale of each term (E first, then R terms): None for the paper's form (g = 1),
        else a 0-dim tensor or float ``>= 0`` (the gate ``g``, times ``1 / (1 + n_terms)`` for
        a mean)."""
        n_terms = self.n_terms
        if self.gate_mode == "learned":
            g = self.gate.abs()
            gs = [g[t] for t in range(n_terms)]
        elif self.gate_mode == "ramp":
            gs = [self.ramp] * n_terms
        else:
            gs = [None] * n_terms
        c = self.h_scale()
        if c is None:
            return gs
        return [c if g is None else g * c for g in gs]

    @property
    def sources(self) -> List[int]:
        return [enc.source for enc in self.residual]

    def describe(self) -> str:
        terms = (["E(x)"] if self.image is not None else []) + [
            f"R(a_{i})" if i else "R(x)" for i in self.sources]
        if self.gate_mode is not None:
            terms = [f"g*{t}" for t in terms]
        if not terms:
            return "none"
        if self.mean:
            return f"(h + {' + '.join(terms)})/{1 + len(terms)}"
        return " + ".join(terms)


class BoundaryContext(ContextTerms):
    """The context terms added at one boundary, owned by the local module they feed.

    Args:
        target_channels: C of the module output ``h`` the terms are added to.
        image_channels: channels of the image ``x`` (E), or None without E.
        residual: ``(source index i, channels of a_i)`` for every R term.

    ``forward(h, inputs, x, backend)`` takes ``h`` (N, C, H, W, detached), ``inputs`` a dict
    ``i -> a_i`` of stored module inputs (detached) and the image ``x``; it returns
    ``h + terms`` (or with ``mean=True`` their mean, ``(h + terms) / (1 + n_terms)``) with
    gradients to the encoders only.
    """

    def __init__(self, target_channels: int, image_channels: Optional[int],
                 residual: Sequence[Tuple[int, int]], gate: Optional[str] = None,
                 gate_init: float = 0.1, mean: bool = False):
        super().__init__()
        if gate not in GATES:
            raise ValueError(f"gate must be one of {GATES}, got {gate!r}")
        self.image = ImageEncoder(image_channels, target_channels) if image_channels else None
        self.residual = nn.ModuleList(ResidualEncoder(c, target_channels, i) for i, c in residual)
        self._init_gating(gate, gate_init, mean)

    def forward(self, h: Tensor, inputs: Dict[int, Tensor], x: Tensor, backend) -> Tensor:
        if backend.name == "torch":
            return self._forward_eager(h, inputs, x)
        scales = self.scales()
        g_image, g_res = (scales[0], scales[1:]) if self.image is not None else (None, scales)
        out = _scaled(h, self.h_scale())
        fused = [(e, g) for e, g in zip(self.residual, g_res) if _integer_scale(inputs[e.source], h)]
        for enc, g in zip(self.residual, g_res):
            if not _integer_scale(inputs[enc.source], h):
                out = out + _scaled(recomputed_term(enc, inputs[enc.source], h.shape[-2:]), g)
        if fused:
            cs = [inputs[e.source] for e, _ in fused]
            bns = [e.bn for e, _ in fused]
            affine = [_scaled_affine(e.bn, g) for e, g in fused]
            out, means, vars_ = backend.residual_context(
                out, cs, [e.conv.weight for e, _ in fused], [e.conv.bias for e, _ in fused],
                [w for w, _ in affine], [b for _, b in affine], [b.running_mean for b in bns],
                [b.running_var for b in bns], self.training, bns[0].eps)
            for bn, c, mean, var in zip(bns, cs, means, vars_):
                update_running_stats(bn, mean, var, c.shape[0] * c.shape[2] * c.shape[3])
        if self.image is not None:
            out = self._image_term(out, x, backend.image_context, g_image)
        return out

    def _forward_eager(self, h: Tensor, inputs: Dict[int, Tensor], x: Tensor) -> Tensor:
        size = h.shape[-2:]
        scales = self.scales()
        g_image, g_res = (scales[0], scales[1:]) if self.image is not None else (None, scales)
        out = _scaled(h, self.h_scale())
        if self.image is not None:
            out = self._image_term(out, x, image_context_chunked, g_image)
        for enc, g in zip(self.residual, g_res):
            src = inputs[enc.source]
            term = enc(src, size) if _integer_scale(src, h) else recomputed_term(enc, src, size)
            out = out + _scaled(term, g)
        return out

    def _image_term(self, out: Tensor, x: Tensor, image_context: Callable, g=None) -> Tensor:
        """``out + g * E(x)``: the fused op when the image is an integer multiple s of the target
        size (never materialising E's full-resolution second convolution), else the eager encoder.
        A BatchNorm converted to another class (``SyncBatchNorm`` under ``LocalDDP(sync_bn=True)``)
        also takes the eager encoder, since the op computes per-process batch statistics."""
        if _integer_scale(x, out) and type(self.image.bn2) is nn.BatchNorm2d:
            gamma, beta = _scaled_affine(self.image.bn2, g)
            return self.image.add_to(out, x, image_context, gamma, beta)
        return out + _scaled(recomputed_term(self.image, x, out.shape[-2:]), g)


def _scaled(term: Tensor, g) -> Tensor:
    """``g * term`` (the paper's form when ``g`` is None)."""
    return term if g is None else term * g


def _scaled_affine(bn: nn.BatchNorm2d, g) -> Tuple[Tensor, Tensor]:
    """BatchNorm affine parameters that apply the gate inside BN -> ReLU (valid for g >= 0)."""
    if g is None:
        return bn.weight, bn.bias
    return bn.weight * g, bn.bias * g
