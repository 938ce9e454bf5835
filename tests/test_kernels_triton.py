"""Tests of the Triton backend ``contsup_fast.kernels`` against the reference
``contsup_fast.fused.reference`` (forward, returned statistics, gradients, gradcheck,
opcheck, torch.compile, running statistics, error messages).

Runs on CUDA, or on the CPU in Triton's interpreter (``TRITON_INTERPRET=1``, as in CI);
shapes are tiny because the interpreter is slow.
"""
import copy
import os

import pytest
import torch

pytestmark = pytest.mark.skipif(
    not (os.environ.get("TRITON_INTERPRET") == "1" or torch.cuda.is_available()),
    reason="Triton kernels need CUDA or TRITON_INTERPRET=1")

from _triton_helpers import (DEVICE, INTERPRETED, LAYOUTS, LOW, OK, WHY, K, Maker,  # noqa: E402
                             assert_bn_outputs, assert_close, assert_grads, assert_stats,
                             memory_format_ok, ref, up)
from _triton_helpers import no_tf32  # noqa: E402,F401 (autouse fixture: full fp32 dots)


# ------------------------------------------------------------------------------ residual
def _residual_case(mk, N, C, hw, terms, dtype, layout, training, h_dtype=None):
    """terms: list of (C_r, (sh, sw)); params fp32 for 16-bit activations (autocast-like)."""
    H, W = hw
    pdt = torch.float64 if dtype == torch.float64 else torch.float32
    h = mk.act((N, C, H, W), h_dtype or dtype, layout)
    cs = [mk.act((N, cr, sh * H, sw * W), dtype, layout, offset=0.5) for cr, (sh, sw) in terms]
    ws = [mk.weight(C, cr, pdt, round_to=dtype) for cr, _ in terms]
    bs = [mk.vec(C, "beta", pdt, grad=True) for _ in terms]
    gs = [mk.vec(C, "gamma", pdt, grad=True) for _ in terms]
    bts = [mk.vec(C, "beta", pdt, grad=True) for _ in terms]
    rms = [mk.vec(C, "mean", pdt) for _ in terms]
    rvs = [mk.vec(C, "var", pdt) for _ in terms]
    return h, cs, ws, bs, gs, bts, rms, rvs


def _check_residual(args, dtype, training, mk):
    h, cs, ws, bs, gs, bts, rms, rvs = args
    out, means, vars_ = K.residual_context(*args, training)
    args_ref = [up(h), [up(c) for c in cs]] + [[up(t) for t in lst] for lst in args[2:]]
    out_ref, means_ref, vars_ref = ref.residual_context_ref(*args_ref, training)
    assert out.dtype == h.dtype and out.shape == h.shape and memory_format_ok(out, h)
    assert_close(out, out_ref, dtype, "residual_context out")
    for r in range(len(cs)):
        if training:
            assert_stats(means[r], means_ref[r], cs[r].dtype, f"means[{r}]")
            assert_stats(vars_[r], vars_ref[r], cs[r].dtype, f"vars[{r}]")
        else:
            assert means[r] is rms[r] and vars_[r] is rvs[r]
    kinds = ("weights", "bn_weights", "bn_biases") if training else ("weights", "biases", "bn_weights", "bn_biases")
    index = {"weights": 2, "biases": 3, "bn_weights": 4, "bn_biases": 5}
    leaves = sum((args[index[k]] for k in kinds), [])
    leaves_ref = sum((args_ref[index[k]] for k in kinds), [])
    names = [f"{k}[{r}]" for k in kinds for r in range(len(cs))]
    if training:  # BatchNorm removes the conv bias: its gradient is exactly zero
        leaves, leaves_ref = leaves + bs, leaves_ref + args_ref[3]
    grads = assert_grads(out, out_ref, leaves, leaves_ref, dtype, names, mk.gen)
    if training:
        assert all(g.abs().max().item() == 0 for g in grads[len(names):])


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", LOW, ids=str)
def test_residual_context_three_terms(dtype, layout, training):
    mk = Maker(1)
    args = _residual_case(mk, 2, 5, (3, 3), [(3, (1, 1)), (7, (2, 2)), (4, (4, 4))], dtype,
                          layout, training)
    _check_residual(args, dtype, training, mk)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_residual_context_odd_shapes_many_terms(training):
    """N=1, odd C/H/W, non-square pooling, R=4 (two fused launches), C_r > one K tile."""
    mk = Maker(2)
    terms = [(70, (1, 1)), (5, (2, 1)), (3, (1, 2)), (2, (2, 2))]
    args = _residual_case(mk, 1, 7, (5, 3), terms, torch.float32, "contiguous", training)
    _check_residual(args, torch.float32, training, mk)


