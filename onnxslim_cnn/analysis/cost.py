"""Model cost: parameters, file size, MACs of Conv/ConvTranspose/Gemm/MatMul, node counts.

MACs need concrete shapes: the caller gives one concrete shape per graph input (usually the
calibration batch cut to one sample) and shapes are inferred on a copy with those inputs. Where
static inference gives up (a Reshape whose target is computed from Shape -> Gather -> Mul, as
in ddddocr's LSTM head, beyond ONNX's data propagation), the caller's ``feeds`` (those
calibration samples) are run once through ONNX Runtime with the missing tensors as extra
outputs, and their real shapes are used: only then, and only for those tensors.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass, field

import numpy as np
import onnx
from onnx import TensorProto

from ..model_io import inferred, model_bytes, skeleton, with_static_inputs
from ..sessions import make_session

# Element types that hold learned weights. Integer shape/axes tensors (int32/int64) are not
# parameters; int8/uint8/int4 are (quantized weights).
PARAM_TYPES = {
    TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16, TensorProto.DOUBLE,
    TensorProto.INT8, TensorProto.UINT8, TensorProto.INT4, TensorProto.UINT4,
}
MAC_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")


@dataclass
class ModelStats:
    params: int
    file_bytes: int
    macs: int
    macs_by_op: dict[str, int]
    nodes: int
    op_counts: dict[str, int]
    macs_unknown: list[str] = field(default_factory=list)  # MAC nodes whose shapes were unknown
    # Per Conv/ConvTranspose/Gemm/MatMul node (keyed as ``node_macs`` keys them): its MACs, and
    # the weight and bias elements it applies (through a DequantizeLinear, for int8 weights)
    macs_by_node: dict[str, int] = field(default_factory=dict)
    params_by_node: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


def count_params(model: onnx.ModelProto) -> int:
    """Elements of all weight tensors (initializers and Constant nodes of weight element types)."""
    total = 0
    for t in model.graph.initializer:
        if t.data_type in PARAM_TYPES:
            total += int(np.prod(t.dims, dtype=np.int64))
    for node in model.graph.node:
        if node.op_type == "Constant":
            for a in node.attribute:
                if a.name == "value" and a.t.data_type in PARAM_TYPES:
                    total += int(np.prod(a.t.dims, dtype=np.int64))
                # float list/scalar forms too: Graph.from_model turns them into float initializers,
                # and the count must not change with that
                elif a.name == "value_floats":
                    total += len(a.floats)
                elif a.name == "value_float":
                    total += 1
                elif a.name == "sparse_value" and a.sparse_tensor.values.data_type in PARAM_TYPES:
                    total += int(np.prod(a.sparse_tensor.dims, dtype=np.int64))  # stored sparse, same tensor
    for sp in model.graph.sparse_initializer:
        if sp.values.data_type in PARAM_TYPES:
            total += int(np.prod(sp.dims, dtype=np.int64))
    return total


def _node_keys(model: onnx.ModelProto) -> list[str]:
    """One key per node: its name, or its output name when unnamed or when the name is taken
    (ONNX does not require unique node names; a shared key would hide a node's MACs)."""
    keys, seen = [], set()
    for node in model.graph.node:
        key = node.name or node.output[0]
        if key in seen:
            key = f"{key}/{node.output[0]}"
        seen.add(key)
        keys.append(key)
    return keys


def node_macs(model: onnx.ModelProto, input_shapes: dict[str, tuple[int, ...]],
              feeds: "dict[str, np.ndarray] | None" = None) -> tuple[dict[str, int], list[str]]:
    """MACs per Conv/ConvTranspose/Gemm/MatMul node (keyed by node name or output name).

    Returns (macs, unknown) where ``unknown`` lists the nodes whose shapes could not be known.
    ``feeds`` (inputs of the shapes ``input_shapes``): where static inference leaves a node's
    shapes unknown, they are read from one ONNX Runtime run on these.
    """
    static = inferred(with_static_inputs(skeleton(model), input_shapes))
    shapes: dict[str, tuple] = {}
    for vi in list(static.graph.value_info) + list(static.graph.input) + list(static.graph.output):
        dims = vi.type.tensor_type.shape.dim
        if vi.type.tensor_type.HasField("shape") and all(d.HasField("dim_value") for d in dims):
            shapes[vi.name] = tuple(d.dim_value for d in dims)
    for t in static.graph.initializer:
        shapes[t.name] = tuple(t.dims)
    for node in static.graph.node:
        if node.op_type == "Constant":
            for a in node.attribute:
                if a.name == "value":
                    shapes[node.output[0]] = tuple(a.t.dims)
    mac_nodes = [(node, key) for node, key in zip(static.graph.node, _node_keys(static))
                 if node.op_type in MAC_OPS and node.domain in ("", "ai.onnx")]
    missing = sorted({name for node, _ in mac_nodes if _macs_of(node, shapes) is None
                      for name in _shape_inputs(node) if name and name not in shapes})
    if missing and feeds is not None:
        shapes.update(runtime_shapes(model, missing, feeds))
    macs: dict[str, int] = {}
    unknown: list[str] = []
    for node, key in mac_nodes:
        value = _macs_of(node, shapes)
        if value is None:
            unknown.append(key)
        else:
            macs[key] = value
    return macs, unknown


def _shape_inputs(node: onnx.NodeProto) -> list[str]:
    """The tensors whose shapes ``_macs_of`` reads for ``node``."""
    if node.op_type == "Conv":
        return [node.input[1], node.output[0]]
    if node.op_type == "ConvTranspose":
        return [node.input[0], node.input[1]]
    return [node.input[0], node.output[0]]  # Gemm, MatMul


def runtime_shapes(model: onnx.ModelProto, names: list[str], feeds: dict[str, np.ndarray]) -> dict[str, tuple]:
    """Shapes of the tensors ``names`` in one ONNX Runtime run of ``model`` on ``feeds`` (exposed
    as extra graph outputs, graph optimizations off so that none is fused away); {} when the
    run fails: MACs that cannot be counted are reported as unknown, never a reason to stop."""
    exposed = onnx.ModelProto()
    exposed.CopyFrom(model)
    have = {o.name for o in exposed.graph.output}
    inputs = {i.name for i in exposed.graph.input}
    wanted = [n for n in names if n not in inputs]
    out = {n: tuple(feeds[n].shape) for n in names if n in inputs and n in feeds}
    for n in wanted:
        if n not in have:
            exposed.graph.output.add().name = n  # ORT accepts an output declared by name only
    try:
        session = make_session(exposed, optimize=False)
        feed = {i.name: feeds[i.name] for i in session.get_inputs() if i.name in feeds}
        values = session.run(wanted, feed) if wanted else []
    except Exception:  # noqa: BLE001 - the report says which MACs are unknown instead
        return out
    out.update({n: tuple(np.shape(v)) for n, v in zip(wanted, values)})
    return out


def sample_feeds(inputs: dict[str, np.ndarray], shapes: "dict[str, tuple[int, ...]] | None") -> "dict[str, np.ndarray] | None":
    """The calibration samples of the MAC count's shapes (the first ``shapes[k][0]`` of each)."""
    if shapes is None:
        return None
    out = {}
    for k, shape in shapes.items():
        v = inputs.get(k)
        if v is None:
            return None
        v = v[:shape[0]] if v.ndim and len(shape) == v.ndim else v
        if tuple(v.shape) != tuple(shape):
            return None
        out[k] = v
    return out


def _macs_of(node: onnx.NodeProto, shapes: dict[str, tuple]) -> "int | None":
    get = lambda name: shapes.get(name) if name else None  # noqa: E731
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    if node.op_type == "Conv":
        w, y = get(node.input[1]), get(node.output[0])
        if w is None or y is None:
            return None
        # each output element is a dot product of length (C_in/groups) * prod(kernel)
        return int(np.prod(y, dtype=np.int64)) * int(np.prod(w[1:], dtype=np.int64))
    if node.op_type == "ConvTranspose":
        x, w = get(node.input[0]), get(node.input[1])
        if x is None or w is None:
            return None
        # every input element is scattered into (C_out/groups) * prod(kernel) outputs
        return int(np.prod(x, dtype=np.int64)) * int(np.prod(w[1:], dtype=np.int64))
    if node.op_type == "Gemm":
        a, y = get(node.input[0]), get(node.output[0])
        if a is None or y is None or len(a) != 2:
            return None
        k = a[0] if attrs.get("transA", 0) else a[1]
        return int(y[0]) * int(y[1]) * int(k)
    if node.op_type == "MatMul":
        a, y = get(node.input[0]), get(node.output[0])
        if a is None or y is None:
            return None
        return int(np.prod(y, dtype=np.int64)) * int(a[-1])
    return None


def node_params(model: onnx.ModelProto) -> dict[str, int]:
    """Weight and bias elements each Conv/ConvTranspose/Gemm/MatMul applies: its constant inputs
    after the first, or the constant behind a DequantizeLinear/Identity feeding one."""
    sizes = {t.name: int(np.prod(t.dims, dtype=np.int64)) for t in model.graph.initializer
             if t.data_type in PARAM_TYPES}
    producer = {}
    for node in model.graph.node:
        for o in node.output:
            producer[o] = node
        if node.op_type == "Constant":
            for a in node.attribute:
                if a.name == "value" and a.t.data_type in PARAM_TYPES:
                    sizes[node.output[0]] = int(np.prod(a.t.dims, dtype=np.int64))
    out = {}
    for node, key in zip(model.graph.node, _node_keys(model)):
        if node.op_type not in MAC_OPS or node.domain not in ("", "ai.onnx"):
            continue
        total = 0
        for name in node.input[1:]:
            p = producer.get(name)
            if name not in sizes and p is not None and p.op_type in ("DequantizeLinear", "Identity"):
                name = p.input[0]
            total += sizes.get(name, 0)
        out[key] = total
    return out


def model_stats(model: onnx.ModelProto, input_shapes: "dict[str, tuple[int, ...]] | None",
                feeds: "dict[str, np.ndarray] | None" = None) -> ModelStats:
    """Parameters, size, MACs (at ``input_shapes``; ``feeds`` of those shapes fill in what static
    shape inference cannot, see ``node_macs``), node and op counts."""
    ops = Counter(n.op_type for n in model.graph.node)
    macs, unknown = node_macs(model, input_shapes, feeds) if input_shapes is not None else ({}, [])
    by_op: Counter = Counter()
    op_of = {key: n.op_type for n, key in zip(model.graph.node, _node_keys(model))}
    for key, value in macs.items():
        by_op[op_of.get(key, "?")] += value
    return ModelStats(
        macs_by_node=dict(macs),
        params_by_node=node_params(model),
        params=count_params(model),
        file_bytes=model_bytes(model),
        macs=int(sum(macs.values())),
        macs_by_op=dict(sorted(by_op.items())),
        nodes=len(model.graph.node),
        op_counts=dict(sorted(ops.items())),
        macs_unknown=unknown,
    )
