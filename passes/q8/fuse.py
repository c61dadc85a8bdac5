"""Fuse decomposed activations back into single ONNX ops before ``q8`` quantizes.

Paddle2ONNX writes HardSwish as ``Div(Mul(x, Clip(Add(x, 3), 0, 6)), 6)``. ORT's tool quantizes
every Add/Mul/Clip output of that chain on its own uint8 grid: four roundings per activation, and
the ``x * relu6(x + 3)`` product spans up to ~500 on PP-OCRv4 rec (so one step is ~2, coarser
than the whole useful range of the activation). One ``HardSwish`` node (opset 14) is the same
function and leaves one tensor to quantize, its output.

The rewrite is exact in float up to the rounding of ``/ 6`` (tests compare against the original
model). Only chains whose intermediate tensors have no other reader and are not graph outputs
are fused; the opset is raised to 14 when needed (none of the ops changed between 13 and 14 is
re-interpreted for a model that was valid at 13).
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper


def _const(name: str, inits: dict, producer: dict) -> "np.ndarray | None":
    if name in inits:
        return numpy_helper.to_array(inits[name])
    p = producer.get(name)
    if p is not None and p.op_type == "Constant":
        for a in p.attribute:
            if a.name == "value":
                return numpy_helper.to_array(a.t)
    return None


def _scalar(v: "np.ndarray | None", want: float) -> bool:
    return v is not None and v.size == 1 and abs(float(v.ravel()[0]) - want) <= 1e-6 * max(1.0, abs(want))


def _clip_bounds(node: onnx.NodeProto, inits: dict, producer: dict) -> "tuple[float, float] | None":
    lo = _const(node.input[1], inits, producer) if len(node.input) > 1 and node.input[1] else None
    hi = _const(node.input[2], inits, producer) if len(node.input) > 2 and node.input[2] else None
    for a in node.attribute:  # opset < 11 spelling
        if a.name == "min":
            lo = np.array(a.f)
        if a.name == "max":
            hi = np.array(a.f)
    if lo is None or hi is None or lo.size != 1 or hi.size != 1:
        return None
    return float(lo.ravel()[0]), float(hi.ravel()[0])


def fuse_hardswish(model: onnx.ModelProto) -> tuple[onnx.ModelProto, list[str]]:
    """A copy of ``model`` with every decomposed HardSwish replaced by one node; the Div names."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    opset = next((op.version for op in out.opset_import if op.domain in ("", "ai.onnx")), 0)
    if opset < 13:
        from onnx import version_converter

        out = version_converter.convert_version(out, 13)
    g = out.graph
    inits = {t.name: t for t in g.initializer}
    producer = {o: n for n in g.node for o in n.output}
    readers: dict[str, int] = {}
    for n in g.node:
        for i in n.input:
            readers[i] = readers.get(i, 0) + 1
    outputs = {o.name for o in g.output}

    def only_reader(t: str) -> bool:
        return readers.get(t, 0) == 1 and t not in outputs

    fused: dict[int, tuple[str, str, str]] = {}  # id(Div) -> (x, output, name)
    drop: set[int] = set()
    for div in g.node:
        if div.op_type not in ("Div", "Mul") or len(div.input) != 2:
            continue
        want = 6.0 if div.op_type == "Div" else 1.0 / 6.0
        k = _const(div.input[1], inits, producer)
        mul = producer.get(div.input[0])
        if not _scalar(k, want) and div.op_type == "Mul":
            k, mul = _const(div.input[0], inits, producer), producer.get(div.input[1])
        if not _scalar(k, want) or mul is None or mul.op_type != "Mul" or not only_reader(mul.output[0]):
            continue
        for x_in, clip_in in ((0, 1), (1, 0)):
            clip = producer.get(mul.input[clip_in])
            if clip is None or clip.op_type != "Clip" or not only_reader(clip.output[0]):
                continue
            if _clip_bounds(clip, inits, producer) != (0.0, 6.0):
                continue
            add = producer.get(clip.input[0])
            if add is None or add.op_type != "Add" or not only_reader(add.output[0]):
                continue
            x = mul.input[x_in]
            others = [i for i in add.input if i != x]
            if len(others) != 1 or x not in add.input or not _scalar(_const(others[0], inits, producer), 3.0):
                continue
            fused[id(div)] = (x, div.output[0], div.name)
            drop.update({id(add), id(clip), id(mul)})
            break
    if not fused:
        return model, []
    nodes = []
    for n in g.node:
        if id(n) in drop:
            continue
        if id(n) in fused:
            x, y, name = fused[id(n)]
            n = helper.make_node("HardSwish", [x], [y], name=name)
        nodes.append(n)
    nodes = [onnx.NodeProto.FromString(n.SerializeToString()) for n in nodes]  # detach before clearing
    del g.node[:]
    g.node.extend(nodes)
    _raise_opset(out, 14)
    used = {i for n in out.graph.node for i in n.input}
    keep = [t for t in out.graph.initializer if t.name in used or t.name in {i.name for i in out.graph.input}]
    del out.graph.initializer[:]
    out.graph.initializer.extend(keep)
    return out, [v[2] for v in fused.values()]


def _raise_opset(model: onnx.ModelProto, version: int) -> None:
    # ops that changed from 13 to 14 (Add/Sub/Mul/Div types, Reshape's allowzero default 0,
    # BatchNormalization's training outputs, Relu types, CumSum, RNNs, Identity) keep the meaning
    # a valid opset-13 model gave them, so only the number moves; older opsets were converted
    # first (fuse_hardswish)
    for op in model.opset_import:
        if op.domain in ("", "ai.onnx") and op.version < version:
            op.version = version
