"""Pass ``share``: k-means weight sharing stored as codes + codebook (Gather) or DequantizeLinear."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from graphs import run, user_error

import onnxslim_cnn
from onnxslim_cnn.model_io import check_model
from onnxslim_cnn.models import digits
from onnxslim_cnn.passes import share as share_mod
from onnxslim_cnn.passes.share import SharePass


@pytest.fixture(scope="module")
def vgg():
    return onnx.load(str(digits.fixture_path("digits_vgg")))


@pytest.fixture(scope="module")
def x():
    return digits.load_split("test")[0][:64]


def _inits(model):
    return {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}


def _effective_weights(model):
    """Layer name -> the weight it computes with (codebook[codes] / dequantized), from the file."""
    inits = _inits(model)
    producer = {o: n for n in model.graph.node for o in n.output}
    out = {}
    for n in model.graph.node:
        if n.op_type not in ("Conv", "Gemm"):
            continue
        w = n.input[1]
        if w in inits:
            out[n.name] = inits[w]
            continue
        p = producer[w]
        if p.op_type == "Gather":
            codes = inits[producer[p.input[1]].input[0]]
            out[n.name] = inits[p.input[0]][codes.astype(np.int64)]
        else:
            assert p.op_type == "DequantizeLinear"
            q, s, z = (inits[i] for i in p.input)
            out[n.name] = ((q.astype(np.int32) - int(z)).astype(np.float32) * s).astype(np.float32)
    return out


def test_share_defaults_8_conv_5_fc_uint8_gather(vgg, x):
    out, result = SharePass().apply(vgg)
    check_model(out, full_check=True)
    changes = {c["item"]: c for c in result.changes}
    convs = [n.name for n in vgg.graph.node if n.op_type == "Conv"]
    fcs = [n.name for n in vgg.graph.node if n.op_type == "Gemm"]
    assert {changes[n]["bits"] for n in convs if n in changes} == {8}
    assert {changes[n]["bits"] for n in fcs} == {5}
    assert "features.0" not in changes  # 144 weights < min_params
    before, after = _inits(vgg), _effective_weights(out)
    for n, c in changes.items():
        assert np.unique(after[n]).size <= 2 ** c["bits"] == c["codebook"]
    codes = [t for t in out.graph.initializer if t.name.endswith("_codes")]
    assert len(codes) == len(changes) and all(t.data_type == onnx.TensorProto.UINT8 for t in codes)
    assert sum(n.op_type == "Gather" for n in out.graph.node) == len(changes)
    # linear-init k-means beats the evenly spaced grid of the same size on every layer
    uni, _ = SharePass(codebook="uniform").apply(vgg)
    uw = _effective_weights(uni)
    weight_of = {n.name: before[n.input[1]] for n in vgg.graph.node if n.op_type in ("Conv", "Gemm")}
    for n in changes:
        assert np.linalg.norm(after[n] - weight_of[n]) < np.linalg.norm(uw[n] - weight_of[n])
    ref, got = run(vgg, {"input": x})[0], run(out, {"input": x})[0]
    assert np.array_equal(ref.argmax(1), got.argmax(1))


def test_share_16_bits_reproduces_outputs(vgg, x):
    out, result = SharePass(conv_bits=16, fc_bits=16).apply(vgg)
    check_model(out, full_check=True)
    assert {t.data_type for t in out.graph.initializer if t.name.endswith("_codes")} == {onnx.TensorProto.UINT16}
    ref, got = run(vgg, {"input": x})[0], run(out, {"input": x})[0]
    assert float(np.max(np.abs(ref - got))) / float(np.max(np.abs(ref))) <= 1e-3
    assert max(c["rel_error"] for c in result.changes) < 1e-3


def test_share_keeps_pruned_zeros_exact(vgg, x):
    sparse, _ = onnxslim_cnn.compress(vgg, passes=["sparsify"], calib="random", sparsify__ratio=0.8, fidelity=False)
    before = {n.name: _inits(sparse)[n.input[1]] for n in sparse.graph.node if n.op_type in ("Conv", "Gemm")}
    for form, codebook in (("gather", "kmeans"), ("dequantize", "uniform")):
        out, result = SharePass(form=form, codebook=codebook, fc_bits=4).apply(sparse)
        check_model(out, full_check=True)
        after = _effective_weights(out)
        for c in result.changes:
            n = c["item"]
            assert np.all(after[n][before[n] == 0] == 0), (form, n)
            if codebook == "kmeans":  # no kept weight becomes zero: zero is its own code
                assert np.all(after[n][before[n] != 0] != 0)
                assert c["zeros"] == int(np.count_nonzero(before[n] == 0))
        run(out, {"input": x})


def test_share_dequantize_form_equals_uniform_gather(vgg, x):
    dq, _ = SharePass(codebook="uniform", form="dequantize").apply(vgg)
    ga, _ = SharePass(codebook="uniform", form="gather").apply(vgg)
    check_model(dq, full_check=True)
    assert any(n.op_type == "DequantizeLinear" for n in dq.graph.node)
    assert not any(n.op_type == "Gather" for n in dq.graph.node)
    a, b = _effective_weights(dq), _effective_weights(ga)
    for n in a:
        np.testing.assert_array_equal(a[n], b[n])
    np.testing.assert_allclose(run(dq, {"input": x})[0], run(ga, {"input": x})[0], rtol=1e-5, atol=1e-5)


def test_share_bad_options(vgg):
    assert "codebook=uniform" in user_error(SharePass(form="dequantize").apply, vgg)
    assert "bits" in user_error(SharePass(form="dequantize", codebook="uniform", fc_bits=9).apply, vgg)
    assert "[1, 16]" in user_error(SharePass(layer_bits={"classifier.0": 20}).apply, vgg)


def test_share_second_run_skips_shared_layers(vgg):
    once, _ = SharePass().apply(vgg)
    _, result = SharePass().apply(once)
    assert not result.changed and all(s["reason"] in ("weight is not a constant", "144 weights < min_params 256")
                                      for s in result.skipped)


def test_sorted_lloyd_matches_sklearn(monkeypatch):
    rng = np.random.default_rng(0)
    w = (rng.standard_normal(3000) * rng.uniform(0.1, 1, 3000)).astype(np.float32).reshape(30, 100)
    a = share_mod.kmeans_share(w, 4)
    monkeypatch.setattr(share_mod, "SKLEARN_MAX_WORK", 0)  # force the sorted 1-D Lloyd
    b = share_mod.kmeans_share(w, 4)
    np.testing.assert_allclose(a.codebook, b.codebook, rtol=1e-4, atol=1e-6)
    assert np.mean(a.codes == b.codes) > 0.999
    # deterministic: same bytes twice
    c = share_mod.kmeans_share(w, 4)
    assert np.array_equal(a.codes, c.codes) and np.array_equal(a.codebook, c.codebook)


def _conv_model(dtype, shape=(16, 8, 3, 3)):
    from graphs import make_model, vi

    tt = onnx.helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    w = np.random.default_rng(3).standard_normal(shape).astype(dtype)
    return make_model([onnx.helper.make_node("Conv", ["x", "w"], ["y"], pads=[1, 1, 1, 1], name="conv")],
                      [vi("x", [1, shape[1], 6, 6], tt)], [vi("y", [1, shape[0], 6, 6], tt)],
                      [onnx.numpy_helper.from_array(w, "w")])


@pytest.mark.parametrize("dtype", [np.float16, np.float64])
def test_share_non_float32_weights(dtype):
    """Gather form keeps the weight's dtype (fp16 models after the fp16 pass); DequantizeLinear
    (opset < 19) only outputs float32, so that form skips such layers instead of writing a model
    the checker rejects (which made the pipeline revert the whole pass)."""
    m = _conv_model(dtype)
    x = np.random.default_rng(4).standard_normal((1, 8, 6, 6)).astype(dtype)
    out, result = SharePass(conv_bits=8).apply(m)
    check_model(out, full_check=True)
    assert [c["item"] for c in result.changes] == ["conv"]
    assert {t.data_type for t in out.graph.initializer if t.name.endswith("_codebook")} == {m.graph.initializer[0].data_type}
    if dtype == np.float16:  # ORT has no float64 Conv kernel
        ref, got = run(m, {"x": x})[0], run(out, {"x": x})[0]
        assert got.dtype == dtype and np.abs(ref - got).max() <= 0.05 * np.abs(ref).max()
    out, result = SharePass(form="dequantize", codebook="uniform").apply(m)
    check_model(out, full_check=True)
    assert not result.changes and result.skipped == [
        {"item": "conv", "reason": f"form=dequantize makes float32 weights; this one is {np.dtype(dtype)}"}]
