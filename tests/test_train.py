"""Training CLI: logs, checkpoints, exact resume, interrupts, argument checks, a real short run."""
import json
import os
import signal

import numpy as np
import pytest
import torch

from contsup_fast import train as T
from contsup_fast.checkpoint import load_checkpoint, save_checkpoint

pytestmark = pytest.mark.filterwarnings("ignore:.*differs from the official release")


def _argv(data, out, *extra):
    # 200 images, batch 64 -> 4 steps per epoch (the last of 8 images)
    return ["--model", "resnet20", "--K", "4", "--context", "RnE", "--data-dir", data,
            "--batch-size", "64", "--epochs", "2", "--out", str(out), "--no-progress",
            "--device", "cpu", "--lr", "0.05", "--warmup-epochs", "1", *extra]


def _params(run_dir):
    ck = load_checkpoint(run_dir)
    return ck["model"], ck["optimizer"]


def _assert_same_state(a, b):
    (ma, oa), (mb, ob) = a, b
    assert ma.keys() == mb.keys()
    for k in ma:
        assert torch.equal(ma[k], mb[k]), f"parameter/buffer {k} differs"
    for i, st in oa["state"].items():
        for k, v in st.items():
            if isinstance(v, torch.Tensor):
                assert torch.equal(v, ob["state"][i][k]), f"optimizer state {i}.{k} differs"


def test_tiny_run_writes_log_and_checkpoint(tiny_cifar, tmp_path, capsys):
    out = tmp_path / "run"
    res = T.main(_argv(tiny_cifar, out, "--epochs", "1", "--log-every", "1"))
    assert 0 <= res["final_test_acc"] <= 100 and res["K"] == 4 and res["context"] == "R1E"
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith("final test accuracy: ") and "(resnet20, K=4, context=R1E, 1 epochs" in last
    log = json.loads((out / "log.json").read_text())
    assert log["args"]["K"] == 4 and log["versions"]["torch"] == torch.__version__
    assert "device_name" in log["versions"] and log["run"]["steps_per_epoch"] == 4
    (rec,) = log["epochs"]
    assert rec["epoch"] == 1 and len(rec["local_losses"]) == 4 and rec["test_acc"] is not None
    assert rec["peak_mem_kind"].startswith("CPU peak RSS") and rec["images_per_s"] > 0
    assert log["final"]["final_test_acc"] == res["final_test_acc"]
    ck = load_checkpoint(out / "checkpoint.pt")
    assert ck["epoch"] == 1 and ck["batch"] == 0 and ck["args"]["K"] == 4
    assert {"model", "optimizer", "scheduler", "scaler", "rng", "best_acc"} <= set(ck)
    assert not [f for f in os.listdir(out) if f.endswith(".tmp")]  # atomic writes left nothing


@pytest.mark.slow
def test_resume_is_bit_identical(tiny_cifar, tmp_path, monkeypatch):
    straight = tmp_path / "straight"
    T.main(_argv(tiny_cifar, straight))
    reference = _params(straight)

    # (1) stop after epoch 1 (checkpoint), resume the second epoch from the run folder
    split = tmp_path / "split"
    res = T.main(_argv(tiny_cifar, split, "--stop-after-epochs", "1"))
    assert res["stopped"] and load_checkpoint(split)["epoch"] == 1
    T.main(["--resume", str(split), "--no-progress"])
    _assert_same_state(_params(split), reference)
    log = json.loads((split / "log.json").read_text())
    assert [r["epoch"] for r in log["epochs"]] == [1, 2]

    # (2) KeyboardInterrupt in the middle of a training step of epoch 2 (step 6 of 8):
    # the checkpoint holds the state after step 5, and resuming mid-epoch is exact
    mid = tmp_path / "mid"
    cls = T._local_class()
    calls = {"n": 0}
    orig = cls.forward

    def interrupting(self, x, y=None, scaler=None):
        if self.training:
            calls["n"] += 1
            if calls["n"] == 6:
                raise KeyboardInterrupt
        return orig(self, x, y, scaler)

    monkeypatch.setattr(cls, "forward", interrupting)
    with pytest.raises(SystemExit) as exc:
        T.main(_argv(tiny_cifar, mid))
    assert exc.value.code == 130
    monkeypatch.setattr(cls, "forward", orig)
    ck = load_checkpoint(mid)
    assert (ck["epoch"], ck["batch"]) == (1, 1) and ck["partial"]["steps"] == 1
    T.main(["--resume", str(mid / "checkpoint.pt"), "--no-progress"])
    _assert_same_state(_params(mid), reference)


