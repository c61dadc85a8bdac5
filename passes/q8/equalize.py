"""Float-graph rewrites that ``q8`` runs before ONNX Runtime's tool inserts QDQ.

* **Cross-layer equalization** (Nagel et al. 2019, "Data-Free Quantization", sec. 4.1): for two
  weight layers in a chain ``P -> (ReLU-like, pooling) -> C``, output channel ``i`` of ``P`` is
  divided by ``s_i`` and input channel ``i`` of ``C`` multiplied by it. Everything between them
  is positively homogeneous (``f(x / s) = f(x) / s`` for ``s > 0``), so the float model computes
  the same function, while ``s_i = sqrt(r1_i / r2_i)`` (``r1``: range of ``P``'s output channel,
  ``r2``: range of ``C``'s input channel) makes both ranges ``sqrt(r1_i * r2_i)``: no channel of
  either weight is left with a tiny range next to a large one, which is what per-tensor (and, for
  ``C``, per-output-channel) int8 rounding loses. Chains through a depthwise conv (MobileNet's
  conv -> dw -> conv) give two overlapping pairs; they are iterated to a fixed point as in the
  paper. ReLU6 / HardSwish / SiLU are not positively homogeneous, so pairs through them are left
  as they are (and reported), unlike the paper, which replaced ReLU6 by ReLU and so changed the
  model.
* **Bias correction** (same paper, sec. 4.2, empirical variant): int8 rounding of a weight ``W``
  to ``W_q`` shifts the layer's expected output by ``E[(W_q - W) x]`` per output channel. It is
  measured on the calibration inputs in one ORT run: every corrected layer gets a twin node with
  weight ``W_q - W`` and no bias, followed by a mean over all but the channel axis, exposed as an
  extra output. The shift is subtracted from the bias (a zero bias is added where there was none).
  ``W_q`` is computed exactly as ORT's tool will (symmetric int8, range [-127, 127], scale
  ``max|W| / 127`` per output channel, round half to even), so the correction cancels the
  rounding the deployed model really has; the test checks it against the tool's DequantizeLinear.

Both are rewrites of the float graph: ORT's ``quantize_static`` still inserts every QDQ node.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import helper, numpy_helper

from onnxslim_cnn.graph import Graph, constant_value, node_label

# Ops between the two layers of a pair: f(x / s) = f(x) / s per channel for s > 0.
_HOMOGENEOUS = {"Relu", "LeakyRelu", "PRelu", "MaxPool", "AveragePool", "GlobalAveragePool",
                "GlobalMaxPool", "Identity", "Dropout"}
_NOT_HOMOGENEOUS = {"Clip": "Clip (ReLU6) is not positively homogeneous",
                    "HardSwish": "HardSwish is not positively homogeneous",
                    "HardSigmoid": "HardSigmoid is not positively homogeneous",
                    "Sigmoid": "Sigmoid is not positively homogeneous"}


# ----------------------------------------------------------------------------- layer views


@dataclass
class _Layer:
    """A Conv/Gemm with a constant weight, seen per output channel and per input channel."""

    node: gs.Node
    weight: np.ndarray  # float64 working copy, written back at the end
    bias: "np.ndarray | None"
    out_axis: int
    in_axis: "int | None"  # None: depthwise (input channel c is output channel c)
    depthwise: bool = False

    @property
    def out_channels(self) -> int:
        return self.weight.shape[self.out_axis]

    def in_channels(self) -> int:
        return self.out_channels if self.depthwise else self.weight.shape[self.in_axis]


def _layer(node: gs.Node) -> "_Layer | str":
    """The node as a `_Layer`, or why it cannot be one."""
    if node.op not in ("Conv", "Gemm") or len(node.inputs) < 2:
        return f"{node.op} is not a Conv/Gemm"
    w = constant_value(node.inputs[1])
    if w is None or w.dtype not in (np.float32, np.float64):
        return "weight is not a float constant"
    b = constant_value(node.inputs[2]) if len(node.inputs) > 2 and node.inputs[2] is not None else None
    if len(node.inputs) > 2 and node.inputs[2] is not None and b is None:
        return "bias is not a constant"
    if node.op == "Conv":
        group = int(node.attrs.get("group", 1))
        depthwise = group > 1 and w.shape[1] == 1 and w.shape[0] == group
        if group > 1 and not depthwise:
            return "grouped (non-depthwise) conv"
        return _Layer(node, w.astype(np.float64), None if b is None else b.astype(np.float64).ravel(),
                      0, None if depthwise else 1, depthwise)
    if node.attrs.get("transA", 0) or w.ndim != 2:
        return "Gemm with transA or a non-2-D weight"
    trans_b = int(node.attrs.get("transB", 0))
    n_out = w.shape[0] if trans_b else w.shape[1]
    if b is not None and b.size not in (1, n_out) or b is not None and b.size == 1 and n_out != 1:
        return "Gemm bias is not per output channel"
    return _Layer(node, w.astype(np.float64), None if b is None else b.astype(np.float64).ravel(),
                  0 if trans_b else 1, 1 if trans_b else 0)


def _out_range(layer: _Layer) -> np.ndarray:
    axes = tuple(a for a in range(layer.weight.ndim) if a != layer.out_axis)
    return np.abs(layer.weight).max(axis=axes)


def _in_range(layer: _Layer, spatial: int) -> np.ndarray:
    """Range of each input channel of ``layer``; ``spatial``: features per channel after a Flatten."""
    if layer.depthwise:
        return _out_range(layer)
    w = np.moveaxis(layer.weight, layer.in_axis, 0)
    w = w.reshape(w.shape[0] // spatial, spatial, -1)
    return np.abs(w).max(axis=(1, 2))


def _scale_out(layer: _Layer, s: np.ndarray) -> None:
    shape = [1] * layer.weight.ndim
    shape[layer.out_axis] = -1
    layer.weight /= s.reshape(shape)
    if layer.bias is not None:
        layer.bias /= s


def _scale_in(layer: _Layer, s: np.ndarray, spatial: int) -> None:
    if layer.depthwise:
        layer.weight *= s.reshape([-1] + [1] * (layer.weight.ndim - 1))
        return
    w = np.moveaxis(layer.weight, layer.in_axis, 0)
    shape = w.shape
    w = w.reshape(shape[0] // spatial, spatial, -1) * s[:, None, None]
    layer.weight = np.moveaxis(w.reshape(shape), 0, layer.in_axis).copy()


# ----------------------------------------------------------------------------- pairs


@dataclass
class Pair:
    first: str
    second: str
    via: list  # op types between them
    spatial: int  # features per channel at the second layer's input (Flatten before a Gemm)


def _follow(graph: Graph, node: gs.Node) -> "tuple[gs.Node, list, int] | str":
    """From ``node``'s output through homogeneous single-consumer ops to the next weight layer."""
    t = node.outputs[0]
    via, spatial = [], 1
    while True:
        if graph.is_graph_output(t):
            return "output is a graph output"
        users = graph.consumers(t)
        if len(users) != 1:
            return f"output feeds {len(users)} nodes"
        nxt = users[0]
        if nxt.op in ("Conv", "Gemm") and nxt.inputs[0] is t:
            return nxt, via, spatial
        if nxt.op == "Flatten" and int(nxt.attrs.get("axis", 1)) == 1 and t.shape and len(t.shape) >= 2:
            dims = t.shape[2:]
            if not all(isinstance(d, int) for d in dims):
                return "Flatten of a tensor with unknown spatial size"
            spatial *= int(np.prod(dims)) if dims else 1
        elif nxt.op == "Pad":
            why = _pad_problem(nxt)
            if why:
                return why
        elif nxt.op in _HOMOGENEOUS:
            if nxt.op == "PRelu" and constant_value(nxt.inputs[1]) is None:
                return "PRelu with a variable slope"
        else:
            return _NOT_HOMOGENEOUS.get(nxt.op, f"{nxt.op} between the layers")
        if spatial > 1 and nxt.op != "Flatten":
            return f"{nxt.op} after a Flatten"
        via.append(nxt.op)
        t = nxt.outputs[0]


