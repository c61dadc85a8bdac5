"""Pass ``q8``: int8 QDQ through ONNX Runtime's quantization tool (fast: small models)."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnxslim_cnn.models import digits, reference
from onnxslim_cnn.passes.q8 import Q8Pass, is_quantized

import onnxslim_cnn


def _record(report, name="q8"):
    return next(r for r in report.passes if r.name == name)


def _ops(model):
    return [n.op_type for n in model.graph.node]


def _loads_and_runs(model, x):
    onnx.checker.check_model(model, full_check=True)
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x})[0]


@pytest.fixture(scope="module")
def resnet():
    return reference.build("resnet18", width=0.25, input_size=32, num_classes=10)


@pytest.fixture(scope="module")
def resnet_q8(resnet):
    before = resnet.SerializeToString()
    x = np.random.default_rng(0).standard_normal((16, 3, 32, 32)).astype(np.float32)
    # random weights and inputs: the budget would rightly leave q8 out; this tests the pass itself
    model, report = onnxslim_cnn.compress(resnet, passes=["q8"], calib={_input_name(resnet): x}, budget="off")
    assert resnet.SerializeToString() == before  # input never modified
    return model, report, x


def _input_name(model):
    inits = {t.name for t in model.graph.initializer}
    return next(i.name for i in model.graph.input if i.name not in inits)


def test_resnet_q8_valid_and_fused(resnet_q8):
    model, report, x = resnet_q8
    rec = _record(report)
    assert rec.status == "ok" and rec.changed
    _loads_and_runs(model, x[:2])
    assert "BatchNormalization" not in _ops(model)  # folded before QDQ
    assert rec.stats["batchnorm_left"] == 0
    assert rec.stats["quantize_linear_inserted"] > 0 and rec.stats["dequantize_linear_inserted"] > 0
    assert rec.stats["int8_kernels"] > 0
    assert rec.stats["int8_kernel_types"].get("QLinearConv", 0) >= 17  # every conv of resnet18 fused (u8)
    assert rec.stats["int8_kernel_types"].get("QLinearAdd", 0) >= 1
    assert report.fidelity is not None


def test_digits_vgg_top1_close_to_float():
    path = str(digits.fixture_path("digits_vgg"))
    with open(path, "rb") as f:
        before = f.read()
    x, _ = digits.load_split("train")
    # heldout=0: calibrated on all 64 (the measured figures below), none kept for the report's fidelity
    model, report = onnxslim_cnn.compress(path, passes=["q8"], calib={"input": x[:64]}, heldout=0, budget="off")
    with open(path, "rb") as f:
        assert f.read() == before
    rec = _record(report)
    assert rec.status == "ok" and rec.stats["int8_kernels"] > 0
    assert rec.stats["calibration_samples"] == 64
    onnx.checker.check_model(model, full_check=True)
    top1_float, top1_q8 = digits.evaluate_top1(path), digits.evaluate_top1(model)
    # measured: float 0.9978, q8 0.9956 (u8 activations, per-channel, minmax, 64 train images)
    assert top1_q8 >= top1_float - 0.01, (top1_float, top1_q8)


def test_already_quantized_passes_through(resnet_q8):
    quantized, _, x = resnet_q8
    assert is_quantized(quantized)
    before = quantized.SerializeToString()
    model, report = onnxslim_cnn.compress(quantized, passes=["q8"], calib={_input_name(quantized): x})
    rec = _record(report)
    assert not rec.changed and rec.status == "ok"
    assert any("already quantized" in s["reason"] for s in rec.skipped)
    assert model.SerializeToString() == before


def test_opset10_upgraded(resnet):
    from onnxslim_cnn.passes.slim import SlimPass

    # onnx cannot down-convert BN/Relu; with BN folded every op left (Conv, Relu, Add, pooling,
    # Flatten, Gemm) means the same at opset 10, so relabel the import and check it.
    old, _ = SlimPass().apply(resnet)
    old.opset_import[0].version = 10
    onnx.checker.check_model(old, full_check=True)
    x = np.random.default_rng(1).standard_normal((8, 3, 32, 32)).astype(np.float32)
    model, result = Q8Pass().apply(old, calib={_input_name(old): x})
    assert result.changed and result.stats["opset_upgraded"] == "10->13"
    assert next(op.version for op in model.opset_import if op.domain in ("", "ai.onnx")) >= 13
    _loads_and_runs(model, x[:2])
    assert old.opset_import[0].version == 10  # input untouched
    # what q8 fixes: ORT's tool alone writes per-channel DequantizeLinear (axis) at opset 10
    import tempfile

    from onnxruntime.quantization import QuantFormat, quantize_static
    from onnxslim_cnn.passes.q8.q8 import _Reader

    with tempfile.TemporaryDirectory() as tmp:
        onnx.save(old, f"{tmp}/f.onnx")
        quantize_static(f"{tmp}/f.onnx", f"{tmp}/q.onnx", _Reader({_input_name(old): x}, 8).reader,
                        quant_format=QuantFormat.QDQ, per_channel=True)
        with pytest.raises(Exception, match="DequantizeLinear"):
            ort.InferenceSession(f"{tmp}/q.onnx", providers=["CPUExecutionProvider"])


def test_options_and_dynamic(resnet):
    assert Q8Pass().needs_calibration and not Q8Pass(dynamic=True).needs_calibration
    with pytest.raises(onnxslim_cnn.UserError):
        Q8Pass(activations="int4")
    x = np.random.default_rng(2).standard_normal((4, 3, 32, 32)).astype(np.float32)
    model, result = Q8Pass(dynamic=True).apply(resnet, calib={_input_name(resnet): x})
    assert result.changed and result.stats["int8_kernels"] > 0
    _loads_and_runs(model, x[:2])


def test_exclude_keeps_node_float(resnet):
    x = np.random.default_rng(3).standard_normal((8, 3, 32, 32)).astype(np.float32)
    conv = next(n.name for n in resnet.graph.node if n.op_type == "Conv")
    model, result = Q8Pass(exclude=[conv, "no_such_node"], activations="int8", calibration="percentile",
                           fold_bn=False).apply(resnet, calib={_input_name(resnet): x})
    assert result.changed and result.stats["excluded"] == 1
    assert any(s["item"] == "no_such_node" for s in result.skipped)
    kept = next(n for n in model.graph.node if n.name == conv)
    assert kept.op_type == "Conv"
    _loads_and_runs(model, x[:2])


def test_batchnorm_as_mul_add_folded_before_qdq():
    """BN exported as per-channel Mul + Add after a conv: slim folds it, so every conv is one
    QLinearConv and no float Mul/Add is left between Q and DQ."""
    from graphs import init, make_model, vi
    from onnx import helper as h

    rng = np.random.default_rng(0)
    nodes = [h.make_node("Conv", ["x", "w", "b"], ["c"], pads=[1, 1, 1, 1], name="conv"),
             h.make_node("Mul", ["c", "s"], ["m"], name="bn_mul"), h.make_node("Add", ["m", "t"], ["a"], name="bn_add"),
             h.make_node("Relu", ["a"], ["r"], name="relu"),
             h.make_node("Conv", ["r", "w2"], ["c2"], pads=[1, 1, 1, 1], name="conv2"),
             h.make_node("Mul", ["c2", "s2"], ["m2"], name="bn2_mul"), h.make_node("Add", ["m2", "t2"], ["y"], name="bn2_add")]
    model = make_model(nodes, [vi("x", ["N", 3, 16, 16])], [vi("y", ["N", 8, 16, 16])],
                       [init("w", rng.normal(size=(8, 3, 3, 3))), init("b", rng.normal(size=8)),
                        init("s", rng.uniform(0.5, 2, (8, 1, 1))), init("t", rng.normal(size=(8, 1, 1))),
                        init("w2", rng.normal(size=(8, 8, 3, 3))), init("s2", rng.uniform(0.5, 2, (1, 8, 1, 1))),
                        init("t2", rng.normal(size=(1, 8, 1, 1)))], opset=13)
    x = rng.standard_normal((8, 3, 16, 16)).astype(np.float32)
    quantized, result = Q8Pass().apply(model, calib={"x": x})
    assert [n.op_type for n in quantized.graph.node if n.op_type not in ("QuantizeLinear", "DequantizeLinear")] \
        == ["Conv", "Conv"]
    assert result.stats["int8_kernel_types"] == {"QLinearConv": 2} and result.stats["float_ops_in_qdq"] == 0
    a, b = _loads_and_runs(model, x), _loads_and_runs(quantized, x)
    assert float(np.dot(a.ravel(), b.ravel()) / np.linalg.norm(a) / np.linalg.norm(b)) > 0.99


def test_weights_in_constant_nodes_quantized_as_weights():
    """Paddle exports keep weights in Constant nodes. ORT's tool alone quantizes them as
    activations (a calibrated per-tensor QuantizeLinear at run time, float weights left in the
    file; on PP-OCR cls all 53 convs); q8 turns them into initializers first (slim), so they
    become per-channel int8 initializers."""
    import tempfile

    from graphs import make_model, vi
    from onnx import helper as h
    from onnx import numpy_helper as nh
    from onnxruntime.quantization import QuantFormat, quantize_static
    from onnxslim_cnn.passes.q8.q8 import _Reader

    rng = np.random.default_rng(0)
    w = rng.normal(size=(8, 3, 3, 3)).astype(np.float32)
    nodes = [h.make_node("Constant", [], ["w"], value=nh.from_array(w, "w"), name="w_const"),
             h.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1], name="conv"),
             h.make_node("Relu", ["c"], ["y"], name="relu")]
    model = make_model(nodes, [vi("x", ["N", 3, 8, 8])], [vi("y", ["N", 8, 8, 8])], opset=13)
    x = rng.standard_normal((8, 3, 8, 8)).astype(np.float32)

    def weight_source(m):
        producer = {o: n for n in m.graph.node for o in n.output}
        dq = producer[next(n for n in m.graph.node if n.op_type == "Conv").input[1]]
        src = producer.get(dq.input[0])
        return src.op_type if src is not None else "initializer"

    with tempfile.TemporaryDirectory() as tmp:
        onnx.save(model, f"{tmp}/f.onnx")
        quantize_static(f"{tmp}/f.onnx", f"{tmp}/q.onnx", _Reader({"x": x}, 8).reader,
                        quant_format=QuantFormat.QDQ, per_channel=True)
        assert weight_source(onnx.load(f"{tmp}/q.onnx")) == "QuantizeLinear"  # quantized at run time
    quantized, _ = Q8Pass().apply(model, calib={"x": x})
    assert weight_source(quantized) == "initializer"
    conv = next(n for n in quantized.graph.node if n.op_type == "Conv")
    dq = next(n for n in quantized.graph.node if conv.input[1] in n.output)
    q_weight = next(t for t in quantized.graph.initializer if t.name == dq.input[0])
    assert q_weight.data_type == onnx.TensorProto.INT8
    assert nh.to_array(next(t for t in quantized.graph.initializer if t.name == dq.input[1])).shape == (8,)


def test_no_preprocessing_hint_from_the_tool():
    """ORT's tool logs 'Please consider to run pre-processing' (root logger, so it lands on every
    CLI user's stderr) when the model lacks its pre-processing tag; q8 does that work itself
    (slim, opset upgrade, shape inference), so the hint is dropped, and nothing else."""
    import subprocess
    import sys

    code = ("import numpy as np, logging; from onnxslim_cnn.models import digits; "
            "from onnxslim_cnn.passes.q8 import Q8Pass; "
            "x = digits.load_split('test')[0][:8]; "
            "Q8Pass().apply(str(digits.fixture_path('digits_resnet')), calib={'input': x}); "
            "Q8Pass(dynamic=True).apply(str(digits.fixture_path('digits_resnet'))); "
            "logging.warning('other warnings still show')")
    err = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stderr
    assert "pre-processing" not in err and "other warnings still show" in err, err
