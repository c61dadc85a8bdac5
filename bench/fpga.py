"""Pass ``fpga`` on the digits fixtures at W=16 and W=8, printed as JSON (and saved with --out).

Per model and word length: float and fixed-point top-1 on the test split (450 images; formats
calibrated on models/examples/digits_calib.npz, and again on 256 train images to show the
figure does not rest on calibrating with test images), argmax agreement and logits SQNR vs
float, the per-layer table (formats, SQNR, MACs, multipliers, weight bits, BRAM18), totals,
simulator throughput (images/s, batches of 256, and one image), and the emitted C++ (g++ -O2):
bit-exactness against the simulator and run time per image on 500 images (the 450 test images +
the first 50 train images). ORT float latency (1 thread) for scale.

    python bench/fpga.py [--out bench/results/fpga.json] [--cpp-images 500]
"""

from __future__ import annotations

import argparse
import os

# one BLAS thread: the simulator's figure is per core, like ORT's and the C++ one
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")

import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import emit, machine  # noqa: E402

from onnxslim_cnn.fixed_point.simulate import quantize_inputs, run_float, simulate  # noqa: E402
from onnxslim_cnn.models import digits  # noqa: E402
from onnxslim_cnn.passes.fpga import lower_model  # noqa: E402
from onnxslim_cnn.passes.fpga.emit_cpp import build_and_run  # noqa: E402
from onnxslim_cnn.passes.fpga.resources import sqnr_db  # noqa: E402

CALIB = str(digits.EXAMPLES_DIR / "digits_calib.npz")


def _ort_float(path, x):
    so = ort.SessionOptions()
    so.intra_op_num_threads = so.inter_op_num_threads = 1
    so.log_severity_level = 3
    s = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    name = s.get_inputs()[0].name
    logits = np.concatenate([s.run(None, {name: x[i:i + 64]})[0] for i in range(0, len(x), 64)])
    times = []
    for i in range(50):
        t0 = time.perf_counter()
        s.run(None, {name: x[i:i + 1]})
        times.append(time.perf_counter() - t0)
    return logits, 1e6 * statistics.median(times)


def one(name: str, bits: int, x, y, x_cpp, ref_logits, train_calib) -> dict:
    path = digits.fixture_path(name)
    t0 = time.perf_counter()
    low = lower_model(path, calib=CALIB, options={"bits": bits})
    lower_s = time.perf_counter() - t0
    ir = low.ir
    inp, outp = ir.inputs[0], ir.outputs[0]
    logits = run_float(ir, {inp: x})[outp]
    t0 = time.perf_counter()
    run_float(ir, {inp: x})
    batch_s = time.perf_counter() - t0
    single = []
    for i in range(20):
        t0 = time.perf_counter()
        run_float(ir, {inp: x[i:i + 1]})
        single.append(time.perf_counter() - t0)
    low_train = lower_model(path, calib={"input": train_calib}, options={"bits": bits})
    logits_train = run_float(low_train.ir, {inp: x})[outp]
    doc = {
        "model": name, "bits": bits,
        "top1_float": float((ref_logits.argmax(1) == y).mean()),
        "top1_fixed": float((logits.argmax(1) == y).mean()),
        "top1_fixed_calib_train256": float((logits_train.argmax(1) == y).mean()),
        "argmax_agreement_with_float": float((logits.argmax(1) == ref_logits.argmax(1)).mean()),
        "logits_sqnr_db": round(sqnr_db(ref_logits, logits), 2),
        "total_weight_bits": sum(r["weight_bits"] for r in low.table),
        "multipliers_reuse1": sum(r["multipliers"] for r in low.table),
        "dsp48_upper_bound_reuse1": sum(r["dsp48"] for r in low.table),
        "bram18": sum(r["bram18"] for r in low.table),
        "macs": sum(r["macs"] for r in low.table),
        "max_accumulator_bits": max(r["accumulator_bits"] for r in low.table),
        "lower_seconds": round(lower_s, 2),
        "simulator_images_per_s_batch256": round(len(x) / batch_s, 1),
        "simulator_ms_one_image_median": round(1e3 * statistics.median(single), 2),
        "layers": low.table,
    }
    if shutil.which("g++"):
        codes = quantize_inputs(ir, {inp: x_cpp})[inp]
        with tempfile.TemporaryDirectory() as work:
            out, us = build_and_run(ir, codes, work)
        ref = simulate(ir, {inp: codes})[outp]
        doc["cpp"] = {"images": int(len(codes)), "bit_exact": bool(np.array_equal(out, ref)),
                      "mismatching_values": int((out != ref).sum()), "us_per_image": round(us, 1),
                      "compiler": "g++ -std=c++17 -O2"}
    else:
        doc["cpp"] = {"skipped": "g++ not installed"}
    return doc


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out")
    ap.add_argument("--cpp-images", type=int, default=500)
    args = ap.parse_args()
    x, y = digits.load_split("test")
    x_train, _ = digits.load_split("train")
    x_cpp = np.concatenate([x, x_train[:max(args.cpp_images - len(x), 0)]])[:args.cpp_images]
    results = []
    for name in digits.FIXTURES:
        ref_logits, ort_us = _ort_float(digits.fixture_path(name), x)
        for bits in (16, 8):
            doc = one(name, bits, x, y, x_cpp, ref_logits, x_train[:256])
            doc["ort_float_us_per_image_1thread"] = round(ort_us, 1)
            results.append(doc)
    # q8 (QDQ, ORT quantize_static, calibrated on the same file) -> fpga with its scales as powers of two
    from onnxslim_cnn.passes.q8 import Q8Pass

    q8_import = []
    for name in digits.FIXTURES:
        q, _ = Q8Pass().apply(digits.fixture_path(name), calib=CALIB)
        low = lower_model(q, calib=CALIB, options={"po2": True})
        logits = run_float(low.ir, {low.ir.inputs[0]: x})[low.ir.outputs[0]]
        widths = sorted({t.fmt.width for t in low.ir.tensors.values() if not t.name.endswith(("_acc", "_act", "_sum"))})
        q8_import.append({"model": name, "top1_float": digits.evaluate_top1(digits.fixture_path(name)),
                          "top1_q8_ort": digits.evaluate_top1(q), "top1_fpga_po2_from_q8": float((logits.argmax(1) == y).mean()),
                          "activation_widths": widths, "total_weight_bits": sum(r["weight_bits"] for r in low.table)})
    emit({"bench": "fpga", "q8_po2_import": q8_import, "machine": machine(), "calibration": CALIB, "test_images": int(len(x)),
          "results": results}, args.out)


if __name__ == "__main__":
    main()
