"""Graph core: a thin layer over onnx-graphsurgeon.

What a pass needs to read or rewrite a model: initializer access, producers/consumers, node
bypassing, topological order and cleanup, and an export that keeps the model's opset and
metadata. Model files (loading, checks, saving, shape inference on ``ModelProto``) are in
``model_io``.

A ``Graph`` is built fresh from a ``ModelProto`` for every pass (see ``pipeline``), so shapes
are always inferred from the current model and never stale after a pass resized a tensor.
"""

from __future__ import annotations

import hashlib

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx_graphsurgeon.logger import G_LOGGER

from .model_io import annotate_shapes, constants_to_initializers, inferred
from .sparse_storage import densify, store_sparse

# gs logs folding failures as warnings; we report what was skipped ourselves.
G_LOGGER.severity = G_LOGGER.CRITICAL


# --------------------------------------------------------------------------- the Graph wrapper


def constant_value(tensor: "gs.Tensor | None") -> "np.ndarray | None":
    """The array of a constant tensor, or None for a variable (or a missing optional input)."""
    return np.asarray(tensor.values) if isinstance(tensor, gs.Constant) else None


def weight_input_index(node: gs.Node) -> int:
    """Index of a layer's constant weight input: 1, or 0 for MatMul(W, x)."""
    if node.op == "MatMul" and isinstance(node.inputs[0], gs.Constant) and not isinstance(node.inputs[1], gs.Constant):
        return 0
    return 1


def node_label(node: gs.Node) -> str:
    """How reports name a node: its name, else its first output's name, else its op type."""
    return node.name or (node.outputs[0].name if node.outputs else node.op)


def _copy(msg):
    out = type(msg)()
    out.CopyFrom(msg)
    return out


def _copy_fields(src: onnx.ModelProto, dst: onnx.ModelProto) -> None:
    for fd, value in src.ListFields():
        if fd.name == "graph":
            continue
        if fd.is_repeated:
            getattr(dst, fd.name).extend(value)
        elif fd.message_type is not None:
            getattr(dst, fd.name).CopyFrom(value)
        else:
            setattr(dst, fd.name, value)


def _without_graph(model: onnx.ModelProto) -> onnx.ModelProto:
    """The model's own fields (ir_version, opsets, metadata, functions) without copying the graph."""
    out = onnx.ModelProto()
    _copy_fields(model, out)
    return out


