"""The float64 parity harness (``bench.parity``).

Tests of the harness's own machinery need no reference code: the name map's report, the
BatchNorm randomisation that exposes a wrong mapping, the step comparison on a perturbed
parameter, and the parsing of the reference's ``command.sh``. The ``reference`` tests run
``bench.parity`` against the authors' code when ``CONTSUP_REFERENCE_DIR`` names a folder
holding the checkouts (``scripts/fetch-references.sh``); without it they are skipped.
"""
import copy
import os
from pathlib import Path

import pytest
import torch
from torch import nn

from bench.parity.core import (TOLERANCE, compare_records, copy_by_map, labels_with_positives, randomize_bn,
                               record_ours_step, rel_err, verdict)


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                         nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)).double()


def _identity_map(m):
    return {n: n for n in m.state_dict()}


def test_rel_err():
    a = torch.tensor([1.0, 2.0], dtype=torch.float64)
    assert rel_err(a, a) == 0.0
    assert rel_err(a + 1e-3, a) == pytest.approx(1e-3 / 2.001)
    assert rel_err(a, torch.zeros(3, dtype=torch.float64)) == float("inf")
    assert rel_err(torch.tensor([float("nan")]), torch.tensor([0.0])) == float("inf")
    # a value that is zero in exact arithmetic compares against the category floor
    assert rel_err(torch.tensor([1e-17]), torch.tensor([-1e-17]), floor=1e-6) < TOLERANCE


def test_map_reports_missing_unfilled_and_misshaped():
    ref, ours = _net(), _net()
    ours[3] = nn.Conv2d(4, 5, 3, padding=1).double()  # a different shape
    nmap = _identity_map(ref)
    del nmap["0.bias"]                          # a reference tensor with no counterpart
    nmap["1.weight"] = "no.such.tensor"         # a target we do not have
    rep = copy_by_map(ref, ours, nmap)
    assert rep.ref_unmapped == ["0.bias"]
    assert rep.ref_missing_target == [("1.weight", "no.such.tensor")]
    assert ("3.weight", "3.weight", (4, 4, 3, 3), (5, 4, 3, 3)) in rep.shape_mismatch
    assert {"0.bias", "1.weight", "3.weight", "3.bias"} <= set(rep.ours_unfilled)
    assert not rep.ok
    assert verdict({"x": {"rel": 0.0}}, rep) == "DIFFER"
    good = copy_by_map(ref, _net(), _identity_map(ref))
    assert good.ok and not good.ours_unfilled and verdict({"x": {"rel": 0.0}}, good) == "MATCH"


