"""sparsify: unstructured magnitude pruning of weights, with least-squares refit and a
layer-wise ratio search."""

from .sparsify import SparsifyPass

__all__ = ["SparsifyPass"]
