"""Tests of the Triton ``image_context`` op (``kernels/_image_context.py``) against the eager
reference :func:`contsup_fast.fused.reference.image_context_ref` (conv3x3 -> BN -> ReLU ->
avgpool -> add): forward, returned statistics, gradients of u / weight / bias / bn, float64
gradcheck, opcheck, running statistics, the absence of full-resolution intermediates, and
error messages.

Runs on CUDA, or on the CPU in Triton's interpreter (``TRITON_INTERPRET=1``, as in CI); shapes
are tiny because the interpreter is slow. Helpers (input maker, tolerances) are shared with
``test_kernels_triton.py`` (``_triton_helpers.py``).
"""
import copy
import importlib

import pytest
import torch

from _triton_helpers import (DEVICE, INTERPRETED, LOW, K, Maker, assert_close, assert_grads,
                             assert_stats, memory_format_ok, ref, up)
from _triton_helpers import no_tf32  # noqa: F401 (autouse fixture: full fp32 dots)


def conv_weight(mk, C, CI, dtype, round_to=None, grad=True):
    """(C, C_in, 3, 3) weight, O(1/sqrt(9 C_in)); ``round_to``: values representable in the
    activation dtype (the kernels round the weight like an autocast convolution)."""
    w = torch.randn(C, CI, 3, 3, generator=mk.gen, dtype=torch.float64) / (9 * CI) ** 0.5
    if round_to is not None:
        w = w.to(round_to).double()
    return w.to(dtype).to(DEVICE).requires_grad_(grad)


def make_case(mk, N, C, CI, hw, s, dtype, layout="contiguous", h_dtype=None, h_layout=None):
    """``(h, u, weight, bias, bn_weight, bn_bias, running_mean, running_var)``; ``s`` an int
    or ``(sH, sW)``; parameters fp32 for 16-bit activations (as under autocast)."""
    sh, sw = (s, s) if isinstance(s, int) else s
    H, W = hw
    pdt = torch.float64 if dtype == torch.float64 else torch.float32
    h = mk.act((N, C, H, W), h_dtype or dtype, h_layout or layout)
    u = mk.act((N, CI, sh * H, sw * W), dtype, layout, offset=0.5, grad=True)
    w = conv_weight(mk, C, CI, pdt, round_to=dtype)
    return (h, u, w, mk.vec(C, "beta", pdt, True), mk.vec(C, "gamma", pdt, True),
            mk.vec(C, "beta", pdt, True), mk.vec(C, "mean", pdt), mk.vec(C, "var", pdt))


def check_case(args, dtype, training, mk):
    """Forward, statistics and all gradients vs. the float64 reference on the same values."""
    h, u, w, b, g, beta, rm, rv = args
    out, mean, var = K.image_context(*args, training)
    args_ref = [up(t) for t in args]
    out_ref, mean_ref, var_ref = ref.image_context_ref(*args_ref, training)
    assert out.dtype == h.dtype and out.shape == h.shape and memory_format_ok(out, h)
    assert_close(out, out_ref, dtype, "image_context out")
    if training:
        assert_stats(mean, mean_ref, u.dtype, "mean")
        assert_stats(var, var_ref, u.dtype, "var")
    else:
        assert mean is rm and var is rv
    names = ("u", "weight", "bn_weight", "bn_bias") + (() if training else ("bias",))
    idx = (1, 2, 4, 5) + (() if training else (3,))
    grads = assert_grads(out, out_ref, [args[i] for i in idx], [args_ref[i] for i in idx], dtype,
                         names, mk.gen)
    if u.is_contiguous() or u.is_contiguous(memory_format=torch.channels_last):
        assert memory_format_ok(grads[0], u)  # (a strided view gets a contiguous gradient)
    if training:  # BatchNorm removes the conv bias: its gradient is exactly zero
        go = torch.ones_like(out)
        (gb,) = torch.autograd.grad(out, (b,), go)
        assert gb.abs().max().item() == 0


