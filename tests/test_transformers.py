"""Transformers: layout detection, token/NHWC context terms and heads, isolation, export, refusals
(tiny torchvision ViT and Swin, timm DeiT/ViT/Swin when timm is installed; pretrained=False)."""
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models import SwinTransformer, VisionTransformer, convnext_tiny

from contsup_fast import LocalSequential
from contsup_fast.layouts import Layout
from contsup_fast.splitting import plan_split
from contsup_fast.tokens import ChannelNorm, PatchEmbedEncoder, TokenContext, TokenHead, patch_size

from _isolation import assert_isolated

torch.set_num_threads(min(4, torch.get_num_threads()))


def tiny_vit(patch=4, layers=4, dim=32):
    return VisionTransformer(image_size=32, patch_size=patch, num_layers=layers, num_heads=2, hidden_dim=dim,
                             mlp_dim=2 * dim, num_classes=10)


def tiny_swin(dim=24):
    """Widths 24, 48 on grids 8x8, 4x4: no width equals a spatial extent."""
    return SwinTransformer(patch_size=[4, 4], embed_dim=dim, depths=[2, 2], num_heads=[2, 2],
                           window_size=[4, 4], num_classes=10)


def timm_model(name, **kw):
    timm = pytest.importorskip("timm")
    return timm.create_model(name, pretrained=False, num_classes=10, img_size=32, **kw)


def tiny_deit():
    return timm_model("deit_tiny_distilled_patch16_224", patch_size=8, embed_dim=32, depth=4, num_heads=2)


def tiny_timm_swin():
    return timm_model("swin_tiny_patch4_window7_224", embed_dim=24, depths=(2, 2), num_heads=(2, 2), window_size=4)


def batch(n=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 32, 32, generator=g), torch.randint(0, 10, (n,), generator=g)


# --------------------------------------------------------------------------- layouts
def test_vit_layout_tokens_with_class_token_between_encoder_blocks():
    plan = plan_split(tiny_vit(layers=4), 2)
    names = ["encoder_layers_encoder_layer_0", "encoder_layers_encoder_layer_1", "encoder_layers_encoder_layer_2"]
    assert plan.candidates == names  # between encoder blocks, never after the last one
    for c in names:
        assert plan.layouts[c] == Layout("tokens", (65, 32), 1, (8, 8))


def test_deit_layout_two_prefix_tokens_and_forward_defaults_traced():
    plan = plan_split(tiny_deit(), 2)  # forward(x, attn_mask=None, is_causal=False) in recent timm
    assert [plan.layouts[c] for c in plan.candidates if c.startswith("blocks")] == \
        [Layout("tokens", (18, 32), 2, (4, 4))] * 3


def test_timm_vit_register_and_no_class_token_layouts():
    plan = plan_split(timm_model("vit_tiny_patch16_224", patch_size=8, embed_dim=32, depth=3, num_heads=2,
                                 reg_tokens=3), 2)
    assert plan.layouts["blocks_0"] == Layout("tokens", (20, 32), 4, (4, 4))
    plan = plan_split(timm_model("vit_tiny_patch16_224", patch_size=8, embed_dim=32, depth=3, num_heads=2,
                                 class_token=False, global_pool="avg"), 2)
    assert plan.layouts["blocks_0"] == Layout("tokens", (16, 32), 0, (4, 4))


@pytest.mark.parametrize("build", [tiny_swin, tiny_timm_swin])
def test_swin_layout_is_nhwc(build):
    plan = plan_split(build(), 2)
    kinds = {plan.layouts[c].kind for c in plan.candidates}
    assert kinds == {"NHWC"}
    shapes = {plan.layouts[c].shape for c in plan.candidates}
    assert shapes == {(8, 8, 24), (4, 4, 48)}
    assert all(plan.layouts[c].channels == plan.layouts[c].shape[-1] for c in plan.candidates)


def test_cnn_layouts_stay_nchw():
    plan = plan_split(convnext_tiny(num_classes=10), 2)  # LayerNorm2d on NCHW maps
    assert {plan.layouts[c].kind for c in plan.candidates} == {"NCHW"}


# --------------------------------------------------------------------------- axes
def _widths(module):
    out = []
    for m in module.modules():
        if isinstance(m, nn.Linear):
            out += [m.in_features, m.out_features]
        elif isinstance(m, nn.LayerNorm):
            out += list(m.normalized_shape)
        elif isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
            out.append(m.num_features)
        elif isinstance(m, nn.Conv2d):
            out.append(m.out_channels)
    return out


