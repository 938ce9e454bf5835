"""Context supply, auxiliary heads and decoders for channels-last boundaries: tokens (N, L, D)
of a ViT or DeiT and (N, H, W, C) maps of a Swin (:mod:`contsup_fast.layouts`).

Context (ContSup, arXiv 2312.07636, Sec. 3.2: ``a_{j+1} = h_j + sum_t M_t(c_t)``, in token space;
see ``docs/transformers.md``):

* **E** (:class:`PatchEmbedEncoder`): the image patch-embedded onto the target grid: a fresh
  patchify convolution (kernel = stride = p, p = image size / grid size: the model's patch
  size for a ViT, 4, 8, 16, 32 at the four stages of a Swin), a norm, a linear projection to D.
  The patch tokens receive it; the prefix tokens receive nothing (zero): they carry no
  position on the grid, and the class token's content is the model's to gather.
* **R_n** (:class:`TokenResidualEncoder`): the earlier module input ``a_i`` seen as a grid,
  average-pooled onto the target grid when the grid changes (Swin's patch merging), a
  per-token linear projection to D, a norm. Prefix tokens receive the same projection of the
  source's prefix tokens when the two counts agree (ViT: the class token's own earlier state),
  else nothing. The image ``a_0`` (R-only modes) is a source like any other (an NCHW grid).
* The last op of each term is scaled by ``scale`` at initialisation (the norm's weight for R,
  the projection's weight for E); the norm (:data:`NORMS`) and the scale default to
  :data:`DEFAULT_NORM` and :data:`DEFAULT_SCALE`, chosen by the measurement in
  ``docs/transformers.md``. ``context_gate`` and ``context_mean`` act as for CNNs
  (:class:`~contsup_fast.context.ContextTerms`).

These terms run eagerly: the fused boundary ops of :mod:`contsup_fast.fused` are for (N, C, H,
W) maps and are never handed a token or NHWC tensor.

Heads (any ``loss``; ``out_features`` classes or the embedding size):

* default (:class:`TokenHead`): the class token (token 0) where there are prefix tokens, else
  the mean of the patch tokens (of the map for NHWC), then LayerNorm -> Linear(D, feature_dim)
  -> GELU -> Linear(feature_dim, out);
* ``aux="dgl"`` (:class:`TokenDGLHead`): DGL's mlp-sr with its 1x1 convolutions as per-token
  linears: three times Linear(D, D) -> LayerNorm -> GELU per token, the mean of the patch
  tokens, three times Linear(D, D) -> LayerNorm -> GELU, Linear(D, out);
* ``aux="auglocal"`` (:class:`TokenAugLocalHead`): re-initialised copies of later blocks
  (AugLocal's uniform picks), then the default head's pooling, LayerNorm and a linear
  classifier; refused where a picked block cannot read what the previous one gives;
* ``reconstruct=True`` (:class:`TokenDecoder`): the patch tokens -> LayerNorm -> Linear(D,
  C_img * p * p) -> the p x p pixels of each patch (a linear pixel decoder as MAE's), binary
  cross-entropy against the de-normalised image as InfoPro's decoder: InfoPro's image
  reconstruction on a transformer, the "InfoPro-Transformer" baseline of Pathak et al. 2022
  ("Local Learning on Transformers via Feature Reconstruction", arXiv 2212.14215); their own
  method reconstructs the module's input features instead and is not implemented here.
"""
from __future__ import annotations

import copy
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import auglocal
from .context import ContextTerms
from .layouts import Layout, from_grid, grid_view
from .losses import loss_precision

__all__ = ["NORMS", "DEFAULT_NORM", "DEFAULT_SCALE", "ChannelNorm", "PatchEmbedEncoder",
           "TokenResidualEncoder", "TokenContext", "TokenHead", "TokenDGLHead", "TokenAugLocalHead",
           "TokenDecoder", "patch_size", "pool", "block_layers", "resolve_aux", "auglocal_heads"]

