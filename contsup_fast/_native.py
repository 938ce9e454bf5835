"""``backend="native"``: the compiled C++/CUDA boundary ops (``contsup_fast._C``).

Importing this module loads the extension, which registers the operators
``torch.ops.contsup.*`` (schemas, CPU kernels and -- when compiled with a CUDA toolkit --
CUDA kernels; sources in ``csrc/``). This module then registers, for every operator, a
fake (meta) implementation (``torch.library.register_fake``: shape/dtype propagation for
``torch.compile`` / ``opcheck``) and, for the five forward operators, an autograd formula
(``torch.library.register_autograd``) that calls the matching ``*_backward`` operator.

The public functions have exactly the signatures and return values of
:mod:`contsup_fast.fused.reference` (the specification) and are *functional*: they never
touch BatchNorm running statistics. In training mode they return the fp32 (fp64 for fp64
inputs) batch mean and biased batch variance; in eval mode they return the running
buffers that were passed in. Fold the training statistics into the buffers with
:func:`contsup_fast.fused.reference.update_running_stats`.

What the autograd formulas save (ContSup Sec. 3; BatchNorm, Ioffe & Szegedy 2015):

* ``residual_context``: the contexts ``c_r`` (kept alive by the caller anyway), the
  conv/BN parameters, the per-term BN statistics (R, C) and the context moments
  ``[m_c, S]`` (C_r + C_r^2 per term). The 1x1-conv output ``y`` is never stored: the
  backward recomputes ``y = W c + b`` and the ReLU mask in one pass over ``c`` and
  ``grad_out`` and gets the parameter gradients in closed form.
* ``image_context_tail`` / ``bn_relu_gap``: ``z``, ``bn_weight``, ``bn_bias`` and the
  statistics (mean, var) -- no normalised or activated copy of ``z``.
* ``global_avg_pool``: only the input's size and memory format.
* ``image_context`` (E's second convolution fused with its BN, ReLU, pooling and the add):
  ``u``, the conv/BN parameters, the (C,) statistics and the K + K^2 patch moments
  (K = 9*C_in). The (N, C, s*H, s*W) convolution output is never stored or even allocated:
  the forward and both backward passes recompute it per row band (CPU) or tile (CUDA).

``h`` receives ``grad_out`` unchanged (identity, as in the reference); the contexts
``c_r`` are treated as detached and receive no gradient.

Dtypes: activations (``h``, ``c_r``, ``z``) fp32/fp64/fp16/bf16; contexts and ``z`` are
cast to ``h``'s dtype when they differ; parameters and running statistics may have any
float dtype (e.g. fp32 parameters with bf16 activations under autocast); parameter
gradients come back in each parameter's dtype. Any memory format (contiguous,
channels_last, strided views); outputs follow the layout of ``h`` (or ``z``).
"""
from __future__ import annotations

import warnings
from typing import List, Optional, Sequence, Tuple

import torch
from torch import Tensor

__all__ = [
    "name",
    "is_available",
    "supports_device",
    "residual_context",
    "image_context_tail",
    "image_context_tail_backward",
    "bn_relu_gap",
    "bn_relu_gap_backward",
    "global_avg_pool",
    "image_context",
    "image_context_backward",
]

name = "native"

try:
    from . import _C as _ext  # registers torch.ops.contsup.*

    _ops = torch.ops.contsup
    _LOAD_ERROR: Optional[str] = None
except Exception as exc:  # ImportError (not built), OSError (ABI mismatch), ...
    _ext = None
    _ops = None
    _LOAD_ERROR = (
        f"the compiled extension contsup_fast._C could not be loaded ({type(exc).__name__}: {exc}); "
        "build it with `pip install --no-build-isolation -e .` (needs a C++ compiler; "
        "CUDA kernels additionally need a CUDA toolkit), or use backend='torch'/'triton'"
    )

_warned = False


def _warn_unavailable() -> None:
    global _warned
    if not _warned:
        _warned = True
        warnings.warn(f"contsup_fast native backend unavailable: {_LOAD_ERROR}", RuntimeWarning, stacklevel=3)


def is_available() -> Tuple[bool, str]:
    """``(True, description)`` if the extension is loaded, else ``(False, reason)``.

    The first call that finds the extension missing emits one ``RuntimeWarning``.
    """
    if _ext is None:
        _warn_unavailable()
        return False, _LOAD_ERROR
    kernels = "CPU and CUDA kernels" if getattr(_ext, "with_cuda", 0) else "CPU kernels only"
    return True, f"contsup_fast._C loaded ({kernels})"


