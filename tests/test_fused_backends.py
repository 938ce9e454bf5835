"""LocalSequential on the fused backends: same training step as the eager composition, less memory."""
import pytest
import torch
from torch import nn

from contsup_fast import LocalSequential
from contsup_fast.fused import available_backends, resolve_backend
from contsup_fast.memory import measure_step
from contsup_fast.models import resnet20, resnet32, resnet110

FUSED = [b for b in available_backends("cpu") if b != "torch"]
if not FUSED:
    pytest.skip("no fused backend can run on this machine (extension not built, triton missing)",
                allow_module_level=True)


def _pair(backend, make=resnet20, K=4, context="R1E", aux="1c2f", seed=0, gate=None, mean=None):
    """The torch-backend model and a copy on ``backend``. The paper's form (no gate) unless
    ``gate`` is given. Gated models are compared in float64: with a learned gate at 0.1, R1E's
    fp32 rounding differences between backends grew to 1% of a body convolution's largest
    gradient (resnet20 K=4, measured), while float64 agrees to 1e-16."""
    torch.manual_seed(seed)
    kw = dict(K=K, context=context, aux=aux, context_gate=gate, context_mean=mean)
    ref = LocalSequential(make(), backend="torch", **kw)
    fused = LocalSequential(make(), backend=backend, **kw)
    fused.load_state_dict(ref.state_dict())
    return ref, fused


@pytest.mark.parametrize("backend", [b for b in FUSED if b == "native"])
@pytest.mark.parametrize("gate,mean", [("learned", None), (None, "last"), ("learned", "all")])
def test_learned_gate_training_step_matches_torch_backend_in_float64(backend, gate, mean):
    ref, fused = _pair(backend, context="R1E", gate=gate, mean=mean)
    ref, fused = ref.double(), fused.double()
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(6, 3, 32, 32, generator=g, dtype=torch.float64), torch.randint(0, 10, (6,), generator=g)
    a, b = ref(x, y), fused(x, y)
    torch.testing.assert_close(b.local_losses, a.local_losses, rtol=1e-10, atol=1e-12)
    grads = [(k, p.grad, q.grad) for (k, p), (_, q) in zip(ref.named_parameters(), fused.named_parameters())]
    assert any(k.endswith("context.gate") and p is not None for k, p, _ in grads) == (gate == "learned")
    for k, p, q in grads:
        assert (p is None) == (q is None), k
        if p is not None:
            torch.testing.assert_close(q, p, rtol=1e-9, atol=1e-12, msg=k)


TOL = dict(rtol=2e-3, atol=2e-4)


CONFIGS = [("R1E", "1c2f"), ("R2", "0c2f"), ("E", "2c2f"), ("R0", "1c1f")]


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("context,aux", CONFIGS)
def test_training_step_matches_torch_backend_in_float64(backend, context, aux):
    """The exact check behind the fp32 one below: every weight's gradient equal to the torch
    backend's (biases right before a training-mode BatchNorm have zero gradient in exact
    arithmetic, so only their absolute size is checked)."""
    ref, fused = _pair(backend, context=context, aux=aux)
    ref, fused = ref.double(), fused.double()
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(6, 3, 32, 32, generator=g, dtype=torch.float64), torch.randint(0, 10, (6,), generator=g)
    a, b = ref(x, y), fused(x, y)
    torch.testing.assert_close(b.local_losses, a.local_losses, rtol=1e-10, atol=1e-12)
    for (k, p), (_, q) in zip(ref.named_parameters(), fused.named_parameters()):
        assert (p.grad is None) == (q.grad is None), k
        if p.grad is not None:
            torch.testing.assert_close(q.grad, p.grad, rtol=1e-8, atol=1e-10 * max(1.0, float(p.grad.abs().max())),
                                       msg=k)


_FP32_ROUNDING = pytest.mark.xfail(
    strict=False, reason="fp32 rounding: since the heads keep their width only at the widest stage, "
                         "the triton backend's module-3 image-context gradient differs from torch's by "
                         "up to 5% of a weight's largest gradient in fp32 (measured), while float64 "
                         "agrees to 1e-14 (the test above)")


@pytest.mark.parametrize("backend,context,aux", [
    pytest.param(b, c, a, marks=_FP32_ROUNDING) if (b, c, a) == ("triton", "E", "2c2f") else (b, c, a)
    for b in FUSED for c, a in CONFIGS])
