"""AugLocal, DGL and GN-DGL as LocalSequential options (issue 9).

Expected AugLocal tables are written out from the formulas (depth schedule with
round-half-to-even, uniform layer picks, the reference's channel-doubling stride rule), not
produced by the code under test.
"""
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from contsup_fast import LocalSequential
from contsup_fast.auglocal import AugLocalHead, depth_schedule, pick_layers
from contsup_fast.groups import GroupHeads, ensemble_predict
from contsup_fast.heads import DGLHead
from contsup_fast.losses import group_diversity, group_loss
from contsup_fast.models import resnet20, resnet32, resnet110
from contsup_fast.models.cifar_resnet import BasicBlock

torch.set_num_threads(1)

# (d_i, picked layers, strides, channels) for heads i = 0..14 of ResNet-32, K = 16, gamma = 0.5.
AUGLOCAL_R32_K16 = {
    1: [(1, (15,), (2,), (64,))] * 11 + [(1, (15,), (1,), (64,))] * 4,
    2: [
        (2, (8, 15), (2, 2), (32, 64)),
        (2, (8, 15), (2, 2), (32, 64)),
        (2, (8, 15), (2, 2), (32, 64)),
        (2, (9, 15), (2, 2), (32, 64)),
        (2, (10, 15), (2, 2), (32, 64)),
        (2, (10, 15), (2, 2), (32, 64)),
        (2, (10, 15), (1, 2), (32, 64)),
        (2, (11, 15), (2, 1), (64, 64)),
        (2, (12, 15), (2, 1), (64, 64)),
        (2, (12, 15), (2, 1), (64, 64)),
        (2, (12, 15), (2, 1), (64, 64)),
        (2, (13, 15), (1, 1), (64, 64)),
        (2, (14, 15), (1, 1), (64, 64)),
        (2, (14, 15), (1, 1), (64, 64)),
        (2, (15,), (1,), (64,)),
    ],
    3: [
        (3, (5, 10, 15), (1, 2, 2), (16, 32, 64)),
        (3, (6, 10, 15), (2, 1, 2), (32, 32, 64)),
        (3, (6, 11, 15), (2, 2, 1), (32, 64, 64)),
        (3, (7, 11, 15), (2, 2, 1), (32, 64, 64)),
        (3, (8, 11, 15), (2, 2, 1), (32, 64, 64)),
        (3, (8, 12, 15), (2, 2, 1), (32, 64, 64)),
        (3, (9, 12, 15), (1, 2, 1), (32, 64, 64)),
        (2, (11, 15), (2, 1), (64, 64)),   # d_7 = round(2.5) = 2 (half to even)
        (2, (12, 15), (2, 1), (64, 64)),
        (2, (12, 15), (2, 1), (64, 64)),
        (2, (12, 15), (2, 1), (64, 64)),
        (2, (13, 15), (1, 1), (64, 64)),
        (2, (14, 15), (1, 1), (64, 64)),
        (2, (14, 15), (1, 1), (64, 64)),
        (2, (15,), (1,), (64,)),
    ],
    5: [
        (5, (3, 6, 9, 12, 15), (1, 2, 1, 2, 1), (16, 32, 32, 64, 64)),
        (5, (4, 7, 9, 12, 15), (1, 2, 1, 2, 1), (16, 32, 32, 64, 64)),
        (5, (5, 7, 10, 12, 15), (1, 2, 1, 2, 1), (16, 32, 32, 64, 64)),
        (5, (5, 8, 10, 13, 15), (1, 2, 1, 2, 1), (16, 32, 32, 64, 64)),
        (4, (7, 10, 12, 15), (2, 1, 2, 1), (32, 32, 64, 64)),
        (4, (8, 10, 12, 15), (2, 1, 2, 1), (32, 32, 64, 64)),
        (4, (8, 10, 13, 15), (1, 1, 2, 1), (32, 32, 64, 64)),
        (4, (9, 11, 13, 15), (1, 2, 1, 1), (32, 64, 64, 64)),
        (4, (10, 12, 13, 15), (1, 2, 1, 1), (32, 64, 64, 64)),
        (4, (10, 12, 14, 15), (1, 2, 1, 1), (32, 64, 64, 64)),
        (4, (11, 12, 14, 15), (2, 1, 1, 1), (64, 64, 64, 64)),
        (3, (12, 14, 15), (1, 1, 1), (64, 64, 64)),
        (3, (13, 14, 15), (1, 1, 1), (64, 64, 64)),
        (3, (14, 15), (1, 1), (64, 64)),    # d_13 = 3 >= n-1-l = 2: all later layers
        (3, (15,), (1,), (64,)),
    ],
}

