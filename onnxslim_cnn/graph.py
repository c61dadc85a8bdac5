"""Graph core: a thin layer over onnx-graphsurgeon.

Everything a pass needs to read or rewrite a model lives here: loading from a path or a
``ModelProto`` (external data and models over 2 GB included), shape inference that keeps a
symbolic batch dimension, initializer access, producers/consumers, node bypassing, topological
order and cleanup, and an export that keeps the model's opset and metadata.

A ``Graph`` is built fresh from a ``ModelProto`` for every pass (see ``pipeline``), so shapes
are always inferred from the current model and never stale after a pass resized a tensor.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path
from typing import Iterable

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import numpy_helper

from .errors import UserError
from .sparse_storage import densify, store_sparse

# Protobuf cannot serialize a message of 2 GiB or more; beyond this we go through external data.
PROTO_LIMIT = 2**31 - 1
EXTERNAL_DATA_THRESHOLD = 1_800_000_000

from onnx_graphsurgeon.logger import G_LOGGER  # noqa: E402

# gs logs folding failures as warnings; we report what was skipped ourselves.
G_LOGGER.severity = G_LOGGER.CRITICAL


# --------------------------------------------------------------------------- loading / saving


def load_model(source: "str | os.PathLike | onnx.ModelProto") -> onnx.ModelProto:
    """Read a model from a path or copy a ``ModelProto``; never modifies the source.

    Raises ``UserError`` (one line) for a missing file, a file that is not ONNX, a truncated
    model or a model the ONNX checker rejects.
    """
    if isinstance(source, onnx.ModelProto):
        model = onnx.ModelProto()
        model.CopyFrom(source)
        label = "<ModelProto>"
    elif isinstance(source, (str, os.PathLike)):
        path = Path(source)
        label = str(path)
        if not path.exists():
            raise UserError(f"input model not found: {path}")
        if not path.is_file():
            raise UserError(f"input model is not a file: {path}")
        if path.stat().st_size == 0:
            raise UserError(f"input model is empty: {path}")
        try:
            model = onnx.load(str(path), load_external_data=True)
        except Exception as exc:  # DecodeError, missing external data, ...
            with path.open("rb") as f:
                _refuse_container(f.read(8), label)
            raise UserError(f"{path}: not a readable ONNX model ({_one_line(exc)})") from None
    else:
        raise UserError(f"expected a path or onnx.ModelProto, got {type(source).__name__}")
    if not model.graph.node and not model.graph.output:
        raise UserError(f"{label}: not an ONNX model (no graph found; truncated or wrong file type?)")
    try:
        check_model(model, full_check=False)
    except Exception as exc:
        raise UserError(f"{label}: invalid ONNX model ({_one_line(exc)})") from None
    return model


def _refuse_container(head: bytes, label: str) -> None:
    """A .onnxz (container.MAGIC) passed where a model is expected: say what to do with it."""
    from .container import MAGIC

    if head[:len(MAGIC)] == MAGIC:
        raise UserError(f"{label} is an onnxslim container (written by 'onnxslim pack'); run 'onnxslim unpack' first")


def check_model(model: onnx.ModelProto, full_check: bool = True) -> None:
    """``onnx.checker.check_model``, going through a file for models over 2 GB."""
    if approx_bytes(model) < EXTERNAL_DATA_THRESHOLD:
        onnx.checker.check_model(model, full_check=full_check)
        return
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "model.onnx")
        save_model(model, path)
        onnx.checker.check_model(path, full_check=full_check)


def save_model(model: onnx.ModelProto, path: "str | os.PathLike") -> list[Path]:
    """Write ``model`` to ``path`` atomically: a temp file in the same folder, then a rename.

    Models over ~1.8 GB get their weights in ``<name>.data`` next to the file. Returns the
    paths written. Nothing is left behind if writing fails.
    """
    from .files import write_error

    path = Path(path)
    folder = path.parent if str(path.parent) else Path(".")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        tmp_dir = tempfile.mkdtemp(prefix=".onnxslim-", dir=folder)
    except OSError as exc:
        raise write_error(path, exc) from None
    large = approx_bytes(model) >= EXTERNAL_DATA_THRESHOLD
    try:
        tmp_model = os.path.join(tmp_dir, path.name)
        written = [path]
        if large:
            data_name = path.name + ".data"
            to_save = onnx.ModelProto()
            to_save.CopyFrom(model)
            onnx.save_model(to_save, tmp_model, save_as_external_data=True,
                            all_tensors_to_one_file=True, location=data_name, size_threshold=1024)
            # onnx writes no data file when every tensor is under size_threshold.
            if os.path.exists(os.path.join(tmp_dir, data_name)):
                os.replace(os.path.join(tmp_dir, data_name), folder / data_name)
                written.append(folder / data_name)
        else:
            with open(tmp_model, "wb") as f:
                f.write(model.SerializeToString(deterministic=True))
        os.replace(tmp_model, path)
        return written
    except OSError as exc:  # disk full, permissions: the user's to fix, one line
        raise write_error(path, exc) from None
    finally:
        for leftover in Path(tmp_dir).glob("*"):
            leftover.unlink()
        os.rmdir(tmp_dir)


def approx_bytes(model: onnx.ModelProto) -> int:
    """Cheap size estimate (initializer payloads from their dims): ``ByteSize`` walks the whole
    message, which costs ~0.15 s per 100 MB and is called on every check."""
    total = 0
    for t in model.graph.initializer:
        if t.data_location == onnx.TensorProto.EXTERNAL:
            continue
        n = int(np.prod(t.dims, dtype=np.int64))
        total += n * _ITEMSIZE.get(t.data_type, 8)
    for node in model.graph.node:  # Paddle exports keep every weight in Constant nodes
        if node.op_type == "Constant":
            for a in node.attribute:
                if a.name == "value":
                    total += int(np.prod(a.t.dims, dtype=np.int64)) * _ITEMSIZE.get(a.t.data_type, 8)
    return total + 1_000_000  # nodes, names, attributes: generous for any CNN


_ITEMSIZE = {onnx.TensorProto.FLOAT: 4, onnx.TensorProto.FLOAT16: 2, onnx.TensorProto.BFLOAT16: 2,
             onnx.TensorProto.DOUBLE: 8, onnx.TensorProto.INT8: 1, onnx.TensorProto.UINT8: 1,
             onnx.TensorProto.INT32: 4, onnx.TensorProto.INT64: 8, onnx.TensorProto.BOOL: 1}


def model_bytes(model: onnx.ModelProto) -> int:
    """Serialized size in bytes (the file size, external data included)."""
    return model.ByteSize()


def serialize(model: onnx.ModelProto) -> bytes:
    return model.SerializeToString(deterministic=True)


def skeleton(model: onnx.ModelProto) -> onnx.ModelProto:
    """The model without the payload of its large float weights (dims and types kept).

    Shape inference needs every tensor's type and shape but only the values of small integer
    tensors (shapes, axes); going through the skeleton avoids serializing hundreds of MB of
    weights for each inference (VGG-16: 4 s -> 10 ms).
    """
    sk = onnx.ModelProto()
    sk.ir_version = model.ir_version
    sk.opset_import.extend(model.opset_import)
    sk.functions.extend(model.functions)
    g, src = sk.graph, model.graph
    g.name = src.name or "graph"
    g.node.extend(src.node)
    g.input.extend(src.input)
    g.output.extend(src.output)
    g.value_info.extend(src.value_info)
    g.sparse_initializer.extend(src.sparse_initializer)
    for t in src.initializer:
        if t.data_type in _FLOAT_TYPES and int(np.prod(t.dims, dtype=np.int64)) > 64:
            stub = g.initializer.add()
            stub.name, stub.data_type = t.name, t.data_type
            stub.dims.extend(t.dims)
        else:
            g.initializer.add().CopyFrom(t)
    return sk


_FLOAT_TYPES = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16, onnx.TensorProto.DOUBLE}


def inferred(model: onnx.ModelProto) -> onnx.ModelProto:
    """ONNX shape inference (with data propagation) on the model's skeleton.

    Symbolic dims such as the batch stay symbolic. On failure the skeleton comes back
    un-annotated: shape information helps passes but is never required for correctness.
    """
    sk = skeleton(model)
    try:
        return onnx.shape_inference.infer_shapes(sk, strict_mode=False, data_prop=True)
    except Exception:
        return sk


def annotate_shapes(model: onnx.ModelProto) -> None:
    """Replace ``model``'s value_info and graph output types by freshly inferred ones, in place."""
    del model.graph.value_info[:]
    info = inferred(model)
    model.graph.value_info.extend(info.graph.value_info)
    by_name = {o.name: o for o in info.graph.output}
    for o in model.graph.output:
        if o.name in by_name:
            o.CopyFrom(by_name[o.name])