def test_training_step_matches_torch_backend(backend, context, aux):
    ref, fused = _pair(backend, context=context, aux=aux)
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(6, 3, 32, 32, generator=g), torch.randint(0, 10, (6,), generator=g)
    a, b = ref(x, y), fused(x, y)
    assert fused.backend_for(x.device).name == backend
    torch.testing.assert_close(b.local_losses, a.local_losses, **TOL)
    for (k, p), (_, q) in zip(ref.named_parameters(), fused.named_parameters()):
        assert (p.grad is None) == (q.grad is None), k
        if p.grad is not None:
            torch.testing.assert_close(q.grad, p.grad, **TOL, msg=k)
    for (k, u), (_, v) in zip(ref.named_buffers(), fused.named_buffers()):
        torch.testing.assert_close(v, u, rtol=1e-4, atol=1e-5, msg=k)
    ref.eval(), fused.eval()
    torch.testing.assert_close(fused(x), ref(x), **TOL)


@pytest.mark.parametrize("backend", FUSED)
def test_state_dict_is_the_same_across_backends(backend):
    ref, fused = _pair(backend)
    assert list(ref.state_dict()) == list(fused.state_dict())
    assert f"backend={backend}" in repr(fused)


@pytest.mark.parametrize("backend", FUSED)
def test_fused_bf16_autocast_step_is_close(backend):
    ref, fused = _pair(backend, K=3)
    g = torch.Generator().manual_seed(4)
    x, y = torch.randn(4, 3, 32, 32, generator=g), torch.randint(0, 10, (4,), generator=g)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        a, b = ref(x, y), fused(x, y)
    torch.testing.assert_close(b.local_losses, a.local_losses, rtol=5e-2, atol=5e-2)


def _peak(make, K, context, backend, batch=8):
    torch.manual_seed(0)
    local = LocalSequential(make(), K=K, context=context, backend=backend)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(batch, 3, 32, 32, generator=g), torch.randint(0, 10, (batch,), generator=g)
    return measure_step(local, x, y).saved_peak


@pytest.mark.parametrize("backend", FUSED)
def test_memory_target_resnet32_r1e_within_125_percent_of_r0(backend):
    eager_ratio = _peak(resnet32, 16, "R1E", "torch") / _peak(resnet32, 16, "R0", "torch")
    fused_ratio = _peak(resnet32, 16, "R1E", backend) / _peak(resnet32, 16, "R0", backend)
    # the torch backend's E term is the batch-chunked recompute (below 2x since the fused
    # image-context op landed); the fused ops keep R1E within 1.25x of R0's saved bytes
    assert fused_ratio <= 1.25, fused_ratio
    assert fused_ratio < eager_ratio, (fused_ratio, eager_ratio)


@pytest.mark.slow
@pytest.mark.parametrize("backend", FUSED)
def test_memory_target_resnet110_r1e_within_13_percent_of_e2e(backend):
    ratio = _peak(resnet110, 16, "R1E", backend) / _peak(resnet110, 1, "R0", "torch")
    assert ratio <= 0.13, ratio


@pytest.mark.slow
def test_compiled_training_step_matches_eager():
    backend = FUSED[0]
    ref, fused = _pair(backend, K=2, context="R1E")
    compiled = torch.compile(fused, backend="aot_eager")
    g = torch.Generator().manual_seed(5)
    x, y = torch.randn(4, 3, 32, 32, generator=g), torch.randint(0, 10, (4,), generator=g)
    a, b = ref(x, y), compiled(x, y)
    torch.testing.assert_close(b.local_losses, a.local_losses, rtol=2e-3, atol=2e-4)
    for (k, p), (_, q) in zip(ref.named_parameters(), fused.named_parameters()):
        if p.grad is not None:
            torch.testing.assert_close(q.grad, p.grad, rtol=2e-3, atol=2e-4, msg=k)


@pytest.mark.slow
def test_no_graph_break_inside_the_ops():
    """Dynamo may break at each local backward (by design), never inside a boundary op."""
    import torch._dynamo
    backend = resolve_backend(FUSED[0], "cpu")
    bn = nn.BatchNorm2d(8)
    z = torch.randn(4, 8, 6, 6, requires_grad=True)

    def head_pool(z):
        return backend.bn_relu_gap(z, bn.weight, bn.bias, bn.running_mean, bn.running_var, True, 1e-5)[0].sum()

    explanation = torch._dynamo.explain(head_pool)(z)
    assert explanation.graph_break_count == 0, explanation.break_reasons
