"""Fixed-point IR and simulator: rounding/saturation by hand, residual alignment by hand,
serialisation round trip, and every op against ONNX Runtime and the emitted C++."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
from onnx import helper as h

from onnxslim_cnn.fixed_point.ir import FixedFormat, FixedPointModel, Layer, Tensor, accumulator_format, load, save
from onnxslim_cnn.fixed_point.simulate import requantize, round_shift, run_float, saturate, simulate
from onnxslim_cnn.passes.fpga import lower_model
from onnxslim_cnn.passes.fpga.emit_cpp import build_and_run

from graphs import init, make_model, run, vi

needs_gxx = pytest.mark.skipif(shutil.which("g++") is None, reason="g++ not installed")


def test_rounding_modes_by_hand():
    x = np.array([5, 6, 7, 10, -5, -6, -7, -10])  # /4: 1.25 1.5 1.75 2.5 -1.25 -1.5 -1.75 -2.5
    assert round_shift(x, 2, "trunc").tolist() == [1, 1, 1, 2, -2, -2, -2, -3]
    assert round_shift(x, 2, "round_half_up").tolist() == [1, 2, 2, 3, -1, -1, -2, -2]
    assert round_shift(x, 2, "round_half_even").tolist() == [1, 2, 2, 2, -1, -2, -2, -2]
    assert round_shift(x, -3, "trunc").tolist() == (x * 8).tolist()


def test_saturation_by_hand():
    s8, u4 = FixedFormat(True, 8, 4), FixedFormat(False, 4, 4)
    x = np.array([200, -129, 127, -128, 300])
    assert saturate(x, s8, "sat").tolist() == [127, -128, 127, -128, 127]
    assert saturate(x, s8, "wrap").tolist() == [-56, 127, 127, -128, 44]
    assert saturate(np.array([17, -1, 15]), u4, "wrap").tolist() == [1, 15, 15]
    assert requantize(np.array([3]), 3, 1, "round_half_up", "sat", s8).tolist() == [5]  # 9/2 = 4.5 -> 5


def test_accumulator_width_never_overflows():
    x, w = FixedFormat(False, 8, 3), FixedFormat(True, 8, 1)
    acc = accumulator_format(x, w, reduction=1024, bias_bound=0)
    worst = 1024 * 255 * 128  # max |x| * max |w| * n
    assert acc.frac == x.frac + w.frac and acc.signed
    assert acc.max_int >= worst and acc.min_int <= -worst and acc.width == worst.bit_length() + 1


def _residual_model() -> FixedPointModel:
    a = Tensor("a", (4,), FixedFormat(True, 8, 4))    # s8 frac 4
    b = Tensor("b", (4,), FixedFormat(False, 8, 6))   # u8 frac 2
    s = Tensor("s", (4,), FixedFormat(True, 12, 8))   # frac 4: b is shifted left by 2
    y = Tensor("y", (4,), FixedFormat(True, 8, 5))    # frac 3
    layers = [Layer("add", "add", ["a", "b"], "s"),
              Layer("requant", "rq", ["s"], "y", {"multiplier": 1, "shift": 1, "rounding": "round_half_even",
                                                   "saturation": "sat"})]
    return FixedPointModel("residual", ["a", "b"], ["y"], {t.name: t for t in (a, b, s, y)}, layers)


def test_residual_add_aligns_formats_by_hand():
    """a = 1.5625 (25/16), b = 1.25 (5/4): a + b = 2.8125 = 45/16; at frac 3: 22.5 -> 22 (half to even)."""
    m = _residual_model()
    a = np.array([[25, -25, 127, -128]])
    b = np.array([[5, 3, 255, 0]])
    v = simulate(m, {"a": a, "b": b}, keep_all=True)
    # hand-computed: a + 4 b at frac 4
    assert v["s"].tolist() == [[45, -13, 1147, -128]]
    # /2 half to even: 22.5 -> 22, -6.5 -> -6, 573.5 -> saturates at 127, -64
    assert v["y"].tolist() == [[22, -6, 127, -64]]
    assert m.tensors["y"].fmt.dequantize(v["y"]).tolist() == [[2.75, -0.75, 15.875, -8.0]]


@needs_gxx
def test_residual_add_cpp_matches_hand_values(tmp_path):
    m = _residual_model()
    # two inputs, so a hand-written main instead of the one-input harness
    from onnxslim_cnn.passes.fpga.emit_cpp import emit_cpp

    files = emit_cpp(m)
    assert "model_main.cpp" not in files  # two inputs: no single-input harness
    main = ('#include <cstdio>\n#include "model.h"\nint main(){ const int8_t a[4]={25,-25,127,-128}; '
            'const uint8_t b[4]={5,3,255,0}; int8_t y[4]; fpga_model::inference(a,b,y); '
            'for(int i=0;i<4;++i) std::printf("%d ", (int)y[i]); return 0; }\n')
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    (tmp_path / "main.cpp").write_text(main)
    import subprocess

    subprocess.run(["g++", "-std=c++17", "-O2", "-Wall", "-Werror", "-Wno-unknown-pragmas", "-o", str(tmp_path / "r"),
                    str(tmp_path / "model.cpp"), str(tmp_path / "main.cpp")], check=True)
    out = subprocess.run([str(tmp_path / "r")], check=True, capture_output=True, text=True).stdout
    assert out.split() == ["22", "-6", "127", "-64"]


def _ops_model():
    """Every IR op: conv (groups, pads, stride), clip 0..6, maxpool with pads, avgpool 3x3 (divide by
    9), concat of two formats, a residual add, GAP over 3x3, flatten, gemm."""
    rng = np.random.default_rng(0)
    nodes = [
        h.make_node("Conv", ["x", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1], name="conv1"),
        h.make_node("Clip", ["c1", "lo", "hi"], ["r1"], name="relu6"),
        h.make_node("Conv", ["r1", "w2"], ["c2"], pads=[1, 1, 1, 1], group=4, name="dw"),
        h.make_node("Add", ["c2", "r1"], ["s"], name="res"),
        h.make_node("MaxPool", ["s"], ["p1"], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1], name="mp"),
        h.make_node("AveragePool", ["r1"], ["p2"], kernel_shape=[3, 3], strides=[2, 2], name="ap"),
        h.make_node("Conv", ["p1", "w3", "b3"], ["c3"], name="conv.3"),  # k2 on 4x4 -> 3x3
        h.make_node("Relu", ["c3"], ["r3"], name="conv_3"),  # same C identifier as "conv.3"
        h.make_node("Concat", ["r3", "p2"], ["cat"], axis=1, name="cat"),
        h.make_node("GlobalAveragePool", ["cat"], ["g0"], name="gap"),
        h.make_node("Clip", ["g0", "lo", "cap"], ["g"], name="gap_clip"),  # on the mean, not the pool's sum
        h.make_node("Flatten", ["g"], ["f"], name="flat"),
        h.make_node("Gemm", ["f", "wf", "bf"], ["y"], transB=1, name="fc"),
    ]
    inits = [init("w1", rng.normal(size=(4, 3, 3, 3)) * 0.4), init("b1", rng.normal(size=4)),
             init("lo", np.array(0.0, np.float32)), init("hi", np.array(6.0, np.float32)),
             init("cap", np.array(0.75, np.float32)),
             init("w2", rng.normal(size=(4, 1, 3, 3)) * 0.5),
             init("w3", rng.normal(size=(5, 4, 2, 2)) * 0.3), init("b3", rng.normal(size=5)),
             init("wf", rng.normal(size=(3, 9))), init("bf", rng.normal(size=3))]
    return make_model(nodes, [vi("x", ["N", 3, 8, 8])], [vi("y", ["N", 3])], inits)


def test_every_op_tracks_onnxruntime_at_16_bits():
    model = _ops_model()
    x = np.random.default_rng(1).normal(size=(32, 3, 8, 8)).astype(np.float32)
    low = lower_model(model, calib={"x": x}, options={"bits": 16})
    ops = {layer.op for layer in low.ir.layers}
    assert ops == {"conv2d", "clip", "add", "maxpool", "avgpool", "requant", "relu", "concat", "global_avgpool",
                   "flatten", "dense"}
    ref = run(model, {"x": x})[0]
    got = run_float(low.ir, {"x": x})[low.ir.outputs[0]]
    assert np.max(np.abs(got - ref)) < 2e-3 * np.max(np.abs(ref))
    # the average pools' divisions by 9 are integer multiplies with a shift
    assert any(l.op == "requant" and l.attrs["multiplier"] not in (1,) for l in low.ir.layers)


@needs_gxx
def test_every_op_cpp_is_bit_exact(tmp_path):
    model = _ops_model()
    x = np.random.default_rng(2).normal(size=(40, 3, 8, 8)).astype(np.float32)
    for bits, rounding in ((8, "round_half_even"), (16, "trunc")):
        ir = lower_model(model, calib={"x": x[:20]}, options={"bits": bits, "rounding": rounding}).ir
        codes = ir.tensors["x"].fmt.quantize(x)  # includes inputs outside the calibration range
        out, _ = build_and_run(ir, codes, tmp_path / str(bits))
        assert np.array_equal(out, simulate(ir, {"x": codes})[ir.outputs[0]])


def test_serialisation_round_trip_and_determinism(tmp_path):
    model = _ops_model()
    x = np.random.default_rng(3).normal(size=(16, 3, 8, 8)).astype(np.float32)
    ir = lower_model(model, calib={"x": x}, options={"bits": 8}).ir
    save(ir, tmp_path)
    back = load(tmp_path)
    assert back.to_json() == ir.to_json()
    assert back.weights_npz() == ir.weights_npz()
    for a, b in zip(ir.layers, back.layers):
        assert a.weights.keys() == b.weights.keys()
        assert all(np.array_equal(a.weights[k], b.weights[k]) for k in a.weights)
    codes = ir.tensors["x"].fmt.quantize(x)
    assert np.array_equal(simulate(back, {"x": codes})["y"], simulate(ir, {"x": codes})["y"])
    again = lower_model(model, calib={"x": x}, options={"bits": 8}).ir
    assert again.to_json() == ir.to_json() and again.weights_npz() == ir.weights_npz()


def test_too_wide_accumulator_names_the_layer():
    x = np.random.default_rng(4).normal(size=(4, 3, 8, 8)).astype(np.float32)
    from graphs import user_error

    msg = user_error(lower_model, _ops_model(), calib={"x": x}, options={"bits": 32})
    assert msg.startswith("fpga: cannot lower node 'conv1' (Conv): accumulator needs"), msg


def test_package_namespace_keeps_the_simulator_module():
    """``fixed_point.simulate`` is the module (it was the function, which hid the module:
    ``simulate.quantize_inputs`` raised AttributeError); the function is ``simulate_model``."""
    import inspect

    import onnxslim_cnn.fixed_point as fp
    from onnxslim_cnn.fixed_point import simulate as sim_module

    assert inspect.ismodule(fp.simulate) and fp.simulate is sim_module
    assert fp.simulate.quantize_inputs is fp.quantize_inputs and fp.simulate.requantize is requantize
    assert fp.simulate_model is fp.simulate.simulate is simulate and fp.run_float is run_float
    assert inspect.ismodule(fp.ir) and set(fp.__all__) <= set(dir(fp))
