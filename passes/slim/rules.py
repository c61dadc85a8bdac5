"""The rewrite rules of ``slim``: each finds one pattern and rewrites it exactly.

Every rule has the signature ``rule(graph, result) -> int`` (how many rewrites it made) and
records what it did in ``result``. Rules never leave dangling nodes behind on purpose; the
caller runs dead-code elimination after each.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from onnxslim_cnn.graph import Graph
from onnxslim_cnn.graph import constant_value as _const, node_label as _label  # shared helpers
from onnxslim_cnn.pass_infra import PassResult

WEIGHTED = ("Conv", "ConvTranspose", "Gemm")


def _single_use(graph: Graph, t: gs.Tensor) -> bool:
    return len(t.outputs) == 1 and not graph.is_graph_output(t)


# --------------------------------------------------------------------------- identities


# A no-op rule (onnxscript rewriter style: a pattern and condition, then a replacement):
# a node whose op is in ``ops`` and for which ``condition(graph, node)`` holds computes a copy
# of one of its inputs; ``replacement(graph, node)`` then removes it (by default, bypassing it
# to input 0) and returns whether it could. ``eliminate_identity`` tries the rules of a node's
# op in table order; the first whose condition holds decides, and the change is recorded as
# ``removed_<op>``.


@dataclass(frozen=True)
class NoopRule:
    name: str
    ops: tuple[str, ...]
    condition: Callable[[Graph, gs.Node], bool]
    replacement: Callable[[Graph, gs.Node], bool] = lambda graph, node: graph.bypass(node, 0)


def _inference_dropout(graph: Graph, node: gs.Node) -> bool:
    ins = node.inputs
    extra_used = any(o.outputs or graph.is_graph_output(o) for o in node.outputs[1:])
    training = _const(ins[2]) if len(ins) > 2 and ins[2] is not None else np.array(False)
    return not extra_used and training is not None and not bool(training)


def _same_type_cast(graph: Graph, node: gs.Node) -> bool:
    x, to = node.inputs[0], node.attrs.get("to")
    return x.dtype is not None and to is not None and np.dtype(onnx.helper.tensor_dtype_to_np_dtype(to)) == np.dtype(x.dtype)


def _identity_permutation(graph: Graph, node: gs.Node) -> bool:
    perm = node.attrs.get("perm")
    return perm is not None and list(perm) == list(range(len(perm)))


def _reshape_to_own_shape(graph: Graph, node: gs.Node) -> bool:
    ins = node.inputs
    return len(ins) > 1 and _reshape_keeps_shape(ins[0], _const(ins[1]), node.attrs.get("allowzero", 0))


def _same_static_shape(graph: Graph, node: gs.Node) -> bool:
    x, y = node.inputs[0], node.outputs[0]
    return _static(x.shape) and _static(y.shape) and list(x.shape) == list(y.shape)


def _zero_pad(graph: Graph, node: gs.Node) -> bool:
    ins = node.inputs
    pads = _const(ins[1]) if len(ins) > 1 else np.asarray(node.attrs.get("pads", [1]))
    return pads is not None and pads.size > 0 and not np.any(pads)


def _neutral_operand(node: gs.Node) -> "tuple[int, int] | None":
    """(variable input, constant input) of ``x * 1``, ``x / 1``, ``x + 0``, ``x - 0`` (or ``1 * x``,
    ``0 + x``) whose constant only broadcasts x to its own shape and dtype."""
    op, ins = node.op, node.inputs
    if len(ins) != 2:
        return None
    neutral = 1 if op in ("Mul", "Div") else 0
    for xi, ci in ((0, 1), (1, 0)) if op in ("Mul", "Add") else ((0, 1),):
        c, v = _const(ins[ci]), ins[xi]
        if c is None or isinstance(v, gs.Constant) or not np.all(c == neutral):
            continue
        if v.dtype is not None and np.dtype(v.dtype) == c.dtype and v.shape is not None and \
                c.ndim <= len(v.shape) and all(d == 1 for d in c.shape):
            return xi, ci
    return None


def _bypass_to_variable(graph: Graph, node: gs.Node) -> bool:
    xi, ci = _neutral_operand(node)
    Graph.set_inputs(node, [node.inputs[xi], node.inputs[ci]])  # bypass keeps input 0
    return graph.bypass(node, 0)


NOOP_RULES: tuple[NoopRule, ...] = (
    NoopRule("identity", ("Identity",), lambda graph, node: True),
    NoopRule("inference_dropout", ("Dropout",), _inference_dropout),
    NoopRule("same_type_cast", ("Cast",), _same_type_cast),
    NoopRule("identity_permutation", ("Transpose",), _identity_permutation),
    NoopRule("reshape_to_own_shape", ("Reshape",), _reshape_to_own_shape),
    NoopRule("same_static_shape", ("Reshape", "Flatten", "Squeeze", "Unsqueeze", "Expand"), _same_static_shape),
    NoopRule("zero_pad", ("Pad",), _zero_pad),
    NoopRule("single_input", ("Concat", "Sum", "Max", "Min", "Mean"), lambda graph, node: len(node.inputs) == 1),
    NoopRule("neutral_element", ("Mul", "Div", "Add", "Sub"),
             lambda graph, node: _neutral_operand(node) is not None, _bypass_to_variable),
)
_NOOP_RULES_BY_OP: dict[str, list[NoopRule]] = {}
for _rule in NOOP_RULES:
    for _op in _rule.ops:
        _NOOP_RULES_BY_OP.setdefault(_op, []).append(_rule)


def noop_rule(graph: Graph, node: gs.Node) -> "NoopRule | None":
    """The first rule of ``NOOP_RULES`` that finds ``node`` a no-op (None: none does)."""
    if not node.inputs or node.inputs[0] is None or not node.outputs:
        return None
    return next((r for r in _NOOP_RULES_BY_OP.get(node.op, ()) if r.condition(graph, node)), None)


def _reshape_keeps_shape(x: gs.Tensor, target: "np.ndarray | None", allowzero) -> bool:
    """Reshape(x, target) returns x's own shape: same rank, every entry 0 (copy), -1 (the one
    remaining dim) or equal to x's static dim."""
    if target is None or x.shape is None or target.ndim != 1 or len(target) != len(x.shape):
        return False
    if np.sum(target == -1) > 1:
        return False
    for t, d in zip(target.tolist(), x.shape):
        if t == -1 or t == 0 and not allowzero:
            continue
        if not (isinstance(d, (int, np.integer)) and d == t):
            return False
    return True