#: norms of the token context terms: LayerNorm over D, or BatchNorm over D (statistics over
#: the batch and the tokens)
NORMS = ("layer", "batch")
#: chosen by measurement (docs/transformers.md, ``bench.token_context``: BatchNorm at scale 1
#: gave the best R1E test accuracy of the settings tried; one seed, within noise: provisional)
DEFAULT_NORM = "batch"
DEFAULT_SCALE = 1.0


def patch_size(image_size: Sequence[int], layout: Layout, what: str) -> int:
    """The side p of the image patch under one grid cell of ``layout``.

    Raises:
        ValueError: the image (H, W) is not p times the grid for one integer p.
    """
    (h, w), (gh, gw) = tuple(image_size), layout.grid
    if gh <= 0 or h % gh or w % gw or h // gh != w // gw:
        raise ValueError(f"{what}: the image ({h}x{w}) is not an integer multiple p of the "
                         f"{gh}x{gw} grid of {layout.describe()}")
    return h // gh


class ChannelNorm(nn.Module):
    """A norm over the last (channel) axis of (..., C): LayerNorm(C), or BatchNorm over C with
    statistics over every other axis. Weight initialised to ``scale``, bias to 0."""

    def __init__(self, kind: str, channels: int, scale: float = 1.0):
        super().__init__()
        if kind not in NORMS:
            raise ValueError(f"token context norm must be one of {NORMS}, got {kind!r}")
        self.kind = kind
        self.norm = nn.LayerNorm(channels) if kind == "layer" else nn.BatchNorm1d(channels)
        with torch.no_grad():
            self.norm.weight.fill_(float(scale))

    def forward(self, z: Tensor) -> Tensor:
        if self.kind == "layer":
            return self.norm(z)
        return self.norm(z.reshape(-1, z.shape[-1])).reshape(z.shape)


class PatchEmbedEncoder(nn.Module):
    """E for a channels-last target: image (N, C_img, H, W) -> Conv(C_img -> hidden, kernel =
    stride = p) -> norm -> Linear(hidden -> D) -> the target layout (prefix tokens zero).

    ``hidden = min(D, C_img * p * p)`` (the patch's own size when it is smaller than D).
    """

    def __init__(self, image_channels: int, image_size: Sequence[int], layout: Layout, norm: str,
                 scale: float, source: int = 0):
        super().__init__()
        p = patch_size(image_size, layout, "context E")
        hidden = min(layout.channels, image_channels * p * p)
        self.layout, self.source = layout, source
        self.patchify = nn.Conv2d(image_channels, hidden, p, stride=p)
        self.norm = ChannelNorm(norm, hidden)
        self.proj = nn.Linear(hidden, layout.channels)
        with torch.no_grad():
            self.proj.weight.mul_(float(scale))
            self.proj.bias.zero_()

    def forward(self, x: Tensor) -> Tensor:
        z = self.patchify(x).permute(0, 2, 3, 1)  # (N, gh, gw, hidden)
        return from_grid(self.proj(self.norm(z)), None, self.layout)


class TokenResidualEncoder(nn.Module):
    """R term for a channels-last target: ``a_i`` of layout ``source_layout`` -> grid, average
    pooled onto the target grid where it differs -> per-token Linear(C_src -> D) -> norm; the
    prefix tokens get the same projection of ``a_i``'s prefix tokens when the counts agree."""

    def __init__(self, source_layout: Layout, layout: Layout, source: int, norm: str, scale: float):
        super().__init__()
        self.source_layout, self.layout, self.source = source_layout, layout, source
        self.proj = nn.Linear(source_layout.channels, layout.channels)
        self.norm = ChannelNorm(norm, layout.channels, scale)
        self.keep_prefix = layout.prefix > 0 and source_layout.prefix == layout.prefix

    def forward(self, a: Tensor) -> Tensor:
        grid, prefix = grid_view(a, self.source_layout)
        if tuple(grid.shape[-2:]) != tuple(self.layout.grid):
            grid = F.adaptive_avg_pool2d(grid, self.layout.grid)
        z = self.norm(self.proj(grid.permute(0, 2, 3, 1)))
        p = self.norm(self.proj(prefix)) if self.keep_prefix else None
        return from_grid(z, p, self.layout)

    def extra_repr(self) -> str:
        return f"source=a_{self.source}"


