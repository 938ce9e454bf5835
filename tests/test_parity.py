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
