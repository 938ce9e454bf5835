"""The benchmarks' CPU-sized modes run in CI: tables print, JSON and the plot are written."""
import json

import pytest

from bench.common import validate


def test_kernel_microbenchmark_quick(tmp_path, capsys):
    from bench import kernels
    if not _native():
        pytest.skip("the native extension is not built")
    rows = kernels.main(["--quick", "--backends", "native", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert "device-to-device copy" in out and "fwd_bwd_speedup_vs_eager" in out
    data = json.loads((tmp_path / "kernels_cpu_quick.json").read_text())
    assert data["environment"]["torch"] and len(data["rows"]) == len(rows) > 0
    assert validate(data, allow_legacy=False) == "current" and data["benchmark"] == "kernels"
    assert all(r["fwd_us"] > 0 and r["fwd_bwd_us"] > 0 for r in rows)


@pytest.mark.slow
def test_train_step_benchmark_quick(tmp_path, capsys):
    from bench import train_step
    rows = train_step.main(["--quick", "--K", "4", "--contexts", "R0", "R1E", "--backends", "torch",
                            "--steps", "1", "--warmup", "0", "--batch", "8", "--out", str(tmp_path)])
    text = capsys.readouterr().out
    assert "E2E eager" in text and "E2E checkpoint" in text and "LocalSequential" in text
    assert (tmp_path / "train_step_cpu_quick.json").exists() and (tmp_path / "train_step_cpu_quick.png").exists()
    e2e = rows[0]
    assert e2e["method"] == "E2E eager" and e2e["speed_vs_e2e"] == 1.0
    local = [r for r in rows if r["method"] == "LocalSequential"]
    assert len(local) == 2 and all(r["mem_vs_e2e"] < 1.0 for r in local)


def _native():
    from contsup_fast.fused import available_backends
    return "native" in available_backends("cpu")


@pytest.mark.filterwarnings("ignore:.*differs from the official release")
def test_spike_screen_matches_a_plain_forward(tiny_cifar, tmp_path, capsys):
    """bench.spike: R0's step-0 loss and classifier-input RMS equal a plain training-mode forward
    of the same model on the same first batch; the mean-last variant reads a smaller scale than
    the paper's R1E; the JSON holds every variant."""
    import numpy as np
    import torch
    import torch.nn.functional as F
    from bench import spike
    from contsup_fast import data as D
    from contsup_fast.models import build_model
    rows = spike.main(["--data-dir", tiny_cifar, "--model", "resnet20", "--K", "4", "--steps", "4",
                       "--chunk", "2", "--batch-size", "16", "--subset", "200", "--threads", "1",
                       "--variants", "R0", "R1E", "R1E mean-last", "--json", "--out", str(tmp_path)])
    assert "classifier_input_rms" in capsys.readouterr().out
    by = {r["variant"]: r for r in rows}
    assert set(by) == {"R0", "R1E", "R1E mean-last"} and all(len(r["loss_per_2"]) == 2 for r in rows)
    # independent: the plain model, same seed and first batch, BN in training mode
    images, labels = D.load_dataset(tiny_cifar, "cifar10")
    idx = D.subset_indices(labels, 200, seed=0)
    images, labels = images[idx], np.asarray(labels)[idx]
    b = torch.randint(len(labels), (16,), generator=torch.Generator().manual_seed(0)).numpy()
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in D.dataset_stats("cifar10"))
    x = (torch.from_numpy(np.ascontiguousarray(images[b])).permute(0, 3, 1, 2).float() / 255 - mean) / std
    torch.manual_seed(0)
    model = build_model("resnet20", 10).train()
    feats = []
    model.fc.register_forward_pre_hook(lambda m, a: feats.append(a[0]))
    with torch.no_grad():
        loss = F.cross_entropy(model(x), torch.from_numpy(labels[b]).long())
    assert by["R0"]["losses"][0] == pytest.approx(float(loss), rel=1e-4)
    assert by["R0"]["classifier_input_rms"] == pytest.approx(float(feats[0].pow(2).mean().sqrt()), rel=1e-4)
    assert by["R1E mean-last"]["classifier_input_rms"] < by["R1E"]["classifier_input_rms"]
    saved = json.loads((tmp_path / "spike_resnet20_K4.json").read_text())
    assert [r["variant"] for r in saved["rows"]] == ["R0", "R1E", "R1E mean-last"] and saved["environment"]
