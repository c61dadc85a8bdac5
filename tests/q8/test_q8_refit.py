"""q8 refit_weights: int8 weights and biases refitted to the int8 model's own inputs (passes/q8_refit.py)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import helper as h
from onnx import numpy_helper as nh

from graphs import init, make_model, run, vi
from onnxslim_cnn.models import digits
from onnxslim_cnn.passes.q8 import Q8Pass
from onnxslim_cnn.passes.q8.refit import conv_columns, conv_output_positions, fit_rounding, refit_target


def _toy(rng) -> onnx.ModelProto:
    """Strided conv, dilated depthwise conv, bias-free 1x1 conv, Gemm(transB), MatMul, ConvTranspose."""
    nodes = [
        h.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv1", strides=[2, 2], pads=[1, 1, 1, 1]),
        h.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        h.make_node("Conv", ["r1", "w2", "b2"], ["c2"], name="dw", group=8, pads=[2, 2, 2, 2], dilations=[2, 2]),
        h.make_node("Relu", ["c2"], ["r2"], name="relu2"),
        h.make_node("Conv", ["r2", "w3"], ["c3"], name="pw"),
        h.make_node("Relu", ["c3"], ["r3"], name="relu3"),
        h.make_node("ConvTranspose", ["r3", "wt", "bt"], ["up"], name="up", strides=[2, 2]),
        h.make_node("GlobalAveragePool", ["r3"], ["g"], name="gap"),
        h.make_node("Flatten", ["g"], ["f"], name="flat"),
        h.make_node("Gemm", ["f", "wf", "bf"], ["fc"], name="fc", transB=1),
        h.make_node("Relu", ["fc"], ["rf"], name="relu4"),
        h.make_node("MatMul", ["rf", "wm"], ["y"], name="mm"),
    ]
    inits = [init("w1", rng.normal(size=(8, 3, 3, 3)) * 0.4), init("b1", rng.normal(size=8) * 0.1),
             init("w2", rng.normal(size=(8, 1, 3, 3)) * 0.5), init("b2", rng.normal(size=8) * 0.1),
             init("w3", rng.normal(size=(12, 8, 1, 1)) * 0.4),
             init("wt", rng.normal(size=(12, 4, 2, 2)) * 0.3), init("bt", rng.normal(size=4) * 0.1),
             init("wf", rng.normal(size=(10, 12))), init("bf", rng.normal(size=10) * 0.1),
             init("wm", rng.normal(size=(10, 5)))]
    return make_model(nodes, [vi("x", ["N", 3, 16, 16])], [vi("y", ["N", 5]), vi("up", ["N", 4, 16, 16])],
                      inits, opset=13)


def _cosine(a, b):
    a, b = np.ravel(a).astype(np.float64), np.ravel(b).astype(np.float64)
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


@pytest.mark.parametrize("attrs,wshape", [
    ({"strides": [2, 2], "pads": [1, 1, 1, 1]}, (6, 4, 3, 3)),
    ({"group": 4, "pads": [2, 1, 2, 0], "dilations": [2, 1]}, (4, 1, 3, 2)),
    ({"group": 2, "strides": [1, 2]}, (6, 2, 1, 1)),
])
def testconv_columns_reproduce_the_convolution(attrs, wshape):
    """W_g times the im2col columns at sampled positions equals ORT's Conv output there."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 4, 9, 7)).astype(np.float32)
    w = rng.normal(size=wshape).astype(np.float32)
    node = h.make_node("Conv", ["x", "w"], ["y"], **attrs)
    y = run(make_model([node], [vi("x", [2, 4, 9, 7])], [vi("y", ["N", "C", "H", "W"])], [init("w", w)]), {"x": x})[0]
    total = conv_output_positions(node, x.shape, w.shape)
    assert total == y.shape[0] * y.shape[2] * y.shape[3]
    positions = np.sort(rng.choice(total, size=total // 2, replace=False))
    cols = conv_columns(node, x, w.shape, positions)
    groups = attrs.get("group", 1)
    got = np.concatenate([w.reshape(groups, wshape[0] // groups, -1)[g] @ cols[g] for g in range(groups)])
    want = y.transpose(1, 0, 2, 3).reshape(wshape[0], -1)[:, positions]
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_fit_rounding_is_on_the_grid_and_beats_nearest():
    rng = np.random.default_rng(1)
    m, r, p = 6, 12, 4000
    mix = rng.normal(size=(r, r))
    xf = mix @ rng.normal(size=(r, p))  # correlated inputs, as neighbouring pixels are
    # the int8 model's inputs: shrunk and shifted by upstream clipping/rounding, plus noise
    xq = 0.9 * xf + 0.2 + 0.05 * rng.normal(size=(r, p))
    ones = np.ones((1, p))
    xf, xq = np.vstack([xf, ones])[None], np.vstack([xq, ones])[None]
    w = np.hstack([rng.normal(size=(m, r)), rng.normal(size=(m, 1))])[None]
    # grid with headroom (the tool's scale has none: codes the fit pushes past 127 are clipped)
    scale = np.abs(w[0, :, :r]).max(axis=1)[None] / 100
    fitted = fit_rounding(w, xf, xq, scale, damp=0.01, bias=True)
    codes = fitted[0, :, :r] / scale[0][:, None]
    assert np.allclose(codes, np.round(codes), atol=1e-9) and np.abs(codes).max() <= 127
    nearest = w.copy()
    nearest[0, :, :r] = np.round(w[0, :, :r] / scale[0][:, None]) * scale[0][:, None]
    target = w[0] @ xf[0]
    err_nearest = np.linalg.norm(target - nearest[0] @ xq[0])
    err_fitted = np.linalg.norm(target - fitted[0] @ xq[0])
    assert err_fitted < 0.5 * err_nearest


def test_refit_target_without_damping_is_least_squares():
    """Before rounding and without damping, the refit is the least-squares map Xq -> W Xf."""
    rng = np.random.default_rng(2)
    m, r, p = 4, 7, 500
    xf = rng.normal(size=(1, r, p))
    xq = xf + 0.5 * rng.normal(size=(1, r, p))
    w = rng.normal(size=(1, m, r))
    fitted = refit_target(w, xf, xq, damp=0.0)[0]
    best = np.linalg.lstsq(xq[0].T, (w[0] @ xf[0]).T, rcond=None)[0].T
    np.testing.assert_allclose(fitted[0], best, rtol=1e-5, atol=1e-6)


@pytest.fixture(scope="module")
def toy():
    rng = np.random.default_rng(3)
    model = _toy(rng)
    calib = {"x": rng.normal(size=(32, 3, 16, 16)).astype(np.float32)}
    held = rng.normal(size=(16, 3, 16, 16)).astype(np.float32)
    nearest, nearest_result = Q8Pass().apply(model, calib=calib)
    fitted, result = Q8Pass(refit_weights=True).apply(model, calib=calib)
    return model, held, nearest, fitted, result


def test_refit_changes_only_weight_and_bias_values(toy):
    model, held, nearest, fitted, result = toy
    assert [(n.op_type, list(n.input), list(n.output)) for n in fitted.graph.node] == \
           [(n.op_type, list(n.input), list(n.output)) for n in nearest.graph.node]
    before = {t.name: nh.to_array(t) for t in nearest.graph.initializer}
    after = {t.name: nh.to_array(t) for t in fitted.graph.initializer}
    assert before.keys() == after.keys()
    changed = sorted(k for k in before if not np.array_equal(before[k], after[k]))
    # the five refitted layers' int8 weights and the three int32 biases (pw and mm have none); scales untouched
    assert all(after[k].dtype in (np.int8, np.int32) for k in changed)
    assert {k for k in changed if after[k].dtype == np.int8} == {"w1_quantized", "w2_quantized", "w3_quantized",
                                                                 "wf_quantized", "wm_quantized"}
    assert {k for k in changed if after[k].dtype == np.int32} == {"b1_quantized", "b2_quantized", "bf_quantized"}
    assert all(after[k].min() >= -127 for k in changed if after[k].dtype == np.int8)  # the tool's symmetric range
    assert result.stats["refit"]["layers"] == 5
    assert result.stats["int8_kernels"] > 0


def test_refit_reports_what_it_left(toy):
    *_, result = toy
    assert {"item": "up", "reason": "refit_weights: ConvTranspose is not refitted (left with the tool's rounding)"} \
        in result.skipped
    refits = [c for c in result.changes if c["action"] == "weights_refit"]
    assert sorted(c["item"] for c in refits) == ["conv1", "dw", "fc", "mm", "pw"]
    assert all(0 < c["error_refit"] < c["error_tool"] for c in refits)
    stats = result.stats["refit"]
    assert stats["calibration_cosine_refit"] > stats["calibration_cosine_nearest"]


def test_refit_is_closer_to_float_on_held_out_inputs(toy):
    """Measured: classifier output cosine 0.999756 -> 0.999794, ConvTranspose output 0.997937 -> 0.997956
    (the ConvTranspose itself keeps the tool's rounding; its input is refitted)."""
    model, held, nearest, fitted, _ = toy
    ref, old, new = run(model, {"x": held}), run(nearest, {"x": held}), run(fitted, {"x": held})
    for r, o, n in zip(ref, old, new):
        assert _cosine(r, n) > _cosine(r, o)


def test_refit_is_deterministic(toy):
    model, *_ = toy
    calib = {"x": np.random.default_rng(3).normal(size=(32, 3, 16, 16)).astype(np.float32)}
    a, _ = Q8Pass(refit_weights=True).apply(model, calib=calib)
    b, _ = Q8Pass(refit_weights=True).apply(model, calib=calib)
    assert a.SerializeToString() == b.SerializeToString()


def test_refit_on_digits_random_inputs():
    """Calibrated on 32 random inputs, compared on 8 others (measured 0.99953 -> 0.99962)."""
    path = str(digits.fixture_path("digits_resnet"))
    rng = np.random.default_rng(0)
    calib = {"input": rng.standard_normal((32, 1, 32, 32)).astype(np.float32)}
    x = rng.standard_normal((8, 1, 32, 32)).astype(np.float32)
    ref = run(onnx.load(path), {"input": x})[0]
    nearest, _ = Q8Pass().apply(path, calib=calib)
    fitted, _ = Q8Pass(refit_weights=True).apply(path, calib=calib)
    assert _cosine(ref, run(fitted, {"input": x})[0]) > _cosine(ref, run(nearest, {"input": x})[0])


def test_refit_with_dynamic_is_skipped():
    model = _toy(np.random.default_rng(4))
    _, result = Q8Pass(refit_weights=True, dynamic=True).apply(model)
    assert {"item": "model", "reason": "refit_weights: needs static quantization (dynamic=true)"} in result.skipped


def test_refit_after_bias_correction_fits_the_bias_it_added():
    """bias_correction gives the bias-free 1x1 conv a bias; its float twin (the refit's target) has
    none, which counts as 0 rather than a reason to skip the layer."""
    model = _toy(np.random.default_rng(3))
    calib = {"x": np.random.default_rng(0).normal(size=(16, 3, 16, 16)).astype(np.float32)}
    _, result = Q8Pass(refit_weights=True, bias_correction=True).apply(model, calib=calib)
    assert result.stats["refit"]["layers"] == 5
    assert [s["item"] for s in result.skipped if s["reason"].startswith("refit_weights")] == ["up"]


def test_float_inputs_captured_in_groups_give_the_same_refit():
    """The float layer inputs are captured several layers per run within a memory budget; a budget
    of one byte (one layer per run) must give the same bytes."""
    from onnxslim_cnn.analysis.calibration import CalibrationData
    from onnxslim_cnn.passes.q8.refit import refit

    model = _toy(np.random.default_rng(3))
    x = np.random.default_rng(0).normal(size=(8, 3, 16, 16)).astype(np.float32)
    quantized, _ = Q8Pass().apply(model, calib={"x": x})
    calib = CalibrationData(inputs={"x": x}, source="test", batch=4)
    grouped, records, _ = refit(quantized, model, calib)
    single, _, _ = refit(quantized, model, calib, float_budget=1)
    assert len(records) == 5 and grouped.SerializeToString() == single.SerializeToString()


def test_refit_per_tensor_weights():
    model = _toy(np.random.default_rng(3))
    calib = {"x": np.random.default_rng(0).normal(size=(16, 3, 16, 16)).astype(np.float32)}
    fitted, result = Q8Pass(refit_weights=True, per_channel=False).apply(model, calib=calib)
    assert result.stats["refit"]["layers"] == 5
    weights = [nh.to_array(t) for t in fitted.graph.initializer if t.name.endswith("_quantized")]
    assert all(w.min() >= -127 for w in weights if w.dtype == np.int8)


def test_refit_that_does_not_help_leaves_the_tool_output_byte_for_byte():
    """With the depthwise conv kept float the refit lowers the calibration cosine on this model
    (measured 0.99963 -> 0.99962): it is dropped, and the model is exactly the tool's."""
    model = _toy(np.random.default_rng(3))
    calib = {"x": np.random.default_rng(0).normal(size=(16, 3, 16, 16)).astype(np.float32)}
    plain, _ = Q8Pass(keep_float=["dw"]).apply(model, calib=calib)
    fitted, result = Q8Pass(refit_weights=True, keep_float=["dw"]).apply(model, calib=calib)
    assert any(s["reason"].endswith("kept the tool's rounding") for s in result.skipped)
    assert result.stats["refit"]["applied"] is False
    assert fitted.SerializeToString() == plain.SerializeToString()