# ResNet-110, K = 55 (one layer per module), d = 3, gamma = 0.5: heads i = 0..53.
_S1 = (32, 64, 64)
AUGLOCAL_R110_K55_D3 = (
    [(3, (18, 36, 54), (1, 2, 2), (16, 32, 64)), (3, (19, 36, 54), (2, 1, 2), (32, 32, 64))]
    + [(3, p, (2, 2, 1), _S1) for p in [
        (19, 37, 54), (20, 37, 54), (21, 37, 54), (21, 38, 54), (22, 38, 54), (23, 38, 54), (23, 39, 54),
        (24, 39, 54), (25, 39, 54), (25, 40, 54), (26, 40, 54), (27, 40, 54), (27, 41, 54), (28, 41, 54),
        (29, 41, 54), (29, 42, 54), (30, 42, 54)]]
    + [(3, p, (1, 2, 1), _S1) for p in [
        (31, 42, 54), (31, 43, 54), (32, 43, 54), (33, 43, 54), (33, 44, 54), (34, 44, 54), (35, 44, 54),
        (35, 45, 54)]]
    + [(2, (p, 54), (2, 1), (64, 64)) for p in [40, 41, 42, 42, 42, 43, 44, 44, 44, 45]]
    + [(2, (p, 54), (1, 1), (64, 64)) for p in [46, 46, 46, 47, 48, 48, 48, 49, 50, 50, 50, 51, 52, 52, 52, 53]]
    + [(2, (54,), (1,), (64,))]
)


def _head_table(local):
    rows = []
    for m in list(local)[:-1]:
        p = m.head.plan
        rows.append((p.depth, p.picks, p.strides, p.channels))
    return rows


def _check_built_head(head: AugLocalHead, num_classes=10):
    """The built blocks follow the head's plan: BasicBlocks at the plan's stride and width,
    a 1x1 conv + BN shortcut exactly where the shape changes; GAP, BN1d iff d <= 1, Linear."""
    c = head.plan.in_shape[0]
    for block, stride, cout in zip(head.blocks, head.plan.strides, head.plan.channels):
        assert isinstance(block, BasicBlock)
        assert block.conv1.in_channels == c and block.conv1.stride == (stride, stride)
        assert block.conv2.out_channels == cout
        if stride != 1 or c != cout:
            conv, bn = block.downsample
            assert conv.kernel_size == (1, 1) and conv.stride == (stride, stride) and bn.num_features == cout
        else:
            assert block.downsample is None
        c = cout
    assert (head.norm is not None) == (head.plan.depth <= 1)
    assert head.fc.in_features == c and head.fc.out_features == num_classes


def test_auglocal_schedule_formulas():
    # round() halves to even, as the reference: d=2, K=16, last head 2*(1-.5)+.5 = 1.5 -> 2
    assert depth_schedule(2, 0.5, 16) == [2] * 15
    assert depth_schedule(3, 0.5, 16)[6:8] == [3, 2]
    assert depth_schedule(4, None, 16) == [4] * 15
    assert depth_schedule(3, 1.0, 5) == [3, 2, 2, 1]           # 3, 2.33, 1.67, 1
    assert pick_layers(6, 16, 2) == [10, 15]                  # round(10.5) = 10
    assert pick_layers(12, 16, 5) == [13, 14, 15]             # d >= n-1-l: all later layers


@pytest.mark.parametrize("d", [1, 2, 3, 5])
def test_auglocal_resnet32_k16_table(d):
    torch.manual_seed(0)
    local = LocalSequential(resnet32(), K=16, context="R0", aux="auglocal", aux_depth=d, aux_pyramid=0.5)
    assert [m.head.plan.end_layer for m in list(local)[:-1]] == list(range(15))
    assert _head_table(local) == AUGLOCAL_R32_K16[d]
    for m in list(local)[:-1]:
        _check_built_head(m.head)


def test_auglocal_resnet110_k55_d3_table():
    local = LocalSequential(resnet110(), K=55, context="R0", aux="auglocal", aux_depth=3, aux_pyramid=0.5)
    assert len(AUGLOCAL_R110_K55_D3) == 54
    assert _head_table(local) == AUGLOCAL_R110_K55_D3
    for m in list(local)[::9][:-1]:
        _check_built_head(m.head)


