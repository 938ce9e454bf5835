"""The image-context op of the torch backend (batch-chunked recompute) against the eager encoder E."""
import copy

import pytest
import torch

from contsup_fast import LocalSequential
from contsup_fast.context import BoundaryContext, ImageEncoder
from contsup_fast.fused import BACKENDS, available_backends, resolve_backend
from contsup_fast.fused.chunked import default_chunk, image_context_chunked
from contsup_fast.fused.reference import image_context_ref
from contsup_fast.memory import AllocationPeak

# per-dtype tolerances of the op against the eager composition in the same dtype
TOL = {torch.float32: dict(rtol=1e-4, atol=1e-5), torch.bfloat16: dict(rtol=5e-2, atol=5e-2),
       torch.float16: dict(rtol=1e-2, atol=1e-2)}
# parameter gradients are sums over the batch and image: looser in low precision
GRAD_TOL = {torch.float32: dict(rtol=1e-4, atol=1e-4), torch.bfloat16: dict(rtol=1e-1, atol=1e-1),
            torch.float16: dict(rtol=2e-2, atol=2e-2)}


def _inputs(n, c_in, c, hw, s, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, c, hw[0], hw[1], generator=g).to(dtype)
    u = torch.randn(n, c_in, s * hw[0], s * hw[1], generator=g).relu().to(dtype)
    params = [torch.randn(c, c_in, 3, 3, generator=g) * 0.3, torch.randn(c, generator=g) * 0.1,
              torch.rand(c, generator=g) + 0.5, torch.randn(c, generator=g) * 0.1]
    running = [torch.randn(c, generator=g) * 0.1, torch.rand(c, generator=g) + 0.5]
    return h, u, params, running


def _encoder_pair(c, seed=0):
    torch.manual_seed(seed)
    enc = ImageEncoder(3, c)
    with torch.no_grad():  # non-trivial affine parameters and running statistics
        for bn in (enc.bn1, enc.bn2):
            bn.weight.uniform_(0.5, 1.5), bn.bias.uniform_(-0.2, 0.2)
            bn.running_mean.uniform_(-0.1, 0.1), bn.running_var.uniform_(0.5, 1.5)
    return enc, copy.deepcopy(enc)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("s", [1, 2, 4])
@pytest.mark.parametrize("training", [True, False])
def test_op_matches_the_reference_composition(dtype, s, training):
    # odd sizes: batch 5 in chunks of 2, 7 channels, a 3x5 target
    h, u, params, running = _inputs(5, 12, 7, (3, 5), s, dtype)
    u.requires_grad_(True)
    ps = [p.requires_grad_(True) for p in params]
    out, mean, var = image_context_chunked(h, u, *ps, *running, training, 1e-5, chunk=2)
    # the reference convolves in the activations' dtype (as under autocast)
    ref_ps = [p.to(dtype) if i < 2 else p for i, p in enumerate(ps)]
    ref, rmean, rvar = image_context_ref(h, u, *ref_ps, *running, training, 1e-5)
    assert out.dtype == ref.dtype and out.shape == h.shape
    torch.testing.assert_close(out, ref, **TOL[dtype])
    torch.testing.assert_close(mean, rmean.float(), **TOL[dtype])
    torch.testing.assert_close(var, rvar.float(), **TOL[dtype])
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(dtype)
    got = torch.autograd.grad(out, [u] + ps, grad)
    want = torch.autograd.grad(ref, [u] + ps, grad)
    for name, a, b in zip(["u", "weight", "bias", "bn_weight", "bn_bias"], got, want):
        assert a.dtype == b.dtype, name
        torch.testing.assert_close(a.float(), b.float(), **GRAD_TOL[dtype], msg=name)


@pytest.mark.parametrize("training", [True, False])
def test_gradcheck_float64(training):
    h, u, params, running = _inputs(3, 1, 2, (1, 2), 2, torch.float64)
    args = [t.double().requires_grad_(True) for t in [h, u] + params]
    rm, rv = (t.double() for t in running)

    def f(*a):
        return image_context_chunked(*a, rm, rv, training, 1e-5, chunk=2)[0]

    assert torch.autograd.gradcheck(f, args, fast_mode=True)


