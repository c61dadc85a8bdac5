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


def check_model(model: onnx.ModelProto, full_check: bool = True) -> None:
    """``onnx.checker.check_model``, going through a file for models over 2 GB."""
    if model.ByteSize() < EXTERNAL_DATA_THRESHOLD:
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
    path = Path(path)
    folder = path.parent if str(path.parent) else Path(".")
    folder.mkdir(parents=True, exist_ok=True)
    large = model.ByteSize() >= EXTERNAL_DATA_THRESHOLD
    tmp_dir = tempfile.mkdtemp(prefix=".onnxslim-", dir=folder)
    try:
        tmp_model = os.path.join(tmp_dir, path.name)
        written = [path]
        if large:
            data_name = path.name + ".data"
            to_save = onnx.ModelProto()
            to_save.CopyFrom(model)
            onnx.save_model(to_save, tmp_model, save_as_external_data=True,
                            all_tensors_to_one_file=True, location=data_name, size_threshold=1024)
            os.replace(os.path.join(tmp_dir, data_name), folder / data_name)
            written.append(folder / data_name)
        else:
            with open(tmp_model, "wb") as f:
                f.write(model.SerializeToString(deterministic=True))
        os.replace(tmp_model, path)
        return written
    finally:
        for leftover in Path(tmp_dir).glob("*"):
            leftover.unlink()
        os.rmdir(tmp_dir)


def model_bytes(model: onnx.ModelProto) -> int:
    """Serialized size in bytes (the file size, external data included)."""
    return model.ByteSize()


def serialize(model: onnx.ModelProto) -> bytes:
    return model.SerializeToString(deterministic=True)


def infer_shapes(model: onnx.ModelProto) -> onnx.ModelProto:
    """ONNX shape inference with data propagation; symbolic dims such as the batch stay symbolic.

    Returns a new model (the input is untouched). On failure the model comes back un-annotated:
    shape information is a help for passes, never a requirement for correctness.
    """
    try:
        if model.ByteSize() < EXTERNAL_DATA_THRESHOLD:
            return onnx.shape_inference.infer_shapes(model, strict_mode=False, data_prop=True)
        with tempfile.TemporaryDirectory() as tmp:
            src, dst = os.path.join(tmp, "in.onnx"), os.path.join(tmp, "out.onnx")
            save_model(model, src)
            onnx.shape_inference.infer_shapes_path(src, dst, strict_mode=False, data_prop=True)
            return onnx.load(dst, load_external_data=True)
    except Exception:
        return model


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


class Graph:
    """A model being rewritten: an onnx-graphsurgeon graph plus what gs does not carry.

    ``g.gs`` is the underlying ``onnx_graphsurgeon.Graph``; the helpers below cover what passes
    do most. Build with ``Graph.from_model`` and turn back with ``to_model``.
    """

    def __init__(self, gs_graph: gs.Graph, template: onnx.ModelProto):
        self.gs = gs_graph
        self._template = template  # a ModelProto without graph: opset, metadata, functions
        self._names: set[str] | None = None

    # construction ------------------------------------------------------------------------
    @classmethod
    def from_model(cls, model: onnx.ModelProto, *, shapes: bool = True) -> "Graph":
        work = onnx.ModelProto()
        work.CopyFrom(model)
        constants_to_initializers(work)
        if shapes:
            del work.graph.value_info[:]
            work = infer_shapes(work)
        template = onnx.ModelProto()
        template.CopyFrom(work)
        template.ClearField("graph")
        return cls(gs.import_onnx(work), template)

    def to_model(self) -> onnx.ModelProto:
        """Export, keeping the original ir_version, opset imports and metadata."""
        self.gs.toposort()
        exported = gs.export_onnx(self.gs, do_type_check=False)
        # Intermediate shapes may be stale after a rewrite; the next Graph re-infers them.
        del exported.graph.value_info[:]
        model = onnx.ModelProto()
        model.CopyFrom(self._template)
        model.graph.CopyFrom(exported.graph)
        known = {op.domain for op in model.opset_import}
        for op in exported.opset_import:
            if op.domain not in known and any(n.domain == op.domain for n in model.graph.node):
                model.opset_import.append(op)
        return model

    def refresh_shapes(self) -> None:
        """Re-run shape inference on the current graph (after rewrites that made shapes knowable)."""
        fresh = Graph.from_model(self.to_model())
        self.gs = fresh.gs
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

    @staticmethod
    def value(tensor: gs.Tensor) -> "np.ndarray | None":
        """The array of a constant tensor, or None for a variable."""
        if isinstance(tensor, gs.Constant):
            return np.asarray(tensor.values)
        return None

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
