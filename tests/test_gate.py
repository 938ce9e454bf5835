"""Context gates (``context_gate=``) and the context mean (``context_mean=``): formula, every
backend, gradients, resume, export, errors."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from contsup_fast import LocalSequential
from contsup_fast.context import BoundaryContext
from contsup_fast.fused import available_backends, resolve_backend

torch.set_num_threads(min(4, torch.get_num_threads()))


def tiny_cnn(classes: int = 10) -> nn.Sequential:
    layers, chans = [], [3, 8, 12, 12, 16]
    for i in range(4):
        layers += [nn.Conv2d(chans[i], chans[i + 1], 3, stride=2 if i in (1, 3) else 1, padding=1),
                   nn.BatchNorm2d(chans[i + 1]), nn.ReLU()]
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, classes)]
    return nn.Sequential(*layers)


def batch(n=6, size=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, size, size, generator=g), torch.randint(0, 10, (n,), generator=g)


def _terms(ctx: BoundaryContext, inputs, x, size):
    """Each context term computed independently with its encoder's eager modules."""
    terms = []
    if ctx.image is not None:
        e = ctx.image
        z = e.conv2(F.relu(e.bn1(e.conv1(x))))
        terms.append(F.adaptive_avg_pool2d(F.relu(e.bn2(z)), size))
    for enc in ctx.residual:
        terms.append(F.adaptive_avg_pool2d(F.relu(enc.bn(enc.conv(inputs[enc.source]))), size))
    return terms


def _context(gate, theta=None, dtype=torch.float32, mean=False):
    torch.manual_seed(0)
    ctx = BoundaryContext(12, 3, [(1, 8), (2, 8)], gate=gate, gate_init=0.3, mean=mean).to(dtype)
    if theta is not None:
        with torch.no_grad():
            ctx.gate.copy_(torch.tensor(theta, dtype=dtype))
    for m in ctx.modules():  # non-trivial affine parameters
        if isinstance(m, nn.BatchNorm2d):
            with torch.no_grad():
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
    return ctx


def _data(dtype=torch.float32, n=4):
    g = torch.Generator().manual_seed(1)
    h = torch.randn(n, 12, 8, 8, generator=g).to(dtype)
    inputs = {1: torch.randn(n, 8, 16, 16, generator=g).to(dtype), 2: torch.randn(n, 8, 8, 8, generator=g).to(dtype)}
    x = torch.randn(n, 3, 16, 16, generator=g).to(dtype)
    return h, inputs, x


@pytest.mark.parametrize("backend", available_backends("cpu"))
@pytest.mark.parametrize("gate,mean", [("ramp", False), ("learned", False), (None, True), ("learned", True)])
def test_gate_and_mean_scale_each_term_on_every_backend(backend, gate, mean):
    """out = c * (h + sum_t g_t T_t), c = 1/(1 + 3 terms) for a mean, else 1, against each
    term computed independently with the encoders' eager modules."""
    h, inputs, x = _data()
    ctx = _context(gate, theta=[0.7, -0.4, 1.3] if gate == "learned" else None, mean=mean)
    if gate == "ramp":
        ctx.ramp.fill_(0.35)
    expect_ctx = copy.deepcopy(ctx)
    out = ctx(h, inputs, x, resolve_backend(backend))
    g = {"learned": [expect_ctx.gate.abs()[i] for i in range(3)] if gate == "learned" else None,
         "ramp": [0.35] * 3, None: [1.0] * 3}[gate]
    if gate == "learned":  # g = |theta|
        torch.testing.assert_close(torch.stack(g).detach(), torch.tensor([0.7, 0.4, 1.3]))
    terms = _terms(expect_ctx, inputs, x, h.shape[-2:])
    c = 0.25 if mean else 1.0
    expected = c * (h + sum(gi * t for gi, t in zip(g, terms)))
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    # gradients reach the encoders and the gates exactly as through the eager formula
    w = torch.randn_like(out)
    (out * w).sum().backward()
    (expected * w).sum().backward()
    for (k, p), (_, q) in zip(ctx.named_parameters(), expect_ctx.named_parameters()):
        assert p.grad is not None, k
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-4, msg=k)  # conv biases before BN: ~0
    # running statistics are those of the unscaled convolution outputs, as without a gate
    for (k, b), (_, c) in zip(ctx.named_buffers(), expect_ctx.named_buffers()):
        torch.testing.assert_close(b, c, msg=k)