class Graph:
    """A model being rewritten: an onnx-graphsurgeon graph plus what gs does not carry.

    ``g.gs`` is the underlying ``onnx_graphsurgeon.Graph``; the helpers below cover what passes
    do most. Build with ``Graph.from_model`` and turn back with ``to_model``.
    """

    def __init__(self, gs_graph: gs.Graph, template: onnx.ModelProto):
        self.gs = gs_graph
        self._template = template  # a ModelProto without graph: opset, metadata, functions
        self._names: set[str] | None = None
        self.source: "onnx.ModelProto | None" = None
        # initializers to_model stores sparse, as Constant(sparse_value) (see sparse_storage.py)
        self.sparse_initializers: set[str] = set()

    # construction ------------------------------------------------------------------------
    @classmethod
    def from_model(cls, model: onnx.ModelProto, *, shapes: bool = True) -> "Graph":
        work = onnx.ModelProto()
        work.CopyFrom(model)
        constants_to_initializers(work)
        sparse_names = densify(work)  # gs carries no sparse tensors: hold them dense
        if shapes:
            annotate_shapes(work)
        graph = cls(gs.import_onnx(work), _without_graph(work))
        graph.sparse_initializers = sparse_names
        graph.source = model  # the model this graph was built from (for activation capture)
        return graph

    def to_model(self) -> onnx.ModelProto:
        """Export, keeping the original ir_version, opset imports and metadata."""
        self.gs.toposort()
        model = gs.export_onnx(self.gs, do_type_check=False)
        # Intermediate shapes may be stale after a rewrite; the next Graph re-infers them.
        del model.graph.value_info[:]
        extra = [op for op in model.opset_import
                 if op.domain not in {o.domain for o in self._template.opset_import}
                 and any(n.domain == op.domain for n in model.graph.node)]
        extra = [_copy(op) for op in extra]
        for fd, _ in model.ListFields():
            if fd.name != "graph":
                model.ClearField(fd.name)
        _copy_fields(self._template, model)
        model.opset_import.extend(extra)
        if model.ir_version < 4:
            # IR < 4 requires every initializer among the graph inputs; gs drops those on import.
            listed = {i.name for i in model.graph.input}
            model.graph.input.extend(onnx.helper.make_tensor_value_info(t.name, t.data_type, list(t.dims))
                                     for t in model.graph.initializer if t.name not in listed)
        store_sparse(model, self.sparse_initializers)
        return model

    def refresh_shapes(self, *, outputs: bool = False) -> None:
        """Re-run shape inference and update every tensor's shape and dtype in place.

        Runs on a light export where large weights are typed graph inputs without values, so
        it costs milliseconds even for VGG-16. With ``outputs=True`` the declared graph-output
        shapes are ignored and replaced by the inferred ones.
        """
        light = self.gs.copy()
        tensors = light.tensors()
        for t in list(tensors.values()):
            # shape/dtype only: touching .values would load lazy weights
            if isinstance(t, gs.Constant) and int(np.prod(t.shape)) > 64 and np.dtype(t.dtype).kind == "f":
                t.to_variable(dtype=t.dtype, shape=list(t.shape))
                t.type = "tensor_type"  # to_variable leaves this unset; export needs it
                light.inputs.append(t)
        if outputs:
            for t in light.outputs:
                t.shape = None
        exported = gs.export_onnx(light, do_type_check=False)
        exported.ir_version = self._template.ir_version
        del exported.opset_import[:]
        exported.opset_import.extend(self._template.opset_import)
        info = inferred(exported)
        found = {}
        for vi in list(info.graph.value_info) + list(info.graph.output):
            tt = vi.type.tensor_type
            if not tt.HasField("shape"):
                continue
            found[vi.name] = [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in tt.shape.dim]
        mine = self.tensors()
        for name, shape in found.items():
            t = mine.get(name)
            if isinstance(t, gs.Variable) and (outputs or not self.is_graph_output(t)):
                t.shape = shape
        self._names = None

    # access ------------------------------------------------------------------------------
    @property
    def nodes(self) -> list[gs.Node]:
        return self.gs.nodes

    @property
    def inputs(self) -> list[gs.Variable]:
        return self.gs.inputs

    @property
    def outputs(self) -> list[gs.Tensor]:
        return self.gs.outputs

    @property
    def opset(self) -> int:
        for op in self._template.opset_import:
            if op.domain in ("", "ai.onnx"):
                return op.version
        return self.gs.opset

    def tensors(self) -> dict[str, gs.Tensor]:
        return self.gs.tensors()

    @staticmethod
    def is_constant(tensor: gs.Tensor) -> bool:
        return isinstance(tensor, gs.Constant)

    value = staticmethod(constant_value)

    @staticmethod
    def producer(tensor: gs.Tensor) -> "gs.Node | None":
        return tensor.inputs[0] if tensor.inputs else None

    @staticmethod
    def consumers(tensor: gs.Tensor) -> list[gs.Node]:
        return list(tensor.outputs)

    def is_graph_output(self, tensor: gs.Tensor) -> bool:
        return any(t is tensor for t in self.gs.outputs)

    def is_graph_input(self, tensor: gs.Tensor) -> bool:
        return any(t is tensor for t in self.gs.inputs)

    def constant_users(self, tensor: gs.Constant) -> int:
        return len(tensor.outputs)

    # editing -----------------------------------------------------------------------------
    def unique_name(self, hint: str) -> str:
        """A tensor/node name not used yet; deterministic for a given graph and hint."""
        if self._names is None:
            self._names = set(self.tensors()) | {n.name for n in self.nodes if n.name}
        name, i = hint, 1
        while name in self._names:
            name = f"{hint}_{i}"
            i += 1
        self._names.add(name)
        return name

    def add_constant(self, hint: str, values: np.ndarray) -> gs.Constant:
        return gs.Constant(self.unique_name(hint), np.ascontiguousarray(values))

    @staticmethod
    def set_inputs(node: gs.Node, tensors: list) -> None:
        """Replace all inputs of ``node`` (gs's synchronized lists do not take slice assignment)."""
        tensors = list(tensors)
        node.inputs.clear()
        node.inputs.extend(tensors)

    def replace_constant(self, node: gs.Node, index: int, values: np.ndarray, hint: str | None = None) -> gs.Constant:
        """Give ``node`` a new constant at input ``index``; other users of the old one keep it."""
        old = node.inputs[index]
        new = self.add_constant(hint or (old.name if old is not None else f"{node.name}_c{index}"), values)
        node.inputs[index] = new
        return new

    def replace_uses(self, old: gs.Tensor, new: gs.Tensor) -> None:
        """Make every consumer of ``old`` read ``new`` instead (graph outputs are not touched)."""
        for consumer in list(old.outputs):
            for i, t in enumerate(consumer.inputs):
                if t is old:
                    consumer.inputs[i] = new

    def bypass(self, node: gs.Node, keep_input: int = 0) -> bool:
        """Remove a single-output node whose output equals its input ``keep_input``.

        When the output is a graph output, the surviving tensor takes over its name so the
        model's interface is unchanged. Returns False (graph untouched) when that is impossible,
        e.g. the input is itself a graph input or a constant.
        """
        src, dst = node.inputs[keep_input], node.outputs[0]
        if self.is_graph_output(dst):
            if (isinstance(src, gs.Constant) or self.is_graph_input(src) or self.is_graph_output(src)
                    or src.dtype != dst.dtype and dst.dtype is not None and src.dtype is not None):
                return False
            self.replace_uses(dst, src)
            self.gs.outputs = [src if t is dst else t for t in self.gs.outputs]
            name, shape = dst.name, dst.shape
            dst.name = f"{name}__bypassed"
            src.name = name
            if shape is not None:
                src.shape = shape
        else:
            self.replace_uses(dst, src)
        node.inputs.clear()
        node.outputs.clear()
        return True

    def remove_unused(self) -> None:
        """Dead-code elimination: drop nodes and initializers that no graph output depends on."""
        self.gs.cleanup(remove_unused_node_outputs=False, remove_unused_graph_inputs=False)
        self.gs.toposort()
        self._names = None

    def toposort(self) -> None:
        self.gs.toposort()


def array_digest(values: np.ndarray) -> str:
    """Content hash of an array (dtype, shape and bytes): equal digests mean equal tensors."""
    h = hashlib.sha256()
    h.update(str(values.dtype).encode())
    h.update(str(values.shape).encode())
    h.update(np.ascontiguousarray(values).tobytes())
    return h.hexdigest()
