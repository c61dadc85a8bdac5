"""analysis/calibration.py and fidelity.py: the documented generator, .npz validation, comparison metrics."""

import numpy as np
import pytest
from onnx import TensorProto
from onnx import helper as h

import onnxslim_cnn
from graphs import conv_bn_model, make_model, vi, user_error
from onnxslim_cnn.analysis.calibration import load_npz, parse_input_shapes, random_inputs
from onnxslim_cnn.analysis.fidelity import compare, fidelity, reference_outputs


def relu_model(x_shape, y_shape=None, dtype=TensorProto.FLOAT):
    return make_model([h.make_node("Relu", ["x"], ["y"])], [vi("x", x_shape, dtype)], [vi("y", y_shape or x_shape, dtype)])


def two_input_model():
    nodes = [h.make_node("Relu", ["a"], ["y"]), h.make_node("Cast", ["b"], ["z"], to=TensorProto.FLOAT)]
    return make_model(nodes, [vi("a", ["N", 3]), vi("b", ["N", 2], TensorProto.INT64)],
                      [vi("y", ["N", 3]), vi("z", ["N", 2])])


# --------------------------------------------------------------------------- generator


def test_generator_is_documented_standard_normal():
    m = conv_bn_model()  # x: [N, 4, 8, 8]
    c = random_inputs(m, samples=5, seed=3)
    x = c.inputs["x"]
    assert x.dtype == np.float32 and x.shape == (5, 4, 8, 8)
    np.testing.assert_array_equal(x, np.random.default_rng(3).standard_normal((5, 4, 8, 8)).astype(np.float32))
    assert c.source == "random(seed=3, samples=5)"
    assert c.batch == 5 and not c.fixed_batch and c.samples == 5
    assert c.cost_shapes() == {"x": (1, 4, 8, 8)}
    assert len(c.warnings) == 1 and "no --calib given" in c.warnings[0]


def test_generator_deterministic_per_seed():
    m = conv_bn_model()
    a, b, other = (random_inputs(m, seed=s).inputs["x"] for s in (0, 0, 1))
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, other)
    assert a.shape[0] == 8  # default samples


def test_generator_inputs_in_graph_order_ints_are_zero():
    c = random_inputs(two_input_model(), samples=4, seed=0)
    rng = np.random.default_rng(0)
    np.testing.assert_array_equal(c.inputs["a"], rng.standard_normal((4, 3)).astype(np.float32))
    assert c.inputs["b"].dtype == np.int64 and c.inputs["b"].shape == (4, 2) and not c.inputs["b"].any()
    m = make_model([h.make_node("Not", ["x"], ["y"])], [vi("x", [2], TensorProto.BOOL)], [vi("y", [2], TensorProto.BOOL)])
    b = random_inputs(m, samples=1).inputs["x"]
    assert b.dtype == np.bool_ and not b.any()


def test_fixed_batch_of_one_runs_in_chunks_of_one():
    m = relu_model([1, 3, 4, 4])
    c = random_inputs(m, samples=8)
    assert c.inputs["x"].shape == (8, 3, 4, 4)
    assert c.batch == 1 and c.fixed_batch
    assert c.cost_shapes() == {"x": (1, 3, 4, 4)}
    names, chunks = reference_outputs(m, c)
    assert names == ["y"] and len(chunks) == 8 and all(ch[0].shape == (1, 3, 4, 4) for ch in chunks)
    np.testing.assert_array_equal(np.concatenate([ch[0] for ch in chunks]), np.maximum(c.inputs["x"], 0))


def test_fixed_batch_draws_whole_runs():
    c = random_inputs(relu_model([2, 3]), samples=5)
    assert c.inputs["x"].shape == (4, 3) and c.batch == 2
    assert c.cost_shapes() == {"x": (2, 3)}  # MACs of one run of the fixed batch
    c = random_inputs(relu_model([4, 3]), samples=2)
    assert c.inputs["x"].shape == (4, 3)


def test_dynamic_non_batch_dim_needs_input_shape():
    m = relu_model(["N", 3, "H", "W"])
    msg = user_error(random_inputs, m)
    assert "'x'" in msg and "--input-shape x=" in msg and "axis 2" in msg and "H" in msg
    c = random_inputs(m, samples=3, input_shapes={"x": (1, 3, 16, 20)})
    assert c.inputs["x"].shape == (3, 3, 16, 20)
    assert c.cost_shapes() == {"x": (1, 3, 16, 20)}