def _pad_problem(node: gs.Node) -> "str | None":
    """Why a Pad breaks the pair (None: zero padding of spatial axes only, which commutes)."""
    if node.attrs.get("mode", "constant") != "constant":
        return "Pad in reflect/edge mode"
    value = constant_value(node.inputs[2]) if len(node.inputs) > 2 and node.inputs[2] is not None else None
    if value is not None and np.any(value != 0):
        return "Pad with a non-zero value"
    pads = node.attrs.get("pads") if len(node.inputs) < 2 else constant_value(node.inputs[1])
    if pads is None or len(node.inputs) > 3:
        return "Pad with variable pads or axes"
    pads = np.asarray(pads).ravel()
    rank = pads.size // 2
    if rank < 2 or pads[1] != 0 or pads[1 + rank] != 0 or pads[0] != 0 or pads[rank] != 0:
        return "Pad on the batch or channel axis"
    return None


def find_pairs(graph: Graph, exclude: "set[str]" = frozenset()) -> tuple[list[Pair], list[tuple[str, str]]]:
    """Equalizable (first, second) layer pairs, and (layer, reason) for layers that start none."""
    pairs, skipped = [], []
    for node in graph.nodes:
        if node.op not in ("Conv", "Gemm"):
            continue
        first = _layer(node)
        if isinstance(first, str):
            skipped.append((node_label(node), first))
            continue
        found = _follow(graph, node)
        if isinstance(found, str):
            skipped.append((node_label(node), found))
            continue
        nxt, via, spatial = found
        second = _layer(nxt)
        if isinstance(second, str):
            skipped.append((node_label(node), f"next layer {node_label(nxt)}: {second}"))
            continue
        if {node_label(node), node_label(nxt)} & exclude:
            skipped.append((node_label(node), "kept in float"))
            continue
        wanted = first.out_channels if second.depthwise else first.out_channels * spatial
        if second.in_channels() != wanted:
            skipped.append((node_label(node), "channel counts do not match"))
            continue
        pairs.append(Pair(node_label(node), node_label(nxt), via, spatial))
    return pairs, skipped


