"""Model files: loading, checks, atomic saves and shape inference on a ``ModelProto``.

Loading from a path or a ``ModelProto`` (external data and models over 2 GB included), the ONNX
checker, an atomic save that puts weights in external data over ~1.8 GB, and shape inference on
a weight-free *skeleton* that keeps a symbolic batch dimension. Everything here works on
``onnx.ModelProto``; the ``Graph`` wrapper a pass rewrites lives in ``graph.py``.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Iterable

import numpy as np
import onnx
from onnx import numpy_helper

from .errors import UserError

# Protobuf cannot serialize a message of 2 GiB or more; beyond this we go through external data.
PROTO_LIMIT = 2**31 - 1
EXTERNAL_DATA_THRESHOLD = 1_800_000_000


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
    if not needs_external_data(model):
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
    from . import workdir
    from .files import write_error

    path = Path(path)
    folder = path.parent if str(path.parent) else Path(".")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        workdir.sweep(folder, staged=True)
        tmp_dir = tempfile.mkdtemp(prefix=f".onnxslim-{os.getpid()}-", dir=folder)
        workdir.track(tmp_dir)
    except OSError as exc:
        raise write_error(path, exc) from None
    large = needs_external_data(model)
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
        workdir.untrack(tmp_dir)


def needs_external_data(model: onnx.ModelProto) -> bool:
    """Whether ``model`` is too big for one protobuf message: ``save_model`` then writes its
    weights to external data, and checks and sessions go through such a file."""
    return approx_bytes(model) >= EXTERNAL_DATA_THRESHOLD


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


# --------------------------------------------------------------------------- initializers


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


def iter_initializer_arrays(model: onnx.ModelProto) -> Iterable[tuple[str, np.ndarray]]:
    for t in model.graph.initializer:
        yield t.name, numpy_helper.to_array(t)
