"""GN-DGL width-wise modularity (Patel et al., "Local Learning with Neuron Groups";
reference github.com/adeetyapatel12/GN-DGL, ``single_thread/commands.sh``: ResNet-32, 1c2f heads,
``--groups G``, ``--eval-ensemble --ensemble-type layerwise``).

Each local module's width is split into G *groups* of channels that train as separate
workers:

* **Grouped convolutions.** :func:`group_modules` converts, in every local module, every
  convolution of every residual block (downsample shortcut included) to ``groups=G``, except,
  in the first block after a boundary, the convolutions that read the block's input
  (``conv1`` and the ``downsample`` shortcut), which stay full so that the groups mix at
  module entry; that block's later convolutions are grouped. This is the reference's
  ``_make_layer`` (``first_conv_groups=1`` after a cut, ``conv2`` always ``groups=G``). The
  stem (the convolutions of module 0 before its first block) stays full. The
  conversion is done *in place* on the wrapped model's blocks (they are the modules the local
  modules run), with fresh weights initialised as the CIFAR ResNets are
  (N(0, sqrt(2/(k*k*C_out))), bias 0). Models that can be grouped: those built of residual
  blocks, our :class:`~contsup_fast.models.BasicBlock` (CIFAR ResNets) and torchvision's
  ``BasicBlock``/``Bottleneck`` with ``groups=1``; anything else is refused with a ValueError.
* **Heads.** :class:`GroupHeads`: G ``1c2f`` auxiliary heads over the full width; head g
  reads the module output with every other group's channels detached, so it sees all groups
  in forward but its gradient reaches only group g. As the reference's ``AuxClassifier``
  (``networks/split_auxiliary_nets.py``), every head doubles the width with a stride-2
  convolution, at the widest stage too (ContSup's heads keep the width there).
* **Loss.** :func:`contsup_fast.losses.group_loss`: sum of the G cross-entropies + 0.5 x the
  diversity term at T = 3.
* **Evaluation.** The final classifier (``local.eval()(x)``, what the CLI reports), or the
  reference's layer-wise ensemble :func:`ensemble_predict`.
* **Compute.** :func:`body_macs` counts each module's multiply-accumulates per group, the
  per-worker compute that GN-DGL optimises (``LocalSequential.summary()`` shows it).
"""
from __future__ import annotations

import warnings
from typing import List, Sequence, Tuple

import torch
from torch import Tensor, nn

from .auglocal import initialise, is_residual_block
from .heads import AuxiliaryHead

__all__ = ["check_width_groups", "reads_block_input", "group_modules", "GroupHeads", "body_macs", "macs_per_group", "ensemble_predict"]


def check_width_groups(G) -> int:
    """Validate ``width_groups`` (None or an integer >= 1); returns G (1 for None).

    Raises:
        ValueError: naming the option, the value and what is allowed.
    """
    if G is None:
        return 1
    if not isinstance(G, int) or isinstance(G, bool) or G < 1:
        raise ValueError(f"width_groups must be None or an integer >= 1 (channel groups per local "
                         f"module, GN-DGL), got {G!r}")
    return G


def _has_conv(m: nn.Module) -> bool:
    return any(isinstance(c, nn.Conv2d) for c in m.modules())


def _grouped_conv(conv: nn.Conv2d, G: int, where: str) -> nn.Conv2d:
    if conv.groups != 1:
        raise ValueError(f"width_groups={G}: {where} is already a grouped convolution (groups={conv.groups}); "
                         f"width-wise groups need models whose convolutions have groups=1")
    if conv.in_channels % G or conv.out_channels % G:
        raise ValueError(f"width_groups={G} must divide the channels of every grouped convolution; "
                         f"{where} has {conv.in_channels} input and {conv.out_channels} output channels")
    new = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                    conv.dilation, groups=G, bias=conv.bias is not None, padding_mode=conv.padding_mode,
                    device=conv.weight.device, dtype=conv.weight.dtype)
    initialise(new)
    return new


