"""The ``svd`` pass and the factorisation maths it shares with ``lowrank``.

Exactness cannot be shown at a rank that saves parameters (k < mn/(m+n) always truncates), so
those tests use ``allow_growth=true`` with k = min(m, n), which reproduces the layer exactly.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from graphs import assert_same_outputs, init, make_model, run, vi
from onnx import helper as h
from onnx import numpy_helper as nh

import onnxslim_cnn
from onnxslim_cnn.errors import UserError
from onnxslim_cnn.passes.factor import factorize as fz
from onnxslim_cnn.passes.factor.svd import SvdPass

N_IN, N_OUT = 24, 16  # max useful rank 9, full rank 16


def rng(seed=0):
    return np.random.default_rng(seed)


def gemm_model(transA=0, transB=0, alpha=1.0, beta=1.0, c_shape=(N_OUT,), seed=0):
    r = rng(seed)
    w = r.normal(size=(N_OUT, N_IN) if transB else (N_IN, N_OUT))
    ins = ["x", "w"] + (["c"] if c_shape is not None else [])
    inits = [init("w", w)] + ([init("c", r.normal(size=c_shape))] if c_shape is not None else [])
    node = h.make_node("Gemm", ins, ["y"], name="fc", transA=transA, transB=transB, alpha=alpha, beta=beta)
    x = vi("x", [N_IN, "N"] if transA else ["N", N_IN])
    return make_model([node], [x], [vi("y", ["N", N_OUT])], inits)


def feeds_for(model, batch=5, seed=1):
    x = model.graph.input[0]
    shape = [d.dim_value or batch for d in x.type.tensor_type.shape.dim]
    return {x.name: rng(seed).normal(size=shape).astype(np.float32)}


def exact(model, **opts):
    out, result = SvdPass(allow_growth=True, rank=N_OUT, min_params=0, **opts).apply(model)
    assert_same_outputs(model, out, feeds_for(model), rel=1e-4)
    assert [o.name for o in out.graph.output] == [o.name for o in model.graph.output]
    assert [i.name for i in out.graph.input] == [i.name for i in model.graph.input]
    return out, result


def params(model):
    return {t.name: int(np.prod(t.dims)) for t in model.graph.initializer}


# --------------------------------------------------------------------------- exactness


@pytest.mark.parametrize("transA", [0, 1])
@pytest.mark.parametrize("transB", [0, 1])
@pytest.mark.parametrize("alpha,beta", [(1.0, 1.0), (0.5, 2.0)])
@pytest.mark.parametrize("c_shape", [None, (N_OUT,), (1, N_OUT)])
def test_gemm_every_form_is_exact_at_full_rank(transA, transB, alpha, beta, c_shape):
    out, result = exact(gemm_model(transA, transB, alpha, beta, c_shape))
    assert [n.op_type for n in out.graph.node] == ["Gemm", "Gemm"]
    first, second = out.graph.node
    assert first.output[0] == second.input[0] and second.output[0] == "y"
    assert len(second.input) == (3 if c_shape else 2)  # the bias goes on the second node
    (change,) = result.changes
    assert (change["m"], change["n"], change["rank"]) == (N_IN, N_OUT, N_OUT)


def test_matmul_with_3d_input_is_exact():
    w = rng().normal(size=(N_IN, N_OUT))
    m = make_model([h.make_node("MatMul", ["x", "w"], ["y"], name="mm")], [vi("x", ["N", 5, N_IN])],
                   [vi("y", ["N", 5, N_OUT])], [init("w", w)])
    out, _ = exact(m)
    assert [n.op_type for n in out.graph.node] == ["MatMul", "MatMul"]


@pytest.mark.parametrize("attrs", [{}, {"strides": [2, 2], "pads": [1, 1, 1, 1]}])
def test_1x1_conv_is_exact(attrs):
    r = rng()
    m = make_model([h.make_node("Conv", ["x", "w", "b"], ["y"], name="pw", kernel_shape=[1, 1], **attrs)],
                   [vi("x", ["N", N_IN, 6, 6])], [vi("y", ["N", N_OUT, "H", "W"])],
                   [init("w", r.normal(size=(N_OUT, N_IN, 1, 1))), init("b", r.normal(size=N_OUT))])
    _, skipped = SvdPass(allow_growth=True, rank=N_OUT, min_params=0).apply(m)
    assert skipped.skipped == [{"item": "pw", "reason": "1x1 conv on a feature map, not an FC over channels (set conv_fc_only=false)"}]
    out, _ = exact(m, conv_fc_only=False)
    first, second = out.graph.node
    assert [n.op_type for n in out.graph.node] == ["Conv", "Conv"] and len(second.input) == 3
    shapes = {t.name: list(t.dims) for t in out.graph.initializer}
    assert shapes[first.input[1]] == [N_OUT, N_IN, 1, 1] and shapes[second.input[1]] == [N_OUT, N_OUT, 1, 1]


def test_shared_weight_is_factorised_once_and_both_factors_stay_shared():
    r = rng()
    nodes = [h.make_node("Gemm", ["x", "w", "c"], ["y1"], name="a", transB=1),
             h.make_node("Gemm", ["x2", "w"], ["y2"], name="b", transB=1, alpha=0.25)]
    m = make_model(nodes, [vi("x", ["N", N_IN]), vi("x2", ["N", N_IN])], [vi("y1", ["N", N_OUT]), vi("y2", ["N", N_OUT])],
                   [init("w", r.normal(size=(N_OUT, N_IN))), init("c", r.normal(size=N_OUT))])
    out, result = SvdPass(allow_growth=True, rank=N_OUT, min_params=0).apply(m)
    feeds = {"x": r.normal(size=(3, N_IN)).astype(np.float32), "x2": r.normal(size=(3, N_IN)).astype(np.float32)}
    assert_same_outputs(m, out, feeds)
    assert len(result.changes) == 1 and result.changes[0]["shared_by"] == ["a", "b"]
    factors = [t.name for t in out.graph.initializer if t.name != "c"]
    assert len(factors) == 2
    for name in factors:
        assert sum(name in n.input for n in out.graph.node) == 2


def test_parameter_counts_are_exactly_mk_plus_kn():
    out, result = SvdPass(rank=4, min_params=0).apply(gemm_model(transB=1))
    p = params(out)
    assert p.pop("c") == N_OUT  # the bias is untouched
    assert sorted(p.values()) == sorted([N_IN * 4, 4 * N_OUT])
    c = result.changes[0]
    assert (c["params_before"], c["params_after"]) == (N_IN * N_OUT, 4 * (N_IN + N_OUT))
    assert result.stats["params_removed"] == N_IN * N_OUT - 4 * (N_IN + N_OUT)


# --------------------------------------------------------------------------- skips


def test_skip_reasons():
    r = rng()
    nodes = [h.make_node("Gemm", ["x", "w1"], ["h1"], name="big", transB=1),
             h.make_node("Gemm", ["h1", "w2"], ["h2"], name="small"),
             h.make_node("Reshape", ["h2", "shape"], ["h4"], name="reshape"),
             h.make_node("Conv", ["h4", "w3"], ["h3"], name="grouped", group=2, kernel_shape=[1, 1]),
             h.make_node("Transpose", ["h1"], ["h1t"], name="t"),
             h.make_node("MatMul", ["h1", "h1t"], ["h5"], name="act_mm")]
    m = make_model(nodes, [vi("x", [2, 64])], [vi("h3", [2, 8, 1, 1]), vi("h5", [2, 2])],
                   [init("w1", r.normal(size=(64, 64))), init("w2", r.normal(size=(64, 8))),
                    init("w3", r.normal(size=(8, 4, 1, 1))), init("shape", np.array([2, 8, 1, 1]))])
    _, result = SvdPass(rank=40, min_params=1000, layers=["big", "small", "grouped", "act_mm", "nope"]).apply(m)
    reasons = {s["item"]: s["reason"] for s in result.skipped}
    assert reasons["big"] == "rank 40 would not save parameters (needs k <= 31)"
    assert reasons["small"] == "512 parameters < min_params = 1000"
    assert reasons["grouped"].startswith("1x1 conv with group=2")
    assert reasons["act_mm"] == "no constant weight"
    assert reasons["nope"] == "no node of that name in the graph"
    assert not result.changed
    _, result = SvdPass(rank=8, exclude=["big"]).apply(m)
    assert {"item": "big", "reason": "excluded by option"} in result.skipped


def test_weight_also_used_elsewhere_is_skipped():
    w = rng().normal(size=(N_IN, N_OUT))
    nodes = [h.make_node("MatMul", ["x", "w"], ["y"], name="mm"), h.make_node("Add", ["w", "w"], ["z"], name="add")]
    m = make_model(nodes, [vi("x", ["N", N_IN])], [vi("y", ["N", N_OUT]), vi("z", [N_IN, N_OUT])], [init("w", w)])
    _, result = SvdPass(rank=2, min_params=0).apply(m)
    assert "weight also used by add" in result.skipped[0]["reason"] and not result.changed


@pytest.mark.parametrize("opts", [{"energy": 0.0}, {"ratio": 0.0}, {"rank": 0}])
def test_bad_options(opts):
    with pytest.raises(UserError):
        SvdPass(**opts)


def test_needs_calibration_only_when_data_is_used():
    assert not SvdPass().needs_calibration and not SvdPass(rank=3).needs_calibration
    assert SvdPass(data_aware=True).needs_calibration
    assert SvdPass(max_output_error=0.1).needs_calibration
    assert SvdPass(measure_error=True).needs_calibration


# --------------------------------------------------------------------------- rank selection

SPECTRUM = np.array([10.0, 8, 6, 4, 3, 2, 1.5, 1, 0.5, 0.25, 0.1, 0.05])
M_IN, M_OUT = 40, 12  # max useful rank 9


def known_spectrum_model():
    r = rng(3)
    U = np.linalg.qr(r.normal(size=(M_IN, M_OUT)))[0]
    V = np.linalg.qr(r.normal(size=(M_OUT, M_OUT)))[0]
    w = (U * SPECTRUM) @ V.T
    return make_model([h.make_node("MatMul", ["x", "w"], ["y"], name="fc")], [vi("x", ["N", M_IN])],
                      [vi("y", ["N", M_OUT])], [init("w", w)])


def white_calib(n=80):
    """Inputs with X^T X = n I: output error equals weight error, so expectations are exact."""
    q = np.linalg.qr(rng(4).normal(size=(n, M_IN)))[0]
    return {"x": (q * np.sqrt(n)).astype(np.float32)}


def chosen(calib=None, **opts):
    _, result = SvdPass(min_params=0, **opts).apply(known_spectrum_model(), calib=calib)
    if not result.changes:
        return result.skipped[0]["reason"]
    c = result.changes[0]
    return c["rank"], c["selected_by"]


def test_rank_selection_on_a_known_spectrum():
    e = SPECTRUM ** 2
    kept = np.cumsum(e) / e.sum()
    tail = np.sqrt(np.maximum(1 - kept, 0))  # relative error of the rank-(i+1) truncation
    assert chosen(energy=0.9) == (int(np.searchsorted(kept, 0.9)) + 1, "energy") == (4, "energy")
    assert chosen(energy=kept[4]) == (5, "energy")
    assert chosen(ratio=0.5) == (fz.rank_for_ratio(M_IN, M_OUT, 0.5), "ratio") == (4, "ratio")
    assert chosen(rank=6, ratio=0.5, energy=0.5) == (6, "rank")
    budget = (tail[5] + tail[6]) / 2  # between the rank-6 and rank-7 errors
    assert chosen(white_calib(), max_output_error=budget) == (7, "max_output_error")
    assert chosen(white_calib(), max_output_error=budget, energy=0.5) == (7, "max_output_error")
    assert chosen(white_calib(), max_output_error=budget, ratio=0.5) == (4, "ratio")
    assert chosen(energy=0.9999) == "rank 10 would not save parameters (needs k <= 9)"


def test_max_output_error_protects_a_near_full_rank_head():
    # energy says rank 3 is plenty; on the calibration data the outputs need more
    assert chosen(energy=0.9) == (4, "energy")
    assert chosen(white_calib(), max_output_error=0.01) == "rank 10 would not save parameters (needs k <= 9)"


def test_data_aware_beats_plain_on_correlated_inputs():
    r = rng(5)
    n_in, n_out, k = 64, 48, 6
    w = r.normal(size=(n_in, n_out))
    m = make_model([h.make_node("MatMul", ["x", "w"], ["y"], name="fc")], [vi("x", ["N", n_in])],
                   [vi("y", ["N", n_out])], [init("w", w)])
    # inputs live near a 6-dimensional subspace
    x = (r.normal(size=(400, 6)) @ r.normal(size=(6, n_in)) + 0.05 * r.normal(size=(400, n_in))).astype(np.float32)
    errors = {}
    for da in (False, True):
        _, result = SvdPass(rank=k, data_aware=da, measure_error=True, min_params=0).apply(m, calib={"x": x})
        errors[da] = result.changes[0]["output_error"]
    assert errors[True] < 0.5 * errors[False], errors


def conv_model():
    r = rng(11)
    return make_model([h.make_node("Conv", ["x", "w", "b"], ["y"], name="pw", kernel_shape=[1, 1])],
                      [vi("x", ["N", N_IN, 4, 4])], [vi("y", ["N", N_OUT, 4, 4])],
                      [init("w", r.normal(size=(N_OUT, N_IN, 1, 1))), init("b", r.normal(size=N_OUT))])


def matmul3d_model():
    w = rng(12).normal(size=(N_IN, N_OUT))
    return make_model([h.make_node("MatMul", ["x", "w"], ["y"], name="mm")], [vi("x", ["N", 3, N_IN])],
                      [vi("y", ["N", 3, N_OUT])], [init("w", w)])


@pytest.mark.parametrize("build", [lambda: gemm_model(transA=1, c_shape=None), lambda: gemm_model(transB=1, c_shape=None),
                                   conv_model, matmul3d_model], ids=["gemm_transA", "gemm", "conv", "matmul3d"])
def test_reported_output_error_is_the_measured_one(build):
    """The calibration rows are laid out right for every op (transA, NCHW channels, 3-D inputs)."""
    m = build()
    calib = feeds_for(m, batch=30, seed=2)
    out, result = SvdPass(rank=3, data_aware=True, min_params=0, conv_fc_only=False).apply(m, calib=calib)
    before, after = run(m, calib)[0], run(out, calib)[0]
    signal = before  # the reported error is relative to x W, without the bias
    if m.graph.node[0].op_type == "Conv":
        signal = before - nh.to_array(m.graph.initializer[1]).reshape(1, -1, 1, 1)
    measured = np.linalg.norm(after - before) / np.linalg.norm(signal)
    assert abs(result.changes[0]["output_error"] - measured) < 1e-4


def test_data_aware_with_fewer_samples_than_inputs_and_no_ridge():
    m = gemm_model(transB=1)
    out, result = SvdPass(rank=3, data_aware=True, ridge=0.0, min_params=0).apply(m, calib=feeds_for(m, batch=5))
    assert result.changed and np.isfinite(result.changes[0]["output_error"])
    assert np.all(np.isfinite(run(out, feeds_for(m))[0]))


def test_deterministic_bytes():
    m = gemm_model(transB=1)
    calib = feeds_for(m, batch=40)
    a = SvdPass(rank=3, data_aware=True, min_params=0).apply(m, calib=calib)[0]
    b = SvdPass(rank=3, data_aware=True, min_params=0).apply(m, calib=calib)[0]
    assert a.SerializeToString(deterministic=True) == b.SerializeToString(deterministic=True)


def test_through_the_pipeline_with_validation():
    m = gemm_model(transB=1)
    out, report = onnxslim_cnn.compress(m, passes=["svd"], calib=feeds_for(m, batch=16),
                                        svd__rank=4, svd__min_params=0, svd__data_aware=True)
    (record,) = report.passes
    assert record.status == "ok" and record.changed
    assert record.changes[0]["output_error"] < 1.0
    assert report.fidelity["y"]["cosine"] > 0.5
    onnx.checker.check_model(out, full_check=True)


def test_digits_data_aware_keeps_accuracy_at_rank_8():
    """The closing-note result in small: all three FCs at rank 8 (bench/svd_digits.py)."""
    from onnxslim_cnn.models import digits

    model = onnx.load(str(digits.fixture_path("digits_vgg")))
    x, _ = digits.load_split("train")
    calib = {"input": x[np.linspace(0, len(x) - 1, 256).astype(np.int64)]}
    top1 = {}
    for da in (False, True):
        out, _ = SvdPass(rank=8, min_params=0, data_aware=da).apply(model, calib=calib)
        top1[da] = digits.evaluate_top1(out)
    assert top1[True] >= 0.97 and top1[False] < 0.92, top1


def test_sequential_takes_inputs_from_the_factorised_model():
    r = rng(6)
    nodes = [h.make_node("MatMul", ["x", "w1"], ["h"], name="fc1"), h.make_node("Relu", ["h"], ["hr"]),
             h.make_node("MatMul", ["hr", "w2"], ["y"], name="fc2")]
    m = make_model(nodes, [vi("x", ["N", 32])], [vi("y", ["N", 32])],
                   [init("w1", r.normal(size=(32, 32))), init("w2", r.normal(size=(32, 32)))])
    calib = {"x": r.normal(size=(64, 32)).astype(np.float32)}
    seq, result = SvdPass(rank=4, data_aware=True, min_params=0, sequential=True).apply(m, calib=calib)
    orig, _ = SvdPass(rank=4, data_aware=True, min_params=0, sequential=False).apply(m, calib=calib)
    assert result.changes[1]["item"] == "fc2"
    ref = run(m, calib)[0]
    err = {k: np.linalg.norm(run(v, calib)[0] - ref) for k, v in (("seq", seq), ("orig", orig))}
    assert err["seq"] < err["orig"], err


# --------------------------------------------------------------------------- factorize maths


def test_randomized_svd_is_close_to_exact():
    r = rng(7)
    U = np.linalg.qr(r.normal(size=(1536, 256)))[0]
    V = np.linalg.qr(r.normal(size=(1024, 256)))[0]
    spectrum = np.arange(1, 257) ** -0.5  # decaying, like trained weights
    W = ((U * spectrum) @ V.T).astype(np.float32)
    k = 64
    Ur, s, Vt = fz.top_svd(W, k)  # the randomized route: both sides >= 1024, k <= a quarter
    optimum = np.sqrt(np.sum(spectrum[k:] ** 2))
    assert np.linalg.norm(W - (Ur * s) @ Vt) <= 1.02 * optimum
    assert np.allclose(s, spectrum[:k], rtol=0.05)


def test_output_errors_match_direct_computation_for_every_route():
    r = rng(8)
    W = r.normal(size=(600, 40))
    X = r.normal(size=(200, 600)) @ np.diag(np.linspace(0.1, 2, 600))
    for F in (fz.factor(W, 40), fz.factor(W, 40, X=X)):  # plain, and data-aware via W^T C W
        fast = fz.output_errors(W, F, X)
        for k in (1, 7, 25, 40):
            G = F.truncated(k)
            assert abs(fast[k - 1] - fz.output_error(W, G.A, G.B, X)) < 1e-6
    assert fz.output_error(W, F.A, F.B, X) < 1e-6  # full rank is exact


def test_data_aware_routes_agree():
    r = rng(9)
    W = r.normal(size=(600, 40))
    X = r.normal(size=(300, 600)) * np.linspace(0.1, 2, 600)
    gram = fz.factor(W, 6, X=X)
    M, L = fz._whiten(W, X, 1e-4)  # the whitening route, forced
    U, s, Vt = np.linalg.svd(M, full_matrices=False)
    A = np.linalg.solve(L.T, U[:, :6] * np.sqrt(s[:6]))
    assert np.allclose(gram.A @ gram.B, A @ (np.sqrt(s[:6])[:, None] * Vt[:6]), atol=1e-8)


def test_gram_cache_misses_a_rewritten_buffer():
    W = rng(10).normal(size=(1500, 800)).astype(np.float32)
    s1, _ = fz.spectrum(W)
    W *= 2.0
    s2, _ = fz.spectrum(W)
    assert np.allclose(s2, 2 * s1, rtol=1e-4)


def test_fc_over_channels_1x1_conv_is_factorised_by_default():
    r = rng()
    nodes = [h.make_node("GlobalAveragePool", ["x"], ["p"]),
             h.make_node("Conv", ["p", "w", "b"], ["y"], name="fc_conv")]
    m = make_model(nodes, [vi("x", ["N", N_IN, 6, 6])], [vi("y", ["N", N_OUT, 1, 1])],
                   [init("w", r.normal(size=(N_OUT, N_IN, 1, 1))), init("b", r.normal(size=N_OUT))])
    out, result = SvdPass(allow_growth=True, rank=N_OUT, min_params=0).apply(m)
    assert [n.op_type for n in out.graph.node] == ["GlobalAveragePool", "Conv", "Conv"]
    assert_same_outputs(m, out, feeds_for(m), rel=1e-4)
