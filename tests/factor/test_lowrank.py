"""`lowrank`: the seed's formulas, exactness at full rank, skip reasons, reported costs, data-aware refit."""

import itertools

import numpy as np
import onnx
import pytest
from graphs import assert_same_outputs, init, make_model, run, vi
from onnx import helper as h

import onnxslim_cnn
from onnxslim_cnn.analysis.cost import node_macs
from onnxslim_cnn.errors import UserError
from onnxslim_cnn.models import digits, reference
from onnxslim_cnn.passes.factor import lowrank_maths as lm
from onnxslim_cnn.passes.factor.lowrank import LowrankPass, same_pads


def conv_model(C=4, N=6, k=(3, 3), hw=(11, 13), strides=(1, 1), pads=(1, 1, 1, 1), dilations=(1, 1),
               auto_pad=None, bias=True, group=1, batch=1, seed=0):
    rng = np.random.default_rng(seed)
    attrs = {"kernel_shape": list(k), "strides": list(strides), "dilations": list(dilations), "group": group}
    if auto_pad:
        attrs["auto_pad"] = auto_pad
    else:
        attrs["pads"] = list(pads)
    inits = [init("w", rng.normal(size=(N, C // group, *k)))] + ([init("b", rng.normal(size=N))] if bias else [])
    node = h.make_node("Conv", ["x", "w"] + (["b"] if bias else []), ["y"], name="conv", **attrs)
    return make_model([node], [vi("x", [batch, C, *hw])], [vi("y", [batch, N, "ho", "wo"])], inits)


def feeds(model, seed=1):
    dims = [d.dim_value or 2 for d in model.graph.input[0].type.tensor_type.shape.dim]
    return {"x": np.random.default_rng(seed).normal(size=dims).astype(np.float32)}


# --------------------------------------------------------------------------- the seed's worked example

def test_seed_storage_condition():
    # conv1: 3 -> 16 channels, 3x3. P = 3*(3*3*16) = 432; D*(3*3 + 16*3) < 432 -> D < 7.58 -> D <= 7
    assert lm.conv_params(3, 16, 3, 3) == 432
    assert lm.storage_max_rank(3, 16, 3, 3) == 7
    assert sum(lm.split_params(3, 16, 3, 3, 7)) == 399 < 432 < sum(lm.split_params(3, 16, 3, 3, 8)) == 456
    # the seed's naive split with D = 16 filters: 144 + 768 parameters, more than the original
    assert lm.split_params(3, 16, 3, 3, 16) == (144, 768)
    # conv2: 16 -> 16: 2304 before, 768 + 768 at D = 16; storage saved up to D = 23 (D < 24)
    assert lm.conv_params(16, 16, 3, 3) == 2304
    assert lm.split_params(16, 16, 3, 3, 16) == (768, 768)
    assert lm.storage_max_rank(16, 16, 3, 3) == 23


def test_seed_compute_condition():
    # 32x32 input, padding 1: W = Wo = 32, and r = 3CN / (D (C + N))
    C, N, W, Wo, Ho = 3, 16, 32, 32, 32
    D_real = lm.rank_for_speedup(C, N, 3, 3, W, Wo, 2.0)
    assert D_real == pytest.approx(3 * 3 * 16 / (3 * 2 + 16 * 2))  # the seed's 3.7...
    assert D_real == pytest.approx(3.7894736842)
    assert lm.integer_rank_for_speedup(C, N, 3, 3, W, Wo, 2.0, "nearest") == 4  # "约等于 4"
    assert lm.integer_rank_for_speedup(C, N, 3, 3, W, Wo, 2.0, "floor") == 3    # at least r = 2
    T = lm.conv_macs(C, N, 3, 3, Ho, Wo)
    assert T == 442_368
    assert lm.split_macs(C, N, 3, 3, 4, Ho, W, Wo) == (36_864, 196_608)
    for D in (3, 4):
        r = T / sum(lm.split_macs(C, N, 3, 3, D, Ho, W, Wo))
        assert r == pytest.approx(3 * C * N / (C * D + D * N))
    assert T / sum(lm.split_macs(C, N, 3, 3, 4, Ho, W, Wo)) == pytest.approx(1.8947, abs=1e-4)  # about half
    assert T / sum(lm.split_macs(C, N, 3, 3, 3, Ho, W, Wo)) >= 2


@pytest.mark.parametrize("options, D", [({"rank": 4}, 4), ({"speedup": 2}, 4),  # the seed's D = 4
                                        ({"speedup": 2, "speedup_rounding": "floor"}, 3), ({"rank": 7}, 7)])
def test_seed_conv1_through_the_pass(options, D):
    model = conv_model(C=3, N=16, hw=(32, 32))
    out, res = LowrankPass(**options).apply(model)
    (change,) = res.changes
    assert change["D"] == D
    assert change["params_before"] == 432 + 16
    assert change["params_after"] == D * (3 * 3 + 3 * 16) + 16
    assert change["macs_before"] == 442_368
    assert change["macs_after"] == sum(lm.split_macs(3, 16, 3, 3, D, 32, 32, 32))
    macs, unknown = node_macs(out, {"x": (1, 3, 32, 32)})
    assert not unknown and macs == change["node_macs"]
    assert sum(macs.values()) == change["macs_after"]
    assert out.graph.output[0].name == "y" and out.graph.node[-1].name == "conv"


def test_seed_conv1_rank_8_would_grow():
    model = conv_model(C=3, N=16, hw=(32, 32))
    _, res = LowrankPass(rank=8).apply(model)
    assert not res.changed
    (skip,) = res.skipped
    assert "would not save storage" in skip["reason"] and "needs D <= 7" in skip["reason"]


# --------------------------------------------------------------------------- exactness at full rank

GEOMETRIES = list(itertools.product([(1, 1), (2, 2), (2, 1)], [(1, 1, 1, 1), (0, 1, 1, 2)], [(1, 1), (2, 2)],
                                    [(3, 3), (5, 5), (3, 5)]))


@pytest.mark.parametrize("method", ["jaderberg", "tucker2"])
@pytest.mark.parametrize("strides, pads, dilations, k", GEOMETRIES)
def test_full_rank_is_exact(method, strides, pads, dilations, k):
    model = conv_model(k=k, hw=(13, 14), strides=strides, pads=pads, dilations=dilations)
    out, res = LowrankPass(method=method, rank=10_000, allow_growth=True).apply(model)
    assert res.changed and len(out.graph.node) == (2 if method == "jaderberg" else 3)
    assert res.changes[0]["kept_energy"] == pytest.approx(1.0)
    assert_same_outputs(model, out, feeds(model), rel=1e-4)


@pytest.mark.parametrize("auto_pad", ["SAME_UPPER", "SAME_LOWER", "VALID"])
@pytest.mark.parametrize("method", ["jaderberg", "tucker2"])
def test_auto_pad_is_resolved(auto_pad, method):
    model = conv_model(k=(5, 3), hw=(12, 11), strides=(2, 2), auto_pad=auto_pad)
    out, res = LowrankPass(method=method, rank=10_000, allow_growth=True).apply(model)
    assert res.changed
    assert_same_outputs(model, out, feeds(model), rel=1e-4)


def test_same_pads_odd_pixel_placement():
    # input 12, kernel 5, stride 2: output 6, total padding (6-1)*2 + 5 - 12 = 3
    assert same_pads("SAME_UPPER", (12, 12), (5, 5), (2, 2), (1, 1)) == (1, 1, 2, 2)
    assert same_pads("SAME_LOWER", (12, 12), (5, 5), (2, 2), (1, 1)) == (2, 2, 1, 1)


def test_no_bias_and_symbolic_batch():
    model = conv_model(bias=False, batch="N")
    out, res = LowrankPass(rank=10_000, allow_growth=True).apply(model)
    assert res.changed and len(out.graph.node[-1].input) == 2
    x = np.random.default_rng(0).normal(size=(3, 4, 11, 13)).astype(np.float32)
    assert_same_outputs(model, out, {"x": x})


# --------------------------------------------------------------------------- skips

@pytest.mark.parametrize("kwargs, options, reason", [
    ({"group": 2}, {}, "groups=2"),
    ({"k": (1, 1), "pads": (0, 0, 0, 0)}, {}, "1x1 conv"),
    ({"k": (1, 3), "pads": (0, 1, 0, 1)}, {}, "already one-dimensional"),
    ({"k": (3, 1), "pads": (1, 0, 1, 0)}, {}, "already one-dimensional"),
    ({"hw": ("h", "w"), "auto_pad": "SAME_UPPER"}, {"rank": 2}, "auto_pad=SAME_UPPER with unknown input size"),
    ({"hw": ("h", "w")}, {"speedup": 2}, "speedup needs the input size"),
    ({"C": 3, "N": 16}, {"speedup": 50}, "< 1 filter"),
    ({}, {"rank": 2, "min_energy": 0.99}, "< min_energy"),
    ({}, {"method": "tucker2", "rank": 5}, "would not save storage"),
], ids=["groups", "1x1", "1x3", "3x1", "auto_pad", "speedup-size", "speedup-unreachable", "min-energy",
        "tucker-grows"])
def test_skip_reasons(kwargs, options, reason):
    model = conv_model(**kwargs)
    out, res = LowrankPass(**options).apply(model)
    assert not res.changed and out.graph == model.graph
    assert len(res.skipped) == 1 and reason in res.skipped[0]["reason"], res.skipped


def test_non_constant_weight_and_exclude():
    base = conv_model()
    g = base.graph
    w = next(t for t in g.initializer if t.name == "w")
    model = make_model(list(g.node), [vi("x", [1, 4, 11, 13]), vi("w", list(w.dims))], list(g.output),
                       [t for t in g.initializer if t.name != "w"])
    _, res = LowrankPass().apply(model)
    assert res.skipped[0]["reason"] == "weight is not a constant"
    _, res = LowrankPass(exclude=["conv"]).apply(base)
    assert res.skipped[0]["reason"] == "excluded by option"


def test_one_selector_only():
    with pytest.raises(UserError, match="one of rank, energy, speedup"):
        LowrankPass(rank=2, energy=0.9)


# --------------------------------------------------------------------------- through the pipeline

def test_compress_deterministic_and_reported():
    model = conv_model(C=16, N=16, hw=(16, 16))
    outs = [onnxslim_cnn.compress(model, passes=["lowrank"], calib="random", lowrank__rank=8) for _ in range(2)]
    (m1, r1), (m2, _) = outs
    assert m1.SerializeToString(deterministic=True) == m2.SerializeToString(deterministic=True)
    rec = r1.passes[0]
    assert rec.status == "ok" and rec.stats["split_jaderberg"] == 1
    change = rec.changes[0]
    assert change["D"] == 8 and 0 < change["kept_energy"] < 1 and "output_error" in change
    assert r1.output.params == r1.input.params - rec.stats["params_removed"]
    assert r1.output.macs == r1.input.macs - rec.stats["macs_removed"]


def test_shared_weight_is_factorised_once():
    rng = np.random.default_rng(0)
    nodes = [h.make_node("Conv", ["x", "w"], ["a"], name="c1", pads=[1, 1, 1, 1]),
             h.make_node("Relu", ["a"], ["r"]),
             h.make_node("Conv", ["r", "w"], ["y"], name="c2", pads=[1, 1, 1, 1])]
    model = make_model(nodes, [vi("x", [1, 8, 10, 10])], [vi("y", [1, 8, 10, 10])],
                       [init("w", rng.normal(size=(8, 8, 3, 3)))])
    out, res = LowrankPass(rank=4).apply(model)
    assert res.stats["split_jaderberg"] == 2
    assert len(out.graph.initializer) == 2  # one (Kh,1) and one (1,Kw) kernel for both convs


def test_resnet18_speedup_2_macs_fall_as_computed():
    model = reference.build("resnet18", width=0.25, input_size=64, num_classes=10)
    out, report = onnxslim_cnn.compress(model, passes=["slim", "lowrank"], calib="random",
                                        options={"lowrank": {"speedup": 2, "speedup_rounding": "floor"}})
    rec = report.passes[1]
    assert rec.status == "ok" and rec.stats["split_jaderberg"] == 17  # every KxK conv; 1x1 skipped
    assert all("1x1 conv" in s["reason"] for s in rec.skipped)
    macs, _ = node_macs(out, {"input": (1, 3, 64, 64)})
    for c in rec.changes:
        assert c["macs_before"] / c["macs_after"] >= 2.0
        assert macs == {**macs, **c["node_macs"]}  # reported per-node MACs are the cost analysis'
        C, N, K, D = c["C"], c["N"], c["Kh"], c["D"]
        assert c["params_after"] == D * (C * K + K * N) + N  # bias from the folded BN
    assert report.output.macs == report.input.macs - rec.stats["macs_removed"]
    assert report.output.macs < 0.52 * report.input.macs


# --------------------------------------------------------------------------- data-aware

@pytest.mark.parametrize("method", ["jaderberg", "tucker2"])
def test_refit_lowers_output_error(method):
    model = conv_model(C=8, N=8, hw=(12, 12), batch="N")
    x = np.abs(np.random.default_rng(2).normal(size=(16, 8, 12, 12))).astype(np.float32)  # ReLU-like
    out_p, plain = LowrankPass(method=method, rank=3).apply(model, calib={"x": x})
    out_f, fit = LowrankPass(method=method, rank=3, data_aware=True).apply(model, calib={"x": x})
    p, f = plain.changes[0], fit.changes[0]
    assert f["output_error_plain"] == p["output_error"]
    assert f["refit_kept"] and f["output_error"] < 0.8 * p["output_error"]
    # the refit's claim holds in ONNX Runtime too
    ref = run(model, {"x": x})[0]
    err = [np.linalg.norm(run(m, {"x": x})[0] - ref) / np.linalg.norm(ref) for m in (out_p, out_f)]
    assert err[1] < 0.8 * err[0]


def test_data_aware_without_data_still_splits():
    model = conv_model(hw=("h", "w"))  # symbolic spatial dims: no calibration can be generated
    out, res = LowrankPass(rank=3, data_aware=True).apply(model)
    assert res.changed and "output_error" not in res.changes[0]
    assert any(s["item"] == "calibration" for s in res.skipped)


def test_digits_resnet_data_aware_keeps_accuracy():
    model = onnx.load(digits.fixture_path("digits_resnet"))
    calib = {"input": digits.load_split("train")[0][:128]}  # calibrate on training images, test on test
    top1 = {}
    for name, opts in {"plain": {"energy": 0.9, "data_aware": False}, "aware": {"energy": 0.9, "data_aware": True},
                       "x2 plain": {"speedup": 2, "data_aware": False},
                       "x2 aware, original inputs": {"speedup": 2, "data_aware": True, "sequential": False},
                       "x2 aware, sequential": {"speedup": 2, "data_aware": True}}.items():
        out, rep = onnxslim_cnn.compress(model, passes=["slim", "lowrank"], calib=calib,
                                         options={"lowrank": opts}, fidelity=False)
        assert rep.passes[1].stats["split_jaderberg"] >= 4
        top1[name] = digits.evaluate_top1(out)
    assert top1["aware"] >= top1["plain"] and top1["aware"] >= 0.99
    # at half the MACs only the sequential refit (which absorbs upstream error) keeps the model
    assert top1["x2 plain"] < 0.5 and top1["x2 aware, original inputs"] < 0.5
    assert top1["x2 aware, sequential"] >= 0.97
