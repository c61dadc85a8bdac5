"""Pass ``fpga``: lower a CNN to the fixed-point IR (``onnxslim_cnn.fixed_point``). The
``onnxslim fpga IN.onnx OUTDIR`` command that writes the IR, C++, hls4ml config and resources is
``onnxslim_cnn/fpga_cli.py``, in the CLI layer.

The pass leaves the ONNX graph as it is: what it produces is the IR and its per-layer table,
returned in ``PassResult.artifacts['fpga']`` (a pass never writes files). BatchNormalization is
folded first by ``slim``; formats come from the activations on the calibration inputs
(``--calib``), see ``fpga.lower``, or, for a ``q8`` (QDQ) input, from its scales (``fpga.qdq``).
"""

from __future__ import annotations

import dataclasses
import json
import math

import onnx

from onnxslim_cnn.errors import UserError
from onnxslim_cnn.fixed_point.ir import ROUNDING, SATURATION, FixedPointModel
from onnxslim_cnn.options import option
from onnxslim_cnn.context import PassContext
from onnxslim_cnn.pass_infra import ModelPass, PassResult, register_pass

from .lower import LowerConfig, activation_names, check_supported, lower
from .qdq import po2_formats, po2_step, strip_qdq
from .resources import layer_table


@dataclasses.dataclass(frozen=True)
class FpgaOptions:
    bits: int = option(16, "word length W of activations (and weights unless weight_bits is set)", min=2, max=32)
    weight_bits: int = option(0, "word length of weights; 0 = same as bits", min=0, max=32)
    margin: float = option(0.0, "headroom on the calibration max |x| before choosing integer bits (0.5 = +50%)",
                           min=0.0, max=100.0)
    rounding: str = option("round_half_up", "rounding of every requant (hls4ml AP_TRN / AP_RND / AP_RND_CONV)",
                           choices=ROUNDING)
    saturation: str = option("sat", "overflow handling of every requant (AP_SAT / AP_WRAP)", choices=SATURATION)
    layer_bits: dict[str, int] = option({}, "per-layer word length by ONNX node name, like hls4ml granularity=name "
                                            "(e.g. conv1:16,fc:8)")
    reuse_factor: int = option(1, "multiplies per multiplier (hls4ml ReuseFactor) for the resource estimate", min=1)
    po2: bool = option(True, "for a q8 (QDQ) input: take its scales rounded to powers of two (false, integer "
                             "multiplier + shift, is not implemented)")


@dataclasses.dataclass
class FpgaLowering:
    """What the pass produces: the IR, the BN-folded float model it came from, the per-layer table."""

    ir: FixedPointModel
    folded: object  # onnx.ModelProto
    table: list[dict]
    warnings: list[str] = dataclasses.field(default_factory=list)