def _static(shape) -> bool:
    return shape is not None and all(isinstance(d, (int, np.integer)) and d >= 0 for d in shape)


def eliminate_identity(graph: Graph, result: PassResult) -> int:
    """Remove every node a rule of ``NOOP_RULES`` finds a no-op."""
    n = 0
    for node in list(graph.nodes):
        rule = noop_rule(graph, node)
        if rule is not None:
            op, label = node.op, _label(node)
            if rule.replacement(graph, node):
                result.change(label, f"removed_{op.lower()}")
                n += 1
    return n


# --------------------------------------------------------------------------- chains


PURE_RESHAPES = ("Reshape", "Flatten", "Squeeze", "Unsqueeze")


def merge_chains(graph: Graph, result: PassResult) -> int:
    """Reshape-like -> Reshape(const shape without 0) reads the first input directly;
    Transpose -> Transpose becomes one Transpose with the composed permutation."""
    n = 0
    for node in list(graph.nodes):
        x = node.inputs[0] if node.inputs else None
        inner = graph.producer(x) if x is not None else None
        if inner is None or not inner.inputs:
            continue
        if node.op == "Reshape" and inner.op in PURE_RESHAPES:
            shape = _const(node.inputs[1]) if len(node.inputs) > 1 else None
            target = _resolve_copy_dims(shape, inner.outputs[0], inner.inputs[0]) \
                if shape is not None and not node.attrs.get("allowzero", 0) else None
            if target is not None:
                if not np.array_equal(target, shape):
                    node.inputs[1] = graph.add_constant(f"{_label(node)}.shape", target)
                node.inputs[0] = inner.inputs[0]
                result.change(_label(node), "merged_reshape_chain")
                n += 1
        elif node.op == "Transpose" and inner.op == "Transpose":
            p1, p2 = inner.attrs.get("perm"), node.attrs.get("perm")
            if p1 is not None and p2 is not None and len(p1) == len(p2):
                node.attrs["perm"] = [int(p1[i]) for i in p2]
                node.inputs[0] = inner.inputs[0]
                result.change(_label(node), "merged_transpose_chain")
                n += 1
    return n


