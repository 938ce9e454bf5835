"""Stage balancing for the pipeline: each local module's cost and the contiguous placement of
the K modules on P stages that minimises the largest stage's cost."""
from __future__ import annotations

from typing import List, Sequence

from ..local import LocalSequential

__all__ = ["module_costs", "balance_stages"]


def module_costs(local: LocalSequential) -> List[int]:
    """The splitter's cost of each local module: the bytes autograd saves for backward in
    its body at the example input (batch 2), as measured by :mod:`contsup_fast.splitting`.
    Parameters on the meta device (other pipeline stages) are not measurable: call this on
    the whole model."""
    from ..splitting import _propagate_shapes
    costs = []
    shape = tuple(local.input_size)
    for m in local.local_modules:
        _, c = _propagate_shapes(m.body, shape)
        costs.append(int(sum(c.values())))
        shape = tuple(m.out_shape)
    return costs


def balance_stages(costs: Sequence[float], num_stages: int) -> List[int]:
    """Module counts of ``num_stages`` contiguous stages minimising the largest stage's
    total cost (exact dynamic programme over the cut positions).

    Raises:
        ValueError: ``num_stages`` < 1 or larger than ``len(costs)``.
    """
    K = len(costs)
    if not isinstance(num_stages, int) or not 1 <= num_stages <= K:
        raise ValueError(f"stages: {num_stages} stages for K={K} local modules; a stage needs "
                         f"at least one module, so use 1..{K} processes")
    prefix = [0.0]
    for c in costs:
        prefix.append(prefix[-1] + float(c))
    INF = float("inf")
    best = [[INF] * (K + 1) for _ in range(num_stages + 1)]
    back = [[0] * (K + 1) for _ in range(num_stages + 1)]
    best[0][0] = 0.0
    for s in range(1, num_stages + 1):
        for e in range(s, K + 1):
            for b in range(s - 1, e):
                v = max(best[s - 1][b], prefix[e] - prefix[b])
                if v < best[s][e]:
                    best[s][e], back[s][e] = v, b
    counts, e = [], K
    for s in range(num_stages, 0, -1):
        b = back[s][e]
        counts.append(e - b)
        e = b
    return counts[::-1]


def _stage_counts(local: LocalSequential, stages, P: int) -> List[int]:
    K = local.K
    if P > K:
        raise ValueError(f"LocalPipeline: stages: {P} processes (stages) but only K={K} local "
                         f"modules; use at most {K} processes or a larger K")
    if stages is None:
        return balance_stages(module_costs(local), P)
    counts = list(stages)
    if not all(isinstance(c, int) and not isinstance(c, bool) and c >= 1 for c in counts):
        raise ValueError(f"LocalPipeline: stages must be module counts >= 1, got {counts!r}")
    if len(counts) != P:
        raise ValueError(f"LocalPipeline: stages lists {len(counts)} stages but the process group "
                         f"has {P} processes (one stage each)")
    if sum(counts) != K:
        raise ValueError(f"LocalPipeline: stages {counts!r} sums to {sum(counts)}, not K={K}")
    return counts
