"""LocalSequential semantics: isolation, context formulas, heads, losses, precision, export, errors."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from contsup_fast import LocalSequential, UnsplittableModelError, parse_context
from contsup_fast.models import resnet20, resnet32

torch.set_num_threads(min(4, torch.get_num_threads()))


def tiny_cnn(classes: int = 10) -> nn.Sequential:
    """Four conv stages (two with stride 2), so that every boundary has a cut and pooling."""
    layers = []
    chans = [3, 8, 12, 12, 16]
    for i in range(4):
        layers += [nn.Conv2d(chans[i], chans[i + 1], 3, stride=2 if i in (1, 3) else 1, padding=1),
                   nn.BatchNorm2d(chans[i + 1]), nn.ReLU()]
    layers += [nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
               nn.Linear(16, classes)]
    return nn.Sequential(*layers)


def batch(n=6, size=16, classes=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, size, size, generator=g), torch.randint(0, classes, (n,), generator=g)


def grads(module: nn.Module):
    return {k: p.grad.clone() for k, p in module.named_parameters() if p.grad is not None}


# --------------------------------------------------------------------------- isolation
@pytest.mark.parametrize("context", ["R0", "R1E", "R2"])
def test_gradient_isolation(context):
    torch.manual_seed(0)
    local = LocalSequential(tiny_cnn(), K=4, context=context, input_size=(3, 16, 16), backend="torch")
    x, y = batch()
    local(x, y)
    before = grads(local[1])
    local.zero_grad(set_to_none=True)
    with torch.no_grad():  # change every later module's weights
        for m in list(local)[2:]:
            for p in m.parameters():
                p.add_(torch.randn_like(p))
    local(x, y)
    after = grads(local[1])
    assert before.keys() == after.keys() and before
    for k in before:
        assert torch.equal(before[k], after[k]), k


def test_k1_is_end_to_end_and_not_isolated():
    torch.manual_seed(0)
    model = tiny_cnn()
    ref = copy.deepcopy(model)
    local = LocalSequential(model, K=1, context="R0", input_size=(3, 16, 16), backend="torch")
    x, y = batch()
    out = local(x, y)
    F.cross_entropy(ref(x), y).backward()
    for (k, p), (_, q) in zip(local.named_parameters(), ref.named_parameters()):
        torch.testing.assert_close(p.grad, q.grad, msg=k)
    assert out.local_losses.shape == (1,)
    first = next(local.parameters()).grad.clone()
    local.zero_grad()
    with torch.no_grad():
        list(local.parameters())[-2].mul_(3.0)  # the classifier changes the first conv's gradient
    local(x, y)
    assert not torch.equal(first, next(local.parameters()).grad)


def test_output_fields_and_no_heads_in_eval():
    torch.manual_seed(0)
    local = LocalSequential(tiny_cnn(), K=3, context="R1E", input_size=(3, 16, 16), backend="torch")
    x, y = batch()
    out = local(x, y)
    assert out.logits.shape == (6, 10) and not out.logits.requires_grad
    assert out.local_losses.shape == (3,) and torch.equal(out.loss, out.local_losses[-1])
    local.eval()
    calls = []
    for m in local:
        if m.head is not None:
            m.head.register_forward_hook(lambda *a: calls.append(1))
    logits = local(x)
    assert logits.shape == (6, 10) and not calls


# --------------------------------------------------------------------------- context formulas
def _bn(z, bn, training):
    return F.batch_norm(z, None if training else bn.running_mean, None if training else bn.running_var,
                        bn.weight, bn.bias, training, 0.0, bn.eps)


def _E(enc, x, size, training):
    u = F.relu(_bn(F.conv2d(x, enc.conv1.weight, enc.conv1.bias, padding=1), enc.bn1, training))
    z = F.relu(_bn(F.conv2d(u, enc.conv2.weight, enc.conv2.bias, padding=1), enc.bn2, training))
    return F.adaptive_avg_pool2d(z, size)


def _R(enc, a, size, training):
    return F.adaptive_avg_pool2d(F.relu(_bn(F.conv2d(a, enc.conv.weight, enc.conv.bias), enc.bn, training)), size)


@pytest.mark.parametrize("context,n", [("R0", None), ("E", None), ("R1", None), ("R2", None),
                                       ("RnE", 1), ("RnE", 2), ("R3E", None), ("Rn", 5)])
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("mean", [None, "last", "all"])
def test_context_matches_formula(context, n, training, mean):
    """a_{j+1} = h_j.detach() + E_j(x) + sum_{r<n} R_{j,r}(a_{j-r}), a_0 = x (not for RnE); with
    ``context_mean`` that sum over its 1 + n_terms summands, at the last boundary or at all."""
    torch.manual_seed(1)
    local = LocalSequential(tiny_cnn(), K=4, context=context, n=n, input_size=(3, 16, 16), backend="torch",
                            context_mean=mean)
    spec = parse_context(context, n)
    ins, outs = {}, {}
    for m in local:
        m.body.register_forward_pre_hook(lambda mod, args, j=m.index: ins.__setitem__(j, args[0].detach()))
        m.body.register_forward_hook(lambda mod, args, out, j=m.index: outs.__setitem__(j, out.detach()))
    x, y = batch()
    if not training:
        local.eval()
        for mod in local.modules():  # non-trivial running statistics
            if isinstance(mod, nn.BatchNorm2d):
                mod.running_mean.uniform_(-0.5, 0.5)
                mod.running_var.uniform_(0.5, 2.0)
        local(x)
    else:
        local(x, y)
    a = {0: x}
    for j in range(3):
        h = outs[j]
        expected = h.clone()
        ctx = local[j + 1].context
        if spec.image:
            expected += _E(ctx.image, x, h.shape[-2:], training)
        sources = [j - r for r in range(spec.n) if j - r >= (1 if spec.image else 0)]
        assert (ctx.sources if ctx is not None else []) == sources
        for enc, i in zip(ctx.residual if ctx is not None else [], sources):
            expected += _R(enc, a[i], h.shape[-2:], training)
        if mean == "all" or (mean == "last" and j == 2):
            expected /= 1 + spec.image + len(sources)
        torch.testing.assert_close(ins[j + 1], expected, rtol=1e-5, atol=1e-5)
        a[j + 1] = ins[j + 1]


def test_dense_context_when_n_covers_all_modules():
    local = LocalSequential(tiny_cnn(), K=4, context="Rn", n=3, input_size=(3, 16, 16), backend="torch")
    assert [m.context.sources for m in list(local)[1:]] == [[0], [1, 0], [2, 1, 0]]


def test_encoders_get_gradients_from_the_module_they_feed():
    torch.manual_seed(0)
    local = LocalSequential(tiny_cnn(), K=3, context="R1E", input_size=(3, 16, 16), backend="torch")
    x, y = batch()
    local(x, y)
    for m in list(local)[1:]:
        for p in m.context.parameters():
            assert p.grad is not None and p.grad.abs().sum() > 0


# --------------------------------------------------------------------------- heads, losses, models
@pytest.mark.parametrize("aux", ["0c1f", "0c2f", "1c1f", "1c2f", "1c3f", "2c2f"])
@pytest.mark.parametrize("loss", ["ce", "supcon"])
def test_every_head_and_loss_trains(aux, loss):
    torch.manual_seed(0)
    local = LocalSequential(tiny_cnn(), K=3, context="R1E", aux=aux, loss=loss, input_size=(3, 16, 16),
                            backend="torch")
    x, y = batch(n=8)
    y[:4] = y[4:]  # every anchor has a positive for supcon
    opt = torch.optim.SGD(local.parameters(), lr=0.05, momentum=0.9)
    first = None
    for _ in range(8):
        opt.zero_grad()
        out = local(x, y)
        opt.step()
        first = out.local_losses if first is None else first
    assert torch.isfinite(out.local_losses).all()
    assert out.local_losses[0] < first[0]


def test_heads_on_any_channel_count_and_widest_stage():
    local = LocalSequential(tiny_cnn(), K=4, context="R0", input_size=(3, 16, 16), backend="torch")
    convs = [m.head.convs[0] for m in list(local)[:-1]]
    # the widest stage is the network's (its 16-channel last stage, not cut at K=4), as in the
    # reference: a head keeps its width only there, so the 12-channel heads widen and stride
    assert [(c.in_channels, c.out_channels, c.stride[0]) for c in convs] == [(8, 16, 2), (12, 24, 2), (12, 24, 2)]
    local = LocalSequential(resnet32(), K=16, context="R0", backend="torch")
    conv = local[14].head.convs[0]
    assert (conv.in_channels, conv.out_channels, conv.stride[0]) == (64, 64, 1)


def test_supcon_matches_definition():
    from contsup_fast.losses import supervised_contrastive_loss
    torch.manual_seed(0)
    f, y = torch.randn(7, 5), torch.tensor([0, 1, 0, 2, 1, 0, 3])
    z = F.normalize(f, dim=1)
    total, count = 0.0, 0
    for i in range(7):
        pos = [p for p in range(7) if p != i and y[p] == y[i]]
        if not pos:
            continue
        denom = torch.logsumexp(torch.stack([z[i] @ z[a] / 0.07 for a in range(7) if a != i]), 0)
        total += -sum((z[i] @ z[p] / 0.07 - denom) for p in pos) / len(pos)
        count += 1
    torch.testing.assert_close(supervised_contrastive_loss(f, y), total / count)


def test_reconstruction_loss_and_weights():
    torch.manual_seed(0)
    local = LocalSequential(resnet20(), K=4, context="R1E", reconstruct=True, reconstruct_weights=(2, 1, 0, 3),
                            backend="torch")
    assert all(m.decoder is not None for m in list(local)[:-1]) and local[3].decoder is None
    x, y = batch(n=4, size=32)
    out = local(x, y)
    assert torch.isfinite(out.local_losses).all()
    assert all(p.grad.abs().sum() > 0 for p in local[0].decoder.parameters())
    # module 2 is the last local module with a head (ratio 1): reconstruction weight 0
    assert all(p.grad is None or not p.grad.any() for p in local[2].decoder.parameters())


@pytest.mark.slow
@pytest.mark.parametrize("name", ["resnet18", "resnet50", "wide_resnet50_2", "resnext50_32x4d", "vgg11_bn"])
def test_torchvision_families_split_and_train(name):
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = torchvision.models.get_model(name, num_classes=10)
    local = LocalSequential(model, K=3, context="R1E", backend="torch")
    x, y = batch(n=2, size=32)
    out = local(x, y)
    assert out.local_losses.shape == (3,) and torch.isfinite(out.local_losses).all()
    local.eval()
    torch.testing.assert_close(local(x), local.to_module()(x))


def test_plain_sequential_and_any_channels():
    torch.manual_seed(0)
    local = LocalSequential(tiny_cnn(classes=7), K=5, context="R1E", input_size=(3, 16, 16), backend="torch")
    x, _ = batch()
    out = local(x, torch.randint(0, 7, (6,)))
    assert out.logits.shape == (6, 7) and len(local) == 5


# --------------------------------------------------------------------------- precision and layout
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast(dtype):
    torch.manual_seed(0)
    local = LocalSequential(tiny_cnn(), K=3, context="R1E", input_size=(3, 16, 16), backend="torch")
    x, y = batch()
    scaler = torch.amp.GradScaler("cpu") if dtype == torch.float16 else None
    with torch.autocast("cpu", dtype=dtype):
        out = local(x, y, scaler=scaler)
    assert torch.isfinite(out.local_losses).all()
    assert all(torch.isfinite(p.grad).all() for p in local.parameters() if p.grad is not None)


def test_scaler_scales_each_local_loss():
    torch.manual_seed(0)
    local = LocalSequential(tiny_cnn(), K=3, context="R1", input_size=(3, 16, 16), backend="torch")
    x, y = batch()
    local(x, y)
    plain = grads(local)
    local.zero_grad()

    class Times8:
        def scale(self, loss):
            return loss * 8

    local(x, y, scaler=Times8())
    for k, g in grads(local).items():
        torch.testing.assert_close(g, plain[k] * 8, rtol=1e-5, atol=1e-6)


def test_channels_last_matches_contiguous():
    torch.manual_seed(0)
    local = LocalSequential(resnet20(), K=4, context="R1E", backend="torch")
    x, y = batch(n=4, size=32)
    a = local(x, y).local_losses
    g = grads(local)
    local.zero_grad()
    local_cl = local.to(memory_format=torch.channels_last)
    b = local_cl(x.to(memory_format=torch.channels_last), y).local_losses
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    for k, v in grads(local_cl).items():
        torch.testing.assert_close(v, g[k], rtol=1e-3, atol=1e-4)


# --------------------------------------------------------------------------- export and repr
def test_to_module_and_export_give_the_same_logits():
    torch.manual_seed(0)
    local = LocalSequential(resnet20(), K=4, context="R2E", backend="torch")
    x, y = batch(n=4, size=32)
    local(x, y)  # move running statistics away from their initial values
    local.eval()
    inference = local.to_module()
    assert not any("head" in k for k in inference.state_dict())
    expected = local(x)
    torch.testing.assert_close(inference(x), expected)
    exported = torch.export.export(inference, (x,))
    torch.testing.assert_close(exported.module()(x), expected)


def test_repr_shows_every_module():
    local = LocalSequential(resnet32(), K=16, context="RnE", backend="torch")
    text = repr(local)
    assert "K=16" in text and "R1E" in text and "backend=torch" in text and "paper preset" in text
    assert "layer2.3" in text and "E(x) + R(a_3)" in text and "64x8x8" in text and "model classifier" in text
    assert len(text.splitlines()) == 16 + 2


def test_state_dict_round_trip():
    torch.manual_seed(0)
    a = LocalSequential(tiny_cnn(), K=3, context="R1E", input_size=(3, 16, 16), backend="torch")
    torch.manual_seed(1)
    b = LocalSequential(tiny_cnn(), K=3, context="R1E", input_size=(3, 16, 16), backend="torch")
    b.load_state_dict(a.state_dict())
    a.eval(), b.eval()
    x, _ = batch()
    torch.testing.assert_close(a(x), b(x))


# --------------------------------------------------------------------------- errors
@pytest.mark.parametrize("kwargs,match", [
    (dict(K=0), "K must be an integer >= 1"),
    (dict(K=17), "K=17 is larger than the number of splittable blocks.*between 1 and 16"),
    (dict(context="R1X"), "unknown context mode 'R1X'"),
    (dict(context="RnE", n=0), "n must be an integer >= 1"),
    (dict(context="R2", n=3), "fixes n=2"),
    (dict(aux="3c3f"), "aux must be one of"),
    (dict(loss="mse"), "loss must be one of"),
    (dict(backend="cuda"), "backend must be one of"),
    (dict(split=[99]), "split entries must be indices 0..14"),
    (dict(K=3, split=[1]), "split must name K-1=2 distinct cut points"),
])
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LocalSequential(resnet32(), **{"K": 4, **kwargs})


def test_untraceable_model():
    class DataDependent(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)

        def forward(self, x):
            if x.sum() > 0:  # data-dependent control flow: torch.fx cannot trace it
                return self.conv(x).mean((2, 3))
            return x.mean((2, 3))

    with pytest.raises(UnsplittableModelError, match="cannot be split: torch.fx could not trace it"):
        LocalSequential(DataDependent(), K=2)


def test_bad_inputs():
    local = LocalSequential(tiny_cnn(), K=3, context="R1", input_size=(3, 16, 16), backend="torch")
    x, y = batch()
    with pytest.raises(ValueError, match=r"x must be a float tensor of shape \(N, 3, H, W\), got \(6, 16, 16\)"):
        local(x[:, 0], y)
    with pytest.raises(ValueError, match="x must be a floating-point tensor"):
        local(x.long(), y)
    with pytest.raises(ValueError, match=r"y must be an int64 tensor of shape \(6,\)"):
        local(x, y[:3])
    with pytest.raises(RuntimeError, match="needs labels"):
        local(x)
    with pytest.raises(RuntimeError, match="torch.no_grad"):
        with torch.no_grad():
            local(x, y)
