"""Cut a model into K gradient-isolated pieces with ``torch.fx``.

A model is traced with a tracer that keeps every non-container module (a residual block, a
conv, a ReLU) as one node. A *cut point* is a node after which exactly one tensor crosses
to the rest of the graph (so the piece before it has one output and the piece after it one
input), that produces a 4-D feature map, that is a block, an activation or a pooling op,
and that leaves a spatial (4-D, parameterised) module on both sides. For a CIFAR ResNet-32
these are the stem's ReLU and every residual block but the last: 15 cut points, so K <= 16.

Splits:
* ``split=None``: the paper's equal-layer preset where one exists (CIFAR ResNet-32/110;
  with AugLocal heads, AugLocal's split), else cost-balanced;
* ``split="balanced"``: the paper's memory-balanced preset (per ``preset_dataset``), else
  cost-balanced;
* ``split="cost"``: cost-balanced whatever the presets;
* ``split=[...]``: explicit cut points, as indices into :attr:`SplitPlan.candidates` or as
  node names (``"layer1.0"``).

Cost balancing minimises the largest piece's *activation cost*: the bytes autograd saves
for backward in that piece's nodes (unique storages per node, measured with saved-tensor
hooks during one forward at ``input_size``), i.e. the memory a local step of that piece
keeps alive. Dynamic programming over the candidate cuts gives the optimal contiguous
partition.

Transformers (:mod:`contsup_fast.layouts`): a cut may also carry tokens (N, L, D) (a ViT's or
DeiT's encoder blocks: torchvision ``encoder.layers``, timm ``blocks``) or an (N, H, W, C) map
(Swin). Such cuts must be a block's output (a module with submodules) with another block after
it, so every local module holds at least one block. The splitter records each candidate's
layout in :attr:`SplitPlan.layouts` and refuses a chosen cut whose layout it cannot interpret.
A forward with extra parameters that all have defaults (timm's ``forward(x, attn_mask=None,
is_causal=False)``) is traced with the tensor alone, the defaults fixed.
"""
from __future__ import annotations

import inspect
import operator
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.fx as fx
from torch import nn

from .aux_outputs import keep_main_logits
from .layouts import DESCEND, Layout, LeafCall, detect_layout, require
from .presets import MEMORY_BALANCED_BY_DATASET, cut_to_node_name, preset_cuts

__all__ = ["SplitPlan", "plan_split", "trace", "UnsplittableModelError"]

_CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)
_ACTIVATIONS = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.GELU, nn.SiLU, nn.Hardswish, nn.ELU, nn.Mish,
                nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)
_ACT_FUNCTIONS = {torch.relu, torch.nn.functional.relu, torch.nn.functional.gelu,
                  torch.nn.functional.silu, torch.nn.functional.max_pool2d,
                  torch.nn.functional.avg_pool2d, operator.add}


class UnsplittableModelError(ValueError):
    """The model cannot be cut into the requested local modules."""


class _BlockTracer(fx.Tracer):
    """Keeps every module that is not a container (Sequential/ModuleList/ModuleDict) as a leaf,
    except the block holders of :data:`~contsup_fast.layouts.DESCEND` (traced through)."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if (type(m).__module__, type(m).__name__) in DESCEND:
            return False
        return not isinstance(m, _CONTAINERS) and qualname != ""


_GUARDS = {torch._assert, operator.eq}


def _defaults(model: nn.Module) -> Dict[str, object]:
    """Defaults of the forward's parameters after the first (fixed while tracing)."""
    try:
        params = list(inspect.signature(model.forward).parameters.values())
    except (TypeError, ValueError):
        return {}
    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return {p.name: p.default for p in params[1:] if p.kind in kinds and p.default is not p.empty}


