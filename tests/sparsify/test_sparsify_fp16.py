"""Passes ``sparsify`` (unstructured magnitude pruning) and ``fp16`` (float16 weights/compute)."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest

import onnxslim_cnn
from onnxslim_cnn.model_io import check_model
from onnxslim_cnn.models import digits, reference
from onnxslim_cnn.passes.fp16 import Fp16Pass
from onnxslim_cnn.passes.sparsify import SparsifyPass
from graphs import conv_bn_model, run


@pytest.fixture(scope="module")
def resnet():
    return reference.build("resnet18", width=0.25, input_size=32, num_classes=10)


@pytest.fixture(scope="module")
def vgg():
    return onnx.load(str(digits.fixture_path("digits_vgg")))


def _weights(model, ops=("Conv", "Gemm", "MatMul")):
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
    return {n.name: inits[n.input[1]] for n in model.graph.node if n.op_type in ops and n.input[1] in inits}


def _run(model, x):
    s = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return s.run(None, {s.get_inputs()[0].name: x})[0]


def _valid(model):
    check_model(model, full_check=True)
    ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


# --------------------------------------------------------------------------- sparsify


def test_sparsify_global_ratio_is_exact(resnet):
    out, report = onnxslim_cnn.compress(resnet, passes=["sparsify"], calib="random", sparsify__ratio=0.6, fidelity=False)
    _valid(out)
    before, after = _weights(resnet), _weights(out)
    eligible = [n for n, w in before.items() if w.size >= 256]
    total = sum(after[n].size for n in eligible)
    zeros = sum(int(np.count_nonzero(after[n] == 0)) for n in eligible)
    assert zeros == round(0.6 * total)
    rec = report.passes[0]
    assert rec.stats["zeros"] == zeros and rec.stats["weights"] == total
    changes = {c["item"]: c for c in rec.changes}
    for n in eligible:
        assert changes[n]["zeros"] == int(np.count_nonzero(after[n] == 0)) and changes[n]["total"] == after[n].size
    # global: layers end up with different sparsities; surviving weights are untouched
    assert len({round(c["sparsity"], 2) for c in changes.values()}) > 1
    for n in eligible:
        kept = after[n] != 0
        np.testing.assert_array_equal(after[n][kept], before[n][kept])
    # one threshold: no zeroed weight anywhere is larger than a kept one
    dropped = np.concatenate([np.abs(before[n][after[n] == 0]) for n in eligible])
    kept_all = np.concatenate([np.abs(before[n][after[n] != 0]) for n in eligible])
    assert dropped.max() <= kept_all.min()


def test_sparsify_layer_scope_overrides_and_exclude(resnet):
    before = _weights(resnet)
    names = [n for n, w in before.items() if w.size >= 256]
    override, excluded = names[3], names[5]
    out, _ = SparsifyPass(ratio=0.5, scope="layer", layer_ratio={override: 0.9}, exclude=[excluded]).apply(resnet)
    _valid(out)
    after = _weights(out)
    for n in names:
        z = int(np.count_nonzero(after[n] == 0))
        if n == excluded:
            np.testing.assert_array_equal(after[n], before[n])
        elif n == override:
            assert z == round(0.9 * after[n].size)
        else:
            assert z == round(0.5 * after[n].size)
    # threshold: every zeroed weight of a layer is no larger than every kept one
    w0, w1 = before[names[0]], after[names[0]]
    assert np.abs(w0[w1 == 0]).max() <= np.abs(w0[w1 != 0]).min()


def test_sparsify_refit_lowers_fc_error(vgg):
    x, _ = digits.load_split("train")
    xt, _ = digits.load_split("test")
    ref = _run(vgg, xt)
    convs = [n.name for n in vgg.graph.node if n.op_type == "Conv"]
    errors, models = {}, {}
    for refit in (False, True):
        out, report = onnxslim_cnn.compress(vgg, passes=["sparsify"], calib={"input": x[:512]}, fidelity=False,
                                            sparsify__ratio=0.8, sparsify__scope="layer",
                                            sparsify__exclude=convs, sparsify__refit=refit)
        _valid(out)
        o = _run(out, xt)
        errors[refit] = float(np.linalg.norm(o - ref) / np.linalg.norm(ref))
        models[refit] = out
        assert report.passes[0].stats["sparsity"] >= 0.8 - 1e-6
    assert errors[True] < 0.5 * errors[False], errors
    # the refit keeps the mask: no pruned weight comes back
    for n, w in _weights(models[False], ("Gemm",)).items():
        assert np.all(_weights(models[True], ("Gemm",))[n][w == 0] == 0)
    assert digits.evaluate_top1(models[True]) >= digits.evaluate_top1(vgg) - 0.005


def test_sparsify_refit_conv_and_calibration_flag(resnet):
    assert not SparsifyPass().needs_calibration and SparsifyPass(refit=True).needs_calibration
    out, result = SparsifyPass(ratio=0.5, scope="layer", refit=True).apply(resnet)
    _valid(out)
    assert result.stats.get("refitted", 0) > 0
    x = np.random.default_rng(1).standard_normal((8, 3, 32, 32)).astype(np.float32)
    plain, _ = SparsifyPass(ratio=0.5, scope="layer").apply(resnet)
    ref = _run(resnet, x)
    err = lambda m: float(np.linalg.norm(_run(m, x) - ref) / np.linalg.norm(ref))  # noqa: E731
    assert err(out) < err(plain)


def test_sparsify_skips_small_layers(resnet):
    _, result = SparsifyPass(ratio=0.5, min_params=10**9).apply(resnet)
    assert not result.changed and all("min_params" in s["reason"] for s in result.skipped)


# --------------------------------------------------------------------------- fp16


def _io_types(model):
    return ([i.type.tensor_type.elem_type for i in model.graph.input],
            [o.type.tensor_type.elem_type for o in model.graph.output])


@pytest.mark.parametrize("which", ["resnet", "vgg"])
def test_fp16_weights_half_io_float(which, resnet, vgg):
    model = resnet if which == "resnet" else vgg
    out, report = onnxslim_cnn.compress(model, passes=["fp16"], calib="random")
    _valid(out)
    assert report.passes[0].status == "ok"
    floats = [t for t in out.graph.initializer if t.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16)]
    assert floats and all(t.data_type == onnx.TensorProto.FLOAT16 for t in floats)
    assert _io_types(out) == _io_types(model)
    if which == "resnet":
        x = np.random.default_rng(0).standard_normal((4, 3, 32, 32)).astype(np.float32)
    else:
        x = digits.load_split("test")[0][:64]
    a, b = _run(model, x), _run(out, x)
    assert b.dtype == np.float32
    assert np.abs(a - b).max() / np.abs(a).max() < 1e-2
    if which == "vgg":
        assert abs(digits.evaluate_top1(out) - digits.evaluate_top1(model)) <= 0.005


def test_fp16_without_keep_io_types(vgg):
    out, _ = Fp16Pass(keep_io_types=False).apply(vgg)
    _valid(out)
    assert _io_types(out) == ([onnx.TensorProto.FLOAT16], [onnx.TensorProto.FLOAT16])
    x = digits.load_split("test")[0][:16]
    a = _run(vgg, x)
    b = _run(out, x.astype(np.float16))
    assert b.dtype == np.float16
    assert np.abs(a - b.astype(np.float32)).max() / np.abs(a).max() < 1e-2


def test_fp16_retargets_internal_casts():
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])
    w = onnx.numpy_helper.from_array(np.full((2, 3), 2.0, np.float32), "w")
    nodes = [helper.make_node("Cast", ["x"], ["xi"], to=TensorProto.INT64),
             helper.make_node("Cast", ["xi"], ["xf"], to=TensorProto.FLOAT),
             helper.make_node("Mul", ["xf", "w"], ["y"])]
    m = helper.make_model(helper.make_graph(nodes, "g", [x], [y], [w]), opset_imports=[helper.make_opsetid("", 17)])
    out, result = Fp16Pass().apply(m)
    _valid(out)
    assert result.stats["casts_retargeted"] == 1
    v = np.arange(6, dtype=np.float32).reshape(2, 3)
    np.testing.assert_allclose(_run(out, v), 2 * v)


def test_sparsify_sensitivity_finds_largest_ratio_within_budget(vgg):
    x = digits.load_split("train")[0][:64]
    budget, steps = 0.05, 4
    _, result = SparsifyPass(mode="sensitivity", budget=budget, search_steps=steps).apply(vgg, calib={"input": x})
    assert SparsifyPass(mode="sensitivity").needs_calibration
    changes = {c["item"]: c for c in result.changes}
    assert set(changes) == {"features.4", "features.8", "classifier.0", "classifier.3", "classifier.6"}
    ref = _run(vgg, x)
    err = lambda m: float(np.linalg.norm(_run(m, x) - ref) / np.linalg.norm(ref))  # noqa: E731
    for name in ("features.8", "classifier.0"):
        c = changes[name]
        assert 0 < c["ratio"] < 0.99 and c["search_error"] <= budget
        assert c["zeros"] == round(c["ratio"] * c["total"])
        # the layer alone at the found ratio is within budget, one search step further is not
        alone, _ = SparsifyPass(scope="layer", ratio=0.0, layer_ratio={name: c["ratio"]}).apply(vgg)
        assert abs(err(alone) - c["search_error"]) < 1e-6 and err(alone) <= budget
        further, _ = SparsifyPass(scope="layer", ratio=0.0,
                                  layer_ratio={name: c["ratio"] + 0.99 / 2 ** steps}).apply(vgg)
        assert err(further) > budget
    # the FC layers tolerate more pruning than the convolutions
    assert changes["classifier.0"]["ratio"] > changes["features.4"]["ratio"]


@pytest.mark.parametrize("fold_bn", [True, False])
def test_fp16_folds_batchnorm_whose_variance_overflows_half(fold_bn):
    """A BN running variance beyond 65504 (as in PP-OCRv4 det) must not be clamped: fold it first."""
    model = conv_bn_model()
    for t in model.graph.initializer:
        if t.name in ("v", "g"):  # variance 1e6..4e6 with gamma scaled alike: same magnitudes out
            scale = 1e6 if t.name == "v" else 1e3
            values = onnx.numpy_helper.to_array(t) * scale
            t.CopyFrom(onnx.numpy_helper.from_array(values.astype(np.float32), t.name))
    x = np.random.default_rng(0).normal(size=(2, 4, 8, 8)).astype(np.float32)
    half, result = Fp16Pass(fold_bn=fold_bn).apply(model)
    ref, got = run(model, {"x": x})[0], run(half, {"x": x})[0]
    rel = float(np.abs(got - ref).max() / np.abs(ref).max())
    if fold_bn:
        assert not any(n.op_type == "BatchNormalization" for n in half.graph.node)
        assert "values_clamped" not in result.stats and rel < 5e-3, rel
    else:  # what the option prevents: the clamped variance scales the output by sqrt(v / 65504)
        assert result.stats["values_clamped"] == 6 and rel > 0.5, rel


def _casts(model):
    return [n for n in model.graph.node if n.op_type == "Cast"]


def test_fp16_block_list_keeps_nodes_float32_without_double_rounding():
    """Every node blocked (after the BN fold: conv -> relu): the model computes exactly as float32,
    with no Cast left (the input Cast is looked through, the output Cast replaced)."""
    model = conv_bn_model()
    x = np.random.default_rng(1).normal(size=(2, 4, 8, 8)).astype(np.float32)
    ref = run(model, {"x": x})[0]
    out, result = Fp16Pass(op_block_list=["Conv", "Relu"]).apply(model)
    check_model(out)
    assert result.stats["kept_float32"] == 2 and not _casts(out)
    assert all(t.data_type == onnx.TensorProto.FLOAT for t in out.graph.initializer)
    assert np.abs(run(out, {"x": x})[0] - ref).max() < 1e-5  # float32 rounding of the BN fold only


def test_fp16_node_block_list_casts_around_one_node():
    """Only the conv kept: it reads the float32 input and weight directly, its result goes to
    float16 for the Relu; a node name that is not in the graph gives a warning."""
    model = conv_bn_model()
    x = np.random.default_rng(2).normal(size=(2, 4, 8, 8)).astype(np.float32)
    ref = run(model, {"x": x})[0]
    out, result = Fp16Pass(node_block_list=["conv", "no_such_node"]).apply(model)
    check_model(out)
    conv = next(n for n in out.graph.node if n.op_type == "Conv")
    inits = {t.name: t for t in out.graph.initializer}
    assert conv.input[0] == "x" and inits[conv.input[1]].data_type == onnx.TensorProto.FLOAT
    casts = {(n.input[0], n.attribute[0].i) for n in _casts(out)}
    assert (conv.output[0], onnx.TensorProto.FLOAT16) in casts and len(casts) == 2  # + the output Cast
    plain, _ = Fp16Pass(op_block_list=[]).apply(model)
    err = lambda m: float(np.abs(run(m, {"x": x})[0] - ref).max())  # noqa: E731
    assert err(out) < 2e-2 and err(plain) < 2e-2
    assert result.skipped == [{"item": "no_such_node", "reason": "node_block_list: no node of this name"}]


def test_fp16_default_block_list_keeps_topk_float32():
    """TopK is in the default block list (onnxconverter-common's): its values and the model
    output stay float32 while the Conv in front of it runs in float16."""
    from graphs import init, make_model, vi
    h = onnx.helper
    rng = np.random.default_rng(3)
    nodes = [h.make_node("Conv", ["x", "w"], ["c"], name="conv"),
             h.make_node("Flatten", ["c"], ["f"], name="flat"),
             h.make_node("TopK", ["f", "k"], ["y", "idx"], name="topk")]
    inits = [init("w", rng.normal(size=(3, 2, 1, 1))), onnx.numpy_helper.from_array(np.array([5], np.int64), "k")]
    model = make_model(nodes, [vi("x", [1, 2, 4, 4])], [vi("y", [1, 5]), vi("idx", [1, 5], onnx.TensorProto.INT64)],
                       inits)
    out, result = Fp16Pass(fold_bn=False).apply(model)
    check_model(out)
    assert result.stats["kept_float32"] == 1
    topk = next(n for n in out.graph.node if n.op_type == "TopK")
    assert topk.output[0] == "y"  # writes the float32 graph output itself
    x = rng.normal(size=(1, 2, 4, 4)).astype(np.float32)
    got, ref = run(out, {"x": x}), run(model, {"x": x})
    assert np.abs(got[0] - ref[0]).max() < 1e-2 and got[0].dtype == np.float32
