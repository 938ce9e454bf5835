"""One rank of a multi-process test (tests/test_distributed.py starts N of these with the
torchrun environment: RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT). Usage:
``python tests/_dist_worker.py CASE``. Each case checks against an independent computation
on this rank and raises (exit status != 0) on a mismatch; "ok <case>" is printed at the end.
"""
import os
import sys

import torch

torch.set_num_threads(1)

import torch.distributed as dist  # noqa: E402

from contsup_fast import LocalSequential  # noqa: E402
from contsup_fast import distributed as D  # noqa: E402
from contsup_fast.models import build_model  # noqa: E402

SIZE = (3, 16, 16)


def make_local(context, K=4, seed=0, aux="1c2f"):
    torch.manual_seed(seed)
    return LocalSequential(build_model("resnet20", 10), K=K, context=context, aux=aux,
                           backend="torch", input_size=SIZE)


def batch(seed, n=6):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, *SIZE, generator=g), torch.randint(0, 10, (n,), generator=g)


def grads(model):
    return {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}


def manual_mean(g, world):
    out = {}
    for k, v in g.items():
        t = v.clone()
        dist.all_reduce(t)
        out[k] = t / world
    return out


def assert_equal(a, b, what, atol=0.0):
    assert a.keys() == b.keys(), f"{what}: different keys"
    for k in a:
        ok = torch.equal(a[k], b[k]) if atol == 0 else torch.allclose(a[k], b[k], atol=atol, rtol=atol)
        if not ok:
            diff = (a[k].float() - b[k].float()).abs().max().item()
            raise AssertionError(f"{what}: {k} differs (max abs diff {diff:.3g})")


# ------------------------------------------------------------------------------ data parallel
def case_ddp(info):
    rank, world = info.rank, info.world_size
    for context, amp in (("R0", None), ("R1E", None), ("R2", None), ("R1E", torch.bfloat16)):
        local = make_local(context, seed=rank)  # different init per rank: the wrap broadcasts
        ddp = D.LocalDDP(local, bucket_cap_mb=0.05)
        ref = make_local(context, seed=0)
        assert_equal(dict(local.state_dict()), dict(ref.state_dict()), "broadcast at wrap time")
        opt = torch.optim.SGD(local.parameters(), lr=0.1, momentum=0.9)
        ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9)
        for step in range(2):
            x, y = batch(100 * step + rank)
            opt.zero_grad(set_to_none=True)
            ref_opt.zero_grad(set_to_none=True)
            with torch.autocast("cpu", dtype=amp, enabled=amp is not None):
                out = ddp(x, y)
                ref_out = ref(x, y)
            assert torch.equal(out.local_losses, ref_out.local_losses)
            expect = manual_mean(grads(ref), world)
            assert_equal(grads(local), expect, f"{context} amp={amp} step {step} gradients")
            for k, p in ref.named_parameters():
                if p.grad is not None:
                    p.grad.copy_(expect[k])
            opt.step()
            ref_opt.step()
        # eval runs no collective: rank 1 evaluates twice, rank 0 once, then both meet again
        ddp.eval()
        with torch.no_grad():
            for _ in range(1 + rank):
                ddp(batch(7)[0])
        ddp.train()
        dist.barrier()

    # no_sync: the first call accumulates locally, the second averages the sum
    local, ref = make_local("R1E"), make_local("R1E")
    ddp = D.LocalDDP(local)
    x1, y1 = batch(1 + rank)
    x2, y2 = batch(11 + rank)
    with ddp.no_sync():
        ddp(x1, y1)
    ref(x1, y1)
    assert_equal(grads(local), grads(ref), "no_sync leaves local gradients")
    ddp(x2, y2)
    ref(x2, y2)
    assert_equal(grads(local), manual_mean(grads(ref), world), "no_sync then sync")

    # plain DDP is refused at once
    try:
        torch.nn.parallel.DistributedDataParallel(make_local("R0"))
    except RuntimeError as exc:
        assert "LocalDDP" in str(exc), exc
    else:
        raise AssertionError("DistributedDataParallel(LocalSequential) was not refused")
    # ... and so is DDP over a container holding one, on its first training call
    container = _Holder(make_local("R0"))
    x, y = batch(3)
    wrapped = torch.nn.parallel.DistributedDataParallel(container)
    try:
        wrapped(x, y)
    except RuntimeError as exc:
        assert "LocalDDP" in str(exc), exc
    else:
        raise AssertionError("DistributedDataParallel(container of LocalSequential) was not refused")
    assert all(p.grad is None for p in container.parameters()), "refused before any gradient"
    case_sync_bn(info)  # same two processes: one interpreter start-up less