def test_ctrl_c_finishes_step_and_saves(tiny_cifar, tmp_path, monkeypatch):
    """A real SIGINT: the step in flight completes, a checkpoint is saved, exit status 130."""
    out = tmp_path / "sig"
    cls = T._local_class()
    orig = cls.forward
    calls = {"n": 0}

    def sigint_during_step(self, x, y=None, scaler=None):
        r = orig(self, x, y, scaler)
        if self.training:
            calls["n"] += 1
            if calls["n"] == 2:
                os.kill(os.getpid(), signal.SIGINT)
        return r

    monkeypatch.setattr(cls, "forward", sigint_during_step)
    before = signal.getsignal(signal.SIGINT)
    with pytest.raises(SystemExit) as exc:
        T.main(_argv(tiny_cifar, out))
    assert exc.value.code == 130
    assert calls["n"] == 2
    ck = load_checkpoint(out)
    assert (ck["epoch"], ck["batch"]) == (0, 2)  # both steps were applied
    assert ck["scheduler"]["last_epoch"] == 2
    assert signal.getsignal(signal.SIGINT) is before  # handler restored


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_amp_and_channels_last_run(tiny_cifar, tmp_path, amp):
    res = T.main(_argv(tiny_cifar, tmp_path / amp, "--epochs", "1", "--amp", amp,
                       "--channels-last"))
    assert np.isfinite(res["train_loss"])
    ck = load_checkpoint(tmp_path / amp)
    assert (ck["scaler"] is not None) == (amp == "fp16")


