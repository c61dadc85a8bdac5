"""Deep Compression without retraining: ``sparsify`` + ``share`` + ``onnxslim pack``, printed as JSON.

digits VGG (models/examples/digits_vgg.onnx, 1.42 MB float32): ``slim`` (BatchNorm folded into
the convs, so no BN tensors are left to store), per-layer sparsity found by
``sparsify mode=sensitivity`` (per-layer output-error budget, least-squares refit of the kept
weights), then ``share`` (k-means, 8 bits conv / 5 bits FC), then the container. Size is the
container file against the float ONNX file; top-1 on the digits test split (450 images).
Calibration: 512 train images (never the test images) for the headline; ``calib64`` rows use
models/examples/digits_calib.npz, which holds the first 64 *test* images, as the issue names it.
Stage rows (P, Q, P+Q) show what each step gives alone.

AlexNet (onnxslim_cnn.models.reference, full size, random weights: compression only): the
seed's per-layer kept ratios (Han et al. Table 4: conv1 84 % ... fc8 25 %) with ``sparsify
layer_ratio``, ``share`` 8/5 bits, pack; our per-layer table next to the published one.

    python bench/deep_compression.py [--out bench/results/deep_compression.json] [--skip-alexnet]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import numpy as np

import onnxslim_cnn
from onnxslim_cnn import container
from onnxslim_cnn.models import digits, reference
from onnxslim_cnn.pack_cli import format_rows, layer_rows

sys.path.insert(0, os.path.dirname(__file__))
from _common import emit, machine  # noqa: E402

# Han et al. 2016, Table 4 (the seed's "Compression statistics for AlexNet"): weights kept (P),
# weight bits P+Q / P+Q+H, index bits P+Q / P+Q+H, compress rate P+Q / P+Q+H (percent).
SEED_ALEXNET = {
    "conv1": (84, 8, 6.3, 4, 1.2, 32.6, 20.53), "conv2": (38, 8, 5.5, 4, 2.3, 14.5, 9.43),
    "conv3": (35, 8, 5.1, 4, 2.6, 13.1, 8.44), "conv4": (37, 8, 5.2, 4, 2.5, 14.1, 9.11),
    "conv5": (37, 8, 5.6, 4, 2.5, 14.0, 9.43), "fc6": (9, 5, 3.9, 4, 3.2, 3.0, 2.39),
    "fc7": (9, 5, 3.6, 4, 3.7, 3.0, 2.46), "fc8": (25, 5, 4, 4, 3.2, 7.3, 5.85),
    "total": (11, 5.4, 4, 4, 3.2, 3.7, 2.88),
}
# our reference AlexNet's node names (torchvision layout) -> the paper's layer names
ALEXNET_NAMES = {"features.0": "conv1", "features.3": "conv2", "features.6": "conv3", "features.8": "conv4",
                 "features.10": "conv5", "classifier.1": "fc6", "classifier.4": "fc7", "classifier.6": "fc8",
                 "total": "total"}


def pack(model) -> tuple[bytes, list]:
    data = model.SerializeToString(deterministic=True)
    blob, plans = container.pack_bytes(data)
    assert container.unpack_bytes(blob) == data
    return blob, plans


def digits_rows(budgets: list[float]) -> dict:
    path = str(digits.fixture_path("digits_vgg"))
    float_bytes = os.path.getsize(path)
    base = digits.evaluate_top1(path)
    calibs = {"train512": {"input": digits.load_split("train")[0][:512]},
              "calib64": "models/examples/digits_calib.npz"}
    out = {"model": "digits_vgg", "float_bytes": float_bytes, "top1_float": base, "runs": []}

    def row(name, passes, calib, **opts):
        t0 = time.perf_counter()
        model, report = onnxslim_cnn.compress(path, passes=passes, calib=calib, fidelity=False, **opts)
        seconds = time.perf_counter() - t0
        blob, plans = pack(model)
        top1 = digits.evaluate_top1(model)
        r = {"name": name, "passes": passes, "options": {k: v for k, v in opts.items()},
             "container_bytes": len(blob), "ratio": float_bytes / len(blob), "top1": top1,
             "top1_loss_points": 100 * (base - top1), "seconds_passes": round(seconds, 1),
             "layers": layer_rows(plans)}
        for rec in report.passes:
            if rec.name == "sparsify":
                r["sparsify"] = {c["item"]: {k: c.get(k) for k in ("sparsity", "ratio", "search_error")}
                                 for c in rec.changes}
        out["runs"].append(r)
        print(f"# {name}: {r['ratio']:.1f}x, top-1 {100 * top1:.2f}% ({r['top1_loss_points']:+.2f} pt loss)",
              file=sys.stderr)
        return r

    row("Q: share 8/5 bits only", ["share"], None)
    row("P: sparsify global 0.9 + refit", ["sparsify"], calibs["train512"], sparsify__ratio=0.9,
        sparsify__refit=True)
    sensitivity = dict(sparsify__mode="sensitivity", sparsify__refit=True)
    for budget in budgets:
        row(f"slim + P+Q+H: sensitivity budget {budget}, refit, share 8/5 (train512)", ["slim", "sparsify", "share"],
            calibs["train512"], sparsify__budget=budget, **sensitivity)
    row(f"slim + P+Q+H: sensitivity budget {budgets[0]}, refit, share 8/5 (calib64)", ["slim", "sparsify", "share"],
        calibs["calib64"], sparsify__budget=budgets[0], **sensitivity)
    row(f"P+Q+H without slim (BN kept): sensitivity budget {budgets[0]} (train512)", ["sparsify", "share"],
        calibs["train512"], sparsify__budget=budgets[0], **sensitivity)
    return out


def alexnet_rows() -> dict:
    model = reference.build("alexnet")
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "alexnet.onnx")
        onnxslim_cnn.save(model, path)
        float_bytes = os.path.getsize(path)
    kept = {ours: SEED_ALEXNET[paper][0] / 100 for ours, paper in ALEXNET_NAMES.items() if paper != "total"}
    t0 = time.perf_counter()
    shared, _ = onnxslim_cnn.compress(model, passes=["sparsify", "share"], calib="random", fidelity=False,
                                      sparsify__scope="layer", sparsify__ratio=0.0, sparsify__min_params=0,
                                      sparsify__layer_ratio={k: round(1 - v, 4) for k, v in kept.items()})
    seconds = time.perf_counter() - t0
    out = {"model": "alexnet (reference, 224x224, 1000 classes, random weights)", "float_bytes": float_bytes,
           "seconds_passes": round(seconds, 1), "packs": []}
    data = shared.SerializeToString(deterministic=True)
    for bits in (0, 4):
        t0 = time.perf_counter()
        blob, plans = container.pack_bytes(data, index_bits=bits)
        t_pack = time.perf_counter() - t0
        t0 = time.perf_counter()
        assert container.unpack_bytes(blob) == data
        t_unpack = time.perf_counter() - t0
        rows = layer_rows(plans)
        for r in rows:
            r["paper_layer"] = ALEXNET_NAMES.get(r["layer"], r["layer"])
            r["seed"] = dict(zip(("weights_pct", "weight_bits_pq", "weight_bits_pqh", "index_bits_pq",
                                  "index_bits_pqh", "compress_pq_pct", "compress_pqh_pct"),
                                 SEED_ALEXNET.get(r["paper_layer"], (None,) * 7)))
        out["packs"].append({"index_bits": bits or "auto", "container_bytes": len(blob),
                             "ratio": float_bytes / len(blob), "seconds_pack": round(t_pack, 1),
                             "seconds_unpack_and_check": round(t_unpack, 1), "layers": rows})
        print(f"# alexnet index_bits={bits or 'auto'}: {float_bytes / len(blob):.1f}x\n" + side_by_side(rows),
              file=sys.stderr)
    return out


def side_by_side(rows: list[dict]) -> str:
    lines = [format_rows(rows), "", "seed (Han et al. Table 4), same columns:"]
    for r in rows:
        s = r["seed"]
        if s["weights_pct"] is not None:
            lines.append(f"{r['paper_layer']:<22} {'':>10} {s['weights_pct']:>5}% {s['weight_bits_pq']:>5} "
                         f"{s['weight_bits_pqh']:>6} {s['index_bits_pq']:>5} {s['index_bits_pqh']:>6} "
                         f"{s['compress_pq_pct']:>6}% {s['compress_pqh_pct']:>6}%")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    ap.add_argument("--budgets", default="0.05,0.1")
    ap.add_argument("--skip-alexnet", action="store_true")
    args = ap.parse_args()
    doc = {"machine": machine(), "digits": digits_rows([float(b) for b in args.budgets.split(",")])}
    if not args.skip_alexnet:
        doc["alexnet"] = alexnet_rows()
    emit(doc, args.out)


if __name__ == "__main__":
    np.set_printoptions(precision=4)
    main()
