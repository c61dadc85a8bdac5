"""``onnxslim bench IN.onnx [--sparse-ep]``: ORT CPU latency, with and without the sparse EP.

Both sessions run in one loop, alternating, and report medians, so their ratio is fair on a
busy machine; the outputs are compared too, and the nodes the sparse EP took are listed.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import numpy as np

from onnxslim_cnn.errors import UserError

PROG = "onnxslim bench"


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> "None":
        raise UserError(f"{message} (see {self.prog} --help)")


def build_parser() -> argparse.ArgumentParser:
    from onnxslim_cnn.runtime import DEFAULT_MIN_SPARSITY

    p = _Parser(prog=PROG, description="Measure ONNX Runtime CPU latency of a model (median of alternating runs).")
    p.add_argument("input", help="ONNX model (never modified)")
    p.add_argument("--sparse-ep", action="store_true",
                   help="also run it with the sparse execution provider and compare")
    p.add_argument("--min-sparsity", type=float, default=None,
                   help=f"share of zeros from which the sparse EP takes a layer (default {DEFAULT_MIN_SPARSITY})")
    p.add_argument("--threads", type=int, default=1, help="ORT intra-op threads (default 1)")
    p.add_argument("--batch", type=int, default=1, help="samples per run for a dynamic batch axis (default 1)")
    p.add_argument("--input-shape", dest="input_shapes", action="append", default=[], metavar="NAME=D0,D1,...",
                   help="concrete shape for an input with dynamic dims")
    p.add_argument("--repeats", type=int, default=20, help="timed runs per session (default 20)")
    p.add_argument("--json", dest="json_path", help="also write the result as JSON to this file")
    return p


def _medians(runs: dict, repeats: int) -> dict:
    for fn in runs.values():
        fn()
        fn()
    times = {name: [] for name in runs}
    for _ in range(repeats):
        for name, fn in runs.items():
            t0 = time.perf_counter()
            fn()
            times[name].append((time.perf_counter() - t0) * 1e3)
    return {name: round(statistics.median(v), 4) for name, v in times.items()}


def bench(path: str, *, sparse_ep: bool = False, min_sparsity: "float | None" = None, threads: int = 1,
          batch: int = 1, input_shapes: "dict | None" = None, repeats: int = 20) -> dict:
    import onnxruntime as ort

    import onnxslim_cnn
    from onnxslim_cnn.analysis.calibration import random_inputs

    if threads < 1 or batch < 1 or repeats < 1:
        raise UserError("--threads, --batch and --repeats must be at least 1")
    model = onnxslim_cnn.load(path)
    calib = random_inputs(model, samples=batch, input_shapes=input_shapes)
    feeds = {k: v[:calib.batch] for k, v in calib.inputs.items()}
    data = model.SerializeToString()
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    try:  # ORT's own exception types: an op or a type it cannot run is the model's problem
        dense = ort.InferenceSession(data, so, providers=["CPUExecutionProvider"])
        ref = dense.run(None, feeds)
    except Exception as exc:
        raise UserError(f"onnxruntime cannot run {path}: {exc}") from exc
    runs = {"ort_cpu": lambda: dense.run(None, feeds)}
    result = {"model": str(path), "threads": threads, "batch": calib.batch, "repeats": repeats,
              "onnxruntime": ort.__version__}
    if sparse_ep:
        from onnxslim_cnn import runtime

        sparse = runtime.session(data, min_sparsity=min_sparsity, sess_options=so)
        claimed = runtime.claimed_nodes(sparse)
        try:
            got = sparse.run(None, feeds)
        except Exception as exc:
            raise UserError(f"the sparse execution provider cannot run {path}: {exc}") from exc
        diff = max((float(np.abs(g - r).max()) / max(float(np.abs(r).max()), 1e-30) for g, r in zip(got, ref)
                    if np.issubdtype(np.asarray(r).dtype, np.floating)), default=0.0)
        runs["sparse_ep"] = lambda: sparse.run(None, feeds)
        result.update(min_sparsity=runtime.DEFAULT_MIN_SPARSITY if min_sparsity is None else min_sparsity,
                      claimed_nodes=claimed, max_rel_diff=diff)
    result["median_ms"] = _medians(runs, repeats)
    if sparse_ep:
        ms = result["median_ms"]
        result["speedup"] = round(ms["ort_cpu"] / ms["sparse_ep"], 3)
    return result


def format_result(r: dict) -> str:
    lines = [f"{r['model']}: batch {r['batch']}, {r['threads']} thread(s), median of {r['repeats']} runs",
             f"  ORT CPU EP         {r['median_ms']['ort_cpu']:10.3f} ms"]
    if "sparse_ep" in r["median_ms"]:
        ops = ", ".join(sorted({n["op_type"] for n in r["claimed_nodes"]})) or "none"
        lines += [f"  with the sparse EP {r['median_ms']['sparse_ep']:10.3f} ms   x{r['speedup']:.2f}",
                  f"  sparse EP took {len(r['claimed_nodes'])} nodes ({ops}) at min_sparsity {r['min_sparsity']}; "
                  f"max relative output difference {r['max_rel_diff']:.2e}"]
    return "\n".join(lines)


def main(argv: "list[str]") -> int:
    from onnxslim_cnn.analysis.calibration import parse_input_shapes

    args = build_parser().parse_args(argv)
    result = bench(args.input, sparse_ep=args.sparse_ep, min_sparsity=args.min_sparsity, threads=args.threads,
                   batch=args.batch, input_shapes=parse_input_shapes(args.input_shapes), repeats=args.repeats)
    print(format_result(result))
    if args.json_path:
        from onnxslim_cnn.files import write_atomic

        write_atomic(args.json_path, json.dumps(result, indent=2).encode())
    sys.stdout.flush()
    return 0
