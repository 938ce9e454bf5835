"""Tests of the native fused image-context op ``contsup_fast._native.image_context``
(``torch.ops.contsup.image_context`` + ``image_context_backward``; issue 11, section 2).

Specification: ``contsup_fast.fused.reference.image_context_ref``,
``out = h + avgpool_s(relu(bn(conv3x3(u, weight, bias, padding=1))))``, evaluated in float64
on the upcast inputs. Checked: forward output, returned batch statistics, gradients to
``u``, ``weight``, ``bias``, ``bn_weight``, ``bn_bias`` over fp64/fp32/bf16/fp16 activations
(fp32 parameters for the half types, as under autocast), contiguous and channels_last, odd
sizes, s = 1, 2, 4, training and eval; float64 gradcheck; opcheck; running statistics
against ``nn.BatchNorm2d``; the (N, C, s*H, s*W) convolution output never being allocated
(profiler allocator events); argument errors. Tests marked ``cuda`` need a GPU.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from contsup_fast import _native as nat
from contsup_fast.fused import reference as ref

_OK, _WHY = nat.is_available()
if not _OK:
    pytest.skip(f"native extension not built: {_WHY}", allow_module_level=True)

OPS = torch.ops.contsup
HALF = (torch.bfloat16, torch.float16)
DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]
# max |native - fp64 reference| / (max |reference| + 1e-3), per activation dtype
TOL_OUT = {torch.float64: 1e-10, torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}
TOL_STAT = {torch.float64: 1e-10, torch.float32: 1e-5, torch.bfloat16: 1e-5, torch.float16: 1e-5}
TOL_PGRAD = {torch.float64: 1e-9, torch.float32: 2e-4, torch.bfloat16: 5e-3, torch.float16: 2e-3}
TOL_UGRAD = {torch.float64: 1e-9, torch.float32: 2e-4, torch.bfloat16: 1e-2, torch.float16: 2e-3}

_CUDA_OK = torch.cuda.is_available() and nat.supports_device("cuda")
DEVICES = [
    "cpu",
    pytest.param("cuda", marks=[pytest.mark.cuda, pytest.mark.skipif(
        not _CUDA_OK, reason="needs a CUDA GPU and contsup_fast._C built with CUDA kernels")]),
]

CASES = [
    # (N, C, C_in, H, W, s): target (H, W), hidden map u (s*H, s*W)
    (2, 5, 3, 3, 4, 1),
    (3, 7, 12, 3, 3, 2),
    (2, 4, 2, 2, 3, 4),
    (1, 3, 1, 1, 1, 2),
    (2, 66, 5, 2, 5, 2),  # C > 64 (CUDA channel tiles), odd width
]


def _fmt(t, channels_last):
    return t.to(memory_format=torch.channels_last) if channels_last else t.contiguous()


def _leaf(t):
    return t.detach().clone().requires_grad_(True)


def _up(t):
    return _leaf(t.detach().double())


def _assert_close(actual, expected, tol, what):
    actual = actual.detach().double().cpu()
    expected = expected.detach().double().cpu()
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    err = (actual - expected).abs().max().item()
    scale = expected.abs().max().item()
    assert err <= tol * (scale + 1e-3), f"{what}: max abs err {err:.3g} (scale {scale:.3g}, tol {tol:g})"


def _inputs(case, dtype, channels_last, device, seed=0):
    """(h, u, weight, bias, bn_weight, bn_bias, running_mean, running_var); u is positive-mean
    (post-ReLU-like) to exercise the centring of the patch moments."""
    N, C, Ci, H, W, s = case
    gen = torch.Generator().manual_seed(seed)
    pdt = torch.float32 if dtype in HALF else dtype
    h = _fmt(torch.randn(N, C, H, W, generator=gen).to(device, dtype), channels_last)
    u = _fmt((torch.randn(N, Ci, s * H, s * W, generator=gen).relu() + 0.1).to(device, dtype), channels_last)
    w = (torch.randn(C, Ci, 3, 3, generator=gen) / (3 * Ci ** 0.5)).to(device, pdt)
    b = (torch.randn(C, generator=gen) * 0.3).to(device, pdt)
    g = (torch.rand(C, generator=gen) + 0.5).to(device, pdt)
    beta = (torch.randn(C, generator=gen) * 0.5).to(device, pdt)
    rm = (torch.randn(C, generator=gen) * 0.3).to(device, pdt)
    rv = (torch.rand(C, generator=gen) + 0.5).to(device, pdt)
    return h, _leaf(u), _leaf(w), _leaf(b), _leaf(g), _leaf(beta), rm, rv


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=str)
def test_image_context_matches_reference(case, dtype, channels_last, training, device):
    h, u, w, b, g, beta, rm, rv = _inputs(case, dtype, channels_last, device)
    out, mean, var = nat.image_context(h, u, w, b, g, beta, rm, rv, training)
    assert out.dtype == dtype and out.shape == h.shape and out.device == h.device
    if channels_last and case[1] > 1 and case[3] * case[4] > 1:
        assert out.is_contiguous(memory_format=torch.channels_last)
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(device, dtype)
    leaves = [u, w, b, g, beta]
    grads = torch.autograd.grad(out, leaves, grad)

    up = [_up(t) for t in leaves]
    ref_out, ref_mean, ref_var = ref.image_context_ref(h.double(), *up, rm.double(), rv.double(), training)
    ref_grads = torch.autograd.grad(ref_out, up, grad.double())

    _assert_close(out, ref_out, TOL_OUT[dtype], "out")
    if training:
        acc = torch.float64 if dtype == torch.float64 else torch.float32
        assert mean.dtype == var.dtype == acc
        _assert_close(mean, ref_mean, TOL_STAT[dtype], "batch mean")
        _assert_close(var, ref_var, TOL_STAT[dtype], "batch var")
    else:
        assert mean is rm and var is rv
    names = ["grad u", "grad weight", "grad bias", "grad bn_weight", "grad bn_bias"]
    for i, (a, e, name) in enumerate(zip(grads, ref_grads, names)):
        assert a.dtype == leaves[i].dtype, name
        _assert_close(a, e, TOL_UGRAD[dtype] if i == 0 else TOL_PGRAD[dtype], name)
    if channels_last and case[2] > 1:
        assert grads[0].is_contiguous(memory_format=torch.channels_last)


def test_u_is_cast_to_h_dtype_and_h_gets_identity_grad():
    h, u, w, b, g, beta, rm, rv = _inputs(CASES[1], torch.float32, False, "cpu")
    h = _leaf(h)
    out, _, _ = nat.image_context(h, u.double(), w, b, g, beta, rm, rv, True)
    assert out.dtype == torch.float32
    gh, gu = torch.autograd.grad(out.sum(), [h, u])
    assert torch.equal(gh, torch.ones_like(h)) and gu.dtype == torch.float32


def test_none_bias_and_bn_affine_mean_zeros_and_ones():
    h, u, w, b, g, beta, rm, rv = _inputs(CASES[0], torch.float64, False, "cpu")
    out, _, _ = nat.image_context(h, u, w, None, None, None, None, None, True)
    C = h.shape[1]
    z = torch.zeros(C, dtype=torch.float64)
    expected, _, _ = ref.image_context_ref(h, u, w, z, z + 1, z, z, z + 1, True)
    torch.testing.assert_close(out, expected)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("s", [1, 2])
def test_gradcheck(training, channels_last, s):
    h, u, w, b, g, beta, rm, rv = _inputs((2, 3, 2, 2, 3, s), torch.float64, channels_last, "cpu", seed=3)

    def fn(u, w, b, g, beta):
        return nat.image_context(h, u, w, b, g, beta, rm, rv, training)[0]

    assert torch.autograd.gradcheck(fn, (u, w, b, g, beta), eps=1e-6, atol=1e-6)


def _opcheck_samples():
    h, u, w, b, g, beta, rm, rv = _inputs((2, 3, 2, 2, 3, 2), torch.float32, False, "cpu", seed=5)
    hc, uc, wc, bc, gc, betac, rmc, rvc = _inputs((2, 4, 3, 3, 2, 1), torch.float32, True, "cpu", seed=6)
    samples = [
        (OPS.image_context.default, (h, u, w, b, g, beta, rm, rv, True, 1e-5)),
        (OPS.image_context.default, (hc, uc, wc, bc, gc, betac, rmc, rvc, False, 1e-5)),
    ]
    out, m, v, mom = OPS.image_context(h, u, w, b, g, beta, rm, rv, True, 1e-5)
    det = [t.detach() for t in (u, w, b, g, beta)]
    samples.append((OPS.image_context_backward.default, (torch.randn_like(out), *det, m, v, mom, True, 1e-5)))
    return samples


_OPCHECK = _opcheck_samples()


@pytest.mark.parametrize("idx", range(len(_OPCHECK)), ids=[f"{op._opname}-{i}" for i, (op, _) in enumerate(_OPCHECK)])
def test_opcheck(idx):
    op, args = _OPCHECK[idx]
    torch.library.opcheck(op, args)


@pytest.mark.parametrize("momentum", [0.1, None])
def test_running_stats_match_batchnorm(momentum):
    gen = torch.Generator().manual_seed(13)
    N, C, Ci, H, W, s = 3, 4, 5, 3, 3, 2
    conv = torch.nn.Conv2d(Ci, C, 3, padding=1)
    bn_ref = torch.nn.BatchNorm2d(C, momentum=momentum)
    bn_nat = torch.nn.BatchNorm2d(C, momentum=momentum)
    h = torch.randn(N, C, H, W, generator=gen)
    for _ in range(3):
        u = torch.randn(N, Ci, s * H, s * W, generator=gen).relu() * 2
        bn_ref(conv(u))
        _, mean, var = nat.image_context(h, u, conv.weight, conv.bias, bn_nat.weight, bn_nat.bias,
                                         bn_nat.running_mean, bn_nat.running_var, True, bn_nat.eps)
        ref.update_running_stats(bn_nat, mean, var, count=N * s * H * s * W)
    torch.testing.assert_close(bn_nat.running_mean, bn_ref.running_mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(bn_nat.running_var, bn_ref.running_var, rtol=1e-5, atol=1e-6)
    assert int(bn_nat.num_batches_tracked) == 3


def test_never_mutates_running_stats():
    h, u, w, b, g, beta, rm, rv = _inputs(CASES[1], torch.float32, False, "cpu")
    before = (rm.clone(), rv.clone())
    for training in (True, False):
        out, _, _ = nat.image_context(h, u, w, b, g, beta, rm, rv, training)
        out.sum().backward()
    assert torch.equal(before[0], rm) and torch.equal(before[1], rv)


def _allocations(fn):
    """(largest single allocation, peak of live allocated bytes) of fn() on CPU, from the
    profiler's allocator events in time order."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns())
    live = peak = largest = 0
    for e in events:
        live += e.nbytes()
        peak = max(peak, live)
        largest = max(largest, e.nbytes())
    return largest, peak


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_full_resolution_conv_output_is_never_allocated(training):
    # 16 output channels at 16 x 16 (s = 4 onto 4 x 4): z would be 4*16*16*16*4 B = 64 KiB,
    # while u (4, 3, 16, 16) is 12 KiB and everything else is smaller.
    torch.manual_seed(0)
    N, C, Ci, H, W, s = 4, 16, 3, 4, 4, 4
    h = torch.randn(N, C, H, W)
    u = torch.randn(N, Ci, s * H, s * W).relu().requires_grad_()
    w = torch.randn(C, Ci, 3, 3, requires_grad=True)
    b, g, beta = (torch.randn(C, requires_grad=True) for _ in range(3))
    rm, rv = torch.zeros(C), torch.ones(C)
    z_bytes = N * C * s * H * s * W * 4

    def step():
        out, _, _ = nat.image_context(h, u, w, b, g, beta, rm, rv, training)
        out.backward(torch.randn_like(out))

    def eager():
        out, _, _ = ref.image_context_ref(h, u, w, b, g, beta, rm, rv, training)
        out.backward(torch.randn_like(out))

    largest, peak = _allocations(step)
    largest_eager, _ = _allocations(eager)
    assert largest_eager >= z_bytes  # the probe sees the eager encoder's full-resolution output
    assert largest < z_bytes, f"an allocation of {largest} B >= the conv output's {z_bytes} B"
    assert peak < z_bytes, f"peak {peak} B >= the conv output's {z_bytes} B"


