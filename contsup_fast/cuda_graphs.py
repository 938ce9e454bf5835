"""CUDA-graph capture of the local modules' training steps (``LocalSequential(cuda_graphs=True)``).

For small models (the CIFAR ResNets at modest batch sizes) a local-learning step is hundreds of
small kernel launches per local module: forward, auxiliary head, local loss and backward, and
the host's launch overhead, not the GPU, sets the pace. :class:`GraphedLocalSteps` records each
local module's whole :meth:`~contsup_fast.local.LocalSequential.module_step` (boundary context,
body, local loss, backward into ``.grad``, BatchNorm running-statistics updates) once as a
``torch.cuda.CUDAGraph`` and afterwards replays the K graphs in module order, one launch each
(PyTorch CUDA graphs: https://pytorch.org/docs/stable/notes/cuda.html#cuda-graphs).

Protocol of ``local(x, y)`` in training mode:

1. the first ``warmup`` calls run eagerly on a side stream (lazy initialisation, cuDNN
   algorithm choice) and record which parameters each local module gives a gradient;
2. the next call captures the K graphs into one shared memory pool (each module's activations
   are freed before the next module is captured, so the peak stays about one module's), then
   replays them: that call's results are those of the replay;
3. every later call copies ``x`` and ``y`` into the static input buffers and replays.

The model's module-step hooks (``LocalSequential.register_module_step_hook``, e.g. LocalDDP's
per-module gradient all-reduce) run after each module's eager step or graph replay, in module
order, as on the eager path.

Gradients keep ``loss.backward()``'s semantics: they accumulate into ``.grad``. Before each
replay, every parameter whose ``.grad`` is None (``zero_grad(set_to_none=True)``) gets its
static gradient buffer back, zeroed; a ``.grad`` the user replaced is copied into that buffer.
Parameters must stay where they are (optimizers update them in place, which is what graphs need).

Refusals (each names ``cuda_graphs``): construction without a visible CUDA GPU, inputs not on
CUDA (``RuntimeError``); an input of another shape, dtype or memory format than the captured
one ("dynamic shapes"), or another batch size than the captured one, or other autocast
settings, or a ``GradScaler`` (``ValueError``). Evaluation (``local.eval()``) always runs eagerly.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch
from torch import Tensor, nn

__all__ = ["StepSignature", "GraphedLocalSteps", "bind_static_grads", "require_cuda_graphs_support"]


def require_cuda_graphs_support() -> None:
    """Raise ``RuntimeError`` (naming ``cuda_graphs``) when no CUDA GPU is visible."""
    if not torch.cuda.is_available():
        raise RuntimeError("cuda_graphs=True needs a CUDA GPU, and torch sees none (CUDA graphs do not "
                           "exist on CPU); use cuda_graphs=False")


@dataclass(frozen=True)
class StepSignature:
    """What a captured step is specialised to: the image batch ``x`` (N, C, H, W), its dtype,
    memory format and device, the labels' dtype, and the autocast settings."""

    batch: int
    shape: Tuple[int, ...]
    dtype: torch.dtype
    channels_last: bool
    device: torch.device
    label_dtype: torch.dtype
    autocast: Tuple[bool, torch.dtype]

    @classmethod
    def of(cls, x: Tensor, y: Tensor) -> "StepSignature":
        cl = x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
        amp = (torch.is_autocast_enabled("cuda"), torch.get_autocast_dtype("cuda"))
        return cls(int(x.shape[0]), tuple(x.shape[1:]), x.dtype, cl, x.device, y.dtype, amp)

    def check(self, other: "StepSignature") -> None:
        """Raise ``ValueError`` naming ``cuda_graphs`` if ``other`` cannot replay this capture."""
        if other.batch != self.batch:
            raise ValueError(f"cuda_graphs=True: batch size {other.batch} differs from the batch size "
                             f"{self.batch} the local modules were captured with; use a fixed batch size "
                             "(e.g. drop_last=True in the DataLoader) or cuda_graphs=False")
        for field, what in (("shape", "image shape (C, H, W)"), ("dtype", "dtype"),
                            ("channels_last", "channels_last memory format"), ("device", "device"),
                            ("label_dtype", "label dtype")):
            if getattr(other, field) != getattr(self, field):
                raise ValueError(f"cuda_graphs=True does not support dynamic shapes: the {what} changed "
                                 f"from {getattr(self, field)} (captured) to {getattr(other, field)}; "
                                 "keep inputs fixed or use cuda_graphs=False")
        if other.autocast != self.autocast:
            raise ValueError(f"cuda_graphs=True: autocast (enabled, dtype) changed from {self.autocast} "
                             f"(captured) to {other.autocast}; keep the same torch.autocast settings")


