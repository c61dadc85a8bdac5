"""Capture intermediate activations with ONNX Runtime (data-aware passes, calibration statistics)."""

from __future__ import annotations

import numpy as np
import onnx

from ..model_io import inferred
from .calibration import CalibrationData
from ..sessions import make_session, run_chunks


def capture(model: onnx.ModelProto, names: list[str], calib: CalibrationData) -> dict[str, np.ndarray]:
    """Run ``model`` on the calibration inputs and return the tensors ``names``.

    Tensors that are graph inputs come straight from the calibration data; initializers are
    not activations and raise ``KeyError``. The model itself is not modified.
    """
    inputs = {i.name for i in model.graph.input}
    inits = {t.name for t in model.graph.initializer}
    out: dict[str, np.ndarray] = {}
    wanted = []
    for n in names:
        if n in inits:
            raise KeyError(f"{n} is an initializer, not an activation")
        if n in inputs and n in calib.inputs:
            out[n] = calib.inputs[n]
        else:
            wanted.append(n)
    if not wanted:
        return out
    types = {vi.name: vi for vi in inferred(model).graph.value_info}
    exposed = onnx.ModelProto()
    exposed.CopyFrom(model)
    existing = {o.name for o in exposed.graph.output}
    for n in wanted:
        if n in existing:
            continue
        if n in types:
            vi = exposed.graph.output.add()
            vi.CopyFrom(types[n])
        else:  # unknown type: ORT accepts an output declared by name only
            exposed.graph.output.add().name = n
    session = make_session(exposed)
    chunks = run_chunks(session, calib.inputs, calib.batch, output_names=wanted)
    for i, n in enumerate(wanted):
        parts = [c[i] for c in chunks]
        out[n] = np.concatenate(parts, axis=0) if parts[0].ndim else parts[0]
    return out


def bytes_per_sample(model: onnx.ModelProto, names: list[str], calib: CalibrationData) -> float:
    """Bytes the tensors ``names`` take per calibration sample: static shape inference at one
    run's input shapes, and for tensors it cannot size, one captured run (0.0 when unknown)."""
    from ..model_io import skeleton, with_static_inputs

    run = calib.batch if calib.fixed_batch else 1
    shapes = {k: (run,) + tuple(v.shape[1:]) for k, v in calib.inputs.items() if v.ndim}
    try:
        info = inferred(with_static_inputs(skeleton(model), shapes))
    except Exception:  # noqa: BLE001 - measured below instead
        info = None
    sized: dict[str, int] = {}
    for vi in list(info.graph.value_info) + list(info.graph.output) + list(info.graph.input) if info else []:
        tt = vi.type.tensor_type
        dims = [d.dim_value if d.HasField("dim_value") else None for d in tt.shape.dim] if tt.HasField("shape") else [None]
        if tt.elem_type and all(d is not None for d in dims):
            itemsize = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type)).itemsize
            sized[vi.name] = int(np.prod(dims, dtype=np.int64)) * itemsize
    total = sum(sized.get(n, 0) for n in names)
    unknown = [n for n in names if n not in sized and n not in calib.inputs]
    if unknown:
        one = calib.subset(np.arange(run))
        try:
            total += sum(v.nbytes for v in capture(model, unknown, one).values())
        except Exception:  # noqa: BLE001 - the capture itself will say what is wrong
            return 0.0
    return total / run