def test_deterministic_across_thread_counts():
    h, u, w, b, g, beta, rm, rv = _inputs((4, 9, 5, 4, 4, 2), torch.float32, False, "cpu", seed=8)
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            out, mean, var = nat.image_context(h, u, w, b, g, beta, rm, rv, True)
            results.append((out, mean, var, *torch.autograd.grad(out.sum(), [u, w, g])))
    finally:
        torch.set_num_threads(threads)
    # the extension's own reductions (out, mean, var, grad_u, grad_bn_weight) are bitwise equal;
    # grad_weight goes through ATen's GEMM (at::mm(W, S) in csrc), whose MKL kernels may round
    # differently at another thread count: measured 1 ulp (6e-7) on a 2-core x86-64 CPU
    names = ("out", "mean", "var", "grad_u", "grad_weight", "grad_bn_weight")
    for name, a, e in zip(names, *results):
        if name == "grad_weight":
            torch.testing.assert_close(a, e, rtol=1e-6, atol=1e-6, msg=name)
        else:
            assert torch.equal(a, e), name


# ------------------------------------------------------------------------------------
# argument errors
# ------------------------------------------------------------------------------------
def _error(mutate, match, exc=RuntimeError):
    args = list(_inputs(CASES[0], torch.float32, False, "cpu"))
    mutate(args)
    with pytest.raises(exc, match=match):
        nat.image_context(*args, True)