def supports_device(device) -> bool:
    """CPU whenever the extension is loaded; CUDA if it was built with CUDA kernels and a
    GPU is visible."""
    if _ext is None:
        return False
    device = torch.device(device)
    if device.type == "cpu":
        return True
    if device.type == "cuda":
        return bool(getattr(_ext, "with_cuda", 0)) and torch.cuda.is_available()
    return False


def _require() -> None:
    if _ext is None:
        _warn_unavailable()
        raise RuntimeError(f"contsup_fast native backend unavailable: {_LOAD_ERROR}")


def _acc_dtype(t: Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


# ------------------------------------------------------------------------------------
# fake (meta) kernels and autograd formulas
# ------------------------------------------------------------------------------------
def _register() -> None:
    lib = "contsup::"

    # -- residual_context ------------------------------------------------------------
    @torch.library.register_fake(lib + "residual_context")
    def _(h, contexts, weights, biases, bn_weights, bn_biases, running_means, running_vars, training, eps):
        acc = _acc_dtype(h)
        R, C = len(contexts), h.shape[1]
        size = sum(c.shape[1] + c.shape[1] * c.shape[1] for c in contexts)
        return (
            torch.empty_like(h),
            h.new_empty((R, C), dtype=acc),
            h.new_empty((R, C), dtype=acc),
            h.new_empty((size,), dtype=acc),
        )

    @torch.library.register_fake(lib + "residual_context_backward")
    def _(grad_out, contexts, weights, biases, bn_weights, bn_biases, means, vars, ctx_moments, training, eps):
        return (
            [w.new_empty(w.shape) for w in weights],
            [b.new_empty(b.shape) for b in biases],
            [g.new_empty(g.shape) for g in bn_weights],
            [b.new_empty(b.shape) for b in bn_biases],
        )

    def rc_setup(ctx, inputs, output):
        h, contexts, weights, biases, bn_weights, bn_biases, _rm, _rv, training, eps = inputs
        _out, means, vars_, moments = output
        ctx.mark_non_differentiable(means, vars_, moments)
        ctx.R = len(contexts)
        ctx.training = training
        ctx.eps = eps
        ctx.save_for_backward(means, vars_, moments, *contexts, *weights, *biases, *bn_weights, *bn_biases)

    def rc_backward(ctx, grad_out, _gm, _gv, _gmom):
        R = ctx.R
        saved = ctx.saved_tensors
        means, vars_, moments = saved[:3]
        rest = saved[3:]
        contexts, weights, biases, bn_weights, bn_biases = (list(rest[i * R:(i + 1) * R]) for i in range(5))
        needs = ctx.needs_input_grad
        none = [None] * R
        grad_h = grad_out if needs[0] else None
        if any(any(n) for n in needs[2:6]):
            dW, db, dg, dbeta = _ops.residual_context_backward(
                grad_out, contexts, weights, biases, bn_weights, bn_biases, means, vars_, moments,
                ctx.training, ctx.eps)
        else:
            dW = db = dg = dbeta = none
        return grad_h, none, dW, db, dg, dbeta, none, none, None, None

    torch.library.register_autograd(lib + "residual_context", rc_backward, setup_context=rc_setup)

    # -- image_context_tail / bn_relu_gap ----------------------------------------------
    @torch.library.register_fake(lib + "image_context_tail")
    def _(h, z, bn_weight, bn_bias, running_mean, running_var, training, eps):
        C = z.shape[1]
        acc = _acc_dtype(z)
        return torch.empty_like(h), z.new_empty((C,), dtype=acc), z.new_empty((C,), dtype=acc)

    @torch.library.register_fake(lib + "bn_relu_gap")
    def _(z, bn_weight, bn_bias, running_mean, running_var, training, eps):
        N, C = z.shape[0], z.shape[1]
        acc = _acc_dtype(z)
        return z.new_empty((N, C)), z.new_empty((C,), dtype=acc), z.new_empty((C,), dtype=acc)

    def bn_bwd_fake(grad, z, bn_weight, bn_bias, mean, var, training, eps):
        return torch.empty_like(z), bn_weight.new_empty(bn_weight.shape), bn_bias.new_empty(bn_bias.shape)

    torch.library.register_fake(lib + "image_context_tail_backward", bn_bwd_fake)
    torch.library.register_fake(lib + "bn_relu_gap_backward", bn_bwd_fake)

    # saves what the fused BN/ReLU backward ops need (stats outputs are non-differentiable)
    def bn_setup(ctx, output, z, bn_weight, bn_bias, training, eps):
        _out, mean, var = output
        ctx.mark_non_differentiable(mean, var)
        ctx.training, ctx.eps = training, eps
        ctx.save_for_backward(z, bn_weight, bn_bias, mean, var)

    def ict_setup(ctx, inputs, output):
        _h, z, bn_weight, bn_bias, _rm, _rv, training, eps = inputs
        bn_setup(ctx, output, z, bn_weight, bn_bias, training, eps)

    def ict_backward(ctx, grad_out, _gm, _gv):
        z, g, b, mean, var = ctx.saved_tensors
        needs = ctx.needs_input_grad
        grad_h = grad_out if needs[0] else None
        dz = dg = db = None
        if any(needs[1:4]):
            dz, dg, db = _ops.image_context_tail_backward(grad_out, z, g, b, mean, var, ctx.training, ctx.eps)
        return grad_h, dz, dg, db, None, None, None, None

    torch.library.register_autograd(lib + "image_context_tail", ict_backward, setup_context=ict_setup)

    def gap_setup(ctx, inputs, output):
        z, bn_weight, bn_bias, _rm, _rv, training, eps = inputs
        bn_setup(ctx, output, z, bn_weight, bn_bias, training, eps)

    def gap_backward(ctx, grad_pooled, _gm, _gv):
        z, g, b, mean, var = ctx.saved_tensors
        dz = dg = db = None
        if any(ctx.needs_input_grad[0:3]):
            dz, dg, db = _ops.bn_relu_gap_backward(grad_pooled, z, g, b, mean, var, ctx.training, ctx.eps)
        return dz, dg, db, None, None, None, None

    torch.library.register_autograd(lib + "bn_relu_gap", gap_backward, setup_context=gap_setup)

    # -- image_context ---------------------------------------------------------------
    @torch.library.register_fake(lib + "image_context")
    def _(h, u, weight, bias, bn_weight, bn_bias, running_mean, running_var, training, eps):
        C, K = h.shape[1], 9 * u.shape[1]
        acc = _acc_dtype(h)
        return (torch.empty_like(h), h.new_empty((C,), dtype=acc), h.new_empty((C,), dtype=acc),
                h.new_empty((K + K * K,), dtype=acc))

    @torch.library.register_fake(lib + "image_context_backward")
    def _(grad_out, u, weight, bias, bn_weight, bn_bias, mean, var, patch_moments, training, eps):
        return (torch.empty_like(u), weight.new_empty(weight.shape), bias.new_empty(bias.shape),
                bn_weight.new_empty(bn_weight.shape), bn_bias.new_empty(bn_bias.shape))

    def ic_setup(ctx, inputs, output):
        _h, u, weight, bias, bn_weight, bn_bias, _rm, _rv, training, eps = inputs
        _out, mean, var, moments = output
        ctx.mark_non_differentiable(mean, var, moments)
        ctx.training, ctx.eps = training, eps
        ctx.save_for_backward(u, weight, bias, bn_weight, bn_bias, mean, var, moments)

    def ic_backward(ctx, grad_out, _gm, _gv, _gmom):
        u, weight, bias, g, b, mean, var, moments = ctx.saved_tensors
        needs = ctx.needs_input_grad
        grad_h = grad_out if needs[0] else None
        du = dw = db = dg = dbeta = None
        if any(needs[1:6]):
            du, dw, db, dg, dbeta = _ops.image_context_backward(
                grad_out, u, weight, bias, g, b, mean, var, moments, ctx.training, ctx.eps)
        return grad_h, du, dw, db, dg, dbeta, None, None, None, None

    torch.library.register_autograd(lib + "image_context", ic_backward, setup_context=ic_setup)

    # -- global_avg_pool -------------------------------------------------------------
    @torch.library.register_fake(lib + "global_avg_pool")
    def _(h):
        return h.new_empty((h.shape[0], h.shape[1]))

    @torch.library.register_fake(lib + "global_avg_pool_backward")
    def _(grad_pooled, input_size, channels_last):
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        return torch.empty(list(input_size), dtype=grad_pooled.dtype, device=grad_pooled.device, memory_format=fmt)

    def avg_setup(ctx, inputs, output):
        (h,) = inputs
        ctx.input_size = list(h.shape)
        ctx.channels_last = _is_channels_last(h)

    def avg_backward(ctx, grad_pooled):
        return _ops.global_avg_pool_backward(grad_pooled, ctx.input_size, ctx.channels_last)

    torch.library.register_autograd(lib + "global_avg_pool", avg_backward, setup_context=avg_setup)


def _is_channels_last(t: Tensor) -> bool:
    return t.dim() == 4 and not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last)


