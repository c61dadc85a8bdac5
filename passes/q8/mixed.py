"""Mixed precision for ``q8``: which layers to keep in float (``keep_float=auto``).

1. ORT's tool quantizes the whole model once. Every node it quantized (a node reading a
   DequantizeLinear output) is a candidate.
2. Sensitivity of a candidate: the float model with *only that node* quantized exactly as in the
   full model (its activation inputs pass through the Q/DQ pairs, its weights and bias are the
   int8 values, with the scales the tool wrote), run on the calibration inputs; sensitivity =
   1 - the least cosine similarity of any model output to float. One forward pass per
   candidate, no re-calibration. Its output's rounding belongs to the consumers' inputs.
3. Candidates are taken in order of sensitivity: each is tried float on top of those already
   kept (the tool's ``nodes_to_exclude`` plus `float_islands`) and kept only when the least
   cosine of the real QDQ model on the calibration inputs rises, until the budget is met, or
   ``max_layers`` are kept, or ``2 * max_layers`` were tried. The report's cosine is the one
   measured for the model returned; when the budget is missed, the report says so.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import numpy as np
import onnx
from onnx import helper, numpy_helper

from onnxslim_cnn.analysis.compare import least_cosine, outputs

_QDQ = {"QuantizeLinear", "DequantizeLinear"}
# Activations ORT fuses into the layer before them: a layer kept float keeps these float too, or
# the tool would quantize the float layer's raw (pre-activation) output for them, which loses
# more than quantizing the layer did (measured: keeping one ResNet conv float lowered cosine).
_FUSED_ACTIVATIONS = {"Relu", "Clip", "LeakyRelu", "HardSwish", "HardSigmoid", "Sigmoid", "PRelu"}


def with_fused_activations(model: onnx.ModelProto, names: list[str]) -> list[str]:
    """``names`` plus the activation node each of them feeds alone (in graph order, no repeats)."""
    consumers: dict[str, list] = {}
    for n in model.graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    graph_outputs = {o.name for o in model.graph.output}
    out = list(names)
    by_name = {n.name: n for n in model.graph.node}
    for name in names:
        node = by_name.get(name)
        if node is None or not node.output or node.output[0] in graph_outputs:
            continue
        users = consumers.get(node.output[0], [])
        if len(users) == 1 and users[0].op_type in _FUSED_ACTIVATIONS and users[0].name not in out:
            out.append(users[0].name)
    return out


def _dequantize(q: np.ndarray, scale: np.ndarray, zero: "np.ndarray | None", axis: int) -> np.ndarray:
    """DequantizeLinear in numpy: per tensor, or per channel along ``axis``."""
    shape = [-1 if a == axis % max(q.ndim, 1) else 1 for a in range(q.ndim)] if scale.size > 1 else []
    zero = np.zeros(1) if zero is None else zero.astype(np.float64)
    return ((q.astype(np.float64) - zero.reshape(shape)) * scale.astype(np.float64).reshape(shape)).astype(np.float32)


def dequantized_constant(inits: dict, dq: onnx.NodeProto) -> "np.ndarray | None":
    """The value of a DequantizeLinear whose inputs are initializers (a quantized weight or bias),
    in float32 as ORT computes it; None when its payload or scale is not an initializer."""
    if dq.input[0] not in inits or dq.input[1] not in inits:
        return None
    zero = numpy_helper.to_array(inits[dq.input[2]]) if len(dq.input) > 2 and dq.input[2] in inits else None
    return _dequantize(numpy_helper.to_array(inits[dq.input[0]]), numpy_helper.to_array(inits[dq.input[1]]),
                       zero, _axis(dq))


class _QuantizedModel:
    """Index of ORT's QDQ output: producers, consumers and initializers by name."""

    def __init__(self, model: onnx.ModelProto):
        self.model = model
        self.inits = {t.name: t for t in model.graph.initializer}
        self.producer = {o: n for n in model.graph.node for o in n.output}
        self.consumers: dict[str, list] = {}
        for n in model.graph.node:
            for i in n.input:
                self.consumers.setdefault(i, []).append(n)
        self.nodes = {n.name: n for n in model.graph.node if n.name}

    def candidates(self) -> list[str]:
        """Names of the nodes the tool quantized (they read a DequantizeLinear output)."""
        return [n.name for n in self.model.graph.node
                if n.op_type not in _QDQ and n.name and any(
                    i in self.producer and self.producer[i].op_type == "DequantizeLinear" for i in n.input)]

    def array(self, name: str) -> "np.ndarray | None":
        return numpy_helper.to_array(self.inits[name]) if name in self.inits else None