def test_residual_context_float64_and_mixed_dtypes():
    mk = Maker(3)
    args = _residual_case(mk, 2, 3, (2, 2), [(2, (2, 2)), (3, (1, 1))], torch.float64,
                          "channels_last", True)
    _check_residual(args, torch.float64, True, mk)
    # h in fp32 with bf16 contexts (output dtype follows h), large context mean
    args = _residual_case(mk, 2, 5, (3, 3), [(6, (2, 2))], torch.bfloat16, "contiguous", True,
                          h_dtype=torch.float32)
    args[1][0] = (args[1][0].float() + 4).to(torch.bfloat16)
    _check_residual(args, torch.bfloat16, True, mk)


def test_residual_context_saves_no_full_size_intermediate():
    mk = Maker(4)
    h, cs, ws, bs, gs, bts, rms, rvs = _residual_case(
        mk, 2, 5, (3, 3), [(3, (2, 2)), (4, (1, 1))], torch.float32, "contiguous", True)
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        K.residual_context(h, cs, ws, bs, gs, bts, rms, rvs, True)
    big = [t for t in saved if t.dim() == 4]
    assert {t.data_ptr() for t in big} <= {c.data_ptr() for c in cs}, "only the contexts may be saved"
    assert all(t.numel() <= 7 * 7 for t in saved if t.dim() < 4)  # params and (C,)/(C_r, C_r) stats


# ------------------------------------------------------------------------------ image tail
@pytest.mark.parametrize("s", [1, 2, 4])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", LOW, ids=str)
def test_image_context_tail(dtype, layout, training, s):
    mk = Maker(10 + s)
    N, C, H, W = (2, 5, 3, 3) if s < 4 else (1, 3, 2, 3)
    pdt = torch.float32
    h = mk.act((N, C, H, W), dtype, layout)
    z = mk.act((N, C, s * H, s * W), dtype, layout, offset=0.3, grad=True)
    g, b = mk.vec(C, "gamma", pdt, True), mk.vec(C, "beta", pdt, True)
    rm, rv = mk.vec(C, "mean", pdt), mk.vec(C, "var", pdt)
    out, mean, var = K.image_context_tail(h, z, g, b, rm, rv, training)
    ins_ref = [up(t) for t in (h, z, g, b, rm, rv)]
    out_ref, mean_ref, var_ref = ref.image_context_tail_ref(*ins_ref, training)
    assert out.dtype == h.dtype and memory_format_ok(out, h)
    assert_bn_outputs((out, mean, var), (out_ref, mean_ref, var_ref), (rm, rv), dtype, training,
                      "image_context_tail out")
    grads = assert_grads(out, out_ref, (z, g, b), ins_ref[1:4], dtype, ("z", "gamma", "beta"), mk.gen)
    assert memory_format_ok(grads[0], z)
    # the standalone backward gives the same gradients
    go = torch.randn(out.shape, generator=mk.gen, dtype=torch.float64).to(dtype).to(DEVICE)
    auto = torch.autograd.grad(out, (z, g, b), go)
    manual = K.image_context_tail_backward(go, z.detach(), g.detach(), b.detach(), mean, var,
                                           training)
    for a, m in zip(auto, manual):
        torch.testing.assert_close(a, m, rtol=0, atol=0)


