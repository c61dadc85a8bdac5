"""Fixed-point IR (``ir``) and its bit-exact numpy simulator (``simulate``); see docs/fixed_point_ir.md."""

from .ir import FixedFormat, FixedPointModel, Layer, Tensor, load, save
from .simulate import run_float, simulate

__all__ = ["FixedFormat", "FixedPointModel", "Layer", "Tensor", "load", "save", "run_float", "simulate"]
