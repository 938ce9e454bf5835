"""contsup-check (contsup_fast.check): environment report, per-backend verdicts, exit status."""
from types import SimpleNamespace

import pytest
import torch

from contsup_fast import check
from contsup_fast.fused import reference as ref

CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny shapes: one intra-op thread is faster than two contending ones (and cheaper in CI)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_reference_passes_its_own_check_in_both_dtypes():
    for op in check.OPS:
        for dtype in (torch.float32, torch.bfloat16):
            errs = check.check_op(check._REF[op], op, dtype, CPU, seed=1, channels_last=dtype == torch.bfloat16)
            assert errs["out"] <= check.TOLERANCE[dtype]["out"], (op, dtype, errs)
            assert errs["grad"] <= check.TOLERANCE[dtype]["grad"], (op, dtype, errs)


def _no_relu_head_pool(z, w, b, rm, rv, training, eps):
    pooled, mean, var = ref.bn_relu_gap_ref(z, w, b, rm, rv, training, eps)
    y = torch.nn.functional.batch_norm(z, None, None, w, b, training=True, eps=eps)
    return y.mean((2, 3)), mean, var


class _GapMissingScale(torch.autograd.Function):
    """Right forward, backward missing the 1/(H*W) factor."""

    @staticmethod
    def forward(ctx, t):
        ctx.shape = t.shape
        return t.mean((2, 3))

    @staticmethod
    def backward(ctx, g):
        return g[:, :, None, None].expand(ctx.shape).clone()


def _wrong_grad_gap(h):
    return _GapMissingScale.apply(h)


def test_wrong_forward_and_wrong_backward_are_caught():
    errs = check.check_op(_no_relu_head_pool, "head_pool", torch.float32, CPU)
    assert errs["out"] > 0.1
    errs = check.check_op(_wrong_grad_gap, "gap", torch.float32, CPU)
    assert errs["out"] < 1e-6 and errs["grad"] > 1.0


def test_main_exits_nonzero_for_a_wrong_backend_and_names_it(monkeypatch, capsys):
    good = check._backend("torch", CPU)[0]
    broken = SimpleNamespace(**{**vars(good), "name": "native", "bn_relu_gap": _no_relu_head_pool})
    real = check._backend
    monkeypatch.setattr(check, "_backend",
                        lambda name, device: (broken, "") if name == "native" else real(name, device))
    rc = check.main(["--device", "cpu", "--backends", "torch", "native", "--no-timing"])
    out = capsys.readouterr().out
    assert rc == 1
    assert "native  WRONG: head_pool float32 contiguous out" in out
    assert "torch   ok" in out and "FAILED: wrong results from native" in out


def test_main_prints_environment_verdicts_and_ratio(capsys):
    rc = check.main(["--device", "cpu", "--backends", "torch", "native"])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "torch         " + torch.__version__ in out and "device        cpu" in out
    assert "extension     " in out
    assert "torch   ok (the eager reference" in out
    native = [line for line in out.splitlines() if line.startswith("native ")][0]
    assert native.startswith("native  unavailable:") or "x eager" in native, native


def test_triton_on_cpu_without_interpreter_is_unavailable_with_reason(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    rep = check.check_backend("triton", CPU)
    assert not rep.available and "TRITON_INTERPRET=1" in rep.reason
    assert rep.verdict().startswith("triton  unavailable: ")


def test_bad_device_is_one_line_error(capsys):
    assert check.main(["--device", "meta"]) == 2
    err = capsys.readouterr().err
    assert "--device must be cpu or cuda" in err and "Traceback" not in err


def test_extension_architectures_are_read_from_the_fat_binary(tmp_path):
    info = check.extension_info()
    if not info["loaded"] or not info.get("with_cuda"):
        pytest.skip("contsup_fast._C is not built with CUDA kernels")
    assert isinstance(info["archs"], list) and any(a.startswith("sm_") for a in info["archs"]), info
    not_elf = tmp_path / "x.so"
    not_elf.write_bytes(b"not an elf file" * 8)
    with pytest.raises(ValueError, match="ELF"):
        check.fatbin_architectures(str(not_elf))


@pytest.mark.cuda
def test_every_backend_is_correct_on_the_gpu():
    reports = check.run_checks(torch.device("cuda"), time_it=False)
    assert [r.name for r in reports if r.wrong] == [], [r.verdict() for r in reports]


def test_compile_option_refuses_an_unknown_architecture(capsys):
    """``--compile`` hands over to the compile report, whose --arch names what is allowed."""
    with pytest.raises(SystemExit) as exc:
        check.main(["--compile", "sm_70"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "sm_70" in err and "sm_90" in err and "sm_80" in err