def test_input_shape_errors():
    m = relu_model(["N", 3, "H", "W"])
    assert "rank 2 but the model input has rank 4" in user_error(random_inputs, m, input_shapes={"x": (1, 3)})
    assert "unknown input 'q' (inputs: x)" in user_error(random_inputs, m, input_shapes={"q": (1, 3, 4, 4)})
    assert user_error(random_inputs, m, input_shapes={"x": (1, 4, 8, 8)}) == (
        "--input-shape x: (1, 4, 8, 8) but the model expects ['N', 3, 'H', 'W']")


def test_parse_input_shapes():
    assert parse_input_shapes(["x=1,3,640,640", "y=2x4"]) == {"x": (1, 3, 640, 640), "y": (2, 4)}
    for bad in ("x", "x=", "=1,2", "x=1,a", "x=0,3"):
        assert user_error(parse_input_shapes, [bad]).startswith(f"bad --input-shape {bad!r}")


# --------------------------------------------------------------------------- .npz files


def npz(tmp_path, **arrays):
    p = tmp_path / "calib.npz"
    np.savez(p, **arrays)
    return p


def test_load_npz_ok_and_casts_float64(tmp_path):
    m = conv_bn_model()
    x = np.random.default_rng(0).standard_normal((3, 4, 8, 8))
    p = npz(tmp_path, x=x, extra=np.zeros(2))
    c = load_npz(p, m)
    assert c.inputs["x"].dtype == np.float32 and c.inputs["x"].shape == (3, 4, 8, 8)
    np.testing.assert_array_equal(c.inputs["x"], x.astype(np.float32))
    assert c.source == f"file:{p}" and c.batch == 3 and c.samples == 3
    assert c.warnings == [f"{p}: ignoring arrays that are not model inputs: extra"]


@pytest.mark.parametrize("arrays, expect", [
    ({"q": np.zeros((2, 4, 8, 8), np.float32)}, "no array for model input(s) x (arrays: q)"),
    ({"x": np.zeros((2, 4, 8), np.float32)}, "array 'x' has shape (2, 4, 8), the model input has rank 4"),
    ({"x": np.zeros((2, 3, 8, 8), np.float32)}, "array 'x' has shape (2, 3, 8, 8), the model expects ['N', 4, 8, 8]"),
    ({"x": np.full((2, 4, 8, 8), "a")}, "array 'x' is <U1, the model input is float32"),
    ({"x": np.zeros((2, 4, 8, 8), np.int32)}, "array 'x' is int32, the model input is float32"),
])
def test_load_npz_errors(tmp_path, arrays, expect):
    p = npz(tmp_path, **arrays)
    assert user_error(load_npz, p, conv_bn_model()) == f"{p}: {expect}"


def test_load_npz_disagreeing_sample_counts(tmp_path):
    p = npz(tmp_path, a=np.zeros((3, 3), np.float32), b=np.zeros((2, 2), np.int32))
    assert user_error(load_npz, p, two_input_model()) == f"{p}: arrays disagree on the number of samples (axis 0: [2, 3])"
    c = load_npz(npz(tmp_path, a=np.zeros((3, 3)), b=np.ones((3, 2), np.int32)), two_input_model())
    assert c.inputs["b"].dtype == np.int64  # integer arrays cast to the input's integer type


def test_load_npz_samples_must_fill_fixed_batch(tmp_path):
    m = relu_model([2, 3])
    assert load_npz(npz(tmp_path, x=np.zeros((4, 3), np.float32)), m).batch == 2
    msg = user_error(load_npz, npz(tmp_path, x=np.zeros((3, 3), np.float32)), m)
    assert "3 samples" in msg and "fixed batch 2" in msg


def test_load_npz_bad_files(tmp_path):
    m = conv_bn_model()
    assert user_error(load_npz, tmp_path / "no.npz", m) == f"calibration file not found: {tmp_path / 'no.npz'}"
    text = tmp_path / "t.npz"
    text.write_text("not numpy")
    assert user_error(load_npz, text, m).startswith(f"{text}: not an .npz (zip) file")
    single = tmp_path / "x.npy"
    np.save(single, np.zeros((2, 4, 8, 8), np.float32))  # a .npy is one array, not named arrays
    assert user_error(load_npz, single, m).startswith(f"{single}: not a readable .npz file")


def test_dict_calibration_errors_do_not_name_temp_files():
    msg = user_error(onnxslim_cnn.compress, conv_bn_model(), calib={"q": np.zeros((2, 4, 8, 8), np.float32)})
    assert "tmp" not in msg and "no array for model input(s) x (arrays: q)" in msg


def test_dict_calibration_input_named_like_savez_argument():
    nodes = [h.make_node("Relu", ["file"], ["y"])]
    m = make_model(nodes, [vi("file", ["N", 3])], [vi("y", ["N", 3])])
    _, report = onnxslim_cnn.compress(m, calib={"file": np.ones((2, 3), np.float32)})
    assert report.calibration == "arrays"


