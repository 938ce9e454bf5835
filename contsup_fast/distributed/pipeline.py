"""Pipeline-parallel local learning (:class:`LocalPipeline`): contiguous stages of local modules
on P processes, each training its own modules and sending forward only what later stages read."""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
from torch import Tensor

from ..local import LocalSequential
from .balance import _stage_counts
from .group import _check_local, _control_group, _require_process_group, comm_failure
from .watchdog import DeadRankError

__all__ = ["LocalPipeline", "StageOutput"]

_DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.float64]
_SLOT = 8  # per tensor: tag, dtype code, ndim, channels_last, 4 dims
_TAG_H, _TAG_X, _TAG_Y, _TAG_A = 0, 1, 2, 3  # a_i has tag 3 + i
_EMPTY, _BATCH = 0, 1


def _wire(t: Tensor) -> Tuple[Tensor, bool]:
    cl = t.dim() == 4 and not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last)
    return (t.permute(0, 2, 3, 1) if cl else t).contiguous(), cl


@dataclass
class StageOutput:
    """What one :meth:`LocalPipeline.step` did on this process.

    Attributes:
        batch: index of the batch this stage processed, counting the batches rank 0 fed
            (one per tick) since the last :meth:`LocalPipeline.flush`; None if the stage
            idled this tick (filling or draining).
        local_losses: (modules of this stage,) detached losses, on the device (no sync).
        logits: (N, classes) detached logits, on the last stage only (else None).
        labels: (N,) the labels that travelled with the batch (last stage), or None.
    """

    batch: Optional[int] = None
    local_losses: Optional[Tensor] = None
    logits: Optional[Tensor] = None
    labels: Optional[Tensor] = None


