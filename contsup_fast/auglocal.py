"""AugLocal augmented auxiliary networks (Ma et al., "Scaling Supervised Local Learning with
Augmented Auxiliary Networks", ICLR 2024; reference code github.com/ChenxiangMA/AugLocal,
``networks/auxiliary_nets.py`` (``AuxNetwork``, ``net_config='unifSamp'``) and
``networks/resnet.py`` (the pyramidal depth list)).

The auxiliary head of local module i is a fresh copy of the *architecture* of a few later
layers of the network, sampled uniformly, then global average pooling and a linear classifier.

* **Layers.** A layer is one piece between cut points at the finest split of the model
  (:mod:`contsup_fast.splitting`): a CIFAR ResNet-32 has n = 16 layers, the stem and 15
  residual blocks. Local module i ends at layer l_i.
* **Depth schedule** (pyramid, coefficient gamma): for i = 0..K-2,
  ``d_i = max(1, round(d * (1 - i*gamma/(K-2)) + i*gamma/(K-2)))`` with Python's ``round``
  (halves to even), as the reference; ``gamma=None`` keeps d everywhere.
* **Picked layers.** If ``d_i >= n-1-l`` all later layers ``l+1..n-1``, else
  ``round(l + (n-l-1)/d_i * k)`` for k = 1..d_i; the last pick is always layer n-1.
* **Blocks.** Each pick becomes a fresh block whose output channels are the picked layer's.
  Downsampling: the reference counts a pending stride for every halving between consecutive
  picks (it reads this off the channel doubling ``log2(C_pick/C_prev)``; we read it off the
  spatial size, ``log2(H_prev/H_pick)``, which is the same number on the CIFAR ResNets and
  stays right on models whose channels grow without downsampling, e.g. Bottleneck stages);
  a block applies stride 2 while one is pending, and the rest carries to the next pick.
  Residual blocks (our :class:`~contsup_fast.models.BasicBlock`, torchvision ``BasicBlock``
  and ``Bottleneck``) are rebuilt at the head's input width and that stride, with a
  1x1 convolution + BatchNorm shortcut where shapes differ. Any other layer is copied
  (architecture only, parameters re-initialised) after a 1x1 convolution + BatchNorm
  projection to the shape it expects, where the head's shape differs from it.
* **Tail.** Global average pooling, BatchNorm1d only when ``d_i <= 1``, Linear to the classes.

Weights are never shared with the backbone: every head is built from new modules (or deep
copies that are re-initialised), with the reference's initialisation (convolutions
N(0, sqrt(2/(k*k*C_out))), BatchNorm weight 1 and bias 0, Linear PyTorch's default).
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import torch.fx as fx
from torch import Tensor, nn

__all__ = ["depth_schedule", "pick_layers", "HeadPlan", "plan_heads", "Layer", "finest_layers",
           "AugLocalHead", "check_options", "is_residual_block", "initialise"]

Shape = Tuple[int, int, int]


def check_options(depth, pyramid) -> None:
    """Validate ``aux_depth`` (integer >= 1) and ``aux_pyramid`` (None or a number in [0, 1]).

    Raises:
        ValueError: naming the option, the value given and what is allowed.
    """
    if not isinstance(depth, int) or isinstance(depth, bool) or depth < 1:
        raise ValueError(f"aux_depth must be an integer >= 1 (layers in each AugLocal head), got {depth!r}")
    if pyramid is not None and (isinstance(pyramid, bool) or not isinstance(pyramid, (int, float))
                                or not 0.0 <= float(pyramid) <= 1.0):
        raise ValueError(f"aux_pyramid must be None or a number in [0, 1] (the AugLocal pyramid "
                         f"coefficient gamma), got {pyramid!r}")


def depth_schedule(depth: int, pyramid: Optional[float], K: int) -> List[int]:
    """Depths d_0..d_{K-2} of the K-1 auxiliary heads (AugLocal ``networks/resnet.py``,
    ``aux_depth_list``): ``max(1, round(d*(1 - i*g/(K-2)) + i*g/(K-2)))``; ``pyramid=None``
    gives d for every head. K = 2 has one head of depth d."""
    check_options(depth, pyramid)
    if pyramid is None or K <= 2:
        return [depth] * max(K - 1, 0)
    out = []
    for i in range(K - 1):
        t = (i * pyramid) / (K - 2)
        out.append(max(1, round(depth * (1 - t) + t * 1)))
    return out


def pick_layers(end: int, n_layers: int, depth: int) -> List[int]:
    """Layers copied by the head of a module ending at layer ``end`` (AugLocal
    ``auxiliary_nets.py``, ``unifSamp``): all later layers if ``depth >= n-1-end``, else
    ``round(end + (n-end-1)/depth*k)`` for k = 1..depth."""
    if depth >= n_layers - 1 - end:
        return list(range(end + 1, n_layers))
    return [round(end + (n_layers - end - 1) / depth * k) for k in range(1, depth + 1)]


@dataclass(frozen=True)
class HeadPlan:
    """What the AugLocal head of local module ``module`` is made of.

    Attributes:
        module: i, the local module (0..K-2).
        end_layer: l_i, the last layer of module i.
        depth: d_i from :func:`depth_schedule`.
        picks: the picked layer indices.
        strides: the stride of each head block (1 or 2).
        channels: the output channels of each head block.
        in_shape: (C, H, W) of the module output the head reads.
    """

    module: int
    end_layer: int
    depth: int
    picks: Tuple[int, ...]
    strides: Tuple[int, ...]
    channels: Tuple[int, ...]
    in_shape: Shape


def plan_heads(layer_shapes: Sequence[Shape], ends: Sequence[int], depth: int,
               pyramid: Optional[float]) -> List[HeadPlan]:
    """Plan the K-1 heads from the output shapes (C, H, W) of the n layers and the end layer
    of each of the first K-1 modules (K = len(ends) + 1).

    Raises:
        ValueError: a picked layer is not downsampled from its predecessor by a power of 2.
    """
    K = len(ends) + 1
    depths = depth_schedule(depth, pyramid, K)
    n = len(layer_shapes)
    plans = []
    for i, (end, d_i) in enumerate(zip(ends, depths)):
        picks = pick_layers(end, n, d_i)
        strides, channels = [], []
        pending = 0
        prev_h = layer_shapes[end][1]
        for p in picks:
            c, h, _ = layer_shapes[p]
            ratio = prev_h / h
            halvings = round(math.log2(ratio)) if ratio >= 1 else -1
            if halvings < 0 or 2 ** halvings != ratio:
                raise ValueError(
                    f"aux='auglocal': layer {p} has spatial size {h}, layer before it in the head has {prev_h}; "
                    f"AugLocal heads need each picked layer to downsample by a power of 2")
            pending += halvings
            stride = 2 if pending >= 1 else 1
            pending -= stride - 1
            strides.append(stride)
            channels.append(c)
            prev_h = h
        plans.append(HeadPlan(i, end, d_i, tuple(picks), tuple(strides), tuple(channels),
                              tuple(layer_shapes[end])))
    return plans


@dataclass
class Layer:
    """One layer of the finest split: ``name`` (its nodes), ``block`` (the residual block it
    consists of, if it is one of the rebuildable kinds, else None), ``graph`` (a standalone
    GraphModule of its nodes up to its last 4-D output, sharing the model's modules) and its
    input/output shapes (C, H, W)."""

    index: int
    name: str
    block: Optional[nn.Module]
    graph: fx.GraphModule
    in_shape: Shape
    out_shape: Shape


def is_residual_block(m: nn.Module) -> bool:
    """True for the residual blocks AugLocal rebuilds and GN-DGL groups: our CIFAR
    :class:`~contsup_fast.models.BasicBlock` and torchvision's ``BasicBlock``/``Bottleneck``."""
    from .models.cifar_resnet import BasicBlock
    if isinstance(m, BasicBlock):
        return True
    try:
        from torchvision.models import resnet as tv
    except ImportError:  # pragma: no cover
        return False
    return isinstance(m, (tv.BasicBlock, tv.Bottleneck))


def _global_pool(n: fx.Node, modules) -> bool:
    """The classifier's pooling (adaptive pools), which ends the last layer's feature map."""
    import torch.nn.functional as F
    if n.op == "call_module":
        return isinstance(modules[n.target], (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d))
    return n.op == "call_function" and n.target in (F.adaptive_avg_pool2d, F.adaptive_max_pool2d)


def finest_layers(gm: fx.GraphModule, candidates: Sequence[str], shapes, input_size: Sequence[int]) -> List[Layer]:
    """The n = len(candidates)+1 layers of a traced model (see :mod:`contsup_fast.splitting`)."""
    from .splitting import _piece

    modules = dict(gm.named_modules())
    nodes = [n for n in gm.graph.nodes if n.op not in ("get_attr",)]
    bounds = [i for i, n in enumerate(nodes) if n.name in set(candidates)]
    layers, start = [], 0
    inp = next(n for n in nodes if n.op == "placeholder")
    in_shape = tuple(input_size)
    for idx, b in enumerate(bounds + [len(nodes) - 1]):
        seg = [n for n in nodes[start: b + 1] if n.op not in ("placeholder", "output")]
        spatial = [k for k, n in enumerate(seg) if len(shapes.get(n.name, ())) == 4 and not _global_pool(n, modules)]
        if not spatial:
            raise ValueError(f"aux='auglocal': layer {idx} of {type(gm).__name__} has no 4-D feature map to copy")
        seg = seg[: spatial[-1] + 1]
        out_shape = tuple(shapes[seg[-1].name][1:])
        blocks = [modules[n.target] for n in seg if n.op == "call_module" and is_residual_block(modules[n.target])]
        block = blocks[0] if len(blocks) == 1 and len(seg) == 1 else None
        labels = [str(n.target) if n.op == "call_module" else n.name for n in seg]
        name = labels[0] if len(labels) == 1 else f"{labels[0]}..{labels[-1]}"
        layers.append(Layer(idx, name, block, _piece(gm, seg, inp), in_shape, out_shape))
        in_shape, inp, start = out_shape, nodes[b], b + 1
    return layers


def _shortcut(cin: int, cout: int, stride: int) -> Optional[nn.Module]:
    if cin == cout and stride == 1:
        return None
    return nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout))