@register_pass
class FpgaPass(ModelPass):
    name = "fpga"
    summary = ("Lower the CNN to a fixed-point integer IR (ap_fixed formats from calibration ranges, BN folded, "
               "accumulators that never overflow); the ONNX model is unchanged, the IR and its per-layer "
               "SQNR/resource table are the result. `onnxslim fpga IN.onnx OUTDIR` writes IR, C++17, hls4ml YAML.")
    Options = FpgaOptions
    modifies = frozenset()
    always_uses_calibration = True  # formats come from the activation ranges
    # lower_model(require_calibration=True), for `onnxslim fpga`, which runs no pipeline (the
    # pipeline refuses lossy passes without data before they start); checked once the model is
    # known to lower, so an unsupported model is named first
    require_calibration = False
    lossy = True

    def run(self, model: onnx.ModelProto, ctx: PassContext) -> PassResult:
        from ..q8 import is_quantized
        from ..slim import SlimPass

        o = self.options
        result = PassResult()
        cfg = LowerConfig(bits=o.bits, weight_bits=o.weight_bits, margin=o.margin, rounding=o.rounding,
                          saturation=o.saturation, layer_bits=dict(o.layer_bits))
        if is_quantized(model):
            if not o.po2:
                raise UserError("fpga: importing QDQ scales as integer multiplier + shift (fpga.po2=false) is not "
                                "implemented; use fpga.po2=true or give the float model")
            if any(n.op_type not in ("QuantizeLinear", "DequantizeLinear") and n.op_type.startswith(("QLinear", "Q"))
                   or n.op_type in ("DynamicQuantizeLinear", "MatMulInteger", "ConvInteger") for n in model.graph.node):
                raise UserError("fpga: only QDQ models (QuantizeLinear/DequantizeLinear pairs, q8's format) are "
                                "imported, not QOperator or dynamic quantization")
            folded, ranges, weight_scales = strip_qdq(model)
            cfg.formats = po2_formats(ranges)
            cfg.weight_frac = {k: po2_step(v) for k, v in weight_scales.items()}
            result.count("qdq_formats_imported", len(cfg.formats))
        else:
            folded, _ = SlimPass().apply(model)
        check_supported(folded)
        if self.require_calibration and not ctx.calibration_given:
            raise UserError("onnxslim fpga needs calibration data for its number formats: --calib FILE.npz or "
                            "--calib IMAGE_DIR --preprocess PRESET (or --calib random to accept unverified formats)")
        acts = ctx.activations(folded, activation_names(folded))
        unknown = sorted(set(cfg.layer_bits) - {n.name for n in folded.graph.node})
        if unknown:
            raise UserError(f"fpga.layer_bits names no node of the (BN-folded) model: {', '.join(unknown)}")
        ir = lower(folded, acts, cfg)
        table = layer_table(ir, acts, o.reuse_factor)
        result.artifacts["fpga"] = FpgaLowering(ir, folded, table)
        finite = [r["sqnr_db"] for r in table if r["sqnr_db"] is not None and math.isfinite(r["sqnr_db"])]
        result.stats.update(fpga_layers=len(ir.layers), weight_bits=sum(r["weight_bits"] for r in table),
                            multipliers=sum(r["multipliers"] for r in table),
                            min_sqnr_db=round(min(finite), 2) if finite else None)
        return result


def lower_model(model, *, calib=None, options: "dict | None" = None, input_shapes=None, seed: int = 0,
                preprocess=None, require_calibration: bool = False) -> FpgaLowering:
    """API: run the fpga pass on a model (path or ModelProto) and return its lowering. ``calib``
    as for ``compress`` (an .npz, an image folder with ``preprocess``, arrays, or "random");
    ``require_calibration``: refuse the default generator, as ``onnxslim fpga`` does (formats
    chosen from the ranges of noise are wrong for real inputs)."""
    from onnxslim_cnn.model_io import load_model

    original = load_model(model)
    ctx = PassContext(original, calib=calib, input_shapes=input_shapes, seed=seed, preprocess=preprocess)
    fpga = FpgaPass(options)
    fpga.require_calibration = require_calibration
    result = fpga.run(original, ctx)
    lowering = result.artifacts["fpga"]
    lowering.warnings = list(ctx.warnings)
    return lowering


OUTPUT_NAMES = ("model.json", "weights.npz", "hls4ml_config.yaml", "resources.json", "model.h", "model.cpp",
                "model_main.cpp")


def output_files(lowering: FpgaLowering, reuse_factor: int = 1) -> dict[str, bytes]:
    """Every file ``onnxslim fpga`` writes, built in memory first so that an error writes nothing."""
    from .emit_cpp import emit_cpp
    from .resources import hls4ml_config

    ir = lowering.ir
    files = {"model.json": ir.to_json().encode(), "weights.npz": ir.weights_npz(),
             "hls4ml_config.yaml": hls4ml_config(ir, reuse_factor).encode(),
             "resources.json": json.dumps({"reuse_factor": reuse_factor, "layers": lowering.table},
                                          indent=1, default=str).encode()}
    files.update({k: v.encode() for k, v in emit_cpp(ir, reuse_factor).items()})
    return files
