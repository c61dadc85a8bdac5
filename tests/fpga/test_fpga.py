"""Pass ``fpga`` on real models: digits accuracy at W=16/8, C++ bit-exact with the simulator,
every reference model lowers or fails naming its node, the pass in the pipeline, the CLI."""

from __future__ import annotations

import json
import shutil
import time

import numpy as np
import onnx
import pytest
import yaml

from onnxslim_cnn.cli import main
from onnxslim_cnn.fixed_point.ir import FixedFormat, load
from onnxslim_cnn.fixed_point.simulate import quantize_inputs, run_float, simulate
from onnxslim_cnn.models import digits, reference
from onnxslim_cnn.passes.fpga import FpgaPass, lower_model
from onnxslim_cnn.passes.fpga.emit_cpp import build_and_run
from onnxslim_cnn.pipeline import run_pipeline

from graphs import run, user_error

CALIB = str(digits.EXAMPLES_DIR / "digits_calib.npz")
needs_gxx = pytest.mark.skipif(shutil.which("g++") is None, reason="g++ not installed")


@pytest.fixture(scope="module")
def test_split():
    return digits.load_split("test")


@pytest.fixture(scope="module")
def lowered():
    cache = {}

    def get(name: str, bits: int):
        if (name, bits) not in cache:
            cache[name, bits] = lower_model(digits.fixture_path(name), calib=CALIB, options={"bits": bits})
        return cache[name, bits]
    return get


@pytest.mark.parametrize("name", digits.FIXTURES)
def test_digits_top1_within_budget(name, lowered, test_split):
    x, y = test_split
    top1_float = digits.evaluate_top1(digits.fixture_path(name))
    for bits, budget in ((16, 0.002), (8, 0.01)):
        low = lowered(name, bits)
        logits = run_float(low.ir, {low.ir.inputs[0]: x})[low.ir.outputs[0]]
        top1 = float((logits.argmax(1) == y).mean())
        assert top1 >= top1_float - budget, (name, bits, top1, top1_float)
        sq = [r["sqnr_db"] for r in low.table]
        assert len(sq) == sum(l.op in ("conv2d", "dense", "add", "global_avgpool") for l in low.ir.layers)
        # 6 dB per bit: 16-bit layers sit far above 8-bit ones
        assert min(sq) > (60 if bits == 16 else 20), sq


@needs_gxx
@pytest.mark.parametrize("name,bits", [("digits_vgg", 8), ("digits_vgg", 16), ("digits_resnet", 8)])
def test_digits_cpp_bit_exact(name, bits, lowered, test_split, tmp_path):
    ir = lowered(name, bits).ir
    codes = quantize_inputs(ir, {ir.inputs[0]: test_split[0][:120]})[ir.inputs[0]]
    out, us = build_and_run(ir, codes, tmp_path)
    assert np.array_equal(out, simulate(ir, {ir.inputs[0]: codes})[ir.outputs[0]])
    assert us > 0


def test_simulator_speed(lowered, test_split):
    ir = lowered("digits_vgg", 16).ir
    one = {ir.inputs[0]: test_split[0][:1]}
    best = min(_timed(run_float, ir, one) for _ in range(3))
    assert best < 0.25, best


def _timed(fn, *args):
    t0 = time.perf_counter()
    fn(*args)
    return time.perf_counter() - t0


UNSUPPORTED = {"senet_small": "HardSwish", "resnet20_cifar": "Slice"}  # option-A shortcut: Slice + Pad


@pytest.mark.parametrize("name", sorted(reference.REFERENCE_MODELS))
def test_reference_models_lower_or_name_the_node(name):
    model = reference.build(name, width=0.25, input_size=32, num_classes=10)
    x = np.random.default_rng(0).normal(size=(6, 3, 32, 32)).astype(np.float32)
    calib = {model.graph.input[0].name: x}
    if name in UNSUPPORTED:
        op = UNSUPPORTED[name]
        first = next(n for n in model.graph.node if n.op_type == op)
        msg = user_error(lower_model, model, calib=calib)
        assert msg.startswith(f"fpga: cannot lower node '{first.name}' ({op}): op not supported"), msg
        return
    low = lower_model(model, calib=calib, options={"bits": 16})
    ref = run(model, calib)[0]
    got = run_float(low.ir, {low.ir.inputs[0]: x})[low.ir.outputs[0]]
    cos = float((ref * got).sum() / np.linalg.norm(ref) / np.linalg.norm(got))
    assert cos > 0.9999, cos


@needs_gxx
@pytest.mark.parametrize("name", ["mobilenetv2", "squeezenet11"])
def test_reference_cpp_bit_exact(name, tmp_path):
    """Depthwise convs, relu6 clips, residual adds (mobilenetv2); concat, ceil-mode max pools (squeezenet)."""
    model = reference.build(name, width=0.25, input_size=32, num_classes=10)
    x = np.random.default_rng(1).normal(size=(8, 3, 32, 32)).astype(np.float32)
    ir = lower_model(model, calib={model.graph.input[0].name: x[:4]}, options={"bits": 8}).ir
    codes = quantize_inputs(ir, {ir.inputs[0]: x})[ir.inputs[0]]
    out, _ = build_and_run(ir, codes, tmp_path)
    assert np.array_equal(out, simulate(ir, {ir.inputs[0]: codes})[ir.outputs[0]])


