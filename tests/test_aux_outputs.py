"""Models with auxiliary classifier outputs (googlenet, inception_v3 with aux_logits=True):
LocalSequential trains on the main logits, warns once naming aux_logits=False, and refuses
multi-output models whose logits it cannot tell."""
import collections
import os
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch
from torch import nn

from contsup_fast import LocalSequential

torchvision = pytest.importorskip("torchvision")

pytestmark = pytest.mark.filterwarnings("ignore:The default weight initialization")


def _wrap(model, **kw):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        local = LocalSequential(model, **kw)
    return local, [w for w in caught if "aux_logits=False" in str(w.message)]


def test_googlenet_trains_on_main_logits_and_warns_once():
    torch.manual_seed(0)
    model = torchvision.models.googlenet(weights=None, num_classes=10, init_weights=False)
    assert model.aux_logits and model.training
    local, warned = _wrap(model, K=2, context="R0", input_size=(3, 32, 32))
    assert len(warned) == 1
    assert "aux_logits2, aux_logits1" in str(warned[0].message)
    # the auxiliary classifiers are not part of the local modules, the main network is
    ids = {id(p) for p in local.parameters()}
    assert not any(id(p) in ids for p in list(model.aux1.parameters()) + list(model.aux2.parameters()))
    assert all(id(p) in ids for p in model.fc.parameters())
    x, y = torch.randn(2, 3, 32, 32), torch.tensor([3, 7])
    out = local(x, y)
    assert out.logits.shape == (2, 10) and torch.isfinite(out.local_losses).all()
    assert model.fc.weight.grad is not None and model.aux1.fc2.weight.grad is None
    # what is trained is what the model computes in eval mode (R0: no context terms)
    local.eval()
    model.eval()
    with torch.no_grad():
        ref = model(x)
        torch.testing.assert_close(local(x), ref)
        torch.testing.assert_close(local.to_module()(x), ref)


def test_googlenet_without_aux_logits_does_not_warn():
    model = torchvision.models.googlenet(weights=None, num_classes=10, aux_logits=False, init_weights=False)
    _, warned = _wrap(model, K=2, context="R1E", input_size=(3, 32, 32))
    assert warned == []


INCEPTION = textwrap.dedent("""
    import resource, warnings, torch, torchvision
    resource.setrlimit(resource.RLIMIT_AS, (6 << 30, 6 << 30))
    from contsup_fast import LocalSequential
    torch.manual_seed(0)
    model = torchvision.models.inception_v3(weights=None, num_classes=10, init_weights=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        local = LocalSequential(model, K=2, context="R0", input_size=(3, 75, 75))
    assert [str(w.message) for w in caught if "aux_logits=False" in str(w.message)], caught
    x, y = torch.randn(2, 3, 75, 75), torch.tensor([1, 2])
    local(x, y)
    assert model.AuxLogits.fc.weight.grad is None and model.fc.weight.grad is not None
    local.eval(); model.eval()
    with torch.no_grad():
        torch.testing.assert_close(local.to_module()(x), model(x))
    print("OK")
""")


@pytest.mark.slow
def test_inception_v3_trains_on_main_logits():
    # inception_v3's smallest input is 75x75; its auxiliary classifier alone would need more
    # (an avg_pool of 5 over its 3x3 map fails), so the example forward only works without it
    env = dict(os.environ, PYTHONPATH=os.getcwd() + os.pathsep + os.environ.get("PYTHONPATH", ""))
    res = subprocess.run([sys.executable, "-c", INCEPTION], capture_output=True, text=True,
                         timeout=600, env=env)
    assert res.returncode == 0 and "OK" in res.stdout, res.stderr[-3000:]


Outputs = collections.namedtuple("Outputs", ["main", "side"])


class _TwoOutputs(nn.Module):
    def __init__(self, kind):
        super().__init__()
        self.kind = kind
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.act = nn.ReLU()
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.act2 = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        h = self.pool(self.act2(self.conv2(self.act(self.conv(x))))).flatten(1)
        logits = self.fc(h)
        return (logits, h) if self.kind == "tuple" else Outputs(logits, h)


@pytest.mark.parametrize("kind", ["tuple", "namedtuple"])
def test_other_multi_output_models_are_refused(kind):
    with pytest.raises(ValueError, match="several outputs.*aux_logits=False"):
        LocalSequential(_TwoOutputs(kind), K=2, context="R0")
