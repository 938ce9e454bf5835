"""Local losses: softmax cross-entropy, supervised contrastive, InfoPro reconstruction, and the
GN-DGL group loss (cross-entropies of the G group heads plus a diversity term)."""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["LOSSES", "loss_precision", "supervised_contrastive_loss", "ReconstructionDecoder",
           "group_diversity", "group_loss"]

LOSSES = ("ce", "supcon")


def loss_precision(t: Tensor) -> Tensor:
    """``t`` in the precision a loss is computed in: half precision (fp16, bf16, as autocast
    produces) is upcast to float32; float32 and float64 are returned unchanged, so a float64
    run keeps float64 losses and gradients end to end (the reference code casts nothing)."""
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


def supervised_contrastive_loss(features: Tensor, labels: Tensor, temperature: float = 0.07,
                                base_temperature: float = 0.07) -> Tensor:
    """Supervised contrastive loss on one view (Khosla et al., NeurIPS 2020, Eq. 2 "L_out").

    Args:
        features: (N, D) embeddings; L2-normalised here.
        labels: (N,) int64 class indices.
        temperature: tau (0.07 in ContSup).

    Returns:
        0-dim loss (fp32 for half-precision features, else their dtype): the mean over anchors that have at least one positive of
        ``-(tau/tau_b) * mean_{p in P(i)} log softmax_{a != i}(z_i . z_a / tau)_p``.
        Anchors with no positive in the batch are left out (0 if none has one).
    """
    z = F.normalize(loss_precision(features), dim=1)
    n = z.shape[0]
    logits = z @ z.T / temperature
    self_mask = torch.eye(n, dtype=torch.bool, device=z.device)
    logits = logits.masked_fill(self_mask, float("-inf"))
    log_prob = logits - torch.logsumexp(logits, dim=1, keepdim=True)
    positives = (labels[:, None] == labels[None, :]) & ~self_mask
    n_pos = positives.sum(1)
    mean_log_pos = torch.where(positives, log_prob, torch.zeros_like(log_prob)).sum(1) / n_pos.clamp(min=1)
    has_pos = n_pos > 0
    loss = -(temperature / base_temperature) * mean_log_pos
    return (loss * has_pos).sum() / has_pos.sum().clamp(min=1)


class ReconstructionDecoder(nn.Module):
    """InfoPro decoder (Wang et al., ICLR 2021, Sec. 3.3): upsample to the image size
    (bilinear) -> Conv3x3(C->12) -> BN -> ReLU -> Conv3x3(12->3) -> sigmoid, trained with
    binary cross-entropy against the de-normalised image in [0, 1].

    The sigmoid is folded into ``binary_cross_entropy_with_logits`` (the same function,
    numerically stable and allowed under autocast).
    """

    def __init__(self, in_channels: int, image_channels: int = 3, hidden: int = 12):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(in_channels, hidden, 3, padding=1), nn.BatchNorm2d(hidden), nn.ReLU(),
            nn.Conv2d(hidden, image_channels, 3, padding=1))

    def forward(self, h: Tensor, image01: Tensor) -> Tensor:
        """h (N, C, H, W), image01 (N, 3, H_img, W_img) in [0, 1] -> 0-dim BCE loss."""
        up = F.interpolate(h, size=image01.shape[-2:], mode="bilinear", align_corners=True)
        logits = loss_precision(self.net(up))
        return F.binary_cross_entropy_with_logits(logits, image01.to(logits.dtype))


#: GN-DGL's epsilon in both normalisations of the diversity term (``utils.py``, ``div_loss_calc``).
DIVERSITY_EPS = 1e-8


def group_diversity(logits: Sequence[Tensor], labels: Tensor, temperature: float = 3.0) -> Tensor:
    """GN-DGL diversity term over the G group heads (Patel et al., GN-DGL; github.com/adeetyapatel12/GN-DGL).

    For each head g: ``p_g = softmax(z_g / T)``; the true class is set to 0 and ``p_g`` is
    renormalised to sum 1, then L2-normalised (each with the reference's epsilon
    :data:`DIVERSITY_EPS` in the denominator). The term is the dot product ``<p_g, p_h>``
    averaged over all ordered pairs of different heads (g != h) and over the batch; it is
    small when the heads disagree on the wrong classes.

    Args:
        logits: G >= 2 tensors (N, classes).
        labels: (N,) int64.
        temperature: T (3 in GN-DGL).

    Returns:
        0-dim tensor in [0, 1] (fp32 for half-precision logits, else their dtype).
    """
    if len(logits) < 2:
        raise ValueError(f"group_diversity needs at least 2 heads, got {len(logits)}")
    ps = []
    for z in logits:
        p = torch.softmax(loss_precision(z) / temperature, dim=1)
        p = p.scatter(1, labels[:, None], 0.0)
        # the reference's epsilons (utils.py ``div_loss_calc``): p / (sum + 1e-8), then
        # p / sqrt(sum p^2 + 1e-8); they shift the term by ~1e-8 relative, so they are kept
        p = p / (p.sum(1, keepdim=True) + DIVERSITY_EPS)
        ps.append(p / torch.sqrt(p.square().sum(1, keepdim=True) + DIVERSITY_EPS))
    P = torch.stack(ps)                                # (G, N, classes)
    G = P.shape[0]
    gram = torch.einsum("gnc,hnc->ghn", P, P)          # (G, G, N)
    off = gram.sum((0, 1)) - torch.diagonal(gram, dim1=0, dim2=1).sum(-1)
    return off.mean() / (G * (G - 1))


def group_loss(logits: Sequence[Tensor], labels: Tensor, diversity_weight: float = 0.5,
               temperature: float = 3.0) -> Tensor:
    """GN-DGL local loss: ``sum_g CE(z_g, y) + diversity_weight * group_diversity(z, y, T)``
    (0.5 and T=3 in GN-DGL). A single head gives its cross-entropy alone."""
    ce = sum(F.cross_entropy(loss_precision(z), labels) for z in logits)
    if len(logits) < 2:
        return ce
    return ce + diversity_weight * group_diversity(logits, labels, temperature)


def denormalize(x: Tensor, mean: Sequence[float], std: Sequence[float]) -> Tensor:
    """Undo per-channel normalisation: (N, C, H, W) -> x * std + mean."""
    m = torch.as_tensor(mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    s = torch.as_tensor(std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    return x * s + m