class TokenContext(ContextTerms):
    """The context terms at one boundary whose ``h`` is tokens or an NHWC map.

    Args:
        layout: the layout of ``h``.
        image_channels: channels of the image (E), or None without E.
        image_size: (H, W) of the image.
        residual: ``(source index i, layout of a_i)`` for every R term.
        norm, scale: the terms' norm (:data:`NORMS`) and initial scale (None:
            :data:`DEFAULT_NORM`, :data:`DEFAULT_SCALE`, read when the context is built).
        gate, gate_init, mean: as :class:`~contsup_fast.context.BoundaryContext`.

    ``forward(h, inputs, x, backend)``: ``h`` of ``layout`` (detached), ``inputs`` ``i -> a_i``,
    ``x`` the image; returns ``h + sum_t g_t T_t`` (or the mean) in ``layout``. The backend is
    not used (eager ops only).

    Raises:
        ValueError: ``norm`` unknown, or the image is not p times the grid (E).
    """

    def __init__(self, layout: Layout, image_channels: Optional[int], image_size: Sequence[int],
                 residual: Sequence[Tuple[int, Layout]], norm: Optional[str] = None,
                 scale: Optional[float] = None, gate: Optional[str] = None, gate_init: float = 0.1,
                 mean: bool = False):
        super().__init__()
        norm = DEFAULT_NORM if norm is None else norm
        scale = DEFAULT_SCALE if scale is None else scale
        self.layout = layout
        self.image = PatchEmbedEncoder(image_channels, image_size, layout, norm, scale) if image_channels else None
        self.residual = nn.ModuleList(TokenResidualEncoder(src, layout, i, norm, scale) for i, src in residual)
        self._init_gating(gate, gate_init, mean)

    def forward(self, h: Tensor, inputs, x: Tensor, backend=None) -> Tensor:
        return self._forward_eager(h, inputs, x)

    def _forward_eager(self, h: Tensor, inputs, x: Tensor) -> Tensor:
        scales = self.scales()
        c = self.h_scale()
        out = h if c is None else h * c
        terms = ([self.image(x)] if self.image is not None else []) + [
            enc(inputs[enc.source]) for enc in self.residual]
        for t, g in zip(terms, scales):
            out = out + (t if g is None else t * g)
        return out


def resolve_aux(aux: Optional[str], width_groups: int, layouts: Sequence[Layout], model_name: str) -> str:
    """The auxiliary head for boundaries of ``layouts``: ``aux=None`` gives ``"token"`` where a
    token or NHWC tensor crosses, else ``"1c2f"``.

    Raises:
        ValueError: a convolutional ``<a>c<b>f`` head or ``width_groups > 1`` on a model with a
            token or NHWC boundary; ``aux="token"`` on a model whose boundaries are all NCHW.
    """
    from .heads import AUX_CONFIGS, AUX_METHODS
    channels_last = [lay for lay in layouts if lay.channels_last]
    if channels_last and (width_groups > 1 or aux in AUX_CONFIGS):
        what = f"width_groups={width_groups}" if width_groups > 1 else f"aux={aux!r}"
        raise ValueError(f"{what} is a convolutional head for (N, C, H, W) feature maps, but {model_name} "
                         f"hands {channels_last[0].describe()} across a boundary; use aux=None (the token "
                         f"head), 'dgl' or 'auglocal' without width_groups")
    if aux == "token" and layouts and not channels_last:
        raise ValueError(f"aux='token' is the head for tokens and (N, H, W, C) maps, but every boundary of "
                         f"{model_name} carries (N, C, H, W) maps; use aux=None or one of {AUX_METHODS}")
    if aux is None:
        return "token" if channels_last else "1c2f"
    return aux


