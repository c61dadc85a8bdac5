"""Sparse EP claims beyond x * W: a constant left operand (W * x), formats that follow the
product width at run time, weights built from ORT's tensor in panels. Numerics vs ORT's dense
CPU EP on the same model (test_sparse_ep.check)."""

from __future__ import annotations

import ctypes
import re
import subprocess
import sys
import time

import numpy as np
import onnxruntime as ort
import pytest
from graphs import init, make_model, run, user_error, vi
from onnx import helper as h
from test_sparse_ep import SPARSITIES, SWEEP_FORMATS, check, sparse_weight

from onnxslim_cnn import runtime

REASON = runtime.unavailable_reason()
needs_ep = pytest.mark.skipif(REASON is not None, reason=f"sparse EP unavailable: {REASON}")
FORMAT_NAMES = ["csr", "block1x4", "block4x1", "dense"]  # sparse_kernels.h Format values


def no_fusion():
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return so


def left_matmul_model(rng, m, x_shape, sparsity, bias_shape=None, relu=False):
    """y = [Relu](W @ x [+ bias]) with W[m x K] constant, K = x_shape[-2] (x_shape[0] for 1-D x)."""
    k = x_shape[-2] if len(x_shape) > 1 else x_shape[0]
    w = sparse_weight(rng, (m, k), sparsity, 0)
    nodes = [h.make_node("MatMul", ["W", "x"], ["mm"], name="mm")]
    inits = [init("W", w)]
    last = "mm"
    if bias_shape is not None:
        inits.append(init("B", rng.standard_normal(bias_shape).astype(np.float32)))
        nodes.append(h.make_node("Add", [last, "B"], ["a"], name="bias"))
        last = "a"
    if relu:
        nodes.append(h.make_node("Relu", [last], ["r"], name="relu"))
        last = "r"
    nodes.append(h.make_node("Identity", [last], ["y"]))
    out_shape = [m] if len(x_shape) == 1 else [*x_shape[:-2], m, x_shape[-1]]
    model = make_model(nodes, [vi("x", list(x_shape))], [vi("y", out_shape)], inits)
    return model, {"x": rng.standard_normal(x_shape).astype(np.float32)}


def left_gemm_model(rng, m, k, n, sparsity, trans_a=0, trans_b=0, alpha=1.0, beta=1.0, c_shape=None, relu=False):
    """y = [Relu](alpha * A' @ B' + beta * C) with A constant (m x k after transA), B the input."""
    a = sparse_weight(rng, (k, m) if trans_a else (m, k), sparsity, 1 if trans_a else 0)
    inputs, inits = ["A", "x"], [init("A", a)]
    if c_shape is not None:
        inputs.append("C")
        inits.append(init("C", rng.standard_normal(c_shape).astype(np.float32)))
    out = "g" if relu else "y"
    nodes = [h.make_node("Gemm", inputs, [out], transA=trans_a, transB=trans_b, alpha=alpha, beta=beta, name="fc")]
    if relu:
        nodes.append(h.make_node("Relu", ["g"], ["y"], name="relu"))
    x_shape = [n, k] if trans_b else [k, n]
    model = make_model(nodes, [vi("x", x_shape)], [vi("y", [m, n])], inits)
    return model, {"x": rng.standard_normal(x_shape).astype(np.float32)}


@needs_ep
@pytest.mark.parametrize("sparsity", SPARSITIES)
@pytest.mark.parametrize("n", [1, 32])
@pytest.mark.parametrize("fmt", SWEEP_FORMATS)
def test_matmul_constant_left_every_sparsity(sparsity, n, fmt):
    # M = 37, K = 53: not multiples of 4 or 8; two all-zero rows of W (sparse_weight)
    rng = np.random.default_rng(int(sparsity * 100) + n + 40)
    model, feeds = left_matmul_model(rng, 37, (2, 53, n), sparsity, bias_shape=(37, 1), relu=True)
    check(model, feeds, ["MatMul", "Add", "Relu"], sess_options=no_fusion(), format=fmt)
    check(model, feeds, ["MatMul", "Add", "Relu"], format=fmt)  # ORT's MatMul+Add fusion leaves W @ x alone