def _resolve_copy_dims(target: np.ndarray, mid: gs.Tensor, src: gs.Tensor) -> "np.ndarray | None":
    """Rewrite a Reshape target that reads ``mid`` so it can read ``src`` instead.

    A 0 entry copies the input's dim: it stays 0 when ``src`` has the same (symbolic) dim at that
    position, becomes the number when ``mid``'s dim is static, and otherwise makes this None.
    """
    out = target.astype(np.int64).copy()
    for i in np.flatnonzero(target == 0):
        d = mid.shape[i] if mid.shape is not None and i < len(mid.shape) else None
        s = src.shape[i] if src.shape is not None and i < len(src.shape) else None
        if isinstance(d, (int, np.integer)) and d >= 0 and not (isinstance(s, (int, np.integer)) and s == d):
            out[i] = d
        elif d is not None and s is not None and d == s:
            out[i] = 0
        else:
            return None
    return out


# --------------------------------------------------------------------------- BN folding


def _bn_blocker(graph: Graph, bn: gs.Node) -> "str | None":
    """Why this BatchNormalization cannot be folded into its producer (None: it can)."""
    if bn.attrs.get("training_mode", 0):
        return "training_mode=1"
    if any(o.outputs or graph.is_graph_output(o) for o in bn.outputs[1:]):
        return "running statistics outputs are used"
    if any(_const(t) is None for t in bn.inputs[1:5]):
        return "scale/bias/mean/var are not constants"
    x = bn.inputs[0]
    prod = graph.producer(x)
    if prod is None:
        return "input is a graph input"
    if prod.op not in WEIGHTED:
        return f"input comes from {prod.op}, not Conv/ConvTranspose/Gemm"
    if not _single_use(graph, x):
        return f"the {prod.op} output has other consumers"
    return _weight_blocker(prod)


def _weight_blocker(prod: gs.Node) -> "str | None":
    if _const(prod.inputs[1]) is None:
        return f"the {prod.op} weight is not a constant"
    if len(prod.inputs) > 2 and prod.inputs[2] is not None and _const(prod.inputs[2]) is None:
        return f"the {prod.op} bias is not a constant"
    if prod.op == "Gemm":
        if prod.attrs.get("transA", 0) not in (0, 1) or _const(prod.inputs[1]).ndim != 2:
            return "unsupported Gemm form"
        if len(prod.inputs) > 2 and prod.inputs[2] is not None:
            c = _const(prod.inputs[2])
            n_out = _gemm_out_features(prod)
            if c.size not in (1, n_out) or (c.ndim == 2 and c.shape[0] != 1):
                return "Gemm bias C is not a per-feature vector"
    return None


def _gemm_out_features(gemm: gs.Node) -> int:
    w = _const(gemm.inputs[1])
    return w.shape[0] if gemm.attrs.get("transB", 0) else w.shape[1]


def _out_channels(prod: gs.Node) -> int:
    w = _const(prod.inputs[1])
    if prod.op == "Conv":
        return w.shape[0]
    if prod.op == "ConvTranspose":
        return w.shape[1] * int(prod.attrs.get("group", 1))
    return _gemm_out_features(prod)


