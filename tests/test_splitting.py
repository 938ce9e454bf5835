"""Cut points, the paper's split tables and cost balancing."""
import pytest
import torch
from torch import nn

from contsup_fast import LocalSequential
from contsup_fast.models import resnet32, resnet110
from contsup_fast.presets import EQUAL_LAYERS, MEMORY_BALANCED
from contsup_fast.splitting import plan_split


def _cuts_as_stage_block(local):
    """Map a LocalSequential's cut nodes back to the paper's (stage, block) notation."""
    out = []
    for m in list(local)[:-1]:
        last = m.blocks[-1]
        out.append((0, 0) if last == "relu" else (int(last[5]), int(last.split(".")[1])))
    return out


@pytest.mark.parametrize("arch,make", [("resnet32", resnet32), ("resnet110", resnet110)])
@pytest.mark.parametrize("K", [2, 3, 4, 8, 16])
def test_presets_equal_paper_tables(arch, make, K):
    local = LocalSequential(make(), K=K, context="R0", backend="torch")
    assert local.split_source == "paper preset"
    assert _cuts_as_stage_block(local) == list(EQUAL_LAYERS[arch][K])


@pytest.mark.parametrize("arch,make,K", [("resnet32", resnet32, 2), ("resnet32", resnet32, 4),
                                         ("resnet32", resnet32, 8), ("resnet110", resnet110, 3),
                                         ("resnet110", resnet110, 4)])
def test_balanced_presets_equal_paper_tables(arch, make, K):
    local = LocalSequential(make(), K=K, context="R0", split="balanced", backend="torch")
    assert local.split_source == "paper memory-balanced preset"
    assert _cuts_as_stage_block(local) == list(MEMORY_BALANCED[arch][K])


def test_cut_candidates_of_resnet32():
    plan = plan_split(resnet32(), 2)
    assert len(plan.candidates) == 15  # the stem's ReLU and 14 of the 15 blocks
    assert plan.candidates[0] == "relu" and plan.candidates[-1] == "layer3_3"


def test_pieces_compose_to_the_model():
    torch.manual_seed(0)
    model = resnet32().eval()
    plan = plan_split(model, 5, split=[0, 3, 7, 12])
    x = torch.randn(2, 3, 32, 32)
    h = x
    for piece in plan.pieces:
        h = piece(h)
    torch.testing.assert_close(h, model(x))
    assert plan.source == "explicit"


def test_cost_balanced_split_minimises_the_largest_piece():
    plan = plan_split(resnet32(), 5)
    assert plan.source == "cost-balanced"
    order = [n.name for n in plan.gm.graph.nodes]

    def worst(cuts):
        idx = [order.index(c) for c in cuts] + [len(order) - 1]
        start, best = 0, 0
        for i in idx:
            best = max(best, sum(plan.costs.get(n, 0) for n in order[start:i + 1]))
            start = i + 1
        return best

    chosen = worst(plan.cuts)
    # no other choice of 4 cuts among the candidates does better (brute force on a sample)
    import itertools
    for combo in itertools.islice(itertools.combinations(plan.candidates, 4), 0, None, 7):
        assert worst(list(combo)) >= chosen


def test_explicit_split_by_name():
    local = LocalSequential(resnet32(), K=3, split=["layer1.2", "layer2.4"], context="R0", backend="torch")
    assert local[0].blocks[-1] == "layer1.2" and local[1].blocks[-1] == "layer2.4"


def test_single_tensor_cuts_only():
    class TwoBranch(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU())
            self.b = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.ReLU())
            self.c = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.ReLU())
            self.fc = nn.Linear(4, 3)

        def forward(self, x):
            a = self.a(x)
            b = self.b(a)
            c = self.c(b) + a  # `a` crosses the cut after b: not a single-tensor cut
            return self.fc(c.mean((2, 3)))

    plan = plan_split(TwoBranch(), 1, input_size=(3, 8, 8))
    assert "b_1" not in plan.candidates and "a_1" in plan.candidates


@pytest.mark.parametrize("name,blocks", [("resnet18", 8), ("resnet34", 16), ("resnet50", 16),
                                         ("resnet101", 33), ("resnet152", 50), ("wide_resnet50_2", 16),
                                         ("resnext50_32x4d", 16), ("vgg16_bn", None)])
def test_torchvision_models_have_block_cut_points(name, blocks):
    torchvision = pytest.importorskip("torchvision")
    model = torchvision.models.get_model(name, num_classes=10)
    plan = plan_split(model, 4)
    assert len(plan.pieces) == 4 and plan.source == "cost-balanced"
    if blocks is not None:  # the stem's ReLU and max-pool, and every residual block but the last
        assert len(plan.candidates) == 2 + blocks - 1