class _Holder(torch.nn.Module):
    """A user's container around a LocalSequential (what plain DDP must not be put over)."""

    def __init__(self, local):
        super().__init__()
        self.local = local

    def forward(self, x, y):
        return self.local(x, y)


def case_sync_bn(info):
    """Two processes with half a batch each and sync_bn == one process on the whole batch."""
    rank, world = info.rank, info.world_size
    for backend in ("native", "torch"):  # a fused backend is switched to the eager path
        torch.manual_seed(0)
        local = LocalSequential(build_model("resnet20", 10), K=4, context="R1E", backend=backend,
                                input_size=SIZE)
        ref = make_local("R1E")
        ref.load_state_dict(local.state_dict())
        ddp = D.LocalDDP(local, sync_bn=True)
        n_sync = sum(isinstance(m, torch.nn.SyncBatchNorm) for m in local.modules())
        n_bn = sum(isinstance(m, torch.nn.BatchNorm2d) for m in ref.modules())
        assert n_sync == n_bn and n_bn > 0, (n_sync, n_bn)
        for step in range(2):
            x, y = batch(50 + step, n=8)
            half = slice(rank * 4, rank * 4 + 4)
            local.zero_grad(set_to_none=True)
            ref.zero_grad(set_to_none=True)
            ddp(x[half], y[half])
            ref(x, y)
            bufs = {k: v for k, v in local.state_dict().items() if "running" in k}
            ref_bufs = {k: v for k, v in ref.state_dict().items() if "running" in k}
            assert_equal(bufs, ref_bufs, f"sync_bn running statistics ({backend}, step {step})", atol=1e-5)
            assert_equal(grads(local), grads(ref), f"sync_bn gradients ({backend}, step {step})", atol=2e-5)
            with torch.no_grad():
                for p, q in zip(local.parameters(), ref.parameters()):
                    q.copy_(p)