def test_error_weight_shape():
    _error(lambda a: a.__setitem__(2, torch.randn(5, 3, 1, 1)), r"weight must have shape \(5, 3, 3, 3\)")


def test_error_non_integer_scale():
    _error(lambda a: a.__setitem__(1, torch.randn(2, 3, 5, 4)), "not an integer multiple")


def test_error_batch_mismatch():
    _error(lambda a: a.__setitem__(1, torch.randn(3, 3, 3, 4)), "u has batch size 3 but h has batch size 2")


def test_error_bias_shape():
    _error(lambda a: a.__setitem__(3, torch.randn(4)), r"bias must have shape \(5,\)")


def test_error_u_ndim():
    _error(lambda a: a.__setitem__(1, torch.randn(2, 3, 3)), "u must be a 4-D")


def test_error_eval_needs_running_stats():
    h, u, w, b, g, beta, _, _ = _inputs(CASES[0], torch.float32, False, "cpu")
    with pytest.raises(ValueError, match="running_mean/running_var are required"):
        nat.image_context(h, u, w, b, g, beta, None, None, False)


def test_error_single_value_per_channel_in_training():
    h, u, w, b, g, beta, rm, rv = _inputs((1, 3, 2, 1, 1, 1), torch.float32, False, "cpu")
    with pytest.raises(RuntimeError, match="more than 1 value per channel"):
        nat.image_context(h, u, w, b, g, beta, rm, rv, True)


