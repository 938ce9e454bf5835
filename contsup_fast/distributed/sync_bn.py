"""SyncBatchNorm for data-parallel local learning, on CUDA (``nn.SyncBatchNorm``) and on the CPU
(gloo, autograd-aware all-reduce of the batch statistics)."""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ..local import LocalSequential

__all__ = ["convert_sync_batchnorm"]


class _CPUSyncBatchNorm(nn.SyncBatchNorm):
    """``nn.SyncBatchNorm`` that also works on the CPU (gloo): in training the per-channel
    sum, sum of squares and count are all-reduced with the autograd-aware
    ``torch.distributed.nn.functional.all_reduce``, so the normalisation and its gradient use
    the statistics of the concatenated batch. CUDA inputs use ``nn.SyncBatchNorm`` itself."""

    def forward(self, input: Tensor) -> Tensor:
        group = self.process_group or dist.group.WORLD
        if (input.device.type == "cuda" or not self.training or not dist.is_initialized()
                or dist.get_world_size(group) == 1):
            return super().forward(input)
        import warnings
        from torch.distributed.nn.functional import all_reduce  # autograd-aware (sums gradients)
        dims = [d for d in range(input.dim()) if d != 1]
        x = input.float()
        count = torch.tensor([x.numel() / x.shape[1]], dtype=torch.float32, device=x.device)
        stats = torch.cat([x.sum(dims), (x * x).sum(dims), count])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # its successor has no autograd on gloo
            stats = all_reduce(stats, group=group)
        C = x.shape[1]
        n = stats[-1]
        mean = stats[:C] / n
        var = (stats[C:2 * C] / n - mean * mean).clamp_min(0)
        shape = [1, C] + [1] * (input.dim() - 2)
        out = (x - mean.view(shape)) * torch.rsqrt(var.view(shape) + self.eps)
        if self.affine:
            out = out * self.weight.view(shape) + self.bias.view(shape)
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked += 1
                m = (self.momentum if self.momentum is not None
                     else 1.0 / float(self.num_batches_tracked))
                nn_ = float(n)
                self.running_mean.mul_(1 - m).add_(mean.detach(), alpha=m)
                self.running_var.mul_(1 - m).add_(var.detach() * nn_ / max(nn_ - 1, 1), alpha=m)
        return out.to(input.dtype)


def convert_sync_batchnorm(local: LocalSequential, process_group=None) -> LocalSequential:
    """Every BatchNorm of ``local`` (bodies, auxiliary heads, context encoders, decoders)
    becomes a synchronised one (statistics of the whole, all-process batch), and the
    boundary ops switch to the eager "torch" backend: the fused backends compute batch
    statistics themselves, per process. In place; returns ``local``."""
    nn.SyncBatchNorm.convert_sync_batchnorm(local, process_group)
    for mod in local.modules():
        if type(mod) is nn.SyncBatchNorm:
            mod.__class__ = _CPUSyncBatchNorm
    from ..fused import resolve_backend
    local.backend_name = "torch"
    local._backends = {d: resolve_backend("torch", d) for d in local._backends}
    return local