@needs_ep
@pytest.mark.parametrize("x_shape", [(53,), (53, 1), (53, 6), (3, 53, 4), (2, 2, 53, 3)])
def test_matmul_constant_left_ranks(x_shape):
    rng = np.random.default_rng(41)
    model, feeds = left_matmul_model(rng, 21, x_shape, 0.9)
    check(model, feeds, ["MatMul"])


@needs_ep
@pytest.mark.parametrize("bias_shape,fused", [((21, 1), True), ((1, 21, 1), True), ((1,), True), ((), True),
                                              ((5,), False), ((21, 5), False), ((2, 21, 1), False)])
def test_matmul_constant_left_bias_is_fused_only_per_row(bias_shape, fused):
    rng = np.random.default_rng(42)
    model, feeds = left_matmul_model(rng, 21, (2, 40, 5), 0.9, bias_shape=bias_shape)
    check(model, feeds, ["MatMul", "Add"] if fused else ["MatMul"], sess_options=no_fusion())


@needs_ep
@pytest.mark.parametrize("sparsity", SPARSITIES)
@pytest.mark.parametrize("n", [1, 32])
@pytest.mark.parametrize("fmt", SWEEP_FORMATS)
def test_gemm_constant_a_every_sparsity(sparsity, n, fmt):
    rng = np.random.default_rng(int(sparsity * 100) + n + 43)
    model, feeds = left_gemm_model(rng, 37, 53, n, sparsity, c_shape=(37, 1), relu=True)
    check(model, feeds, ["Gemm", "Relu"], format=fmt)


@needs_ep
@pytest.mark.parametrize("trans_a,trans_b", [(0, 0), (0, 1), (1, 0), (1, 1)])
@pytest.mark.parametrize("c_shape", [None, (24, 1), (), (1,), (1, 1)])
@pytest.mark.parametrize("n", [1, 7])
def test_gemm_constant_a_forms(trans_a, trans_b, c_shape, n):
    rng = np.random.default_rng(44)
    model, feeds = left_gemm_model(rng, 24, 50, n, 0.9, trans_a, trans_b, alpha=0.7, beta=-1.3, c_shape=c_shape)
    check(model, feeds, ["Gemm"])


@needs_ep
def test_gemm_constant_a_with_a_per_column_c_stays_on_cpu():
    # C of shape [N] / [1, N] adds per column of Y = A @ B: not the kernels' per-row bias
    rng = np.random.default_rng(45)
    for c_shape in [(6,), (1, 6), (24, 6)]:
        model, feeds = left_gemm_model(rng, 24, 50, 6, 0.9, c_shape=c_shape)
        check(model, feeds, [])


@needs_ep
def test_constant_left_respects_min_sparsity():
    rng = np.random.default_rng(46)
    model, feeds = left_matmul_model(rng, 32, (64, 3), 0.7)
    check(model, feeds, [], min_sparsity=0.8, format="csr")
    check(model, feeds, ["MatMul"], min_sparsity=0.6, format="csr")


# --- formats per product width, panels ---------------------------------------------------

LOG_RE = re.compile(r"compiled (\S+): (\d+)x(\d+), (\d+) nonzeros.*\n.*\1 formats by product columns: "
                    r"n=1 (\w+), n=2\.\.8 (\w+), n>8 (\w+); (\d) held, \d+ bytes; MLAS for ([^\n]*)")


def compile_log(tmp_path, model, **kw):
    """What the EP logged when compiling each claimed node (ORT INFO log of a fresh process)."""
    path = tmp_path / "m.onnx"
    path.write_bytes(model.SerializeToString())
    code = ("import onnxruntime as ort, sys; from onnxslim_cnn import runtime; so = ort.SessionOptions(); "
            "so.log_severity_level = 1; "
            f"runtime.session(sys.argv[1], min_sparsity=0.0, sess_options=so, **{kw!r})")
    out = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, check=True)
    return {m[0]: {"shape": (int(m[1]), int(m[2])), "nonzeros": int(m[3]), "formats": list(m[4:7]),
                   "held": int(m[7]), "mlas": m[8].split()} for m in LOG_RE.findall(out.stderr + out.stdout)}


