"""LocalSequential(cuda_graphs=True): refusals (CPU) and equality with the eager path (GPU)."""
import contextlib
import dataclasses

import pytest
import torch
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

from contsup_fast import LocalSequential
from contsup_fast.cuda_graphs import GraphedLocalSteps, StepSignature, bind_static_grads
from contsup_fast.models import resnet20


def _batch(n=8, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, 3, 32, 32, generator=g).to(device),
            torch.randint(0, 10, (n,), generator=g).to(device))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal without a GPU")
def test_refused_at_construction_without_a_gpu():
    with pytest.raises(RuntimeError, match="cuda_graphs=True needs a CUDA GPU"):
        LocalSequential(resnet20(), K=2, cuda_graphs=True)


def test_cuda_graphs_must_be_a_bool():
    with pytest.raises(ValueError, match="cuda_graphs must be True or False, got 'yes'"):
        LocalSequential(resnet20(), K=2, cuda_graphs="yes")


def test_cpu_inputs_and_grad_scaler_are_refused_eval_stays_eager(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    local = LocalSequential(resnet20(), K=2, context="R1E", backend="torch", cuda_graphs=True)
    x, y = _batch(4)
    with pytest.raises(RuntimeError, match="cuda_graphs=True needs CUDA tensors, x is on cpu"):
        local(x, y)
    with pytest.raises(ValueError, match="cuda_graphs=True does not support a GradScaler"):
        local(x, y, scaler=object())
    local.eval()
    assert local(x).shape == (4, 10)


def test_signature_refuses_other_batch_sizes_and_dynamic_shapes():
    x, y = _batch(8)
    sig = StepSignature.of(x, y)
    sig.check(StepSignature.of(x.clone(), y.clone()))
    with pytest.raises(ValueError, match="cuda_graphs=True: batch size 6 differs from the batch size 8"):
        sig.check(StepSignature.of(x[:6], y[:6]))
    with pytest.raises(ValueError, match=r"cuda_graphs=True does not support dynamic shapes: the image shape"):
        sig.check(StepSignature.of(torch.randn(8, 3, 24, 24), y))
    with pytest.raises(ValueError, match="channels_last memory format changed"):
        sig.check(StepSignature.of(x.contiguous(memory_format=torch.channels_last), y))
    with pytest.raises(ValueError, match="dtype changed"):
        sig.check(StepSignature.of(x.double(), y))
    with pytest.raises(ValueError, match="autocast"):
        sig.check(dataclasses.replace(sig, autocast=(True, torch.bfloat16)))


def test_bind_static_grads_keeps_backward_semantics():
    a, b, c = (torch.nn.Parameter(torch.randn(3)) for _ in range(3))
    static = [torch.full((3,), 7.0) for _ in range(3)]
    b.grad = torch.ones(3)
    c.grad = static[2]
    bind_static_grads([a, b, c], static)
    assert all(p.grad is s for p, s in zip((a, b, c), static))
    assert a.grad.eq(0).all() and b.grad.eq(1).all() and c.grad.eq(7).all()


def test_warmup_must_be_positive():
    with pytest.raises(ValueError, match="warmup must be >= 1"):
        GraphedLocalSteps(object(), warmup=0)


# ---------------------------------------------------------------------------------------------
# A CPU emulation of CUDA graphs, to test GraphedLocalSteps' data flow without a GPU: capture
# records every aten op (forward, backward, gradient accumulation, BatchNorm buffer updates) with
# its tensor objects, then undoes the in-place writes it made (a real capture runs nothing);
# replay re-runs the ops on the same tensors, writing each result into the recorded output, as a
# graph replays the same kernels on the same addresses.
class _Recorder(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops, self.saved = [], {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        # every input as first seen (schemas do not mark every write: native_batch_norm updates
        # its running statistics in place without an (a!) annotation)
        for t in pytree.tree_leaves((args, kwargs)):
            if isinstance(t, torch.Tensor) and id(t) not in self.saved and 0 not in t.stride():
                self.saved[id(t)] = (t, t.detach().clone())  # (expanded tensors cannot be written)
        out = func(*args, **kwargs)
        self.ops.append((func, args, kwargs, out))
        return out


class _FakeGraph:
    def __init__(self):
        self.ops = []

    def pool(self):
        return id(self)

    @torch.no_grad()
    def replay(self):
        plain = lambda t: t.detach() if isinstance(t, torch.Tensor) else t  # noqa: E731
        for func, args, kwargs, out in self.ops:
            args, kwargs = pytree.tree_map(plain, (args, kwargs))
            inputs = {t.untyped_storage().data_ptr() for t in pytree.tree_leaves((args, kwargs))
                      if isinstance(t, torch.Tensor)}
            new = func(*args, **kwargs)
            for o, n in zip(pytree.tree_leaves(out), pytree.tree_leaves(new)):
                if isinstance(o, torch.Tensor) and o.untyped_storage().data_ptr() not in inputs:
                    o.detach().copy_(n)


class _NullStream:
    def wait_stream(self, other):
        pass


class _FakeCuda:
    CUDAGraph = _FakeGraph

    @staticmethod
    @contextlib.contextmanager
    def graph(g, pool=None):
        rec = _Recorder()
        with rec:
            yield
        g.ops = rec.ops
        with torch.no_grad():
            for t, before in rec.saved.values():
                t.detach().copy_(before)

    Stream = staticmethod(lambda device=None: _NullStream())
    current_stream = staticmethod(lambda device=None: _NullStream())
    stream = staticmethod(lambda s: contextlib.nullcontext())
    synchronize = staticmethod(lambda device=None: None)


def _emulated(local):
    local._graphed = GraphedLocalSteps(local, runtime=_FakeCuda, device_type="cpu")
    return local


def _small_cnn():
    def block(cin, cout, stride=1):
        return torch.nn.Sequential(torch.nn.Conv2d(cin, cout, 3, stride, 1, bias=False),
                                   torch.nn.BatchNorm2d(cout), torch.nn.ReLU())
    return torch.nn.Sequential(block(3, 8), block(8, 8), block(8, 16, 2), block(16, 16),
                               torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(16, 10))


@pytest.fixture
def one_thread():
    """Tiny models: one intra-op thread is faster than two contending ones (and cheaper in CI)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("context,aux,gate", [("R2E", "1c2f", {}),
                                              ("R1E", "0c1f", dict(context_gate="ramp", context_gate_steps=4))])
def test_graphed_data_flow_matches_eager_under_a_cpu_emulation_of_graphs(monkeypatch, one_thread, context, aux, gate):
    kw = dict(K=4, context=context, aux=aux, backend="torch", input_size=(3, 16, 16), **gate)
    torch.manual_seed(0)
    eager = LocalSequential(_small_cnn(), **kw)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    graphed = _emulated(LocalSequential(_small_cnn(), cuda_graphs=True, **kw))
    graphed.load_state_dict(eager.state_dict())
    seen = {"eager": [], "graphed": []}
    for name, local in (("eager", eager), ("graphed", graphed)):
        local.register_module_step_hook(
            lambda m, name=name: seen[name].append((m.index, all(p.grad is not None for p in m.body.parameters()))))
    batches = [tuple(t[..., :16, :16].contiguous() if t.dim() == 4 else t for t in _batch(4, s)) for s in range(5)]
    a, b = _train(eager, 5, batches), _train(graphed, 5, batches)   # 2 eager, capture, 2 replays
    assert len(graphed._graphed.graphs) == 4 and graphed._graphed.calls == 5
    assert seen["graphed"] == seen["eager"] == [(j, True) for _ in range(5) for j in range(4)]
    if gate:  # the ramp (a buffer the graphs read) advanced once per step on both paths
        assert int(graphed.context_gate_step) == int(eager.context_gate_step) == 5
    for oa, ob in zip(a, b):
        torch.testing.assert_close(ob.local_losses, oa.local_losses, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(ob.logits, oa.logits, rtol=1e-5, atol=1e-6)
    for (k, u), (_, v) in zip(eager.state_dict().items(), graphed.state_dict().items()):
        torch.testing.assert_close(v, u, rtol=1e-5, atol=1e-6, msg=k)
    # gradients accumulate like loss.backward() when the user does not zero them
    g_eager = [p.grad.clone() for p in eager.parameters() if p.grad is not None]
    eager(*batches[0]), graphed(*batches[0])
    g_both = [p.grad for p in graphed.parameters() if p.grad is not None]
    for ge, gb, p in zip(g_eager, g_both, [p for p in eager.parameters() if p.grad is not None]):
        torch.testing.assert_close(gb, p.grad, rtol=1e-5, atol=1e-6)


def _train(local, steps, batches, lr=0.1):
    opt = torch.optim.SGD(local.parameters(), lr=lr, momentum=0.9, nesterov=True, weight_decay=5e-4)
    outs = []
    for x, y in batches[:steps]:
        opt.zero_grad(set_to_none=True)
        outs.append(local(x, y))
        opt.step()
    return outs


@pytest.mark.cuda
@pytest.mark.parametrize("context,backend", [("R1E", "torch"), ("R1E", "auto"), ("R0", "auto")])
@pytest.mark.parametrize("channels_last", [False, True])
def test_graphed_steps_give_the_eager_parameters(context, backend, channels_last):
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    torch.manual_seed(0)
    eager = LocalSequential(resnet20(), K=4, context=context, backend=backend).cuda().to(memory_format=fmt)
    torch.manual_seed(0)
    graphed = LocalSequential(resnet20(), K=4, context=context, backend=backend, cuda_graphs=True)
    graphed = graphed.cuda().to(memory_format=fmt)
    graphed.load_state_dict(eager.state_dict())
    batches = [tuple(t.contiguous(memory_format=fmt) if t.dim() == 4 else t for t in _batch(8, s, "cuda"))
               for s in range(5)]
    a, b = _train(eager, 5, batches), _train(graphed, 5, batches)   # 2 eager, capture, 2 replays
    assert len(graphed._graphed.graphs) == 4
    for oa, ob in zip(a, b):
        torch.testing.assert_close(ob.local_losses, oa.local_losses, rtol=1e-3, atol=1e-4)
        torch.testing.assert_close(ob.logits, oa.logits, rtol=1e-3, atol=1e-3)
    for (k, p), (_, q) in zip(eager.named_parameters(), graphed.named_parameters()):
        torch.testing.assert_close(q, p, rtol=1e-4, atol=1e-5, msg=k)
    for (k, u), (_, v) in zip(eager.state_dict().items(), graphed.state_dict().items()):
        torch.testing.assert_close(v, u, rtol=1e-4, atol=1e-5, msg=k)


@pytest.mark.cuda
def test_after_capture_another_batch_size_or_shape_is_refused():
    local = LocalSequential(resnet20(), K=2, context="R1", cuda_graphs=True).cuda()
    for s in range(3):
        local(*_batch(8, s, "cuda"))
    with pytest.raises(ValueError, match="batch size 6 differs"):
        local(*_batch(6, 0, "cuda"))
    with pytest.raises(ValueError, match="dynamic shapes"):
        local(torch.randn(8, 3, 40, 40, device="cuda"), torch.zeros(8, dtype=torch.long, device="cuda"))


@pytest.mark.cuda
def test_bf16_autocast_graphed_step_is_close_to_eager():
    torch.manual_seed(0)
    eager = LocalSequential(resnet20(), K=4, context="R1E").cuda()
    graphed = LocalSequential(resnet20(), K=4, context="R1E", cuda_graphs=True).cuda()
    graphed.load_state_dict(eager.state_dict())
    batches = [_batch(16, s, "cuda") for s in range(4)]
    with torch.autocast("cuda", dtype=torch.bfloat16):
        a, b = _train(eager, 4, batches), _train(graphed, 4, batches)
    torch.testing.assert_close(b[-1].local_losses, a[-1].local_losses, rtol=3e-2, atol=3e-2)