def reads_block_input(conv_name: str) -> bool:
    """True for the convolutions of a residual block that read the block's input: ``conv1``
    and the shortcut's (``downsample.*``); in the first block after a boundary they stay full."""
    return conv_name == "conv1" or conv_name.startswith("downsample.")


def group_modules(pieces: Sequence[nn.Module], G: int, model_name: str = "model") -> List[List[str]]:
    """Convert the residual blocks of each local module's body to ``groups=G`` in place (see
    module docstring). ``pieces`` are the K fx GraphModules of the split.

    Returns:
        For each local module, the names of its blocks that were grouped.

    Raises:
        ValueError: a piece holds convolutions outside residual blocks (other than the stem),
        a convolution is already grouped, or G does not divide its channels.

    Source: GN-DGL ``Multilayer_GN_DGL/networks/resnet.py``, ``_make_layer`` and
    ``BasicBlock`` (``first_conv_groups`` for ``conv1`` and the shortcut, ``groups`` for ``conv2``).
    """
    grouped: List[List[str]] = []
    any_block = False
    for j, piece in enumerate(pieces):
        names = []
        seen_block = False
        for node in piece.graph.nodes:
            if node.op != "call_module":
                continue
            m = piece.get_submodule(node.target)
            if not is_residual_block(m):
                if _has_conv(m) and (j > 0 or seen_block):
                    raise ValueError(
                        f"width_groups={G}: {model_name} cannot be grouped: its layer {node.target!r} "
                        f"({type(m).__name__}) is not a residual block. Width-wise groups need a model built of "
                        f"residual blocks: the CIFAR ResNets (contsup_fast.models) or torchvision ResNets")
                continue
            first_after_boundary = j > 0 and not seen_block
            seen_block = any_block = True
            if G == 1:
                continue
            converted = False
            for name, child in list(m.named_modules()):
                for attr, conv in list(child.named_children()):
                    if not isinstance(conv, nn.Conv2d):
                        continue
                    where = f"{name + '.' if name else ''}{attr}"
                    if first_after_boundary and reads_block_input(where):
                        continue
                    setattr(child, attr, _grouped_conv(conv, G, f"{node.target}.{where}"))
                    converted = True
            if converted:
                names.append(str(node.target))
        grouped.append(names)
    if not any_block:
        raise ValueError(f"width_groups={G}: {model_name} cannot be grouped: it has no residual blocks. Width-wise "
                         f"groups need a model built of residual blocks: the CIFAR ResNets (contsup_fast.models) "
                         f"or torchvision ResNets")
    if G > 1 and not any(grouped):
        warnings.warn(f"width_groups={G}: no convolution was grouped; use fewer, deeper modules "
                      f"(smaller K)", stacklevel=3)
    return grouped


class GroupGradient(torch.autograd.Function):
    """Identity in forward (returns a view of ``h``, so every head's saved input is the same
    storage, not a copy); in backward keeps only channel slice ``g`` of ``G`` contiguous
    slices of the gradient and zeroes the rest. Equivalent to concatenating ``h``'s slice g
    with the other slices detached, without G copies of ``h``."""

    @staticmethod
    def forward(ctx, h: Tensor, g: int, groups: int) -> Tensor:
        ctx.g, ctx.groups = g, groups
        return h.view_as(h)

    @staticmethod
    def backward(ctx, grad: Tensor):
        out = torch.zeros_like(grad)
        width = grad.shape[1] // ctx.groups
        sl = slice(ctx.g * width, (ctx.g + 1) * width)
        out[:, sl] = grad[:, sl]
        return out, None, None