def choose_format(w, n):
    lib = ctypes.CDLL(str(runtime.library_path()))
    lib.onnxslim_sparse_choose_format.restype = ctypes.c_int
    w = np.ascontiguousarray(w, dtype=np.float32)
    f = lib.onnxslim_sparse_choose_format(w.ctypes.data_as(ctypes.c_void_p), ctypes.c_int64(w.shape[0]),
                                          ctypes.c_int64(w.shape[1]), ctypes.c_int64(n))
    return FORMAT_NAMES[f]


@needs_ep
def test_format_follows_product_width(tmp_path):
    # 50 % random zeros: the cost model picks CSR for 1 and > 8 columns, 4x1 strips for 2..8
    rng = np.random.default_rng(47)
    w = sparse_weight(rng, (512, 256), 0.5)
    model = make_model([h.make_node("MatMul", ["x", "W"], ["y"], name="mm")], [vi("x", ["N", 512])],
                       [vi("y", ["N", 256])], [init("W", w)])
    wt = w.T  # the kernels' W: out x in
    expect = [choose_format(wt, n) for n in (1, 8, 64)]
    assert expect == ["csr", "block4x1", "csr"]
    log = compile_log(tmp_path, model, max_formats=2, dense_fallback="off")["mm"]
    assert log == {"shape": (256, 512), "nonzeros": int(np.count_nonzero(w)), "formats": expect, "held": 2,
                   "mlas": ["none"]}
    one = compile_log(tmp_path, model)["mm"]  # default max_formats=1: the declared batch's format only
    assert one["formats"] == ["csr"] * 3 and one["held"] == 1
    sess = runtime.session(model, min_sparsity=0.0, max_formats=2, dense_fallback="off")
    for batch in (1, 5, 32):  # each batch runs a different stored format
        x = rng.standard_normal((batch, 512)).astype(np.float32)
        ref = run(model, {"x": x})[0]
        got = sess.run(None, {"x": x})[0]
        assert float(np.abs(got - ref).max()) <= 1e-5 * float(np.abs(ref).max())


@needs_ep
def test_transposed_weight_built_in_panels(tmp_path):
    # MatMul's weight is stored in x out: the EP transposes it 32 MiB at a time, here 1020 rows
    # of the kernels' W then the last 10 (M = 1030 not a multiple of 4). The counts summed over
    # panels must give the whole weight's format choice and exact nonzeros.
    rng = np.random.default_rng(48)
    k, m = 8200, 1030
    w = sparse_weight(rng, (k, m), 0.6)
    w[:, 1020:1024] = 0.0  # an all-zero 4-row strip at the start of the last panel
    model = make_model([h.make_node("MatMul", ["x", "W"], ["y"], name="big")], [vi("x", ["N", k])],
                       [vi("y", ["N", m])], [init("W", w)])
    log = compile_log(tmp_path, model, max_formats=3)["big"]
    assert log["shape"] == (m, k) and log["nonzeros"] == int(np.count_nonzero(w))
    assert log["formats"] == [choose_format(w.T, n) for n in (1, 8, 64)]
    sess = runtime.session(model, min_sparsity=0.0, max_formats=3)
    for batch in (1, 3, 17):
        x = rng.standard_normal((batch, k)).astype(np.float32)
        ref = run(model, {"x": x})[0]
        got = sess.run(None, {"x": x})[0]
        assert float(np.abs(got - ref).max()) <= 1e-5 * float(np.abs(ref).max())


@needs_ep
def test_max_formats_is_checked():
    rng = np.random.default_rng(49)
    model, _ = left_matmul_model(rng, 8, (16, 2), 0.5)
    for bad in (0, 4, "2", True):
        assert "max_formats must be 1, 2 or 3" in user_error(runtime.session, model, max_formats=bad)


# --- ORT's MLAS for the widths where it beats the sparse format -----------------------------

def fc_matmul(rng, sparsity, k=512, m=256):
    w = sparse_weight(rng, (k, m), sparsity, 1)
    return make_model([h.make_node("MatMul", ["x", "W"], ["y"], name="mm")], [vi("x", ["N", k])],
                      [vi("y", ["N", m])], [init("W", w)])