def test_auglocal_heads_copy_architecture_never_parameters():
    model = resnet20()
    local = LocalSequential(model, K=4, context="R0", aux="auglocal", aux_depth=2)
    backbone = {p.untyped_storage().data_ptr() for p in model.parameters()}
    backbone |= {b.untyped_storage().data_ptr() for b in model.buffers()}
    for m in list(local)[:-1]:
        for t in list(m.head.parameters()) + list(m.head.buffers()):
            assert t.untyped_storage().data_ptr() not in backbone
    # the picked layer's block and the head's copy differ in values but not in architecture
    head = local[0].head
    assert head.plan.picks[-1] == 9
    assert not torch.equal(head.blocks[-1].conv1.weight, model.layer3[2].conv1.weight)


class _Scale(nn.Module):
    """A layer with a parameter and no reset_parameters(): cannot be re-initialised."""

    def __init__(self, c):
        super().__init__()
        self.w = nn.Parameter(torch.ones(1, c, 1, 1))

    def forward(self, x):
        return x * self.w


def _plain_cnn(extra=None):
    layers = [nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
              nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
              nn.Conv2d(16, 16, 3, padding=1)] + ([extra] if extra is not None else []) + [
              nn.BatchNorm2d(16), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10)]
    return nn.Sequential(*layers)


def test_auglocal_any_model_and_unreproducible_layer():
    torch.manual_seed(0)
    local = LocalSequential(_plain_cnn(), K=2, context="R0", aux="auglocal", aux_depth=3, aux_pyramid=None,
                            split=[0])
    head = local[0].head
    # layers: conv+bn+relu | conv+bn+relu | maxpool | conv+bn+relu; module 0 ends after layer 0
    assert head.plan.picks == (1, 2, 3) and head.plan.channels == (16, 16, 16)
    assert head(torch.randn(4, 8, 32, 32), local.backend_for("cpu")).shape == (4, 10)
    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))
    assert torch.isfinite(local(x, y).local_losses).all()
    with pytest.raises(ValueError, match="auglocal.*cannot be reproduced standalone"):
        LocalSequential(_plain_cnn(_Scale(16)), K=2, context="R0", aux="auglocal", aux_depth=1)


def test_dgl_head_layer_shapes():
    for c, s in [(16, 32), (32, 16), (64, 8), (8, 7)]:
        head = DGLHead(c, (s, s), 10)
        convs = [m for m in head.convs if isinstance(m, nn.Conv2d)]
        assert len(convs) == 3 and all(m.in_channels == m.out_channels == c and m.kernel_size == (1, 1)
                                       and m.bias is None for m in convs)
        assert sum(isinstance(m, nn.BatchNorm2d) for m in head.convs) == 3
        lins = [m for m in head.mlp if isinstance(m, nn.Linear)]
        assert [(m.in_features, m.out_features) for m in lins] == [(4 * c, 4 * c)] * 3 + [(4 * c, 10)]
        assert [m.num_features for m in head.mlp if isinstance(m, nn.BatchNorm1d)] == [4 * c] * 3
        assert head.pool_size == (math.ceil(s / 4),) * 2
        z = F.adaptive_avg_pool2d(torch.randn(3, c, s, s), head.pool_size)
        assert z.shape[-1] == math.ceil(s / 4)
        assert head(torch.randn(3, c, s, s)).shape == (3, 10)