def _rebuild(block: nn.Module, cin: int, cout: int, stride: int) -> nn.Module:
    from .models.cifar_resnet import BasicBlock
    if isinstance(block, BasicBlock):
        return BasicBlock(cin, cout, stride)  # adds the 1x1 conv + BN shortcut where shapes differ
    from torchvision.models import resnet as tv
    if isinstance(block, tv.BasicBlock):
        return tv.BasicBlock(cin, cout, stride, _shortcut(cin, cout, stride))
    exp = tv.Bottleneck.expansion
    if cout % exp:
        raise ValueError(f"aux='auglocal': a Bottleneck head block needs output channels divisible by {exp}, "
                         f"got {cout}")
    groups = block.conv2.groups
    base_width = block.conv1.out_channels * 64 // (groups * (block.conv3.out_channels // exp))
    return tv.Bottleneck(cin, cout // exp, stride, _shortcut(cin, cout, stride), groups=groups,
                         base_width=base_width)


def _copy_layer(layer: Layer, shape: Shape) -> nn.Module:
    """A re-initialised copy of a layer, behind a 1x1 conv + BN projection where ``shape``
    (the head's current (C, H, W)) differs from the shape the layer expects."""
    body = copy.deepcopy(layer.graph)
    for m in body.modules():
        owns = any(True for _ in m.parameters(recurse=False))
        if owns and not isinstance(m, (nn.Conv2d, nn.BatchNorm2d)) and not hasattr(m, "reset_parameters"):
            raise ValueError(f"aux='auglocal': layer {layer.index} ({layer.name}) cannot be reproduced standalone: "
                             f"its {type(m).__name__} has parameters but no reset_parameters(), so a copy "
                             f"could not be re-initialised")
    (c, h, w), (c0, h0, w0) = shape, layer.in_shape
    if (c, h, w) == (c0, h0, w0):
        return body
    if h % h0 or w % w0 or h // h0 != w // w0:
        raise ValueError(
            f"aux='auglocal': layer {layer.index} ({layer.name}) cannot be reproduced standalone: it expects "
            f"input {c0}x{h0}x{w0}, the head's input there is {c}x{h}x{w} (not an integer downsampling)")
    stride = h // h0
    return nn.Sequential(nn.Conv2d(c, c0, 1, stride=stride, bias=False), nn.BatchNorm2d(c0), body)


