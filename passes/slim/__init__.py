"""slim: exact clean-up (constant folding, no-op removal, BN/Pad fusion, CSE, dead code)."""

from .slim import SlimPass

__all__ = ["SlimPass"]
