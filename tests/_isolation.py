"""Shared check of gradient isolation (used by the CNN and the transformer tests)."""
import torch


def assert_isolated(local, x, y, j: int = 1) -> None:
    """Module ``j``'s gradients from a training step ``local(x, y)`` do not change when every
    later module's weights change (the local losses are gradient-isolated)."""
    def grads():
        return {k: p.grad.clone() for k, p in local[j].named_parameters() if p.grad is not None}

    local(x, y)
    before = grads()
    local.zero_grad(set_to_none=True)
    with torch.no_grad():  # change every later module's weights
        for m in list(local)[j + 1:]:
            for p in m.parameters():
                p.add_(torch.randn_like(p))
    local(x, y)
    after = grads()
    assert before.keys() == after.keys() and before
    for k in before:
        assert torch.equal(before[k], after[k]), k
