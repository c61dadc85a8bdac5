"""Import of a ``q8`` (QDQ) model into the fpga lowering: its scales, constrained to powers of two.

ONNX Runtime's QDQ model is the float graph with ``DequantizeLinear`` on int8 weights and a
``QuantizeLinear -> DequantizeLinear`` pair on activations. ``strip_qdq`` turns it back into a
float graph (weights dequantized exactly as ORT does: ``(q - zero_point) * scale``), and returns
for each quantized activation its scale and representable range ``[(qmin - zp) s, (qmax - zp) s]``,
and for each weight its (per-channel) scales. ORT drops a Relu into the range of the quantizer
before it (a u8 tensor with zero point 0 cannot be negative); ``strip_qdq`` puts the Relu back,
which is exactly what the QDQ model computes.

``po2_formats`` then gives each tensor the ap_fixed format whose step is the smallest power of
two >= the q8 scale and whose range covers the q8 range (so 8 bits, 9 only where a zero point
splits a u8 range around 0: ap_fixed has no zero point), and each weight the step from its
largest per-channel scale.
Integer multiplier + shift (non-power-of-two scales) needs a scaled-integer tensor type the IR
does not have; the pass says so.
"""

from __future__ import annotations

import math

import numpy as np
import onnx
from onnx import helper, numpy_helper

from onnxslim_cnn.fixed_point.ir import FixedFormat, integer_bits


def _const_dq(node, inits) -> bool:
    return node.op_type == "DequantizeLinear" and node.input[0] in inits


def strip_qdq(model: onnx.ModelProto) -> tuple[onnx.ModelProto, dict, dict]:
    """(float model, {activation: (scale, lo, hi)}, {weight tensor of the float model: max scale})."""
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    nodes = list(model.graph.node)
    outputs = {o.name for o in model.graph.output}
    new_inits: dict[str, np.ndarray] = {}
    weight_scale: dict[str, float] = {}
    ranges: dict[str, tuple[float, float, float]] = {}
    rename: dict[str, str] = {}
    keep = []
    q_by_output = {n.output[0]: n for n in nodes if n.op_type == "QuantizeLinear"}
    for n in nodes:
        if _const_dq(n, inits):
            q = inits[n.input[0]].astype(np.float64)
            scale = inits[n.input[1]].astype(np.float64)
            zp = inits[n.input[2]].astype(np.float64) if len(n.input) > 2 and n.input[2] else np.zeros_like(scale)
            axis = next((a.i for a in n.attribute if a.name == "axis"), 1)
            if scale.ndim:
                shape = [1] * q.ndim
                shape[axis] = -1
                scale, zp = scale.reshape(shape), zp.reshape(shape)
            new_inits[n.output[0]] = ((q - zp) * scale).astype(np.float32)
            weight_scale[n.output[0]] = float(np.max(scale))
        elif n.op_type == "DequantizeLinear" and n.input[0] in q_by_output:
            qn = q_by_output[n.input[0]]
            x = qn.input[0]
            scale = float(inits[qn.input[1]])
            zp_arr = inits[qn.input[2]] if len(qn.input) > 2 and qn.input[2] else np.zeros((), np.uint8)
            info = np.iinfo(zp_arr.dtype)
            zp = int(zp_arr)
            ranges[x] = (scale, (info.min - zp) * scale, (info.max - zp) * scale)
            rename[n.output[0]] = x
        elif n.op_type == "QuantizeLinear":
            continue
        else:
            keep.append(n)
    # a DQ output that is a graph output keeps its name: the float tensor takes it
    for dq_out, x in list(rename.items()):
        if dq_out in outputs:
            rename = {k: (dq_out if v == x else v) for k, v in rename.items()}
            rename[x] = dq_out
            ranges[dq_out] = ranges.pop(x)
    producers = {}
    out_nodes = []
    for n in keep:
        m = onnx.NodeProto()
        m.CopyFrom(n)
        for i, name in enumerate(m.input):
            m.input[i] = rename.get(name, name)
        for i, name in enumerate(m.output):
            m.output[i] = rename.get(name, name)
        out_nodes.append(m)
        producers[m.output[0]] = m
    # put back the Relu that ORT folded into a quantizer whose range starts at 0
    final = []
    for m in out_nodes:
        final.append(m)
        t = m.output[0]
        if t in ranges and ranges[t][1] == 0.0 and m.op_type not in ("Relu", "Clip", "MaxPool", "Flatten",
                                                                      "GlobalAveragePool", "AveragePool", "Concat"):
            m.output[0] = t + "_before_relu"
            final.append(helper.make_node("Relu", [m.output[0]], [t], name=t + "_relu"))
    g = model.graph
    used = {i for n in final for i in n.input}
    init_list = [numpy_helper.from_array(v, k) for k, v in new_inits.items()]
    init_list += [t for t in g.initializer if t.name in used and t.name not in new_inits]
    graph = helper.make_graph(final, g.name, list(g.input), list(g.output), init_list)
    out = helper.make_model(graph, opset_imports=list(model.opset_import))
    out.ir_version = model.ir_version
    return out, ranges, weight_scale


def po2_step(scale: float) -> int:
    """Fraction bits of the smallest power-of-two step >= ``scale``: the q8 range then still fits
    in the q8 word length (a finer step would need a 9th bit)."""
    return math.floor(-math.log2(scale) + 1e-9)


def po2_formats(ranges: dict) -> dict[str, FixedFormat]:
    formats = {}
    for name, (scale, lo, hi) in ranges.items():
        signed = lo < 0
        frac = po2_step(scale)
        integer = integer_bits(max(abs(lo), abs(hi)), signed)
        formats[name] = FixedFormat(signed, max(integer + frac, 2), integer)
    return formats
