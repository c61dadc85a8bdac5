"""``svd`` on the PP-OCRv4 recogniser's 120x6625 output layer (a near-full-rank head), as JSON.

Character error rate (CER) of the real model (``models/fetch ppocrv4_rec``) on the rendered
text lines of ``models.tasks`` after factorising only the head, plain and data-aware, and with
the rank chosen by ``max_output_error`` or ``energy``. Calibration: 16 rendered lines drawn
with other seeds than the evaluation lines (``tasks.sample_inputs``).

    python bench/svd_ocr_head.py
"""

from __future__ import annotations

import json

import onnxslim_cnn
from onnxslim_cnn.models import corpus, tasks

HEAD = "p2o.MatMul.24"  # MatMul 120 -> 6625 before the CTC softmax
RUNS = [{"rank": 96}, {"rank": 96, "data_aware": True}, {"rank": 64}, {"rank": 64, "data_aware": True},
        {"rank": 32, "data_aware": True}, {"energy": 0.9}, {"max_output_error": 0.05},
        {"max_output_error": 0.02}]


def main() -> None:
    path = str(corpus.require("ppocrv4_rec"))
    calib = tasks.sample_inputs("ppocrv4_rec", n=16)
    ref = tasks.evaluate("ppocrv4_rec")
    rows = []
    for opts in RUNS:
        model, report = onnxslim_cnn.compress(path, passes=["svd"], calib=calib, fidelity=False,
                                              options={"svd": {**opts, "layers": [HEAD], "measure_error": True}})
        record = report.passes[0]
        res = tasks.evaluate("ppocrv4_rec", model)
        rows.append({"options": opts, "cer": round(res["cer"], 4), "exact_lines": res["exact"],
                     "factorised": [{k: c.get(k) for k in ("rank", "output_error", "kept_energy", "params_after")}
                                    for c in record.changes],
                     "skipped": [s["reason"] for s in record.skipped]})
    print(json.dumps({"model": "ppocrv4_rec", "layer": HEAD, "m": 120, "n": 6625,
                      "reference": {"cer": ref["cer"], "exact_lines": ref["exact"], "lines": ref["n"],
                                    "chars": ref["chars"]}, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