# --------------------------------------------------------------------------- fidelity


def test_compare_known_arrays():
    ref = [[np.array([[1.0, 2.0, 4.0]])], [np.array([[3.0, 1.0, 0.0]])]]
    new = [[np.array([[1.0, 2.5, 4.0]])], [np.array([[3.0, 4.0, 0.0]])]]
    out = compare(["y"], ref, new)["y"]
    r, n = np.array([1, 2, 4, 3, 1, 0.0]), np.array([1, 2.5, 4, 3, 4, 0.0])
    assert out["max_abs_error"] == 3.0
    assert out["rel_error"] == 3.0 / 4.0
    assert out["cosine"] == pytest.approx(float(r @ n / np.linalg.norm(r) / np.linalg.norm(n)), rel=1e-12)
    assert out["top1_agreement"] == 0.5  # first sample agrees (argmax 2), second does not (0 vs 1)


def test_compare_identical_zero_and_changed_shape():
    a = np.arange(12, dtype=np.float32).reshape(4, 3) - 5
    same = compare(["y"], [[a]], [[a.copy()]])["y"]
    assert same == {"max_abs_error": 0.0, "rel_error": 0.0, "cosine": pytest.approx(1.0),
                    "cosine_min": pytest.approx(1.0), "top1_agreement": 1.0}
    zero = compare(["y"], [[np.zeros((2, 3))]], [[np.zeros((2, 3))]])["y"]
    assert zero["cosine"] == 1.0 and zero["rel_error"] == 0.0
    off = compare(["y"], [[np.zeros((2, 3))]], [[np.full((2, 3), 0.5)]])["y"]
    assert off["rel_error"] == 0.5 and off["cosine"] == 0.0  # no scale: the absolute figure
    assert compare(["y"], [[np.zeros((2, 3))]], [[np.zeros((2, 4))]])["y"] == {"error": "shape changed: (2, 3) -> (2, 4)"}
    # same values in another shape (OnnxSlim did this to ddddocr's OCR output) is a change too
    assert compare(["y"], [[np.zeros((2, 3))]], [[np.zeros((1, 6))]])["y"] == {"error": "shape changed: (2, 3) -> (1, 6)"}


@pytest.mark.parametrize("shape", [(3, 2, 4), (2, 1), (6,), (2, 3, 1, 1)])
def test_top1_only_for_classifier_outputs(shape):
    # time-major [T, N, C], a single logit, vectors and feature maps are not classifier outputs
    a = np.random.default_rng(0).standard_normal(shape)
    assert "top1_agreement" not in compare(["y"], [[a]], [[a]])["y"]


def test_fidelity_of_model_against_itself():
    m = conv_bn_model()
    c = random_inputs(m, samples=3)
    f = fidelity(m, m, c)
    assert f["y"]["max_abs_error"] == 0.0 and f["y"]["cosine"] == pytest.approx(1.0)
    assert "top1_agreement" not in f["y"]


def test_load_npz_object_array_refused(tmp_path):
    p = tmp_path / "obj.npz"
    np.savez(p, x=np.array([{"a": 1}], dtype=object))
    assert user_error(load_npz, p, conv_bn_model()).startswith(f"{p}: not a readable .npz file")


def test_activations_capture_intermediate_tensors_and_cache():
    import onnx

    import onnxslim_cnn.analysis.activations as act
    from graphs import conv_bn_model
    from onnxslim_cnn.context import PassContext

    model = conv_bn_model()
    x = np.random.default_rng(3).standard_normal((5, 4, 8, 8)).astype(np.float32)
    ctx = PassContext(model, calib={"x": x})
    got = ctx.activations(model, ["c", "bn", "x"])
    assert got["c"].shape == (5, 6, 8, 8) and got["bn"].shape == (5, 6, 8, 8)
    assert got["x"] is ctx.calibration.inputs["x"]
    # BN of the conv output, computed by hand from the model's constants
    w = {t.name: onnx.numpy_helper.to_array(t).astype(np.float64) for t in model.graph.initializer}
    c = got["c"].astype(np.float64)
    scale = w["g"] / np.sqrt(w["v"] + 1e-3)
    expect = (c - w["m"][None, :, None, None]) * scale[None, :, None, None] + w["b"][None, :, None, None]
    assert np.abs(expect - got["bn"]).max() < 1e-4
    calls = []
    real = act.capture
    try:
        act.capture = lambda *a, **k: calls.append(a) or real(*a, **k)
        ctx.activations(model, ["c"])
        assert calls == []  # cached
    finally:
        act.capture = real
    with pytest.raises(KeyError):
        ctx.activations(model, ["w"])
