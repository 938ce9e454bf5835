"""timm models by name: build_model("timm:<name>") and --model timm:<name> (pretrained=False,
nothing is downloaded), and clear errors for unknown names or a missing timm."""
import builtins

import pytest
import torch

from contsup_fast import LocalSequential
from contsup_fast import train as T
from contsup_fast.models import build_model

timm = pytest.importorskip("timm")

pytestmark = pytest.mark.filterwarnings("ignore:.*differs from the official release")


def test_build_timm_model_is_fresh_and_sized():
    torch.manual_seed(0)
    model = build_model("timm:resnet10t", num_classes=7)
    assert type(model).__module__.startswith("timm.")
    assert model.get_classifier().out_features == 7
    torch.manual_seed(0)
    ref = timm.create_model("resnet10t", pretrained=False, num_classes=7)
    for (name, a), (_, b) in zip(model.state_dict().items(), ref.state_dict().items()):
        assert torch.equal(a, b), name  # the same fresh initialisation: no pretrained weights


def test_timm_model_wraps_and_trains():
    torch.manual_seed(0)
    local = LocalSequential(build_model("timm:resnet10t", num_classes=10), K=2, context="R1E")
    x, y = torch.randn(2, 3, 32, 32), torch.tensor([0, 9])
    out = local(x, y)
    assert out.local_losses.shape == (2,) and torch.isfinite(out.local_losses).all()
    local.eval()
    with torch.no_grad():
        torch.testing.assert_close(local.to_module()(x), local(x))


@pytest.mark.parametrize("name", ["timm:no_such_net", "timm:"])
def test_unknown_timm_name_is_refused(name):
    with pytest.raises(ValueError, match=f"model '{name}'.*no model named"):
        build_model(name)


def test_missing_timm_is_a_clear_error(monkeypatch):
    real_import = builtins.__import__

    def no_timm(name, *args, **kwargs):
        if name == "timm" or name.startswith("timm."):
            raise ImportError("No module named 'timm'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_timm)
    with pytest.raises(ValueError, match=r"needs timm.*contsup_fast\[timm\]"):
        build_model("timm:resnet10t")


def _argv(data, out, model):
    return ["--model", model, "--K", "2", "--context", "R1E", "--data-dir", data, "--batch-size", "64",
            "--epochs", "1", "--out", str(out), "--no-progress", "--device", "cpu", "--lr", "0.05",
            "--warmup-epochs", "0"]


@pytest.mark.slow
def test_cli_trains_a_timm_model(tiny_cifar, tmp_path):
    res = T.main(_argv(tiny_cifar, tmp_path / "run", "timm:resnet10t"))
    assert 0 <= res["final_test_acc"] <= 100 and res["K"] == 2


def test_cli_refuses_unknown_timm_model(tiny_cifar, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        T.main(_argv(tiny_cifar, tmp_path / "run", "timm:no_such_net"))
    assert exc.value.code == 2
    assert "--model" in (err := capsys.readouterr().err) and "no_such_net" in err
