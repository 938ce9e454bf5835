"""Models whose training-mode forward returns auxiliary classifier outputs beside the logits.

torchvision's ``googlenet`` and ``inception_v3`` are built with ``aux_logits=True`` by default.
In training mode their forward returns a named tuple, ``GoogLeNetOutputs(logits, aux_logits2,
aux_logits1)`` or ``InceptionOutputs(logits, aux_logits)``: the main classifier's logits and
those of the *auxiliary classifiers* that the original papers (Szegedy et al., CVPR 2015,
Sec. 5; CVPR 2016, Sec. 4) add to the loss with weight 0.3. In eval mode both return the
logits alone.

Greedy local learning already gives every local module its own auxiliary head, so
:func:`keep_main_logits` keeps the main logits as the traced model's output, removes the
auxiliary classifiers from the graph (their parameters are not part of the local modules and
are not trained) and says so once with a :class:`UserWarning` naming ``aux_logits=False``,
which builds the same network without them and silences the warning. The trained network then
computes exactly what the model computes in eval mode. Any other output that is not one
tensor (a plain tuple, a list, a dict, a named tuple without a ``logits`` field) is refused
with a :class:`ValueError`: which of its entries are the logits is not known.
"""
from __future__ import annotations

import warnings

import torch.fx as fx

__all__ = ["keep_main_logits"]


def _named_tuple_fields(node: fx.Node):
    """The ``_fields`` of the named-tuple class that ``node`` constructs, else None."""
    if node.op == "call_function" and isinstance(node.target, type) and issubclass(node.target, tuple):
        return getattr(node.target, "_fields", None)
    return None


def keep_main_logits(gm: fx.GraphModule, model_name: str) -> fx.GraphModule:
    """Make a traced model return its main logits when it returns auxiliary outputs too.

    Args:
        gm: the model traced by :func:`contsup_fast.splitting.trace` (training mode); edited
            in place.
        model_name: the model's class name, for the messages.

    Returns:
        ``gm`` itself. Unchanged when its output is one value; when it is a named tuple with a
        ``logits`` field (torchvision's ``GoogLeNetOutputs``, ``InceptionOutputs``), the output
        becomes that field, the nodes only the other fields used are deleted, the submodules
        no node calls any more are deleted, and one :class:`UserWarning` names the dropped
        outputs and ``aux_logits=False``.

    Raises:
        ValueError: the output is several values of which none is named ``logits``.
    """
    (output,) = [n for n in gm.graph.nodes if n.op == "output"]
    result = output.args[0]
    fields = _named_tuple_fields(result) if isinstance(result, fx.Node) else None
    if isinstance(result, fx.Node) and fields is None:
        return gm
    if fields is None or "logits" not in fields:
        kind = type(result).__name__ if not isinstance(result, fx.Node) else result.target.__name__
        raise ValueError(
            f"model {model_name} returns several outputs in training mode ({kind}"
            f"{'(' + ', '.join(fields) + ')' if fields else ''}), not one logits tensor; "
            f"LocalSequential needs a model whose forward returns logits (N, classes) only "
            f"(torchvision's googlenet/inception_v3: build them with aux_logits=False)")
    values = dict(zip(fields, result.args))
    values.update(result.kwargs)
    dropped = [f for f in fields if f != "logits"]
    output.args = (values["logits"],)
    gm.graph.eliminate_dead_code()
    gm.delete_all_unused_submodules()
    gm.recompile()
    warnings.warn(
        f"model {model_name} returns {result.target.__name__}({', '.join(fields)}) in training mode; "
        f"LocalSequential trains on 'logits' only and leaves out the auxiliary classifiers' outputs "
        f"{', '.join(dropped)} (their parameters are not trained: every local module has its own "
        f"auxiliary head). Build the model with aux_logits=False to get the same network without "
        f"them and no warning.", UserWarning, stacklevel=4)
    return gm