# ------------------------------------------------------------------------------ pipeline
def case_pipeline(info):
    """3 stages of a K=6 R2E model (a_1 crosses two boundaries) == one process, bit for bit."""
    rank, world = info.rank, info.world_size
    opt_factory = lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-4)  # noqa: E731
    sched_factory = lambda o: torch.optim.lr_scheduler.LambdaLR(o, lambda s: 1.0 / (1 + s))  # noqa: E731
    for context, channels_last in (("R2E", False), ("R1", True)):
        local = make_local(context, K=6)
        ref = make_local(context, K=6)
        if channels_last:
            local = local.to(memory_format=torch.channels_last)
            ref = ref.to(memory_format=torch.channels_last)
        pipe = D.LocalPipeline(local, stages=[2, 2, 2], opt_factory=opt_factory, sched_factory=sched_factory)
        if context == "R2E":
            lines = pipe.describe().splitlines()
            assert lines[0].endswith("sends h, x, y, a_1") and lines[1].endswith("y, a_2, a_3"), lines
        ref_opt = opt_factory(list(ref.parameters()))
        ref_sched = sched_factory(ref_opt)
        batches = [batch(s, n=6 if s < 2 else 5) for s in range(3)]
        ref_losses = []
        for x, y in batches:
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            ref_opt.zero_grad(set_to_none=True)
            ref_losses.append(ref(x, y).local_losses)
            ref_opt.step()
            ref_sched.step()
        done = []
        for x, y in batches:
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            out = pipe.step(x, y) if rank == 0 else pipe.step()
            if out.batch is not None:
                done.append(out)
        done += pipe.flush()
        assert [o.batch for o in done] == [0, 1, 2], [o.batch for o in done]
        for o, rl in zip(done, ref_losses):
            assert torch.equal(o.local_losses, rl[pipe.start:pipe.stop]), (o.local_losses, rl)
        metrics = pipe.reduce_metrics()
        want = torch.stack(ref_losses).double().mean(0)
        assert torch.allclose(torch.tensor(metrics["local_losses"], dtype=torch.float64), want,
                              atol=1e-6), (metrics, want)
        mine = pipe.state_dict()["model"]
        ref_sd = {k: v for k, v in ref.state_dict().items() if k in mine}
        assert len(mine) > 0 and len(ref_sd) == len(mine)
        assert_equal(mine, ref_sd, f"pipeline {context} parameters after 3 steps")
        # the whole model gathers on stage 0 (any stage may be dst), equal to the reference's
        for dst in (0, world - 1):
            full = pipe.gather_state_dict(dst=dst)
            if rank == dst:
                assert list(full) == list(ref.state_dict()), "gathered keys in state_dict order"
                assert_equal(full, ref.state_dict(), f"gathered model {context} on stage {dst}")
            else:
                assert full is None, "only dst gets the model"
        pipe.eval()
        ref.eval()
        xs = [batch(90 + s)[0] for s in range(2)]
        outs = [pipe.step(x, batch(90 + s)[1]) if rank == 0 else pipe.step() for s, x in enumerate(xs)]
        outs = [o for o in outs + pipe.flush() if o.batch is not None]
        if pipe.stage == world - 1:
            with torch.no_grad():
                for o, x in zip(outs, xs):
                    assert torch.equal(o.logits, ref(x)), "pipeline eval logits"
        m = pipe.reduce_metrics()
        assert m["images"] == 12 and m["batches"] == 2, m
        pipe.train()
        ref.train()
        # a stage's state restores into a fresh pipeline of the same placement
        fresh = D.LocalPipeline(make_local(context, K=6, seed=5), stages=[2, 2, 2], opt_factory=opt_factory,
                                sched_factory=sched_factory)
        fresh.load_state_dict(pipe.state_dict())
        assert_equal(fresh.state_dict()["model"], mine, "stage state round trip")

    try:
        pipe.gather_state_dict(dst=world)
    except ValueError as exc:
        assert "dst" in str(exc), exc
    else:
        raise AssertionError("gather_state_dict(dst=world) was accepted")
    # more stages than modules, and stage lists that do not fit
    for stages, K, word in ((None, 2, "stages"), ([1, 1], 4, "stages"), ([1, 1, 1], 4, "sums to")):
        try:
            D.LocalPipeline(make_local("R0", K=K), stages=stages)
        except ValueError as exc:
            assert word in str(exc), exc
        else:
            raise AssertionError(f"stages={stages} with K={K} was accepted")


# ------------------------------------------------------------------------------ training CLI
def _sigterm_after(trainer_cls, steps: int, rank: int):
    """Patch ``trainer_cls.step`` so that rank ``rank`` gets a SIGTERM after ``steps`` steps."""
    import signal
    orig, count = trainer_cls.step, {"n": 0}

    def step(self, x, y):
        out = orig(self, x, y)
        count["n"] += 1
        if count["n"] == steps and int(os.environ["RANK"]) == rank:
            os.kill(os.getpid(), signal.SIGTERM)
        return out

    trainer_cls.step = step
    return lambda: setattr(trainer_cls, "step", orig)