def _scale_and_shift(graph: Graph, prod: gs.Node, scale: np.ndarray, shift: np.ndarray) -> None:
    """Make ``prod`` compute ``scale[c] * prod(x)[c] + shift[c]`` per output channel c (exact)."""
    w = _const(prod.inputs[1])
    dtype = w.dtype
    wf = w.astype(np.float64)
    if prod.op == "Conv":
        wf = wf * scale.reshape((-1,) + (1,) * (w.ndim - 1))
    elif prod.op == "ConvTranspose":
        g = int(prod.attrs.get("group", 1))
        grouped = wf.reshape((g, w.shape[0] // g, w.shape[1]) + w.shape[2:])
        grouped = grouped * scale.reshape((g, 1, w.shape[1]) + (1,) * (w.ndim - 2))
        wf = grouped.reshape(w.shape)
    else:  # Gemm: output feature o is row o of B when transB, else column o
        wf = wf * (scale[:, None] if prod.attrs.get("transB", 0) else scale[None, :])
    has_bias = len(prod.inputs) > 2 and prod.inputs[2] is not None
    bias = np.zeros(len(scale)) if not has_bias else np.broadcast_to(
        _const(prod.inputs[2]).astype(np.float64).reshape(-1), scale.shape)
    if prod.op == "Gemm" and has_bias:
        bias = bias * float(prod.attrs.get("beta", 1.0))
    new_bias = bias * scale + shift
    base = _label(prod)
    graph.replace_constant(prod, 1, wf.astype(dtype), hint=f"{base}.weight_folded")
    bias_const = graph.add_constant(f"{base}.bias_folded", new_bias.astype(dtype))
    if has_bias:
        prod.inputs[2] = bias_const
    else:
        prod.inputs.append(bias_const)
    if prod.op == "Gemm":
        prod.attrs["beta"] = 1.0


def fold_batchnorm(graph: Graph, result: PassResult) -> int:
    n = 0
    for bn in list(graph.nodes):
        if bn.op != "BatchNormalization" or _bn_blocker(graph, bn) is not None:
            continue
        prod = graph.producer(bn.inputs[0])
        gamma, beta, mean, var = (_const(t).astype(np.float64) for t in bn.inputs[1:5])
        if gamma.shape[0] != _out_channels(prod):
            continue
        scale = gamma / np.sqrt(var + float(bn.attrs.get("epsilon", 1e-5)))
        shift = beta - mean * scale
        _scale_and_shift(graph, prod, scale, shift)
        label = _label(bn)
        if graph.bypass(bn, 0):
            result.change(label, "folded_batchnorm", into=_label(prod))
            n += 1
    return n


def _channel_vector(c: np.ndarray, out_rank: int, channels: int, gemm: bool) -> "np.ndarray | None":
    """``c`` as a per-output-channel vector if it broadcasts along the channel axis only."""
    if c.ndim > out_rank:
        return None
    full = (1,) * (out_rank - c.ndim) + c.shape
    axis = out_rank - 1 if gemm else 1
    if any(d != 1 for i, d in enumerate(full) if i != axis) or full[axis] not in (1, channels):
        return None
    return np.broadcast_to(c.astype(np.float64).reshape(-1), (channels,)).copy()


def fold_channel_affine(graph: Graph, result: PassResult) -> int:
    """Conv/Gemm followed by a per-channel Mul/Div/Add/Sub with a constant (BN exported as Mul+Add)."""
    n = 0
    for node in list(graph.nodes):
        if node.op not in ("Mul", "Div", "Add", "Sub") or len(node.inputs) != 2:
            continue
        for xi in ((0, 1) if node.op in ("Mul", "Add") else (0,)):
            x, c = node.inputs[xi], _const(node.inputs[1 - xi])
            prod = graph.producer(x) if not isinstance(x, gs.Constant) else None
            if c is None or prod is None or prod.op not in WEIGHTED or not _single_use(graph, x):
                continue
            if _weight_blocker(prod) is not None or c.dtype != _const(prod.inputs[1]).dtype:
                continue
            rank = 2 if prod.op == "Gemm" else _const(prod.inputs[1]).ndim
            vec = _channel_vector(c, rank, _out_channels(prod), prod.op == "Gemm")
            if vec is None:
                continue
            ones, zeros = np.ones_like(vec), np.zeros_like(vec)
            if node.op == "Mul":
                scale, shift = vec, zeros
            elif node.op == "Div":
                if np.any(vec == 0):
                    continue
                scale, shift = 1.0 / vec, zeros
            else:
                scale, shift = ones, (vec if node.op == "Add" else -vec)
            label = _label(node)
            Graph.set_inputs(node, [x, node.inputs[1 - xi]])
            _scale_and_shift(graph, prod, scale, shift)
            if graph.bypass(node, 0):
                result.change(label, f"folded_{node.op.lower()}", into=_label(prod))
                n += 1
            break
    return n


def report_unfolded_batchnorms(graph: Graph, result: PassResult) -> None:
    for bn in graph.nodes:
        if bn.op == "BatchNormalization":
            result.skip(_label(bn), f"BatchNormalization kept: {_bn_blocker(graph, bn) or 'channel count mismatch'}")


# --------------------------------------------------------------------------- fusions


def fuse_matmul_add(graph: Graph, result: PassResult) -> int:
    """MatMul(x[M,K], W[K,N] const) -> Add(b[N] const) becomes Gemm(x, W, b)."""
    n = 0
    for add in list(graph.nodes):
        if add.op != "Add" or len(add.inputs) != 2:
            continue
        for xi in (0, 1):
            y, b = add.inputs[xi], _const(add.inputs[1 - xi])
            mm = graph.producer(y) if not isinstance(y, gs.Constant) else None
            if b is None or mm is None or mm.op != "MatMul" or not _single_use(graph, y):
                continue
            a, w = mm.inputs[0], _const(mm.inputs[1])
            if w is None or w.ndim != 2 or a.shape is None or len(a.shape) != 2 or b.dtype != w.dtype:
                continue
            if b.size != w.shape[1] or (b.ndim == 2 and b.shape[0] != 1) or b.ndim > 2:
                continue
            label = _label(add)
            gemm = gs.Node("Gemm", name=graph.unique_name(f"{_label(mm)}_gemm"),
                           inputs=[a, mm.inputs[1], graph.add_constant(f"{label}.bias", b.reshape(-1))],
                           outputs=[add.outputs[0]], attrs={"alpha": 1.0, "beta": 1.0})
            add.outputs.clear()
            graph.nodes.append(gemm)
            result.change(label, "fused_matmul_add_to_gemm")
            n += 1
            break
    return n


def fuse_pad_into_conv(graph: Graph, result: PassResult) -> int:
    """A constant-mode zero Pad on spatial axes only, feeding a Conv, moves into the Conv's pads."""
    n = 0
    for conv in list(graph.nodes):
        if conv.op != "Conv" or conv.attrs.get("auto_pad", "NOTSET") not in ("NOTSET", b"NOTSET"):
            continue
        x = conv.inputs[0]
        pad = graph.producer(x)
        if pad is None or pad.op != "Pad" or not _single_use(graph, x):
            continue
        mode = pad.attrs.get("mode", "constant")
        if mode not in ("constant", b"constant"):
            continue
        if len(pad.inputs) > 1:
            pads = _const(pad.inputs[1])
            value = _const(pad.inputs[2]) if len(pad.inputs) > 2 and pad.inputs[2] is not None else np.zeros(1)
            if len(pad.inputs) > 3 and pad.inputs[3] is not None:
                continue  # explicit axes (opset 18): rare, left alone
        else:
            pads, value = np.asarray(pad.attrs.get("pads", [])), np.asarray(pad.attrs.get("value", 0.0))
        if pads is None or value is None or np.any(value != 0) or pads.size % 2 or np.any(pads < 0):
            continue
        rank = pads.size // 2
        begin, end = pads[:rank], pads[rank:]
        if rank < 3 or np.any(begin[:2]) or np.any(end[:2]):
            continue
        old = list(conv.attrs.get("pads", [0] * (2 * (rank - 2))))
        k = rank - 2
        conv.attrs["pads"] = [int(old[i] + begin[2 + i]) for i in range(k)] + [int(old[k + i] + end[2 + i]) for i in range(k)]
        conv.inputs[0] = pad.inputs[0]
        result.change(_label(conv), "fused_pad_into_conv")
        n += 1
    return n


# --------------------------------------------------------------------------- CSE


# Ops whose results differ between runs: never folded at compile time, never merged by CSE.
NONDETERMINISTIC = {"RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike",
                    "Multinomial", "Bernoulli"}


def _attr_key(v) -> str:
    if isinstance(v, np.ndarray):
        return f"nd{v.dtype}{v.shape}{v.tobytes().hex()}"
    if isinstance(v, (gs.Graph, gs.Tensor)):
        return f"obj{id(v)}"  # subgraphs are never equal by value here
    if isinstance(v, (list, tuple)):
        return "[" + ",".join(_attr_key(x) for x in v) + "]"
    return repr(v)


def _input_key(t: "gs.Tensor | None") -> str:
    if t is None:
        return "-"
    if isinstance(t, gs.Constant) and int(np.prod(t.shape)) <= 64:
        v = np.asarray(t.values)  # small constants (shapes, axes, scalars) compare by value
        return f"c{v.dtype}{v.shape}{v.tobytes().hex()}"
    return f"t{id(t)}"


def eliminate_common_subexpressions(graph: Graph, result: PassResult) -> int:
    n = 0
    graph.toposort()
    seen: dict[tuple, gs.Node] = {}
    for node in list(graph.nodes):
        if node.op in NONDETERMINISTIC or not node.outputs:
            continue
        key = (node.op, node.domain, len(node.outputs), tuple(_input_key(t) for t in node.inputs),
               tuple(sorted((k, _attr_key(v)) for k, v in node.attrs.items())))
        other = seen.setdefault(key, node)
        if other is node:
            continue
        if any(graph.is_graph_output(o) for o in node.outputs):
            continue
        for mine, theirs in zip(node.outputs, other.outputs):
            graph.replace_uses(mine, theirs)
        node.inputs.clear()
        node.outputs.clear()
        result.change(_label(node), "merged_duplicate_node", into=_label(other))
        n += 1
    return n