def test_group_heads_shapes_and_grouped_blocks():
    local = LocalSequential(resnet32(), K=4, context="R0", width_groups=4)
    # preset K=4 cuts after layer1.2, layer2.1, layer3.0
    grouped = {"layer1.0", "layer1.1", "layer1.2", "layer1.4", "layer2.0", "layer2.1",
               "layer2.3", "layer2.4", "layer3.0", "layer3.2", "layer3.3", "layer3.4"}
    entry = {"layer1.3", "layer2.2", "layer3.1"}     # first block after each boundary
    # as GN-DGL's _make_layer: in an entry block conv1 (and a shortcut) read the module input
    # and stay full, conv2 is grouped
    assert set(sum(local.grouped_blocks, [])) == grouped | entry
    for m in local:
        for name, conv in m.body.named_modules():
            if not isinstance(conv, nn.Conv2d):
                continue
            block = ".".join(name.split(".")[:2])
            if name == "conv1":
                assert conv.groups == 1
                continue
            assert block in grouped | entry, name
            full = block in entry and (name.endswith("conv1") or ".downsample." in name)
            assert conv.groups == (1 if full else 4), name
    for m in list(local)[:-1]:
        assert isinstance(m.head, GroupHeads) and len(m.head.heads) == 4
        c = m.out_shape[0]
        for h in m.head.heads:
            # GN-DGL's AuxClassifier: Conv3x3(C -> 2C, stride 2) at every stage, 64 included
            conv = h.convs[0]
            assert h.config == "1c2f" and conv.in_channels == c
            assert conv.out_channels == 2 * c and conv.stride == (2, 2), (m.index, conv)
            assert h.mlp[-1].out_features == 10


def test_group_modules_entry_block_shortcut_stays_full():
    # K=2 cut after layer1.4: the entry block layer2.0 downsamples; its conv1 and shortcut read
    # the module input (full), its conv2 is grouped (GN-DGL _make_layer: first_conv_groups=1)
    local = LocalSequential(resnet32(), K=2, context="R0", width_groups=2, split=["layer1.4"])
    body = local[1].body
    assert body.get_submodule("layer2.0.conv1").groups == 1
    assert body.get_submodule("layer2.0.downsample.0").groups == 1
    assert body.get_submodule("layer2.0.conv2").groups == 2
    assert body.get_submodule("layer2.1.conv1").groups == 2


def test_group_modules_one_block_per_module_still_groups():
    # K=16 (one block per module): every block is an entry block; conv2 is still grouped
    local = LocalSequential(resnet32(), K=16, context="R0", width_groups=2)
    convs = [(n, c.groups) for m in list(local)[1:] for n, c in m.body.named_modules()
             if isinstance(c, nn.Conv2d)]
    assert convs and all(g == (2 if n.endswith("conv2") else 1) for n, g in convs), convs


def test_group_heads_gradient_reaches_only_its_group():
    torch.manual_seed(0)
    heads = GroupHeads(16, 4, 10)
    from contsup_fast.fused import resolve_backend
    backend = resolve_backend("torch", torch.device("cpu"))
    h = torch.randn(6, 16, 8, 8, requires_grad=True)
    y = torch.randint(0, 10, (6,))
    logits = heads(h, backend)
    for g, z in enumerate(logits):
        (grad,) = torch.autograd.grad(F.cross_entropy(z, y), h, retain_graph=True)
        parts = grad.chunk(4, dim=1)
        assert parts[g].abs().sum() > 0
        assert all(torch.count_nonzero(p) == 0 for k, p in enumerate(parts) if k != g)


