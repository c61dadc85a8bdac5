"""Weights stored sparse in the ONNX file (COO values + int64 indices).

Stored form: a ``Constant`` node whose ``sparse_value`` holds the weight, not a graph
``sparse_initializer``. Both are ONNX and ONNX Runtime densifies both at load (measured with
ORT 1.32; the sparse EP then sees an ordinary constant initializer), but ONNX's own checker
types a sparse initializer as ``sparse_tensor(float)`` and rejects it as input of Conv / Gemm /
MatMul, whereas ``Constant(sparse_value)`` outputs a dense tensor and passes the full check the
pipeline runs after every pass. Reading accepts both forms.

onnx-graphsurgeon carries neither, so ``Graph.from_model`` turns them into dense initializers
(remembering their names) and ``Graph.to_model`` stores those names sparse again; the
``sparse`` pass adds names. With int64 indices a tensor only shrinks when fewer than a third of
its values are nonzero, so denser ones stay dense.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper

INDEX_BYTES = 8  # ONNX requires int64 indices
_SPARSE_TYPES = (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE)


def to_sparse(t: onnx.TensorProto) -> "onnx.SparseTensorProto | None":
    """COO copy of ``t`` (linear indices) when that is smaller than the dense tensor, else None."""
    if t.data_type not in _SPARSE_TYPES:
        return None
    a = numpy_helper.to_array(t)
    flat = a.reshape(-1)
    idx = np.flatnonzero(flat)
    if idx.size * (a.itemsize + INDEX_BYTES) >= a.nbytes:
        return None
    values = numpy_helper.from_array(flat[idx], t.name)
    indices = numpy_helper.from_array(idx.astype(np.int64), t.name + "_indices")
    return onnx.helper.make_sparse_tensor(values, indices, list(t.dims))


def to_dense(sp: onnx.SparseTensorProto, name: "str | None" = None) -> onnx.TensorProto:
    values = numpy_helper.to_array(sp.values)
    indices = numpy_helper.to_array(sp.indices).astype(np.int64)
    dims = tuple(sp.dims)
    out = np.zeros(int(np.prod(dims, dtype=np.int64)), dtype=values.dtype)
    if indices.ndim == 2:  # the [NNZ, rank] form
        indices = np.ravel_multi_index(tuple(indices.T), dims) if indices.size else indices.reshape(-1)
    out[indices] = values
    return numpy_helper.from_array(out.reshape(dims), name or sp.values.name)


def densify(model: onnx.ModelProto) -> "set[str]":
    """Turn top-level sparse initializers and Constant(sparse_value) nodes into dense initializers.

    Returns the names of the tensors that were sparse.
    """
    g = model.graph
    names = set()
    for sp in g.sparse_initializer:
        g.initializer.append(to_dense(sp))
        names.add(sp.values.name)
    del g.sparse_initializer[:]
    keep = []
    for node in g.node:
        attr = node.attribute[0] if len(node.attribute) == 1 else None
        if (node.op_type == "Constant" and node.domain in ("", "ai.onnx") and attr is not None
                and attr.name == "sparse_value" and node.output[0] not in names):
            g.initializer.append(to_dense(attr.sparse_tensor, node.output[0]))
            names.add(node.output[0])
            continue
        keep.append(node)
    if len(keep) != len(g.node):
        del g.node[:]
        g.node.extend(keep)
    return names


def store_sparse(model: onnx.ModelProto, names: "set[str]") -> "list[str]":
    """Store the named initializers as Constant(sparse_value) where that shrinks them.

    Returns the names stored. Initializers that are also graph inputs (overridable) stay.
    """
    g = model.graph
    if not names:
        return []
    inputs = {i.name for i in g.input}
    node_names = {n.name for n in g.node}
    keep, constants = [], []
    for t in g.initializer:
        sp = to_sparse(t) if t.name in names and t.name not in inputs else None
        if sp is None:
            keep.append(t)
            continue
        node_name = t.name + "_sparse"
        while node_name in node_names:
            node_name += "_"
        node_names.add(node_name)
        constants.append(onnx.helper.make_node("Constant", [], [t.name], name=node_name, sparse_value=sp))
    if constants:
        del g.initializer[:]
        g.initializer.extend(keep)
        nodes = list(g.node)
        del g.node[:]
        g.node.extend(constants + nodes)  # no inputs: first is always a valid topological place
    return [c.output[0] for c in constants]
