"""scripts/gpu-validate.sh --dry-run (the GPU validation's plumbing on CPU), its helpers, and the
reference-ContSup adapter's CPU path."""
import importlib.util
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "gpu-validate.sh"


def _tools():
    spec = importlib.util.spec_from_file_location("gpuval_tools", ROOT / "scripts" / "gpuval_tools.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _env(tmp_path, **extra):
    env = dict(os.environ, PYTHON=sys.executable, GPUVAL_CARRY=str(tmp_path / "no-carry"), **extra)
    env.pop("OUT", None)
    return env


@pytest.mark.slow
def test_dry_run_runs_every_phase_and_packs_results(tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run(["bash", str(SCRIPT), "--dry-run", "--out", str(out), "--epochs", "1"],
                          cwd=ROOT, env=_env(tmp_path), capture_output=True, text=True, timeout=600)
    text = proc.stdout + proc.stderr
    assert proc.returncode == 0, text[-4000:]
    assert text.rstrip().endswith("gpu-validate: all phases ok or skipped")
    # what comes back from $OUT: the tarball and the summary, nothing deeper
    assert sorted(p.name for p in out.iterdir()) == ["gpuval-results.tar.gz", "summary.txt"]
    with tarfile.open(out / "gpuval-results.tar.gz") as tar:
        names = set(tar.getnames())
        phases = tar.extractfile("gpuval/phases.tsv").read().decode()
    for f in ["gpuval/summary.txt", "gpuval/summary.json", "gpuval/logs/env.log", "gpuval/logs/check.log",
              "gpuval/accuracy/e2e_K1/log.json", "gpuval/accuracy/R1E_supcon_K16/log.json",
              "gpuval/bench/train_step-resnet32/train_step_cpu_quick.json", "gpuval/bench/kernels-residual/kernels_cpu_quick.json",
              "gpuval/bench/kernels-image_tail/kernels_cpu_quick.json",
              "gpuval/bench/compile_report/compile_report.json", "gpuval/bench/parity_backends_cpu.json",
              "gpuval/bench/train_step-swin_t/train_step_cpu.json"]:
        assert f in names, f
    assert not any(n.endswith(".pt") for n in names)
    status = {line.split("\t")[0]: line.split("\t")[1] for line in phases.splitlines()}
    assert status["build"] == status["memcheck"] == status["racecheck"] == "skipped"
    assert status["reference"] == "skipped"
    for name in ("compile-report", "data", "check", "parity", "accuracy", "gpu-tests", "sanitize-step-cpu", "train-step",
                 "transformers", "kernels"):
        assert status[name] == "ok", (name, status)
    summary = (out / "summary.txt").read_text()
    assert "skipped: no GPU" in summary and "== accuracy" in summary and "== train step" in summary
    assert "== fused ops" in summary and "image_context" in summary and "gap" in summary
    assert "swin_t" in summary and "MATCH" in summary
    assert summary.strip().splitlines()[-1] in text  # the summary is the end of the output


@pytest.mark.parametrize("args,message", [(["--epochs", "0"], "--epochs must be a positive integer"),
                                          (["--bogus"], "unknown argument '--bogus'")])
def test_bad_arguments_are_one_line_errors(tmp_path, args, message):
    proc = subprocess.run(["bash", str(SCRIPT), *args], cwd=ROOT, env=_env(tmp_path), capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 2 and message in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


def test_summary_reads_phases_accuracy_and_bench_json(tmp_path):
    tools = _tools()
    res = tmp_path / "gpuval"
    (res / "logs").mkdir(parents=True)
    (res / "bench").mkdir()
    (res / "accuracy" / "R0_K16").mkdir(parents=True)
    (res / "phases.tsv").write_text("build\tskipped\t0\t0\tlogs/build.log\n"
                                    "gpu-tests\tfailed(rc=1)\t12\t90\tlogs/gpu-tests.log\n")
    (res / "logs" / "build.log").write_text("skipped: no GPU (dry run)\n")
    (res / "logs" / "gpu-tests.log").write_text("...\n2 failed, 40 passed in 11.2s\n")
    (res / "accuracy" / "R0_K16" / "log.json").write_text(json.dumps({"args": {"epochs": 3}, "epochs": [
        {"epoch": 1, "test_acc": 40.0, "peak_mem_mib": 900.0, "train_time_s": 30.0, "images_per_s": 1600.0},
        {"epoch": 2, "test_acc": 55.5, "peak_mem_mib": 910.0, "train_time_s": 32.0, "images_per_s": 1550.0}]}))
    (res / "bench" / "train_step_cuda.json").write_text(json.dumps({"rows": [
        {"model": "resnet32", "method": "E2E eager", "K": 1, "img_s": 1000.0, "speed_vs_e2e": 1.0, "extra": 1}]}))
    text = tools.summary(res)
    assert "skipped: no GPU (dry run)" in text and "2 failed, 40 passed" in text
    row = [line for line in text.splitlines() if line.startswith("R0_K16")][0].split()
    assert row[1:6] == ["2", "3", "55.5", "2", "55.5"] and row[7] == "31"
    assert "E2E eager" in text
    assert (res / "summary.txt").read_text().strip() == text.strip()
    assert json.loads((res / "summary.json").read_text())["phases"][1]["status"] == "failed(rc=1)"


def test_travel_size_counts_tree_and_carry_and_refuses_over_the_limit(tmp_path, capsys):
    tools = _tools()
    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    (tmp_path / ".gitignore").write_text("/carry/\n")
    (tmp_path / "a.txt").write_bytes(b"x" * 1000)
    (tmp_path / "carry").mkdir()
    (tmp_path / "carry" / "big.bin").write_bytes(b"y" * 300_000)
    parts = tools.travel_bytes(tmp_path, ["carry"])
    assert parts["tree"] == 1000 + len("/carry/\n") and parts["carry"] == 300_000
    assert tools.main(["travel-size", "--root", str(tmp_path), "--carry", "carry", "--limit-mib", "0.1"]) == 1
    assert "TOO LARGE" in capsys.readouterr().out


def test_toy_data_is_read_by_the_cifar_reader(tmp_path):
    from contsup_fast.data import load_cifar
    _tools().toy_data(tmp_path, per_batch=12)
    images, labels = load_cifar(tmp_path, train=True, verify=False)
    assert images.shape[0] == 60 and labels.shape == (60,) and set(labels.tolist()) == set(range(10))


def test_reference_adapter_explains_a_missing_checkout(tmp_path):
    from bench import reference_contsup
    with pytest.raises(FileNotFoundError, match="holds no networks_dev/resnet.py"):
        reference_contsup.load_reference(str(tmp_path))
    with pytest.raises(SystemExit, match="reference_contsup: --ref-dir"):
        reference_contsup.main(["--ref-dir", str(tmp_path), "--device", "cpu"])


REF = ROOT / ".gpuval" / "ContSup"


@pytest.mark.slow
@pytest.mark.skipif(not (REF / "networks_dev" / "resnet.py").exists(),
                    reason="reference ContSup not fetched (scripts/gpuval-prepare.sh)")
def test_reference_adapter_runs_on_cpu_and_compares(tmp_path):
    import torch

    from bench import reference_contsup
    ours = tmp_path / "train_step_cpu.json"
    ours.write_text(json.dumps({"rows": [{"method": "LocalSequential", "model": "resnet32", "K": 16, "context": "R0",
                                          "backend": "torch", "img_s": 10.0, "mem_MiB": None}]}))
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny batch: one thread beats two contending ones
    try:
        rows = reference_contsup.main(["--ref-dir", str(REF), "--models", "resnet32", "--contexts", "R0", "--batch",
                                       "2", "--steps", "1", "--warmup", "0", "--device", "cpu", "--compare", str(ours),
                                       "--out", str(tmp_path)])
    finally:
        torch.set_num_threads(before)
    assert len(rows) == 1 and rows[0]["img_s"] > 0
    data = json.loads((tmp_path / "reference_contsup_cpu.json").read_text())
    assert data["vs_ours"][0]["speed_vs_ref"] == pytest.approx(10.0 / rows[0]["img_s"])