if _ext is not None and not getattr(_ext, "_py_registered", False):
    _register()
    _ext._py_registered = True  # survives importlib.reload of this module


# ------------------------------------------------------------------------------------
# reference-compatible wrappers
# ------------------------------------------------------------------------------------
def _as_list(x, what: str) -> list:
    if isinstance(x, Tensor):
        raise TypeError(f"{what} must be a sequence of tensors (one per context term), got a Tensor")
    return list(x)


def residual_context(
    h: Tensor,
    contexts: Sequence[Tensor],
    weights: Sequence[Tensor],
    biases: Sequence[Optional[Tensor]],
    bn_weights: Sequence[Optional[Tensor]],
    bn_biases: Sequence[Optional[Tensor]],
    running_means: Sequence[Optional[Tensor]],
    running_vars: Sequence[Optional[Tensor]],
    training: bool,
    eps: float = 1e-5,
) -> Tuple[Tensor, List[Tensor], List[Tensor]]:
    """``out = h + sum_r avgpool(relu(bn_r(conv1x1_r(c_r))))`` -- see
    :func:`contsup_fast.fused.reference.residual_context_ref` for arguments and returns.

    Gradients flow to ``weights``, ``biases``, ``bn_weights``, ``bn_biases`` (and
    ``grad_out`` passes through to ``h``); ``contexts`` are detached. ``None`` conv biases
    or BN affine parameters are treated as zeros/ones; running statistics may be ``None``
    in training mode.

    Raises:
        RuntimeError: the extension is unavailable, or a shape/dtype/device check of the
            operator fails (the message names the argument).
        ValueError: running statistics are missing in eval mode.
    """
    _require()
    contexts = _as_list(contexts, "contexts")
    weights = _as_list(weights, "weights")
    biases = _as_list(biases, "biases")
    bn_weights = _as_list(bn_weights, "bn_weights")
    bn_biases = _as_list(bn_biases, "bn_biases")
    running_means = _as_list(running_means, "running_means")
    running_vars = _as_list(running_vars, "running_vars")
    if not contexts:
        return h, [], []
    C = h.shape[1]
    like = weights[0] if weights else h
    cs = [c.detach() if c.dtype == h.dtype else c.detach().to(h.dtype) for c in contexts]
    bs = [b if b is not None else like.new_zeros(C) for b in biases]
    gs = [g if g is not None else like.new_ones(C) for g in bn_weights]
    betas = [b if b is not None else like.new_zeros(C) for b in bn_biases]
    if not training and any(t is None for t in running_means + running_vars):
        raise ValueError("residual_context: running_means/running_vars are required when training=False")
    rms = [m if m is not None else like.new_zeros(C) for m in running_means]
    rvs = [v if v is not None else like.new_ones(C) for v in running_vars]
    out, means, vars_, _moments = _ops.residual_context(
        h, cs, weights, bs, gs, betas, rms, rvs, bool(training), float(eps))
    return (out, *_returned_stats(training, list(means.unbind(0)), list(vars_.unbind(0)),
                                  list(running_means), list(running_vars)))


