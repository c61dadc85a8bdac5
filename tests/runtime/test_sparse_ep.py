"""The sparse execution provider inside ONNX Runtime: claims, numerics vs ORT's dense CPU EP."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from graphs import init, make_model, run, user_error, vi
from onnx import helper as h
from onnxslim_cnn.runtime import loader

from onnxslim_cnn import runtime

REASON = runtime.unavailable_reason()
needs_ep = pytest.mark.skipif(REASON is not None, reason=f"sparse EP unavailable: {REASON}")
SPARSITIES = [0.0, 0.5, 0.9, 0.99, 1.0]
# Forced formats: with format="auto" the EP leaves a layer to ORT when the kernels' cost model
# would run it densely (e.g. at 0 %), so the sparsity sweeps name every stored format.
SWEEP_FORMATS = ["csr", "block1x4", "block4x1", "dense"]


def sparse_weight(rng, shape, sparsity, empty_rows_axis=None):
    """Random weight with exactly round(sparsity * size) zeros, plus two all-zero output rows."""
    w = rng.standard_normal(shape).astype(np.float32)
    flat = w.reshape(-1)
    flat[rng.permutation(flat.size)[: int(round(sparsity * flat.size))]] = 0.0
    if empty_rows_axis is not None and sparsity > 0:
        index = [slice(None)] * len(shape)
        index[empty_rows_axis] = slice(0, 2)
        w[tuple(index)] = 0.0
    return w


def check(model, feeds, expect_claimed, min_sparsity=0.0, rel=1e-5, **kw):
    sess = runtime.session(model, min_sparsity=min_sparsity, **kw)
    claimed = runtime.claimed_nodes(sess)
    assert sorted(n["op_type"] for n in claimed) == sorted(expect_claimed)
    got = sess.run(None, feeds)
    ref = run(model, feeds)
    for g, r in zip(got, ref):
        assert g.shape == r.shape
        scale = max(float(np.abs(r).max()), 1e-30)
        assert float(np.abs(g - r).max()) <= rel * scale
    return claimed


def gemm_model(rng, batch, k, n, sparsity, trans_a=0, trans_b=1, alpha=1.0, beta=1.0, c_shape=(None,),
               relu=True):
    w = sparse_weight(rng, (n, k) if trans_b else (k, n), sparsity, 0 if trans_b else 1)
    inputs = ["x", "W"]
    inits = [init("W", w)]
    if c_shape != (None,):
        c_shape = tuple(n if d == "n" else d for d in c_shape)
        inits.append(init("C", rng.standard_normal(c_shape).astype(np.float32)))
        inputs.append("C")
    out = "g" if relu else "y"
    nodes = [h.make_node("Gemm", inputs, [out], transA=trans_a, transB=trans_b, alpha=alpha, beta=beta, name="fc")]
    if relu:
        nodes.append(h.make_node("Relu", ["g"], ["y"], name="relu"))
    x_shape = [k, batch] if trans_a else [batch, k]
    model = make_model(nodes, [vi("x", x_shape)], [vi("y", [batch, n])], inits)
    return model, {"x": rng.standard_normal(x_shape).astype(np.float32)}


@needs_ep
@pytest.mark.parametrize("sparsity", SPARSITIES)
@pytest.mark.parametrize("batch", [1, 32])
@pytest.mark.parametrize("fmt", SWEEP_FORMATS)
def test_gemm_bias_relu_every_sparsity(sparsity, batch, fmt):
    rng = np.random.default_rng(int(sparsity * 100) + batch)
    model, feeds = gemm_model(rng, batch, 96, 40, sparsity, c_shape=("n",))
    check(model, feeds, ["Gemm", "Relu"], format=fmt)


@needs_ep
@pytest.mark.parametrize("trans_a,trans_b", [(0, 0), (0, 1), (1, 0), (1, 1)])
@pytest.mark.parametrize("c_shape", [(None,), ("n",), (1, "n"), ()])
@pytest.mark.parametrize("batch", [1, 32])
def test_gemm_forms(trans_a, trans_b, c_shape, batch):
    rng = np.random.default_rng(7)
    model, feeds = gemm_model(rng, batch, 50, 24, 0.9, trans_a, trans_b, alpha=0.7, beta=-1.3, c_shape=c_shape,
                              relu=False)
    check(model, feeds, ["Gemm"])


@needs_ep
def test_gemm_beta_zero_ignores_c():
    # ORT's Gemm skips C when beta == 0, so a non-finite C must not turn into 0 * inf = NaN.
    rng = np.random.default_rng(8)
    w = sparse_weight(rng, (8, 16), 0.9)
    c = rng.standard_normal(8).astype(np.float32)
    c[2], c[3] = np.inf, np.nan
    model = make_model([h.make_node("Gemm", ["x", "W", "C"], ["y"], transB=1, beta=0.0, name="fc")],
                       [vi("x", [2, 16])], [vi("y", [2, 8])], [init("W", w), init("C", c)])
    check(model, {"x": rng.standard_normal((2, 16)).astype(np.float32)}, ["Gemm"], format="csr")


def matmul_model(rng, a_shape, n, sparsity, bias=False, relu=False):
    k = a_shape[-1]
    w = sparse_weight(rng, (k, n), sparsity, 1)
    nodes = [h.make_node("MatMul", ["x", "W"], ["m"], name="mm")]
    inits = [init("W", w)]
    last = "m"
    if bias:
        inits.append(init("B", rng.standard_normal((n,)).astype(np.float32)))
        nodes.append(h.make_node("Add", ["B", last], ["a"], name="bias"))  # bias first: either order is fused
        last = "a"
    if relu:
        nodes.append(h.make_node("Relu", [last], ["r"], name="relu"))
        last = "r"
    nodes.append(h.make_node("Identity", [last], ["y"]))
    out_shape = list(a_shape[:-1]) + [n]
    model = make_model(nodes, [vi("x", list(a_shape))], [vi("y", out_shape)], inits)
    return model, {"x": rng.standard_normal(a_shape).astype(np.float32)}


@needs_ep
@pytest.mark.parametrize("sparsity", SPARSITIES)
@pytest.mark.parametrize("batch", [1, 32])
@pytest.mark.parametrize("fmt", SWEEP_FORMATS)
def test_matmul_batch_dims_every_sparsity(sparsity, batch, fmt):
    rng = np.random.default_rng(int(sparsity * 100) + batch + 1)
    model, feeds = matmul_model(rng, (batch, 3, 64), 20, sparsity, bias=True, relu=True)
    # ORT's level-1 MatMulAddFusion would rewrite the pair into Reshape+Gemm+Reshape before
    # partitioning (also covered: the Gemm is claimed); without it the group is MatMul + Add + Relu.
    plain = ort.SessionOptions()
    plain.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    check(model, feeds, ["MatMul", "Add", "Relu"], sess_options=plain, format=fmt)
    check(model, feeds, ["Gemm"], format=fmt)


@needs_ep
@pytest.mark.parametrize("a_shape", [(64,), (5, 64), (2, 3, 4, 64)])
def test_matmul_ranks(a_shape):
    rng = np.random.default_rng(3)
    model, feeds = matmul_model(rng, a_shape, 33, 0.9)
    check(model, feeds, ["MatMul"])


def conv_model(rng, x_shape, oc, kernel, sparsity, bias=True, relu=True, **attrs):
    c = x_shape[1]
    w = sparse_weight(rng, (oc, c, *kernel), sparsity, 0)
    inputs, inits = ["x", "W"], [init("W", w)]
    if bias:
        inputs.append("B")
        inits.append(init("B", rng.standard_normal((oc,)).astype(np.float32)))
    nodes = [h.make_node("Conv", inputs, ["c" if relu else "y"], name="conv", **attrs)]
    if relu:
        nodes.append(h.make_node("Relu", ["c"], ["y"], name="relu"))
    return model_unknown_output(nodes, x_shape, inits), {"x": rng.standard_normal(x_shape).astype(np.float32)}


def model_unknown_output(nodes, x_shape, inits):
    """Like graphs.make_model, with the output shape left to ONNX shape inference."""
    graph = h.make_graph(nodes, "test", [vi("x", list(x_shape))], [vi("y", None)], inits)
    model = h.make_model(graph, opset_imports=[h.make_opsetid("", 17)])
    model.ir_version = 8
    model = onnx.shape_inference.infer_shapes(model, strict_mode=True)
    onnx.checker.check_model(model)
    return model


@needs_ep
@pytest.mark.parametrize("sparsity", SPARSITIES)
@pytest.mark.parametrize("batch", [1, 32])
@pytest.mark.parametrize("fmt", SWEEP_FORMATS)
def test_conv_every_sparsity(sparsity, batch, fmt):
    rng = np.random.default_rng(int(sparsity * 100) + batch + 2)
    model, feeds = conv_model(rng, (batch, 6, 9, 8), 10, (3, 3), sparsity, strides=[2, 1], pads=[1, 0, 2, 1])
    check(model, feeds, ["Conv", "Relu"], format=fmt)


CONV_FORMS = [
    dict(kernel=(3, 3), strides=[2, 2], pads=[0, 1, 1, 0]),
    dict(kernel=(3, 3), dilations=[2, 2], pads=[2, 2, 2, 2]),
    dict(kernel=(3, 2), strides=[1, 2], dilations=[2, 1]),
    dict(kernel=(3, 3), strides=[2, 2], auto_pad="SAME_UPPER"),
    dict(kernel=(4, 4), strides=[3, 3], auto_pad="SAME_LOWER"),
    dict(kernel=(3, 3), auto_pad="VALID"),
    dict(kernel=(1, 1)),
    dict(kernel=(1, 1), strides=[2, 2]),
    dict(kernel=(5, 5), pads=[2, 2, 2, 2], kernel_shape=[5, 5]),
]


@needs_ep
@pytest.mark.parametrize("form", CONV_FORMS, ids=lambda f: "-".join(f"{k}{v}" for k, v in f.items()))
@pytest.mark.parametrize("batch", [1, 3])
def test_conv_forms(form, batch):
    rng = np.random.default_rng(11)
    form = dict(form)
    kernel = form.pop("kernel")
    model, feeds = conv_model(rng, (batch, 5, 11, 10), 7, kernel, 0.9, bias=False, relu=False, **form)
    check(model, feeds, ["Conv"], format="csr")  # csr: the conv cost model would leave such tiny convs to ORT


@needs_ep
def test_conv1d():
    rng = np.random.default_rng(12)
    model, feeds = conv_model(rng, (2, 4, 17), 6, (3,), 0.8, strides=[2], pads=[1, 2], dilations=[2])
    check(model, feeds, ["Conv", "Relu"], format="csr")


@needs_ep
@pytest.mark.parametrize("fmt", runtime.FORMATS)
def test_every_kernel_format(fmt):
    rng = np.random.default_rng(13)
    model, feeds = gemm_model(rng, 5, 70, 37, 0.9, c_shape=("n",))
    check(model, feeds, ["Gemm", "Relu"], format=fmt)
    model, feeds = conv_model(rng, (2, 5, 8, 8), 9, (3, 3), 0.9, pads=[1, 1, 1, 1])
    check(model, feeds, ["Conv", "Relu"], format=fmt)


@needs_ep
def test_forced_block1x4_on_fewer_than_4_columns_runs_as_csr():
    # A 1x4 block needs 4 input features; forcing the format must not fail the whole session.
    rng = np.random.default_rng(18)
    model, feeds = gemm_model(rng, 3, 3, 5, 0.5, c_shape=("n",))
    check(model, feeds, ["Gemm", "Relu"], format="block1x4")


@needs_ep
def test_leaves_what_it_cannot_run():
    rng = np.random.default_rng(14)
    x = rng.standard_normal((2, 4, 6, 6)).astype(np.float32)
    w_group = sparse_weight(rng, (4, 2, 3, 3), 0.9)
    w_dense = rng.standard_normal((8, 4, 1, 1)).astype(np.float32)
    nodes = [h.make_node("Conv", ["x", "Wg"], ["g"], group=2, name="grouped"),
             h.make_node("Conv", ["g", "Wd"], ["y"], name="dense")]
    model = model_unknown_output(nodes, (2, 4, 6, 6), [init("Wg", w_group), init("Wd", w_dense)])
    sess = runtime.session(model, min_sparsity=0.5)
    assert runtime.claimed_nodes(sess) == []
    # nothing claimed: the CPU EP runs the model, bit for bit as without us
    np.testing.assert_array_equal(sess.run(None, {"x": x})[0], run(model, {"x": x})[0])


@needs_ep
def test_min_sparsity_threshold_and_shared_output():
    rng = np.random.default_rng(15)
    w80 = sparse_weight(rng, (16, 12), 0.8)
    w40 = sparse_weight(rng, (12, 8), 0.4)
    # fc1's output feeds both fc2 and the graph output, so its Relu cannot be fused away
    nodes = [h.make_node("Gemm", ["x", "W80"], ["a"], name="fc1"), h.make_node("Relu", ["a"], ["r"], name="r1"),
             h.make_node("Gemm", ["r", "W40"], ["y"], name="fc2")]
    model = make_model(nodes, [vi("x", [3, 16])], [vi("y", [3, 8]), vi("r", [3, 12])],
                       [init("W80", w80), init("W40", w40)])
    feeds = {"x": rng.standard_normal((3, 16)).astype(np.float32)}
    assert [n["name"] for n in check(model, feeds, ["Gemm", "Relu"], min_sparsity=0.5, format="csr")] == ["fc1", "r1"]
    check(model, feeds, ["Gemm", "Relu", "Gemm"], min_sparsity=0.3, format="csr")
    check(model, feeds, [], min_sparsity=0.9, format="csr")


@needs_ep
def test_auto_format_leaves_dense_layers_to_ort():
    rng = np.random.default_rng(17)
    model, feeds = gemm_model(rng, 1, 256, 128, 0.0)
    check(model, feeds, [], min_sparsity=0.0)  # the cost model says dense: MLAS keeps it
    model, feeds = gemm_model(rng, 1, 256, 128, 0.95)
    check(model, feeds, ["Gemm", "Relu"], min_sparsity=0.0)


@needs_ep
def test_library_loads_in_a_fresh_process(tmp_path):
    # outside the source tree, so the import resolves to the installed package
    code = ("import onnxslim_cnn.runtime as r; assert r.available(), r.unavailable_reason(); "
            "print(r.library_path())")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, check=True)
    path = out.stdout.strip()
    assert path == str(runtime.library_path()) and path.startswith(str(loader._package_dir()))


def test_missing_library_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.delenv("ONNXSLIM_SPARSE_EP_LIBRARY", raising=False)
    monkeypatch.setattr(loader, "_package_dir", lambda: tmp_path)
    (tmp_path / "_sparse_ep.BUILD_FAILED.txt").write_text("no C++ compiler found (set CXX or install g++)\n")
    msg = user_error(loader.library_path)
    assert "sparse execution provider library is missing" in msg and "no C++ compiler found" in msg
    monkeypatch.setenv("ONNXSLIM_SPARSE_EP_LIBRARY", str(tmp_path / "nope.so"))
    assert "does not exist" in user_error(loader.library_path)


@needs_ep
def test_bad_options_are_user_errors():
    rng = np.random.default_rng(16)
    model, _ = gemm_model(rng, 1, 8, 4, 0.5)
    assert "min_sparsity must be in [0, 1]" in user_error(runtime.session, model, min_sparsity=1.5)
    assert "format must be one of" in user_error(runtime.session, model, format="coo")
    assert "is not offered" in user_error(runtime.session, model, providers=["NoSuchExecutionProvider"])
    assert "min_sparsity must be a number" in user_error(runtime.session, model, min_sparsity="most")
    assert "providers must be a list" in user_error(runtime.session, model, providers="CPUExecutionProvider")


@needs_ep
def test_unreadable_models_are_user_errors(tmp_path):
    assert "model not found" in user_error(runtime.session, str(tmp_path / "missing.onnx"))
    (tmp_path / "junk.onnx").write_bytes(b"not a model")
    assert "onnxruntime cannot load" in user_error(runtime.session, tmp_path / "junk.onnx")
    assert "onnxruntime cannot load" in user_error(runtime.session, b"not a model")
    assert "model must be a path" in user_error(runtime.session, 42)


def test_old_onnxruntime_is_refused_with_the_version(monkeypatch):
    import onnxruntime

    monkeypatch.setattr(onnxruntime, "__version__", "1.20.1")
    msg = user_error(loader.check_onnxruntime)
    assert "needs onnxruntime >= 1.24" in msg and "this is onnxruntime 1.20.1" in msg