def test_image_context_tail_mixed_dtype_and_nonsquare():
    mk = Maker(20)
    h = mk.act((1, 7, 3, 5), torch.float32)
    z = mk.act((1, 7, 6, 5), torch.bfloat16, "channels_last", offset=1.0, grad=True)
    g, b = mk.vec(7, "gamma", grad=True), mk.vec(7, "beta", grad=True)
    out, mean, var = K.image_context_tail(h, z, g, b, None, None, True)
    ins_ref = [up(t) for t in (h, z, g, b)]
    out_ref, mean_ref, var_ref = ref.image_context_tail_ref(*ins_ref, None, None, True)
    assert out.dtype == torch.float32
    assert_close(out, out_ref, torch.bfloat16, "out")
    assert_stats(mean, mean_ref, torch.bfloat16, "mean")
    assert_grads(out, out_ref, (z, g, b), ins_ref[1:], torch.bfloat16, ("z", "gamma", "beta"), mk.gen)


def test_float64_h_with_float32_z_and_grad_to_h():
    """fp64 h keeps fp64 accuracy with fp32 activations; a grad-requiring h gets grad_out."""
    mk = Maker(21)
    h = mk.act((2, 3, 2, 2), torch.float64, grad=True)
    z = mk.act((2, 3, 4, 4), torch.float32, grad=True)
    g, b = mk.vec(3, "gamma", grad=True), mk.vec(3, "beta", grad=True)
    out, _, _ = K.image_context_tail(h, z, g, b, None, None, True)
    out_ref, _, _ = ref.image_context_tail_ref(*(up(t) for t in (h, z, g, b)), None, None, True)
    assert out.dtype == torch.float64
    assert_close(out, out_ref, torch.float32, "out")
    torch.testing.assert_close(out - out_ref.detach(), torch.zeros_like(out), rtol=0, atol=1e-6)
    go = torch.randn(out.shape, generator=mk.gen, dtype=torch.float64)
    (gh,) = torch.autograd.grad(out, (h,), go)
    torch.testing.assert_close(gh, go, rtol=0, atol=0)
    cs = [mk.act((2, 2, 2, 2), torch.float32)]
    res, _, _ = K.residual_context(h, cs, [mk.weight(3, 2)], [None], [g], [b], [None], [None], True)
    (gh,) = torch.autograd.grad(res, (h,), go)
    torch.testing.assert_close(gh, go, rtol=0, atol=0)


# ------------------------------------------------------------------------------ head pooling
@pytest.mark.parametrize("shape", [(2, 5, 3, 3), (1, 7, 5, 7)], ids=str)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", LOW, ids=str)
def test_bn_relu_gap(dtype, layout, training, shape):
    mk = Maker(30)
    C = shape[1]
    z = mk.act(shape, dtype, layout, offset=0.3, grad=True)
    g, b = mk.vec(C, "gamma", grad=True), mk.vec(C, "beta", grad=True)
    rm, rv = mk.vec(C, "mean"), mk.vec(C, "var")
    pooled, mean, var = K.bn_relu_gap(z, g, b, rm, rv, training)
    ins_ref = [up(t) for t in (z, g, b, rm, rv)]
    pooled_ref, mean_ref, var_ref = ref.bn_relu_gap_ref(*ins_ref, training)
    assert pooled.dtype == dtype and pooled.shape == shape[:2]
    assert_bn_outputs((pooled, mean, var), (pooled_ref, mean_ref, var_ref), (rm, rv), dtype,
                      training, "bn_relu_gap pooled")
    grads = assert_grads(pooled, pooled_ref, (z, g, b), ins_ref[:3], dtype, ("z", "gamma", "beta"), mk.gen)
    assert memory_format_ok(grads[0], z)


