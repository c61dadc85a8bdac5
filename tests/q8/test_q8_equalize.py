"""q8's float rewrites before QDQ: cross-layer equalization (exact) and bias correction (fast)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from graphs import assert_same_outputs, init, make_model, run, vi
from onnx import helper as h
from onnx import numpy_helper as nh
from onnxslim_cnn.models import digits, reference
from onnxslim_cnn.passes.q8 import Q8Pass
from onnxslim_cnn.passes.q8.equalize import (
    bias_correct,
    equalize,
    quantize_weight_like_ort,
)
from onnxslim_cnn.passes.slim import SlimPass

from onnxslim_cnn.analysis.calibration import from_arrays
from onnxslim_cnn.graph import Graph


def _chain_model(seed=0) -> onnx.ModelProto:
    """conv -> relu -> maxpool -> conv -> relu -> dw -> relu -> conv(1x1) -> relu6 -> conv
    -> relu -> flatten -> gemm -> leakyrelu -> gemm; channel ranges spread over 3 decades."""
    rng = np.random.default_rng(seed)

    def spread(shape, axis):
        s = [1] * len(shape)
        s[axis] = -1
        return rng.normal(size=shape) * np.logspace(-1.5, 1.5, shape[axis]).reshape(s)

    nodes = [
        h.make_node("Conv", ["x", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1], name="conv1"),
        h.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        h.make_node("MaxPool", ["r1"], ["p1"], kernel_shape=[2, 2], strides=[2, 2], name="pool1"),
        h.make_node("Conv", ["p1", "w2", "b2"], ["c2"], pads=[1, 1, 1, 1], name="conv2"),
        h.make_node("Relu", ["c2"], ["r2"], name="relu2"),
        h.make_node("Conv", ["r2", "wdw", "bdw"], ["c3"], pads=[1, 1, 1, 1], group=8, name="dw"),
        h.make_node("Relu", ["c3"], ["r3"], name="relu3"),
        h.make_node("Conv", ["r3", "w4"], ["c4"], name="pw"),
        h.make_node("Clip", ["c4", "zero", "six"], ["r4"], name="relu6"),
        h.make_node("Conv", ["r4", "w5", "b5"], ["c5"], name="conv5"),
        h.make_node("Relu", ["c5"], ["r5"], name="relu5"),
        h.make_node("Flatten", ["r5"], ["f"], axis=1, name="flatten"),
        h.make_node("Gemm", ["f", "fw1", "fb1"], ["g1"], transB=1, name="fc1"),
        h.make_node("LeakyRelu", ["g1"], ["r6"], alpha=0.1, name="lrelu"),
        h.make_node("Gemm", ["r6", "fw2", "fb2"], ["y"], name="fc2"),
    ]
    inits = [init("w1", spread((8, 3, 3, 3), 0)), init("b1", rng.normal(size=8)),
             init("w2", spread((8, 8, 3, 3), 1)), init("b2", rng.normal(size=8)),
             init("wdw", spread((8, 1, 3, 3), 0)), init("bdw", rng.normal(size=8)),
             init("w4", spread((6, 8, 1, 1), 0)), init("zero", np.array(0.0)), init("six", np.array(6.0)),
             init("w5", spread((4, 6, 1, 1), 0)), init("b5", rng.normal(size=4)),
             init("fw1", spread((12, 4 * 4 * 4), 1)), init("fb1", rng.normal(size=12)),
             init("fw2", spread((12, 5), 0)), init("fb2", rng.normal(size=5))]
    return make_model(nodes, [vi("x", ["N", 3, 8, 8])], [vi("y", ["N", 5])], inits)


def _feeds(model, n=4, seed=1):
    shape = [d.dim_value or n for d in model.graph.input[0].type.tensor_type.shape.dim]
    return {model.graph.input[0].name: np.random.default_rng(seed).standard_normal(shape).astype(np.float32)}


def test_equalization_exact_and_ranges_equal():
    model = _chain_model()
    before = model.SerializeToString()
    g = Graph.from_model(model)
    pairs, skipped = equalize(g)
    out = g.to_model()
    assert model.SerializeToString() == before
    # conv1->conv2 (relu, maxpool), conv2->dw and dw->pw (a depthwise chain), conv5->fc1 (relu,
    # flatten), fc1->fc2 (leaky relu); pw->conv5 crosses a ReLU6 and is left alone.
    assert [(p["first"], p["second"]) for p in pairs] == [
        ("conv1", "conv2"), ("conv2", "dw"), ("dw", "pw"), ("conv5", "fc1"), ("fc1", "fc2")]
    assert pairs[0]["via"] == ["Relu", "MaxPool"] and pairs[3]["via"] == ["Relu", "Flatten"]
    assert ("pw", "Clip (ReLU6) is not positively homogeneous") in skipped
    assert ("fc2", "output is a graph output") in skipped
    for p in pairs:
        # every pair's output-channel ranges match the next layer's input-channel ranges
        assert p["max_range_mismatch"] < 1e-2, p
    assert_same_outputs(model, out, _feeds(model), rel=1e-5)


def test_equalization_of_one_pair_takes_the_geometric_mean():
    rng = np.random.default_rng(5)
    w1 = rng.normal(size=(16, 3, 3, 3)) * np.logspace(-2, 2, 16).reshape(16, 1, 1, 1)  # 4 decades
    w2 = rng.normal(size=(8, 16, 3, 3))
    nodes = [h.make_node("Conv", ["x", "w1"], ["c1"], name="a"), h.make_node("Relu", ["c1"], ["r"], name="r"),
             h.make_node("Conv", ["r", "w2"], ["y"], name="b")]
    model = make_model(nodes, [vi("x", ["N", 3, 9, 9])], [vi("y", ["N", 8, 5, 5])], [init("w1", w1), init("w2", w2)])
    g = Graph.from_model(model)
    (pair,), _ = equalize(g)
    r1 = np.abs(w1).max(axis=(1, 2, 3))
    r2 = np.abs(w2).max(axis=(0, 2, 3))
    new_w1 = nh.to_array(next(t for t in g.to_model().graph.initializer if t.name.startswith("a_w_eq")))
    np.testing.assert_allclose(np.abs(new_w1).max(axis=(1, 2, 3)), np.sqrt(r1 * r2), rtol=1e-5)
    assert pair["range_ratio_before"] > 1e3 and pair["range_ratio_after"] < 1e2
    assert_same_outputs(model, g.to_model(), _feeds(model), rel=1e-5)


@pytest.mark.parametrize("name", ["vgg16", "mobilenetv2", "resnet18", "senet_small"])
def test_equalization_exact_on_reference_models(name):
    model, _ = SlimPass().apply(reference.build(name, width=0.25, input_size=32, num_classes=10))
    g = Graph.from_model(model)
    pairs, _ = equalize(g)
    assert pairs  # every family has at least one pair (MobileNetV2: project -> expand)
    assert_same_outputs(model, g.to_model(), _feeds(model, n=2), rel=1e-5)


def test_weight_rounding_matches_ort_tool():
    """Bias correction cancels the rounding ORT's tool really applies: same int8 weights."""
    path = str(digits.fixture_path("digits_vgg"))
    calib = dict(np.load(digits.EXAMPLES_DIR / "digits_calib.npz"))
    slimmed, _ = SlimPass().apply(path)
    floats = {t.name: nh.to_array(t) for t in slimmed.graph.initializer}
    quantized, _ = Q8Pass().apply(path, calib=calib)
    inits = {t.name: nh.to_array(t) for t in quantized.graph.initializer}
    checked = 0
    for n in quantized.graph.node:
        if n.op_type == "DequantizeLinear" and inits.get(n.input[0], np.zeros(0, np.uint8)).dtype == np.int8:
            name = n.input[0][: -len("_quantized")]
            scale = inits[n.input[1]].reshape([-1] + [1] * (inits[n.input[0]].ndim - 1))
            ort_deq = inits[n.input[0]].astype(np.float32) * scale
            np.testing.assert_array_equal(quantize_weight_like_ort(floats[name], 0), ort_deq)
            checked += 1
    assert checked == 6  # 3 convs + 3 Gemms