def pool(h: Tensor, layout: Layout, class_token: bool = True) -> Tensor:
    """(N, C): the class token (token 0) where ``class_token`` and there are prefix tokens,
    else the mean of the patch tokens / of the NHWC map."""
    if layout.kind == "tokens":
        if class_token and layout.prefix:
            return h[:, 0]
        return h[:, layout.prefix:].mean(dim=1)
    return h.mean(dim=(1, 2))


class TokenHead(nn.Module):
    """Default auxiliary head for tokens / NHWC: pool -> LayerNorm(D) -> Linear(D, feature_dim)
    -> GELU -> Linear(feature_dim, out_features). Input of ``layout``, output (N, out)."""

    def __init__(self, layout: Layout, out_features: int, feature_dim: int = 128):
        super().__init__()
        self.layout = layout
        self.norm = nn.LayerNorm(layout.channels)
        self.mlp = nn.Sequential(nn.Linear(layout.channels, feature_dim), nn.GELU(),
                                 nn.Linear(feature_dim, out_features))

    def forward(self, h: Tensor, backend=None) -> Tensor:
        return self.mlp(self.norm(pool(h, self.layout)))

    def describe(self) -> str:
        src = "cls" if self.layout.kind == "tokens" and self.layout.prefix else "mean"
        return f"{src}->LN->MLP({self.mlp[0].out_features})"


def _mlp(width: int, n: int) -> List[nn.Module]:
    layers: List[nn.Module] = []
    for _ in range(n):
        layers += [nn.Linear(width, width), nn.LayerNorm(width), nn.GELU()]
    return layers


class TokenDGLHead(nn.Module):
    """DGL mlp-sr for tokens / NHWC (see the module docstring): (N, ...) -> (N, out_features)."""

    def __init__(self, layout: Layout, out_features: int):
        super().__init__()
        self.layout = layout
        d = layout.channels
        self.tokens = nn.Sequential(*_mlp(d, 3))
        self.mlp = nn.Sequential(*_mlp(d, 3), nn.Linear(d, out_features))

    def forward(self, h: Tensor, backend=None) -> Tensor:
        return self.mlp(pool(self.tokens(h), self.layout, class_token=False))

    def describe(self) -> str:
        return "dgl token-MLP"


def block_layers(plan) -> List[Tuple[str, nn.Module, Tuple[int, ...], Tuple[int, ...]]]:
    """The blocks AugLocal may copy: ``(name, module, input shape, output shape)`` (per example)
    of the module ending at each candidate cut, then of the last block of the model (the
    block after the last candidate). Raises ValueError where a candidate is not a module."""
    gm = plan.gm
    modules = dict(gm.named_modules())
    nodes = list(gm.graph.nodes)
    names = list(plan.candidates)
    after = nodes.index(next(n for n in nodes if n.name == names[-1])) if names else -1
    last = next((n for n in nodes[after + 1:] if n.op == "call_module" and len(plan.shapes.get(n.name, ())) in (3, 4)
                 and any(True for _ in modules[n.target].children())), None)
    by_name = {n.name: n for n in nodes}
    out = []
    for n in [by_name[c] for c in names] + ([last] if last is not None else []):
        if n.op != "call_module":
            raise ValueError(f"aux='auglocal': cut point {n.name} is not a block to copy")
        src = n.args[0]
        out.append((str(n.target), modules[n.target], tuple(plan.shapes[src.name][1:]), tuple(plan.shapes[n.name][1:])))
    return out


def _reinitialised(name: str, block: nn.Module) -> nn.Module:
    body = copy.deepcopy(block)
    for m in body.modules():
        reset = getattr(m, "reset_parameters", None) or getattr(m, "_reset_parameters", None)
        if reset is not None:
            reset()
        elif any(True for _ in m.parameters(recurse=False)):
            raise ValueError(f"aux='auglocal': block {name} cannot be copied: its {type(m).__name__} has "
                             f"parameters but no reset_parameters(), so a copy could not be re-initialised")
    return body


