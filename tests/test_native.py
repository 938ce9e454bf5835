"""Tests of the compiled C++/CUDA backend (contsup_fast._native / contsup_fast._C).

Every op is compared with the plain-PyTorch specification (contsup_fast.fused.reference)
evaluated in float64 on the upcast inputs: forward output, returned statistics and the
gradients w.r.t. every parameter (and z), over fp64/fp32/bf16/fp16 activations (fp32
parameters for the half types, as under autocast), contiguous and channels_last layouts,
odd shapes, pooling factors s in {1, 2, 4}, several context terms, train and eval mode.
Plus float64 gradcheck of every backward, torch.library.opcheck of every registered op,
running-statistics bookkeeping against nn.BatchNorm2d, and argument errors.

CPU tests run everywhere the extension is built; tests marked ``cuda`` need a GPU and a
build with CUDA kernels.
"""
from __future__ import annotations

import pytest
import torch

from contsup_fast import _native as nat
from contsup_fast.fused import reference as ref

_OK, _WHY = nat.is_available()
if not _OK:
    pytest.skip(f"native extension not built: {_WHY}", allow_module_level=True)

OPS = torch.ops.contsup
HALF = (torch.bfloat16, torch.float16)
# max |native - fp64 reference| / (max |reference| + 1e-3), per activation dtype
TOL_OUT = {torch.float64: 1e-10, torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}
TOL_STAT = {torch.float64: 1e-10, torch.float32: 1e-5, torch.bfloat16: 1e-5, torch.float16: 1e-5}
TOL_PGRAD = {torch.float64: 1e-9, torch.float32: 2e-4, torch.bfloat16: 2e-3, torch.float16: 2e-3}
TOL_ZGRAD = {torch.float64: 1e-9, torch.float32: 2e-4, torch.bfloat16: 1e-2, torch.float16: 2e-3}

_CUDA_OK = torch.cuda.is_available() and nat.supports_device("cuda")
DEVICES = [
    "cpu",
    pytest.param("cuda", marks=[pytest.mark.cuda, pytest.mark.skipif(
        not _CUDA_OK, reason="needs a CUDA GPU and contsup_fast._C built with CUDA kernels")]),
]
DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]


def _param_dtype(dtype):
    return torch.float32 if dtype in HALF else dtype


def _fmt(t, channels_last):
    return t.to(memory_format=torch.channels_last) if channels_last else t.contiguous()


def _assert_close(actual, expected, tol, what):
    actual = actual.detach().double().cpu()
    expected = expected.detach().double().cpu()
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    err = (actual - expected).abs().max().item() if actual.numel() else 0.0
    scale = expected.abs().max().item() if expected.numel() else 0.0
    assert err <= tol * (scale + 1e-3), f"{what}: max abs err {err:.3g} (scale {scale:.3g}, tol {tol:g})"


def _bn_vectors(C, gen, device, dtype):
    g = (torch.rand(C, generator=gen) + 0.5).to(device, dtype)
    b = (torch.randn(C, generator=gen) * 0.5).to(device, dtype)
    rm = (torch.randn(C, generator=gen) * 0.5).to(device, dtype)
    rv = (torch.rand(C, generator=gen) + 0.5).to(device, dtype)
    return g, b, rm, rv


def _leaf(t):
    return t.detach().clone().requires_grad_(True)


def _up(t):
    """float64 leaf copy (for the reference)."""
    return _leaf(t.detach().double())


# ------------------------------------------------------------------------------------
# residual_context
# ------------------------------------------------------------------------------------
RESIDUAL_CASES = [
    # (N, C, H, W, [(C_r, s), ...])
    (1, 3, 1, 1, [(5, 2)]),
    (2, 5, 3, 3, [(3, 2), (7, 1)]),
    (3, 7, 5, 5, [(4, 4)]),
    (2, 3, 7, 7, [(5, 1), (3, 2), (2, 4)]),
]