def equalize(graph: Graph, exclude: "set[str]" = frozenset(), iterations: int = 100,
             tol: float = 1e-3) -> tuple[list[dict], list[tuple[str, str]]]:
    """Equalize every pair in ``graph`` (in place). Returns per-pair records and skipped layers."""
    pairs, skipped = find_pairs(graph, exclude)
    if not pairs:
        return [], skipped
    by_name = {node_label(n): n for n in graph.nodes}
    layers: dict[str, _Layer] = {}
    for p in pairs:
        for name in (p.first, p.second):
            if name not in layers:
                layers[name] = _layer(by_name[name])
    before = {id(p): (_out_range(layers[p.first]),) for p in pairs}
    for _ in range(iterations):
        worst = 0.0
        for p in pairs:
            a, b = layers[p.first], layers[p.second]
            r1, r2 = _out_range(a), _in_range(b, p.spatial)
            ok = (r1 > 0) & (r2 > 0)
            s = np.ones_like(r1)
            s[ok] = np.sqrt(r1[ok] / r2[ok])
            _scale_out(a, s)
            _scale_in(b, s, p.spatial)
            worst = max(worst, float(np.max(np.abs(np.log(s)))))
        if worst < tol:
            break
    for name, layer in layers.items():
        node = by_name[name]
        old_w = node.inputs[1]
        graph.replace_constant(node, 1, layer.weight.astype(old_w.values.dtype), hint=f"{name}_w_eq")
        if layer.bias is not None:
            old_b = node.inputs[2]
            graph.replace_constant(node, 2, layer.bias.astype(old_b.values.dtype).reshape(old_b.shape),
                                   hint=f"{name}_b_eq")
    records = []
    for p in pairs:
        r1_0 = before[id(p)][0]
        r1, r2 = _out_range(layers[p.first]), _in_range(layers[p.second], p.spatial)
        records.append({"first": p.first, "second": p.second, "via": p.via, "channels": int(r1.size),
                        "range_ratio_before": float(np.max(r1_0) / max(np.min(r1_0[r1_0 > 0], initial=np.inf), 1e-30)),
                        "range_ratio_after": float(np.max(r1) / max(np.min(r1[r1 > 0], initial=np.inf), 1e-30)),
                        "max_range_mismatch": float(np.max(np.abs(np.log((r1 + 1e-30) / (r2 + 1e-30)))))})
    return records, skipped


# ----------------------------------------------------------------------------- bias correction


def quantize_weight_like_ort(w: np.ndarray, axis: "int | None") -> np.ndarray:
    """``w`` after ORT's symmetric int8 quantize/dequantize (per channel along ``axis``, else per tensor).

    Mirrors onnxruntime.quantization.quant_utils: qrange [-127, 127], scale = max|w| / 127
    computed in float32, values rounded half to even; an all-zero channel gets scale 1.
    """
    w32 = w.astype(np.float32)
    if axis is None:
        absmax = np.abs(w32).max(keepdims=True)
    else:
        absmax = np.abs(w32).max(axis=tuple(a for a in range(w.ndim) if a != axis), keepdims=True)
    scale = (absmax.astype(np.float32) * np.float32(2.0) / np.float32(254.0)).astype(np.float32)
    scale[scale < np.finfo(np.float32).tiny] = 1.0
    q = np.clip(np.round(w32 / scale), -127, 127)
    return (q * scale).astype(np.float32)


def weight_axis(node: onnx.NodeProto) -> int:
    """Output-channel axis ORT's QDQ quantizer uses for this node's weight (Conv/Gemm/MatMul)."""
    if node.op_type == "Gemm":
        trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0)
        return 0 if trans_b else 1
    return 1 if node.op_type == "MatMul" else 0