def test_bias_correction_cancels_mean_shift():
    """With int8-rounded weights, the corrected model's per-channel output mean equals float's."""
    rng = np.random.default_rng(3)
    nodes = [h.make_node("Conv", ["x", "w"], ["y"], pads=[1, 1, 1, 1], name="conv")]
    w = rng.normal(size=(6, 4, 3, 3)) * np.array([1, 10, 0.1, 3, 30, 0.5]).reshape(6, 1, 1, 1)
    model = make_model(nodes, [vi("x", ["N", 4, 8, 8])], [vi("y", ["N", 6, 8, 8])], [init("w", w)])
    x = (rng.standard_normal((16, 4, 8, 8)) + 2.0).astype(np.float32)  # non-zero mean input
    calib = from_arrays({"x": x}, model, "test", "arrays")
    corrected, records, skipped = bias_correct(model, calib, per_channel=True)
    assert [r["layer"] for r in records] == ["conv"] and records[0]["added_bias"] and not skipped

    def with_rounded_weights(m):
        m2 = onnx.ModelProto()
        m2.CopyFrom(m)
        t = next(t for t in m2.graph.initializer if t.name == "w")
        t.CopyFrom(nh.from_array(quantize_weight_like_ort(nh.to_array(t), 0), "w"))
        return m2

    ref = run(model, {"x": x})[0].mean(axis=(0, 2, 3))
    plain = run(with_rounded_weights(model), {"x": x})[0].mean(axis=(0, 2, 3))
    fixed = run(with_rounded_weights(corrected), {"x": x})[0].mean(axis=(0, 2, 3))
    assert np.abs(plain - ref).max() > 1e-3  # rounding does shift the mean
    np.testing.assert_allclose(fixed, ref, atol=1e-5)


