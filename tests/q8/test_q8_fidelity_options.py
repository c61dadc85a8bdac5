"""q8's fidelity options on small graphs: fuse_hardswish, calibration=mse, quantize_ops, float_head."""

from __future__ import annotations

import numpy as np
import onnx
from graphs import assert_same_outputs, init, make_model, run, vi
from onnx import helper as h
from onnx import numpy_helper as nh
from onnxslim_cnn.passes.q8 import Q8Pass
from onnxslim_cnn.passes.q8.fuse import fuse_hardswish
from onnxslim_cnn.passes.q8.mixed import head_layers
from onnxslim_cnn.passes.q8.ranges import _mse_range, mse_overrides


def _hardswish_chain(i: int, x: str, y: str, swapped: bool = False) -> list:
    """Paddle2ONNX's spelling: Div(Mul(x, Clip(Add(x, 3), 0, 6)), 6)."""
    mul_in = [f"clip{i}", x] if swapped else [x, f"clip{i}"]
    return [h.make_node("Add", [x, "three"], [f"add{i}"], name=f"add{i}"),
            h.make_node("Clip", [f"add{i}", "zero", "six"], [f"clip{i}"], name=f"clip{i}"),
            h.make_node("Mul", mul_in, [f"mul{i}"], name=f"mul{i}"),
            h.make_node("Div", [f"mul{i}", "six1"], [y], name=f"div{i}")]


def _lcnet_like(opset: int = 13) -> onnx.ModelProto:
    """conv -> hardswish -> scalar affine -> conv -> hardswish -> MatMul head -> Softmax."""
    rng = np.random.default_rng(0)
    nodes = [h.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1])]
    nodes += _hardswish_chain(1, "c1", "hs1")
    nodes += [h.make_node("Mul", ["hs1", "s"], ["lab_m"], name="lab_mul"),
              h.make_node("Add", ["lab_m", "t"], ["lab"], name="lab_add"),
              h.make_node("Conv", ["lab", "w2", "b2"], ["c2"], name="conv2")]
    nodes += _hardswish_chain(2, "c2", "hs2", swapped=True)
    nodes += [h.make_node("GlobalAveragePool", ["hs2"], ["gap"], name="gap"),
              h.make_node("Flatten", ["gap"], ["flat"], name="flatten"),
              h.make_node("MatMul", ["flat", "wh"], ["logits"], name="head"),
              h.make_node("Softmax", ["logits"], ["y"], name="softmax", axis=-1)]
    inits = [init("w1", rng.normal(size=(8, 3, 3, 3))), init("b1", rng.normal(size=8)),
             init("w2", rng.normal(size=(8, 8, 1, 1)) * 0.5), init("b2", rng.normal(size=8)),
             init("wh", rng.normal(size=(8, 5))), init("s", np.array([0.5])), init("t", np.array([0.01])),
             init("three", np.array([3.0])), init("zero", np.array(0.0)), init("six", np.array(6.0)),
             init("six1", np.array([6.0]))]
    return make_model(nodes, [vi("x", ["N", 3, 8, 8])], [vi("y", ["N", 5])], inits, opset=opset)


def _x(n=4, seed=0):
    return np.random.default_rng(seed).standard_normal((n, 3, 8, 8)).astype(np.float32) * 2


def test_fuse_hardswish_exact_and_counted():
    model = _lcnet_like()
    fused, names = fuse_hardswish(model)
    ops = [n.op_type for n in fused.graph.node]
    assert sorted(names) == ["div1", "div2"] and ops.count("HardSwish") == 2
    assert not {"Clip", "Div"} & set(ops) and ops.count("Add") == 1 and ops.count("Mul") == 1  # the affine stays
    assert next(o.version for o in fused.opset_import if o.domain == "") == 14
    assert_same_outputs(model, fused, {"x": _x()}, rel=1e-5)
    assert [n.op_type for n in model.graph.node].count("Clip") == 2  # input untouched
    onnx.checker.check_model(fused, full_check=True)


def test_fuse_hardswish_leaves_shared_or_different_chains():
    model = _lcnet_like()
    # the clip output also read elsewhere: fusing would drop a tensor somebody needs
    model.graph.node.append(h.make_node("Identity", ["clip1"], ["extra"], name="extra"))
    model.graph.output.append(vi("extra", ["N", 8, 8, 8]))
    # Clip(0, 5) is not HardSwish
    model.graph.initializer.append(nh.from_array(np.array(5.0, np.float32), "five"))
    clip2 = next(n for n in model.graph.node if n.name == "clip2")
    clip2.input[2] = "five"
    fused, names = fuse_hardswish(model)
    assert names == [] and fused is model


def test_fuse_hardswish_upgrades_old_opset():
    model = _lcnet_like(opset=11)
    fused, names = fuse_hardswish(model)
    assert len(names) == 2 and next(o.version for o in fused.opset_import if o.domain == "") == 14
    assert_same_outputs(model, fused, {"x": _x()}, rel=1e-5)