def _returned_stats(training, batch_mean, batch_var, running_mean, running_var):
    """The statistics every op here returns: in training the batch statistics it computed, in
    eval the running buffers it was given (as ``nn.BatchNorm2d`` uses them)."""
    return (batch_mean, batch_var) if training else (running_mean, running_var)


def _bn_params(bn_weight, bn_bias, running_mean, running_var, training, C, like, fn):
    g = bn_weight if bn_weight is not None else like.new_ones(C)
    b = bn_bias if bn_bias is not None else like.new_zeros(C)
    if running_mean is None or running_var is None:
        if not training:
            raise ValueError(f"{fn}: running_mean/running_var are required when training=False")
        running_mean = like.new_zeros(C) if running_mean is None else running_mean
        running_var = like.new_ones(C) if running_var is None else running_var
    return g, b, running_mean, running_var


def _bn_fused(op, lead, z, bn_weight, bn_bias, running_mean, running_var, training, eps, fn):
    """Runs ``op(*lead, z, g, b, rm, rv, training, eps)`` with defaulted BN params; returns
    (result, batch mean, batch var) in training, else (result, running_mean, running_var)."""
    C = z.shape[1] if isinstance(z, Tensor) and z.dim() > 1 else 0
    like = bn_weight if bn_weight is not None else z
    g, b, rm, rv = _bn_params(bn_weight, bn_bias, running_mean, running_var, training, C, like, fn)
    res, mean, var = op(*lead, z, g, b, rm, rv, bool(training), float(eps))
    return (res, *_returned_stats(training, mean, var, running_mean, running_var))