@needs_ep
def test_dense_fallback_follows_the_cost_model(tmp_path):
    rng = np.random.default_rng(50)
    half, most = fc_matmul(rng, 0.5), fc_matmul(rng, 0.9)
    # 50 % zeros: CSR beats MLAS at one column only; 90 %: everywhere
    assert compile_log(tmp_path, half)["mm"]["mlas"] == ["n=2..8", "n>8"]
    assert compile_log(tmp_path, most)["mm"]["mlas"] == ["none"]
    assert compile_log(tmp_path, half, dense_fallback="off")["mm"]["mlas"] == ["none"]
    assert compile_log(tmp_path, most, dense_fallback="always")["mm"]["mlas"] == ["n=1", "n=2..8", "n>8"]
    sess = runtime.session(half, min_sparsity=0.0)
    for batch in (1, 5, 32):  # sparse, MLAS, MLAS
        x = rng.standard_normal((batch, 512)).astype(np.float32)
        ref, got = run(half, {"x": x})[0], sess.run(None, {"x": x})[0]
        assert float(np.abs(got - ref).max()) <= 1e-5 * float(np.abs(ref).max())


@needs_ep
@pytest.mark.parametrize("trans_b", [0, 1])
@pytest.mark.parametrize("c_shape", [(None,), ("n",), ()])
@pytest.mark.parametrize("batch", [1, 32])
def test_dense_fallback_gemm_forms(trans_b, c_shape, batch):
    from test_sparse_ep import gemm_model

    rng = np.random.default_rng(51)
    model, feeds = gemm_model(rng, batch, 50, 24, 0.6, 0, trans_b, alpha=0.7, beta=-1.3, c_shape=c_shape)
    check(model, feeds, ["Gemm", "Relu"], dense_fallback="always")


@needs_ep
@pytest.mark.parametrize("batch", [1, 32])
def test_dense_fallback_matmul_batch_dims_bias_relu(batch):
    from test_sparse_ep import matmul_model

    rng = np.random.default_rng(52)
    model, feeds = matmul_model(rng, (batch, 3, 64), 20, 0.6, bias=True, relu=True)
    check(model, feeds, ["MatMul", "Add", "Relu"], sess_options=no_fusion(), dense_fallback="always")


@needs_ep
def test_dense_fallback_only_for_x_times_w(tmp_path):
    # W * x and Gemm's transA keep the sparse kernels even when asked for MLAS always
    rng = np.random.default_rng(53)
    model, feeds = left_matmul_model(rng, 30, (40, 6), 0.5)
    assert compile_log(tmp_path, model, dense_fallback="always")["mm"]["mlas"] == ["none"]
    check(model, feeds, ["MatMul"], dense_fallback="always")


@needs_ep
def test_dense_fallback_is_checked():
    rng = np.random.default_rng(54)
    assert "dense_fallback must be one of" in user_error(runtime.session, fc_matmul(rng, 0.5), dense_fallback="on")


@needs_ep
def test_layer_that_mlas_wins_at_its_declared_batch_stays_with_ort():
    # a static batch of 32 at 50 % zeros: MLAS is expected to win, so the EP does not take it
    # (with the fallback off it does, as before); at 90 % it does
    from test_sparse_ep import gemm_model

    rng = np.random.default_rng(55)
    model, feeds = gemm_model(rng, 32, 256, 128, 0.5, c_shape=("n",))
    check(model, feeds, [])
    check(model, feeds, ["Gemm", "Relu"], dense_fallback="off")
    model, feeds = gemm_model(rng, 32, 256, 128, 0.9, c_shape=("n",))
    check(model, feeds, ["Gemm", "Relu"])


# --- one initializer, two orientations; empty weights ----------------------------------------

