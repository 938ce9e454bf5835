"""LocalSequential: greedy local learning with context supply as a drop-in model wrapper.

A model is cut into K gradient-isolated *local modules* (see :mod:`contsup_fast.splitting`).
A training call ``local(x, y)`` runs, for j = 0..K-1: the context terms feeding module j
(:mod:`contsup_fast.context`), module j's slice of the network, its local loss (auxiliary
head, or the model's own classifier for the last module) and that loss's backward, after
which module j's activations are freed. Peak activation memory is therefore about one local
module's, not the whole network's (ContSup, arXiv 2312.07636, Sec. 3, Alg. 1).
"""
from __future__ import annotations

import copy
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch._subclasses.fake_tensor import is_fake
from torch.utils.hooks import RemovableHandle

from .context import BoundaryContext, ContextSpec, ContextTerms, check_gate, check_mean, parse_context
from .cuda_graphs import GraphedLocalSteps, require_cuda_graphs_support
from .fused import BACKENDS, resolve_backend
from . import auglocal
from .groups import GroupHeads, body_macs, check_width_groups, group_modules, macs_per_group
from .heads import AUX_CONFIGS, AUX_METHODS, AuxiliaryHead, DGLHead
from .layouts import Layout, image_layout
from .losses import (LOSSES, ReconstructionDecoder, denormalize, group_loss, loss_precision,
                     supervised_contrastive_loss)
from .presets import check_preset_dataset, reconstruction_weights
from .splitting import SplitPlan, plan_split
from . import tokens

__all__ = ["LocalSequential", "LocalModule", "LocalOutput", "ContSupInference", "CIFAR10_MEAN",
           "CIFAR10_STD", "REFERENCE_CIFAR_MEAN", "REFERENCE_CIFAR_STD"]

#: CIFAR-10 training-set statistics in [0, 1] units (this project's default normalisation).
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
#: the ContSup reference's CIFAR normalisation (github.com/Tab-ct/ContSup, ``train.py``:
#: ``(125.3, 123.0, 113.9) / 255`` and ``(63.0, 62.1, 66.7) / 255``); pass them as
#: ``image_mean``/``image_std`` (CLI ``--normalization reference``) to train as the authors do.
REFERENCE_CIFAR_MEAN = (125.3 / 255, 123.0 / 255, 113.9 / 255)
REFERENCE_CIFAR_STD = (63.0 / 255, 62.1 / 255, 66.7 / 255)


@dataclass
class LocalOutput:
    """Result of a training call ``local(x, y)``.

    Attributes:
        logits: (N, classes) output of the last module, detached.
        loss: 0-dim tensor, the last module's loss (cross-entropy of the model's classifier), detached.
        local_losses: (K,) every module's local loss in order, detached, on the input's device
            (no host synchronisation: call ``.tolist()`` when you want the numbers).
    """

    logits: Tensor
    loss: Tensor
    local_losses: Tensor


class LocalModule(nn.Module):
    """One gradient-isolated local module j.

    Attributes:
        context: :class:`~contsup_fast.context.BoundaryContext` building this module's input
            from the previous module's detached output (None for module 0).
        body: the slice of the wrapped model it runs (an ``fx.GraphModule``).
        head: its auxiliary head (None for the last module, whose loss is the model's own
            classifier with cross-entropy): :class:`~contsup_fast.heads.AuxiliaryHead`,
            :class:`~contsup_fast.heads.DGLHead`, :class:`~contsup_fast.auglocal.AugLocalHead`,
            or with width groups :class:`~contsup_fast.groups.GroupHeads`.
        decoder: InfoPro reconstruction decoder (``reconstruct=True``), else None.
    """

    def __init__(self, index: int, body: nn.Module, context: Optional[BoundaryContext],
                 head: Optional[AuxiliaryHead], decoder: Optional[ReconstructionDecoder],
                 blocks: List[str], out_shape: Tuple[int, ...]):
        super().__init__()
        self.index = index
        self.context = context
        self.body = body
        self.head = head
        self.decoder = decoder
        self.blocks = blocks
        self.out_shape = out_shape

    def extra_repr(self) -> str:
        return (f"index={self.index}, blocks={self.blocks[0]}..{self.blocks[-1]}, "
                f"out_shape={self.out_shape}")