def infer_shapes(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``model`` annotated by shape inference (the input is untouched)."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    annotate_shapes(out)
    return out


def with_static_inputs(model: onnx.ModelProto, shapes: dict[str, tuple[int, ...]]) -> onnx.ModelProto:
    """A copy of ``model`` whose graph inputs have the given concrete shapes (for cost analysis)."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    del out.graph.value_info[:]
    for inp in out.graph.input:
        if inp.name in shapes:
            dims = inp.type.tensor_type.shape.dim
            del dims[:]
            for d in shapes[inp.name]:
                dims.add().dim_value = int(d)
    return out


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0][:300]


# --------------------------------------------------------------------------- the Graph wrapper


def constants_to_initializers(model: onnx.ModelProto) -> int:
    """Turn top-level ``Constant`` nodes into initializers (Paddle exports keep every weight in them).

    Returns how many were converted. Subgraphs are left alone: their constants are local.
    """
    keep, converted = [], 0
    init_names = {t.name for t in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant" and node.domain in ("", "ai.onnx") and len(node.attribute) == 1:
            tensor = _constant_attr_to_tensor(node.attribute[0])
            if tensor is not None and node.output[0] not in init_names:
                tensor.name = node.output[0]
                model.graph.initializer.append(tensor)
                init_names.add(tensor.name)
                converted += 1
                continue
        keep.append(node)
    if converted:
        del model.graph.node[:]
        model.graph.node.extend(keep)
    return converted


def _constant_attr_to_tensor(attr: onnx.AttributeProto) -> "onnx.TensorProto | None":
    if attr.name == "value" and attr.type == onnx.AttributeProto.TENSOR:
        t = onnx.TensorProto()
        t.CopyFrom(attr.t)
        return t
    simple = {
        "value_float": (lambda a: np.array(a.f, dtype=np.float32)),
        "value_floats": (lambda a: np.array(list(a.floats), dtype=np.float32)),
        "value_int": (lambda a: np.array(a.i, dtype=np.int64)),
        "value_ints": (lambda a: np.array(list(a.ints), dtype=np.int64)),
    }
    if attr.name in simple:
        return numpy_helper.from_array(simple[attr.name](attr))
    return None  # sparse_value / strings: leave the Constant node as it is


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


def iter_initializer_arrays(model: onnx.ModelProto) -> Iterable[tuple[str, np.ndarray]]:
    for t in model.graph.initializer:
        yield t.name, numpy_helper.to_array(t)
