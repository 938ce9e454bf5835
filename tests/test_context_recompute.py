"""Context terms at a non-integer scale (no fused op covers them) are recomputed in the
backward (contsup_fast.context.recomputed_term): same values, gradients and running
statistics as the plain eager encoder, and only the source is kept between forward and
backward."""
import copy

import pytest
import torch
from torch import nn

from contsup_fast import LocalSequential
from contsup_fast.context import ImageEncoder, ResidualEncoder, recomputed_term
from contsup_fast.memory import SavedTensorMeter


def _randomise_bn(enc: nn.Module, g: torch.Generator) -> None:
    for m in enc.modules():
        if isinstance(m, nn.BatchNorm2d):
            with torch.no_grad():
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g))
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)


@pytest.mark.parametrize("kind", ["image", "residual"])
@pytest.mark.parametrize("momentum", [0.1, None])
def test_recomputed_term_equals_the_plain_encoder(kind, momentum):
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    enc = ImageEncoder(3, 24) if kind == "image" else ResidualEncoder(5, 24, source=0)
    for m in enc.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.momentum = momentum
    _randomise_bn(enc, g)
    enc = enc.double()
    twin = copy.deepcopy(enc)
    src = torch.randn(3, 3 if kind == "image" else 5, 23, 19, generator=g, dtype=torch.float64)
    size = (7, 6)  # 23/7 and 19/6 are not integers
    src1, src2 = src.clone().requires_grad_(), src.clone().requires_grad_()
    w = torch.randn(3, 24, *size, generator=g, dtype=torch.float64)
    out1 = recomputed_term(enc, src1, size)
    out2 = twin(src2, size)
    torch.testing.assert_close(out1, out2, rtol=0, atol=0)
    (out1 * w).sum().backward()
    (out2 * w).sum().backward()
    torch.testing.assert_close(src1.grad, src2.grad, rtol=1e-12, atol=1e-12)
    for (n, p1), p2 in zip(enc.named_parameters(), twin.parameters()):
        torch.testing.assert_close(p1.grad, p2.grad, rtol=1e-12, atol=1e-12, msg=n)
    for (n, b1), b2 in zip(enc.named_buffers(), twin.buffers()):  # updated once, not twice
        torch.testing.assert_close(b1, b2, rtol=0, atol=0, msg=n)


def test_recomputed_term_keeps_only_the_source():
    torch.manual_seed(0)
    enc = ImageEncoder(3, 64)
    x = torch.randn(2, 3, 64, 64)
    with SavedTensorMeter(ignore=list(enc.parameters()) + list(enc.buffers())) as plain:
        enc(x, (7, 7)).sum().backward()
    with SavedTensorMeter(ignore=list(enc.parameters()) + list(enc.buffers())) as recomputed:
        recomputed_term(enc, x, (7, 7)).sum().backward()
    full = 2 * 64 * 64 * 64 * 4  # one (N, 64, 64, 64) float32 map
    assert plain.peak > 2 * full  # the eager encoder keeps several full-resolution maps
    assert recomputed.peak < full / 4


def test_recomputed_term_is_the_plain_call_in_eval_and_without_grad():
    enc = ImageEncoder(3, 8)
    x = torch.randn(2, 3, 20, 20)
    with torch.no_grad():
        out = recomputed_term(enc, x, (3, 3))
    assert out.grad_fn is None
    enc.eval()
    torch.testing.assert_close(recomputed_term(enc, x, (3, 3)), enc(x, (3, 3)))


class _AlexLike(nn.Module):
    """A 64x64 input reaching a 7x7 boundary: a non-integer scale (64/7)."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 16, 5, stride=3, padding=2), nn.ReLU(), nn.MaxPool2d(3, 3),
            nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 32, 3, padding=1), nn.ReLU())
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(32, 10)

    def forward(self, x):
        return self.fc(torch.flatten(self.pool(self.features(x)), 1))


@pytest.mark.parametrize("context", ["E", "R1", "R1E"])
def test_local_step_at_non_integer_scale_saves_little(context, monkeypatch):
    torch.manual_seed(0)
    local = LocalSequential(_AlexLike(), K=2, context=context, input_size=(3, 64, 64), backend="torch")
    assert "16x22x22" in repr(local)  # the boundary: 64 / 22 is not an integer
    ref = copy.deepcopy(local)
    x, y = torch.randn(4, 3, 64, 64), torch.tensor([1, 2, 3, 4])
    weights = list(local.parameters()) + list(local.buffers())
    with SavedTensorMeter(ignore=weights) as meter:
        out = local(x, y)
    # the same step with the plain eager encoders (what recomputed_term replaced)
    monkeypatch.setattr("contsup_fast.context.recomputed_term", lambda enc, src, size: enc(src, size))
    with SavedTensorMeter(ignore=list(ref.parameters()) + list(ref.buffers())) as ref_meter:
        ref_out = ref(x, y)
    for a, b in zip(out.local_losses, ref_out.local_losses):
        torch.testing.assert_close(a, b)
    for (n, p), q in zip(local.named_parameters(), ref.parameters()):
        if p.grad is not None or q.grad is not None:
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6, msg=n)
    for (n, b), c in zip(local.named_buffers(), ref.buffers()):
        torch.testing.assert_close(b, c, msg=n)
    # the context encoder's full-resolution maps (N, 16, 64, 64) are not kept
    assert meter.peak < ref_meter.peak - 4 * 16 * 64 * 64 * 4
