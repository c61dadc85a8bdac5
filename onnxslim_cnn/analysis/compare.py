"""Run a model on calibration data and compare its outputs with a reference's.

``run`` gives a model's outputs chunk by chunk, as ``sessions.run_chunks`` does (an output's
batch axis is not always axis 0, so chunks are not concatenated along it); ``flat`` turns one
output of all chunks into one float64 vector and ``outputs`` does that for every output.
``cosine``, ``cosines`` and ``least_cosine`` compare such vectors, accumulating in float64.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort

from ..sessions import make_session, run_chunks
from .calibration import CalibrationData


def session_of(model_or_session: "onnx.ModelProto | ort.InferenceSession", *,
               optimize: bool = True) -> ort.InferenceSession:
    """``model_or_session`` itself when it is a session, else ``make_session(model, optimize=...)``."""
    if isinstance(model_or_session, ort.InferenceSession):
        return model_or_session
    return make_session(model_or_session, optimize=optimize)


def run(model_or_session: "onnx.ModelProto | ort.InferenceSession", calib: CalibrationData, *,
        output_names: "list[str] | None" = None,
        optimize: bool = True) -> tuple[list[str], list[list[np.ndarray]]]:
    """(output names, outputs chunk by chunk) of the model on ``calib.inputs`` in runs of
    ``calib.batch`` samples; ``output_names=None``: every graph output, in the graph's order."""
    sess = session_of(model_or_session, optimize=optimize)
    names = [o.name for o in sess.get_outputs()] if output_names is None else list(output_names)
    return names, run_chunks(sess, calib.inputs, calib.batch, output_names=output_names)


def flat(chunks: list[list[np.ndarray]], index: int) -> np.ndarray:
    """Output ``index`` of every chunk, raveled and concatenated into one float64 vector."""
    return np.concatenate([np.asarray(c[index], dtype=np.float64).ravel() for c in chunks])


def outputs(model_or_session: "onnx.ModelProto | ort.InferenceSession", calib: CalibrationData, *,
            optimize: bool = True) -> list[np.ndarray]:
    """Every graph output on ``calib`` as one float64 vector (see ``flat``), in the graph's order."""
    names, chunks = run(model_or_session, calib, optimize=optimize)
    return [flat(chunks, i) for i in range(len(names))]


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    """Cosine similarity of two vectors; 1.0 for two equal zero vectors, 0.0 against a zero vector."""
    den = float(np.linalg.norm(a) * np.linalg.norm(b))
    return float(a @ b / den) if den > 0 else float(np.array_equal(a, b))


def least_sample_cosine(ref_chunks: list[list[np.ndarray]], new_chunks: list[list[np.ndarray]], index: int) -> float:
    """The least cosine of one sample's output ``index`` to the reference's, over the samples
    (axis 0 of each chunk); the whole-output cosine for outputs without a batch axis.

    Reported beside the cosine over all samples: a classifier's probabilities barely move that
    cosine while a few samples swing (ppocr_cls_v2 pruned at 0.05: 0.9987 over 64 samples, one
    sample at 0.928). Not what the budget bounds: PP-OCRv4 rec's per-position CTC distributions
    swing at uncertain positions with its character error rate unchanged.
    """
    worst = 1.0
    for a_chunk, b_chunk in zip(ref_chunks, new_chunks):
        a, b = np.asarray(a_chunk[index], np.float64), np.asarray(b_chunk[index], np.float64)
        if a.ndim < 2 or a.shape != b.shape:
            return cosine(flat(ref_chunks, index), flat(new_chunks, index))
        a, b = a.reshape(len(a), -1), b.reshape(len(b), -1)
        na, nb = np.linalg.norm(a, axis=1), np.linalg.norm(b, axis=1)
        den = na * nb
        equal = np.all(a == b, axis=1)
        cos = np.where(den > 0, np.sum(a * b, axis=1) / np.where(den > 0, den, 1.0), equal.astype(np.float64))
        if cos.size:
            worst = min(worst, float(cos.min()))
    return worst


def cosines(reference: list[np.ndarray], new: list[np.ndarray]) -> list[float]:
    """Per output, the cosine of ``new`` to ``reference`` (both as ``outputs`` returns them)."""
    return [cosine(a, b) for a, b in zip(reference, new)]


def least_cosine(reference: list[np.ndarray], new: list[np.ndarray]) -> float:
    """The least per-output cosine: how far the worst output moved."""
    return min(cosines(reference, new))
