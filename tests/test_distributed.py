"""Multi-process training (contsup_fast.distributed): LocalDDP, LocalPipeline, failures.

Every multi-process test starts N ranks of tests/_dist_worker.py (gloo on 127.0.0.1, a free
port, 1 thread each) with a bounded timeout; all of them are ended before the test returns.
"""
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from contsup_fast import LocalSequential
from contsup_fast import distributed as D
from conftest import write_tiny_cifar
from contsup_fast.models import build_model

ROOT = Path(__file__).resolve().parent.parent
WORKER = Path(__file__).resolve().parent / "_dist_worker.py"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(argv, nprocs, timeout=120.0, env_extra=None):
    """Start ``nprocs`` ranks of ``python argv...`` with the torchrun environment; wait at most
    ``timeout`` s. Returns [(returncode, stdout, stderr)] by rank; every process is ended."""
    port = free_port()
    procs = []
    for rank in range(nprocs):
        env = dict(os.environ, RANK=str(rank), WORLD_SIZE=str(nprocs), LOCAL_RANK=str(rank),
                   LOCAL_WORLD_SIZE=str(nprocs), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                   OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), **(env_extra or {}))
        env.pop("TORCHELASTIC_USE_AGENT_STORE", None)
        procs.append(subprocess.Popen([sys.executable, *argv], cwd=ROOT, env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    deadline = time.monotonic() + timeout
    results = []
    try:
        for p in procs:
            out, err = p.communicate(timeout=max(1.0, deadline - time.monotonic()))
            results.append((p.returncode, out, err))
    except subprocess.TimeoutExpired:
        for p in procs:
            if p.poll() is None:
                p.kill()
        for p in procs:
            p.communicate()
        pytest.fail(f"{argv} with {nprocs} ranks did not finish within {timeout} s")
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    return results


def run_case(case, nprocs, timeout=120.0, **env):
    results = launch([str(WORKER), case], nprocs, timeout, env)
    for rank, (rc, out, err) in enumerate(results):
        assert rc == 0, f"rank {rank} of case {case} failed ({rc}):\n{out}\n{err[-3000:]}"
        assert f"ok {case} rank {rank}" in out
    return results


def test_ddp_gradients_equal_manual_mean_every_step_no_sync_sync_bn_and_refusal():
    """R0, R1E, R2 and bf16 autocast: LocalDDP gradients == manually all-reduced mean at
    steps 1 and 2; broadcast at wrap; eval without collectives; no_sync; plain DDP refused;
    sync_bn (native and torch backends): running statistics and gradients of two processes
    with half a batch each == one process on the concatenated batch."""
    run_case("ddp", 2)


def test_pipeline_equals_single_process_bit_for_bit():
    """3 stages, R2E with a_1 crossing two stage boundaries, and R1 channels_last: parameters
    after 3 steps, per-module losses and eval logits equal one process exactly."""
    run_case("pipeline", 3)


def test_killed_rank_fails_the_others_within_the_timeout_naming_it():
    t0 = time.monotonic()
    results = launch([str(WORKER), "kill"], 2, timeout=60.0, env_extra={"CONTSUP_TEST_TIMEOUT": "8"})
    elapsed = time.monotonic() - t0
    rc0, out0, err0 = results[0]
    assert results[1][0] == 3
    assert rc0 != 0, out0
    assert "rank 1" in err0, err0[-2000:]
    assert elapsed < 45, elapsed


def test_bad_arguments_name_the_argument():
    torch.manual_seed(0)
    local = LocalSequential(build_model("resnet20", 10), K=2, context="R0", input_size=(3, 16, 16))
    with pytest.raises(ValueError, match="process_group"):
        D.LocalDDP(local)
    with pytest.raises(ValueError, match="process_group"):
        D.LocalPipeline(local)
    with pytest.raises(ValueError, match="local must be a LocalSequential"):
        D.LocalDDP(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="stages"):
        D.balance_stages([1.0, 2.0], 3)


def test_balance_stages_minimises_the_largest_stage():
    assert D.balance_stages([1, 1, 1, 1], 2) == [2, 2]
    assert D.balance_stages([4, 1, 1, 1, 1], 2) == [1, 4]
    assert D.balance_stages([1, 2, 3], 3) == [1, 1, 1]
    assert sum(D.balance_stages([3, 1, 4, 1, 5, 9, 2, 6], 3)) == 8


# ------------------------------------------------------------------------------ training CLI
@pytest.mark.filterwarnings("ignore:.*differs from the official release")
def test_cli_resume_is_exact_in_data_and_pipeline_mode(tmp_path):
    """Under the torchrun environment: a SIGTERM on one rank mid-epoch stops both ranks at the
    same step after saving. Data parallel resumed equals an uninterrupted run; pipeline resumed
    equals a single-process run, bit for bit."""
    from contsup_fast import train as T
    from contsup_fast.checkpoint import load_checkpoint
    data = write_tiny_cifar(tmp_path / "cifar", per_batch=16, n_test=40)
    ports = ",".join(str(free_port()) for _ in range(6))
    run_case("cli", 2, timeout=300, CONTSUP_TEST_PORTS=ports, CONTSUP_TEST_OUT=str(tmp_path),
             CONTSUP_TEST_DATA=data)
    threads = torch.get_num_threads()
    try:  # the ranks run 1 thread each; the same thread count gives the same reduction order
        T.run(["--model", "resnet20", "--K", "4", "--context", "R2E", "--data-dir", data,
               "--batch-size", "16", "--epochs", "2", "--device", "cpu", "--lr", "0.05",
               "--warmup-epochs", "1", "--no-progress", "--threads", "1",
               "--out", str(tmp_path / "single")])
    finally:
        torch.set_num_threads(threads)
    ref = load_checkpoint(tmp_path / "single")["model"]
    ck = load_checkpoint(tmp_path / "pipe")
    assert (ck["epoch"], ck["world_size"], ck["stages"]) == (2, 2, [2, 2])
    seen = 0
    for s in range(2):
        stage = load_checkpoint(str(tmp_path / "pipe" / f"stage{s}of2.pt"))
        assert stage["save_id"] == ck["save_id"]
        for k, v in stage["pipeline"]["model"].items():
            assert torch.equal(v, ref[k]), k
            seen += 1
    assert seen == len(ref)
    assert list(ck["model"]) == list(ref), "the run checkpoint holds the whole model"
    for k, v in ck["model"].items():
        assert torch.equal(v, ref[k]), k


def test_resume_on_another_world_size_is_refused_in_one_line(tmp_path, monkeypatch, capsys):
    from contsup_fast import train as T
    from contsup_fast.checkpoint import save_checkpoint
    data = write_tiny_cifar(tmp_path / "cifar", per_batch=16, n_test=40)
    args = vars(T.build_parser().parse_args(["--data-dir", data, "--parallel", "data",
                                              "--out", str(tmp_path / "r")]))
    save_checkpoint({"args": args, "parallel": "data", "world_size": 2, "epoch": 1},
                    str(tmp_path / "r" / "checkpoint.pt"))
    monkeypatch.setenv("WORLD_SIZE", "3")
    with pytest.raises(SystemExit) as exc:
        T.main(["--resume", str(tmp_path / "r")])
    err = capsys.readouterr().err.strip().splitlines()
    assert exc.value.code == 2 and len(err) == 1
    assert "2 process(es)" in err[0] and "on 3" in err[0] and "--nproc-per-node 2" in err[0]
    monkeypatch.delenv("WORLD_SIZE")
    with pytest.raises(SystemExit):
        T.main(["--resume", str(tmp_path / "r"), "--parallel", "none"])
    assert "--parallel data on 2" in capsys.readouterr().err


@pytest.mark.slow
def test_distributed_benchmark_quick(tmp_path, capsys):
    """`python -m bench.distributed --quick` machinery: one process and a 2-stage pipeline."""
    from bench import distributed as B
    payload = B.main(["--quick", "--modes", "pipeline", "--procs", "2", "--steps", "1",
                      "--warmup", "1", "--out", str(tmp_path), "--timeout", "300"])
    assert "images_per_s" in capsys.readouterr().out
    rows = payload["rows"]
    assert [(r["mode"], r["procs"]) for r in rows] == [("single", 1), ("pipeline", 2)]
    assert all(r.get("images_per_s", 0) > 0 for r in rows), rows
    assert rows[1]["stages"] == [2, 2] or sum(rows[1]["stages"]) == 4
    assert min(rows[1]["bytes_per_step"][:1]) > 0  # stage 0 sends h, y forward
    import json

    from bench.common import validate
    saved = json.loads((tmp_path / "distributed_cpu_quick.json").read_text())
    assert validate(saved, allow_legacy=False) == "current" and saved["rows"][0]["mode"] == "single"