def _axis(node: onnx.NodeProto) -> int:
    return next((a.i for a in node.attribute if a.name == "axis"), 1)


def single_layer_model(float_model: onnx.ModelProto, qm: _QuantizedModel, name: str) -> onnx.ModelProto:
    """``float_model`` with only node ``name`` quantized as in the full QDQ model ``qm``."""
    out = onnx.ModelProto()
    out.CopyFrom(float_model)
    qnode = qm.nodes[name]
    nodes = list(out.graph.node)
    idx = next(i for i, n in enumerate(nodes) if n.name == name)
    fnode = nodes[idx]
    before = []
    for k, qin in enumerate(qnode.input):
        dq = qm.producer.get(qin)
        if dq is None or dq.op_type != "DequantizeLinear" or k >= len(fnode.input):
            continue
        values = dequantized_constant(qm.inits, dq)
        if values is not None:  # a quantized weight or bias: its dequantized values, as a constant
            const = f"{name}__sq_in{k}"
            out.graph.initializer.append(numpy_helper.from_array(values, const))
            fnode.input[k] = const
            continue
        q = qm.producer.get(dq.input[0])
        if q is None or q.op_type != "QuantizeLinear":
            continue
        before += _qdq(out, qm, q, fnode.input[k], f"{name}__sq_in{k}")
        fnode.input[k] = f"{name}__sq_in{k}_dq"
    del out.graph.node[:]
    out.graph.node.extend(nodes[:idx] + before + [fnode] + nodes[idx + 1:])
    return out


def _qdq(out: onnx.ModelProto, qm: _QuantizedModel, q: onnx.NodeProto, src: str, prefix: str) -> list:
    """Q/DQ nodes (with ``q``'s scale and zero point copied) from ``src`` to ``{prefix}_dq``."""
    params = []
    for j, p in enumerate(q.input[1:3]):
        if p:
            t = onnx.TensorProto()
            t.CopyFrom(qm.inits[p])
            t.name = f"{prefix}_{'scale' if j == 0 else 'zero'}"
            out.graph.initializer.append(t)
            params.append(t.name)
    attrs = {a.name: helper.get_attribute_value(a) for a in q.attribute}
    return [helper.make_node("QuantizeLinear", [src] + params, [f"{prefix}_q"], name=f"{prefix}_Q", **attrs),
            helper.make_node("DequantizeLinear", [f"{prefix}_q"] + params, [f"{prefix}_dq"],
                             name=f"{prefix}_DQ", **attrs)]