def cli_runs(out_root, data_dir, ports):
    """The training CLI (contsup_fast.train.run, as torchrun runs it) in data and pipeline
    mode: a SIGTERM on one rank in the middle of an epoch stops both ranks at the same step
    after saving; resuming gives exactly the parameters of an uninterrupted run (data: compared
    here; pipeline: the test compares the stage files with a single-process run)."""
    from contsup_fast import train as T
    from contsup_fast.checkpoint import load_checkpoint
    common = ["--model", "resnet20", "--K", "4", "--context", "R2E", "--data-dir", data_dir,
              "--batch-size", "16", "--epochs", "2", "--device", "cpu", "--lr", "0.05",
              "--warmup-epochs", "1", "--no-progress", "--dist-timeout", "120"]
    # (argv, trainer class to interrupt, after how many steps, on which rank)
    runs = [(["--parallel", "data", "--out", f"{out_root}/data"], None, 0, 0),
            (["--parallel", "data", "--out", f"{out_root}/data_split"], T._LocalTrainer, 2, 1),
            (["--resume", f"{out_root}/data_split", "--parallel", "data"], None, 0, 0),
            (["--parallel", "pipeline", "--out", f"{out_root}/pipe"], T._PipelineTrainer, 7, 0),
            (["--resume", f"{out_root}/pipe", "--parallel", "pipeline"], None, 0, 0)]
    for (argv, cls, steps, rank), port in zip(runs, ports):
        os.environ["MASTER_PORT"] = str(port)
        undo = _sigterm_after(cls, steps, rank) if cls is not None else None
        try:
            T.run((common if "--resume" not in argv else []) + argv)
            assert undo is None, "a SIGTERM on one rank did not stop this rank"
        except KeyboardInterrupt:
            assert undo is not None
            ck = load_checkpoint(argv[argv.index("--out") + 1])
            # the stop vote lags one step: both ranks stopped after step steps + 1
            assert (ck["epoch"], ck["batch"]) == divmod(steps + 1, 5), (ck["epoch"], ck["batch"])
        finally:
            if undo is not None:
                undo()
    if int(os.environ["RANK"]) == 0:
        a, b = load_checkpoint(f"{out_root}/data"), load_checkpoint(f"{out_root}/data_split")
        assert (a["epoch"], b["epoch"], b["world_size"]) == (2, 2, 2)
        assert_equal(a["model"], b["model"], "data-parallel resume")
        for i, st in a["optimizer"]["state"].items():
            assert torch.equal(st["momentum_buffer"], b["optimizer"]["state"][i]["momentum_buffer"])


def case_cli(info):
    D.shutdown_distributed()  # every run joins its own process group, as under torchrun
    ports = [int(p) for p in os.environ["CONTSUP_TEST_PORTS"].split(",")]
    cli_runs(os.environ["CONTSUP_TEST_OUT"], os.environ["CONTSUP_TEST_DATA"], ports)
    os.environ["MASTER_PORT"] = str(ports[-1])
    D.init_distributed(backend="gloo", timeout_s=120, device="cpu")


# ------------------------------------------------------------------------------ failures
def case_kill(info):
    """Rank 1 dies after one step; rank 0 must fail naming rank 1 within the timeout."""
    local = make_local("R0")
    ddp = D.LocalDDP(local)
    for step in range(50):
        if step == 1 and info.rank == 1:
            os._exit(3)
        ddp(*batch(step + info.rank))
    raise AssertionError("rank 0 kept training with a dead peer")


def main():
    case = sys.argv[1]
    timeout = float(os.environ.get("CONTSUP_TEST_TIMEOUT", "120"))  # generous: CI machines are busy
    info = D.init_distributed(backend="gloo", timeout_s=timeout, device="cpu")
    try:
        globals()[f"case_{case}"](info)
    except D.DeadRankError as exc:
        print(f"DeadRankError: {exc}", file=sys.stderr, flush=True)
        D.shutdown_distributed(clean=False)
        sys.exit(2)
    dist.barrier()
    D.shutdown_distributed()
    print(f"ok {case} rank {info.rank}", flush=True)


if __name__ == "__main__":
    main()