class LocalPipeline:
    """Pipeline-parallel :class:`LocalSequential`: contiguous stages of local modules, one
    per process of the group, streaming mini-batches forward.

    Every process builds the same ``local`` (same seed). The constructor keeps this
    process's stage on ``device`` and moves the other stages' modules to the meta device
    (no memory), so each process holds only its own parameters and optimizer state.

    Each :meth:`step` is one *tick*, called on every process: rank 0 passes the next batch
    ``(x, y)`` (or nothing, to drain), every stage ``s`` processes batch ``t - s``: for each of
    its modules the context, body, local loss and local backward (:meth:`LocalSequential.module_step`),
    then its optimizer and LR scheduler step, and it sends forward (point to point) the
    detached ``h``, the stored inputs ``a_i`` later R terms read, the image (E terms,
    reconstruction) and the labels. No message goes backward. :meth:`flush` drains the
    pipeline so that every fed batch has passed every stage. After n batches the parameters
    are those of single-process ``LocalSequential`` training on the same batches with the
    same per-module optimizer (bit-identical on the CPU with gloo: the same ops run on the
    same tensors, see tests/test_distributed.py).

    Args:
        local: the :class:`LocalSequential` (identical on every process).
        stages: None (balance the splitter's cost, :func:`module_costs`) or a list of module
            counts per stage (one per process, summing to K).
        process_group: the group whose ranks are the stages in order (default: world).
        opt_factory: ``params -> torch.optim.Optimizer`` for this stage's parameters (None:
            no optimizer; gradients accumulate and the caller steps).
        sched_factory: ``optimizer -> LR scheduler`` stepped after each batch (optional).
        device: device of this stage (default: where ``local``'s parameters are).
        grad_scaler: use a ``torch.amp.GradScaler`` per stage (fp16 autocast).

    Raises:
        ValueError: no process group, more stages than modules, a stage list of the wrong
            length or sum, or a factory that is not callable.
        DeadRankError: a neighbour stage died (named) while sending or receiving.
    """

    def __init__(self, local: LocalSequential, stages: Optional[Sequence[int]] = None,
                 process_group=None, opt_factory: Optional[Callable] = None,
                 sched_factory: Optional[Callable] = None, device=None, grad_scaler: bool = False):
        _check_local("LocalPipeline", local)
        _require_process_group("LocalPipeline", process_group)
        for name, f in (("opt_factory", opt_factory), ("sched_factory", sched_factory)):
            if f is not None and not callable(f):
                raise ValueError(f"LocalPipeline: {name} must be callable, got {type(f).__name__}")
        if sched_factory is not None and opt_factory is None:
            raise ValueError("LocalPipeline: sched_factory needs opt_factory (it schedules the "
                             "stage's optimizer)")
        self.local = local
        self.group = process_group
        self.num_stages = dist.get_world_size(process_group)
        self.stage = dist.get_rank(process_group)
        self.counts = _stage_counts(local, stages, self.num_stages)
        starts = [sum(self.counts[:s]) for s in range(self.num_stages)]
        self.bounds = [(a, a + c) for a, c in zip(starts, self.counts)]
        self.start, self.stop = self.bounds[self.stage]
        self.device = torch.device(device) if device is not None else next(local.parameters()).device
        self._ranks = [dist.get_global_rank(process_group, s) if process_group is not None else s
                       for s in range(self.num_stages)]
        self._ctrl = _control_group(process_group)
        # headers are CPU tensors: on the gloo control group when the data group is NCCL
        self._header_group = self._ctrl if self._ctrl is not None else self.group
        self._plan_messages()
        for m in local.local_modules:
            if self.start <= m.index < self.stop:
                m.to(self.device)
            else:
                m.to("meta")
        self.modules = [local.local_modules[j] for j in range(self.start, self.stop)]
        params = [p for m in self.modules for p in m.parameters()]
        self.optimizer = opt_factory(params) if opt_factory is not None else None
        self.scheduler = sched_factory(self.optimizer) if sched_factory is not None else None
        self.scaler = torch.amp.GradScaler(self.device.type) if grad_scaler else None
        self._tick = 0
        self._inflight: List[Tuple[object, Tensor]] = []
        #: running totals: bytes sent forward, seconds blocked receiving or finishing sends
        self.stats = {"bytes_sent": 0, "wait_s": 0.0}
        self.reset_metrics()

    # -------------------------------------------------------------- placement
    def _plan_messages(self) -> None:
        K = self.local.K
        reads = [set(m.context.sources) if m.context is not None else set() for m in self.local]
        # i -> is a_i read by a module after j
        self._reads_after = [set().union(*reads[j + 1:]) if j + 1 < K else set() for j in range(K)]
        needs_x = [(m.context is not None and m.context.image is not None) or m.decoder is not None
                   or 0 in reads[m.index] for m in self.local]
        self._send_x = [any(needs_x[self.bounds[s][1]:]) for s in range(self.num_stages)]
        self._send_a = [sorted(i for i in self._reads_after[self.bounds[s][1] - 1]
                               if 0 < i < self.bounds[s][1])
                        for s in range(self.num_stages)]
        most = max([len(a) for a in self._send_a] + [0])
        self._header_len = 2 + _SLOT * (3 + most)

    def describe(self) -> str:
        """One line per stage: its modules and what it sends forward."""
        lines = []
        for s, (a, b) in enumerate(self.bounds):
            sends = "logits" if s == self.num_stages - 1 else ", ".join(
                ["h"] + (["x"] if self._send_x[s] else []) + ["y"] + [f"a_{i}" for i in self._send_a[s]])
            lines.append(f"stage {s}: local modules {a}..{b - 1}  sends {sends}")
        return "\n".join(lines)

    # -------------------------------------------------------------- modes, state
    @property
    def in_flight(self) -> bool:
        """True between the first :meth:`step` and :meth:`flush` (batches may be in flight)."""
        return self._tick != 0

    @property
    def training(self) -> bool:
        return self.local.training

    def train(self, mode: bool = True) -> "LocalPipeline":
        if self._tick != 0:
            raise RuntimeError("LocalPipeline: call flush() before switching train/eval mode "
                               "(batches are still in flight)")
        for m in self.modules:
            m.train(mode)
        self.local.training = mode
        return self

    def eval(self) -> "LocalPipeline":
        return self.train(False)

    def parameters(self):
        """This stage's parameters."""
        return [p for m in self.modules for p in m.parameters()]

    def state_dict(self) -> Dict[str, object]:
        """This stage's modules (``local.state_dict()`` keys of its modules), optimizer,
        scheduler and grad scaler states."""
        return {"stage": self.stage, "num_stages": self.num_stages, "counts": list(self.counts),
                "model": self._stage_model(self.local.state_dict()),
                "optimizer": self.optimizer.state_dict() if self.optimizer is not None else None,
                "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
                "scaler": self.scaler.state_dict() if self.scaler is not None else None}

    def _stage_model(self, full: Dict[str, Tensor]) -> Dict[str, Tensor]:
        """The entries of ``full`` (a ``local.state_dict()``) that belong to this stage's modules."""
        prefix = tuple(f"local_modules.{j}." for j in range(self.start, self.stop))
        return {k: v for k, v in full.items() if k.startswith(prefix)}

    def gather_state_dict(self, dst: int = 0) -> Optional[Dict[str, Tensor]]:
        """Collective (call on every process): the whole model's ``local.state_dict()``
        assembled on stage ``dst`` from every stage's modules, as CPU tensors in
        ``state_dict`` order, ready for ``LocalSequential.load_state_dict`` in any parallel
        mode (or none); None on the other stages. Keys outside the local modules (the ramp
        gate's step counter) are stage ``dst``'s, equal on every stage. One ``gather_object``
        on the control group; parameters, not optimizer state.

        Raises:
            ValueError: ``dst`` is not a stage index.
            DeadRankError: a stage died during the gather (named).
        """
        if not isinstance(dst, int) or isinstance(dst, bool) or not 0 <= dst < self.num_stages:
            raise ValueError(f"LocalPipeline.gather_state_dict: dst must be a stage index in "
                             f"[0, {self.num_stages}), got {dst!r}")
        full = self.local.state_dict()
        mine = {k: v.detach().cpu() for k, v in self._stage_model(full).items()}
        parts = [None] * self.num_stages if self.stage == dst else None
        try:
            dist.gather_object(mine, parts, dst=self._ranks[dst], group=self._ctrl)
        except Exception as exc:
            raise comm_failure(exc, "the model gather") from exc
        if self.stage != dst:
            return None
        merged = {k: v.detach().cpu() for k, v in full.items() if not k.startswith("local_modules.")}
        for part in parts:
            merged.update(part)
        missing = [k for k in full if k not in merged]
        if missing:  # a stage sent fewer modules than its placement says: never expected
            raise RuntimeError(f"LocalPipeline.gather_state_dict: no stage sent {missing[:3]}")
        return {k: merged[k] for k in full}

    def load_state_dict(self, state: Dict[str, object]) -> None:
        """Restore :meth:`state_dict` of the same stage of the same placement.

        Raises:
            ValueError: the state belongs to another stage or another placement."""
        if (state.get("stage") != self.stage or state.get("num_stages") != self.num_stages
                or list(state.get("counts", [])) != list(self.counts)):
            raise ValueError(f"LocalPipeline: state of stage {state.get('stage')} of "
                             f"{state.get('num_stages')} (modules per stage {state.get('counts')}) "
                             f"cannot load into stage {self.stage} of {self.num_stages} "
                             f"({self.counts})")
        for j in range(self.start, self.stop):
            prefix = f"local_modules.{j}."
            own = {k[len(prefix):]: v for k, v in state["model"].items() if k.startswith(prefix)}
            try:
                self.local.local_modules[j].load_state_dict(own)
            except RuntimeError as exc:
                raise ValueError(f"LocalPipeline: the stage state does not fit local module {j}: "
                                 f"{str(exc).splitlines()[0]}") from exc
        for name, obj in (("optimizer", self.optimizer), ("scheduler", self.scheduler),
                          ("scaler", self.scaler)):
            if obj is not None and state.get(name) is not None:
                obj.load_state_dict(state[name])

    # -------------------------------------------------------------- messages
    def _peer_failure(self, exc: BaseException, what: str, peer_stage: int) -> DeadRankError:
        return comm_failure(exc, f"stage {self.stage} {what} stage {peer_stage} "
                                 f"(rank {self._ranks[peer_stage]})", [self._ranks[peer_stage]])

    def _wait_sends(self) -> None:
        inflight, self._inflight = self._inflight, []
        t0 = time.perf_counter()
        for work, _ in inflight:
            try:
                work.wait()
            except Exception as exc:
                raise self._peer_failure(exc, "sending to", self.stage + 1) from exc
        self.stats["wait_s"] += time.perf_counter() - t0

    def _send(self, tensors: List[Tuple[int, Tensor]]) -> None:
        self._wait_sends()
        header = torch.zeros(self._header_len, dtype=torch.int64)
        header[0] = _BATCH if tensors else _EMPTY
        header[1] = len(tensors)
        wires = []
        for k, (tag, t) in enumerate(tensors):
            w, cl = _wire(t)
            shape = list(t.shape)
            header[2 + _SLOT * k: 2 + _SLOT * (k + 1)] = torch.tensor(
                [tag, _DTYPES.index(t.dtype), t.dim(), int(cl)] + shape + [0] * (4 - len(shape)))
            wires.append(w)
        dst = self._ranks[self.stage + 1]
        try:
            self._inflight.append((dist.isend(header, dst, group=self._header_group), header))
            for w in wires:
                self._inflight.append((dist.isend(w, dst, group=self.group), w))
            self.stats["bytes_sent"] += header.numel() * 8 + sum(w.numel() * w.element_size() for w in wires)
        except Exception as exc:
            raise self._peer_failure(exc, "sending to", self.stage + 1) from exc

    def _recv(self) -> Optional[Dict[int, Tensor]]:
        src = self._ranks[self.stage - 1]
        header = torch.zeros(self._header_len, dtype=torch.int64)
        t0 = time.perf_counter()
        try:
            dist.recv(header, src, group=self._header_group)
            if int(header[0]) == _EMPTY:
                return None
            out: Dict[int, Tensor] = {}
            meta = header[2:2 + _SLOT * int(header[1])].view(-1, _SLOT).tolist()
            for tag, code, ndim, cl, *dims in meta:
                shape = dims[:ndim]
                wire_shape = [shape[0], shape[2], shape[3], shape[1]] if cl else shape
                buf = torch.empty(wire_shape, dtype=_DTYPES[code], device=self.device)
                dist.recv(buf, src, group=self.group)
                out[tag] = buf.permute(0, 3, 1, 2) if cl else buf
        except Exception as exc:
            raise self._peer_failure(exc, "receiving from", self.stage - 1) from exc
        finally:
            self.stats["wait_s"] += time.perf_counter() - t0
        return out

    # -------------------------------------------------------------- ticks
    def step(self, x: Optional[Tensor] = None, y: Optional[Tensor] = None) -> StageOutput:
        """One tick on this process (call it on every process, the same number of times).

        Args:
            x: on rank 0 of the group, (N, C, H, W) the next batch, or None to feed nothing
                (draining); ignored elsewhere.
            y: on rank 0, (N,) int64 labels (required in training mode).

        Returns:
            :class:`StageOutput` of the batch this stage processed this tick (``batch`` is None
            while the pipeline fills or drains).
        """
        tick, self._tick = self._tick, self._tick + 1
        msg: Optional[Dict[int, Tensor]] = None
        if self.stage == 0:
            if x is not None:
                self.local._check_inputs(x, y)
                if self.training and y is None:
                    raise ValueError("LocalPipeline.step: y: training needs labels on rank 0")
                msg = {_TAG_X: x.detach()}
                if y is not None:
                    msg[_TAG_Y] = y
        elif tick > 0:
            msg = self._recv()
        out = StageOutput()
        send: List[Tuple[int, Tensor]] = []
        if msg is not None:
            out, send = self._process(msg, tick - self.stage)
        if self.stage < self.num_stages - 1:
            self._send(send)
        return out

    def _process(self, msg: Dict[int, Tensor], batch: int) -> Tuple[StageOutput, List[Tuple[int, Tensor]]]:
        local, train = self.local, self.training
        x, y = msg.get(_TAG_X), msg.get(_TAG_Y)
        h = msg.get(_TAG_H)
        inputs = {tag - _TAG_A: t for tag, t in msg.items() if tag >= _TAG_A}
        if x is not None and 0 not in inputs:
            inputs[0] = x
        if train:
            if y is None:
                raise RuntimeError(f"LocalPipeline stage {self.stage}: training batch without labels")
            if self.optimizer is not None:
                self.optimizer.zero_grad(set_to_none=True)
        backend = local.backend_for(self.device)
        losses = []
        ctx = torch.enable_grad() if train else torch.no_grad()
        with ctx:
            for m in self.modules:
                h, a, loss = local.module_step(m, h, inputs, x, y, self.scaler, train, backend)
                if loss is not None:
                    losses.append(loss)
                keep = self._reads_after[m.index]
                inputs[m.index] = a
                inputs = {i: t for i, t in inputs.items() if i in keep}
        if train and self.optimizer is not None:
            if self.scaler is not None:
                self.scaler.step(self.optimizer)
                self.scaler.update()
            else:
                self.optimizer.step()
            if self.scheduler is not None:
                self.scheduler.step()
        loss_vec = torch.stack(losses).float() if losses else None
        last = self.stage == self.num_stages - 1
        self._account(loss_vec, h if last else None, y if last else None)
        out = StageOutput(batch, loss_vec, h if last else None, y if last else None)
        send: List[Tuple[int, Tensor]] = []
        if not last:
            send.append((_TAG_H, h))
            if self._send_x[self.stage]:
                send.append((_TAG_X, x))
            if y is not None:
                send.append((_TAG_Y, y))
            send += [(_TAG_A + i, inputs[i]) for i in self._send_a[self.stage]]
        return out, send

    def flush(self) -> List[StageOutput]:
        """Drain: ``P - 1`` ticks feeding nothing, then one tick that collects the last
        (empty) messages. Afterwards every fed batch has passed every stage and no message
        is in flight. Call on every process. Returns this stage's outputs of those ticks."""
        outs = [self.step() for _ in range(self.num_stages - 1)]
        if self.stage > 0 and self._tick > 0:
            leftover = self._recv()
            if leftover is not None:  # pragma: no cover - protocol invariant
                raise RuntimeError("LocalPipeline.flush: a batch arrived after draining")
        self._wait_sends()
        self._tick = 0
        return [o for o in outs if o.batch is not None]

    # -------------------------------------------------------------- metrics
    def reset_metrics(self) -> None:
        """Zero the running sums that :meth:`reduce_metrics` reports."""
        n = self.stop - self.start
        self._loss_sum = torch.zeros(n, dtype=torch.float32, device=self.device)
        self._correct = torch.zeros((), dtype=torch.int64, device=self.device)
        self._batches = 0
        self._images = 0

    def _account(self, loss_vec: Optional[Tensor], logits: Optional[Tensor], y: Optional[Tensor]) -> None:
        self._batches += 1
        if loss_vec is not None:
            self._loss_sum += loss_vec
        if logits is not None and y is not None:
            self._correct += (logits.argmax(1) == y).sum()
            self._images += y.shape[0]

    def reduce_metrics(self, reset: bool = True) -> Dict[str, object]:
        """Collective (call on every process): the mean local losses of all K modules over
        the batches processed since the last reset, the last module's loss, and the number of
        correct predictions and images seen by the last stage. One all-reduce of K + 3 numbers
        on the control group (one host sync per call, none per module)."""
        K = self.local.K
        vec = torch.zeros(K + 3, dtype=torch.float64)
        vec[self.start:self.stop] = self._loss_sum.double().cpu() / max(1, self._batches)
        if self.stage == self.num_stages - 1:
            vec[K] = float(self._correct)
            vec[K + 1] = self._images
            vec[K + 2] = self._batches
        try:
            dist.all_reduce(vec, group=self._ctrl)
        except Exception as exc:
            raise comm_failure(exc, "the metrics all-reduce") from exc
        if reset:
            self.reset_metrics()
        local_losses = vec[:K].tolist()
        images = int(vec[K + 1])
        return {"local_losses": local_losses, "loss": local_losses[-1], "correct": int(vec[K]),
                "images": images, "batches": int(vec[K + 2]),
                "accuracy": 100.0 * vec[K].item() / images if images else None}