def test_q8_with_equalization_and_bias_correction():
    model = reference.build("mobilenetv2", width=0.25, input_size=32, num_classes=10)
    x = np.random.default_rng(4).standard_normal((8, 3, 32, 32)).astype(np.float32)
    quantized, result = Q8Pass(equalize=True, bias_correction=True).apply(model, calib={"input": x})
    assert result.changed and result.stats["equalized_pairs"] >= 1
    assert result.stats["bias_corrected"] == sum(n.op_type in ("Conv", "Gemm") for n in
                                                 SlimPass().apply(model)[0].graph.node)
    assert any("Clip (ReLU6)" in s["reason"] for s in result.skipped)
    onnx.checker.check_model(quantized, full_check=True)
    assert run(quantized, {"input": x})[0].shape == (8, 10)


def test_q8_equalized_and_corrected_close_to_float():
    model = reference.build("resnet18", width=0.25, input_size=32, num_classes=10)
    x = np.random.default_rng(4).standard_normal((8, 3, 32, 32)).astype(np.float32)
    held_out = np.random.default_rng(5).standard_normal((8, 3, 32, 32)).astype(np.float32)
    quantized, result = Q8Pass(equalize=True, bias_correction=True).apply(model, calib={"input": x})
    assert result.stats["equalized_pairs"] == 8 and result.stats["int8_kernel_types"]["QLinearConv"] >= 17
    a, b = run(model, {"input": held_out})[0], run(quantized, {"input": held_out})[0]
    cos = float(np.dot(a.ravel(), b.ravel()) / np.linalg.norm(a) / np.linalg.norm(b))
    assert cos >= 0.99, cos  # measured 0.9916 (plain q8: 0.9911) on this random-weight model


# ----------------------------------------------------------------------------- mixed precision


def test_single_layer_model_matches_the_qdq_model():
    """A model with one quantizable conv: the one-layer simulation (inputs and weights quantized)
    followed by the tool's output QuantizeLinear/DequantizeLinear is the QDQ model itself."""
    from onnxslim_cnn.passes.q8.mixed import _QuantizedModel, single_layer_model

    from onnxslim_cnn.sessions import make_session

    rng = np.random.default_rng(6)
    nodes = [h.make_node("Conv", ["x", "w", "b"], ["c"], pads=[1, 1, 1, 1], name="conv"),
             h.make_node("Relu", ["c"], ["y"], name="relu")]
    model = make_model(nodes, [vi("x", ["N", 4, 8, 8])], [vi("y", ["N", 6, 8, 8])],
                       [init("w", rng.normal(size=(6, 4, 3, 3))), init("b", rng.normal(size=6))])
    x = rng.standard_normal((4, 4, 8, 8)).astype(np.float32)
    quantized, _ = Q8Pass(fold_bn=False).apply(model, calib={"x": x})
    qm = _QuantizedModel(quantized)
    assert qm.candidates() == ["conv"]
    simulated = single_layer_model(model, qm, "conv")
    # ORT's QDQ graph run without fusions computes in float on the dequantized values, as the simulation
    a = make_session(quantized, optimize=False).run(None, {"x": x})[0]
    b = make_session(simulated, optimize=False).run(None, {"x": x})[0]
    inits = {t.name: nh.to_array(t) for t in quantized.graph.initializer}
    scale, zero = inits["y_scale"], inits["y_zero_point"].astype(np.float32)
    b_out = (np.clip(np.round(b / scale) + zero, 0, 255) - zero) * scale
    np.testing.assert_allclose(a, b_out, atol=1e-5)
    assert np.abs(b - run(model, {"x": x})[0]).max() > 1e-3  # and it is quantized


