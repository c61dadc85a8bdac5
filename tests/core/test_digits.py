"""The digits dataset helpers and the two committed trained fixtures (no torch needed)."""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
import pytest

from onnxslim_cnn.models import digits

# Measured on the committed fixtures (test split, 450 images); evaluation is deterministic.
MEASURED_TOP1 = {"digits_vgg": 0.9978, "digits_resnet": 0.9956}
MAX_BYTES = 2 * 1024 * 1024


def test_split_sizes_and_shapes():
    x_tr, y_tr = digits.load_split("train")
    x_te, y_te = digits.load_split("test")
    assert x_tr.shape == (1347, 1, 32, 32) and x_te.shape == (450, 1, 32, 32)
    assert x_tr.dtype == np.float32 and x_te.dtype == np.float32
    assert y_tr.dtype == np.int64 and y_te.dtype == np.int64
    assert y_tr.shape == (1347,) and y_te.shape == (450,)
    assert np.isfinite(x_tr).all() and np.isfinite(x_te).all()


def test_split_class_balance():
    from sklearn.datasets import load_digits

    full = np.bincount(load_digits().target, minlength=10)
    _, y_tr = digits.load_split("train")
    _, y_te = digits.load_split("test")
    tr, te = np.bincount(y_tr, minlength=10), np.bincount(y_te, minlength=10)
    np.testing.assert_array_equal(tr + te, full)
    np.testing.assert_array_equal(te, [45, 46, 44, 46, 45, 46, 45, 45, 43, 45])
    # stratified: each class's test share is within one image of 25 %
    assert np.all(np.abs(te - full * digits.TEST_SIZE) <= 1), te


def test_normalisation_constants():
    x, _ = digits.load_split("train")
    assert abs(float(x.mean())) < 0.01
    assert abs(float(x.std()) - 1.0) < 0.01


def test_load_split_deterministic_and_disjoint():
    a_x, a_y = digits.load_split("test")
    a_x[:] = 0  # callers get copies; mutating one must not leak
    b_x, b_y = digits.load_split("test")
    c_x, c_y = digits.load_split("test")
    np.testing.assert_array_equal(b_x, c_x)
    np.testing.assert_array_equal(a_y, b_y)
    assert not np.all(b_x == 0)
    tr_x, _ = digits.load_split("train")
    tr_keys = {r.tobytes() for r in tr_x[:, 0, ::4, ::4]}
    assert sum(r.tobytes() in tr_keys for r in b_x[:, 0, ::4, ::4]) < 10  # (load_digits has a few duplicates)


def test_load_split_bad_name():
    with pytest.raises(ValueError):
        digits.load_split("val")


def test_upsample_matches_bilinear_half_pixel():
    img = np.arange(64, dtype=np.float64).reshape(1, 8, 8)
    up = digits._upsample(img)
    assert up.shape == (1, 32, 32)
    # a linear ramp stays linear in the interior and is clamped at the borders
    assert up[0, 0, 0] == 0.0 and up[0, -1, -1] == 63.0
    src = np.clip((np.arange(32) + 0.5) / 4 - 0.5, 0, 7)
    np.testing.assert_allclose(up[0, 0, :], np.interp(src, np.arange(8), img[0, 0]), atol=1e-9)
    np.testing.assert_allclose(up[0, :, 0], np.interp(src, np.arange(8), img[0, :, 0]), atol=1e-9)


def test_fixture_path():
    for name in digits.FIXTURES:
        p = digits.fixture_path(name)
        assert p.is_file() and p.name == f"{name}.onnx"
        assert digits.fixture_path(f"{name}.onnx") == p
    with pytest.raises(KeyError):
        digits.fixture_path("digits_mlp")


@pytest.mark.parametrize("name", digits.FIXTURES)
def test_fixture_is_valid_onnx(name):
    path = digits.fixture_path(name)
    assert path.stat().st_size < MAX_BYTES
    model = onnx.load(str(path))
    onnx.checker.check_model(model, full_check=True)
    assert model.ir_version == 8
    assert [(o.domain, o.version) for o in model.opset_import] == [("", 17)]
    (inp,) = model.graph.input
    (out,) = model.graph.output
    assert inp.name == "input" and out.name == "logits"
    dims = lambda vi: [d.dim_param or d.dim_value for d in vi.type.tensor_type.shape.dim]  # noqa: E731
    assert dims(inp) == ["N", 1, 32, 32]
    assert dims(out) == ["N", 10]


@pytest.mark.parametrize("name", digits.FIXTURES)
def test_fixture_keeps_batchnorm_unfused(name):
    model = onnx.load(str(digits.fixture_path(name)))
    ops = Counter(n.op_type for n in model.graph.node)
    n_conv = ops["Conv"]
    assert ops["BatchNormalization"] == n_conv > 0  # one BN after every conv
    inits = {i.name for i in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "BatchNormalization":
            assert all(x in inits for x in node.input[1:])
            assert node.input[3].endswith("running_mean") and node.input[4].endswith("running_var")


def test_vgg_structure():
    model = onnx.load(str(digits.fixture_path("digits_vgg")))
    ops = Counter(n.op_type for n in model.graph.node)
    assert ops["MaxPool"] == 3 and ops["Gemm"] == 3 and ops["Flatten"] == 1
    sizes = {i.name: int(np.prod(i.dims)) for i in model.graph.initializer}
    total = sum(sizes.values())
    fc = sum(v for k, v in sizes.items() if k.startswith("classifier."))
    assert fc / total > 0.9  # FC layers dominate
    assert tuple(next(i.dims for i in model.graph.initializer if i.name == "classifier.0.weight")) == (256, 1024)


def test_resnet_structure():
    model = onnx.load(str(digits.fixture_path("digits_resnet")))
    ops = Counter(n.op_type for n in model.graph.node)
    assert ops["Add"] >= 2 and ops["GlobalAveragePool"] == 1 and ops["Gemm"] == 1
    convs = {n.name: n for n in model.graph.node if n.op_type == "Conv"}
    attr = lambda n, a: next(onnx.helper.get_attribute_value(x) for x in n.attribute if x.name == a)  # noqa: E731
    proj = [n for n in convs.values() if attr(n, "kernel_shape") == [1, 1] and attr(n, "strides") == [2, 2]]
    assert proj, "expected a strided 1x1 projection shortcut"
    dw = convs["dsconv.dw"]
    assert attr(dw, "group") == 32 and attr(dw, "kernel_shape") == [3, 3]
    assert attr(convs["dsconv.pw"], "kernel_shape") == [1, 1]


@pytest.mark.parametrize("name", digits.FIXTURES)
def test_fixture_accuracy(name):
    acc = digits.evaluate_top1(str(digits.fixture_path(name)), "test")
    assert abs(acc - MEASURED_TOP1[name]) < 0.003, acc
    assert acc >= MEASURED_TOP1[name] - 0.005
    assert digits.REFERENCE_TOP1[name] == MEASURED_TOP1[name]


def test_evaluate_top1_accepts_model_proto_and_batch():
    model = onnx.load(str(digits.fixture_path("digits_resnet")))
    a = digits.evaluate_top1(model, "test", batch=450)
    b = digits.evaluate_top1(model, "test", batch=7)
    assert a == b
    assert abs(a - MEASURED_TOP1["digits_resnet"]) < 0.003
