"""Boundary ops and their backends.

A *backend* is a module-like object exposing four autograd-aware functions with the
signatures of :mod:`contsup_fast.fused.reference`:

* ``residual_context(h, contexts, weights, biases, bn_weights, bn_biases, running_means,
  running_vars, training, eps) -> (out, means, vars)``
* ``image_context_tail(h, z, bn_weight, bn_bias, running_mean, running_var, training, eps)
  -> (out, mean, var)``
* ``bn_relu_gap(z, bn_weight, bn_bias, running_mean, running_var, training, eps)
  -> (pooled, mean, var)``
* ``global_avg_pool(h) -> pooled``
* ``image_context(h, u, weight, bias, bn_weight, bn_bias, running_mean, running_var,
  training, eps) -> (out, mean, var)``: the image encoder's second convolution, BN, ReLU,
  pooling and the add, never materialising the full-resolution convolution output. The
  ``torch`` backend runs :func:`~contsup_fast.fused.chunked.image_context_chunked` (a
  batch-chunked eager recompute); ``triton``/``native`` run their module's ``image_context``
  when it has one and fall back to the chunked version otherwise.

Backends:

``"torch"``   the eager reference composition (always available);
``"triton"``  Triton kernels in :mod:`contsup_fast.kernels` (CUDA tensors, or any device
              under ``TRITON_INTERPRET=1``);
``"native"``  the compiled C++/CUDA extension :mod:`contsup_fast._native` (CPU and CUDA).

``"auto"`` picks, for a device, the backend expected to be fastest there (see
:func:`available_backends` for the order and what it rests on).
"""
from __future__ import annotations

import importlib
import os
from types import SimpleNamespace
from typing import List

import torch

from . import reference
from .chunked import image_context_chunked

__all__ = ["BACKENDS", "available_backends", "resolve_backend", "reference"]

BACKENDS = ("auto", "torch", "triton", "native")

_TORCH = SimpleNamespace(
    name="torch",
    residual_context=reference.residual_context_ref,
    image_context_tail=reference.image_context_tail_ref,
    bn_relu_gap=reference.bn_relu_gap_ref,
    global_avg_pool=reference.global_avg_pool_ref,
    image_context=image_context_chunked,
)


def _load(name: str):
    """Import the implementation module of backend ``name``; return (module or None, reason)."""
    modname = {"triton": "contsup_fast.kernels", "native": "contsup_fast._native"}[name]
    try:
        mod = importlib.import_module(modname)
    except Exception as exc:  # ImportError, or a broken build
        return None, f"{modname} could not be imported: {exc}"
    ok, why = mod.is_available() if hasattr(mod, "is_available") else (False, "no is_available()")
    return (mod if ok else None), why


def _usable_on(name: str, mod, device: torch.device) -> bool:
    if name == "triton":
        return device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"
    if name == "native":
        return mod.supports_device(device)
    return True


def available_backends(device: torch.device | str = "cpu") -> List[str]:
    """Names of the concrete backends that can run on ``device``, fastest first."""
    device = torch.device(device)
    # CPU: measured on a 2-core machine (bench.kernels --quick --batches 64), the eager
    # composition (oneDNN) beats the compiled C++ loops 2-9x in forward+backward, and Triton
    # only runs in its slow interpreter; "native" still saves memory when asked for.
    # CUDA: fused kernels first, by design (their speed on a GPU is not yet measured).
    order = ("native", "triton", "torch") if device.type == "cuda" else ("torch", "native", "triton")
    names = []
    for name in order:
        if name == "torch":
            names.append(name)
            continue
        mod, _ = _load(name)
        if mod is not None and _usable_on(name, mod, device):
            names.append(name)
    return names


def resolve_backend(name: str, device: torch.device | str = "cpu"):
    """Return the backend object for ``name`` on ``device``.

    Raises:
        ValueError: ``name`` is not one of :data:`BACKENDS`.
        RuntimeError: the named backend is not available (the message says why).
    """
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")
    device = torch.device(device)
    if name == "auto":
        name = available_backends(device)[0]
    if name == "torch":
        return _TORCH
    mod, why = _load(name)
    if mod is None:
        raise RuntimeError(f"backend={name!r} is not available: {why}")
    if not _usable_on(name, mod, device):
        raise RuntimeError(f"backend={name!r} cannot run on device {device}")
    return SimpleNamespace(
        name=name,
        residual_context=mod.residual_context,
        image_context_tail=mod.image_context_tail,
        bn_relu_gap=mod.bn_relu_gap,
        global_avg_pool=mod.global_avg_pool,
        image_context=getattr(mod, "image_context", image_context_chunked),
    )
