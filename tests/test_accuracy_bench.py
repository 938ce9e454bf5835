"""bench.accuracy: the A/B harness runs the real training CLI per (variant, seed), resumes,
and writes the JSON summary and both plots."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from bench import accuracy as A
from bench.common import validate

pytestmark = pytest.mark.filterwarnings("ignore:.*differs from the official release")


def test_smoke_protocol_runs_summarises_and_plots(tiny_cifar, tmp_path):
    runs, out = tmp_path / "runs", tmp_path / "out"
    argv = ["--preset", "smoke", "--data-dir", tiny_cifar, "--runs", str(runs), "--out", str(out),
            "--jobs", "2", "--threads", "1"]
    payload = A.main(argv)
    p = A.PRESETS["smoke"]
    summary = {r["variant"]: r for r in payload["rows"]}  # one row per variant: its summary
    assert list(summary) == list(p.variants)
    for variant, s in summary.items():
        assert s["seeds_finished"] == p.seeds
        assert sorted(s["test_acc"]) == list(range(1, p.epochs + 1))
        for ep, a in s["test_acc"].items():  # mean and half-range recomputed from the seeds
            assert len(a["seeds"]) == len(p.seeds)
            assert a["mean"] == pytest.approx(sum(a["seeds"]) / len(a["seeds"]))
            assert a["spread"] == pytest.approx((max(a["seeds"]) - min(a["seeds"])) / 2)
        logs = payload["runs"][variant]
        first = [logs[str(seed)]["epochs"][0]["step_losses"] for seed in p.seeds]
        assert all(len(c) == 2 for c in first)  # 64 images / batch 32 = 2 steps
        assert s["first_epoch_last_module_loss"] == pytest.approx(sum(map(sum, first)) / 4)
    # each run went through the training CLI with the variant's options
    args = payload["runs"]["R1E ramp"]["1"]["args"]
    assert args["context"] == "R1E" and args["context_gate"] == "ramp" and args["seed"] == 1
    saved = json.loads((out / "accuracy_smoke.json").read_text())
    assert validate(saved, allow_legacy=False) == "current" and saved["benchmark"] == "accuracy"
    assert saved["settings"]["name"] == "smoke" and [r["variant"] for r in saved["rows"]] == list(p.variants)
    assert (out / "accuracy_smoke.png").stat().st_size > 0
    assert (out / "accuracy_smoke_loss.png").stat().st_size > 0
    # finished runs are not trained again; --report-only reads them back
    again = A.main(argv + ["--report-only"])
    assert json.dumps(again["rows"], sort_keys=True) == json.dumps(payload["rows"], sort_keys=True)


def test_unknown_variant_is_refused(tiny_cifar, tmp_path):
    with pytest.raises(SystemExit, match="--variants"):
        A.main(["--preset", "smoke", "--data-dir", tiny_cifar, "--variants", "R9",
                "--runs", str(tmp_path), "--out", str(tmp_path)])


def test_table_says_how_many_seeds_a_cell_holds_when_a_run_is_still_going():
    """A running seed's early epochs enter the means: such a cell names its seed count."""
    def ep(n, acc):  # the fields of a log.json epoch record that summarize reads
        return {"epoch": n, "test_acc": acc, "step_losses": [2.0], "images_per_s": 1.0, "peak_mem_mib": 1.0}
    logs = {"R1E": {0: {"epochs": [ep(3, 20.0), ep(6, 40.0)], "final": {"final_test_acc": 40.0}},
                    1: {"epochs": [ep(3, 30.0)]}}}
    text = A.table(A.summarize(A.PRESETS["smoke"], logs))
    row = text.splitlines()[-1].split()
    assert row[:2] == ["R1E", "1"]  # one seed finished
    assert "25.00±5.00" in row and "(n=2)" in row  # epoch 3: both seeds, marked
    assert "40.00±0.00" in row and row.count("(n=2)") == 1  # epoch 6: the finished seed only


def test_run_table_has_one_row_per_started_run():
    def ep(n, acc, losses=(2.0,)):
        return {"epoch": n, "test_acc": acc, "step_losses": list(losses), "images_per_s": 1.0, "peak_mem_mib": 1.0}
    logs = {"R0": {0: {"epochs": [ep(1, None, (3.0, 5.0)), ep(3, 20.0), ep(6, 40.5)]},
                   1: {"epochs": [ep(3, 30.0)]}, 2: None}}
    lines = A.run_table(logs).splitlines()
    assert lines[0] == "| variant | seed | epoch 3 | epoch 6 | epoch-1 mean last-module loss |"
    assert lines[2] == "| R0 | 0 | 20.00 | **40.50** | 4.00 |"  # the last epoch in bold
    assert lines[3] == "| R0 | 1 | 30.00 | - | 2.00 |"  # not reached yet
    assert len(lines) == 4  # seed 2 has not started