def _drop_specialised(graph: fx.Graph, names: List[str]) -> None:
    """Erase the placeholders fx keeps for fixed (concrete) arguments and the guards that only
    check them (``_assert_is_none``, ``x == default`` and ``torch._assert``)."""
    from torch.fx._symbolic_trace import _assert_is_none
    for ph in [n for n in graph.nodes if n.op == "placeholder"][1:]:
        users, todo = [], list(ph.users)
        while todo:
            u = todo.pop()
            if u.op != "call_function" or u.target not in _GUARDS | {_assert_is_none}:
                return  # the fixed value is used for computing: leave it for the refusal below
            users.append(u)
            todo.extend(u.users)
        for u in reversed(list(dict.fromkeys(users))):
            graph.erase_node(u)
        graph.erase_node(ph)


def trace(model: nn.Module) -> fx.GraphModule:
    """Trace ``model`` into a GraphModule whose call_module nodes are blocks and layers.

    Raises:
        UnsplittableModelError: torch.fx cannot trace the model.
    """
    fixed = _defaults(model)
    try:
        graph = _BlockTracer().trace(model, concrete_args=fixed or None)
        _drop_specialised(graph, list(fixed))
    except Exception as exc:
        raise UnsplittableModelError(
            f"model {type(model).__name__} cannot be split: torch.fx could not trace it "
            f"({type(exc).__name__}: {exc}). Models need a traceable forward without "
            f"data-dependent control flow; nn.Sequential and torchvision CNNs work.") from exc
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    if len(placeholders) != 1:
        raise UnsplittableModelError(
            f"model {type(model).__name__} cannot be split: its forward must take one tensor, "
            f"it takes {len(placeholders)} inputs ({[p.name for p in placeholders]}); extra inputs need "
            f"defaults, with which the model is traced")
    return fx.GraphModule(model, graph, class_name=type(model).__name__)


@dataclass
class SplitPlan:
    """Where a traced model is cut.

    Attributes:
        gm: the traced model.
        candidates: names of all cut-point nodes, in graph order.
        cuts: names of the chosen ``K - 1`` cut nodes, in graph order.
        shapes: output shape of every node at the example input (for summaries and heads).
        costs: saved-for-backward bytes of every node at the example input (batch 2).
        source: how the cuts were chosen ("paper preset", "paper memory-balanced preset",
            "cost-balanced", "explicit").
        layouts: the :class:`~contsup_fast.layouts.Layout` of the tensor crossing at every
            candidate (or the message saying why it cannot be interpreted: such a candidate is
            refused when chosen).
        calls: the leaf-module calls of every node at the example input (in call order).
    """

    gm: fx.GraphModule
    candidates: List[str]
    cuts: List[str]
    shapes: Dict[str, Tuple[int, ...]]
    costs: Dict[str, int]
    source: str
    pieces: List[fx.GraphModule] = field(default_factory=list)
    layouts: Dict[str, Union[Layout, str]] = field(default_factory=dict)
    calls: Dict[str, List[LeafCall]] = field(default_factory=dict)

    def layout(self, cut: str) -> Layout:
        """The layout at chosen cut ``cut``. Raises: ValueError (LayoutError) when it cannot be interpreted."""
        return require(self.layouts[cut])


def _node_label(gm: fx.GraphModule, node: fx.Node) -> str:
    return str(node.target) if node.op == "call_module" else node.name


def _shape(t) -> Optional[Tuple[int, ...]]:
    return tuple(t.shape) if isinstance(t, torch.Tensor) else None