class GroupHeads(nn.Module):
    """The G auxiliary heads of one GN-DGL local module: (N, C, H, W) -> G x (N, out_features).

    Head g is an :class:`~contsup_fast.heads.AuxiliaryHead` (``config``, default ``1c2f``) over
    all C channels; its input is the module output with the channels of every group but g
    (contiguous slices of C/G channels) detached.

    Raises:
        ValueError: G does not divide C.
    """

    def __init__(self, in_channels: int, groups: int, out_features: int, config: str = "1c2f",
                 widest: bool = False, feature_dim: int = 128):
        super().__init__()
        if in_channels % groups:
            raise ValueError(f"width_groups={groups} must divide the channels of every local module's output; "
                             f"one has {in_channels}")
        self.groups = groups
        self.heads = nn.ModuleList(AuxiliaryHead(in_channels, config, out_features, widest=widest,
                                                 feature_dim=feature_dim) for _ in range(groups))

    def group_inputs(self, h: Tensor) -> List[Tensor]:
        """For each g, ``h`` with every channel slice but g's detached (:class:`GroupGradient`)."""
        return [GroupGradient.apply(h, g, self.groups) for g in range(self.groups)]

    def forward(self, h: Tensor, backend) -> List[Tensor]:
        return [head(x, backend) for head, x in zip(self.heads, self.group_inputs(h))]


def body_macs(body: nn.Module, in_shape: Sequence[int]) -> Tuple[int, int]:
    """Multiply-accumulates of one example through ``body`` at input (C, H, W): convolutions
    (``H_out*W_out*C_out*C_in/groups*kh*kw``) and linear layers (``in*out``).

    Returns:
        ``(full, grouped)``: MACs of ungrouped layers, and of grouped convolutions (all groups
        together; one group does ``grouped / groups`` of them).
    """
    counts = [0, 0]

    def hook(m, inp, out):
        if isinstance(m, nn.Conv2d):
            macs = out[0].numel() * (m.in_channels // m.groups) * m.kernel_size[0] * m.kernel_size[1]
            counts[1 if m.groups > 1 else 0] += macs
        else:
            counts[0] += m.in_features * m.out_features

    handles = [m.register_forward_hook(hook) for m in body.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    param = next(body.parameters(), None)
    was_training = body.training
    body.eval()
    try:
        with torch.no_grad():
            body(torch.zeros(1, *in_shape, device=param.device if param is not None else None,
                             dtype=param.dtype if param is not None else None))
    finally:
        body.train(was_training)
        for h in handles:
            h.remove()
    return counts[0], counts[1]


@torch.no_grad()
def ensemble_predict(local, x: Tensor) -> Tensor:
    """The reference's layer-wise ensemble (GN-DGL ``--eval-ensemble --ensemble-type layerwise``):
    ``sum_k w_k p_k`` with ``w_k = 2^k / sum_j 2^j`` over modules k = 0..K-1, where ``p_k`` is
    the softmax averaged over module k's G group heads (its single head without groups), and
    the model's own classifier for the last module.

    Args:
        local: a :class:`~contsup_fast.LocalSequential` (switched to eval mode and back).
        x: (N, C, H, W) normalised images.

    Returns:
        (N, classes) fp32 class probabilities.
    """
    if local.loss_name != "ce":
        raise ValueError(f"ensemble_predict needs heads that output class logits (loss='ce'), "
                         f"got loss={local.loss_name!r}")
    was_training = local.training
    local.eval()
    try:
        backend = local.backend_for(x.device)
        keep = local.spec.n
        inputs, h, total = {}, None, None
        K = len(local)
        norm = float(2 ** K - 1)
        for m in local.local_modules:
            h, a, _ = local.module_step(m, h, inputs, x, None, None, False, backend)
            if m.head is None:
                p = torch.softmax(h.float(), dim=1)
            else:
                out = m.head(h, backend)
                outs = out if isinstance(out, list) else [out]
                p = torch.stack([torch.softmax(z.float(), dim=1) for z in outs]).mean(0)
            p = p * (2 ** m.index / norm)
            total = p if total is None else total + p
            if keep:
                inputs[m.index] = a
                inputs.pop(m.index - keep, None)
        return total
    finally:
        local.train(was_training)


def macs_per_group(full: int, grouped: int, groups: int) -> int:
    """One group's (one worker's) MACs: the full-width layers it runs whole plus its share of
    the grouped ones."""
    return full + grouped // max(groups, 1)

