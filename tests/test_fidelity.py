"""Fidelity to the authors' ContSup code (issue: the float64 parity run's defects) and the
checks that keep a run from diverging silently.

Each test names the reference behaviour it pins: auxiliary-head width at the network's widest
stage (networks_dev/auxiliary_nets.py), the memory-balance loss weights (networks_dev/configs.py,
``local_loss_scale_for_memory_balance``), float64 kept end to end, the reference's
normalisation constants (train.py), and the refusals of bad labels, feature_dim and non-finite
losses."""
import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from contsup_fast import LocalSequential
from contsup_fast import train as T
from contsup_fast.checkpoint import load_checkpoint
from contsup_fast.local import REFERENCE_CIFAR_MEAN, REFERENCE_CIFAR_STD
from contsup_fast.models import resnet32, resnet110
from contsup_fast.presets import reconstruction_weights

pytestmark = pytest.mark.filterwarnings("ignore:.*differs from the official release")


def _first_conv(head):
    return next(m for m in head.modules() if isinstance(m, nn.Conv2d))


def _expected_conv(c):
    # the reference's AuxClassifier: 16 -> Conv(16, 32, s2), 32 -> Conv(32, 64, s2), 64 -> Conv(64, 64, s1)
    return (c, 2 * c, 2) if c < 64 else (c, c, 1)


@pytest.mark.parametrize("arch,K,split", [
    ("resnet32", 2, None), ("resnet32", 3, None), ("resnet32", 2, "balanced"),
    ("resnet32", 4, "balanced"), ("resnet32", 4, None), ("resnet32", 16, None),
    ("resnet110", 2, None), ("resnet110", 3, "balanced")])
def test_head_width_follows_the_networks_widest_stage(arch, K, split):
    model = {"resnet32": resnet32, "resnet110": resnet110}[arch]()
    local = LocalSequential(model, K=K, context="R0", split=split, backend="torch")
    for m in list(local)[:-1]:
        c = m.out_shape[0]
        conv = _first_conv(m.head)
        assert (conv.in_channels, conv.out_channels, conv.stride[0]) == _expected_conv(c), (arch, K, split, m.index)
        assert m.head.mlp[0].in_features == _expected_conv(c)[1]


def test_k2_head_of_a_32_channel_module_widens_and_strides():
    local = LocalSequential(resnet32(), K=2, context="R0", backend="torch")
    conv = _first_conv(local[0].head)
    assert local[0].out_shape[0] == 32
    assert (conv.in_channels, conv.out_channels, conv.stride) == (32, 64, (2, 2))


def test_balanced_split_takes_the_memory_balance_loss_weights():
    local = LocalSequential(resnet32(), K=4, context="R0", split="balanced", reconstruct=True,
                            backend="torch")
    assert local.reconstruct_weights == (5.0, 0.0, 0.0, 0.1)
    assert LocalSequential(resnet32(), K=4, context="R0", reconstruct=True,
                           backend="torch").reconstruct_weights == (6.0, 0.0, 1.0, 2.0)
    # the reference has no memory-balance entry for ResNet-32 K=16, whose balanced split is the
    # equal-layer one: the equal-layer weights serve it
    assert reconstruction_weights("resnet32", 16, balanced=True) == (5.0, 0.05, 0.2, 0.5)
    assert reconstruction_weights("resnet110", 3, balanced=True) == (5.0, 0.0, 5.0, 0.1)
    assert reconstruction_weights("resnet110", 8, balanced=True) is None
    assert reconstruction_weights("vgg11", 4, balanced=False) is None


def test_balanced_module0_loss_is_five_times_reconstruction():
    torch.manual_seed(0)
    local = LocalSequential(resnet32(), K=4, context="R0", split="balanced", reconstruct=True,
                            backend="torch").double()
    x, y = torch.randn(4, 3, 32, 32, dtype=torch.float64), torch.randint(0, 10, (4,))
    m = local[0]
    out = m.body(x)
    recon = m.decoder(out, x * torch.tensor(local.image_std, dtype=torch.float64).view(1, 3, 1, 1)
                      + torch.tensor(local.image_mean, dtype=torch.float64).view(1, 3, 1, 1))
    assert torch.allclose(local._local_loss(m, out, y, x, local.backend_for(x.device)), 5.0 * recon,
                          rtol=1e-12, atol=0)


