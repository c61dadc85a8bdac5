"""Benchmark of the default pass `slim` against OnnxSlim on the same models in the same run.

Prints JSON: per model, nodes before/after for us and for OnnxSlim, parameters, fidelity of
both against the original (ONNX Runtime, same inputs), task quality where the model has a task
(digits top-1, the corpus models' rendered-input metrics), ORT CPU latency (1 thread, median),
and the time our whole pipeline took (load, pass, checks, fidelity) next to OnnxSlim's time.

    python bench/slim.py                      # reference models at full size + digits + corpus
    python bench/slim.py --models resnet50,ddddocr_det --out slim.json
    python bench/slim.py --reduced            # reference models at width 0.25, 64x64 (quick)
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np
import onnx

import onnxslim_cnn
from _common import emit, machine  # bench/ is on sys.path when a script here runs
from onnxslim_cnn.analysis import calibration
from onnxslim_cnn.analysis.fidelity import fidelity, latency, reference_outputs
from onnxslim_cnn.models import corpus, digits, reference


def _summary(fid: dict) -> dict:
    vals = [f for f in fid.values() if "error" not in f]
    out = {"max_rel_error": max((f["rel_error"] for f in vals), default=None),
           "min_cosine": min((f["cosine"] for f in vals), default=None)}
    top1 = [f["top1_agreement"] for f in vals if "top1_agreement" in f]
    if top1:
        out["top1_agreement"] = min(top1)
    errors = [f["error"] for f in fid.values() if "error" in f]
    if errors:
        out["errors"] = errors
    return out


def models_to_run(names: "list[str] | None", reduced: bool):
    size = {"width": 0.25, "input_size": 64} if reduced else {"width": 1.0, "input_size": 224}
    for name in sorted(reference.REFERENCE_MODELS):
        if not names or name in names:
            yield name, "reference", (lambda n=name: reference.build(n, **size)), None
    for name in digits.FIXTURES:
        if not names or name in names:
            x, _ = digits.load_split("test")
            yield name, "digits", (lambda n=name: onnx.load(digits.fixture_path(n))), {"input": x[:64]}
    wanted = [m for m in corpus.IDS if not names or m in names]
    if wanted:
        try:
            paths = corpus.fetch(wanted, quiet=True)
        except corpus.CorpusUnavailable as exc:
            print(f"bench: corpus unavailable, skipped: {exc}", file=sys.stderr)
            return
        from onnxslim_cnn.models import tasks

        for mid in wanted:
            yield mid, "corpus", (lambda p=paths[mid]: onnx.load(p)), tasks.sample_inputs(mid, 4)


def task_quality(kind: str, name: str, model: onnx.ModelProto) -> "dict | None":
    if kind == "digits":
        return {"top1": digits.evaluate_top1(model)}
    if kind == "corpus":
        from onnxslim_cnn.models import tasks

        res = tasks.evaluate(name, model)
        return {k: v for k, v in res.items() if isinstance(v, (int, float, str))}
    return None


def bench_one(name: str, kind: str, build, calib_arrays, repeats: int) -> dict:
    import onnxslim

    model = build()
    calib = (calibration.random_inputs(model, samples=8) if calib_arrays is None
             else _calib_from(model, calib_arrays))
    t0 = time.perf_counter()
    ours, report = onnxslim_cnn.compress(model, calib=calib)
    ours_seconds = time.perf_counter() - t0
    entry = {
        "model": name, "kind": kind,
        "nodes_before": report.input.nodes, "params_before": report.input.params,
        "file_bytes_before": report.input.file_bytes, "macs": report.input.macs,
        "ours": {"nodes": report.output.nodes, "params": report.output.params,
                 "file_bytes": report.output.file_bytes, "pipeline_seconds": round(ours_seconds, 3),
                 "pass_seconds": round(report.passes[0].seconds, 3), "status": report.passes[0].status,
                 "fidelity": _summary(report.fidelity), "changes": report.passes[0].stats},
    }
    ref = reference_outputs(model, calib)
    t0 = time.perf_counter()
    try:
        theirs = onnxslim.slim(model)
        their_seconds = time.perf_counter() - t0
        entry["onnxslim"] = {"nodes": len(theirs.graph.node), "seconds": round(their_seconds, 3),
                             "params": _params(theirs), "fidelity": _summary(fidelity(model, theirs, calib, ref))}
    except Exception as exc:  # report the peer's failure instead of dying
        theirs = None
        entry["onnxslim"] = {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"}
    entry["nodes_ours_minus_onnxslim"] = (entry["ours"]["nodes"] - entry["onnxslim"]["nodes"]
                                         if "nodes" in entry["onnxslim"] else None)
    if repeats:
        entry["latency_ms"] = {"before": latency(model, calib, repeats=repeats)["median_ms"],
                               "ours": latency(ours, calib, repeats=repeats)["median_ms"]}
        if theirs is not None:
            try:
                entry["latency_ms"]["onnxslim"] = latency(theirs, calib, repeats=repeats)["median_ms"]
            except Exception as exc:
                entry["latency_ms"]["onnxslim"] = f"failed: {str(exc).splitlines()[0][:120]}"
    quality = task_quality(kind, name, model)
    if quality is not None:
        entry["task"] = {"before": quality, "ours": task_quality(kind, name, ours)}
        if theirs is not None:
            try:
                entry["task"]["onnxslim"] = task_quality(kind, name, theirs)
            except Exception as exc:
                entry["task"]["onnxslim"] = f"failed: {str(exc).splitlines()[0][:120]}"
    return entry


def _params(model: onnx.ModelProto) -> int:
    from onnxslim_cnn.analysis.cost import count_params

    return count_params(model)


def _calib_from(model: onnx.ModelProto, arrays: dict) -> calibration.CalibrationData:
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "calib.npz")
        np.savez(path, **arrays)
        data = calibration.load_npz(path, model)
    data.source = "task sample inputs"
    return data


def main(argv: "list[str] | None" = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", help="comma-separated subset (reference names, digits fixtures, corpus ids)")
    ap.add_argument("--reduced", action="store_true", help="reference models at width 0.25, 64x64")
    ap.add_argument("--repeats", type=int, default=10, help="latency repeats (0: skip latency)")
    ap.add_argument("--out", help="also write the JSON here")
    args = ap.parse_args(argv)
    names = args.models.split(",") if args.models else None
    results = []
    for name, kind, build, calib_arrays in models_to_run(names, args.reduced):
        print(f"bench: {name} ...", file=sys.stderr, flush=True)
        results.append(bench_one(name, kind, build, calib_arrays, args.repeats))
    compared = [r for r in results if r["nodes_ours_minus_onnxslim"] is not None]
    doc = {
        "bench": "slim", "machine": machine(onnxslim=__import__("onnxslim").__version__), "reduced": args.reduced, "models": results,
        "summary": {
            "models": len(results),
            "ours_fewer_or_equal_nodes": sum(r["nodes_ours_minus_onnxslim"] <= 0 for r in compared),
            "ours_more_nodes": [r["model"] for r in compared if r["nodes_ours_minus_onnxslim"] > 0],
            "max_rel_error_ours": max((r["ours"]["fidelity"]["max_rel_error"] or 0) for r in results) if results else None,
        },
    }
    emit(doc, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