def float_islands(model: onnx.ModelProto, keep: "list[str]", float_producers: "dict[str, str]") -> onnx.ModelProto:
    """Make the ``keep`` nodes of ORT's QDQ output read their activations unquantized.

    Why not the tool alone: its ``nodes_to_exclude`` only stops it inserting Q/DQ *for* a node;
    a tensor that another consumer needs quantized has one shared Q/DQ pair, and the excluded
    node still reads the dequantized copy (measured on PP-OCRv4 rec: excluding its most
    sensitive Mul changed nothing). Here such inputs are rewired to the float tensor the
    QuantizeLinear reads, and Q/DQ nodes left without consumers are dropped. Only when that
    tensor comes from the same node as in the float model (``float_producers``: tensor -> node
    name): where the tool removed a ReLU, the conv writes the ReLU's tensor name unclipped (the
    zero point does the clipping) and the node keeps reading the dequantized tensor.
    """
    keep_set = set(keep)
    producer = {o: n for n in model.graph.node for o in n.output}
    out = onnx.ModelProto()
    out.CopyFrom(model)
    changed = False
    for node in out.graph.node:
        if node.name not in keep_set:
            continue
        for k, name in enumerate(node.input):
            dq = producer.get(name)
            if dq is None or dq.op_type != "DequantizeLinear":
                continue
            q = producer.get(dq.input[0])
            src = producer.get(q.input[0]) if q is not None else None
            same = (src.name if src is not None else q.input[0] if q is not None else None) == \
                float_producers.get(q.input[0] if q is not None else "", "")
            if q is not None and q.op_type == "QuantizeLinear" and same:
                node.input[k] = q.input[0]
                changed = True
    if not changed:
        return model
    graph_outputs = {o.name for o in out.graph.output}
    while True:
        used = {i for n in out.graph.node for i in n.input} | graph_outputs
        dead = [n for n in out.graph.node if n.op_type in _QDQ and not any(o in used for o in n.output)]
        if not dead:
            break
        for n in dead:
            out.graph.node.remove(n)
    used = {i for n in out.graph.node for i in n.input}
    for t in [t for t in out.graph.initializer if t.name not in used]:
        out.graph.initializer.remove(t)
    return out


def choose_float_layers(model: onnx.ModelProto, quantize: Callable[[onnx.ModelProto, list, str], None],
                        calib, keep: list[str], budget: float, max_layers: int, tmp: str,
                        sensitivity_samples: int = 0) -> tuple[list[str], dict]:
    """The layers to keep float (beyond ``keep``) so that every output's cosine >= ``budget``.

    ``quantize(model, exclude, dst)`` writes the tool's QDQ model with ``exclude`` kept float.
    Returns (chosen names, report: sensitivities, trials, the cosine reached).
    """
    reference = outputs(model, calib)

    def measure(extra: list[str]) -> float:
        dst = os.path.join(tmp, "mixed_trial.onnx")
        quantize(model, with_fused_activations(model, keep + extra), dst)
        return least_cosine(reference, outputs(onnx.load(dst), calib))

    full_path = os.path.join(tmp, "mixed_full.onnx")
    quantize(model, keep, full_path)
    qm = _QuantizedModel(onnx.load(full_path))
    full_cos = least_cosine(reference, outputs(qm.model, calib))
    candidates = [c for c in qm.candidates() if c not in keep]
    report = {"budget_cosine": budget, "cosine_all_quantized": full_cos, "candidates": len(candidates),
              "sensitivity": {}, "trials": []}
    if full_cos >= budget or not candidates or max_layers == 0:
        report.update(cosine=full_cos, budget_met=full_cos >= budget, kept=[])
        return [], report
    ranking_calib, ranking_ref = calib, reference
    if 0 < sensitivity_samples < calib.samples:
        import dataclasses

        ranking_calib = dataclasses.replace(calib, inputs={k: v[:sensitivity_samples] for k, v in calib.inputs.items()})
        ranking_ref = outputs(model, ranking_calib)
    sens = {}
    for c in candidates:
        # optimize=False for the one-layer simulations: ORT's graph fusions changed the values of
        # these hand-made Q/DQ graphs by a quantization step (measured), plain QDQ semantics do not.
        sim = outputs(single_layer_model(model, qm, c), ranking_calib, optimize=False)
        sens[c] = 1.0 - least_cosine(ranking_ref, sim)
    order = sorted(candidates, key=lambda c: (-sens[c], c))
    report["sensitivity"] = {c: round(sens[c], 6) for c in order}
    # Greedy over the ranked list, each step measured on the tool's real output: a candidate is
    # kept float only when that raises the least cosine. Why not a bisection over "the k worst":
    # on PP-OCRv4 rec the cosine was not monotonic in k (0.959 all int8, 0.952 with the worst
    # node float, 0.972 with three, 0.909 with eight), rounding errors partly cancel.
    kept: list[str] = []
    best = full_cos
    for c in order[:2 * max_layers]:
        if best >= budget or len(kept) >= max_layers:
            break
        cos = measure(kept + [c])
        report["trials"].append({"try": c, "cosine": cos, "kept": cos > best})
        if cos > best:
            kept, best = kept + [c], cos
    chosen = with_fused_activations(model, kept)
    report.update(cosine=best, budget_met=best >= budget, kept=chosen)
    return chosen, report


