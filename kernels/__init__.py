"""Triton backend of the ContSup fused boundary ops (``contsup_fast.kernels``).

Public functions, with exactly the signatures and results of
:mod:`contsup_fast.fused.reference` (functional: running statistics are returned, never
mutated):

* :func:`residual_context`   -- ``out = h + sum_r avgpool(relu(bn_r(conv1x1_r(c_r))))``
* :func:`image_context_tail` -- ``out = h + avgpool(relu(bn(z)))``
  (and :func:`image_context_tail_backward`, its standalone backward)
* :func:`image_context`      -- ``out = h + avgpool(relu(bn(conv3x3(u))))``, never
  materialising the full-resolution convolution output
* :func:`bn_relu_gap`        -- ``pooled = mean_{H,W} relu(bn(z))``
* :func:`global_avg_pool`    -- ``pooled = mean_{H,W} h``
* :func:`is_available`       -- ``(bool, reason)``

Each op is a ``torch.library.triton_op`` in the ``contsup_triton`` namespace
(``residual_context``, ``image_context``, ``image_context_tail``, ``bn_relu_gap``,
``global_avg_pool`` and a ``*_backward`` op each) with autograd registered through
``torch.library.register_autograd``, so ``torch.compile`` traces them without graph breaks.
Kernels run on CUDA tensors, or on any device in Triton's interpreter when
``TRITON_INTERPRET=1`` is set before import (there the ops are registered as opaque
``custom_op`` s, since ``wrap_triton`` cannot trace interpreted kernels). Importing this package never fails when Triton is missing: :func:`is_available`
then returns ``(False, reason)`` and the functions raise ``RuntimeError``.
"""
import os

__all__ = [
    "is_available",
    "residual_context",
    "image_context",
    "image_context_tail",
    "image_context_tail_backward",
    "bn_relu_gap",
    "global_avg_pool",
]

try:
    from ._common import INTERPRETED as _INTERPRETED
    from ._head_pool import bn_relu_gap, global_avg_pool
    from ._image_context import image_context
    from ._image_tail import image_context_tail, image_context_tail_backward
    from ._residual import residual_context

    _IMPORT_ERROR = None
except Exception as _exc:  # triton missing, or a torch without torch.library.triton_op
    _IMPORT_ERROR = f"{type(_exc).__name__}: {_exc}"
    _INTERPRETED = False

    def _unavailable(*args, **kwargs):
        raise RuntimeError(f"contsup_fast.kernels is not available: {_IMPORT_ERROR}")

    residual_context = image_context = _unavailable
    image_context_tail = image_context_tail_backward = _unavailable
    bn_relu_gap = global_avg_pool = _unavailable


def is_available():
    """``(True, "")`` if the Triton kernels can run here (Triton importable and a CUDA device,
    or ``TRITON_INTERPRET=1`` set before import), else ``(False, reason)``."""
    if _IMPORT_ERROR is not None:
        return False, f"Triton backend could not be loaded ({_IMPORT_ERROR})"
    if _INTERPRETED:
        return True, "Triton interpreter (TRITON_INTERPRET=1)"
    import torch

    if torch.cuda.is_available():
        return True, ""
    if os.environ.get("TRITON_INTERPRET") == "1":
        return False, "TRITON_INTERPRET=1 was set after contsup_fast.kernels was imported"
    return False, "no CUDA device (set TRITON_INTERPRET=1 before import to use the interpreter)"