def initialise(module: nn.Module) -> None:
    """Re-initialise every submodule as the CIFAR ResNets and the AugLocal reference do:
    convolutions N(0, sqrt(2/(kh*kw*C_out))) with zero bias, BatchNorm weight 1, bias 0 and
    fresh running statistics, anything else with its own ``reset_parameters()``."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
            nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / fan_out))
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
            m.reset_parameters()
        elif hasattr(m, "reset_parameters") and not isinstance(m, nn.Conv2d):
            m.reset_parameters()


class AugLocalHead(nn.Module):
    """AugLocal auxiliary network of one local module: (N, C, H, W) -> (N, out_features).

    Args:
        plan: its :class:`HeadPlan`.
        layers: the model's :func:`finest_layers`.
        out_features: classes (cross-entropy) or the embedding size (supervised contrastive).

    Raises:
        ValueError: a picked layer cannot be reproduced standalone (message names the layer).
    """

    def __init__(self, plan: HeadPlan, layers: Sequence[Layer], out_features: int):
        super().__init__()
        self.plan = plan
        blocks: List[nn.Module] = []
        c, h, w = plan.in_shape
        for p, stride, cout in zip(plan.picks, plan.strides, plan.channels):
            layer = layers[p]
            if layer.block is not None:
                blocks.append(_rebuild(layer.block, c, cout, stride))
                c, h, w = cout, -(-h // stride), -(-w // stride)
            else:
                blocks.append(_copy_layer(layer, (c, h, w)))
                c, h, w = layer.out_shape
        self.blocks = nn.Sequential(*blocks)
        self.norm = nn.BatchNorm1d(c) if plan.depth <= 1 else None
        self.fc = nn.Linear(c, out_features)
        initialise(self)

    def forward(self, h: Tensor, backend) -> Tensor:
        z = backend.global_avg_pool(self.blocks(h))
        if self.norm is not None:
            z = self.norm(z)
        return self.fc(z)

    def describe(self) -> str:
        p = self.plan
        return f"auglocal d={p.depth} layers {','.join(map(str, p.picks))}"