# Ops a graph output may pass through after the last weight layer (float_head walks back over them).
_HEAD_PASSTHROUGH = {"Add", "Mul", "Sub", "Div", "Softmax", "LogSoftmax", "Sigmoid", "Relu", "Clip", "Reshape",
                     "Flatten", "Transpose", "Squeeze", "Unsqueeze", "Identity", "HardSwish", "Resize"}


def head_layers(model: onnx.ModelProto) -> list[str]:
    """The Conv/ConvTranspose/MatMul/Gemm nearest to each graph output, walking back over element-wise
    and layout ops (the activation path only: other inputs are constants or shapes)."""
    producer = {o: n for n in model.graph.node for o in n.output}
    inits = {t.name for t in model.graph.initializer}
    out: list[str] = []
    for g_out in model.graph.output:
        t, seen = g_out.name, 0
        while t in producer and seen < 32:
            node, seen = producer[t], seen + 1
            if node.op_type in ("Conv", "ConvTranspose", "MatMul", "Gemm"):
                if node.name not in out:
                    out.append(node.name)
                break
            if node.op_type not in _HEAD_PASSTHROUGH:
                break
            live = [i for i in node.input if i and i not in inits
                    and not (i in producer and producer[i].op_type in ("Constant", "Shape", "Concat", "Cast"))]
            if len(live) != 1:
                break
            t = live[0]
    return out


def weight_sensitive_layers(model: onnx.ModelProto, calib, count: int, exclude: "set[str]" = frozenset(),
                            ) -> tuple[list[str], dict[str, float]]:
    """The ``count`` Conv/ConvTranspose/MatMul/Gemm layers whose int8 weight rounding alone (every
    other weight and all activations float) lowers the least output cosine on ``calib`` most.

    Unlike the ``keep_float=auto`` ranking this isolates the weight grid: on PP-OCRv4 rec int8
    weights alone cap the output at ~0.991, mostly through a few 1x1 convs with an outlier input
    channel, and those are the layers worth their float cost. One forward pass per layer.
    """
    from .equalize import quantize_weight_like_ort, weight_axis

    ref = outputs(model, calib, optimize=False)
    inits = {t.name: t for t in model.graph.initializer}
    readers: dict[str, int] = {}
    for n in model.graph.node:
        for i in n.input:
            readers[i] = readers.get(i, 0) + 1
    sensitivity: dict[str, float] = {}
    for node in model.graph.node:
        if (node.op_type not in ("Conv", "ConvTranspose", "MatMul", "Gemm") or node.name in exclude
                or len(node.input) < 2 or node.input[1] not in inits or readers.get(node.input[1], 0) != 1):
            continue
        w = numpy_helper.to_array(inits[node.input[1]])
        if w.dtype != np.float32 or w.ndim < 2:
            continue
        axis = 1 if node.op_type == "ConvTranspose" else weight_axis(node)
        trial = onnx.ModelProto()
        trial.CopyFrom(model)
        target = next(t for t in trial.graph.initializer if t.name == node.input[1])
        target.CopyFrom(numpy_helper.from_array(quantize_weight_like_ort(w, axis), node.input[1]))
        sensitivity[node.name] = 1.0 - least_cosine(ref, outputs(trial, calib, optimize=False))
    ranked = sorted(sensitivity, key=lambda n: -sensitivity[n])
    return ranked[:count], dict(sorted(sensitivity.items(), key=lambda kv: -kv[1]))
