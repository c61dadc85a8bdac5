"""ONNX Runtime sessions for checks, fidelity, latency and the passes' own measurements.

Every session the compiler builds comes from ``make_session`` (CPU EP, threads pinned for
repeatability, quiet logging); the sparse execution provider's sessions are ``runtime``'s.
"""

from __future__ import annotations

import os
import tempfile

import numpy as np
import onnx
import onnxruntime as ort

from .model_io import needs_external_data, save_model


def make_session(model: "onnx.ModelProto | str | os.PathLike", *, threads: int = 1, optimize: bool = True,
                 providers: "list | None" = None,
                 optimized_model_filepath: "str | os.PathLike | None" = None) -> ort.InferenceSession:
    """An ORT session on a ``ModelProto`` or a model file (read by ORT itself, external data
    next to it); models over ~1.8 GB go through a temporary file with external data.

    ``optimize=False``: no graph optimizations (else ORT's default, ``ORT_ENABLE_ALL``).
    ``optimized_model_filepath``: ORT writes the graph it optimized there.
    """
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    if not optimize:
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    if optimized_model_filepath is not None:
        so.optimized_model_filepath = str(optimized_model_filepath)
    providers = providers or ["CPUExecutionProvider"]
    if isinstance(model, (str, os.PathLike)):
        return ort.InferenceSession(str(model), so, providers=providers)
    if not needs_external_data(model):
        return ort.InferenceSession(model.SerializeToString(), so, providers=providers)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "model.onnx")
        save_model(model, path)
        return ort.InferenceSession(path, so, providers=providers)


def run_chunks(session: ort.InferenceSession, feeds: dict[str, np.ndarray], batch: int,
               output_names: "list[str] | None" = None) -> list[list[np.ndarray]]:
    """Run ``feeds`` through ``session`` in chunks of ``batch`` samples along axis 0.

    Returns the outputs chunk by chunk: outputs are not concatenated because their batch axis
    is not always axis 0 (an LSTM head emits time-major [T, N, C]).
    """
    n = next(iter(feeds.values())).shape[0] if feeds else 1
    step = max(batch, 1)
    return [session.run(output_names, {k: v[s:s + step] for k, v in feeds.items()})
            for s in range(0, max(n, 1), step)]