def test_pass_in_pipeline_keeps_model_and_reports():
    src = digits.fixture_path("digits_resnet")
    result = run_pipeline(src, ["fpga"], options={"fpga": {"bits": "8", "layer_bits": "fc:16"}}, calib=CALIB,
                          fidelity=False)
    assert result.model.SerializeToString() == onnx.load(src).SerializeToString()
    stats = result.report.passes[0].stats
    assert stats["multipliers"] > 0 and stats["weight_bits"] > 0 and stats["min_sqnr_db"] > 20
    _, res = FpgaPass({"bits": 8, "layer_bits": {"fc": 16}}).apply(src, calib=CALIB)
    ir = res.artifacts["fpga"].ir
    assert FixedFormat(**ir.layer("fc").attrs["weight_format"]).width == 16
    assert FixedFormat(**ir.layer("conv1").attrs["weight_format"]).width == 8
    assert ir.tensors["logits"].fmt.width == 16


def test_pass_rejects_unknown_layer():
    src = digits.fixture_path("digits_resnet")
    msg = user_error(lower_model, src, calib=CALIB, options={"layer_bits": "nope:8"})
    assert "names no node" in msg and "nope" in msg


def test_q8_model_scales_imported_as_powers_of_two(test_split):
    from onnx import numpy_helper

    from onnxslim_cnn.passes.q8 import Q8Pass

    src = digits.fixture_path("digits_resnet")
    q, _ = Q8Pass().apply(src, calib=CALIB)
    low = lower_model(q, calib=CALIB, options={"po2": True})
    ir = low.ir
    inits = {t.name: numpy_helper.to_array(t) for t in q.graph.initializer}
    quantizers = [n for n in q.graph.node if n.op_type == "QuantizeLinear"]
    checked = 0
    for n in quantizers:
        scale, zp = float(inits[n.input[1]]), int(inits[n.input[2]])
        t = ir.tensors.get(n.input[0]) or ir.tensors.get(n.input[0].replace("_QuantizeLinear_Input", ""))
        if t is None:
            continue
        step = 2.0 ** -t.fmt.frac
        assert scale <= step < 2 * scale, (t.name, scale, step)  # the power of two just above the q8 step
        assert t.fmt.signed == (zp != 0) and t.fmt.width <= 9
        checked += 1
    assert checked >= 10
    # the Relu that ORT folded into u8 quantizers is back, applied on the accumulator
    assert sum(l.op == "relu" for l in ir.layers) == sum(n.op_type == "Relu" for n in onnx.load(src).graph.node)
    x, y = test_split
    logits = run_float(ir, {ir.inputs[0]: x})[ir.outputs[0]]
    assert float((logits.argmax(1) == y).mean()) >= digits.evaluate_top1(src) - 0.01
    assert "not implemented" in user_error(lower_model, q, calib=CALIB, options={"po2": False})


def test_cli_writes_everything(tmp_path, capsys):
    out = tmp_path / "out"
    code = main(["fpga", str(digits.fixture_path("digits_resnet")), str(out), "--calib", CALIB,
                 "--set", "fpga.bits=8", "--set", "fpga.reuse_factor=4"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "SQNR dB" in printed and "layer3.add" in printed
    assert sorted(p.name for p in out.iterdir()) == ["hls4ml_config.yaml", "model.cpp", "model.h", "model.json",
                                                     "model_main.cpp", "resources.json", "weights.npz"]
    ir = load(out)
    cfg = yaml.safe_load((out / "hls4ml_config.yaml").read_text())
    assert cfg["Model"]["ReuseFactor"] == 4
    conv = cfg["LayerName"]["conv1"]["Precision"]
    assert conv["weight"] == FixedFormat(**ir.layer("conv1").attrs["weight_format"]).hls()
    assert conv["result"] == ir.tensors["relu.out"].fmt.hls()[:-1] + ",AP_RND,AP_SAT>"
    res = json.loads((out / "resources.json").read_text())
    fc = next(r for r in res["layers"] if r["layer"] == "fc")
    assert fc["macs"] == 640 and fc["multipliers"] == 160 and fc["weight_bits"] == 640 * 8 + 10 * fc["accumulator_bits"]
    again = tmp_path / "again"
    assert main(["fpga", str(digits.fixture_path("digits_resnet")), str(again), "--calib", CALIB, "-q",
                 "--set", "fpga.bits=8", "--set", "fpga.reuse_factor=4"]) == 0
    assert all((out / p.name).read_bytes() == p.read_bytes() for p in again.iterdir())  # same bytes


def test_cli_unsupported_model_writes_nothing(tmp_path, capsys):
    model = reference.build("senet_small", width=0.25, input_size=32, num_classes=10)
    path = tmp_path / "se.onnx"
    onnx.save(model, path)
    out = tmp_path / "out"
    assert main(["fpga", str(path), str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("onnxslim: error: fpga: cannot lower node") and "HardSwish" in err and "\n" not in err
    assert not out.exists()
    assert main(["fpga", str(path), str(out), "--set", "fpga.bitz=8"]) == 2
    assert "unknown option 'fpga.bitz'" in capsys.readouterr().err


def test_cli_refuses_to_run_without_calibration(tmp_path, capsys):
    out = tmp_path / "o"
    assert main(["fpga", str(digits.fixture_path("digits_resnet")), str(out), "-q"]) == 2
    assert capsys.readouterr().err == (
        "onnxslim: error: onnxslim fpga needs calibration data for its number formats: --calib FILE.npz or "
        "--calib IMAGE_DIR --preprocess PRESET (or --calib random to accept unverified formats)\n")
    assert not out.exists()
    assert main(["fpga", str(digits.fixture_path("digits_resnet")), str(out), "-q", "--calib", "random"]) == 0
    assert "warning: --calib random" in capsys.readouterr().err