class TokenAugLocalHead(nn.Module):
    """AugLocal head for tokens / NHWC: copies of the picked blocks (re-initialised), pool,
    LayerNorm, Linear.

    Args:
        layout: layout of the module output.
        blocks: :func:`block_layers` of the model.
        picks: the picked block indices (:func:`contsup_fast.auglocal.pick_layers`).
        depth: d_i.
        out_features: classes or the embedding size.

    Raises:
        ValueError: a picked block does not read the shape the head has there.
    """

    def __init__(self, layout: Layout, blocks, picks: Sequence[int], depth: int, out_features: int):
        super().__init__()
        self.layout, self.picks, self.depth = layout, tuple(picks), depth
        shape = layout.shape
        copies = []
        for p in picks:
            name, block, in_shape, out_shape = blocks[p]
            if in_shape != shape:
                raise ValueError(f"aux='auglocal' cannot build the head of a module ending with shape {layout.shape}: "
                                 f"picked block {name} reads {in_shape}, the head has {shape} there (blocks that "
                                 f"change the grid or width between picks are not reproduced); use aux=None or 'dgl'")
            copies.append(_reinitialised(name, block))
            shape = out_shape
        if shape != layout.shape and not (layout.kind == "NHWC" and len(shape) == 3):
            raise ValueError(f"aux='auglocal': the picked blocks end with tokens of shape {shape}, not "
                             f"{layout.shape}, whose prefix and grid are unknown")
        self.out_layout = layout if shape == layout.shape else Layout("NHWC", shape, 0, shape[:2])
        self.blocks = nn.Sequential(*copies)
        self.norm = nn.LayerNorm(self.out_layout.channels)
        self.fc = nn.Linear(self.out_layout.channels, out_features)

    def forward(self, h: Tensor, backend=None) -> Tensor:
        return self.fc(self.norm(pool(self.blocks(h), self.out_layout)))

    def describe(self) -> str:
        return f"auglocal d={self.depth} blocks {','.join(map(str, self.picks))}"


def auglocal_heads(plan, layouts: Sequence[Layout], depth: int, pyramid, out_features: int) -> List[nn.Module]:
    """The K-1 AugLocal heads of a model whose boundaries are all channels-last."""
    blocks = block_layers(plan)
    depths = auglocal.depth_schedule(depth, pyramid, len(plan.cuts) + 1)
    heads = []
    for cut, layout, d in zip(plan.cuts, layouts, depths):
        picks = auglocal.pick_layers(plan.candidates.index(cut), len(blocks), d)
        heads.append(TokenAugLocalHead(layout, blocks, picks, d, out_features))
    return heads


class TokenDecoder(nn.Module):
    """Token decoder to the image: patch tokens (or the NHWC map) -> LayerNorm -> Linear(D,
    C_img * p * p) -> (N, C_img, H, W) logits; ``forward(h, image01)`` returns the binary
    cross-entropy (0-dim; fp16/bf16 computed in fp32) against the de-normalised image in [0, 1].

    Raises:
        ValueError: the image is not p times the grid.
    """

    def __init__(self, layout: Layout, image_channels: int, image_size: Sequence[int]):
        super().__init__()
        self.layout = layout
        self.p = patch_size(image_size, layout, "reconstruct=True (token decoder)")
        self.norm = nn.LayerNorm(layout.channels)
        self.proj = nn.Linear(layout.channels, image_channels * self.p * self.p)

    def forward(self, h: Tensor, image01: Tensor) -> Tensor:
        grid, _ = grid_view(h, self.layout)  # (N, D, gh, gw)
        z = self.proj(self.norm(grid.permute(0, 2, 3, 1))).permute(0, 3, 1, 2)  # (N, C*p*p, gh, gw)
        logits = loss_precision(F.pixel_shuffle(z, self.p))
        return F.binary_cross_entropy_with_logits(logits, image01.to(logits.dtype))
