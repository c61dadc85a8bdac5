"""Shape-computation rules of ``slim``: what constant folding cannot do on dynamic shapes.

Exporters build reshape targets at run time: ``x.view(x.size(0), -1)`` becomes
``Reshape(x, Concat(Unsqueeze(Gather(Shape(x), 0)), [-1]))``. With a symbolic batch the Gather
cannot be folded, but a Reshape target entry of 0 means "copy this dimension from the input",
so the whole target becomes the constant ``[0, -1]``. Later shape inference then knows the rank
and every static dim, which unlocks further folding (LSTM initial states, Gemm fusion).
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from onnxslim_cnn.graph import Graph
from onnxslim_cnn.graph import constant_value as _const, node_label as _label  # shared helpers
from onnxslim_cnn.pass_infra import PassResult

INT_TYPES = (np.int32, np.int64)


def _strip_int_casts(t: gs.Tensor) -> gs.Tensor:
    """Look through Cast nodes between int32/int64 (Paddle casts shapes back and forth)."""
    while True:
        p = t.inputs[0] if t.inputs else None
        if p is None or p.op != "Cast" or not p.inputs:
            return t
        src = p.inputs[0]
        if src.dtype is None or np.dtype(src.dtype) not in map(np.dtype, INT_TYPES):
            return t
        t = src


def _shape_source(t: gs.Tensor) -> "tuple[gs.Tensor, int, int] | None":
    """If ``t`` holds dims ``start..stop-1`` of ``Shape(x)``, return (x, start, stop)."""
    t = _strip_int_casts(t)
    p = t.inputs[0] if t.inputs else None
    if p is None:
        return None
    if p.op == "Shape":
        x = p.inputs[0]
        if x.shape is None:
            return None
        rank = len(x.shape)
        start, end = int(p.attrs.get("start", 0)), int(p.attrs.get("end", rank))
        start = min(max(start + rank if start < 0 else start, 0), rank)
        end = min(max(end + rank if end < 0 else end, 0), rank)
        return (x, start, end) if start < end else None
    if p.op == "Unsqueeze":
        axes = _const(p.inputs[1]) if len(p.inputs) > 1 else np.asarray(p.attrs.get("axes", []))
        inner = p.inputs[0]
        if axes is None or list(np.asarray(axes).reshape(-1)) != [0] or inner.shape is None or len(inner.shape) != 0:
            return None
        return _shape_source(inner)
    if p.op == "Gather" and int(p.attrs.get("axis", 0)) == 0:
        idx = _const(p.inputs[1])
        src = _shape_source(p.inputs[0])
        if idx is None or src is None or idx.size != 1:
            return None
        x, a, b = src
        k = int(idx.reshape(-1)[0])
        k = k + (b - a) if k < 0 else k
        return (x, a + k, a + k + 1) if 0 <= k < b - a else None
    if p.op == "Slice" and len(p.inputs) >= 3:
        vals = [_const(v) if v is not None else None for v in p.inputs[1:]]
        src = _shape_source(p.inputs[0])
        if src is None or any(v is None for v in vals[:2]):
            return None
        starts, ends = vals[0].reshape(-1), vals[1].reshape(-1)
        axes = vals[2].reshape(-1) if len(vals) > 2 and vals[2] is not None else np.array([0])
        steps = vals[3].reshape(-1) if len(vals) > 3 and vals[3] is not None else np.array([1])
        if starts.size != 1 or list(axes) != [0] or list(steps) != [1]:
            return None
        x, a, b = src
        n = b - a
        s, e = int(starts[0]), int(ends[0])
        s = max(0, s + n if s < 0 else s)
        e = min(n, e + n if e < 0 else e)
        return (x, a + s, a + e) if 0 <= s < e else None
    return None


def constant_reshape_targets(graph: Graph, result: PassResult) -> int:
    """Reshape(x, Concat(consts, dims of x at the same positions)) -> Reshape(x, const with 0s)."""
    n = 0
    for node in list(graph.nodes):
        if node.op != "Reshape" or len(node.inputs) < 2 or int(node.attrs.get("allowzero", 0)):
            continue
        x, target = node.inputs[0], node.inputs[1]
        if isinstance(target, gs.Constant):
            continue
        parts = _concat_parts(_strip_int_casts(target))
        if parts is None:
            continue
        values: list[int] = []
        for part in parts:
            c = _const(part)
            if c is not None:
                if c.ndim > 1:
                    break
                values.extend(int(v) for v in c.reshape(-1))
                continue
            src = _shape_source(part)
            if src is None or not _same_dims(src, x, len(values)):
                break
            values.extend([0] * (src[2] - src[1]))
        else:
            if sum(v == -1 for v in values) > 1:
                continue
            node.inputs[1] = graph.add_constant(f"{_label(node)}.shape", np.array(values, dtype=np.int64))
            result.change(_label(node), "constant_reshape_target", shape=values)
            n += 1
    return n


def _same_dims(src: "tuple[gs.Tensor, int, int]", x: gs.Tensor, pos: int) -> bool:
    """Dims ``a..b`` of ``y`` equal dims ``pos..`` of ``x``: same tensor and position, or the same
    symbolic dims (shape inference gave them the same name) at those positions."""
    y, a, b = src
    if y is x:
        return a == pos
    if x.shape is None or y.shape is None or pos + (b - a) > len(x.shape):
        return False
    for i in range(b - a):
        dy, dx = y.shape[a + i], x.shape[pos + i]
        if not (isinstance(dy, str) and dy and dy == dx):
            return False
    return True


def transpose_to_reshape(graph: Graph, result: PassResult) -> int:
    """A Transpose that only moves size-1 axes is a Reshape (no data movement in ORT)."""
    n = 0
    for node in list(graph.nodes):
        if node.op != "Transpose" or not node.inputs:
            continue
        x = node.inputs[0]
        perm = node.attrs.get("perm")
        if x.shape is None or perm is None or len(perm) != len(x.shape) or list(perm) == sorted(perm):
            continue  # identity permutations are removed by eliminate_identity
        moved = [p for p in perm if x.shape[p] != 1]
        if moved != sorted(moved):
            continue
        # static dims by value; a dynamic dim that keeps its position is copied (0), so shape
        # inference keeps its symbol; one other dynamic dim may be inferred (-1)
        target = []
        for i, p in enumerate(perm):
            d = x.shape[p]
            target.append(int(d) if isinstance(d, (int, np.integer)) and d >= 0 else 0 if p == i else -1)
        if target.count(-1) > 1:
            continue
        target = np.array(target, dtype=np.int64)
        shape_const = graph.add_constant(f"{_label(node)}.shape", target)
        node.op = "Reshape"
        node.attrs.clear()
        node.inputs.append(shape_const)
        result.change(_label(node), "transpose_to_reshape")
        n += 1
    return n


def _concat_parts(t: gs.Tensor) -> "list[gs.Tensor] | None":
    p = t.inputs[0] if t.inputs else None
    if p is not None and p.op == "Concat" and int(p.attrs.get("axis", 0)) in (0, -1):
        return list(p.inputs)
    if _shape_source(t) is not None:
        return [t]
    return None


def merge_slices(graph: Graph, result: PassResult) -> int:
    """Slice(Slice(x)) on different axes, all parameters constant -> one Slice."""
    n = 0
    for node in list(graph.nodes):
        if node.op != "Slice" or len(node.inputs) < 4:
            continue
        inner = graph.producer(node.inputs[0])
        if inner is None or inner.op != "Slice" or len(inner.inputs) < 4 or len(inner.outputs[0].outputs) != 1 \
                or graph.is_graph_output(inner.outputs[0]):
            continue
        a, b = _slice_params(inner), _slice_params(node)
        rank = len(inner.inputs[0].shape) if inner.inputs[0].shape is not None else None
        if a is None or b is None or rank is None:
            continue
        axes_a, axes_b = [int(v) % rank for v in a[2]], [int(v) % rank for v in b[2]]
        if set(axes_a) & set(axes_b):
            continue
        dtype = np.int64
        merged = [np.concatenate([a[i], b[i]]).astype(dtype) for i in range(4)]
        merged[2] = np.array(axes_a + axes_b, dtype=dtype)
        base = _label(node)
        ins = [inner.inputs[0]] + [graph.add_constant(f"{base}.{k}", v)
                                   for k, v in zip(("starts", "ends", "axes", "steps"), merged)]
        Graph.set_inputs(node, ins)
        result.change(base, "merged_slices")
        n += 1
    return n


def _slice_params(node: gs.Node) -> "list[np.ndarray] | None":
    vals = [_const(t) if t is not None else None for t in node.inputs[1:5]]
    if any(v is None for v in vals[:3]):
        return None
    starts, ends, axes = (v.reshape(-1).astype(np.int64) for v in vals[:3])
    steps = vals[3].reshape(-1).astype(np.int64) if len(vals) > 3 and vals[3] is not None else np.ones_like(starts)
    return [starts, ends, axes, steps]
