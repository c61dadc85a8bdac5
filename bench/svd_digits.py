"""Accuracy study of ``svd`` on the digits VGG fixture: top-1 vs FC rank, printed as JSON.

For ranks 4..128 applied to the three FC layers (1024->256, 256->256, 256->10), three methods:
- ``naive``: plain numpy (``np.linalg.svd``, keep the top k, write back the reconstructed W)
  — the same function as a rank-k bottleneck, without the two-node rewrite;
- ``svd``: the pass, weight-space SVD;
- ``svd_data_aware``: the pass with ``data_aware=true`` (calibration: a train-split subset),
  each layer whitened by the inputs it sees once the layers before it are factorised
  (``sequential=true``, the default);
- ``svd_data_aware_original_inputs``: the same with ``sequential=false``: every layer whitened
  by the original model's activations.
A layer is only truncated where k < mn/(m+n), as the pass does (256->10 stops at k = 9 and
256->256 at k = 127); ``layers_factorised`` says which were. Accuracy is measured on the test
split (450 images), never on the calibration images.

    python bench/svd_digits.py [--calib-samples 512] [--ranks 4,8,16,32,64,128]
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import onnx
from onnx import numpy_helper

import onnxslim_cnn
from onnxslim_cnn.models import digits
from onnxslim_cnn.passes.factor import factorize as fz

FCS = ("classifier.0", "classifier.3", "classifier.6")


def naive(model: onnx.ModelProto, k: int) -> tuple[onnx.ModelProto, list[str]]:
    """Each FC weight replaced by its rank-k truncated SVD reconstruction (numpy, nothing else)."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    weights = {n.input[1]: n.name for n in out.graph.node if n.name in FCS}
    done = []
    for t in out.graph.initializer:
        if t.name in weights:
            W = numpy_helper.to_array(t).astype(np.float64)
            if k > fz.max_useful_rank(*W.shape):
                continue
            U, s, Vt = np.linalg.svd(W, full_matrices=False)
            t.CopyFrom(numpy_helper.from_array(((U[:, :k] * s[:k]) @ Vt[:k]).astype(np.float32), t.name))
            done.append(weights[t.name])
    return out, done


def run_pass(model: onnx.ModelProto, calib: dict, **opts) -> tuple[onnx.ModelProto, dict, float]:
    t0 = time.perf_counter()
    new, report = onnxslim_cnn.compress(model, passes=["svd"], calib=calib, fidelity=False,
                                        options={"svd": {"min_params": 0, "measure_error": True, **opts}})
    layers = {c["item"]: {"output_error": c["output_error"], "kept_energy": c["kept_energy"]}
              for c in report.passes[0].changes}
    return new, layers, time.perf_counter() - t0


def _params(model: onnx.ModelProto) -> int:
    return int(sum(int(np.prod(t.dims)) for t in model.graph.initializer))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--calib-samples", type=int, default=512)
    ap.add_argument("--ranks", default="4,8,16,32,64,128")
    ap.add_argument("--ridge", type=float, default=1e-4)
    args = ap.parse_args()
    ranks = [int(r) for r in args.ranks.split(",")]

    model = onnx.load(str(digits.fixture_path("digits_vgg")))
    x_train, _ = digits.load_split("train")
    # evenly spaced train images: deterministic, and all classes represented
    idx = np.linspace(0, len(x_train) - 1, min(args.calib_samples, len(x_train))).astype(np.int64)
    calib = {model.graph.input[0].name: x_train[idx]}
    rows = []
    for k in ranks:
        row: dict = {"rank": k}
        m, done = naive(model, k)
        row["naive"] = {"top1": digits.evaluate_top1(m), "layers_factorised": done}
        for key, opts in (("svd", {}),
                          ("svd_data_aware", {"data_aware": True, "ridge": args.ridge}),
                          ("svd_data_aware_original_inputs", {"data_aware": True, "ridge": args.ridge,
                                                              "sequential": False})):
            m, layers, secs = run_pass(model, calib, rank=k, **opts)
            row[key] = {"top1": digits.evaluate_top1(m), "layers": layers, "seconds": round(secs, 2),
                        "params": _params(m)}
        rows.append(row)
    print(json.dumps({
        "model": "digits_vgg", "reference_top1": digits.evaluate_top1(model),
        "params": _params(model),
        "calibration": f"{len(idx)} train images (evenly spaced)", "ridge": args.ridge,
        "test_images": len(digits.load_split("test")[0]), "rows": rows,
    }, indent=1))


if __name__ == "__main__":
    main()