@pytest.mark.parametrize("backend", [b for b in available_backends("cpu") if b != "triton"])
@pytest.mark.parametrize("mean", [False, True])
def test_gate_gradcheck_float64(backend, mean):
    """gradcheck in float64 of the gated boundary w.r.t. the gates, a residual encoder's conv
    weight and E's last BN scale, through each backend's fused ops (eval: no stat updates).
    The Triton ops get the same scaled affine arguments and are checked against the eager
    formula above; their own gradchecks live in the kernel tests (the interpreter is slow)."""
    be = resolve_backend(backend)
    ctx = _context("learned", theta=[0.6, 0.9, -1.1], dtype=torch.float64, mean=mean).eval()
    h, inputs, x = _data(torch.float64, n=2)
    h.requires_grad_()  # not in training (h is detached there), but checks the 1/4 scale of h
    names = ["gate", "residual.0.conv.weight", "image.bn2.weight"]
    values = [dict(ctx.named_parameters())[k].detach().clone().requires_grad_() for k in names]

    def f(h, *ps):
        return torch.func.functional_call(ctx, dict(zip(names, ps)), (h, inputs, x, be))

    assert torch.autograd.gradcheck(f, (h, *values), atol=1e-6, fast_mode=True)


def test_ramp_rises_over_the_steps_and_then_is_the_paper_form():
    torch.manual_seed(0)
    model = tiny_cnn()
    gated = LocalSequential(copy.deepcopy(model), K=3, context="R1E", input_size=(3, 16, 16),
                            backend="torch", context_gate="ramp", context_gate_steps=4, context_mean=None)
    torch.manual_seed(0)
    paper = LocalSequential(copy.deepcopy(model), K=3, context="R1E", input_size=(3, 16, 16),
                            backend="torch", context_mean=None)
    paper.load_state_dict(gated.state_dict(), strict=False)
    x, y = batch()
    seen = []
    for t in range(6):
        gated._set_ramp()
        seen.append(float(gated[1].context.ramp))
        gated(x, y)
    assert seen == [0.0, 0.25, 0.5, 0.75, 1.0, 1.0]
    assert int(gated.context_gate_step) == 6
    # at g = 1 the gated model computes exactly the paper's form
    gated.eval()
    paper.load_state_dict(gated.state_dict(), strict=False)
    paper.eval()
    torch.testing.assert_close(gated(x), paper(x))
    # at step 0 the context terms are off: module 1's input is h alone (R0)
    fresh = LocalSequential(tiny_cnn(), K=3, context="R1E", input_size=(3, 16, 16),
                            backend="torch", context_gate="ramp", context_gate_steps=4).eval()
    fresh._set_ramp()
    h = torch.randn(2, *fresh[0].out_shape)
    a = fresh[1].context(h, {0: x[:2]}, x[:2], resolve_backend("torch"))
    torch.testing.assert_close(a, h)


def test_ramp_step_resumes_exactly():
    torch.manual_seed(0)
    kw = dict(K=3, context="R1E", input_size=(3, 16, 16), backend="torch",
              context_gate="ramp", context_gate_steps=5)
    a = LocalSequential(tiny_cnn(), **kw)
    opt_a = torch.optim.SGD(a.parameters(), lr=0.05, momentum=0.9)
    batches = [batch(seed=s) for s in range(4)]
    for x, y in batches[:2]:
        opt_a.zero_grad()
        a(x, y)
        opt_a.step()
    state, opt_state = copy.deepcopy(a.state_dict()), copy.deepcopy(opt_a.state_dict())
    assert "context_gate_step" in state and int(state["context_gate_step"]) == 2
    b = LocalSequential(tiny_cnn(), **kw)
    b.load_state_dict(state)
    opt_b = torch.optim.SGD(b.parameters(), lr=0.05, momentum=0.9)
    opt_b.load_state_dict(opt_state)
    for x, y in batches[2:]:
        for m, o in ((a, opt_a), (b, opt_b)):
            o.zero_grad()
            m(x, y)
            o.step()
    for (k, p), (_, q) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(p, q), k


