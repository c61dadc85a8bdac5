"""Fidelity of a rewritten model against the original, both run in ONNX Runtime on the same inputs."""

from __future__ import annotations

import time

import numpy as np
import onnx

from ..sessions import make_session
from .calibration import CalibrationData
from .compare import cosine, flat, least_sample_cosine, run, session_of


def reference_outputs(model: onnx.ModelProto, calib: CalibrationData,
                      session=None) -> tuple[list[str], list[list[np.ndarray]]]:
    return run(session or model, calib)


def _per_position_probabilities(ref: list[list[np.ndarray]], i: int) -> bool:
    """Output ``i`` is [N, T, ..., C] with a probability distribution over C > 1 classes at each
    position (values in [0, 1] summing to 1): a sequence classifier such as a CTC text
    recogniser, decoded by the argmax at each position, so top-1 agreement is counted per
    position. Rank-3 outputs that are not distributions (box regressions) are left out."""
    for c in ref:
        a = np.asarray(c[i])
        if a.ndim < 3 or a.shape[-1] < 2 or not np.issubdtype(a.dtype, np.floating) or not a.size:
            return False
        if a.min() < 0 or a.max() > 1 or not np.allclose(a.sum(axis=-1), 1.0, atol=1e-3):
            return False
    return True


def compare(names: list[str], ref: list[list[np.ndarray]], new: list[list[np.ndarray]]) -> dict:
    """Per output: max abs error, error relative to the output's scale, cosine, top-1 agreement.

    ``rel_error`` is max|new - ref| / max|ref| (the "relative to output scale" figure the tests
    bound). ``cosine`` is over all samples at once (what the accuracy budget bounds),
    ``cosine_min`` the least of one sample's (``compare.least_sample_cosine``). Top-1 agreement
    (``top1_agreement``) is given for classifier-shaped outputs: per sample for rank 2, [N, C]
    with C > 1, and per position for per-position distributions (``_per_position_probabilities``).
    """
    out = {}
    for i, name in enumerate(names):
        shapes_ref, shapes_new = [np.shape(c[i]) for c in ref], [np.shape(c[i]) for c in new]
        if shapes_ref != shapes_new:
            out[name] = {"error": f"shape changed: {shapes_ref[0]} -> {shapes_new[0]}"}
            continue
        r, n = flat(ref, i), flat(new, i)
        diff = np.abs(r - n)
        scale = float(np.max(np.abs(r))) if r.size else 0.0
        entry = {
            "max_abs_error": float(diff.max()) if diff.size else 0.0,
            "rel_error": float(diff.max() / scale) if diff.size and scale > 0 else float(diff.max() if diff.size else 0.0),
            "cosine": cosine(r, n),
            "cosine_min": least_sample_cosine(ref, new, i),
        }
        if all(np.ndim(c[i]) == 2 and np.shape(c[i])[1] > 1 for c in ref) or _per_position_probabilities(ref, i):
            agree = [np.argmax(a[i], axis=-1).ravel() == np.argmax(b[i], axis=-1).ravel() for a, b in zip(ref, new)]
            entry["top1_agreement"] = float(np.mean(np.concatenate(agree)))
        out[name] = entry
    return out


def fidelity(original: onnx.ModelProto, rewritten: onnx.ModelProto, calib: CalibrationData,
             reference: "tuple[list[str], list[list[np.ndarray]]] | None" = None, session=None) -> dict:
    """``session``: an ORT session already built for ``rewritten`` (saves a reload)."""
    names, ref = reference or reference_outputs(original, calib)
    sess = session_of(session or rewritten)
    new_names = [o.name for o in sess.get_outputs()]
    _, new = run(sess, calib, output_names=names if set(names) <= set(new_names) else None)
    return compare(names, ref, new)


def latency(model: onnx.ModelProto, calib: CalibrationData, *, threads: int = 1, repeats: int = 20,
            warmup: int = 3) -> dict:
    """Median/min wall time of one ORT run on one calibration batch, CPU EP, ``threads`` threads."""
    sess = make_session(model, threads=threads)
    feeds = {k: v[:calib.batch] for k, v in calib.inputs.items()}
    for _ in range(warmup):
        sess.run(None, feeds)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        sess.run(None, feeds)
        times.append(time.perf_counter() - t0)
    return {"median_ms": float(np.median(times) * 1e3), "min_ms": float(np.min(times) * 1e3),
            "threads": threads, "repeats": repeats, "batch": calib.batch}