@pytest.mark.parametrize("chunk", [1, 3, 64, None])
def test_chunking_does_not_change_the_result(chunk):
    h, u, params, running = _inputs(7, 4, 5, (4, 4), 2)
    ps = [p.requires_grad_(True) for p in params]
    out, mean, var = image_context_chunked(h, u, *ps, *running, True, 1e-5, chunk=chunk)
    ref, rmean, rvar = image_context_ref(h, u, *ps, *running, True, 1e-5)
    torch.testing.assert_close(out, ref, **TOL[torch.float32])
    torch.testing.assert_close(var, rvar)
    torch.testing.assert_close(torch.autograd.grad(out.sum(), ps), torch.autograd.grad(ref.sum(), ps),
                               **GRAD_TOL[torch.float32])
    assert default_chunk(7, 2) == 2 and default_chunk(7, 1) == 7 and default_chunk(3, 4) == 1


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
@pytest.mark.parametrize("s", [1, 2, 4])
def test_encoder_add_to_matches_the_eager_encoder(memory_format, s):
    """Forward, every parameter gradient and both BatchNorms' running statistics, in training
    (two steps, so running statistics compound) and then in eval."""
    enc, ref = _encoder_pair(6)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(5, 3, 4 * s, 3 * s, generator=g).contiguous(memory_format=memory_format)
    h = torch.randn(5, 6, 4, 3, generator=g).contiguous(memory_format=memory_format)
    for _ in range(2):
        out = enc.add_to(h, x, image_context_chunked)
        want = h + ref(x, h.shape[-2:])
        torch.testing.assert_close(out, want, **TOL[torch.float32])
        grad = torch.randn(out.shape, generator=g)
        out.backward(grad)
        want.backward(grad)
    for (k, p), (_, q) in zip(enc.named_parameters(), ref.named_parameters()):
        torch.testing.assert_close(p.grad, q.grad, **GRAD_TOL[torch.float32], msg=k)
    for (k, b), (_, c) in zip(enc.named_buffers(), ref.named_buffers()):
        torch.testing.assert_close(b, c, rtol=1e-5, atol=1e-6, msg=k)
    enc.eval(), ref.eval()
    with torch.no_grad():
        torch.testing.assert_close(enc.add_to(h, x, image_context_chunked), h + ref(x, h.shape[-2:]),
                                   **TOL[torch.float32])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_encoder_add_to_under_autocast(dtype):
    enc, ref = _encoder_pair(8)
    g = torch.Generator().manual_seed(5)
    x, h = torch.randn(4, 3, 16, 16, generator=g), torch.randn(4, 8, 8, 8, generator=g)
    with torch.autocast("cpu", dtype=dtype):
        out = enc.add_to(h, x, image_context_chunked)
        want = h + ref(x, h.shape[-2:])
    assert out.dtype == want.dtype
    torch.testing.assert_close(out, want, **TOL[dtype])
    out.float().sum().backward()
    want.float().sum().backward()
    for (k, p), (_, q) in zip(enc.named_parameters(), ref.named_parameters()):
        torch.testing.assert_close(p.grad, q.grad, **GRAD_TOL[dtype], msg=k)
    for (k, b), (_, c) in zip(enc.named_buffers(), ref.named_buffers()):
        torch.testing.assert_close(b, c, **TOL[dtype], msg=k)


def test_bad_inputs_name_the_argument():
    h, u, params, running = _inputs(2, 3, 4, (2, 2), 2)
    with pytest.raises(ValueError, match="integer multiple"):
        image_context_chunked(h, u[..., :3], *params, *running, True)
    with pytest.raises(ValueError, match="weight must have shape"):
        image_context_chunked(h, u, params[0][:, :2], *params[1:], *running, True)
    with pytest.raises(ValueError, match="bn_bias must have shape"):
        image_context_chunked(h, u, *params[:3], params[3][:2], *running, True)
    with pytest.raises(ValueError, match="chunk must be a positive integer"):
        image_context_chunked(h, u, *params, *running, True, chunk=0)
    with pytest.raises(ValueError, match="batch size"):
        image_context_chunked(h, u[:1], *params, *running, True)