# (dtype, layout) x scale: every dtype and layout, each scale twice, odd spatial sizes
@pytest.mark.parametrize("dtype, layout, s, hw", [
    (torch.float32, "contiguous", 1, (5, 6)),
    (torch.float32, "channels_last", 2, (3, 3)),
    (torch.bfloat16, "contiguous", 4, (2, 3)),
    (torch.bfloat16, "channels_last", 1, (6, 6)),
    (torch.float16, "contiguous", 2, (3, 2)),
    (torch.float16, "channels_last", 4, (2, 2)),
], ids=lambda v: "x".join(map(str, v)) if isinstance(v, tuple) else str(v).replace("torch.", ""))
def test_image_context_train(dtype, layout, s, hw):
    mk = Maker(100 + s)
    check_case(make_case(mk, 2, 5, 3, hw, s, dtype, layout), dtype, True, mk)


@pytest.mark.parametrize("dtype, layout, s", [
    (torch.float32, "contiguous", 2),
    (torch.bfloat16, "channels_last", 4),
    (torch.float16, "contiguous", 3),
], ids=str)
def test_image_context_eval(dtype, layout, s):
    mk = Maker(110 + s)
    check_case(make_case(mk, 2, 4, 3, (2, 3), s, dtype, layout), dtype, False, mk)


@pytest.mark.skipif(not INTERPRETED, reason="on a GPU the GPU tiling is what every test runs")
@pytest.mark.parametrize("dtype, layout, training", [
    (torch.float32, "channels_last", True), (torch.bfloat16, "contiguous", True),
    (torch.float16, "channels_last", False),
], ids=str)
def test_gpu_tiling_under_the_interpreter(monkeypatch, dtype, layout, training):
    """The tiles the GPU compiles (conv K chunk 16, 16 pooled positions per backward-sums step,
    grad_u regions of 128 lanes and 16-channel blocks, several regions per image and a
    persistent loop), run in the interpreter on a small case against the float64 reference."""
    ic = importlib.import_module(K.__name__ + "._image_context")
    monkeypatch.setattr(ic, "GPU_TILING", True)
    mk = Maker(77)
    # C = 24: two 16-channel blocks in grad_u; C_in = 3: K9 = 27 over two 16-row chunks;
    # 12x12 big image: several 128-lane regions per image
    check_case(make_case(mk, 2, 24, 3, (6, 6), 2, dtype, layout), dtype, training, mk)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_image_context_odd_sizes_and_blocks(training):
    """s = 3 and non-square pooling (sH != sW), N=1, C_in = 15 (9*C_in = 135: two K blocks of
    the implicit GEMM), C = 5, an image of 12 x 6 big pixels (several grad_u regions)."""
    mk = Maker(120)
    check_case(make_case(mk, 1, 5, 15, (4, 3), 3, torch.float32), torch.float32, training, mk)
    check_case(make_case(mk, 2, 3, 2, (3, 2), (2, 3), torch.float32, "channels_last"),
               torch.float32, training, mk)


def test_image_context_float64_mixed_layouts_and_no_bias():
    """fp64 end to end (fp64 accumulation), h and u in different memory formats, bias=None,
    and fp32 h with bf16 u (the output follows h)."""
    mk = Maker(130)
    h, u, w, _, g, beta, rm, rv = make_case(mk, 2, 3, 2, (3, 3), 2, torch.float64,
                                            h_layout="channels_last")
    out, mean, var = K.image_context(h, u, w, None, g, beta, rm, rv, True)
    ins_ref = [up(t) for t in (h, u, w, g, beta)]
    out_ref, mean_ref, var_ref = ref.image_context_ref(ins_ref[0], ins_ref[1], ins_ref[2], None,
                                                       *ins_ref[3:], rm, rv, True)
    assert out.dtype == torch.float64 and memory_format_ok(out, h)
    assert_close(out, out_ref, torch.float64, "out")
    assert_stats(mean, mean_ref, torch.float64, "mean")
    assert_stats(var, var_ref, torch.float64, "var")
    assert_grads(out, out_ref, (u, w, g, beta), ins_ref[1:], torch.float64,
                 ("u", "weight", "bn_weight", "bn_bias"), mk.gen)
    args = make_case(mk, 2, 5, 3, (3, 3), 2, torch.bfloat16, h_dtype=torch.float32)
    out, _, _ = K.image_context(*args, True)
    out_ref, _, _ = ref.image_context_ref(*(up(t) for t in args), True)
    assert out.dtype == torch.float32
    assert_close(out, out_ref, torch.bfloat16, "out (fp32 h, bf16 u)")