def _outputs_after_copy(nmap, randomise):
    ref, ours = _net(), _net()
    with torch.no_grad():  # different convolution weights on our side before the copy
        for p in ours.parameters():
            p.add_(1.0)
    if randomise:
        randomize_bn(ref, torch.Generator().manual_seed(3))
    assert copy_by_map(ref, ours, nmap).ok
    x = torch.randn(4, 3, 6, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    ref.train(), ours.train()
    train = rel_err(ours(x), ref(x))
    ref.eval(), ours.eval()
    return train, rel_err(ours(x), ref(x))


def test_bn_randomisation_exposes_swapped_batchnorms():
    nmap = _identity_map(_net())
    assert _outputs_after_copy(nmap, randomise=True) == (0.0, 0.0)
    swapped = dict(nmap)
    for key in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked"):
        swapped[f"1.{key}"], swapped[f"4.{key}"] = f"4.{key}", f"1.{key}"
    # freshly built BatchNorms (weight 1, bias 0, mean 0, var 1) hide the swap entirely ...
    assert _outputs_after_copy(swapped, randomise=False) == (0.0, 0.0)
    # ... randomised ones expose it, in training and in eval mode
    train, evaluation = _outputs_after_copy(swapped, randomise=True)
    assert train > 1e-3 and evaluation > 1e-3


def _tiny_local():
    from contsup_fast import LocalSequential
    from contsup_fast.models.cifar_resnet import CifarResNet
    torch.manual_seed(0)
    return LocalSequential(CifarResNet(8).double(), K=3, context="R1E", backend="torch", context_mean=None,
                           feature_dim=16, input_size=(3, 8, 8)).double()


def _step_record(local, x, y):
    local.train()
    local.zero_grad(set_to_none=True)
    rec = record_ours_step(local, x, y)
    rec["grads"] = {n: p.grad.clone() for n, p in local.named_parameters() if p.grad is not None}
    rec["running_stats"] = {n: b.clone() for n, b in local.named_buffers()}
    return rec


@pytest.mark.parametrize("perturb", [None, "local_modules.2.body.layer2.0.bn1.weight",
                                     "local_modules.2.context.image.conv1.weight"])
def test_step_comparison_catches_a_perturbed_parameter(perturb):
    ref = _tiny_local()
    ours = _tiny_local()
    randomize_bn(ref, torch.Generator().manual_seed(2))
    assert copy_by_map(ref, ours, _identity_map(ref)).ok
    if perturb is not None:
        with torch.no_grad():
            p = dict(ours.named_parameters())[perturb]
            # not a pure rescaling, which a following training-mode BatchNorm would cancel
            noise = torch.randn(p.shape, dtype=p.dtype, generator=torch.Generator().manual_seed(4))
            p.add_(1e-4 * p.abs().max() * noise)
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(6, 3, 8, 8, dtype=torch.float64, generator=gen)
    y = labels_with_positives(6, 10, gen)
    cmp = compare_records(_step_record(ours, x, y), _step_record(ref, x, y))
    assert set(cmp) == {"losses", "inputs", "outputs", "logits", "grads", "running_stats"}
    if perturb is None:
        assert verdict(cmp) == "MATCH" and all(c["rel"] == 0.0 for c in cmp.values())
    else:
        assert verdict(cmp) == "DIFFER"
        assert cmp["grads"]["rel"] > 1e-8 and cmp["losses"]["rel"] > TOLERANCE


def test_compare_flags_a_missing_tensor():
    t = torch.ones(2, dtype=torch.float64)
    cmp = compare_records({"grads": {"a": t}}, {"grads": {"a": t, "b": t}})
    assert cmp["grads"]["missing"] == ["b"] and cmp["grads"]["rel"] == float("inf")


def test_labels_have_positives():
    y = labels_with_positives(9, 10, torch.Generator().manual_seed(0))
    counts = torch.bincount(y)
    assert y.shape == (9,) and counts[counts > 0].min() >= 2


def test_command_sh_parsing(tmp_path):
    from bench.parity.contsup import command_configs
    (tmp_path / "command.sh").write_text(
        "# comment python train.py --layers 56\n"
        "CUDA_VISIBLE_DEVICES=0 python train.py --dataset cifar10 --model resnet --layers 32 --local_module_num 4"
        "  --local_loss_mode contrast --context_mode R1E --h_reconstruct True\n"
        "CUDA_VISIBLE_DEVICES=0 python train.py --dataset svhn --model resnet --layers 110 --local_module_num 3"
        " --local_loss_mode cross_entropy --balanced_memory True  --context_mode E\n"
        "CUDA_VISIBLE_DEVICES=0 python train.py --dataset cifar10 --model resnet --layers 32 --local_module_num 4"
        "  --local_loss_mode contrast --context_mode R1E --h_reconstruct True\n")
    cfgs = command_configs(str(tmp_path))
    assert len(cfgs) == 2
    a, b = cfgs
    assert (a.model, a.K, a.context, a.loss, a.h_reconstruct, a.balanced) == ("resnet32", 4, "R1E", "contrast", True, False)
    assert (b.model, b.K, b.context, b.dataset, b.balanced, b.h_reconstruct) == ("resnet110", 3, "E", "svhn", True, False)


_REF = os.environ.get("CONTSUP_REFERENCE_DIR")


@pytest.mark.reference
@pytest.mark.slow
@pytest.mark.skipif(not (_REF and (Path(_REF) / "ContSup" / "command.sh").is_file()),
                    reason="CONTSUP_REFERENCE_DIR does not hold a ContSup checkout (scripts/fetch-references.sh)")
def test_contsup_reference_parity_quick(tmp_path):
    from bench.parity.__main__ import main
    threads = torch.get_num_threads()
    try:  # main() sets one torch thread for the process
        rows = main(["--ref-dir", _REF, "--quick", "--backends", "torch", "--out", str(tmp_path),
                     "--name", "parity_test"])
    finally:
        torch.set_num_threads(threads)
    assert rows and (tmp_path / "parity_test.json").is_file()
    bad = {r["config"]: (r["verdict"], r.get("error"), r.get("max_rel")) for r in rows if r["verdict"] != "MATCH"}
    assert not bad, f"configurations that differ from the reference: {bad}"


def test_summary_lists_every_row_that_differs():
    from bench.parity.summary import summarise
    ok = {"reference": "ContSup", "model": "resnet32", "backend": "torch", "config": "a", "verdict": "MATCH",
          "grads_rel": 1e-15, "comparison": {"grads": {"rel": 1e-15, "worst": "w"}}}
    bad = dict(ok, config="b", verdict="DIFFER", grads_rel=0.5, comparison={"grads": {"rel": 0.5, "worst": "x.bias"}})
    err = {"reference": "ContSup", "model": "resnet32", "backend": "native", "config": "c", "verdict": "ERROR",
           "error": "RuntimeError: boom"}
    text = summarise({"rows": [ok, bad, err]})
    assert "| ContSup | resnet32 | torch | 1/2 |" in text and "| ContSup | resnet32 | native | 0/1 |" in text
    assert "| b | torch | DIFFER | grads | 5.0e-01 | x.bias |" in text and "boom" in text


# ------------------------------------------------------------------ presets made faithful (issue 20)

def test_presets_per_dataset_follow_the_reference_tables():
    """ContSup's networks_dev/configs.py: STL-10 has its own memory-balanced ResNet-110 splits
    and STL-10 / SVHN their own equal-layer reconstruction weights; CIFAR-10's elsewhere."""
    from contsup_fast.presets import preset_cuts, reconstruction_weights
    assert preset_cuts("resnet110", 3, True, "stl10") == [(1, 8), (2, 1)]
    assert preset_cuts("resnet110", 3, True, "cifar10") == [(1, 9), (2, 2)]
    assert preset_cuts("resnet110", 3, True, "svhn") == [(1, 9), (2, 2)]      # no SVHN table: CIFAR-10's
    assert preset_cuts("resnet110", 4, False, "stl10") == [(1, 11), (2, 7), (3, 3)]
    assert reconstruction_weights("resnet110", 4, False, "stl10") == (20.0, 0.2, 5.0, 2.0)
    assert reconstruction_weights("resnet110", 16, False, "svhn") == (5.0, 0.2, 0.5, 1.0)
    assert reconstruction_weights("resnet110", 4, False, "cifar10") == (1.0, 0.0, 0.0, 1.0)
    assert reconstruction_weights("resnet32", 4, False, "stl10") == (6.0, 0.0, 1.0, 2.0)  # no table: CIFAR-10's
    # memory-balanced weights exist for CIFAR-10 only; ResNet-110 K=4 is ContSup's (5, 0, 0, 0.1)
    assert reconstruction_weights("resnet110", 4, True, "cifar10") == (5.0, 0.0, 0.0, 0.1)


def test_local_sequential_preset_dataset_selects_the_tables():
    from contsup_fast import LocalSequential
    from contsup_fast.models import resnet110
    local = LocalSequential(resnet110(), K=3, context="R0", split="balanced", preset_dataset="stl10",
                            input_size=(3, 96, 96), reconstruct=True)
    assert local.cut_points == ["layer1_8", "layer2_1"]
    assert local.split_source == "paper memory-balanced preset (stl10)"
    with pytest.raises(ValueError, match="preset_dataset"):
        LocalSequential(resnet110(), K=3, preset_dataset="cifar100")


def test_auglocal_default_split_is_the_reference_prefix():
    """AugLocal's train.py: net_config[:local_module_num - 1], the stem then every block; the
    old default (cost-balanced) cut the last module at layer3.1 for 13 modules."""
    from contsup_fast import LocalSequential
    from contsup_fast.models import resnet32
    from contsup_fast.presets import auglocal_cuts
    finest = [(0, 0)] + [(s, b) for s in (1, 2, 3) for b in range(5)]
    for K in (2, 11, 13, 15):
        assert auglocal_cuts("resnet32", K) == finest[:K - 1]
    assert auglocal_cuts("resnet32", 17) is None and auglocal_cuts("vgg11", 4) is None
    assert auglocal_cuts("resnet110", 55) == [(0, 0)] + [(s, b) for s in (1, 2, 3) for b in range(18)][:53]
    local = LocalSequential(resnet32(), K=13, context="R0", aux="auglocal", aux_depth=3)
    assert local.split_source == "AugLocal preset" and local.cut_points[-1] == "layer3_0"
    cost = LocalSequential(resnet32(), K=13, context="R0", aux="auglocal", aux_depth=3, split="cost")
    assert cost.split_source == "cost-balanced"


def test_infopro_row_notes_name_the_deliberate_weights():
    from bench.parity.infopro import InfoProConfig, row_notes
    same = InfoProConfig("resnet32", 4, "R0", "contrast", True, False, weights=(6.0, 0.0, 1.0, 2.0))
    assert row_notes(same) == {"weights": "preset"}
    other = InfoProConfig("resnet110", 4, "R0", "contrast", True, True, weights=(5.0, 0.0, 5.0, 0.1))
    notes = row_notes(other)
    assert notes["weights"] == "explicit" and "(5.0, 0.0, 0.0, 0.1)" in notes["deliberate"]


# ------------------------------------------------------------------ GN-DGL harness (no reference needed)

def test_gndgl_commands_parsing(tmp_path):
    from bench.parity.gndgl import command_configs
    d = tmp_path / "Multilayer_GN_DGL"
    d.mkdir()
    common = ("--droprate 0.0 --cos_lr --local_loss_mode cross_entropy --aux_net_widen 1 --aux_net_feature_dim 128 "
              "--aux_net_config 1c2f --detach --detach-ratio 1.0 --div-reg --div-temp 3.0 --div-weight 0.5 "
              "--eval-ensemble --ensemble-type layerwise")
    (d / "commands.sh").write_text(
        f"python train.py --dataset cifar10 --model resnet --layers 32 --local_module_num 4 --groups 1 "
        f"--wide-list 16,16,32,64 {common}\n"
        f"python train.py --dataset cifar10 --model resnet --layers 32 --local_module_num 4 --groups 2 "
        f"--wide-list 32,32,64,128 {common}\n")
    (cfg,) = command_configs(str(tmp_path))            # the --groups 1 baseline is not GN-DGL
    assert (cfg.K, cfg.G, cfg.widths, cfg.head_width) == (4, 2, (32, 32, 64, 128), 256)
    assert cfg.name == "GN-DGL resnet32x2 K=4 G=2"
    (d / "commands.sh").write_text(
        "python train.py --dataset cifar10 --model resnet --layers 32 --local_module_num 4 --groups 2 "
        "--wide-list 16,16,32,64 --aux_net_config 1c2f\n")
    with pytest.raises(ValueError, match="does not build"):
        command_configs(str(tmp_path))


class _FakeGN(nn.Module):
    """The state names of GN-DGL's InfoProResNet (K=2, G=2) on a tiny body."""

    def __init__(self):
        super().__init__()
        self.infopro_config = [[2, 1], [3, 1]]
        self.layer3 = nn.Sequential(nn.Identity(), nn.Identity())
        self.conv1 = nn.Conv2d(3, 4, 3)
        for g in range(2):
            setattr(self, f"aux_classifier_2_1_{g}", nn.Module())
            getattr(self, f"aux_classifier_2_1_{g}").head = nn.Sequential(
                nn.Conv2d(4, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Identity(), nn.Identity(), nn.Linear(8, 3))
            setattr(self, f"aux_classifier_3_1_{g}", nn.Module())
            getattr(self, f"aux_classifier_3_1_{g}").head = nn.Sequential(nn.Conv2d(4, 8, 3))
        self.head = nn.Sequential(nn.Conv2d(4, 8, 3))


def test_gndgl_name_map_targets():
    from bench.parity.gndgl import cut_names, name_map
    ref = _FakeGN()
    ours_state = {"local_modules.0.body.conv1.weight": None, "local_modules.0.body.conv1.bias": None}

    class Ours:
        def state_dict(self):
            return ours_state

    nmap = name_map(ref, Ours())
    assert nmap["conv1.weight"] == "local_modules.0.body.conv1.weight"
    assert nmap["aux_classifier_2_1_1.head.0.weight"] == "local_modules.0.head.heads.1.convs.0.weight"
    assert nmap["aux_classifier_2_1_0.head.1.running_var"] == "local_modules.0.head.heads.0.norm.running_var"
    assert nmap["aux_classifier_2_1_0.head.5.bias"] == "local_modules.0.head.heads.0.mlp.0.bias"
    # the group heads at the network's end and the final classifier head have no counterpart
    assert nmap["aux_classifier_3_1_0.head.0.weight"] is None and nmap["head.0.weight"] is None
    assert cut_names([(0, 0), (2, 1)]) == ["relu", "layer2.1"]


def test_parity_json_is_in_the_results_schema(tmp_path):
    """bench.parity writes with bench.common.write_results; the committed file validates."""
    from bench.common import SCHEMA, RESULTS, validate
    import json
    committed = RESULTS / "parity_cpu.json"
    obj = json.loads(committed.read_text())
    assert obj["schema"] == SCHEMA and obj["benchmark"] == "parity"
    assert validate(obj, allow_legacy=False) == "current"