@pytest.mark.parametrize("shape", [(2, 5, 3, 3), (1, 3, 7, 5)], ids=str)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", LOW + (torch.float64,), ids=str)
def test_global_avg_pool(dtype, layout, shape):
    mk = Maker(40)
    h = mk.act(shape, dtype, layout, grad=True)
    pooled = K.global_avg_pool(h)
    h_ref = up(h)
    pooled_ref = ref.global_avg_pool_ref(h_ref)
    assert pooled.dtype == dtype and pooled.shape == shape[:2]
    assert_close(pooled, pooled_ref, dtype, "global_avg_pool")
    (grad,) = assert_grads(pooled, pooled_ref, (h,), (h_ref,), dtype, ("h",), mk.gen)
    assert memory_format_ok(grad, h)


# ------------------------------------------------------------------------------ gradcheck
def _gc(fn, inputs):
    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_gradcheck_residual_context(training):
    mk = Maker(50)
    h, cs, ws, bs, gs, bts, rms, rvs = _residual_case(
        mk, 2, 3, (2, 2), [(2, (2, 2)), (3, (1, 1))], torch.float64, "contiguous", training)

    def fn(*p):
        return K.residual_context(h, cs, p[0:2], p[2:4], p[4:6], p[6:8], rms, rvs, training)[0]

    _gc(fn, tuple(ws + bs + gs + bts))


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_gradcheck_image_context_tail(training):
    mk = Maker(51)
    h = mk.act((1, 2, 2, 2), torch.float64)
    z = mk.act((1, 2, 4, 4), torch.float64, "channels_last", grad=True)
    g, b = mk.vec(2, "gamma", torch.float64, True), mk.vec(2, "beta", torch.float64, True)
    rm, rv = mk.vec(2, "mean", torch.float64), mk.vec(2, "var", torch.float64)
    _gc(lambda z, g, b: K.image_context_tail(h, z, g, b, rm, rv, training)[0], (z, g, b))


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_gradcheck_bn_relu_gap(training):
    mk = Maker(52)
    z = mk.act((2, 3, 2, 3), torch.float64, grad=True)
    g, b = mk.vec(3, "gamma", torch.float64, True), mk.vec(3, "beta", torch.float64, True)
    rm, rv = mk.vec(3, "mean", torch.float64), mk.vec(3, "var", torch.float64)
    _gc(lambda z, g, b: K.bn_relu_gap(z, g, b, rm, rv, training)[0], (z, g, b))


def test_gradcheck_global_avg_pool():
    h = Maker(53).act((2, 3, 3, 2), torch.float64, "channels_last", grad=True)
    _gc(K.global_avg_pool, (h,))


# ------------------------------------------------------------------------------ opcheck
def _opcheck_cases():
    mk = Maker(60)
    f = torch.float32
    h = mk.act((2, 3, 2, 2), f)
    cs = [mk.act((2, 2, 4, 4), f), mk.act((2, 3, 2, 2), f, "channels_last")]
    ws = [mk.weight(3, c.shape[1], grad=True).reshape(3, -1) for c in cs]
    vec = lambda kind, grad=False: [mk.vec(3, kind, grad=grad) for _ in cs]  # noqa: E731
    bs, gs, bts, rms, rvs = vec("beta", True), vec("gamma", True), vec("beta", True), vec("mean"), vec("var")
    z = mk.act((2, 3, 4, 4), f, grad=True)
    g, b, rm, rv = mk.vec(3, "gamma", grad=True), mk.vec(3, "beta", grad=True), mk.vec(3, "mean"), mk.vec(3, "var")
    go = mk.act((2, 3, 2, 2), f)
    op = torch.ops.contsup_triton
    _, means, vars_, cms, covs = op.residual_context(h, cs, ws, bs, gs, bts, [], [], True, 1e-5)
    det = lambda lst: [t.detach() for t in lst]  # noqa: E731
    return [
        ("residual_context", (h, cs, ws, bs, gs, bts, [], [], True, 1e-5)),
        ("residual_context", (h, cs, ws, bs, gs, bts, rms, rvs, False, 1e-5)),
        ("residual_context_backward", (go, cs, det(ws), det(bs), det(gs), det(bts), det(means),
                                       det(vars_), det(cms), det(covs), True, 1e-5)),
        ("image_context_tail", (h, z, g, b, rm, rv, True, 1e-5)),
        ("image_context_tail_backward", (go, z.detach(), g.detach(), b.detach(), rm, rv, False, 1e-5)),
        ("bn_relu_gap", (z, g, b, None, None, True, 1e-5)),
        ("bn_relu_gap_backward", (go[:, :, 0, 0], z.detach(), g.detach(), b.detach(), rm, rv, True, 1e-5)),
        ("global_avg_pool", (z,)),
        ("global_avg_pool_backward", (go[:, :, 0, 0], 4, 4, True)),
    ]