def _residual_inputs(case, dtype, channels_last, device, seed=0):
    N, C, H, W, terms = case
    gen = torch.Generator().manual_seed(seed)
    pdt = _param_dtype(dtype)
    h = _fmt(torch.randn(N, C, H, W, generator=gen).to(device, dtype), channels_last)
    cs, ws, bs, gs, betas, rms, rvs = [], [], [], [], [], [], []
    for r, (Cr, s) in enumerate(terms):
        # positive-mean contexts (like post-ReLU features) exercise the centring
        c = torch.randn(N, Cr, s * H, s * W, generator=gen) + 0.5
        cs.append(_fmt(c.to(device, dtype), channels_last))
        w = torch.randn(C, Cr, generator=gen) / Cr ** 0.5
        ws.append(_leaf((w.view(C, Cr, 1, 1) if r % 2 == 0 else w).to(device, pdt)))  # both weight shapes
        bs.append(_leaf((torch.randn(C, generator=gen) * 0.3).to(device, pdt)))
        g, b, rm, rv = _bn_vectors(C, gen, device, pdt)
        gs.append(_leaf(g))
        betas.append(_leaf(b))
        rms.append(rm)
        rvs.append(rv)
    return h, cs, ws, bs, gs, betas, rms, rvs


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", range(len(RESIDUAL_CASES)))
def test_residual_context_matches_reference(case, dtype, channels_last, training, device):
    h, cs, ws, bs, gs, betas, rms, rvs = _residual_inputs(RESIDUAL_CASES[case], dtype, channels_last, device)
    params = ws + bs + gs + betas
    out, means, vars_ = nat.residual_context(h, cs, ws, bs, gs, betas, rms, rvs, training, 1e-5)
    assert out.dtype == h.dtype and out.shape == h.shape
    if channels_last and h.shape[1] > 1 and h.shape[2] * h.shape[3] > 1:
        assert out.is_contiguous(memory_format=torch.channels_last)
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(device, dtype)
    grads = torch.autograd.grad(out, params, grad)

    up = [_up(p) for p in params]
    R = len(cs)
    ref_out, ref_means, ref_vars = ref.residual_context_ref(
        h.double(), [c.double() for c in cs], up[:R], up[R:2 * R], up[2 * R:3 * R], up[3 * R:],
        [m.double() for m in rms], [v.double() for v in rvs], training, 1e-5)
    ref_grads = torch.autograd.grad(ref_out, up, grad.double())

    _assert_close(out, ref_out, TOL_OUT[dtype], "out")
    for r in range(R):
        if training:
            assert means[r].dtype == vars_[r].dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
        else:
            assert means[r] is rms[r] and vars_[r] is rvs[r]
        _assert_close(means[r], ref_means[r], TOL_STAT[dtype], f"mean[{r}]")
        _assert_close(vars_[r], ref_vars[r], TOL_STAT[dtype], f"var[{r}]")
    names = ["weight", "bias", "bn_weight", "bn_bias"]
    for i, (g, rg, p) in enumerate(zip(grads, ref_grads, params)):
        assert g.dtype == p.dtype and g.shape == p.shape
        _assert_close(g, rg, TOL_PGRAD[dtype], f"grad {names[i // R]}[{i % R}]")
    if training:  # the conv bias cancels under batch statistics: exactly zero gradient
        assert all(bool((g == 0).all()) for g in grads[R:2 * R])


def test_residual_context_no_terms_returns_h():
    h = torch.randn(2, 3, 4, 4)
    out, means, vars_ = nat.residual_context(h, [], [], [], [], [], [], [], True)
    assert out is h and means == [] and vars_ == []


def test_residual_context_h_grad_and_detached_contexts():
    h, cs, ws, bs, gs, betas, rms, rvs = _residual_inputs(RESIDUAL_CASES[1], torch.float32, False, "cpu")
    h = _leaf(h)
    cs = [_leaf(c) for c in cs]
    out, _, _ = nat.residual_context(h, cs, ws, bs, gs, betas, rms, rvs, True)
    out.sum().backward()  # expanded (zero-stride) upstream gradient
    assert torch.equal(h.grad, torch.ones_like(h))
    assert all(c.grad is None for c in cs)
    assert all(w.grad is not None for w in ws)