def bind_static_grads(params: List[nn.Parameter], static: List[Tensor]) -> None:
    """Make each ``p.grad`` the static buffer a graph accumulates into, keeping the meaning of
    ``.grad``: None becomes the zeroed buffer, another tensor is copied into the buffer."""
    zero = []
    for p, g in zip(params, static):
        if p.grad is None:
            zero.append(g)
            p.grad = g
        elif p.grad is not g:
            g.copy_(p.grad)
            p.grad = g
    if zero:
        torch._foreach_zero_(zero)


class GraphedLocalSteps:
    """The K captured local-module steps of one :class:`~contsup_fast.local.LocalSequential`.

    Args:
        local: the wrapped model (its ``module_step`` is what is captured).
        warmup: eager training calls before the capture (at least 1).
        runtime: the object providing ``CUDAGraph``, ``graph``, ``Stream``, ``stream``,
            ``current_stream`` and ``synchronize`` (default ``torch.cuda``; the tests pass an
            emulation that records and replays the captured aten ops on CPU).
        device_type: the device type the inputs must have (default ``"cuda"``).

    Call it as ``steps(x, y, scaler, backend)`` in place of an eager training pass; it returns
    the tuple ``(logits, loss, local_losses)`` the caller wraps as a
    :class:`~contsup_fast.local.LocalOutput` (``logits`` cloned out of the static buffer;
    ``local_losses`` (K,) stacked from the static losses; ``loss`` its last entry). This module
    imports nothing from :mod:`contsup_fast.local`: the wrapped model is reached only through
    the ``local`` object it is given (its ``module_step``, ``local_modules``, ``spec``).
    """

    def __init__(self, local: nn.Module, warmup: int = 2, runtime=None, device_type: str = "cuda"):
        if warmup < 1:
            raise ValueError(f"warmup must be >= 1 eager step before capture, got {warmup}")
        self.rt = torch.cuda if runtime is None else runtime
        self.device_type = device_type
        self.local = local
        self.warmup = warmup
        self.calls = 0
        self.signature: Optional[StepSignature] = None
        self.graphs: list = []
        self.static_x: Optional[Tensor] = None
        self.static_y: Optional[Tensor] = None
        self.static_logits: Optional[Tensor] = None
        self.static_losses: List[Tensor] = []
        self.grad_params: List[List[nn.Parameter]] = []   # per module: parameters given a gradient
        self.static_grads: List[List[Tensor]] = []

    # ------------------------------------------------------------------ the module loop
    def _loop(self, x: Tensor, y: Tensor, backend, graphs: Optional[list] = None, pool=None):
        """Run (or, with ``graphs``, capture) every module's step in order, as ``_run`` does."""
        local = self.local
        keep = local.spec.n
        inputs: Dict[int, Tensor] = {}
        h: Optional[Tensor] = None
        logits, losses = None, []
        for m in local.local_modules:
            if graphs is None:
                h, a, loss = local.module_step(m, h, inputs, x, y, None, True, backend)
                self._after_module(m)
            else:
                g = self.rt.CUDAGraph()
                bind_static_grads(self.grad_params[m.index], self.static_grads[m.index])
                with self.rt.graph(g, pool=pool):
                    h, a, loss = local.module_step(m, h, inputs, x, y, None, True, backend)
                pool = g.pool() if pool is None else pool
                graphs.append(g)
            losses.append(loss)
            if keep:
                inputs[m.index] = a
                inputs.pop(m.index - keep, None)
            del a
            logits = h
        return logits, losses

    def _after_module(self, m: nn.Module) -> None:
        """The wrapped model's module-step hooks (``register_module_step_hook``, e.g. LocalDDP's
        gradient all-reduce), called after module ``m``'s step as on the eager path; never
        inside a capture."""
        for hook in getattr(self.local, "_module_step_hooks", {}).values():
            hook(m)

    def _eager_warmup(self, x: Tensor, y: Tensor, backend):
        """One eager step on a side stream, recording which parameters receive a gradient."""
        got: Dict[int, set] = {}
        handles = []
        for m in self.local.local_modules:
            for p in m.parameters():
                if p.requires_grad:
                    handles.append(p.register_post_accumulate_grad_hook(
                        lambda p, j=m.index: got.setdefault(j, set()).add(id(p))))
        side = self.rt.Stream(x.device)
        side.wait_stream(self.rt.current_stream(x.device))
        try:
            with self.rt.stream(side):
                logits, losses = self._loop(x, y, backend)
        finally:
            for hd in handles:
                hd.remove()
        self.rt.current_stream(x.device).wait_stream(side)
        ids = [got.get(m.index, set()) for m in self.local.local_modules]
        new = [[p for p in m.parameters() if id(p) in ids[m.index]] for m in self.local.local_modules]
        if self.grad_params and [len(a) for a in new] != [len(a) for a in self.grad_params]:
            raise RuntimeError("cuda_graphs=True: the set of parameters given a gradient changed between "
                               "warm-up steps; such a model cannot be captured (use cuda_graphs=False)")
        self.grad_params = new
        return logits, losses

    def _capture(self, x: Tensor, y: Tensor, backend) -> None:
        self.static_x = x.detach().clone(memory_format=torch.preserve_format)
        self.static_y = y.detach().clone()
        self.static_grads = [[torch.zeros_like(p, memory_format=torch.preserve_format) for p in ps]
                             for ps in self.grad_params]
        self.rt.synchronize(x.device)
        graphs: list = []
        try:
            self.static_logits, self.static_losses = self._loop(self.static_x, self.static_y, backend, graphs)
        except RuntimeError as exc:
            raise RuntimeError(f"cuda_graphs=True: capturing the local modules failed ({exc}); the model "
                               "probably synchronises with the host or changes shape inside a step. "
                               "Use cuda_graphs=False") from exc
        self.graphs = graphs

    # ------------------------------------------------------------------ one training call
    def __call__(self, x: Tensor, y: Tensor, scaler, backend) -> Tuple[Tensor, Tensor, Tensor]:
        if scaler is not None:
            raise ValueError("cuda_graphs=True does not support a GradScaler (its scale and inf checks "
                             "change per step); train in bf16 autocast or fp32, or use cuda_graphs=False")
        if x.device.type != self.device_type:
            raise RuntimeError(f"cuda_graphs=True needs CUDA tensors, x is on {x.device}; move the model "
                               "and the batch to a GPU or use cuda_graphs=False")
        sig = StepSignature.of(x, y)
        if self.signature is None:
            self.signature = sig
        self.signature.check(sig)
        self.calls += 1
        if self.calls <= self.warmup:
            logits, losses = self._eager_warmup(x, y, backend)
            stacked = torch.stack(losses)
            return logits, stacked[-1], stacked
        if not self.graphs:
            self._capture(x, y, backend)
        else:
            self.static_x.copy_(x)
            self.static_y.copy_(y)
        for g, params, static in zip(self.graphs, self.grad_params, self.static_grads):
            bind_static_grads(params, static)
        for g, m in zip(self.graphs, self.local.local_modules):
            g.replay()
            self._after_module(m)
        losses = torch.stack(self.static_losses)
        return self.static_logits.clone(), losses[-1], losses