def test_swin_context_and_heads_sized_by_channels_never_by_extent():
    torch.manual_seed(0)
    local = LocalSequential(tiny_swin(), K=4, context="R2E", reconstruct=True, feature_dim=40)
    assert {lay.channels for lay in local.layouts} == {24, 48}  # both stages are boundaries
    for m in list(local)[1:]:  # module j's context builds its input, of boundary j-1's layout
        c = local.layouts[m.index - 1].channels
        for enc in [m.context.image, *m.context.residual]:
            assert enc.proj.out_features == c
        assert set(_widths(m.context)) <= {24, 48, 3 * 16, 3 * 64} and not set(_widths(m.context)) & {8, 4}
    for m in list(local)[:-1]:  # module j's head and decoder read its output
        c = local.layouts[m.index].channels
        assert m.head.norm.normalized_shape == (c,) and m.head.mlp[0].in_features == c
        assert m.decoder.norm.normalized_shape == (c,)
        widths = _widths(m.head) + [m.decoder.proj.in_features]
        assert set(widths) <= {24, 48, 40, 10, 3 * 16, 3 * 64}, widths  # C, feature_dim, classes, patch pixels
        assert not set(widths) & {8, 4}  # the spatial extents


@pytest.mark.slow
def test_swin_t_widths_96_to_768():
    from torchvision.models import swin_t
    local = LocalSequential(swin_t(num_classes=10), K=4, context="R1E", input_size=(3, 224, 224))
    chans = [lay.channels for lay in local.layouts]
    assert set(chans) <= {96, 192, 384, 768} and all(lay.kind == "NHWC" for lay in local.layouts)
    for m, c in zip(local, chans):
        assert m.head.norm.normalized_shape == (c,)
        assert not set(_widths(m.head)) & {56, 28, 14, 7}


# --------------------------------------------------------------------------- context formula
def test_token_context_matches_formula_and_prefix_rule():
    torch.manual_seed(0)
    lay = Layout("tokens", (17, 8), 1, (4, 4))
    ctx = TokenContext(lay, 3, (16, 16), [(1, lay)], norm="layer", scale=1.0, mean=True).train()
    h, a1, x = torch.randn(2, 17, 8), torch.randn(2, 17, 8), torch.randn(2, 3, 16, 16)
    out = ctx(h, {1: a1}, x, backend=None)
    e = ctx.image
    patches = e.proj(e.norm(e.patchify(x).permute(0, 2, 3, 1))).reshape(2, 16, 8)
    r = ctx.residual[0]
    rt = F.layer_norm(a1 @ r.proj.weight.T + r.proj.bias, (8,), r.norm.norm.weight, r.norm.norm.bias)
    expected = h + rt
    expected[:, 1:] += patches  # E feeds the patch tokens; the class token receives nothing from E
    torch.testing.assert_close(out, expected / 3)


def test_norm_options_act_over_channels_with_initial_scale():
    z = torch.randn(2, 5, 8) * 3 + 1
    bn = ChannelNorm("batch", 8, 0.5).train()
    ref = F.batch_norm(z.reshape(-1, 8), None, None, torch.full((8,), 0.5), torch.zeros(8), True)
    torch.testing.assert_close(bn(z), ref.reshape(2, 5, 8))
    ln = ChannelNorm("layer", 8, 0.5)
    torch.testing.assert_close(ln(z), 0.5 * F.layer_norm(z, (8,)))
    with pytest.raises(ValueError, match="norm must be one of"):
        ChannelNorm("group", 8)


def test_learned_gate_scales_token_terms():
    torch.manual_seed(0)
    lay = Layout("NHWC", (4, 4, 8), 0, (4, 4))
    ctx = TokenContext(lay, 3, (16, 16), [], gate="learned", gate_init=0.25)
    h, x = torch.randn(2, 4, 4, 8), torch.randn(2, 3, 16, 16)
    torch.testing.assert_close(ctx(h, {}, x), h + 0.25 * ctx.image(x))


def test_residual_term_resamples_on_patch_merging():
    torch.manual_seed(0)
    local = LocalSequential(tiny_swin(), K=3, split=["features_1_1", "features_2"], context="R2")
    m = local[2]  # reads a_1 (8x8x24, before the patch merging) onto the 4x4x48 grid
    (enc,) = [e for e in m.context.residual if e.source == 1]
    a1 = torch.randn(2, 8, 8, 24)
    pooled = a1.reshape(2, 4, 2, 4, 2, 24).mean(dim=(2, 4))  # 2x2 average on the grid
    expected = enc.norm(enc.proj(pooled))
    assert expected.shape == (2, 4, 4, 48)
    torch.testing.assert_close(enc(a1), expected)


# --------------------------------------------------------------------------- isolation, export
@pytest.mark.parametrize("build", [tiny_vit, tiny_swin])
@pytest.mark.parametrize("context", ["R0", "R1E", "R2"])
def test_gradient_isolation(build, context):
    torch.manual_seed(0)
    local = LocalSequential(build(), K=3, context=context)
    local.eval()  # no dropout / stochastic depth randomness between the two steps
    for m in local.modules():
        if isinstance(m, nn.Dropout) or type(m).__name__ == "StochasticDepth":
            m.p = 0.0
    local.train()
    assert_isolated(local, *batch())