def _uint8_mse(x, lo, hi):
    s = (hi - lo) / 255
    z = np.round(-lo / s)
    return float(np.mean(((np.clip(np.round(x / s) + z, 0, 255) - z) * s - x) ** 2))


def test_mse_range_clips_a_heavy_tail_and_keeps_a_uniform_range():
    rng = np.random.default_rng(0)
    tailed = rng.laplace(size=100_000)
    lo0, hi0 = float(tailed.min()), float(tailed.max())
    hist, edges = np.histogram(tailed, bins=2048, range=(lo0, hi0))
    lo, hi = _mse_range(hist.astype(np.float64), edges, lo0, hi0)
    assert hi < 0.9 * hi0 and lo > 0.9 * lo0  # measured: [-10.09, 10.16] of [-11.87, 11.95]
    assert _uint8_mse(tailed, lo, hi) < 0.85 * _uint8_mse(tailed, lo0, hi0)  # measured 0.82x
    uniform = rng.uniform(-1, 1, 100_000)
    hist, edges = np.histogram(uniform, bins=2048, range=(-1, 1))
    lo, hi = _mse_range(hist.astype(np.float64), edges, -1.0, 1.0)
    assert lo <= -0.95 and hi >= 0.95  # nothing to gain from clipping a flat distribution


def test_mse_overrides_hardswish_input_floor():
    from onnxslim_cnn.analysis.calibration import from_arrays

    fused, _ = fuse_hardswish(_lcnet_like())
    calib = from_arrays({"x": _x(8) * 4}, fused)
    ov = mse_overrides(fused, calib)
    # conv outputs reach -138 / -123 on this data; HardSwish is 0 below -3, so the range starts there
    assert float(ov["c1"][0]["rmin"]) == -3.0 and float(ov["c2"][0]["rmin"]) >= -3.0
    assert float(ov["x"][0]["rmin"]) < -3.0  # other tensors: no floor
    assert all(float(v[0]["rmax"]) > float(v[0]["rmin"]) for v in ov.values())


def test_head_layers():
    assert head_layers(_lcnet_like()) == ["head"]


def test_fidelity_options_through_the_pass():
    model = _lcnet_like()
    x = _x(8, seed=1)
    q, res = Q8Pass(fuse_hardswish=True, quantize_ops="weighted", calibration="mse",
                    float_head=True).apply(model, calib={"x": x})
    assert res.stats["hardswish_fused"] == 2 and res.stats["float_head"] == ["head"]
    dq_out = {n.output[0] for n in q.graph.node if n.op_type == "DequantizeLinear"}
    readers = {n.op_type for n in q.graph.node if n.op_type != "QuantizeLinear" and set(n.input) & dq_out}
    # weighted: Q/DQ only around the two convs (HardSwish reads conv1's dequantized output); the
    # affine Mul/Add, the pooling and the head MatMul read float tensors
    assert readers == {"Conv", "HardSwish"}
    head = next(n for n in q.graph.node if n.name == "head")
    assert not set(head.input) & dq_out
    ref, out = run(model, {"x": x})[0], run(q, {"x": x})[0]
    cos = float((ref * out).sum() / np.linalg.norm(ref) / np.linalg.norm(out))
    assert cos > 0.99
    plain, _ = Q8Pass().apply(model, calib={"x": x})
    plain_dq = {n.output[0] for n in plain.graph.node if n.op_type == "DequantizeLinear"}
    assert {"Mul", "MatMul"} <= {n.op_type for n in plain.graph.node if set(n.input) & plain_dq}


def test_float_weight_layers_ranks_by_weight_rounding_alone():
    from onnxslim_cnn.analysis.calibration import from_arrays
    from onnxslim_cnn.passes.q8.mixed import weight_sensitive_layers

    model = _lcnet_like()
    # a quiet channel 0 out of conv1 read by an outlier weight column of conv2 (PP-OCRv4 rec's
    # pattern): conv2's per-output-channel int8 step is set by that column, the other seven round coarsely
    inits = {i.name: i for i in model.graph.initializer}
    for name, scale, cut in (("w1", 1 / 40, np.s_[0]), ("b1", 1 / 40, np.s_[0]), ("w2", 40.0, np.s_[:, 0])):
        a = nh.to_array(inits[name]).copy()
        a[cut] *= scale
        inits[name].CopyFrom(nh.from_array(a, name))
    calib = from_arrays({"x": _x(8)}, model)
    chosen, sens = weight_sensitive_layers(model, calib, 1)
    assert chosen == ["conv2"] and set(sens) == {"conv1", "conv2", "head"}
    assert sens["conv2"] == max(sens.values()) > 0
    q, res = Q8Pass(float_weight_layers=1).apply(model, calib={"x": _x(8)})
    assert res.stats["float_weight_layers"] == ["conv2"]
    dq_out = {n.output[0] for n in q.graph.node if n.op_type == "DequantizeLinear"}
    conv2 = next(n for n in q.graph.node if n.name == "conv2")
    assert not set(conv2.input) & dq_out  # reads float input and float weights
