"""Where q8's error on PP-OCRv4 rec / det comes from, printed as JSON.

For each model and input kind (rendered: calibrated on 8 ``tasks.sample_inputs``, compared on
``--held`` others; random: calibrated on 8 standard-normal inputs, compared on ``--held`` others)
the cosine similarity to float of the output *and* of the tensor before the last Softmax /
Sigmoid, for:

- ``q8``: the defaults; ``q8_ocr``: ``fuse_hardswish``, ``quantize_ops=weighted``,
  ``calibration=mse``, ``float_head``, ``float_weight_layers=8``;
- ``weights_only``: the float model with every Conv/MatMul/Gemm weight replaced by its int8
  per-channel value (what int8 weights alone cost);
- ``activations16``: ORT's tool with 16-bit activations (``QUInt16``, contrib Q/DQ) and int8
  weights: the ceiling of any activation-range or mixed-precision fix that keeps int8 weights.

    python bench/q8_ocr_error.py [--models ppocrv4_rec,ppocrv4_det] [--held 16] [--out FILE]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

import numpy as np
import onnx
from onnx import numpy_helper

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import emit, machine  # noqa: E402

from onnxslim_cnn.sessions import make_session  # noqa: E402
from onnxslim_cnn.passes.q8.q8 import Q8Pass, _name_nodes, _Reader  # noqa: E402
from onnxslim_cnn.passes.q8.equalize import quantize_weight_like_ort, weight_axis  # noqa: E402
from onnxslim_cnn.passes.slim import SlimPass  # noqa: E402

OCR = {"fuse_hardswish": True, "quantize_ops": "weighted", "calibration": "mse", "float_head": True,
       "float_weight_layers": 8}


def cosine(a, b) -> float:
    a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def pre_activation(model: onnx.ModelProto) -> str:
    """Input of the Softmax / Sigmoid nearest the output (through Reshape / Flatten)."""
    producer = {o: n for n in model.graph.node for o in n.output}
    t = model.graph.output[0].name
    while t in producer:
        n = producer[t]
        if n.op_type in ("Softmax", "Sigmoid"):
            return n.input[0]
        t = n.input[0]
    raise ValueError("no Softmax/Sigmoid before the output")


def run(model: onnx.ModelProto, feeds: dict, names: list[str]) -> list[np.ndarray]:
    exposed = onnx.ModelProto()
    exposed.CopyFrom(model)
    have = {o.name for o in exposed.graph.output}
    for n in names:
        if n not in have:
            exposed.graph.output.add().name = n
    sess = make_session(exposed)
    (key, x), = feeds.items()
    outs = [sess.run(names, {key: x[i:i + 1]}) for i in range(len(x))]
    return [np.concatenate([o[j] for o in outs]) for j in range(len(names))]


def weights_only(model: onnx.ModelProto) -> onnx.ModelProto:
    out = onnx.ModelProto()
    out.CopyFrom(model)
    inits = {t.name: t for t in out.graph.initializer}
    for n in out.graph.node:
        if n.op_type in ("Conv", "MatMul", "Gemm", "ConvTranspose") and len(n.input) > 1 and n.input[1] in inits:
            w = numpy_helper.to_array(inits[n.input[1]])
            axis = 1 if n.op_type == "ConvTranspose" else weight_axis(n)
            inits[n.input[1]].CopyFrom(numpy_helper.from_array(quantize_weight_like_ort(w, axis), n.input[1]))
    return out


def activations16(model: onnx.ModelProto, calib: dict) -> onnx.ModelProto:
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

    with tempfile.TemporaryDirectory() as tmp:
        src, dst = os.path.join(tmp, "f.onnx"), os.path.join(tmp, "q.onnx")
        onnx.save(model, src)
        quantize_static(src, dst, _Reader(calib, 8).reader, quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt16, weight_type=QuantType.QInt8,
                        extra_options={"WeightSymmetric": True, "UseQDQContribOps": True})
        return onnx.load(dst)


def bench_model(model_id: str, n_held: int) -> dict:
    from onnx import version_converter

    from onnxslim_cnn.models import corpus, tasks

    path = str(corpus.require(model_id))
    original = onnx.load(path)
    # what q8 quantizes: BN folded, nodes named, opset 13 (weights_only / activations16 start here)
    prepared, _ = SlimPass().apply(original)
    prepared = version_converter.convert_version(_name_nodes(prepared), 13)
    name = original.graph.input[0].name
    rendered = tasks.sample_inputs(model_id, 8)
    shape = rendered[name].shape[1:]
    kinds = {
        "rendered": (rendered, tasks.sample_inputs(model_id, n_held, seed=99)),
        "random": ({name: np.random.default_rng(0).standard_normal((8,) + shape).astype(np.float32)},
                   {name: np.random.default_rng(1).standard_normal((n_held,) + shape).astype(np.float32)}),
    }
    out_name = original.graph.output[0].name
    rows: dict = {}
    for kind, (calib, held) in kinds.items():
        # the tensor before the Softmax / Sigmoid, by each model's own name (slim folds det's last
        # Add into its ConvTranspose, so the name changes)
        ref = run(original, held, [out_name, pre_activation(original)])
        for label in ("q8", "q8_ocr", "weights_only", "activations16"):
            if label == "q8":
                model = Q8Pass().apply(path, calib=calib)[0]
            elif label == "q8_ocr":
                model = Q8Pass(**OCR).apply(path, calib=calib)[0]
            elif label == "weights_only":
                model = weights_only(prepared)
            else:
                model = activations16(prepared, calib)
            got = run(model, held, [out_name, pre_activation(model)])
            rows.setdefault(label, {})[kind] = {"cosine_output": cosine(ref[0], got[0]),
                                                "cosine_before_" + ("softmax" if "rec" in model_id else "sigmoid"):
                                                cosine(ref[1], got[1])}
        rows.setdefault("float", {})[kind] = {"output_mean": float(ref[0].mean()), "output_max": float(ref[0].max())}
    return {"model": model_id, "held_out_samples": n_held, "calibration_samples": 8, "rows": rows}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="ppocrv4_rec,ppocrv4_det")
    ap.add_argument("--held", type=int, default=16)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    results = [bench_model(m, args.held) for m in args.models.split(",")]
    emit({"machine": machine(), "results": results}, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