@pytest.mark.parametrize("gate,mean", [("ramp", None), ("learned", None), (None, "last"), ("learned", "all")])
def test_gated_model_exports(gate, mean):
    torch.manual_seed(0)
    local = LocalSequential(tiny_cnn(), K=3, context="R1E", input_size=(3, 16, 16), backend="torch",
                            context_gate=gate, context_gate_steps=3 if gate == "ramp" else None,
                            context_mean=mean)
    x, y = batch(4)
    local(x, y)  # one step: the ramp is at 1/3, learned gates moved
    local.eval()
    plain = local.to_module()
    torch.testing.assert_close(plain(x), local(x))
    ep = torch.export.export(plain, (x,))
    torch.testing.assert_close(ep.module()(x), local(x))


def test_learned_gates_are_named_for_weight_decay_exclusion():
    local = LocalSequential(tiny_cnn(), K=3, context="R1E", input_size=(3, 16, 16),
                            context_gate="learned", context_gate_init=0.2)
    names = [k for k, _ in local.named_parameters() if k.endswith(".context.gate")]
    assert names == ["local_modules.1.context.gate", "local_modules.2.context.gate"]
    assert torch.equal(local[2].context.gate.detach(), torch.full((2,), 0.2))  # E and R(a_1)
    assert "context_gate=learned" in repr(local) and "g*E(x)" in local.summary()


@pytest.mark.parametrize("kwargs, match", [
    (dict(context_gate="sigmoid"), "context_gate must be one of"),
    (dict(context_gate="ramp"), "context_gate_steps"),
    (dict(context_gate="ramp", context_gate_steps=0), "context_gate_steps"),
    (dict(context_gate="learned", context_gate_init=0.0), "context_gate_init"),
    (dict(context_gate="learned", context_gate_init="x"), "context_gate_init"),
    (dict(context_mean="first"), "context_mean must be one of"),
    (dict(context_mean="none"), "context_mean must be one of"),
])
def test_bad_gate_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LocalSequential(tiny_cnn(), K=3, context="R1E", input_size=(3, 16, 16), **kwargs)


def _module_inputs(local, x, y):
    """Every local module's input a_j in one training step (forward pre-hooks on the bodies)."""
    seen = []
    hooks = [m.body.register_forward_pre_hook(lambda mod, args: seen.append(args[0].detach().clone()))
             for m in local.local_modules]
    out = local(x, y)
    for hk in hooks:
        hk.remove()
    return seen, out


@pytest.mark.parametrize("mean", ["last", "all"])
def test_context_mean_averages_only_where_asked(mean):
    """Same parameters as the paper's form (no new state); "last": modules 0..K-2 are the paper's
    form exactly and the last module's input is the paper's divided by 1 + n_terms (h, E and
    R(a_1): 3); "all": every boundary's input is h_j plus its terms over 1 + n_terms."""
    torch.manual_seed(0)
    model = tiny_cnn()
    paper = LocalSequential(copy.deepcopy(model), K=3, context="R1E", input_size=(3, 16, 16), backend="torch",
                            context_mean=None)
    avg = LocalSequential(copy.deepcopy(model), K=3, context="R1E", input_size=(3, 16, 16), backend="torch",
                          context_mean=mean)
    assert list(avg.state_dict()) == list(paper.state_dict())
    avg.load_state_dict(paper.state_dict())
    x, y = batch()
    a_paper, out_paper = _module_inputs(paper, x, y)
    a_avg, out_avg = _module_inputs(avg, x, y)
    assert [m.context.mean for m in avg.local_modules[1:]] == ([False, True] if mean == "last" else [True, True])
    if mean == "last":
        torch.testing.assert_close(a_avg[1], a_paper[1], rtol=0, atol=0)
        torch.testing.assert_close(a_avg[2], a_paper[2] / 3)
        torch.testing.assert_close(out_avg.local_losses[:2], out_paper.local_losses[:2], rtol=0, atol=0)
        assert "(h + E(x) + R(a_1))/3" in avg.summary() and "context_mean=last" in repr(avg)
    else:
        # boundary 0 has E only (the image goes through E, not R(x)): the mean of two
        torch.testing.assert_close(a_avg[1], a_paper[1] / 2)
        with torch.no_grad():  # training-mode BN: the same batch statistics as in the step
            h1 = avg[1].body(a_avg[1])
            terms = _terms(avg[2].context, {1: a_avg[1]}, x, h1.shape[-2:])
        torch.testing.assert_close(a_avg[2], (h1 + sum(terms)) / 3)
        assert avg[1].context.describe() == "(h + E(x))/2"
    # (this CNN's last module starts with Conv -> BN, which is blind to its input's scale: the
    # mean changes a module only through identity paths, as in ResNet blocks, so no loss check)