def test_transient_is_bounded_by_one_chunk():
    """Forward and backward in chunks of one image never allocate the batch's convolution output."""
    n, c, s = 16, 32, 4
    h, u, params, running = _inputs(n, 12, c, (4, 4), s)
    u.requires_grad_(True)
    ps = [p.requires_grad_(True) for p in params]
    full_z = n * c * (4 * s) ** 2 * 4
    with AllocationPeak("cpu") as fused:
        out = image_context_chunked(h, u, *ps, *running, True, 1e-5, chunk=1)[0]
        out.sum().backward()
    with AllocationPeak("cpu") as eager:
        out = image_context_ref(h, u, *ps, *running, True, 1e-5)[0]
        out.sum().backward()
    assert eager.peak > 2 * full_z  # z, its BatchNorm output and their gradients coexist
    # the op's own output, u's gradient, plus a handful of one-image temporaries
    grad_u = u.numel() * 4
    assert fused.peak - grad_u < 8 * full_z / n, (fused.peak, grad_u, full_z)


def test_every_backend_has_the_op():
    for name in [b for b in BACKENDS if b != "auto"]:
        if name in available_backends("cpu"):
            assert callable(resolve_backend(name, "cpu").image_context)
    assert resolve_backend("torch").image_context is image_context_chunked


def _eager_image_term(self, out, x, op, g=None):
    """The eager encoder E (the previous torch path), scaled by g (a gate or the context mean)."""
    term = self.image(x, out.shape[-2:])
    return out + (term if g is None else g * term)


def test_training_step_matches_the_eager_encoder_path(monkeypatch):
    """One LocalSequential step (R1E, torch backend) with the op equals the same step with the
    eager encoder E (the previous torch path): losses, every gradient, every running buffer."""
    from test_local import batch, tiny_cnn

    torch.manual_seed(0)
    fused = LocalSequential(tiny_cnn(), K=3, context="R1E", input_size=(3, 16, 16), backend="torch")
    eager = copy.deepcopy(fused)
    x, y = batch()
    a = fused(x, y)
    monkeypatch.setattr(BoundaryContext, "_image_term",
                        _eager_image_term)
    b = eager(x, y)
    torch.testing.assert_close(a.local_losses, b.local_losses, rtol=1e-5, atol=1e-6)
    for (k, p), (_, q) in zip(fused.named_parameters(), eager.named_parameters()):
        assert (p.grad is None) == (q.grad is None), k
        if p.grad is not None:
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-5, msg=k)
    for (k, u), (_, v) in zip(fused.named_buffers(), eager.named_buffers()):
        torch.testing.assert_close(u, v, rtol=1e-5, atol=1e-6, msg=k)
    monkeypatch.undo()
    fused.eval(), eager.eval()
    with torch.no_grad():
        got = fused(x)
        monkeypatch.setattr(BoundaryContext, "_image_term",
                            _eager_image_term)
        torch.testing.assert_close(got, eager(x), rtol=1e-4, atol=1e-5)


def test_encoder_keeps_only_the_image_between_forward_and_backward():
    """After E's forward, its graph holds neither the first convolution's output nor u (both
    recomputed in backward), nor any full-resolution tensor of the second convolution."""
    enc, _ = _encoder_pair(16)
    g = torch.Generator().manual_seed(6)
    x, h = torch.randn(8, 3, 16, 16, generator=g), torch.randn(8, 16, 4, 4, generator=g)
    with AllocationPeak("cpu") as fwd:
        out = enc.add_to(h, x, image_context_chunked)
    hidden = 8 * 12 * 16 * 16 * 4  # one (N, 12, H_img, W_img) fp32 tensor
    assert fwd.end - out.numel() * 4 < hidden / 4, (fwd.end, hidden)
    out.sum().backward()
    assert all(p.grad is not None for p in enc.parameters())
