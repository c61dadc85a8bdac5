"""analysis/compare.py (run on calibration data, compare outputs) and sessions.py (the ORT session factory)."""

import numpy as np
import onnx
import pytest
from onnx import helper as h

from graphs import init, make_model, vi
from onnxslim_cnn import model_io
from onnxslim_cnn.analysis import compare
from onnxslim_cnn.analysis.calibration import CalibrationData
from onnxslim_cnn.analysis.fidelity import compare as fidelity_compare
from onnxslim_cnn.sessions import make_session

RNG = np.random.default_rng(11)
W = RNG.standard_normal((5, 3)).astype(np.float32)
X = RNG.standard_normal((7, 5)).astype(np.float32)


def two_output_model(w: np.ndarray) -> onnx.ModelProto:
    """y = x @ w ([N, 3]) and r = relu(x) ([N, 5]): two outputs of different sizes."""
    nodes = [h.make_node("MatMul", ["x", "w"], ["y"], name="mm"), h.make_node("Relu", ["x"], ["r"], name="relu")]
    return make_model(nodes, [vi("x", ["N", 5])], [vi("y", ["N", 3]), vi("r", ["N", 5])], [init("w", w)])


def calib(batch: int) -> CalibrationData:
    return CalibrationData(inputs={"x": X}, source="test", batch=batch)


def numpy_cosine(a, b):
    a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    return float(np.sum(a * b) / np.sqrt(np.sum(a * a) * np.sum(b * b)))


@pytest.mark.parametrize("batch", [1, 3, 7])
def test_outputs_are_each_graph_output_flattened_in_float64(batch):
    got = compare.outputs(two_output_model(W), calib(batch))
    assert [o.dtype for o in got] == [np.float64, np.float64]
    # 7 samples in runs of `batch` (the last run shorter): concatenated back in sample order
    np.testing.assert_allclose(got[0], (X.astype(np.float64) @ W).ravel(), rtol=1e-5)
    np.testing.assert_array_equal(got[1], np.maximum(X, 0).astype(np.float64).ravel())


def test_run_keeps_chunks_and_names():
    names, chunks = compare.run(two_output_model(W), calib(3))
    assert names == ["y", "r"]
    assert [c[0].shape[0] for c in chunks] == [3, 3, 1]
    names, chunks = compare.run(two_output_model(W), calib(3), output_names=["r"])
    assert names == ["r"] and all(len(c) == 1 and c[0].shape[1] == 5 for c in chunks)
    np.testing.assert_array_equal(compare.flat(chunks, 0), np.maximum(X, 0).ravel())


def test_cosine_of_a_perturbed_model_equals_numpy():
    w2 = W + 0.3 * RNG.standard_normal(W.shape).astype(np.float32)
    ref = compare.outputs(two_output_model(W), calib(2))
    new = compare.outputs(two_output_model(w2), calib(4))
    expect_y = numpy_cosine(X.astype(np.float64) @ W, X.astype(np.float64) @ w2)
    cos = compare.cosines(ref, new)
    assert cos[0] == pytest.approx(expect_y, abs=1e-6) and cos[0] < 0.999
    assert cos[1] == 1.0  # relu(x) did not change
    assert compare.least_cosine(ref, new) == cos[0]


def test_a_session_is_used_as_given():
    model = two_output_model(W)
    sess = make_session(model)
    assert compare.session_of(sess) is sess
    for a, b in zip(compare.outputs(sess, calib(2)), compare.outputs(model, calib(2))):
        np.testing.assert_array_equal(a, b)


def test_cosine_edge_cases():
    z = np.zeros(4)
    assert compare.cosine(z, z) == 1.0
    assert compare.cosine(z, np.ones(4)) == 0.0
    assert compare.cosine(np.array([1.0, 0.0]), np.array([-2.0, 0.0])) == -1.0


def test_fidelity_compare_reports_the_same_cosine():
    w2 = W * np.float32(1.5) + np.float32(0.1)
    _, ref = compare.run(two_output_model(W), calib(3))
    _, new = compare.run(two_output_model(w2), calib(3))
    f = fidelity_compare(["y", "r"], ref, new)
    assert f["y"]["cosine"] == compare.cosine(compare.flat(ref, 0), compare.flat(new, 0))
    assert f["y"]["cosine"] == pytest.approx(numpy_cosine(X @ W, X @ w2), abs=1e-6)


# --------------------------------------------------------------------------- sessions


def test_make_session_on_a_file_writes_the_optimized_model(tmp_path):
    model = two_output_model(W)
    path = tmp_path / "m.onnx"
    model_io.save_model(model, path)
    opt = tmp_path / "opt.onnx"
    sess = make_session(path, optimized_model_filepath=opt)
    y, r = sess.run(None, {"x": X})
    np.testing.assert_allclose(y, X @ W, rtol=1e-5)
    optimized = onnx.load(str(opt))
    assert [o.name for o in optimized.graph.output] == ["y", "r"]


def test_make_session_unoptimized_keeps_the_graph(tmp_path):
    # Identity is removed by ORT's basic optimizations, kept with optimize=False.
    nodes = [h.make_node("Identity", ["x"], ["t"], name="id"), h.make_node("Relu", ["t"], ["r"], name="relu")]
    model = make_model(nodes, [vi("x", ["N", 5])], [vi("r", ["N", 5])])
    ops = {}
    for optimize in (True, False):
        opt = tmp_path / f"opt_{optimize}.onnx"
        make_session(model, optimize=optimize, optimized_model_filepath=opt)
        ops[optimize] = [n.op_type for n in onnx.load(str(opt)).graph.node]
    assert ops == {True: ["Relu"], False: ["Identity", "Relu"]}


def test_needs_external_data_follows_the_threshold(monkeypatch):
    model = two_output_model(W)
    assert not model_io.needs_external_data(model)
    monkeypatch.setattr(model_io, "EXTERNAL_DATA_THRESHOLD", model_io.approx_bytes(model))
    assert model_io.needs_external_data(model)