def test_image_context_large_mean_and_strided_view():
    """fp32 u with mean 100 (the patch covariance must not cancel) given as a strided view
    (every other channel, a column slice): no copy, the view's strides are used."""
    mk = Maker(135)
    h, _, w, b, g, beta, rm, rv = make_case(mk, 2, 4, 3, (4, 4), 1, torch.float32)
    base = mk.act((2, 6, 4, 6), torch.float32, offset=100.0)
    u = base[:, ::2, :, 1:5].requires_grad_()
    assert not u.is_contiguous()
    check_case((h, u, w, b, g, beta, rm, rv), torch.float32, True, mk)


def test_region_plan_covers_the_image():
    """grad_u regions (interior + 1-pixel halo) fit the lanes and tile every image size,
    including the GPU plan for 32x32 images (6 regions in 256 lanes: 1.5x the pixels)."""
    from contsup_fast.kernels._image_context import region_plan

    rh, rw = region_plan(32, 32, 256)
    assert -(-32 // (rh - 2)) * -(-32 // (rw - 2)) == 6
    for hb, wb in ((1, 1), (1, 40), (7, 3), (32, 32), (33, 17), (200, 5)):
        for lanes in (16, 64, 256, 1024):
            rh, rw = region_plan(hb, wb, lanes)
            assert rh >= 3 and rw >= 3 and rh * rw <= lanes
            assert rh - 2 <= max(hb, 1) and rw - 2 <= max(wb, 1)  # no region wider than needed


# ------------------------------------------------------------------------------ gradcheck
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_gradcheck_image_context(training):
    mk = Maker(140)
    h, u, w, b, g, beta, rm, rv = make_case(mk, 2, 2, 2, (2, 2), 2, torch.float64, "channels_last")

    def fn(u, w, b, g, beta):
        return K.image_context(h, u, w, b, g, beta, rm, rv, training)[0]

    assert torch.autograd.gradcheck(fn, (u, w, b, g, beta), eps=1e-6, atol=1e-6, rtol=1e-5,
                                    fast_mode=True)


# ------------------------------------------------------------------------------ opcheck
def _opcheck_cases():
    mk = Maker(150)
    f = torch.float32
    h, u, w, b, g, beta, rm, rv = make_case(mk, 2, 3, 2, (2, 2), 2, f)
    go = mk.act((2, 3, 2, 2), f)
    op = torch.ops.contsup_triton
    _, mean, var, mu, cov = op.image_context(h, u, w, b, g, beta, None, None, True, 1e-5)
    det = [t.detach() for t in (u, w, b, g, beta)]
    return [
        ("image_context", (h, u, w, b, g, beta, None, None, True, 1e-5)),
        ("image_context", (h, u, w, b, g, beta, rm, rv, False, 1e-5)),
        ("image_context_backward", (go, *det, mean.detach(), var.detach(), mu.detach(),
                                    cov.detach(), True, 1e-5)),
    ]


@pytest.mark.parametrize("index", range(3))
def test_opcheck_image_context(index):
    name, args = _opcheck_cases()[index]
    torch.library.opcheck(getattr(torch.ops.contsup_triton, name).default, args)


# ------------------------------------------------------------------------------ memory
def test_no_full_resolution_tensor():
    """Forward and backward, training and eval, allocate no tensor as large as the
    (N, C, sH*H, sW*W) conv output (the eager path allocates it and its gradient), and save
    only ``u`` of full-resolution size for backward."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Largest(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.numel = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else (out,):
                if isinstance(t, torch.Tensor):
                    self.numel = max(self.numel, t.numel())
            return out

    mk = Maker(160)
    N, C, CI, s = 6, 16, 3, 2
    args = make_case(mk, N, C, CI, (4, 4), s, torch.float32)
    full = N * C * (s * 4) ** 2
    for training in (True, False):
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
            with Largest() as mode:
                out, _, _ = K.image_context(*args, training)
                torch.autograd.grad(out, (args[1], args[2]), torch.ones_like(out))
        assert mode.numel < full, f"a tensor of {mode.numel} elements (conv output: {full})"
        small = max(C * 9 * CI, (9 * CI) ** 2)  # weight, patch covariance
        big = [t for t in saved if t.numel() > small]
        assert [t.data_ptr() for t in big] == [args[1].data_ptr()], "only u may be saved full-size"
    # the eager reference does materialise it (the check above can see such a tensor)
    with Largest() as mode:
        ref.image_context_ref(*args, True)
    assert mode.numel >= full


# ------------------------------------------------------------------------------ running stats
def test_running_stats_match_batchnorm():
    """Batch statistics folded with update_running_stats equal nn.BatchNorm2d's buffers."""
    mk = Maker(170)
    N, C, CI, H, W, s = 2, 4, 3, 2, 3, 2
    u = mk.act((N, CI, s * H, s * W), torch.float32, offset=0.5)
    h = mk.act((N, C, H, W), torch.float32)
    conv = torch.nn.Conv2d(CI, C, 3, padding=1).to(DEVICE)
    bn = torch.nn.BatchNorm2d(C).to(DEVICE)
    with torch.no_grad():
        bn.running_mean.copy_(mk.vec(C, "mean"))
        bn.running_var.copy_(mk.vec(C, "var"))
    ours = copy.deepcopy(bn)
    for step in range(2):
        bn(conv(u))
        _, mean, var = K.image_context(h, u, conv.weight, conv.bias, ours.weight, ours.bias,
                                       ours.running_mean, ours.running_var, True)
        ref.update_running_stats(ours, mean, var, N * s * H * s * W)
        torch.testing.assert_close(ours.running_mean, bn.running_mean, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(ours.running_var, bn.running_var, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------ errors
@pytest.mark.parametrize("case, pattern", [
    ("h_3d", r"h must be a 4-D \(N, C, H, W\) tensor, got shape \(3, 2, 2\)"),
    ("u_int", r"u has dtype torch.int64; allowed dtypes: float32, bfloat16, float16, float64"),
    ("u_batch", r"u has batch size 1, h has 2; they must match"),
    ("u_not_multiple", r"u has spatial size \(5, 4\).*integer multiple of h's \(2, 2\)"),
    ("weight_shape", r"weight must have shape \(3, 4, 3, 3\) \(C of h, C_in of u\), "
                     r"got \(3, 4, 1, 1\)"),
    ("weight_type", r"weight must be a torch.Tensor, got list"),
    ("bias_shape", r"bias must have shape \(3,\).*got \(4,\)"),
    ("eval_no_running", r"running_mean is None; it is required when training=False"),
    ("device", r"bn_bias is on device 'meta' but the activations are on"),
])
def test_image_context_errors(case, pattern):
    mk = Maker(180)
    h = mk.act((2, 3, 2, 2), torch.float32)
    a = dict(h=h, u=mk.act((2, 4, 4, 4), torch.float32),
             weight=conv_weight(mk, 3, 4, torch.float32),
             bias=mk.vec(3, "beta"), bn_weight=mk.vec(3, "gamma"), bn_bias=mk.vec(3, "beta"),
             running_mean=mk.vec(3, "mean"), running_var=mk.vec(3, "var"), training=True)
    over = {
        "h_3d": dict(h=h[0]),
        "u_int": dict(u=torch.ones(2, 4, 4, 4, dtype=torch.int64, device=DEVICE)),
        "u_batch": dict(u=a["u"][:1]),
        "u_not_multiple": dict(u=mk.act((2, 4, 5, 4), torch.float32)),
        "weight_shape": dict(weight=torch.ones(3, 4, 1, 1, device=DEVICE)),
        "weight_type": dict(weight=[1.0]),
        "bias_shape": dict(bias=mk.vec(4, "beta")),
        "eval_no_running": dict(running_mean=None, training=False),
        "device": dict(bn_bias=torch.ones(3, device="meta")),
    }[case]
    a.update(over)
    with pytest.raises((ValueError, TypeError), match=pattern):
        K.image_context(**a)


# ------------------------------------------------------------------------------ GPU
# the sm_90 build without spills is checked on the real launches by tests/test_compile_report.py


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", LOW, ids=str)
def test_image_context_cuda_realistic(dtype):
    """ResNet-32 boundary shapes (C_in = 12, C = 64, 32x32 image pooled to 8x8, s = 4) and
    the 32x32 boundary (C = 16, s = 1), channels_last, on the compiled kernels."""
    mk = Maker(190)
    for C, hw, s in ((64, (8, 8), 4), (16, (32, 32), 1)):
        check_case(make_case(mk, 8, C, 12, hw, s, dtype, "channels_last"), dtype, True, mk)
        check_case(make_case(mk, 8, C, 12, hw, s, dtype), dtype, False, mk)


# ------------------------------------------------------------------------------ cost model
def test_cost_model_eager_flops_match_flop_counter():
    """The eager FLOPs of ``cost_model`` equal torch.utils.flop_counter's count of the
    reference (meta tensors: nothing is computed), and the op moves fewer bytes."""
    from torch.utils.flop_counter import FlopCounterMode

    from contsup_fast.kernels._image_context import cost_model

    N, C, CI, HB, HO = 4, 24, 5, 12, 4
    m = lambda *s: torch.randn(*s, device="meta", requires_grad=True)  # noqa: E731
    with FlopCounterMode(display=False) as fc:
        out = ref.image_context_ref(m(N, C, HO, HO).detach(), m(N, CI, HB, HB), m(C, CI, 3, 3),
                                    m(C), m(C), m(C), None, None, True)[0]
        out.backward(torch.ones_like(out))
    cost = cost_model(N, C, CI, HB, HB, HO, HO, 2)
    assert cost["eager"]["flops"] == fc.get_total_flops()
    assert cost["ours"]["bytes"] < cost["recompute_tail"]["bytes"] < cost["eager"]["bytes"]


def test_torch_compile_fullgraph():
    """No graph break and the eager results and gradients (under the interpreter the op is
    an opaque custom op; on CUDA a triton_op whose kernels inductor traces)."""
    mk = Maker(200)
    h, u, w, b, g, beta, _, _ = make_case(mk, 2, 3, 2, (2, 2), 2, torch.float32)

    def step(h, u, w, b, g, beta):
        out, mean, var = K.image_context(h, u, w, b, g, beta, None, None, True)
        return out.square().sum() + mean.sum() + var.sum()

    backend = "aot_eager" if INTERPRETED else "inductor"
    compiled = torch.compile(step, backend=backend, fullgraph=True)
    leaves = (u, w, b, g, beta)
    eager = step(h, *leaves)
    comp = compiled(h, *leaves)
    torch.testing.assert_close(comp, eager, rtol=1e-5, atol=1e-5)
    for a, e in zip(torch.autograd.grad(comp, leaves), torch.autograd.grad(eager, leaves)):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-5)