def _propagate_shapes(gm: fx.GraphModule, input_size: Sequence[int],
                      calls: Optional[Dict[str, List[LeafCall]]] = None) -> Tuple[Dict[str, tuple], Dict[str, int]]:
    """Output shape and saved bytes of every node at one example forward (batch 2); fills
    ``calls`` (when given) with every node's leaf-module calls."""
    shapes: Dict[str, tuple] = {}
    costs: Dict[str, int] = {}
    calls = {} if calls is None else calls
    running: List[List[LeafCall]] = [[]]

    def record(m, args, out):
        running[0].append(LeafCall(m, _shape(args[0]) if args else None, _shape(out)))

    hooks = [m.register_forward_hook(record) for m in gm.modules() if not any(True for _ in m.children())]
    param = next(iter(gm.parameters()), None)
    device = param.device if param is not None else torch.device("cpu")
    dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
    was_training = gm.training

    current: Dict[str, Dict[int, int]] = {}
    weights = {t.untyped_storage().data_ptr() for t in list(gm.parameters()) + list(gm.buffers())}

    def pack(t: torch.Tensor):
        if current and t.untyped_storage().data_ptr() not in weights:
            (saved,) = current.values()
            saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    class _Recorder(fx.Interpreter):
        def run_node(self, n):
            current.clear()
            current[n.name] = {}
            running[0] = calls[n.name] = []
            out = super().run_node(n)
            saved = current.pop(n.name)
            if isinstance(out, torch.Tensor):
                shapes[n.name] = tuple(out.shape)
                costs[n.name] = sum(saved.values())
            return out

    gm.eval()
    try:
        with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            _Recorder(gm).run(torch.randn(2, *input_size, device=device, dtype=dtype))
    except Exception as exc:
        raise UnsplittableModelError(
            f"model {type(gm).__name__} failed on an example input of shape (2, {', '.join(map(str, input_size))}) "
            f"({type(exc).__name__}: {exc}); pass input_size=(C, H, W) matching the model") from exc
    finally:
        gm.train(was_training)
        for h in hooks:
            h.remove()
    return shapes, costs


def _cut_candidates(gm: fx.GraphModule, shapes: Dict[str, tuple],
                    calls: Optional[Dict[str, List[LeafCall]]] = None, model: Optional[nn.Module] = None,
                    layouts: Optional[Dict[str, Union[Layout, str]]] = None) -> List[fx.Node]:
    """Cut points (module docstring). With ``calls`` (leaf calls per node), also detects each
    candidate's layout into ``layouts`` and keeps a channels-last (NHWC or token) candidate
    only where it is a block's output with another block after it."""
    nodes = list(gm.graph.nodes)
    index = {n: i for i, n in enumerate(nodes)}
    last_use = {n: max((index[u] for u in n.users), default=index[n]) for n in nodes}
    modules = dict(gm.named_modules())

    def has_params(n: fx.Node) -> bool:
        return n.op == "call_module" and any(True for _ in modules[n.target].parameters())

    def is_block(n: fx.Node) -> bool:
        return has_params(n) and any(True for _ in modules[n.target].children())

    def spatial_module(n: fx.Node, dims=(4,)) -> bool:
        return len(shapes.get(n.name, ())) in dims and has_params(n)

    feature = (3, 4) if calls is not None else (4,)
    first_spatial = next((i for i, n in enumerate(nodes) if spatial_module(n, feature)), None)
    last_spatial = max((i for i, n in enumerate(nodes) if spatial_module(n, feature)), default=None)
    last_block = max((i for i, n in enumerate(nodes) if is_block(n) and len(shapes.get(n.name, ())) in feature),
                     default=-1)
    if first_spatial is None:
        return []
    flat = [c for n in nodes for c in (calls or {}).get(n.name, [])]
    out: List[fx.Node] = []
    for i, n in enumerate(nodes):
        dims = len(shapes.get(n.name, ()))
        if not (first_spatial <= i < last_spatial) or dims not in feature:
            continue
        if n.op == "call_module":
            m = modules[n.target]
            if not (isinstance(m, _ACTIVATIONS) or any(True for _ in m.children())):
                continue
        elif not (n.op == "call_function" and n.target in _ACT_FUNCTIONS):
            continue
        crossing = [p for p in nodes[: i + 1] if p.op != "get_attr" and last_use[p] > i]
        if crossing != [n]:
            continue
        if calls is not None:
            before = sum(len(calls.get(p.name, [])) for p in nodes[: i + 1])
            layout = detect_layout(model if model is not None else gm, _node_label(gm, n), shapes[n.name],
                                   flat[before:], flat[:before], flat)
            channels_last = not isinstance(layout, Layout) or layout.kind != "NCHW"
            if dims == 3 or (isinstance(layout, Layout) and channels_last):
                if not (is_block(n) and i < last_block):
                    continue
            layouts[n.name] = layout
        out.append(n)
    return out