def test_residual_context_strided_views_and_mixed_context_dtype():
    """Non-contiguous views are read in place; an fp32 context is cast to h's bf16."""
    gen = torch.Generator().manual_seed(3)
    big_h = torch.randn(2, 8, 6, 10, generator=gen)
    h = big_h[:, 1:6, :, ::2]  # (2, 5, 6, 5), non-contiguous
    c = torch.randn(2, 6, 12, 20, generator=gen).transpose(2, 3).transpose(2, 3)[:, ::2]  # (2, 3, 12, 20)
    c = c[..., ::2]  # (2, 3, 12, 10)
    w, b = _leaf(torch.randn(5, 3, generator=gen)), _leaf(torch.randn(5, generator=gen))
    g, beta, rm, rv = _bn_vectors(5, gen, "cpu", torch.float32)
    g, beta = _leaf(g), _leaf(beta)
    out, m, v = nat.residual_context(h, [c], [w], [b], [g], [beta], [rm], [rv], True)
    ref_out, rm_, rv_ = ref.residual_context_ref(h, [c], [w], [b], [g], [beta], [rm], [rv], True)
    _assert_close(out, ref_out, 1e-5, "out")
    _assert_close(m[0], rm_[0], 1e-5, "mean")
    out_bf, _, _ = nat.residual_context(h.bfloat16(), [c], [w], [b], [g], [beta], [rm], [rv], True)
    assert out_bf.dtype == torch.bfloat16
    _assert_close(out_bf, ref_out, 2e-2, "out bf16")


def test_residual_context_under_autocast():
    h, cs, ws, bs, gs, betas, rms, rvs = _residual_inputs(RESIDUAL_CASES[1], torch.float32, True, "cpu")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        hb = h.bfloat16()
        csb = [c.bfloat16() for c in cs]
        out, means, _ = nat.residual_context(hb, csb, ws, bs, gs, betas, rms, rvs, True)
    assert out.dtype == torch.bfloat16 and means[0].dtype == torch.float32
    out.float().square().sum().backward()
    assert all(w.grad is not None and w.grad.dtype == torch.float32 for w in ws)


def test_deterministic_across_thread_counts():
    h, cs, ws, bs, gs, betas, rms, rvs = _residual_inputs(RESIDUAL_CASES[3], torch.float32, False, "cpu")
    z = torch.randn(4, 6, 16, 16) + 1.0
    g, beta, rm, rv = _bn_vectors(6, torch.Generator().manual_seed(0), "cpu", torch.float32)
    prev = torch.get_num_threads()
    results = []
    try:
        for threads in (1, max(2, prev)):
            torch.set_num_threads(threads)
            out, m, v = nat.residual_context(h, cs, ws, bs, gs, betas, rms, rvs, True)
            gw = torch.autograd.grad(out, ws, torch.ones_like(out))
            pooled, zm, zv = nat.bn_relu_gap(z, g, beta, rm, rv, True)
            results.append([out, *m, *v, *gw, pooled, zm, zv])
    finally:
        torch.set_num_threads(prev)
    for a, b in zip(*results):
        assert torch.equal(a, b)


# ------------------------------------------------------------------------------------
# image_context_tail and bn_relu_gap
# ------------------------------------------------------------------------------------
TAIL_CASES = [(1, 3, 1, 1, 2), (2, 5, 3, 3, 1), (2, 7, 5, 5, 2), (1, 3, 3, 3, 4)]  # (N, C, H, W, s)
GAP_CASES = [(1, 3, 3, 3), (2, 5, 1, 1), (3, 7, 5, 5), (2, 3, 7, 7)]