def _block_names(pieces: Sequence[nn.Module]) -> List[List[str]]:
    names = []
    for piece in pieces:
        nodes = [str(n.target) if n.op == "call_module" else n.name
                 for n in piece.graph.nodes if n.op in ("call_module", "call_function", "call_method")]
        names.append(nodes or ["identity"])
    return names


class LocalSequential(nn.Module):
    """Wrap ``model`` for greedy local learning with context supply (ContSup).

    Args:
        model: an fx-traceable network taking (N, C, H, W) and returning logits (N, classes):
            a CIFAR ResNet from :mod:`contsup_fast.models`, torchvision CNNs, ViT and Swin, timm
            ViT/DeiT/Swin, or an ``nn.Sequential``. Its parameters are shared, not copied. The
            layout crossing each boundary (NCHW, NHWC or tokens) is detected
            (:mod:`contsup_fast.layouts`) and the context terms, heads and decoders act on it.
        K: number of local modules (``K=1`` is ordinary end-to-end training).
        context: ``"R0"``, ``"E"``, ``"Rn"``, ``"RnE"`` (n from ``n``), or ``"R<k>"``/``"R<k>E"``.
        n: the ``n`` of ``"Rn"``/``"RnE"`` (default 1, so ``"RnE"`` is R1E).
        aux: auxiliary head: None (default: ``1c2f`` where every boundary carries (N, C, H, W)
            maps, the token head of :mod:`contsup_fast.tokens` where tokens or (N, H, W, C)
            maps cross), ``"token"`` (that token head, named), one of ``0c1f 0c2f 1c1f 1c2f 1c3f 2c2f`` (ContSup/InfoPro
            ``<a>c<b>f``, (N, C, H, W) maps only), ``"auglocal"`` (AugLocal, ICLR 2024: copies
            of later layers, :mod:`contsup_fast.auglocal`) or ``"dgl"`` (DGL "mlp-sr", ICML
            2020). Transformers: see ``docs/transformers.md``.
        aux_depth: AugLocal head depth d (layers copied), integer >= 1 (default 2).
        aux_pyramid: AugLocal pyramid coefficient gamma in [0, 1] (default 0.5): depths shrink
            from d at module 0 towards 1; None keeps d for every head.
        width_groups: GN-DGL width-wise groups G (None or 1: off). Converts the blocks of each
            local module to grouped convolutions *in place* (:mod:`contsup_fast.groups`), gives
            each module G ``aux`` heads and the loss sum of CEs + 0.5 x diversity (T=3).
            Needs ``loss="ce"``, an ``<a>c<b>f`` aux and a model of residual blocks.
        loss: local loss of modules 0..K-2, ``"ce"`` or ``"supcon"`` (temperature 0.07).
        reconstruct: add the InfoPro reconstruction loss to modules 0..K-2.
        reconstruct_weights: ``(recon_first, cls_first, recon_last, cls_last)``, interpolated
            linearly over modules 0..K-2; default: the reference's table for the split
            (:func:`~contsup_fast.presets.reconstruction_weights`: its memory-balance table with
            ``split="balanced"``), else (1, 1, 1, 1).
        split: None (paper preset, else cost-balanced; with ``aux="auglocal"`` AugLocal's
            split: the first K-1 of the stem and every block), ``"balanced"`` (the paper's
            memory-balanced preset), ``"cost"`` (cost-balanced, never a preset) or explicit cut
            points.
        backend: ``"auto"``, ``"torch"``, ``"triton"`` or ``"native"`` for the boundary ops.
        feature_dim: hidden width of the auxiliary MLP and the contrastive embedding size, an
            integer >= 1.
        input_size: (C, H, W) of one example (used once to measure shapes).
        image_mean, image_std: the input normalisation, used to de-normalise the image for
            the reconstruction loss. Default: the CIFAR-10 statistics (:data:`CIFAR10_MEAN`,
            :data:`CIFAR10_STD`); the ContSup reference normalises with slightly different
            constants (:data:`REFERENCE_CIFAR_MEAN`, :data:`REFERENCE_CIFAR_STD`). Each side
            de-normalises with its own constants, so either is self-consistent; pass the
            reference's to reproduce its runs exactly.
        context_gate: None (default, no gate: ``g = 1``; with ``context_mean=None`` the paper's
            exact form ``a = h + sum_t T_t``), ``"ramp"``
            (every term scaled by ``g = min(1, t / context_gate_steps)``, t the training steps
            taken so far, kept in the buffer ``context_gate_step`` so resume is exact; after the
            ramp g = 1) or ``"learned"`` (one learnable scalar per term,
            ``g = |theta|``, parameters named ``*.context.gate``, theta starts at
            ``context_gate_init``; exclude them from weight decay). See
            :mod:`contsup_fast.context` and README "Accuracy" for the measured effect.
        context_gate_steps: length of the ramp in training steps (``"ramp"`` only).
        context_gate_init: initial theta of ``"learned"`` gates (> 0).
        context_mean: ``"last"`` (default: the boundary feeding the last local module takes the
            mean ``(h + sum_t T_t) / (1 + n_terms)``, so the model's classifier reads inputs of
            the scale it has without context: no first-epoch loss spike; every other boundary
            is the paper's), None (the paper's exact form, the sum ``a = h + sum_t T_t`` at
            every boundary) or ``"all"`` (every boundary takes the mean). Combines with
            ``context_gate``: ``(h + sum_t g_t T_t) / (1 + n_terms)``. The default was chosen by
            the ``cpu`` accuracy A/B; see :mod:`contsup_fast.context` and README "Accuracy".
        cuda_graphs: capture each local module's training step (context, body, local loss,
            backward) as a CUDA graph after two eager steps and replay it (fixed input shapes;
            see :mod:`contsup_fast.cuda_graphs`). For small models where launch overhead dominates.
        preset_dataset: whose preset tables the reference's code uses (``"cifar10"``, the
            default, ``"stl10"`` or ``"svhn"``): STL-10 has its own memory-balanced ResNet-110
            splits, STL-10 and SVHN their own ResNet-110 reconstruction weights
            (:mod:`contsup_fast.presets`); the CLI sets it from ``--dataset``.

    Raises:
        ValueError: bad K, context, n, aux, aux_depth, aux_pyramid, width_groups, loss, split,
            backend, feature_dim, context gate, context mean, cuda_graphs or preset_dataset (the message names the option and
            says what is allowed); :class:`~contsup_fast.splitting.UnsplittableModelError` for a model that
            cannot be traced or cut. RuntimeError: ``cuda_graphs=True`` without a CUDA GPU.
    """

    def __init__(self, model: nn.Module, K: int = 16, context: str = "RnE", n: Optional[int] = None,
                 aux: Optional[str] = None, loss: str = "ce", reconstruct: bool = False,
                 reconstruct_weights: Optional[Sequence[float]] = None,
                 split: Union[None, str, Sequence[Union[int, str]]] = None, backend: str = "auto",
                 feature_dim: int = 128, input_size: Sequence[int] = (3, 32, 32),
                 image_mean: Sequence[float] = CIFAR10_MEAN, image_std: Sequence[float] = CIFAR10_STD,
                 aux_depth: int = 2, aux_pyramid: Optional[float] = 0.5, width_groups: Optional[int] = None,
                 context_gate: Optional[str] = None, context_gate_steps: Optional[int] = None,
                 context_gate_init: float = 0.1, context_mean: Optional[str] = "last",
                 cuda_graphs: bool = False, preset_dataset: str = "cifar10"):
        super().__init__()
        if not isinstance(cuda_graphs, bool):
            raise ValueError(f"cuda_graphs must be True or False, got {cuda_graphs!r}")
        if cuda_graphs:
            require_cuda_graphs_support()
        if not isinstance(model, nn.Module):
            raise ValueError(f"model must be an nn.Module, got {type(model).__name__}")
        self.spec: ContextSpec = parse_context(context, n)
        if aux is not None and aux not in AUX_METHODS + ("token",):
            raise ValueError(f"aux must be one of {AUX_METHODS + ('token',)} or None (the layout's "
                             f"default), got {aux!r}")
        auglocal.check_options(aux_depth, aux_pyramid)
        G = check_width_groups(width_groups)
        if G > 1 and aux is not None and aux not in AUX_CONFIGS:
            raise ValueError(f"width_groups={G} gives each module G heads of an <a>c<b>f configuration "
                             f"{AUX_CONFIGS} (GN-DGL uses 1c2f), got aux={aux!r}")
        if G > 1 and loss != "ce":
            raise ValueError(f"width_groups={G} trains its heads with cross-entropy plus a diversity term "
                             f"on class probabilities; it needs loss='ce', got loss={loss!r}")
        self.aux_depth, self.aux_pyramid, self.width_groups = aux_depth, aux_pyramid, G
        if loss not in LOSSES:
            raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}")
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        check_gate(context_gate, context_gate_steps, context_gate_init)
        self.context_gate, self.context_gate_steps = context_gate, context_gate_steps
        self.context_gate_init = float(context_gate_init)
        check_mean(context_mean)
        self.context_mean = context_mean
        if len(input_size) != 3:
            raise ValueError(f"input_size must be (C, H, W), got {tuple(input_size)!r}")
        if isinstance(feature_dim, bool) or not isinstance(feature_dim, int) or feature_dim < 1:
            raise ValueError(f"feature_dim must be an integer >= 1 (the auxiliary MLP's hidden width), "
                             f"got {feature_dim!r}")
        self.K, self.aux, self.loss_name, self.backend_name = K, aux, loss, backend
        self.input_size = tuple(int(s) for s in input_size)
        self.image_mean, self.image_std = tuple(image_mean), tuple(image_std)
        self.preset_dataset = check_preset_dataset(preset_dataset)
        plan = plan_split(model, K, split, self.input_size, preset_dataset, aux)
        self.split_source = plan.source
        self.cut_points = list(plan.cuts)
        out_shape = plan.shapes[[n for n in plan.gm.graph.nodes if n.op == "output"][0].args[0].name]
        if len(out_shape) != 2:
            raise ValueError(f"model must return logits of shape (N, classes), it returns shape {out_shape}")
        self.num_classes = out_shape[1]
        #: the :class:`~contsup_fast.layouts.Layout` of each module output h_j, j < K-1
        self.layouts = [plan.layout(c) for c in plan.cuts]
        aux = tokens.resolve_aux(aux, G, self.layouts, type(model).__name__)
        self.aux = aux
        self.reconstruct_weights = self._reconstruct_weights(model, reconstruct, reconstruct_weights, split)
        self.grouped_blocks = group_modules(plan.pieces, G, type(model).__name__) if G > 1 else None
        self.local_modules = nn.ModuleList(self._build_modules(plan, feature_dim, reconstruct))
        if context_gate == "ramp":
            self.register_buffer("context_gate_step", torch.zeros((), dtype=torch.int64))
        device = next(self.parameters()).device
        self._backends: Dict[torch.device, object] = {device: resolve_backend(backend, device)}
        self._graphed = GraphedLocalSteps(self) if cuda_graphs else None
        self._module_step_hooks: Dict[int, Callable[[LocalModule], None]] = OrderedDict()

    # ------------------------------------------------------------------ construction
    def _reconstruct_weights(self, model, reconstruct, weights, split) -> Optional[Tuple[float, ...]]:
        if not reconstruct:
            return None
        if weights is None:
            weights = reconstruction_weights(getattr(model, "arch", None), self.K, balanced=split == "balanced",
                                             dataset=self.preset_dataset) or (1.0, 1.0, 1.0, 1.0)
        if len(weights) != 4:
            raise ValueError(f"reconstruct_weights must be (recon_first, cls_first, recon_last, cls_last), "
                             f"got {tuple(weights)!r}")
        return tuple(float(w) for w in weights)

    def _build_modules(self, plan: SplitPlan, feature_dim: int, reconstruct: bool) -> List[LocalModule]:
        K, spec = self.K, self.spec
        out_shapes = [plan.shapes[c][1:] for c in plan.cuts] + [(self.num_classes,)]
        a_layouts = [image_layout(self.input_size)] + self.layouts  # layout of each module input a_i
        input_channels = [lay.channels for lay in a_layouts]  # channels of a_i
        # the network's widest stage, over every candidate boundary, chosen as a cut or not: the
        # reference (networks_dev/auxiliary_nets.py) keeps a head's width only at 64 channels,
        # the widest stage of its CIFAR ResNets, whichever boundaries K happens to cut
        nchw = [plan.layouts[c] for c in plan.candidates]
        widest = max((lay.channels for lay in nchw if isinstance(lay, Layout) and lay.kind == "NCHW"), default=0)
        head_out = self.num_classes if self.loss_name == "ce" else feature_dim
        blocks = _block_names(plan.pieces)
        head_plans = token_heads = None
        if self.aux == "auglocal" and K > 1 and any(lay.channels_last for lay in self.layouts):
            if not all(lay.channels_last for lay in self.layouts):
                raise ValueError("aux='auglocal' needs every boundary of one kind: this model mixes "
                                 "(N, C, H, W) maps with tokens or (N, H, W, C) maps")
            token_heads = tokens.auglocal_heads(plan, self.layouts, self.aux_depth, self.aux_pyramid, head_out)
        elif self.aux == "auglocal" and K > 1:
            layers = auglocal.finest_layers(plan.gm, plan.candidates, plan.shapes, self.input_size)
            ends = [plan.candidates.index(c) for c in plan.cuts]
            head_plans = auglocal.plan_heads([lay.out_shape for lay in layers], ends, self.aux_depth,
                                             self.aux_pyramid)
        modules = []
        for j in range(K):
            context = None
            if j > 0 and (spec.n or spec.image):
                boundary = j - 1
                mean = self.context_mean == "all" or (self.context_mean == "last" and j == K - 1)
                sources = spec.sources(boundary)
                layout = self.layouts[boundary]
                if layout.channels_last:
                    context = tokens.TokenContext(
                        layout, self.input_size[0] if spec.image else None, self.input_size[1:],
                        [(i, a_layouts[i]) for i in sources], gate=self.context_gate,
                        gate_init=self.context_gate_init, mean=mean)
                else:
                    if any(a_layouts[i].channels_last for i in sources):
                        raise ValueError(f"context={spec.name!r}: boundary {plan.cuts[boundary]!r} carries "
                                         f"(N, C, H, W) maps but reads earlier tokens or (N, H, W, C) maps; "
                                         f"mixed layouts are not supported, use context='R0' or 'E'")
                    context = BoundaryContext(
                        layout.channels, self.input_size[0] if spec.image else None,
                        [(i, input_channels[i]) for i in sources],
                        gate=self.context_gate, gate_init=self.context_gate_init, mean=mean)
            head = decoder = None
            if j < K - 1:
                layout = self.layouts[j]
                c = layout.channels
                if token_heads is not None:
                    head = token_heads[j]
                elif head_plans is not None:
                    head = auglocal.AugLocalHead(head_plans[j], layers, head_out)
                elif layout.channels_last:
                    head = (tokens.TokenDGLHead(layout, head_out) if self.aux == "dgl"
                            else tokens.TokenHead(layout, head_out, feature_dim))
                elif self.aux == "dgl":
                    head = DGLHead(c, out_shapes[j][1:], head_out)
                elif self.width_groups > 1:
                    # GN-DGL's AuxClassifier doubles the width at every stage (widest=False)
                    head = GroupHeads(c, self.width_groups, head_out, self.aux, widest=False,
                                      feature_dim=feature_dim)
                else:
                    head = AuxiliaryHead(c, self.aux, head_out, widest=c == widest, feature_dim=feature_dim)
                if reconstruct:
                    decoder = (tokens.TokenDecoder(layout, self.input_size[0], self.input_size[1:])
                               if layout.channels_last else ReconstructionDecoder(c, self.input_size[0]))
            modules.append(LocalModule(j, plan.pieces[j], context, head, decoder, blocks[j],
                                       tuple(out_shapes[j])))
        return modules

    # ------------------------------------------------------------------ container protocol
    def __len__(self) -> int:
        return self.K

    def __getitem__(self, j: int) -> LocalModule:
        return self.local_modules[j]

    def __iter__(self):
        return iter(self.local_modules)

    def backend_for(self, device: torch.device):
        """The boundary-op backend used for tensors on ``device`` (resolved once per device)."""
        device = torch.device(device)
        if device not in self._backends:
            self._backends[device] = resolve_backend(self.backend_name, device)
        return self._backends[device]

    # ------------------------------------------------------------------ multi-process hooks
    def register_module_step_hook(self, hook: Callable[[LocalModule], None]) -> RemovableHandle:
        """Call ``hook(m)`` after each local module ``m``'s step in a training call, once its
        local backward has filled ``.grad`` (used by :class:`contsup_fast.distributed.LocalDDP`
        to start that module's gradient all-reduce). Returns a handle with ``.remove()``."""
        handle = RemovableHandle(self._module_step_hooks)
        self._module_step_hooks[handle.id] = hook
        return handle

    @property
    def _ddp_params_and_buffers_to_ignore(self):
        # DistributedDataParallel reads this attribute when it wraps a module: refuse at once,
        # since every local backward runs inside forward, before DDP's reducer is ready, so the
        # first step's gradients would not be averaged
        raise RuntimeError("DistributedDataParallel cannot wrap a LocalSequential (its local "
                           "backwards run inside forward, so DDP would not average the first "
                           "step's gradients); use contsup_fast.distributed.LocalDDP(local)")

    # ------------------------------------------------------------------ forward
    def _check_inputs(self, x: Tensor, y: Optional[Tensor]) -> None:
        if not isinstance(x, Tensor) or x.dim() != 4 or x.shape[1] != self.input_size[0]:
            got = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f"x must be a float tensor of shape (N, {self.input_size[0]}, H, W), got {got}")
        if not x.is_floating_point():
            raise ValueError(f"x must be a floating-point tensor (normalised image), got dtype {x.dtype}")
        param = next(self.parameters())
        if x.device != param.device:
            raise ValueError(f"x is on {x.device} but the model's parameters are on {param.device}; "
                             f"move one of them (local.to(device) or x.to(device))")
        if y is not None:
            if not isinstance(y, Tensor) or y.shape != (x.shape[0],) or y.dtype != torch.int64:
                got = (tuple(y.shape), y.dtype) if isinstance(y, Tensor) else type(y).__name__
                raise ValueError(f"y must be an int64 tensor of shape ({x.shape[0]},) holding class "
                                 f"indices, got {got}")
            if y.device != x.device:
                raise ValueError(f"y is on {y.device} but x is on {x.device}")
            if y.numel() and not is_fake(y):  # fake tensors (the compile report's recording) hold no values
                # one host synchronisation per call: cross-entropy would otherwise raise a bare
                # IndexError on CPU, or a device-side assert that poisons the CUDA context
                lo, hi = torch.aminmax(y)
                lo, hi = int(lo), int(hi)
                if lo < 0 or hi >= self.num_classes:
                    raise ValueError(f"y must hold class indices in [0, {self.num_classes}) (the model has "
                                     f"{self.num_classes} classes), got labels from {lo} to {hi}")

    def forward(self, x: Tensor, y: Optional[Tensor] = None, scaler=None):
        """Training step or inference.

        Args:
            x: (N, C, H, W) normalised images (fp32; autocast and channels_last work).
            y: (N,) int64 labels. Required in training mode.
            scaler: optional ``torch.amp.GradScaler``; each local loss is scaled before its
                backward (call ``scaler.step(opt)`` and ``scaler.update()`` yourself).

        Returns:
            Training mode: :class:`LocalOutput`; every local loss has been back-propagated into
            ``.grad`` (accumulating, as ``loss.backward()`` does). Eval mode: the logits (N,
            classes), or a :class:`LocalOutput` of losses without backward when ``y`` is given.

        Raises:
            ValueError: wrong shapes, dtypes or devices. RuntimeError: training without ``y``
            or under ``torch.no_grad()``.
        """
        self._check_inputs(x, y)
        if self.training:
            if y is None:
                raise RuntimeError("LocalSequential in training mode needs labels: call local(x, y) "
                                   "(or local.eval() for inference)")
            if not torch.is_grad_enabled():
                raise RuntimeError("a training step runs each local backward itself and cannot run under "
                                   "torch.no_grad(); call local.eval() for inference")
            if getattr(nn.parallel.DistributedDataParallel, "_active_ddp_module", None) is not None:
                # DDP over a container that holds this model: the wrap-time refusal above never
                # ran, so refuse on the first training call, before any gradient is computed
                raise RuntimeError("DistributedDataParallel cannot wrap a model containing a LocalSequential "
                                   "(its local backwards run inside forward, so DDP would not average "
                                   "the first step's gradients); use contsup_fast.distributed.LocalDDP(local)")
            return self._run(x.detach(), y, scaler, train=True)
        if y is None:
            return self._run(x, None, None, train=False).logits
        return self._run(x, y, None, train=False)

    def _local_loss(self, m: LocalModule, out: Tensor, y: Tensor, x: Tensor, backend) -> Tensor:
        if m.head is None:
            return F.cross_entropy(loss_precision(out), y)
        feats = m.head(out, backend)
        if isinstance(m.head, GroupHeads):
            loss = group_loss(feats, y)
        elif self.loss_name == "ce":
            loss = F.cross_entropy(loss_precision(feats), y)
        else:
            loss = supervised_contrastive_loss(feats, y)
        if m.decoder is None:
            return loss
        recon = m.decoder(out, denormalize(x, self.image_mean, self.image_std))
        r = m.index / (self.K - 2) if self.K > 2 else 0.0
        w = self.reconstruct_weights
        return (w[0] * (1 - r) + w[2] * r) * recon + (w[1] * (1 - r) + w[3] * r) * loss

    def module_step(self, m: LocalModule, h: Optional[Tensor], inputs: Dict[int, Tensor], x: Tensor,
                    y: Optional[Tensor], scaler, train: bool, backend) -> Tuple[Tensor, Tensor, Optional[Tensor]]:
        """One local module: its boundary context, its body, its local loss and (training) that
        loss's backward. The single place a local module runs; :meth:`_run` and the
        multi-process drivers (:mod:`contsup_fast.distributed`) call it in module order.

        Args:
            m: the local module j.
            h: (N, C, H, W) detached output of module j-1 (None for j = 0).
            inputs: ``i -> a_i`` detached inputs of earlier modules that m's R terms read.
            x: (N, C_img, H_img, W_img) the normalised image (detached).
            y: (N,) int64 labels, or None (no loss).
            train: run the local backward (gradients accumulate into ``.grad``).

        Returns:
            ``(h_j, a_j, loss)``: module j's detached output, its detached input, and its
            detached local loss (None without labels). Every activation of the module is
            released when this returns.
        """
        a = x if m.index == 0 else (m.context(h, inputs, x, backend) if m.context is not None else h)
        del h  # with context terms a is a new tensor: module j-1's output can be freed now
        out = m.body(a)
        loss = None
        if y is not None:
            loss = self._local_loss(m, out, y, x, backend)
            if train:
                (scaler.scale(loss) if scaler is not None else loss).backward()
            loss = loss.detach()
        return out.detach(), a.detach(), loss

    @torch.no_grad()
    def _set_ramp(self) -> None:
        """Write the ramp gate ``g = min(1, t / context_gate_steps)`` into every boundary (on the
        device, no host synchronisation)."""
        if self.context_gate != "ramp":
            return
        g = (self.context_gate_step.float() / self.context_gate_steps).clamp(max=1.0)
        for m in self.local_modules:
            if m.context is not None:
                m.context.ramp.copy_(g)

    def _run(self, x: Tensor, y: Optional[Tensor], scaler, train: bool) -> LocalOutput:
        backend = self.backend_for(x.device)
        self._set_ramp()
        if train and self._graphed is not None:
            out = LocalOutput(*self._graphed(x, y, scaler, backend))
            if self.context_gate == "ramp":
                self.context_gate_step += 1
            return out
        keep = self.spec.n  # how many module inputs a_i later boundaries still read
        inputs: Dict[int, Tensor] = {}
        losses: List[Tensor] = []
        # module j-1's output is handed to module_step through this list, so that no name here
        # keeps it alive while module j runs (its boundary frees it once a_j is built)
        carry: List[Optional[Tensor]] = [None]
        for m in self.local_modules:
            h, a, loss = self.module_step(m, carry.pop(), inputs, x, y, scaler, train, backend)
            carry.append(h)
            del h
            if train:
                for hook in self._module_step_hooks.values():
                    hook(m)
            if loss is not None:
                losses.append(loss)
            if keep:
                inputs[m.index] = a
                inputs.pop(m.index - keep, None)
            del a
        if train and self.context_gate == "ramp":
            self.context_gate_step += 1
        loss_vec = torch.stack(losses) if losses else torch.empty(0, device=x.device)
        return LocalOutput(logits=carry[0], loss=loss_vec[-1] if losses else loss_vec, local_losses=loss_vec)

    # ------------------------------------------------------------------ export and summary
    def to_module(self) -> "ContSupInference":
        """A plain ``nn.Module`` for inference (a deep copy in eval mode, eager ops only) that
        returns the same logits as ``local.eval()(x)`` and that ``torch.export`` accepts."""
        self._set_ramp()
        return ContSupInference(self).eval()

    def summary(self) -> str:
        """A table: each local module's blocks, context terms, head, parameters and output shape;
        with width groups also the module's multiply-accumulates per example, in all and per
        group (one worker: the full-width entry block plus its 1/G share of the grouped ones)."""
        G = self.width_groups
        rows = [("j", "blocks", "context", "head", "params", "out shape")
                + (("MACs", f"MACs/group (G={G})") if G > 1 else ())]
        in_shape = self.input_size
        for m in self.local_modules:
            ctx = m.context.describe() if m.context is not None else ("-" if m.index else "x")
            if m.head is None:
                head = "model classifier"
            else:
                head = m.head.describe() if hasattr(m.head, "describe") else self.aux
                head = (f"{G}x{head}" if G > 1 else head) + ("+decoder" if m.decoder is not None else "")
            params = sum(p.numel() for p in m.parameters())
            blocks = m.blocks[0] if len(m.blocks) == 1 else f"{m.blocks[0]} .. {m.blocks[-1]} ({len(m.blocks)})"
            lay = self.layouts[m.index] if m.index < len(self.layouts) else None
            kind = f" {lay.kind}" if lay is not None and lay.channels_last else ""  # CNN rows unchanged
            row = (str(m.index), blocks, ctx, head, f"{params:,}", "x".join(map(str, m.out_shape)) + kind)
            if G > 1:
                full, grouped = body_macs(m.body, in_shape)
                row += (f"{full + grouped:,}", f"{macs_per_group(full, grouped, G):,}")
            rows.append(row)
            in_shape = m.out_shape
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
        return "\n".join(lines)

    def __repr__(self) -> str:
        backends = ", ".join(f"{d}: {b.name}" for d, b in self._backends.items())
        gate = f", context_gate={self.context_gate}" if self.context_gate else ""
        gate += f", context_mean={self.context_mean}" if self.context_mean else ""
        aux = self.aux + (f", aux_depth={self.aux_depth}, aux_pyramid={self.aux_pyramid}"
                          if self.aux == "auglocal" else "")
        aux += f", width_groups={self.width_groups}" if self.width_groups > 1 else ""
        head = (f"LocalSequential(K={self.K}, context={self.spec.name}{gate}, aux={aux}, loss={self.loss_name}, "
                f"split={self.split_source}, backend={self.backend_name} [{backends}])")
        return head + "\n" + self.summary()


class ContSupInference(nn.Module):
    """Inference-only copy of a :class:`LocalSequential`: the bodies and context encoders,
    no auxiliary heads. ``forward(x)`` (N, C, H, W) -> logits (N, classes)."""

    def __init__(self, local: LocalSequential):
        super().__init__()
        self.bodies = nn.ModuleList(copy.deepcopy(m.body) for m in local.local_modules)
        self.contexts = nn.ModuleList(copy.deepcopy(m.context) if m.context is not None else nn.Identity()
                                      for m in local.local_modules)
        self.keep = local.spec.n

    def forward(self, x: Tensor) -> Tensor:
        inputs: Dict[int, Tensor] = {}
        h = x
        for j, (body, context) in enumerate(zip(self.bodies, self.contexts)):
            a = x if j == 0 else (context._forward_eager(h, inputs, x) if isinstance(context, ContextTerms) else h)
            h = body(a)
            if self.keep:
                inputs[j] = a
                inputs.pop(j - self.keep, None)
        return h