@needs_ep
def test_shared_weight_counts_follow_each_nodes_orientation(tmp_path):
    # W (128 x 256) with 1x4 structure along its rows feeds MatMul(x, W), whose kernels' W is
    # W^T (4x1 strips), and Gemm(z, W, transB=1), whose kernels' W is W itself (1x4 blocks).
    # Each layer must be given the format of its own orientation, not the first node's counts.
    rng = np.random.default_rng(56)
    blocks = rng.random((128, 64)) >= 0.7
    w = (np.repeat(blocks, 4, axis=1) * rng.standard_normal((128, 256))).astype(np.float32)
    expect = {"mm": [choose_format(w.T, n) for n in (1, 8, 64)], "fc": [choose_format(w, n) for n in (1, 8, 64)]}
    assert expect == {"mm": ["block4x1"] * 3, "fc": ["block1x4"] * 3}
    nodes = [h.make_node("MatMul", ["x", "W"], ["y"], name="mm"),
             h.make_node("Gemm", ["z", "W"], ["u"], transB=1, name="fc")]
    model = make_model(nodes, [vi("x", ["N", 128]), vi("z", ["N", 256])], [vi("y", ["N", 256]), vi("u", ["N", 128])],
                       [init("W", w)])
    log = compile_log(tmp_path, model, max_formats=3, dense_fallback="off")
    assert {name: log[name]["formats"] for name in ("mm", "fc")} == expect
    sess = runtime.session(model, min_sparsity=0.0, max_formats=3, dense_fallback="off")
    assert sorted(n["op_type"] for n in runtime.claimed_nodes(sess)) == ["Gemm", "MatMul"]
    for batch in (1, 5, 32):
        feeds = {"x": rng.standard_normal((batch, 128)).astype(np.float32),
                 "z": rng.standard_normal((batch, 256)).astype(np.float32)}
        for ref, got in zip(run(model, feeds), sess.run(None, feeds)):
            assert float(np.abs(got - ref).max()) <= 1e-5 * float(np.abs(ref).max())


EMPTY_CONV_SCRIPT = """
import sys, numpy as np, onnx, onnxruntime as ort
from onnxslim_cnn import runtime
model = onnx.load(sys.argv[1])
x = np.random.default_rng(0).standard_normal((2, 3, 9, 9)).astype(np.float32)
sess = runtime.session(model, min_sparsity=0.0, format=sys.argv[2])
got = sess.run(None, {"x": x})[0]
ref = ort.InferenceSession(sys.argv[1], providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
assert got.shape == ref.shape == (2, 0, 5, 5), (got.shape, ref.shape)
print("claimed", [n["op_type"] for n in runtime.claimed_nodes(sess)])
"""


@needs_ep
@pytest.mark.parametrize("fmt", ["csr", "block4x1"])
def test_conv_without_output_channels_is_left_to_ort(tmp_path, fmt):
    # W of shape (0, 3, 3, 3): no weights to run sparse; claiming it divided by zero (SIGFPE),
    # so the model runs in a subprocess
    from test_sparse_ep import model_unknown_output

    nodes = [h.make_node("Conv", ["x", "W"], ["y"], strides=[2, 2], pads=[1, 1, 1, 1], name="conv")]
    model = model_unknown_output(nodes, (2, 3, 9, 9), [init("W", np.zeros((0, 3, 3, 3), np.float32))])
    path = tmp_path / "empty.onnx"
    path.write_bytes(model.SerializeToString())
    out = subprocess.run([sys.executable, "-c", EMPTY_CONV_SCRIPT, str(path), fmt], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "claimed []"


@needs_ep
def test_dense_fallback_pools_do_not_spin():
    # Every fallback layer runs in a private ORT session with its own intra-op pool; spinning
    # workers there would burn a core each between runs. With the main session's pool not
    # spinning either, the process must use well under one core while it mostly sleeps (measured
    # on a 2-core VM: 0.37-0.45 CPU s per wall s without spinning, 1.0-1.08 with it).
    rng = np.random.default_rng(57)
    nodes = [h.make_node("MatMul", ["x", f"W{i}"], [f"y{i}"], name=f"mm{i}") for i in range(6)]
    model = make_model(nodes, [vi("x", ["N", 256])], [vi(f"y{i}", ["N", 256]) for i in range(6)],
                       [init(f"W{i}", sparse_weight(rng, (256, 256), 0.7)) for i in range(6)])
    so = ort.SessionOptions()
    so.intra_op_num_threads = 2
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    sess = runtime.session(model, min_sparsity=0.0, sess_options=so, dense_fallback="always")
    assert len(runtime.claimed_nodes(sess)) == 6
    x = rng.standard_normal((32, 256)).astype(np.float32)
    for _ in range(20):
        sess.run(None, {"x": x})
    cpu, wall = time.process_time(), time.perf_counter()
    for _ in range(300):
        sess.run(None, {"x": x})
        time.sleep(0.0005)
    assert (time.process_time() - cpu) / (time.perf_counter() - wall) < 0.75