def test_keep_float_auto_meets_budget_and_reports():
    model = reference.build("resnet18", width=0.25, input_size=32, num_classes=10)
    x = np.random.default_rng(4).standard_normal((8, 3, 32, 32)).astype(np.float32)
    # all-int8 reaches 0.9962 on these inputs: a 0.997 budget needs layers kept float
    quantized, result = Q8Pass(keep_float=["auto"], budget_cosine=0.997).apply(model, calib={"input": x})
    mixed = result.stats["mixed_precision"]
    assert mixed["cosine_all_quantized"] < 0.997 <= mixed["cosine"] and mixed["budget_met"]
    assert mixed["candidates"] == len(mixed["sensitivity"]) > 20
    kept = mixed["kept"]
    assert kept and kept == result.stats["float_layers"]
    worst = max(mixed["sensitivity"], key=mixed["sensitivity"].get)
    assert worst in kept  # the most sensitive layer goes first
    kept_ops = [n for n in quantized.graph.node if n.name in kept]
    producers = {o: n.op_type for n in quantized.graph.node for o in n.output}
    for n in kept_ops:  # kept layers read float weights
        if n.op_type == "Conv":
            assert producers.get(n.input[1]) != "DequantizeLinear"
    assert {c["item"] for c in result.changes if c["action"] == "kept_float"} == set(kept)
    # the report's cosine is the real one of the model returned
    from onnxslim_cnn.analysis.compare import least_cosine
    ref, new = run(model, {"input": x}), run(quantized, {"input": x})
    assert abs(least_cosine([r.ravel().astype(np.float64) for r in ref],
                            [q.ravel().astype(np.float64) for q in new]) - mixed["cosine"]) < 1e-6


def test_keep_float_budget_already_met_and_explicit_names():
    model = reference.build("resnet18", width=0.25, input_size=32, num_classes=10)
    x = np.random.default_rng(4).standard_normal((8, 3, 32, 32)).astype(np.float32)
    quantized, result = Q8Pass(keep_float=["auto", "conv1"], exclude=["layer4.1.conv2"],
                               budget_cosine=0.9).apply(model, calib={"input": x})
    mixed = result.stats["mixed_precision"]
    assert mixed["budget_met"] and mixed["kept"] == [] and mixed["sensitivity"] == {}
    # explicit names (keep_float and its older spelling exclude) stay float with their ReLU
    assert result.stats["float_layers"] == ["layer4.1.conv2", "conv1", "relu"]
    conv1 = next(n for n in quantized.graph.node if n.name == "conv1")
    assert conv1.input[0] == "input"  # the float input, no QuantizeLinear before it


def test_same_input_and_options_same_bytes():
    path = str(digits.fixture_path("digits_resnet"))
    calib = dict(np.load(digits.EXAMPLES_DIR / "digits_calib.npz"))
    opts = dict(equalize=True, bias_correction=True, keep_float=["auto"], budget_cosine=0.99999, max_float_layers=2)
    first, result = Q8Pass(**opts).apply(path, calib=calib)
    assert result.stats["equalized_pairs"] == 4 and result.stats["mixed_precision"]["trials"]
    assert Q8Pass(**opts).apply(path, calib=calib)[0].SerializeToString() == first.SerializeToString()


