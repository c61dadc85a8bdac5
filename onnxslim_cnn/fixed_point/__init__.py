"""Fixed-point IR (``ir``) and its bit-exact numpy simulator (``simulate``); see docs/fixed_point_ir.md.

``simulate`` is the simulator module (``simulate.simulate``, ``simulate.quantize_inputs``,
``simulate.requantize`` ...): it is not shadowed by its main function, which is exported here as
``simulate_model``, next to ``run_float`` and ``quantize_inputs``.
"""

from . import ir, simulate
from .ir import FixedFormat, FixedPointModel, Layer, Tensor, load, save
from .simulate import quantize_inputs, run_float
from .simulate import simulate as simulate_model

__all__ = ["FixedFormat", "FixedPointModel", "Layer", "Tensor", "ir", "load", "quantize_inputs", "run_float", "save",
           "simulate", "simulate_model"]
