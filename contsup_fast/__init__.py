"""contsup_fast: memory-efficient greedy local learning with context supply (ContSup).

    from contsup_fast import LocalSequential
    local = LocalSequential(model, K=16, context="RnE")
    out = local(x, y)      # every local module: forward, local loss, backward; activations freed

See README.md for the method, the fused boundary kernels and the training CLI.
"""
from .context import ContextSpec, parse_context
from .local import ContSupInference, LocalModule, LocalOutput, LocalSequential
from .splitting import UnsplittableModelError

__version__ = "0.1.0"

__all__ = ["LocalSequential", "LocalModule", "LocalOutput", "ContSupInference", "ContextSpec",
           "parse_context", "UnsplittableModelError", "__version__"]