def test_resume_refuses_mismatched_args(tiny_cifar, tmp_path, capsys):
    out = tmp_path / "r"
    T.main(_argv(tiny_cifar, out, "--epochs", "1"))
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        T.main(["--resume", str(out), "--K", "8"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "--K: checkpoint has 4, command line 8" in err
    # same value given explicitly is fine; a finished run just reports its result
    res = T.main(["--resume", str(out), "--K", "4", "--no-progress"])
    assert res["epochs"] == 1 and res["final_test_acc"] is not None
    with pytest.raises(SystemExit):
        T.main(["--resume", str(tmp_path / "nothing_here")])


def _tiny_vit(name, num_classes):
    from torchvision.models import VisionTransformer
    return VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=16,
                             mlp_dim=32, num_classes=num_classes)


@pytest.mark.parametrize("vit", [False, True])
def test_aux_default_is_the_layouts_head_and_is_recorded_resolved(tiny_cifar, tmp_path, monkeypatch, vit):
    """--aux left out: 1c2f on a CNN's (N, C, H, W) boundaries, token on a ViT's (N, 1+L, D); the
    log and checkpoint record the resolved head, a resume keeps it, and --aux given explicitly
    against the resolved one is refused like any changed setting."""
    from contsup_fast.train import build
    if vit:
        monkeypatch.setattr(build, "_build_model", _tiny_vit)
    out = tmp_path / "r"
    T.main(_argv(tiny_cifar, out, "--epochs", "1", "--K", "2"))
    want = "token" if vit else "1c2f"
    assert json.loads((out / "log.json").read_text())["args"]["aux"] == want
    assert load_checkpoint(out / "checkpoint.pt")["args"]["aux"] == want
    res = T.main(["--resume", str(out), "--no-progress"])
    assert res["epochs"] == 1
    other = "dgl"
    with pytest.raises(SystemExit):
        T.main(["--resume", str(out), "--aux", other, "--no-progress"])
    parsed = vars(T.build_parser().parse_args(_argv(tiny_cifar, out, "--epochs", "1", "--K", "2")))
    recorded = json.loads((out / "log.json").read_text())["args"]
    assert parsed["aux"] is None and T.result_arg_differences(parsed, recorded) == []
    assert T.result_arg_differences(parsed, {**recorded, "aux": other}) == [f"aux: None here, {other!r} there"]


@pytest.mark.parametrize("extra, message", [
    (["--epochs", "0"], "--epochs"),
    (["--subset", "500"], "exceeds the 200 training images"),
    (["--aux", "3c3f"], "--aux"),
    (["--model", "no_such_net"], "--model"),
    (["--context", "Q7"], "context"),
    (["--amp", "fp8"], "--amp"),
])
def test_argument_errors(tiny_cifar, tmp_path, capsys, extra, message):
    with pytest.raises(SystemExit) as exc:
        T.main(_argv(tiny_cifar, tmp_path / "x", *extra))
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_missing_data_dir_error(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("CONTSUP_DATA_CACHE", str(tmp_path))
    with pytest.raises(SystemExit):
        T.main(["--epochs", "1", "--out", str(tmp_path / "o")])
    assert "default cache" in capsys.readouterr().err


def test_split_and_defaults_parsing():
    p = T.build_parser()
    a = p.parse_args([])
    assert (a.K, a.context, a.aux, a.loss, a.epochs, a.batch_size) == (16, "RnE", None, "ce", 160, 1024)
    assert p.parse_args(["--split", "balanced"]).split == "balanced"
    assert p.parse_args(["--split", "cost"]).split == "cost"
    assert p.parse_args(["--split", "none"]).split is None
    assert p.parse_args(["--split", "1,5,layer2.0"]).split == [1, 5, "layer2.0"]
    f = T._lr_lambda(10, 100)
    assert f(0) == pytest.approx(0.1) and f(9) == 1.0 and f(10) == 1.0
    assert f(55) == pytest.approx(0.5) and f(100) == pytest.approx(0.0, abs=1e-12)


@pytest.mark.slow
def test_real_cifar10_short_run(cifar10_root, tmp_path):
    """resnet20, K=4, context R1E, a 5000-image class-balanced subset, 3 epochs at batch 128
    (lr 0.1), on the shared JPEG copy of CIFAR-10; evaluated once on the 10,000 test images.
    Measured on the 2-core CPU dev machine (idle): 40.20% test accuracy, 108 s wall
    (about 170 train img/s); chance is 10%."""
    res = T.main(["--model", "resnet20", "--K", "4", "--context", "RnE", "--n", "1",
                  "--data-dir", str(cifar10_root), "--subset", "5000", "--epochs", "3",
                  "--batch-size", "128", "--warmup-epochs", "0.5", "--seed", "0",
                  "--device", "cpu", "--eval-every", "3", "--out", str(tmp_path / "real"),
                  "--no-progress"])
    assert res["context"] == "R1E" and res["epochs"] == 3
    assert res["final_test_acc"] > 30.0


@pytest.mark.parametrize("gate", ["ramp", "learned"])
def test_context_gate_options(tiny_cifar, tmp_path, gate):
    """--context-gate reaches LocalSequential; learned gates get no weight decay; the log
    records the last module's loss of every step."""
    out = tmp_path / "run"
    res = T.run(_argv(tiny_cifar, out, "--epochs", "1", "--context-gate", gate))
    assert np.isfinite(res["train_loss"])
    ck = load_checkpoint(out)
    groups = ck["optimizer"]["param_groups"]
    if gate == "learned":
        assert len(groups) == 2 and groups[1]["weight_decay"] == 0.0
        assert any(k.endswith(".context.gate") for k in ck["model"])
    else:
        assert len(groups) == 1
        # ramp over the (capped) warm-up: 1 epoch / 4 = 1 of 4 steps; all 4 steps taken
        assert int(ck["model"]["context_gate_step"]) == 4
    log = json.loads((out / "log.json").read_text())
    assert log["args"]["context_gate"] == gate
    assert len(log["epochs"][0]["step_losses"]) == 4


def test_context_mean_option_and_resume(tiny_cifar, tmp_path, capsys):
    """--context-mean reaches LocalSequential (the last boundary averages), is logged, and a
    resume with another value is refused (it changes the trained parameters)."""
    out = tmp_path / "run"
    res = T.main(_argv(tiny_cifar, out, "--epochs", "1", "--context-mean", "last"))
    assert np.isfinite(res["train_loss"])
    log = json.loads((out / "log.json").read_text())
    assert log["args"]["context_mean"] == "last"
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        T.main(["--resume", str(out), "--context-mean", "all"])
    assert exc.value.code == 2
    assert "--context-mean" in capsys.readouterr().err


def test_checkpoint_from_before_context_mean_resumes_with_the_sum(tiny_cifar, tmp_path, capsys):
    """A checkpoint written before --context-mean existed (its args lack the key) continues with
    the paper's sum, whatever today's default; asking for another value is refused."""
    out = tmp_path / "old"
    T.main(_argv(tiny_cifar, out, "--epochs", "2", "--stop-after-epochs", "1", "--context-mean", "none"))
    ck = load_checkpoint(out)
    del ck["args"]["context_mean"]
    save_checkpoint(ck, str(out / "checkpoint.pt"))
    capsys.readouterr()
    with pytest.raises(SystemExit):
        T.main(["--resume", str(out), "--context-mean", "last"])
    assert "--context-mean: checkpoint has 'none'" in capsys.readouterr().err
    res = T.main(["--resume", str(out), "--no-progress"])
    assert res["epochs"] == 2
    assert json.loads((out / "log.json").read_text())["args"]["context_mean"] == "none"


def test_warmup_start_floor():
    f = T._lr_lambda(4, 10, start=0.5)
    assert [round(f(i), 4) for i in range(4)] == [0.625, 0.75, 0.875, 1.0]
    g = T._lr_lambda(4, 10)
    assert [g(i) for i in range(4)] == [0.25, 0.5, 0.75, 1.0]