@pytest.mark.parametrize("index", range(9))
def test_opcheck(index):
    name, args = _opcheck_cases()[index]
    torch.library.opcheck(getattr(torch.ops.contsup_triton, name).default, args)


# ------------------------------------------------------------------------------ torch.compile
def test_torch_compile_fullgraph():
    """No graph break, same results and gradients as eager. Under the interpreter the ops are
    opaque custom ops (wrap_triton cannot trace interpreted kernels); on CUDA they are
    triton_ops and the kernels are traced."""
    mk = Maker(70)
    f = torch.float32
    h = mk.act((2, 3, 2, 2), f)
    c = mk.act((2, 4, 4, 4), f)
    w, bias, g, b = mk.weight(3, 4), mk.vec(3, "beta", grad=True), mk.vec(3, "gamma", grad=True), mk.vec(3, "beta", grad=True)
    z = mk.act((2, 3, 4, 4), f, grad=True)

    def step(h, c, w, bias, g, b, z):
        out, m, v = K.residual_context(h, [c], [w], [bias], [g], [b], [None], [None], True)
        out2, m2, v2 = K.image_context_tail(out, z, g, b, None, None, True)
        p, _, _ = K.bn_relu_gap(z, g, b, None, None, True)
        return (out2.square().sum() + p.sum() + K.global_avg_pool(out2).sum() + m[0].sum()
                + v2.sum())

    backend = "aot_eager" if INTERPRETED else "inductor"
    compiled = torch.compile(step, backend=backend, fullgraph=True)
    leaves = (w, bias, g, b, z)
    eager = step(h, c, *leaves)
    ge = torch.autograd.grad(eager, leaves)
    comp = compiled(h, c, *leaves)
    gc = torch.autograd.grad(comp, leaves)
    torch.testing.assert_close(comp, eager, rtol=1e-5, atol=1e-5)
    for a, e in zip(gc, ge):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------ running stats
