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