@pytest.mark.parametrize("loss,reconstruct", [("ce", False), ("supcon", False), ("ce", True)])
def test_float64_losses_stay_float64(loss, reconstruct):
    torch.manual_seed(0)
    local = LocalSequential(resnet32(), K=4, context="R1E", loss=loss, reconstruct=reconstruct,
                            backend="torch", context_mean=None).double()
    x, y = torch.randn(6, 3, 32, 32, dtype=torch.float64), torch.tensor([0, 1, 2, 0, 1, 2])
    out = local(x, y)
    assert out.local_losses.dtype == torch.float64 and out.logits.dtype == torch.float64
    # the last module's loss equals a float64 cross-entropy of its logits (a float32 round trip
    # would differ at about 1e-8 relative)
    exact = F.cross_entropy(out.logits, y)
    assert out.loss.item() == exact.item()


def test_half_precision_losses_are_upcast():
    from contsup_fast.losses import loss_precision
    for dt in (torch.float16, torch.bfloat16):
        assert loss_precision(torch.randn(3, dtype=dt)).dtype == torch.float32
    for dt in (torch.float32, torch.float64):
        assert loss_precision(torch.randn(3, dtype=dt)).dtype == dt


def test_labels_outside_the_class_range_are_refused():
    local = LocalSequential(resnet32(), K=2, context="R0", backend="torch")
    x = torch.randn(2, 3, 32, 32)
    for bad in ([0, 10], [-1, 3]):
        with pytest.raises(ValueError, match=r"\[0, 10\).*10 classes"):
            local(x, torch.tensor(bad))
    local(x, torch.tensor([0, 9]))  # the edges are fine


@pytest.mark.parametrize("bad", [0, -3, 1.5, True])
def test_feature_dim_must_be_positive(bad):
    with pytest.raises(ValueError, match="feature_dim"):
        LocalSequential(resnet32(), K=2, context="R0", feature_dim=bad)


def test_reference_normalisation_constants():
    assert REFERENCE_CIFAR_MEAN == pytest.approx((0.49137, 0.48235, 0.44667), abs=1e-5)
    assert REFERENCE_CIFAR_STD == pytest.approx((0.24706, 0.24353, 0.26157), abs=1e-5)


def _argv(data, out, *extra):
    return ["--model", "resnet20", "--K", "2", "--context", "R1", "--data-dir", data,
            "--batch-size", "64", "--epochs", "2", "--out", str(out), "--no-progress",
            "--device", "cpu", "--lr", "0.05", "--warmup-epochs", "1", *extra]


def test_cli_reference_normalisation_reaches_data_and_model(tiny_cifar, tmp_path, monkeypatch):
    seen = {}
    cls = T._local_class()
    orig = cls.__init__

    def spy(self, model, **kw):
        seen.update(kw)
        orig(self, model, **kw)

    monkeypatch.setattr(cls, "__init__", spy)
    out = tmp_path / "run"
    T.main(_argv(tiny_cifar, out, "--epochs", "1", "--normalization", "reference"))
    assert tuple(seen["image_mean"]) == REFERENCE_CIFAR_MEAN and tuple(seen["image_std"]) == REFERENCE_CIFAR_STD
    log = json.loads((out / "log.json").read_text())
    assert log["args"]["normalization"] == "reference"
    # a resume must keep the normalisation it was trained with
    with pytest.raises(SystemExit):
        T.main(["--resume", str(out), "--normalization", "dataset", "--no-progress"])


def test_cli_stops_at_a_non_finite_loss_and_keeps_the_last_good_checkpoint(tiny_cifar, tmp_path,
                                                                           monkeypatch, capsys):
    cls = T._local_class()
    orig = cls.forward
    calls = {"n": 0}

    def poisoned(self, x, y=None, scaler=None):
        if self.training:
            calls["n"] += 1
            if calls["n"] == 6:  # epoch 2, step 2 of 4
                x = x.clone()
                x[0, 0, 0, 0] = float("nan")
        return orig(self, x, y, scaler)

    monkeypatch.setattr(cls, "forward", poisoned)
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as exc:
        T.main(_argv(tiny_cifar, out))
    assert exc.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()
    line = err[-1]
    assert line.startswith("contsup-train: error: non-finite local loss")
    assert "local module 0" in line and "epoch 2, step 2/4" in line and "lr " in line
    assert "last good checkpoint" in line
    assert load_checkpoint(out / "checkpoint.pt")["epoch"] == 1 and calls["n"] == 6
