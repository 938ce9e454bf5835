"""Saved-activation accounting and the memory claims of greedy local learning."""
import pytest
import torch

from contsup_fast import LocalSequential
from contsup_fast.memory import SavedTensorMeter, main, measure_step
from contsup_fast.models import resnet32, resnet110


def test_meter_counts_unique_storages_and_releases_them():
    w = torch.randn(64, 64, requires_grad=True)
    x = torch.randn(32, 64)
    with SavedTensorMeter(ignore=[w]) as meter:
        y = (x @ w).relu()           # mm saves x (w ignored); relu saves its output
        z = y * y                    # saves y twice: one storage
        assert meter.current == x.numel() * 4 + y.numel() * 4
        z.sum().backward()
    del y, z
    assert meter.current == 0
    assert meter.peak == (32 * 64 + 32 * 64) * 4


def _step_peak(make, K, context, batch=8, backend="torch"):
    torch.manual_seed(0)
    local = LocalSequential(make(), K=K, context=context, backend=backend)
    x, y = torch.randn(batch, 3, 32, 32), torch.randint(0, 10, (batch,))
    return measure_step(local, x, y).saved_peak


@pytest.mark.slow
def test_resnet110_k16_r0_is_under_12_percent_of_e2e():
    e2e = _step_peak(resnet110, 1, "R0")
    local = _step_peak(resnet110, 16, "R0")
    assert local / e2e <= 0.12, local / e2e


def test_local_modules_free_their_activations():
    e2e = _step_peak(resnet32, 1, "R0")
    k16 = _step_peak(resnet32, 16, "R0")
    k4 = _step_peak(resnet32, 4, "R0")
    assert k16 < k4 < e2e
    assert k16 / e2e < 0.2


def test_memory_command_prints_the_table(capsys, tmp_path):
    rows = main(["--models", "resnet32", "--K", "2", "--contexts", "R0", "R1E", "--batch", "2",
                 "--json", str(tmp_path / "m.json")])
    text = capsys.readouterr().out
    assert "E2E" in text and "R1E" in text and (tmp_path / "m.json").exists()
    assert rows[0]["saved_ratio"] == 1.0 and len(rows) == 3