def _processes_naming(text):
    """PIDs of live processes whose command line contains ``text`` (Linux /proc)."""
    pids = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/cmdline", "rb") as f:
                    if text.encode() in f.read():
                        pids.append(int(d))
            except OSError:
                pass
    return pids


@pytest.mark.skipif(not os.path.isdir("/proc"), reason="needs /proc")
def test_sigterm_stops_the_harness_and_checkpoints_its_runs(tiny_cifar, tmp_path):
    """``kill`` (SIGTERM) on the harness stops every running run at a step boundary, each with a
    checkpoint to resume from, and leaves no training process behind."""
    runs = tmp_path / "runs"
    cmd = [sys.executable, "-m", "bench.accuracy", "--preset", "smoke", "--data-dir", tiny_cifar,
           "--runs", str(runs), "--out", str(tmp_path / "out"), "--jobs", "2", "--threads", "1",
           "--epochs", "10000"]
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    harness = subprocess.Popen(cmd, cwd=root, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        logs = [runs / "R0_seed0" / "log.json", runs / "R1E_ramp_seed0" / "log.json"]
        deadline = time.time() + 240
        while not all(p.exists() for p in logs):  # both runs have finished an epoch
            assert harness.poll() is None, harness.communicate()
            assert time.time() < deadline, "runs did not start"
            time.sleep(0.5)
        harness.send_signal(signal.SIGTERM)
        out, err = harness.communicate(timeout=180)
    finally:  # on a failure, end the harness and any training process it left behind
        if harness.poll() is None:
            harness.kill()
            harness.wait()
        left = _processes_naming(str(runs))
        for pid in left:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:  # it ended on its own meanwhile
                pass
    assert left == []
    assert harness.returncode != 0 and "interrupted" in err
    for name in ("R0_seed0", "R1E_ramp_seed0"):
        assert (runs / name / "checkpoint.pt").exists()
        assert "checkpoint saved" in (runs / name / "train.out").read_text()


def test_cpu_k_reuses_the_cpu_presets_runs_and_refuses_a_different_protocol():
    from dataclasses import replace
    from bench.common import RESULTS
    p = A.PRESETS["cpu-k"]
    assert {p.k_of(v) for v in p.variants} == {1, 2, 4, 8, 16} and p.sweeps_k()
    reused = A.reused_logs(p, RESULTS)
    committed = json.loads((RESULTS / "accuracy_cpu.json").read_text())["runs"]
    for row, there in (("E2E", "E2E"), ("R0 K=16", "R0"), ("R1E K=16", "R1E mean-last")):
        assert [reused[row][s]["final"] for s in p.seeds] == [committed[there][str(s)]["final"] for s in p.seeds]
    # a row whose training arguments differ from the run it names is refused, naming them
    other = replace(p, variants={**p.variants, "R0 K=16": p.variants["R0 K=16"] + ["--lr", "0.2"]})
    with pytest.raises(ValueError, match=r"lr: 0\.2 here, 0\.1 there"):
        A.reused_logs(other, RESULTS)
    other = replace(p, variants={**p.variants, "R1E K=16": ["--K", "8"] + p.variants["R1E K=16"][2:]})
    with pytest.raises(ValueError, match="K: 8 here, 16 there"):
        A.reused_logs(other, RESULTS)


def test_plot_against_k_draws_each_method_over_k(tmp_path):
    def s(finals):
        return {"seeds_finished": [0, 1], "test_acc": {12: {"seeds": finals}}}
    p = A.PRESETS["cpu-k"]
    summary = {"E2E": s([68.0, 68.3]), "R0 K=2": s([60.0, 61.0]), "R0 K=16": s([55.0, 56.0]),
               "R1E K=2": s([63.0, 63.5])}
    path = A.plot_against_k(p, summary, tmp_path)
    assert path == tmp_path / "accuracy_cpu_k.png" and path.stat().st_size > 0
    # no method with two K values yet: nothing to draw
    assert A.plot_against_k(p, {"E2E": summary["E2E"], "R0 K=2": summary["R0 K=2"]}, tmp_path) is None