@pytest.mark.cuda
@pytest.mark.skipif(not _CUDA_OK, reason="needs a CUDA GPU and contsup_fast._C built with CUDA kernels")
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_cuda_matches_cpu_at_training_size(dtype, channels_last):
    """resnet32's 8x8 boundary: u (32, 12, 32, 32) -> C = 64 at 8 x 8 (s = 4)."""
    case = (32, 64, 12, 8, 8, 4)
    cpu = _inputs(case, dtype, channels_last, "cpu", seed=21)
    gpu = [t.detach().cuda().requires_grad_(t.requires_grad) for t in cpu]
    res = []
    for args in (cpu, gpu):
        out, mean, var = nat.image_context(*args, True)
        grads = torch.autograd.grad(out, args[1:6], torch.ones_like(out))
        res.append((out, mean, var, *grads))
    for a, e, name in zip(res[1], res[0], ["out", "mean", "var", "u", "weight", "bias", "bn_weight", "bn_bias"]):
        tol = TOL_UGRAD[dtype] if name in ("out", "u") else 1e-4
        _assert_close(a, e, tol, name)


@pytest.mark.parametrize("shape", [(3, 2, 1, 5), (2, 3, 4, 1), (2, 4, 2, 2), (2, 3, 7, 6)], ids=str)
def test_patch_moments_match_unfold_with_large_mean(shape):
    """The patch mean/covariance behind the batch statistics, against an explicit fp64
    unfold, for inputs whose mean dwarfs their spread (centring) and 1-pixel-wide maps
    (every border class)."""
    N, Ci, Hs, Ws = shape
    gen = torch.Generator().manual_seed(17)
    u = torch.randn(N, Ci, Hs, Ws, generator=gen) * 0.1 + 30.0
    C = 3
    h = torch.zeros(N, C, Hs, Ws)
    w = torch.randn(C, Ci, 3, 3, generator=gen)
    ones, zeros = torch.ones(C), torch.zeros(C)
    _, mean, var, moments = OPS.image_context(h, u, w, zeros, ones, zeros, zeros, ones, True, 1e-5)
    X = F.unfold(u.double(), 3, padding=1).transpose(1, 2).reshape(-1, 9 * Ci)  # (pixels, K)
    mu = X.mean(0)
    cov = (X - mu).T @ (X - mu) / X.shape[0]
    K = 9 * Ci
    torch.testing.assert_close(moments[:K].double(), mu, rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(moments[K:].double().view(K, K), cov, rtol=1e-4, atol=2e-5)
    z = F.conv2d(u.double(), w.double(), padding=1)
    torch.testing.assert_close(var.double(), z.var(dim=(0, 2, 3), unbiased=False), rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------------------------
# the CUDA kernels' code, run on CPU threads (csrc/cuda_emulation.h), against the CPU kernels
# ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def emulated_cuda_ops():
    """torch.ops.contsup_emu: every csrc/*.cpp (the operators, the CPU passes, and
    cuda_emulation.cpp, which includes the cuda_*.cu passes) compiled as C++ with the CUDA
    emulation (built once per checkout under build/cuda_emulation, a few minutes)."""
    import os
    from pathlib import Path

    from torch.utils import cpp_extension

    root = Path(__file__).resolve().parent.parent
    csrc = root / "csrc"
    build = root / "build" / "cuda_emulation"
    build.mkdir(parents=True, exist_ok=True)
    if not hasattr(torch.ops, "contsup_emu") or not hasattr(torch.ops.contsup_emu, "image_context"):
        os.environ.setdefault("MAX_JOBS", "2")
        cpp_extension.load(
            name="contsup_cuda_emu", sources=sorted(str(p) for p in csrc.glob("*.cpp")),
            extra_cflags=["-O1", "-DCONTSUP_CUDA_EMULATION", "-DCONTSUP_LIB=contsup_emu"],
            extra_include_paths=[str(csrc)], build_directory=str(build), is_python_module=False)
    return torch.ops.contsup_emu


EMU_CASES = [
    # (N, C, C_in, H, W, s, channels_last, training)
    (2, 5, 3, 3, 4, 1, False, True),
    (2, 70, 4, 2, 3, 2, True, True),   # two 64-channel tiles, 36-wide patch features
    (1, 3, 2, 1, 1, 2, False, False),
    (2, 9, 12, 3, 3, 4, True, True),   # C_in = 12 (K = 108: two feature tiles), s = 4
    (3, 4, 30, 4, 5, 2, False, True),  # C_in > 28: du kernel's multi-pass outputs, 5 feature tiles
]


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", EMU_CASES, ids=str)
def test_cuda_kernels_emulated_match_cpu(emulated_cuda_ops, case, dtype):
    N, C, Ci, H, W, s, channels_last, training = case
    h, u, w, b, g, beta, rm, rv = (t.detach() for t in _inputs((N, C, Ci, H, W, s), dtype, channels_last, "cpu"))
    args = (h, u, w, b, g, beta, rm, rv, training, 1e-5)
    emu = emulated_cuda_ops.image_context(*args)
    cpu = OPS.image_context(*args)
    tol = TOL_OUT[dtype] if dtype != torch.float32 else 1e-5
    for a, e, name in zip(emu, cpu, ["out", "mean", "var", "patch moments"]):
        _assert_close(a, e, tol if name == "out" else TOL_STAT[dtype], name)
    assert emu[0].stride() == cpu[0].stride()
    grad = torch.randn(h.shape, generator=torch.Generator().manual_seed(4)).to(dtype)
    bargs = (grad, u, w, b, g, beta, cpu[1], cpu[2], cpu[3], training, 1e-5)
    emu_g = emulated_cuda_ops.image_context_backward(*bargs)
    cpu_g = OPS.image_context_backward(*bargs)
    for i, (a, e, name) in enumerate(zip(emu_g, cpu_g, ["u", "weight", "bias", "bn_weight", "bn_bias"])):
        _assert_close(a, e, TOL_UGRAD[dtype] if i == 0 else TOL_PGRAD[dtype], f"grad {name}")
    assert emu_g[0].stride() == cpu_g[0].stride()


@pytest.mark.slow
def test_cuda_kernels_emulated_other_ops_match_cpu(emulated_cuda_ops):
    """The pre-existing CUDA passes (residual context, image-context tail, head pooling) too."""
    gen = torch.Generator().manual_seed(5)
    h = torch.randn(2, 6, 3, 3, generator=gen)
    c = torch.randn(2, 5, 6, 6, generator=gen).relu()
    z = torch.randn(2, 6, 6, 6, generator=gen).to(memory_format=torch.channels_last)
    w, b = torch.randn(6, 5, generator=gen), torch.randn(6, generator=gen)
    g, beta, rm, rv = torch.rand(6, generator=gen) + 0.5, torch.randn(6, generator=gen), torch.zeros(6), torch.ones(6)
    for name, args in [
        ("residual_context", (h, [c], [w], [b], [g], [beta], [rm], [rv], True, 1e-5)),
        ("image_context_tail", (h, z, g, beta, rm, rv, True, 1e-5)),
        ("bn_relu_gap", (z, g, beta, rm, rv, True, 1e-5)),
    ]:
        for a, e in zip(getattr(emulated_cuda_ops, name)(*args), getattr(OPS, name)(*args)):
            _assert_close(a, e, 1e-5, name)
    _, m, v, mom = OPS.residual_context(h, [c], [w], [b], [g], [beta], [rm], [rv], True, 1e-5)
    grad = torch.randn(h.shape, generator=gen)
    bargs = (grad, [c], [w], [b], [g], [beta], m, v, mom, True, 1e-5)
    for a, e in zip(emulated_cuda_ops.residual_context_backward(*bargs), OPS.residual_context_backward(*bargs)):
        _assert_close(a[0], e[0], 1e-5, "residual_context_backward")
    _, m, v = OPS.image_context_tail(h, z, g, beta, rm, rv, True, 1e-5)
    bargs = (grad, z, g, beta, m, v, True, 1e-5)
    for a, e in zip(emulated_cuda_ops.image_context_tail_backward(*bargs), OPS.image_context_tail_backward(*bargs)):
        _assert_close(a, e, 1e-5, "image_context_tail_backward")


@pytest.mark.slow
def test_bench_image_context_writes_table_and_json(tmp_path):
    from bench import image_context as bench

    rows = bench.main(["--batch", "2", "--steps", "1", "--threads", "1", "--out", str(tmp_path)])
    assert [r["C"] for r in rows] == [16, 32, 64]
    assert all(r["native_peak_MiB"] < r["eager_peak_MiB"] for r in rows)
    assert (tmp_path / "image_context_cpu_float32_t1.json").exists()
