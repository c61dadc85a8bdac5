"""prune: structured filter pruning with BN channel removal, and its training-free recovery."""

from .prune import PrunePass

__all__ = ["PrunePass"]