def image_context_tail(
    h: Tensor,
    z: Tensor,
    bn_weight: Optional[Tensor],
    bn_bias: Optional[Tensor],
    running_mean: Optional[Tensor],
    running_var: Optional[Tensor],
    training: bool,
    eps: float = 1e-5,
) -> Tuple[Tensor, Tensor, Tensor]:
    """``out = h + avgpool(relu(bn(z)))`` -- see
    :func:`contsup_fast.fused.reference.image_context_tail_ref`. Gradients flow to ``z``,
    ``bn_weight``, ``bn_bias`` (and identity to ``h``). ``z`` is cast to ``h``'s dtype."""
    _require()
    if isinstance(z, Tensor) and isinstance(h, Tensor) and z.dtype != h.dtype:
        z = z.to(h.dtype)
    return _bn_fused(_ops.image_context_tail, (h,), z, bn_weight, bn_bias, running_mean, running_var,
                     training, eps, "image_context_tail")


def image_context_tail_backward(
    grad_out: Tensor,
    z: Tensor,
    bn_weight: Tensor,
    bn_bias: Tensor,
    mean: Tensor,
    var: Tensor,
    training: bool,
    eps: float = 1e-5,
) -> Tuple[Tensor, Tensor, Tensor]:
    """Gradients ``(grad_z, grad_bn_weight, grad_bn_bias)`` of :func:`image_context_tail`.

    ``grad_out`` (N, C, H, W) is the gradient of ``out``; ``mean``/``var`` are the
    statistics the forward used (its returned batch statistics in training, the running
    buffers in eval). ``grad_z`` has ``z``'s shape, dtype and memory format; the parameter
    gradients have the parameters' dtypes. Lets a caller recompute ``z`` (e.g. the image
    encoder's convolutions) in its own backward instead of keeping it alive.
    """
    _require()
    return _ops.image_context_tail_backward(grad_out, z, bn_weight, bn_bias, mean, var, bool(training),
                                            float(eps))


def bn_relu_gap(
    z: Tensor,
    bn_weight: Optional[Tensor],
    bn_bias: Optional[Tensor],
    running_mean: Optional[Tensor],
    running_var: Optional[Tensor],
    training: bool,
    eps: float = 1e-5,
) -> Tuple[Tensor, Tensor, Tensor]:
    """``pooled = mean_{H,W} relu(bn(z))`` (N, C) -- see
    :func:`contsup_fast.fused.reference.bn_relu_gap_ref`. Gradients flow to ``z``,
    ``bn_weight`` and ``bn_bias``."""
    _require()
    return _bn_fused(_ops.bn_relu_gap, (), z, bn_weight, bn_bias, running_mean, running_var, training, eps,
                     "bn_relu_gap")


def bn_relu_gap_backward(
    grad_pooled: Tensor,
    z: Tensor,
    bn_weight: Tensor,
    bn_bias: Tensor,
    mean: Tensor,
    var: Tensor,
    training: bool,
    eps: float = 1e-5,
) -> Tuple[Tensor, Tensor, Tensor]:
    """Gradients ``(grad_z, grad_bn_weight, grad_bn_bias)`` of :func:`bn_relu_gap` given
    ``grad_pooled`` (N, C); see :func:`image_context_tail_backward`."""
    _require()
    return _ops.bn_relu_gap_backward(grad_pooled, z, bn_weight, bn_bias, mean, var, bool(training), float(eps))