def test_grouped_body_isolates_group_gradients_bit_identically():
    """Changing group 1's slice of the gradient arriving at a grouped module output (what head
    1 sends back) leaves every group-0 parameter gradient of the grouped blocks bit-identical."""
    torch.manual_seed(0)
    local = LocalSequential(resnet20(), K=2, context="R0", width_groups=2)
    body = local[0].body                       # stem (full) + layer1.0..(grouped)
    grouped = [n for n, c in body.named_modules() if isinstance(c, nn.Conv2d) and c.groups == 2]
    assert grouped
    x = torch.randn(4, 3, 32, 32)
    out = body(x)
    up = torch.randn_like(out)

    def group0_grads(upstream):
        local.zero_grad(set_to_none=True)
        body(x).backward(upstream)
        res = []
        for name, conv in body.named_modules():
            if isinstance(conv, nn.Conv2d) and conv.groups == 2:
                res.append(conv.weight.grad[: conv.out_channels // 2].clone())
        return res

    a = group0_grads(up)
    changed = up.clone()
    changed[:, out.shape[1] // 2:] = torch.randn_like(changed[:, out.shape[1] // 2:]) * 5
    b = group0_grads(changed)
    assert len(a) == len(grouped)
    assert all(torch.equal(p, q) for p, q in zip(a, b))
    # the check has teeth: the full-width stem's gradient does change
    local.zero_grad(set_to_none=True)
    body(x).backward(up)
    stem = body.conv1.weight.grad.clone()
    local.zero_grad(set_to_none=True)
    body(x).backward(changed)
    assert not torch.equal(stem, body.conv1.weight.grad)


def test_diversity_term_reference_epsilons():
    # GN-DGL utils.div_loss_calc: p / (sum + 1e-8), then p / sqrt(sum p^2 + 1e-8). With the
    # true class holding all but ~1e-12 of the mass the epsilons decide the term (a plain
    # renormalise-then-F.normalize gives about twice the value): without them this fails.
    z1 = torch.tensor([[28.0, 0.0, -1.0]], dtype=torch.float64) * 3
    z2 = torch.tensor([[28.0, -2.0, 0.5]], dtype=torch.float64) * 3
    y = torch.tensor([0])

    def ref(zs):
        p = torch.softmax(torch.stack(zs) / 3.0, dim=2)
        p = p * torch.tensor([[0.0, 1.0, 1.0]], dtype=torch.float64)
        p = p / (p.sum(2, keepdim=True) + 1e-8)
        p = p / torch.sqrt((p ** 2).sum(2, keepdim=True) + 1e-8)
        cov = torch.einsum("kij,lij->ikl", p, p)
        return (cov * (1 - torch.eye(2, dtype=torch.float64))).sum() / (1 * 2)

    got = group_diversity([z1, z2], y, 3.0)
    assert torch.allclose(got, ref([z1, z2]), rtol=1e-12, atol=0)


def test_diversity_term_by_hand():
    T = 3.0
    # softmax(T*log p / T) = p
    p1 = torch.tensor([[0.5, 0.25, 0.25], [0.1, 0.3, 0.6]])
    p2 = torch.tensor([[0.2, 0.6, 0.2], [0.1, 0.3, 0.6]])
    y = torch.tensor([0, 0])
    z1, z2 = T * p1.log(), T * p2.log()
    # sample 0: head 1 -> (0, .5, .5) -> (0, 1, 1)/sqrt2; head 2 -> (0, .75, .25) -> (0, 3, 1)/sqrt10
    #   dot = 4/sqrt20 = 2/sqrt5; sample 1: the heads agree, dot = 1.
    expected = (2 / math.sqrt(5) + 1.0) / 2
    assert group_diversity([z1, z2], y, T).item() == pytest.approx(expected, abs=1e-6)
    assert group_diversity([z2, z1], y, T).item() == pytest.approx(expected, abs=1e-6)
    # three heads: mean over the 6 ordered pairs
    p3 = torch.tensor([[0.1, 0.0001, 0.8999], [0.1, 0.3, 0.6]])
    z3 = T * p3.log()
    v = [torch.tensor([0.0, 1, 1]) / math.sqrt(2), torch.tensor([0.0, 3, 1]) / math.sqrt(10),
         torch.tensor([0.0, 0.0001, 0.8999]) / math.hypot(0.0001, 0.8999)]
    pairs0 = sum(float(v[a] @ v[b]) for a in range(3) for b in range(3) if a != b) / 6
    expected3 = (pairs0 + 1.0) / 2
    assert group_diversity([z1, z2, z3], y, T).item() == pytest.approx(expected3, abs=1e-5)
    loss = group_loss([z1, z2], y)
    ce = F.cross_entropy(z1, y) + F.cross_entropy(z2, y)
    assert loss.item() == pytest.approx((ce + 0.5 * expected).item(), abs=1e-6)


def test_group_summary_macs_by_hand():
    local = LocalSequential(resnet32(), K=4, context="R0", width_groups=4)
    text = local.summary()
    # module 0: stem conv 3->16 at 32x32 (full) + layer1.0..1.2, 6 grouped 16->16 3x3 convs
    stem = 32 * 32 * 16 * 3 * 9
    grouped = 6 * 32 * 32 * 16 * (16 // 4) * 9
    row0 = text.splitlines()[1]
    assert f"{stem + grouped:,}" in row0 and f"{stem + grouped // 4:,}" in row0
    # module 1: layer1.3's conv1 full, its conv2 grouped (GN-DGL's entry block); layer1.4,
    # layer2.0 (with 1x1 shortcut), layer2.1 grouped
    full = 32 * 32 * 16 * 16 * 9
    grouped = (3 * 32 * 32 * 16 * 4 * 9 + 16 * 16 * 32 * 4 * 9 + 16 * 16 * 32 * 8 * 9 + 16 * 16 * 32 * 4
               + 2 * 16 * 16 * 32 * 8 * 9)
    row1 = text.splitlines()[2]
    assert f"{full + grouped:,}" in row1 and f"{full + grouped // 4:,}" in row1


def test_group_ensemble_matches_independent_computation():
    torch.manual_seed(0)
    local = LocalSequential(resnet20(), K=2, context="R0", width_groups=2).eval()
    x = torch.randn(5, 3, 32, 32)
    backend = local.backend_for("cpu")
    with torch.no_grad():
        h0 = local[0].body(x)
        p0 = sum(torch.softmax(head(h0, backend), 1) for head in local[0].head.heads) / 2
        p1 = torch.softmax(local[1].body(h0), 1)
        expected = p0 / 3 + p1 * 2 / 3
        # the grouped network exports like any other: the plain copy gives the same logits
        torch.testing.assert_close(local.to_module()(x), local(x), rtol=1e-5, atol=1e-6)
    local.train()
    got = ensemble_predict(local, x)
    assert local.training
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kwargs, match", [
    (dict(aux="auglocal", aux_depth=0), "aux_depth"),
    (dict(aux="auglocal", aux_depth=1.5), "aux_depth"),
    (dict(aux="auglocal", aux_pyramid=1.5), "aux_pyramid"),
    (dict(aux="auglocal", aux_pyramid=-0.1), "aux_pyramid"),
    (dict(aux="dgl2"), "aux must be one of"),
    (dict(K=4, width_groups=3), "width_groups=3 must divide"),
    (dict(K=4, width_groups=0), "width_groups"),
    (dict(K=4, width_groups=2, loss="supcon"), "width_groups=2.*loss='ce'"),
    (dict(K=4, width_groups=2, aux="dgl"), "width_groups=2.*aux='dgl'"),
])
def test_bad_options_name_the_option(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LocalSequential(resnet20(), **{"context": "R0", **kwargs})


def test_groups_refuse_models_without_residual_blocks():
    with pytest.raises(ValueError, match="width_groups=2: .*cannot be grouped"):
        LocalSequential(_plain_cnn(), K=2, context="R0", width_groups=2)


METHODS = {"auglocal": dict(aux="auglocal", aux_depth=2), "dgl": dict(aux="dgl"),
           "gn-dgl": dict(width_groups=2)}


@pytest.mark.parametrize("context", ["R0", "R1E"])
@pytest.mark.parametrize("method", sorted(METHODS))
def test_methods_train_on_real_cifar10(cifar10_root, method, context):
    """A few SGD steps on one fixed batch of 32 real CIFAR-10 test images: every local loss
    is finite and the summed local loss decreases."""
    from contsup_fast.data import dataset_stats, load_cifar
    images, labels = load_cifar(cifar10_root, train=False, verify=False)
    mean, std = (torch.tensor(v) for v in dataset_stats("cifar10"))
    x = torch.from_numpy(images[:32]).permute(0, 3, 1, 2).float().div(255)
    x = (x - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1)
    y = torch.from_numpy(labels[:32])
    torch.manual_seed(0)
    local = LocalSequential(resnet20(), K=3, context=context, **METHODS[method])
    opt = torch.optim.SGD(local.parameters(), lr=0.05, momentum=0.9)
    totals = []
    for _ in range(6):
        opt.zero_grad(set_to_none=True)
        out = local(x, y)
        assert torch.isfinite(out.local_losses).all()
        totals.append(out.local_losses.sum().item())
        opt.step()
    assert totals[-1] < totals[0], totals


@pytest.mark.parametrize("method", sorted(METHODS))
def test_methods_compose_with_backends_autocast_reconstruct(method):
    """Same step on every backend gives the same local losses as the torch backend; bf16
    autocast, channels_last and reconstruct=True run with finite losses."""
    torch.manual_seed(0)
    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))
    base = None
    for backend in ("torch", "native", "triton"):
        torch.manual_seed(1)
        try:
            local = LocalSequential(resnet20(), K=3, context="R1E", backend=backend, **METHODS[method])
        except (RuntimeError, ValueError):  # backend not built or not usable here: compare the others
            continue
        losses = local(x, y).local_losses
        if base is None:
            base = losses
        else:
            torch.testing.assert_close(losses, base, rtol=1e-4, atol=1e-4)
    torch.manual_seed(1)
    local = LocalSequential(resnet20(), K=3, context="R1E", reconstruct=True, **METHODS[method])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = local(x.contiguous(memory_format=torch.channels_last), y)
    assert torch.isfinite(out.local_losses).all()


def test_cli_flags_parse_and_reach_local_sequential(capsys):
    from contsup_fast import train as T
    args = T.build_parser().parse_args(["--aux", "auglocal", "--aux-depth", "3", "--aux-pyramid", "none",
                                        "--width-groups", "4"])
    assert (args.aux, args.aux_depth, args.aux_pyramid, args.width_groups) == ("auglocal", 3, None, 4)
    assert {"aux_depth", "aux_pyramid", "width_groups"} <= set(T.RESULT_ARGS)
    for bad in (["--aux-pyramid", "1.5"], ["--aux-depth", "0"], ["--width-groups", "0"], ["--aux", "dgl2"]):
        with pytest.raises(SystemExit):
            T.build_parser().parse_args(bad)
    err = capsys.readouterr().err
    assert "--aux-pyramid" in err and "--aux-depth" in err and "--width-groups" in err


def test_auglocal_reference_k_mapping():
    """The reference's ``--local_module_num 16 --aux_net_depth 3`` trains 16-3 = 13 modules with
    heads after layers 0..11: ours is K=13 with the first 12 cut points."""
    local = LocalSequential(resnet32(), K=13, context="R0", aux="auglocal", aux_depth=3,
                            split=list(range(12)))
    plans = [m.head.plan for m in list(local)[:-1]]
    assert [p.end_layer for p in plans] == list(range(12))
    assert [p.depth for p in plans] == [max(1, round(3 * (1 - i * 0.5 / 11) + i * 0.5 / 11)) for i in range(12)]
    assert [p.depth for p in plans] == [3] * 6 + [2] * 6      # i=5: 2.545 -> 3; i=6: 2.4545 -> 2


def test_memory_reports_each_method_beside_contsup():
    from contsup_fast.memory import METHODS, format_table, method_table
    rows = method_table(["resnet20"], K=4, batch=2, device="cpu")
    assert [r["method"] for r in rows] == ["E2E"] + list(METHODS)
    by = {r["method"]: r for r in rows}
    assert by["ContSup R1E, 1c2f"]["vs_contsup"] == 1.0
    assert all(r["saved_peak_MiB"] > 0 for r in rows)
    # AugLocal heads are deeper than a 1c2f head: they keep more activations alive
    assert by["AugLocal d=5"]["saved_peak_MiB"] > by["greedy R0, 1c2f"]["saved_peak_MiB"]
    assert "vs ContSup R1E" in format_table(rows)


def test_group_gradient_gradcheck_and_matches_detached_concatenation():
    from contsup_fast.groups import GroupGradient
    h = torch.randn(2, 6, 3, 3, dtype=torch.float64, requires_grad=True)
    for g in range(3):
        # on its own group's slice the op is the identity, with the true gradient
        assert torch.autograd.gradcheck(lambda t: GroupGradient.apply(t, g, 3)[:, 2 * g: 2 * g + 2].sin(), (h,))
        # over all channels it is the detached concatenation (not the identity), bit for bit
        w = torch.randn_like(h)
        (a,) = torch.autograd.grad((GroupGradient.apply(h, g, 3) * w).sum(), h)
        parts = [p if k == g else p.detach() for k, p in enumerate(h.chunk(3, dim=1))]
        (b,) = torch.autograd.grad((torch.cat(parts, dim=1) * w).sum(), h)
        assert torch.equal(a, b)
    assert GroupGradient.apply(h, 0, 3).untyped_storage().data_ptr() == h.untyped_storage().data_ptr()


@pytest.mark.cuda
@pytest.mark.parametrize("method", sorted(METHODS))
def test_methods_on_cuda_match_cpu(method):
    """One step on CUDA (backend auto: the fused kernels) gives the CPU torch backend's losses
    (tolerance allows cuDNN's TF32 convolutions)."""
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
    torch.manual_seed(1)
    cpu = LocalSequential(resnet20(), K=3, context="R1E", backend="torch", **METHODS[method])
    torch.manual_seed(1)
    gpu = LocalSequential(resnet20(), K=3, context="R1E", backend="auto", **METHODS[method]).cuda()
    want = cpu(x, y).local_losses
    got = gpu(x.cuda(), y.cuda()).local_losses.cpu()
    torch.testing.assert_close(got, want, rtol=1e-2, atol=1e-2)
