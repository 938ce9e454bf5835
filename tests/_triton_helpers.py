"""Shared helpers of the Triton-kernel tests (``test_kernels_triton.py``,
``test_kernels_image_context.py``): the kernels module, the reference, the device, per-dtype
tolerances, the random input maker and the comparisons against a float64 reference.

Importing it skips the importing test module when Triton or the kernels are unavailable.
"""
import importlib
import importlib.util
import pathlib
import sys

import pytest
import torch

pytest.importorskip("triton")

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _load_kernels():
    """``contsup_fast.kernels``; before ``pip install -e`` maps it, load ``kernels/`` under
    that name (never as a top-level ``kernels``)."""
    try:
        return importlib.import_module("contsup_fast.kernels")
    except ImportError:
        pass
    if importlib.util.find_spec("contsup_fast") is None:
        sys.path.insert(0, str(ROOT))
    spec = importlib.util.spec_from_file_location(
        "contsup_fast.kernels", ROOT / "kernels" / "__init__.py",
        submodule_search_locations=[str(ROOT / "kernels")])
    mod = importlib.util.module_from_spec(spec)
    sys.modules["contsup_fast.kernels"] = mod
    spec.loader.exec_module(mod)
    return mod


K = _load_kernels()
from contsup_fast.fused import reference as ref  # noqa: E402

OK, WHY = K.is_available()
if not OK:
    pytest.skip(f"contsup_fast.kernels unavailable: {WHY}", allow_module_level=True)

INTERPRETED = K._common.INTERPRETED
DEVICE = torch.device("cpu" if INTERPRETED else "cuda")
LOW = (torch.float32, torch.bfloat16, torch.float16)
LAYOUTS = ("contiguous", "channels_last")
# (rtol, atol) of values O(1) vs. a float64 reference on the same (rounded) inputs
TOL = {torch.float64: (1e-9, 1e-9), torch.float32: (1e-4, 1e-4),
       torch.float16: (5e-3, 5e-3), torch.bfloat16: (3e-2, 3e-2)}
# relative-norm tolerance of gradients (sums over pixels; relu-mask flips near 0 in 16 bit)
GTOL = {torch.float64: 1e-9, torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 5e-2}
STAT_TOL = {torch.float64: (1e-9, 1e-9)}  # statistics accumulate in fp32 for other dtypes


@pytest.fixture(autouse=True)
def no_tf32():
    """Full fp32 dots (the kernels follow cudnn.allow_tf32 like a convolution would)."""
    old = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32 = old


# ------------------------------------------------------------------------------ helpers
class Maker:
    def __init__(self, seed=0):
        self.gen = torch.Generator().manual_seed(seed)

    def act(self, shape, dtype, layout="contiguous", offset=0.0, grad=False):
        x = (torch.randn(shape, generator=self.gen, dtype=torch.float64) + offset).to(dtype)
        if layout == "channels_last":
            x = x.contiguous(memory_format=torch.channels_last)
        return x.to(DEVICE).requires_grad_(grad)

    def vec(self, C, kind, dtype=torch.float32, grad=False):
        r = torch.randn(C, generator=self.gen, dtype=torch.float64)
        v = {"gamma": 1.0 + 0.5 * r, "beta": 0.5 * r, "mean": 0.3 * r,
             "var": 0.5 + torch.rand(C, generator=self.gen, dtype=torch.float64)}[kind]
        return v.to(dtype).to(DEVICE).requires_grad_(grad)

    def weight(self, C, CR, dtype=torch.float32, grad=True, round_to=None):
        """Conv weight; ``round_to``: values representable in that (activation) dtype, as the
        kernels round the weight to the dot dtype like an autocast convolution."""
        w = torch.randn(C, CR, 1, 1, generator=self.gen, dtype=torch.float64) / CR ** 0.5
        if round_to is not None:
            w = w.to(round_to).double()
        return w.to(dtype).to(DEVICE).requires_grad_(grad)


def up(t):
    """float64 copy of the same values (a fresh leaf with the same requires_grad)."""
    if t is None:
        return None
    return t.detach().double().requires_grad_(t.requires_grad)


def assert_close(actual, expected, dtype, what):
    rtol, atol = TOL[dtype]
    torch.testing.assert_close(actual.double(), expected.double(), rtol=rtol, atol=atol,
                               msg=lambda m: f"{what} ({dtype}): {m}")


def assert_stats(actual, expected, dtype, what):
    rtol, atol = STAT_TOL.get(dtype, (1e-4, 1e-4))
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    assert actual.dtype == acc, f"{what}: dtype {actual.dtype}, expected {acc}"
    torch.testing.assert_close(actual.double(), expected.double(), rtol=rtol, atol=atol,
                               msg=lambda m: f"{what} ({dtype}): {m}")


def assert_bn_outputs(outs, outs_ref, running, dtype, training, what):
    """``(out, mean, var)`` of a BatchNorm op vs. the reference: ``out`` within TOL; the batch
    statistics in training, the ``running`` (mean, var) buffers themselves in eval."""
    (out, mean, var), (out_ref, mean_ref, var_ref) = outs, outs_ref
    assert_close(out, out_ref, dtype, what)
    if training:
        assert_stats(mean, mean_ref, dtype, "mean")
        assert_stats(var, var_ref, dtype, "var")
    else:
        assert mean is running[0] and var is running[1]


def assert_grads(out, out_ref, leaves, leaves_ref, dtype, names, gen):
    go = torch.randn(out_ref.shape, generator=gen, dtype=torch.float64).to(out.dtype).to(out.device)
    grads = torch.autograd.grad(out, leaves, go, retain_graph=True)
    grads_ref = torch.autograd.grad(out_ref, leaves_ref, go.double())  # same (rounded) values
    for g, gr, leaf, name in zip(grads, grads_ref, leaves, names):
        assert g.dtype == leaf.dtype and g.shape == leaf.shape, name
        err = (g.double() - gr).norm().item() / max(gr.norm().item(), 1e-12)
        assert err <= GTOL[dtype], f"grad {name} ({dtype}): relative error {err:.2e}"
    return grads


def memory_format_ok(t, like):
    if like.is_contiguous():
        return t.is_contiguous()
    return t.is_contiguous(memory_format=torch.channels_last)