@pytest.mark.parametrize("attrs", [dict(transB=1, beta=0.5, alpha=2.0), dict(beta=0.0)])
def test_bias_correction_gemm_with_alpha_beta(attrs):
    """Gemm adds beta * C: the shift must be divided by beta (PyTorch exports beta=1, other
    exporters do not); beta=0 ignores C, so no bias can carry the correction: skipped."""
    rng = np.random.default_rng(7)
    w = rng.normal(size=(6, 10)) * np.array([1, 10, 0.1, 3, 30, 0.5]).reshape(6, 1)
    w = w if attrs.get("transB") else w.T
    model = make_model([h.make_node("Gemm", ["x", "w", "b"], ["y"], name="fc", **attrs)],
                       [vi("x", ["N", 10])], [vi("y", ["N", 6])], [init("w", w), init("b", rng.normal(size=6))])
    x = (rng.standard_normal((32, 10)) + 2.0).astype(np.float32)
    corrected, records, skipped = bias_correct(model, from_arrays({"x": x}, model, "test", "arrays"), per_channel=True)
    if not attrs.get("beta"):
        assert not records and skipped == [("fc", "Gemm with beta=0")]
        return
    assert [r["layer"] for r in records] == ["fc"]

    def rounded(m):
        m2 = onnx.ModelProto()
        m2.CopyFrom(m)
        t = next(t for t in m2.graph.initializer if t.name == "w")
        t.CopyFrom(nh.from_array(quantize_weight_like_ort(nh.to_array(t), 0 if attrs.get("transB") else 1), "w"))
        return m2

    ref = run(model, {"x": x})[0].mean(axis=0)
    assert np.abs(run(rounded(model), {"x": x})[0].mean(axis=0) - ref).max() > 1e-3
    np.testing.assert_allclose(run(rounded(corrected), {"x": x})[0].mean(axis=0), ref, atol=1e-4)


def test_equalization_through_prelu_avgpool_zero_pad_globalmaxpool():
    """The other ops the docs list as positively homogeneous: each pair is found and the float
    function is unchanged; a reflect Pad and a non-zero Pad value break the pair."""
    rng = np.random.default_rng(8)

    def spread(shape, axis):
        s = [1] * len(shape)
        s[axis] = -1
        return rng.normal(size=shape) * np.logspace(-1.5, 1.5, shape[axis]).reshape(s)

    def chain(pad_mode="constant", pad_value=0.0):
        nodes = [h.make_node("Conv", ["x", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1], name="conv1"),
                 h.make_node("PRelu", ["c1", "slope"], ["p1"], name="prelu"),
                 h.make_node("AveragePool", ["p1"], ["a1"], kernel_shape=[3, 3], pads=[1, 1, 1, 1], name="avg"),
                 h.make_node("Pad", ["a1", "pads", "pad_value"], ["q1"], mode=pad_mode, name="pad"),
                 h.make_node("Conv", ["q1", "w2", "b2"], ["c2"], name="conv2"),
                 h.make_node("Relu", ["c2"], ["r2"], name="relu2"),
                 h.make_node("GlobalMaxPool", ["r2"], ["g"], name="gmp"),
                 h.make_node("Flatten", ["g"], ["f"], axis=1, name="flatten"),
                 h.make_node("Gemm", ["f", "fw", "fb"], ["y"], transB=1, name="fc")]
        inits = [init("w1", spread((8, 3, 3, 3), 0)), init("b1", rng.normal(size=8)),
                 init("slope", rng.uniform(0.05, 0.3, size=(8, 1, 1))),
                 nh.from_array(np.array([0, 0, 1, 1, 0, 0, 1, 1], np.int64), "pads"),
                 init("pad_value", np.array(pad_value)),
                 init("w2", spread((6, 8, 3, 3), 0)), init("b2", rng.normal(size=6)),
                 init("fw", spread((5, 6), 1)), init("fb", rng.normal(size=5))]
        return make_model(nodes, [vi("x", ["N", 3, 8, 8])], [vi("y", ["N", 5])], inits)

    model = chain()
    g = Graph.from_model(model)
    pairs, _ = equalize(g)
    assert [(p["first"], p["second"], p["via"]) for p in pairs] == [
        ("conv1", "conv2", ["PRelu", "AveragePool", "Pad"]), ("conv2", "fc", ["Relu", "GlobalMaxPool", "Flatten"])]
    assert all(p["max_range_mismatch"] < 1e-2 for p in pairs)
    assert_same_outputs(model, g.to_model(), _feeds(model), rel=1e-5)
    for mode, value, reason in (("reflect", 0.0, "Pad in reflect/edge mode"), ("constant", 1.0, "Pad with a non-zero value")):
        pairs, skipped = equalize(Graph.from_model(chain(mode, value)))
        assert [p["first"] for p in pairs] == ["conv2"] and ("conv1", reason) in skipped