def _balanced_cuts(order: List[str], costs: Dict[str, int], candidates: List[str], K: int) -> List[str]:
    """Choose K-1 cuts among ``candidates`` minimising the largest piece's cost (DP)."""
    prefix = [0]
    for name in order:
        prefix.append(prefix[-1] + costs.get(name, 0))
    pos = {name: i + 1 for i, name in enumerate(order)}  # cost of nodes up to and including name
    cand_pos = [pos[c] for c in candidates]
    ends = cand_pos + [len(order)]
    m = len(ends)
    INF = float("inf")
    # best[k][e] = minimal max-cost using k pieces whose last ends at ends[e]
    best = [[INF] * m for _ in range(K + 1)]
    back = [[-1] * m for _ in range(K + 1)]
    for e in range(m):
        best[1][e] = prefix[ends[e]]
    for k in range(2, K + 1):
        for e in range(m):
            for s in range(e):
                v = max(best[k - 1][s], prefix[ends[e]] - prefix[ends[s]])
                if v < best[k][e]:
                    best[k][e], back[k][e] = v, s
    cuts: List[str] = []
    e, k = m - 1, K
    while k > 1:
        s = back[k][e]
        cuts.append(candidates[s])
        e, k = s, k - 1
    return sorted(cuts, key=lambda c: pos[c])


def _piece(gm: fx.GraphModule, nodes: List[fx.Node], input_node: Optional[fx.Node]) -> fx.GraphModule:
    graph = fx.Graph()
    env: Dict[fx.Node, fx.Node] = {}
    x = graph.placeholder("x")
    if input_node is not None:
        env[input_node] = x
    for n in nodes:
        if n.op == "placeholder":
            env[n] = x
            continue
        if n.op == "output":
            graph.output(env[n.args[0]])
            continue
        env[n] = graph.node_copy(n, lambda a: env[a] if a in env else _get_attr(graph, env, a))
    if not any(n.op == "output" for n in graph.nodes):
        graph.output(env[nodes[-1]])
    graph.lint()
    return fx.GraphModule(gm, graph, class_name="LocalBody")


def _get_attr(graph: fx.Graph, env: Dict[fx.Node, fx.Node], a: fx.Node) -> fx.Node:
    if a.op != "get_attr":
        raise UnsplittableModelError(f"internal error: node {a.name} crosses a single-tensor cut")
    env[a] = graph.get_attr(a.target)
    return env[a]