def _bn_inputs(C, dtype, device, seed):
    g, b, rm, rv = _bn_vectors(C, torch.Generator().manual_seed(seed), device, _param_dtype(dtype))
    return _leaf(g), _leaf(b), rm, rv


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", TAIL_CASES, ids=str)
def test_image_context_tail_matches_reference(case, dtype, channels_last, training, device):
    N, C, H, W, s = case
    gen = torch.Generator().manual_seed(7)
    h = _fmt(torch.randn(N, C, H, W, generator=gen).to(device, dtype), channels_last)
    z = _leaf(_fmt((torch.randn(N, C, s * H, s * W, generator=gen) + 0.3).to(device, dtype), channels_last))
    g, b, rm, rv = _bn_inputs(C, dtype, device, 8)
    out, mean, var = nat.image_context_tail(h, z, g, b, rm, rv, training, 1e-5)
    assert out.dtype == dtype and out.shape == h.shape
    grad = torch.randn(out.shape, generator=gen).to(device, dtype)
    dz, dg, db = torch.autograd.grad(out, [z, g, b], grad)
    assert dz.dtype == dtype and dg.dtype == g.dtype
    if channels_last and C > 1 and s * s * H * W > 1:
        assert dz.is_contiguous(memory_format=torch.channels_last)

    zu, gu, bu = _up(z), _up(g), _up(b)
    ref_out, ref_mean, ref_var = ref.image_context_tail_ref(h.double(), zu, gu, bu, rm.double(), rv.double(),
                                                            training, 1e-5)
    rdz, rdg, rdb = torch.autograd.grad(ref_out, [zu, gu, bu], grad.double())
    _assert_close(out, ref_out, TOL_OUT[dtype], "out")
    _assert_close(mean, ref_mean, TOL_STAT[dtype], "mean")
    _assert_close(var, ref_var, TOL_STAT[dtype], "var")
    if not training:
        assert mean is rm and var is rv
    _assert_close(dz, rdz, TOL_ZGRAD[dtype], "grad z")
    _assert_close(dg, rdg, TOL_PGRAD[dtype], "grad bn_weight")
    _assert_close(db, rdb, TOL_PGRAD[dtype], "grad bn_bias")

    # the stand-alone backward the lead calls directly gives the same gradients
    dz2, dg2, db2 = nat.image_context_tail_backward(grad, z.detach(), g.detach(), b.detach(),
                                                    mean, var, training, 1e-5)
    assert torch.equal(dz2, dz) and torch.equal(dg2, dg) and torch.equal(db2, db)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", GAP_CASES, ids=str)
def test_bn_relu_gap_matches_reference(case, dtype, channels_last, training, device):
    N, C, H, W = case
    gen = torch.Generator().manual_seed(11)
    z = _leaf(_fmt((torch.randn(N, C, H, W, generator=gen) + 0.3).to(device, dtype), channels_last))
    g, b, rm, rv = _bn_inputs(C, dtype, device, 12)
    pooled, mean, var = nat.bn_relu_gap(z, g, b, rm, rv, training, 1e-5)
    assert pooled.shape == (N, C) and pooled.dtype == dtype
    grad = torch.randn(N, C, generator=gen).to(device, dtype)
    dz, dg, db = torch.autograd.grad(pooled, [z, g, b], grad)

    zu, gu, bu = _up(z), _up(g), _up(b)
    ref_p, ref_mean, ref_var = ref.bn_relu_gap_ref(zu, gu, bu, rm.double(), rv.double(), training, 1e-5)
    rdz, rdg, rdb = torch.autograd.grad(ref_p, [zu, gu, bu], grad.double())
    _assert_close(pooled, ref_p, TOL_OUT[dtype], "pooled")
    _assert_close(mean, ref_mean, TOL_STAT[dtype], "mean")
    _assert_close(var, ref_var, TOL_STAT[dtype], "var")
    _assert_close(dz, rdz, TOL_ZGRAD[dtype], "grad z")
    _assert_close(dg, rdg, TOL_PGRAD[dtype], "grad bn_weight")
    _assert_close(db, rdb, TOL_PGRAD[dtype], "grad bn_bias")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(1, 3, 1, 1), (2, 5, 3, 3), (3, 7, 5, 7)], ids=str)
def test_global_avg_pool_matches_reference(shape, dtype, channels_last, device):
    gen = torch.Generator().manual_seed(5)
    h = _leaf(_fmt(torch.randn(*shape, generator=gen).to(device, dtype), channels_last))
    out = nat.global_avg_pool(h)
    grad = torch.randn(out.shape, generator=gen).to(device, dtype)
    (dh,) = torch.autograd.grad(out, [h], grad)
    hu = _up(h)
    ref_out = ref.global_avg_pool_ref(hu)
    (rdh,) = torch.autograd.grad(ref_out, [hu], grad.double())
    _assert_close(out, ref_out, TOL_OUT[dtype], "pooled")
    _assert_close(dh, rdh, TOL_ZGRAD[dtype], "grad h")
    assert dh.dtype == dtype and dh.shape == h.shape
    if channels_last and shape[1] > 1 and shape[2] * shape[3] > 1:
        assert dh.is_contiguous(memory_format=torch.channels_last)