def global_avg_pool(h: Tensor) -> Tensor:
    """Global average pooling (N, C, H, W) -> (N, C) in ``h``'s dtype, with backward."""
    _require()
    return _ops.global_avg_pool(h)


def image_context(
    h: Tensor,
    u: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    bn_weight: Optional[Tensor],
    bn_bias: Optional[Tensor],
    running_mean: Optional[Tensor],
    running_var: Optional[Tensor],
    training: bool,
    eps: float = 1e-5,
) -> Tuple[Tensor, Tensor, Tensor]:
    """Second half of the image context encoder E fused with the boundary sum:
    ``out = h + avgpool_s(relu(bn(conv3x3(u, weight, bias, padding=1))))`` -- see
    :func:`contsup_fast.fused.reference.image_context_ref` (the specification; ContSup,
    arXiv 2312.07636, Fig. 3 "E").

    The full-resolution (N, C, s*H, s*W) convolution output is never materialised, in the
    forward or the backward, in training or eval. Training statistics come from the moments
    of the K = 9*C_in zero-padded 3x3 patches of ``u`` (mean_z = W mu + b,
    var_z = diag(W S W^T)); the output pass and both backward passes recompute the
    convolution row by row (CPU) or tile by tile (CUDA). Autograd saves ``u``, the
    parameters, the (C,) statistics and the K + K^2 patch moments.

    Args:
        h: (N, C, H, W) detached module output; fp32/fp64/fp16/bf16, any memory format.
        u: (N, C_in, s*H, s*W) hidden map of E (receives gradient), ``s`` a positive
            integer; cast to ``h``'s dtype when it differs.
        weight: (C, C_in, 3, 3) and ``bias`` (C,) of E's second convolution (receive
            gradient); ``None`` bias means zeros.
        bn_weight, bn_bias: E's last BatchNorm affine parameters (C,) (``None``: ones/zeros).
        running_mean, running_var: its buffers (C,), read only when ``training=False``.
        training: batch statistics (True) or running statistics (False).
        eps: BatchNorm epsilon.

    Returns:
        ``(out, mean, var)``: ``out`` (N, C, H, W) in ``h``'s dtype and memory format; in
        training the fp32 (fp64 for fp64 ``h``) batch mean and biased variance of the
        convolution output over (N, s*H, s*W), in eval the running buffers passed in.
        Gradients flow to ``u``, ``weight``, ``bias``, ``bn_weight``, ``bn_bias``
        (``grad_out`` passes through to ``h`` unchanged, as in the reference).

    Raises:
        RuntimeError: the extension is unavailable, or a shape/dtype/device check fails
            (the message names the argument, what was given and what is allowed).
        ValueError: running statistics are missing in eval mode.
    """
    _require()
    if isinstance(u, Tensor) and isinstance(h, Tensor) and u.dtype != h.dtype:
        u = u.to(h.dtype)
    C = h.shape[1] if isinstance(h, Tensor) and h.dim() > 1 else 0
    like = weight if isinstance(weight, Tensor) else h
    b = bias if bias is not None else like.new_zeros(C)
    g, beta, rm, rv = _bn_params(bn_weight, bn_bias, running_mean, running_var, training, C, like,
                                 "image_context")
    out, mean, var, _moments = _ops.image_context(h, u, weight, b, g, beta, rm, rv, bool(training), float(eps))
    return (out, *_returned_stats(training, mean, var, running_mean, running_var))


def image_context_backward(
    grad_out: Tensor,
    u: Tensor,
    weight: Tensor,
    bias: Tensor,
    bn_weight: Tensor,
    bn_bias: Tensor,
    mean: Tensor,
    var: Tensor,
    patch_moments: Tensor,
    training: bool,
    eps: float = 1e-5,
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Gradients ``(grad_u, grad_weight, grad_bias, grad_bn_weight, grad_bn_bias)`` of
    :func:`image_context` given ``grad_out`` (N, C, H, W).

    ``mean``/``var`` are the statistics the forward used and ``patch_moments`` the fourth
    output of ``torch.ops.contsup.image_context`` (K + K^2 values, K = 9*C_in: patch mean
    and biased patch covariance in training, ignored in eval). ``grad_u`` has ``u``'s
    shape, dtype and memory format; the parameter gradients have the parameters' dtypes.
    """
    _require()
    return _ops.image_context_backward(grad_out, u, weight, bias, bn_weight, bn_bias, mean, var,
                                       patch_moments, bool(training), float(eps))
