"""Layouts of the tensors that cross a boundary: NCHW feature maps, NHWC maps, tokens.

A CNN hands (N, C, H, W) feature maps from block to block; Swin (torchvision and timm) hands
(N, H, W, C) maps; a ViT or DeiT hands tokens (N, L, D), the first ``P`` of which are *prefix
tokens* (class, distillation, register tokens) and the other ``gh * gw`` the patch tokens of a
patch grid in row-major order (Dosovitskiy et al., "An Image is Worth 16x16 Words", ICLR 2021).
Context terms, auxiliary heads and decoders must act over the channel axis of whichever
layout crosses; reading an NHWC map as NCHW silently makes a spatial extent the "channels".

Detection (:func:`detect_layout`) reads what the model itself does with the tensor, from the
leaf modules it calls (recorded once with forward hooks at the example input):

* the first *decisive* leaf module after the cut that receives a tensor of the cut's shape
  (its consumer), else the last decisive one before it that produced that shape (its producer);
  a reshape that keeps the batch, the element count and the size of the channel axis counts as
  the same shape (a Swin block works on (N, H*W, C) inside and returns (N, H, W, C));
* decisive for channels-first: convolutions, BatchNorm, GroupNorm, InstanceNorm, spatial
  pooling and ``LayerNorm2d`` (torchvision ConvNeXt, timm); for channels-last: ``nn.Linear``
  over the last axis and a ``LayerNorm`` normalising the last axis only;
* 4-D channels-first is NCHW, 4-D channels-last NHWC, 3-D channels-last tokens; anything else
  (3-D channels-first (N, C, L), 2-D, 5-D, or consumer and producer disagreeing) cannot be
  interpreted and is refused by :func:`require` with a ``ValueError`` naming the model, the
  cut and the shape.

For tokens the patch grid is the output grid of the model's patchify convolution (the first
``Conv2d`` whose stride equals its kernel size) and ``P = L - gh * gw``; where the model says
how many prefix tokens it has (timm's ``num_prefix_tokens``, torchvision's ``class_token``)
the two must agree.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

__all__ = ["Layout", "LeafCall", "LayoutError", "detect_layout", "require", "grid_view", "from_grid",
           "image_layout", "DESCEND"]

#: non-container modules the splitter traces through (they hold the blocks to cut between):
#: torchvision ViT's encoder and timm's Swin stages
DESCEND = {("torchvision.models.vision_transformer", "Encoder"),
           ("timm.models.swin_transformer", "SwinTransformerStage"),
           ("timm.models.swin_transformer_v2", "SwinTransformerV2Stage")}

KINDS = ("NCHW", "NHWC", "tokens")

_FIRST = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.GroupNorm,
          nn.InstanceNorm1d, nn.InstanceNorm2d, nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d,
          nn.AdaptiveMaxPool2d, nn.LocalResponseNorm)


@dataclass(frozen=True)
class LeafCall:
    """One call of a leaf module at the example input: its module, input and output shapes
    (batch included; None where not a tensor)."""

    module: nn.Module
    in_shape: Optional[Tuple[int, ...]]
    out_shape: Optional[Tuple[int, ...]]


class LayoutError(ValueError):
    """A crossing tensor whose layout cannot be interpreted."""


@dataclass(frozen=True)
class Layout:
    """Layout of one example's crossing tensor (batch axis left out).

    Attributes:
        kind: ``"NCHW"`` (shape (C, H, W)), ``"NHWC"`` (shape (H, W, C)) or ``"tokens"``
            (shape (L, D) with ``L = prefix + grid[0] * grid[1]``).
        shape: the per-example shape.
        prefix: number of prefix tokens (tokens only, else 0).
        grid: (H, W) of the feature map, or the patch grid (gh, gw) of the tokens.
    """

    kind: str
    shape: Tuple[int, ...]
    prefix: int = 0
    grid: Tuple[int, int] = (0, 0)

    @property
    def channels(self) -> int:
        """C (NCHW, NHWC) or D (tokens)."""
        return self.shape[0] if self.kind == "NCHW" else self.shape[-1]

    @property
    def channels_last(self) -> bool:
        return self.kind != "NCHW"

    def describe(self) -> str:
        if self.kind == "tokens":
            return (f"tokens (L={self.shape[0]}: {self.prefix} prefix + {self.grid[0]}x{self.grid[1]} grid, "
                    f"D={self.shape[1]})")
        return f"{self.kind} {'x'.join(map(str, self.shape))}"


def image_layout(input_size: Sequence[int]) -> Layout:
    """The layout of the image (C, H, W): NCHW."""
    c, h, w = input_size
    return Layout("NCHW", (c, h, w), 0, (h, w))


def _axis(m: nn.Module, shape: Optional[Tuple[int, ...]], side: str) -> Optional[str]:
    """"first" or "last" when module ``m`` reading (side="in") or producing (side="out") a
    tensor of ``shape`` shows which axis holds the channels, else None."""
    if shape is None:
        return None
    name = type(m).__name__
    if name == "LayerNorm2d" or isinstance(m, _FIRST):
        return "first"
    if isinstance(m, nn.LayerNorm):
        last_only = type(m).forward is nn.LayerNorm.forward or name == "LayerNorm"
        if last_only and tuple(m.normalized_shape) == (shape[-1],):
            return "last"
        return None
    if isinstance(m, nn.Linear):
        width = m.in_features if side == "in" else m.out_features
        return "last" if width == shape[-1] else None
    return None


def _same(other: Tuple[int, ...], shape: Tuple[int, ...], axis: str) -> bool:
    """``other`` is ``shape``, or a reshape of it that keeps the batch and the channel axis
    (same element count, same batch size, same size on the channel axis: (N, H*W, C) against
    (N, H, W, C) for a Swin block that flattens its map inside)."""
    if other == shape:
        return True
    if other[0] != shape[0] or math.prod(other) != math.prod(shape):
        return False
    return other[-1] == shape[-1] if axis == "last" else other[1] == shape[1]


def _evidence(calls_after: Sequence[LeafCall], calls_before: Sequence[LeafCall],
              shape: Tuple[int, ...]) -> Tuple[Optional[str], Optional[str]]:
    consumer = producer = None
    for c in calls_after:
        axis = _axis(c.module, c.in_shape, "in")
        if axis is not None:
            consumer = axis if _same(c.in_shape, shape, axis) else None
            break
    for c in reversed(calls_before):
        axis = _axis(c.module, c.out_shape, "out")
        if axis is not None:
            producer = axis if _same(c.out_shape, shape, axis) else None
            break
    return consumer, producer


def _token_grid(calls: Sequence[LeafCall]) -> Optional[Tuple[int, int]]:
    for c in calls:
        m = c.module
        if isinstance(m, nn.Conv2d) and m.stride == m.kernel_size and c.out_shape is not None \
                and len(c.out_shape) == 4 and m.kernel_size != (1, 1):
            return c.out_shape[-2], c.out_shape[-1]
    return None


def _declared_prefix(model: nn.Module) -> Optional[int]:
    n = getattr(model, "num_prefix_tokens", None)  # timm
    if isinstance(n, int):
        return n
    if type(model).__module__ == "torchvision.models.vision_transformer":
        return 1 if getattr(model, "class_token", None) is not None else 0
    return None


def detect_layout(model: nn.Module, cut: str, shape: Tuple[int, ...], calls_after: Sequence[LeafCall],
                  calls_before: Sequence[LeafCall], all_calls: Sequence[LeafCall]) -> Union[Layout, str]:
    """The layout of the tensor of batched ``shape`` crossing at ``cut``, or a message saying
    why it cannot be interpreted (see the module docstring for the rules).

    Args:
        model: the model (its class name goes into messages; its declared prefix is checked).
        cut: the cut point's name.
        shape: batched shape of the crossing tensor.
        calls_after, calls_before: leaf-module calls after and before the cut, in call order.
        all_calls: every leaf-module call of the model (to find the patchify convolution).
    """
    where = f"{type(model).__name__}, cut {cut!r}, shape {tuple(shape)}"
    consumer, producer = _evidence(calls_after, calls_before, shape)
    if consumer and producer and consumer != producer:
        return (f"cannot interpret the layout of the tensor crossing at ({where}): the module after "
                f"the cut reads its channels on the {consumer} axis, the one before writes them on the {producer}")
    axis = consumer or producer
    per = tuple(shape[1:])
    if axis is None:
        return (f"cannot interpret the layout of the tensor crossing at ({where}): no convolution, "
                f"norm, pooling or linear layer next to the cut shows which axis holds the channels")
    if len(per) == 3:
        return Layout("NCHW", per, 0, per[1:]) if axis == "first" else Layout("NHWC", per, 0, per[:2])
    if len(per) == 2 and axis == "last":
        grid = _token_grid(all_calls)
        if grid is None:
            return (f"cannot interpret the tokens crossing at ({where}): no patchify convolution "
                    f"(a Conv2d with stride equal to its kernel) gives their patch grid")
        prefix = per[0] - grid[0] * grid[1]
        declared = _declared_prefix(model)
        if prefix < 0 or (declared is not None and declared != prefix):
            return (f"cannot interpret the tokens crossing at ({where}): {per[0]} tokens against a "
                    f"{grid[0]}x{grid[1]} patch grid and {declared} declared prefix tokens")
        return Layout("tokens", per, prefix, grid)
    return (f"cannot interpret the layout of the tensor crossing at ({where}): supported are "
            f"(N, C, H, W), (N, H, W, C) and tokens (N, L, D); this one has its channels on the {axis} axis")


def require(layout: Union[Layout, str]) -> Layout:
    """Return ``layout``, or raise :class:`LayoutError` (a ``ValueError``) with its message."""
    if isinstance(layout, str):
        raise LayoutError(layout)
    return layout


def grid_view(t: Tensor, layout: Layout) -> Tuple[Tensor, Optional[Tensor]]:
    """A batched tensor of ``layout`` as a (N, C, H, W) grid and its prefix tokens.

    Returns:
        ``(grid, prefix)``: grid (N, C, H, W) (a view or a permuted copy), prefix (N, P, C)
        for tokens with P > 0, else None.
    """
    if layout.kind == "NCHW":
        return t, None
    if layout.kind == "NHWC":
        return t.permute(0, 3, 1, 2), None
    gh, gw = layout.grid
    p = layout.prefix
    patches = t[:, p:].transpose(1, 2).reshape(t.shape[0], t.shape[2], gh, gw)
    return patches, (t[:, :p] if p else None)


def from_grid(grid_last: Tensor, prefix: Optional[Tensor], layout: Layout) -> Tensor:
    """Inverse of :func:`grid_view` for channels-last layouts: ``grid_last`` (N, H, W, C) and
    ``prefix`` (N, P, C) or None (zeros) to a batched tensor of ``layout`` (NHWC or tokens)."""
    if layout.kind == "NHWC":
        return grid_last
    n, h, w, c = grid_last.shape
    tokens = grid_last.reshape(n, h * w, c)
    if layout.prefix:
        if prefix is None:
            prefix = tokens.new_zeros(n, layout.prefix, c)
        tokens = torch.cat([prefix, tokens], dim=1)
    return tokens