def bias_correct(model: onnx.ModelProto, calib, per_channel: bool, exclude: "set[str]" = frozenset(),
                 ) -> tuple[onnx.ModelProto, list[dict], list[tuple[str, str]]]:
    """A copy of ``model`` with each Conv/Gemm bias reduced by its expected int8 rounding shift.

    One ORT run over ``calib`` measures all shifts (see the module docstring). Returns the new
    model, one record per corrected layer and (layer, reason) for those left alone.
    """
    from onnxslim_cnn.sessions import make_session, run_chunks

    inits = {t.name: t for t in model.graph.initializer}
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 13)
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    targets, skipped = [], []
    for node in model.graph.node:
        if node.op_type not in ("Conv", "Gemm"):
            continue
        name = node.name
        if name in exclude:
            skipped.append((name, "kept in float"))
            continue
        if len(node.input) < 2 or node.input[1] not in inits:
            skipped.append((name, "weight is not an initializer"))
            continue
        w = numpy_helper.to_array(inits[node.input[1]])
        if w.dtype != np.float32:
            skipped.append((name, "weight is not float32"))
            continue
        if node.op_type == "Gemm" and next((a.i for a in node.attribute if a.name == "transA"), 0):
            skipped.append((name, "Gemm with transA"))
            continue
        beta = next((a.f for a in node.attribute if a.name == "beta"), 1.0) if node.op_type == "Gemm" else 1.0
        if beta == 0:  # Gemm ignores C: no bias can carry the correction
            skipped.append((name, "Gemm with beta=0"))
            continue
        has_bias = len(node.input) > 2 and node.input[2] != ""
        if has_bias and node.input[2] not in inits:
            skipped.append((name, "bias is not an initializer"))
            continue
        axis = weight_axis(node)
        n_out = w.shape[axis]
        if has_bias and numpy_helper.to_array(inits[node.input[2]]).size != n_out:
            skipped.append((name, "bias is not per output channel"))
            continue
        err = quantize_weight_like_ort(w, axis if per_channel else None) - w
        err_name = f"{name}__bc_err"
        probe.graph.initializer.append(numpy_helper.from_array(err, err_name))
        twin = helper.make_node(node.op_type, [node.input[0], err_name], [f"{name}__bc_y"], name=f"{name}__bc")
        twin.attribute.extend(a for a in node.attribute if a.name not in ("beta",))
        # mean over every axis but the channel one: axis 1 for Conv, the last for Gemm
        rank = len(w.shape) if node.op_type == "Conv" else 2
        axes = [a for a in range(rank) if a != (1 if node.op_type == "Conv" else rank - 1)]
        mean_out = f"{name}__bc_mean"
        if opset >= 18:
            axes_name = f"{name}__bc_axes"
            probe.graph.initializer.append(numpy_helper.from_array(np.array(axes, np.int64), axes_name))
            red = helper.make_node("ReduceMean", [twin.output[0], axes_name], [mean_out], keepdims=0)
        else:
            red = helper.make_node("ReduceMean", [twin.output[0]], [mean_out], axes=axes, keepdims=0)
        probe.graph.node.extend([twin, red])
        probe.graph.output.append(helper.make_tensor_value_info(mean_out, onnx.TensorProto.FLOAT, None))
        targets.append((node, mean_out, has_bias, beta))
    if not targets:
        return model, [], skipped
    sess = make_session(probe)
    names = [t[1] for t in targets]
    chunks = run_chunks(sess, calib.inputs, calib.batch, output_names=names)
    sizes = [len(next(iter(calib.inputs.values()))[i:i + max(calib.batch, 1)])
             for i in range(0, calib.samples, max(calib.batch, 1))]
    out = onnx.ModelProto()
    out.CopyFrom(model)
    out_inits = {t.name: t for t in out.graph.initializer}
    used = {}
    for n in model.graph.node:
        for i in n.input:
            used[i] = used.get(i, 0) + 1
    by_name = {n.name: n for n in out.graph.node}
    records = []
    for k, (node, _, has_bias, beta) in enumerate(targets):
        # Gemm adds beta * C, so C moves by shift / beta
        shift = sum(c[k].astype(np.float64) * s for c, s in zip(chunks, sizes)) / sum(sizes) / beta
        dst = by_name[node.name]
        if has_bias:
            old = numpy_helper.to_array(out_inits[node.input[2]])
            new = (old.astype(np.float64).ravel() - shift).astype(old.dtype).reshape(old.shape)
        else:
            new = (-shift).astype(np.float32)
        if has_bias and used.get(node.input[2], 0) == 1:
            out_inits[node.input[2]].CopyFrom(numpy_helper.from_array(new, node.input[2]))
        else:
            bname = f"{node.name}__bias_corrected"
            out.graph.initializer.append(numpy_helper.from_array(new, bname))
            while len(dst.input) < 3:
                dst.input.append("")
            dst.input[2] = bname
        records.append({"layer": node.name, "max_abs_shift": float(np.max(np.abs(shift))),
                        "added_bias": not has_bias})
    return out, records, skipped