# ------------------------------------------------------------------------------------
# gradcheck (float64) of every backward
# ------------------------------------------------------------------------------------
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_gradcheck_residual_context(training, channels_last):
    h, cs, ws, bs, gs, betas, rms, rvs = _residual_inputs((2, 3, 2, 2, [(2, 2), (3, 1)]), torch.float64,
                                                          channels_last, "cpu", seed=4)
    R = len(cs)
    h = _leaf(h)

    def fn(h, *p):
        return nat.residual_context(h, cs, list(p[:R]), list(p[R:2 * R]), list(p[2 * R:3 * R]),
                                    list(p[3 * R:]), rms, rvs, training)[0]

    assert torch.autograd.gradcheck(fn, (h, *ws, *bs, *gs, *betas), eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_gradcheck_image_context_tail_and_gap(training, channels_last):
    gen = torch.Generator().manual_seed(9)
    h = _leaf(_fmt(torch.randn(2, 3, 2, 2, generator=gen, dtype=torch.float64), channels_last))
    z = _leaf(_fmt(torch.randn(2, 3, 4, 4, generator=gen, dtype=torch.float64) + 0.2, channels_last))
    g, b, rm, rv = _bn_inputs(3, torch.float64, "cpu", 10)

    def tail(h, z, g, b):
        return nat.image_context_tail(h, z, g, b, rm, rv, training)[0]

    def gap(z, g, b):
        return nat.bn_relu_gap(z, g, b, rm, rv, training)[0]

    assert torch.autograd.gradcheck(tail, (h, z, g, b), eps=1e-6, atol=1e-6)
    assert torch.autograd.gradcheck(gap, (z, g, b), eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_gradcheck_global_avg_pool(channels_last):
    h = _leaf(_fmt(torch.randn(2, 3, 3, 2, dtype=torch.float64), channels_last))
    assert torch.autograd.gradcheck(nat.global_avg_pool, (h,))


# ------------------------------------------------------------------------------------
# torch.library.opcheck of every registered op (forward ops with grad-requiring inputs
# also exercise the autograd registration)
# ------------------------------------------------------------------------------------
def _opcheck_samples():
    gen = torch.Generator().manual_seed(2)
    h, cs, ws, bs, gs, betas, rms, rvs = _residual_inputs((2, 3, 2, 2, [(2, 2), (3, 1)]), torch.float32,
                                                          False, "cpu", seed=6)
    ws2 = [w.detach().reshape(3, -1).requires_grad_() for w in ws]
    z = _leaf(torch.randn(2, 3, 4, 4, generator=gen))
    zc = _leaf(torch.randn(2, 3, 3, 3, generator=gen).to(memory_format=torch.channels_last))
    g, b, rm, rv = _bn_inputs(3, torch.float32, "cpu", 1)
    samples = [
        (OPS.residual_context.default, (h, cs, ws2, bs, gs, betas, rms, rvs, True, 1e-5)),
        (OPS.residual_context.default, (h, cs, ws2, bs, gs, betas, rms, rvs, False, 1e-5)),
        (OPS.image_context_tail.default, (h, z, g, b, rm, rv, True, 1e-5)),
        (OPS.image_context_tail.default, (h, z, g, b, rm, rv, False, 1e-5)),
        (OPS.bn_relu_gap.default, (zc, g, b, rm, rv, True, 1e-5)),
        (OPS.bn_relu_gap.default, (zc, g, b, rm, rv, False, 1e-5)),
        (OPS.global_avg_pool.default, (zc,)),
    ]
    out, means, vars_, mom = OPS.residual_context(h, cs, ws2, bs, gs, betas, rms, rvs, True, 1e-5)
    samples.append((OPS.residual_context_backward.default,
                    (torch.randn_like(out), cs, [w.detach() for w in ws2], [x.detach() for x in bs],
                     [x.detach() for x in gs], [x.detach() for x in betas], means, vars_, mom, True, 1e-5)))
    _, m, v = OPS.image_context_tail(h, z, g, b, rm, rv, True, 1e-5)
    samples.append((OPS.image_context_tail_backward.default,
                    (torch.randn_like(h), z.detach(), g.detach(), b.detach(), m, v, True, 1e-5)))
    _, m, v = OPS.bn_relu_gap(zc, g, b, rm, rv, True, 1e-5)
    samples.append((OPS.bn_relu_gap_backward.default,
                    (torch.randn(2, 3), zc.detach(), g.detach(), b.detach(), m, v, True, 1e-5)))
    samples.append((OPS.global_avg_pool_backward.default, (torch.randn(2, 3), [2, 3, 3, 3], True)))
    return samples


_OPCHECK = _opcheck_samples()


@pytest.mark.parametrize("idx", range(len(_OPCHECK)),
                         ids=[f"{op._opname}-{i}" for i, (op, _) in enumerate(_OPCHECK)])
def test_opcheck(idx):
    op, args = _OPCHECK[idx]
    torch.library.opcheck(op, args)


def test_every_op_is_opchecked():
    names = {op._opname for op, _ in _OPCHECK}
    assert names == {
        "residual_context", "residual_context_backward", "image_context_tail", "image_context_tail_backward",
        "bn_relu_gap", "bn_relu_gap_backward", "global_avg_pool", "global_avg_pool_backward",
    }


# ------------------------------------------------------------------------------------
# running statistics via update_running_stats == nn.BatchNorm2d
# ------------------------------------------------------------------------------------
@pytest.mark.parametrize("momentum", [0.1, None])
def test_running_stats_match_batchnorm(momentum):
    gen = torch.Generator().manual_seed(13)
    N, C, H, W, Cr, s = 3, 4, 3, 3, 5, 2
    h = torch.randn(N, C, H, W, generator=gen)
    conv = torch.nn.Conv2d(Cr, C, 1)
    bn_ref = torch.nn.BatchNorm2d(C, momentum=momentum)
    bn_nat = torch.nn.BatchNorm2d(C, momentum=momentum)
    bn_nat.load_state_dict(bn_ref.state_dict())
    z = torch.randn(N, C, 2 * H, 2 * W, generator=gen) + 1.0
    bnz_ref = torch.nn.BatchNorm2d(C, momentum=momentum)
    bnz_nat = torch.nn.BatchNorm2d(C, momentum=momentum)
    for step in range(3):
        c = torch.randn(N, Cr, s * H, s * W, generator=gen) * 2 + 0.5
        bn_ref(conv(c))  # updates bn_ref's buffers as a module would
        _, means, vars_ = nat.residual_context(
            h, [c], [conv.weight], [conv.bias], [bn_nat.weight], [bn_nat.bias], [bn_nat.running_mean],
            [bn_nat.running_var], True, bn_nat.eps)
        ref.update_running_stats(bn_nat, means[0], vars_[0], count=N * s * H * s * W)

        bnz_ref(z)
        _, zm, zv = nat.image_context_tail(h, z, bnz_nat.weight, bnz_nat.bias, bnz_nat.running_mean,
                                           bnz_nat.running_var, True, bnz_nat.eps)
        ref.update_running_stats(bnz_nat, zm, zv, count=z.numel() // C)
    for a, b in ((bn_nat, bn_ref), (bnz_nat, bnz_ref)):
        torch.testing.assert_close(a.running_mean, b.running_mean, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(a.running_var, b.running_var, rtol=1e-5, atol=1e-6)
        assert int(a.num_batches_tracked) == int(b.num_batches_tracked) == 3


def test_ops_never_mutate_running_stats():
    h, cs, ws, bs, gs, betas, rms, rvs = _residual_inputs(RESIDUAL_CASES[1], torch.float32, False, "cpu")
    before = [t.clone() for t in rms + rvs]
    for training in (True, False):
        nat.residual_context(h, cs, ws, bs, gs, betas, rms, rvs, training)
        nat.bn_relu_gap(h, gs[0], betas[0], rms[0], rvs[0], training)
        nat.image_context_tail(h, h.repeat(1, 1, 2, 2), gs[0], betas[0], rms[0], rvs[0], training)
    for a, b in zip(before, rms + rvs):
        assert torch.equal(a, b)


# ------------------------------------------------------------------------------------
# argument errors
# ------------------------------------------------------------------------------------
def _valid_residual():
    return list(_residual_inputs((2, 3, 2, 2, [(4, 2)]), torch.float32, False, "cpu"))


def _residual_error(mutate, match):
    args = _valid_residual()
    mutate(args)
    with pytest.raises(RuntimeError, match=match):
        nat.residual_context(*args, True)


def test_error_h_ndim():
    _residual_error(lambda a: a.__setitem__(0, a[0][0]), r"h must be a 4-D .*got a 3-D")


def test_error_non_integer_scale():
    _residual_error(lambda a: a[1].__setitem__(0, torch.randn(2, 4, 5, 4)),
                    r"contexts\[0\] has spatial size 5x4, which is not an integer multiple")


def test_error_batch_mismatch():
    _residual_error(lambda a: a[1].__setitem__(0, torch.randn(3, 4, 4, 4)), r"contexts\[0\] has batch size 3")


def test_error_weight_shape():
    _residual_error(lambda a: a[2].__setitem__(0, torch.randn(3, 5)), r"weights\[0\] must have shape \(3, 4\)")


def test_error_bn_param_shape():
    _residual_error(lambda a: a[4].__setitem__(0, torch.randn(4)), r"bn_weights\[0\] must have shape \(3,\)")


def test_error_unsupported_dtype():
    args = _valid_residual()
    args[0] = args[0].to(torch.int32)
    args[1] = [c.to(torch.int32) for c in args[1]]
    with pytest.raises(RuntimeError, match=r"h must have dtype float32, float64, float16 or bfloat16, got Int"):
        nat.residual_context(*args, True)


def test_error_list_lengths():
    _residual_error(lambda a: a[3].append(torch.randn(3)), r"must have the same length")


def test_error_single_value_per_channel_in_training():
    z = torch.randn(1, 3, 1, 1)
    g, b, rm, rv = _bn_inputs(3, torch.float32, "cpu", 0)
    with pytest.raises(RuntimeError, match="more than 1 value per channel"):
        nat.bn_relu_gap(z, g, b, rm, rv, True)
    nat.bn_relu_gap(z, g, b, rm, rv, False)  # eval mode is fine


def test_error_image_tail_channels_and_scale():
    g, b, rm, rv = _bn_inputs(3, torch.float32, "cpu", 0)
    with pytest.raises(RuntimeError, match=r"z must have the batch size and channels of h"):
        nat.image_context_tail(torch.randn(2, 3, 2, 2), torch.randn(2, 4, 4, 4), g, b, rm, rv, True)
    with pytest.raises(RuntimeError, match=r"z has spatial size 5x5, which is not an integer multiple"):
        nat.image_context_tail(torch.randn(2, 3, 2, 2), torch.randn(2, 3, 5, 5), g, b, rm, rv, True)
    with pytest.raises(ValueError, match="running_mean/running_var are required"):
        nat.image_context_tail(torch.randn(2, 3, 2, 2), torch.randn(2, 3, 4, 4), g, b, None, None, False)


@pytest.mark.cuda
@pytest.mark.skipif(not _CUDA_OK, reason="needs a CUDA GPU and contsup_fast._C built with CUDA kernels")
def test_error_device_mismatch():
    args = _valid_residual()
    args[0] = args[0].cuda()
    with pytest.raises(RuntimeError, match=r"contexts\[0\] is on device cpu but h is on device cuda"):
        nat.residual_context(*args, True)


# ------------------------------------------------------------------------------------
# CUDA-only: larger shapes that span several tiles / blocks of the CUDA kernels
# ------------------------------------------------------------------------------------
@pytest.mark.cuda
@pytest.mark.skipif(not _CUDA_OK, reason="needs a CUDA GPU and contsup_fast._C built with CUDA kernels")
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_cuda_large_tiles_match_cpu(dtype, channels_last):
    case = (4, 70, 9, 9, [(67, 2), (130, 1), (3, 4)])  # C, C_r > 64: several k / j tiles
    for training in (True, False):
        cpu_in = _residual_inputs(case, dtype, channels_last, "cpu", seed=21)
        cuda_in = [x.cuda() if isinstance(x, torch.Tensor) else [_leaf(t.cuda()) if t.requires_grad else t.cuda()
                                                                  for t in x] for x in cpu_in]
        outs = []
        for h, cs, ws, bs, gs, betas, rms, rvs in (cpu_in, cuda_in):
            out, m, v = nat.residual_context(h, cs, ws, bs, gs, betas, rms, rvs, training)
            grads = torch.autograd.grad(out, ws + gs + betas, torch.ones_like(out) * 0.01)
            outs.append([out, *m, *v, *grads])
        for a, b in zip(*outs):
            _assert_close(a.cpu(), b, TOL_OUT[dtype] if a.dtype == dtype else 1e-4, "cuda vs cpu")