@pytest.mark.parametrize("momentum", [0.1, None])
def test_running_stats_match_batchnorm(momentum):
    mk = Maker(80)
    f = torch.float32
    N, C, CR, H, W, s = 2, 5, 3, 3, 3, 2
    c = mk.act((N, CR, s * H, s * W), f, offset=0.5)
    h = mk.act((N, C, H, W), f)
    z = mk.act((N, C, s * H, s * W), f, offset=0.2)
    conv = torch.nn.Conv2d(CR, C, 1).to(DEVICE)
    bns = [torch.nn.BatchNorm2d(C, momentum=momentum).to(DEVICE) for _ in range(3)]
    for bn in bns:
        with torch.no_grad():
            bn.weight.copy_(mk.vec(C, "gamma"))
            bn.bias.copy_(mk.vec(C, "beta"))
            bn.running_mean.copy_(mk.vec(C, "mean"))
            bn.running_var.copy_(mk.vec(C, "var"))
    ours = [copy.deepcopy(bn) for bn in bns]
    for step in range(2):  # two steps: num_batches_tracked / cumulative momentum
        bns[0](conv(c))  # eager composition updates the buffers
        bns[1](z)
        bns[2](z)
        before = [o.running_mean.clone() for o in ours]
        _, means, vars_ = K.residual_context(h, [c], [conv.weight], [conv.bias], [ours[0].weight],
                                             [ours[0].bias], [ours[0].running_mean],
                                             [ours[0].running_var], True)
        _, m1, v1 = K.image_context_tail(h, z, ours[1].weight, ours[1].bias, ours[1].running_mean,
                                         ours[1].running_var, True)
        _, m2, v2 = K.bn_relu_gap(z, ours[2].weight, ours[2].bias, ours[2].running_mean,
                                  ours[2].running_var, True)
        for o, b in zip(ours, before):  # functional: the ops never touch the buffers
            assert torch.equal(o.running_mean, b)
        ref.update_running_stats(ours[0], means[0], vars_[0], N * s * H * s * W)
        ref.update_running_stats(ours[1], m1, v1, z.numel() // C)
        ref.update_running_stats(ours[2], m2, v2, z.numel() // C)
        for o, bn in zip(ours, bns):
            torch.testing.assert_close(o.running_mean, bn.running_mean, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(o.running_var, bn.running_var, rtol=1e-5, atol=1e-6)
            assert int(o.num_batches_tracked) == int(bn.num_batches_tracked) == step + 1


# ------------------------------------------------------------------------------ errors
def _err_inputs():
    mk = Maker(90)
    h = mk.act((2, 3, 2, 2), torch.float32)
    c = mk.act((2, 4, 4, 4), torch.float32)
    p = dict(w=mk.weight(3, 4, grad=False), b=mk.vec(3, "beta"), g=mk.vec(3, "gamma"),
             beta=mk.vec(3, "beta"), rm=mk.vec(3, "mean"), rv=mk.vec(3, "var"))
    return h, c, p


def _res(h, c, p, over):
    args = dict(h=h, contexts=[c], weights=[p["w"]], biases=[p["b"]], bn_weights=[p["g"]],
                bn_biases=[p["beta"]], running_means=[p["rm"]], running_vars=[p["rv"]],
                training=True)
    args.update(over)
    return K.residual_context(**args)


@pytest.mark.parametrize("case, pattern", [
    ("h_3d", r"h must be a 4-D \(N, C, H, W\) tensor, got shape \(3, 2, 2\)"),
    ("h_int", r"h has dtype torch.int64; allowed dtypes: float32, bfloat16, float16, float64"),
    ("ctx_not_multiple", r"contexts\[0\] has spatial size \(5, 4\).*integer multiple of h's \(2, 2\)"),
    ("ctx_batch", r"contexts\[0\] has batch size 1, h has 2"),
    ("weight_shape", r"weights\[0\] must have shape \(3, 4, 1, 1\) or \(3, 4\).*got \(3, 5, 1, 1\)"),
    ("bn_shape", r"bn_weights\[0\] must have shape \(3,\).*got \(4,\)"),
    ("eval_no_running", r"running_means\[0\] is None; it is required when training=False"),
    ("lengths", r"equal lengths, got contexts=1, weights=2"),
    ("device", r"bn_biases\[0\] is on device 'meta' but the activations are on"),
    ("ctx_requires_grad", r"contexts\[0\] requires grad"),
])
def test_residual_context_errors(case, pattern):
    h, c, p = _err_inputs()
    over = {}
    if case == "h_3d":
        over["h"] = h[0]
    elif case == "h_int":
        over["h"] = h.long()
    elif case == "ctx_not_multiple":
        over["contexts"] = [torch.randn(2, 4, 5, 4, device=DEVICE)]
    elif case == "ctx_batch":
        over["contexts"] = [c[:1]]
    elif case == "weight_shape":
        over["weights"] = [torch.zeros(3, 5, 1, 1, device=DEVICE)]
    elif case == "bn_shape":
        over["bn_weights"] = [torch.ones(4, device=DEVICE)]
    elif case == "eval_no_running":
        over["running_means"], over["training"] = [None], False
    elif case == "lengths":
        over["weights"] = [p["w"], p["w"]]
    elif case == "device":
        over["bn_biases"] = [torch.zeros(3, device="meta")]
    elif case == "ctx_requires_grad":
        over["contexts"] = [c.clone().requires_grad_()]
    with pytest.raises(ValueError, match=pattern):
        _res(h, c, p, over)


def test_other_op_errors():
    h, c, p = _err_inputs()
    z = torch.randn(2, 3, 5, 5, device=DEVICE)
    with pytest.raises(ValueError, match=r"z has spatial size \(5, 5\).*integer multiple of h's"):
        K.image_context_tail(h, z, p["g"], p["beta"], p["rm"], p["rv"], True)
    with pytest.raises(ValueError, match=r"z has \(N, C\) = \(2, 4\) but h has \(2, 3\)"):
        K.image_context_tail(h, c, p["g"], p["beta"], p["rm"], p["rv"], True)
    with pytest.raises(ValueError, match=r"running_var is None; it is required when training=False"):
        K.bn_relu_gap(z, p["g"], p["beta"], p["rm"], None, False)
    with pytest.raises(ValueError, match=r"bn_weight must have shape \(3,\)"):
        K.bn_relu_gap(z, p["g"][:2], p["beta"], None, None, True)
    with pytest.raises(TypeError, match=r"h must be a torch.Tensor, got list"):
        K.global_avg_pool([1.0])
    with pytest.raises(ValueError, match=r"h has dtype torch.int32"):
        K.global_avg_pool(torch.ones(1, 1, 1, 1, dtype=torch.int32, device=DEVICE))
    with pytest.raises(ValueError, match=r"mean must have shape \(3,\)"):
        K.image_context_tail_backward(h, z[:, :, :4, :4], p["g"], p["beta"], p["rm"][:1], p["rv"], True)


def test_is_available_and_ops_registered():
    assert OK, WHY
    for name in ("residual_context", "image_context_tail", "bn_relu_gap", "global_avg_pool"):
        assert hasattr(torch.ops.contsup_triton, name)
        assert hasattr(torch.ops.contsup_triton, name + "_backward")


# ------------------------------------------------------------------------------ CUDA only
@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available() or INTERPRETED, reason="needs CUDA (compiled kernels)")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_cuda_resnet_sized_boundary(dtype):
    """A ResNet-sized boundary with default TF32 settings: two contexts, bf16 or fp32."""
    torch.backends.cudnn.allow_tf32 = True
    mk = Maker(100)
    args = _residual_case(mk, 32, 128, (8, 8), [(64, (4, 4)), (128, (2, 2))], dtype,
                          "channels_last", True)
    out, means, vars_ = K.residual_context(*args, True)
    args_ref = [up(args[0]), [up(c) for c in args[1]]] + [[up(t) for t in lst] for lst in args[2:]]
    out_ref, means_ref, vars_ref = ref.residual_context_ref(*args_ref, True)
    tol = 3e-2 if dtype == torch.bfloat16 else 1e-2  # fp32: TF32 dots, as cuDNN by default
    torch.testing.assert_close(out.double(), out_ref, rtol=tol, atol=tol)
    for m, mr, v, vr in zip(means, means_ref, vars_, vars_ref):
        torch.testing.assert_close(m.double(), mr, rtol=1e-3, atol=1e-3)
        torch.testing.assert_close(v.double(), vr, rtol=1e-3, atol=1e-3)
    go = torch.randn_like(out_ref)
    leaves = args[2] + args[4] + args[5]
    leaves_ref = args_ref[2] + args_ref[4] + args_ref[5]
    grads = torch.autograd.grad(out, leaves, go.to(out.dtype))
    grads_ref = torch.autograd.grad(out_ref, leaves_ref, go)
    for g, gr in zip(grads, grads_ref):
        assert (g.double() - gr).norm() <= 5e-2 * gr.norm()