def plan_split(model: nn.Module, K: int, split: Union[None, str, Sequence[Union[int, str]]] = None,
               input_size: Sequence[int] = (3, 32, 32), preset_dataset: str = "cifar10",
               aux: Optional[str] = None) -> SplitPlan:
    """Trace ``model`` and cut it into ``K`` pieces (see module docstring).

    Args:
        model: any fx-traceable module taking one (N, C, H, W) tensor.
        K: number of local modules, ``1 <= K <= len(candidates) + 1``.
        split: None, ``"balanced"``, ``"cost"`` (the cost-balanced split, whatever the presets),
            or explicit cut points (indices into the candidates or node names).
        input_size: (C, H, W) of one example, used for one forward to measure shapes.
        preset_dataset: whose preset tables (:data:`~contsup_fast.presets.PRESET_DATASETS`).
        aux: the auxiliary head kind; ``"auglocal"`` selects AugLocal's split as the preset.

    Returns:
        A :class:`SplitPlan` whose ``pieces`` are K GraphModules sharing ``model``'s parameters.

    Raises:
        ValueError: K < 1, K larger than the number of cut points + 1, or a bad ``split``;
            :class:`~contsup_fast.layouts.LayoutError` for a chosen cut whose layout cannot be
            interpreted (naming the model, the cut and the shape).
        UnsplittableModelError: the model cannot be traced or has no cut point when K > 1.
    """
    if not isinstance(K, int) or isinstance(K, bool) or K < 1:
        raise ValueError(f"K must be an integer >= 1, got {K!r}")
    gm = keep_main_logits(trace(model), type(model).__name__)
    calls: Dict[str, List[LeafCall]] = {}
    shapes, costs = _propagate_shapes(gm, input_size, calls)
    layouts: Dict[str, Union[Layout, str]] = {}
    cand_nodes = _cut_candidates(gm, shapes, calls, model, layouts)
    candidates = [n.name for n in cand_nodes]
    labels = {n.name: _node_label(gm, n) for n in cand_nodes}
    if K - 1 > len(candidates):
        raise ValueError(
            f"K={K} is larger than the number of splittable blocks: {type(model).__name__} has "
            f"{len(candidates)} single-tensor cut points, so K must be between 1 and {len(candidates) + 1}")
    order = [n.name for n in gm.graph.nodes]
    # automatic choices only among cuts whose layout is understood (an explicit one is refused)
    usable = [c for c in candidates if isinstance(layouts[c], Layout)]
    arch = getattr(model, "arch", None)
    source = "explicit"
    if split is None or split in ("balanced", "cost"):
        preset = (preset_cuts(arch, K, split == "balanced", preset_dataset, aux) if K > 1 else []) \
            if split != "cost" else None
        by_label = {labels[c]: c for c in candidates}
        if preset is not None and all(cut_to_node_name(c) in by_label for c in preset):
            cuts = [by_label[cut_to_node_name(c)] for c in preset]
            source = ("paper memory-balanced preset" if split == "balanced"
                      else "AugLocal preset" if aux == "auglocal" else "paper preset")
            if split == "balanced" and preset_dataset in MEMORY_BALANCED_BY_DATASET:
                source += f" ({preset_dataset})"
        else:
            if K - 1 > len(usable):
                plan_layouts = {c: layouts[c] for c in candidates}
                require(next(v for v in plan_layouts.values() if not isinstance(v, Layout)))
            cuts = _balanced_cuts(order, costs, usable, K) if K > 1 else []
            source = "cost-balanced"
    elif isinstance(split, str):
        raise ValueError(f"split must be None, 'balanced', 'cost' or a list of cut points, got {split!r}")
    else:
        cuts = []
        by_label = {labels[c]: c for c in candidates}
        for item in split:
            if isinstance(item, int) and not isinstance(item, bool) and 0 <= item < len(candidates):
                cuts.append(candidates[item])
            elif isinstance(item, str) and (item in by_label or item in candidates):
                cuts.append(by_label.get(item, item))
            else:
                raise ValueError(
                    f"split entries must be indices 0..{len(candidates) - 1} or names of cut points "
                    f"({', '.join(labels[c] for c in candidates[:6])}, ...), got {item!r}")
        if len(set(cuts)) != len(cuts) or len(cuts) != K - 1:
            raise ValueError(f"split must name K-1={K - 1} distinct cut points, got {list(split)!r}")
        cuts = sorted(cuts, key=order.index)
    plan = SplitPlan(gm=gm, candidates=candidates, cuts=cuts, shapes=shapes, costs=costs, source=source,
                     layouts={c: layouts[c] for c in candidates}, calls=calls)
    for c in cuts:
        plan.layout(c)  # refuses a cut whose layout cannot be interpreted
    plan.pieces = _make_pieces(gm, cuts)
    return plan


def _make_pieces(gm: fx.GraphModule, cuts: List[str]) -> List[fx.GraphModule]:
    nodes = list(gm.graph.nodes)
    bounds = [i for i, n in enumerate(nodes) if n.name in set(cuts)]
    pieces = []
    start, inp = 0, None
    for b in bounds + [len(nodes) - 1]:
        body = [n for n in nodes[start: b + 1] if n.op != "get_attr"]
        pieces.append(_piece(gm, body, inp))
        inp = nodes[b]
        start = b + 1
    return pieces