@pytest.mark.parametrize("build,context", [(tiny_vit, "R1E"), (tiny_swin, "R2E"), (tiny_deit, "RnE")])
def test_to_module_equals_eval_and_exports(build, context):
    torch.manual_seed(0)
    local = LocalSequential(build(), K=3, context=context)
    x, y = batch()
    local(x, y)
    local.eval()
    inference = local.to_module()
    expected = local(x)
    torch.testing.assert_close(inference(x), expected)
    exported = torch.export.export(inference, (x,))
    torch.testing.assert_close(exported.module()(x), expected)


@pytest.mark.parametrize("kwargs", [dict(aux="dgl"), dict(reconstruct=True), dict(aux="auglocal"),
                                    dict(loss="supcon")])
def test_token_heads_train(kwargs):
    torch.manual_seed(0)
    local = LocalSequential(tiny_vit(), K=3, context="R1E", **kwargs)
    x, y = batch()
    out = local(x, y)
    assert torch.isfinite(out.local_losses).all()
    for m in list(local)[:-1]:
        assert all(p.grad is not None for p in m.head.parameters())


def test_default_head_reads_class_token_or_patch_mean():
    torch.manual_seed(0)
    lay = Layout("tokens", (5, 6), 1, (2, 2))
    head = TokenHead(lay, 10, 16)
    h = torch.randn(2, 5, 6)
    torch.testing.assert_close(head(h), head.mlp(head.norm(h[:, 0])))
    head0 = TokenHead(Layout("tokens", (4, 6), 0, (2, 2)), 10, 16)
    torch.testing.assert_close(head0(h[:, 1:]), head0.mlp(head0.norm(h[:, 1:].mean(1))))


def test_fused_ops_never_see_tokens_or_nhwc():
    def refuse(*args, **kwargs):
        raise AssertionError("a fused NCHW op was called on a token/NHWC boundary")
    fake = SimpleNamespace(name="native", residual_context=refuse, image_context_tail=refuse, bn_relu_gap=refuse,
                           global_avg_pool=refuse, image_context=refuse)
    for build in (tiny_vit, tiny_swin):
        local = LocalSequential(build(), K=3, context="R1E")
        local._backends[torch.device("cpu")] = fake
        x, y = batch()
        local(x, y)
        local.eval()
        local(x)


# --------------------------------------------------------------------------- refusals
@pytest.mark.parametrize("kwargs,match", [(dict(aux="1c2f"), "aux='1c2f'"), (dict(width_groups=2), "width_groups=2"),
                                          (dict(aux="2c2f"), "aux='2c2f'")])
def test_convolutional_heads_refused_on_tokens(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LocalSequential(tiny_vit(), K=3, **kwargs)


def test_auglocal_refused_when_blocks_cannot_be_copied():
    with pytest.raises(ValueError, match="aux='auglocal'"):
        LocalSequential(tiny_swin(), K=3, aux="auglocal")


def test_uninterpretable_cut_refused_with_model_cut_and_shape():
    with pytest.raises(ValueError, match=r"VisionTransformerDistilled, cut 'patch_embed', shape \(2, 16, 32\)"):
        LocalSequential(tiny_deit(), K=2, split=["patch_embed"])


def test_unsupported_and_contradictory_layouts_are_messages():
    from contsup_fast.layouts import LeafCall, detect_layout, require
    model = nn.Identity()
    conv1d = LeafCall(nn.Conv1d(8, 8, 3), (2, 8, 16), (2, 8, 16))
    msg = detect_layout(model, "a", (2, 8, 16), [conv1d], [], [])
    assert isinstance(msg, str) and "Identity, cut 'a', shape (2, 8, 16)" in msg and "first axis" in msg
    with pytest.raises(ValueError, match="cut 'a'"):
        require(msg)
    linear = LeafCall(nn.Linear(16, 4), (2, 8, 16), (2, 8, 4))
    bn = LeafCall(nn.BatchNorm1d(8), (2, 8, 16), (2, 8, 16))
    msg = detect_layout(model, "b", (2, 8, 16), [linear], [bn], [])
    assert isinstance(msg, str) and "reads its channels on the last axis" in msg
    msg = detect_layout(model, "c", (2, 8, 16), [LeafCall(nn.ReLU(), (2, 8, 16), (2, 8, 16))], [], [])
    assert isinstance(msg, str) and "no convolution" in msg


def test_patch_size_must_divide_the_image():
    with pytest.raises(ValueError, match="not an integer multiple"):
        patch_size((30, 30), Layout("tokens", (17, 8), 1, (4, 4)), "context E")
    with pytest.raises(ValueError, match="not an integer multiple"):
        PatchEmbedEncoder(3, (30, 32), Layout("NHWC", (4, 4, 8), 0, (4, 4)), "layer", 1.0)
