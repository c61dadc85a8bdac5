"""Formats that follow the product width at run time (EP option max_formats), prints JSON.

    python bench/sparse_formats.py --out bench/results_sparse_formats.json

The FC layers of bench/sparse.py (same weights: exactly s % zeros at random positions, a
dynamic batch axis, so the claim is made for batch 1) at 50-70 % zeros, fed batch 1, 8 and 32,
one ORT thread. Three contenders in one round-robin loop, medians: ORT's dense CPU kernel, the
EP with max_formats=1 (the format chosen for the declared batch runs every batch: the old
behaviour) and with max_formats=2 (the default: each of the cost model's regimes N = 1, 2..8,
> 8 runs its own pick, at most two formats held). Also the bytes each holds (EP log).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import sparse as layer_bench  # noqa: E402  (bench/sparse.py: same models, same timing loop)
from _common import emit, machine  # noqa: E402

from onnxslim_cnn import runtime  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", help="also write the JSON here")
    p.add_argument("--layers", default="vgg16_fc6,vgg16_fc7,ddddocr_fc_1024x8210")
    p.add_argument("--sparsities", default="0.5,0.6,0.7")
    p.add_argument("--batches", default="1,8,32")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--budget", type=float, default=layer_bench.BUDGET_S,
                   help="seconds per contender per row (more = more repeats, at most 15)")
    args = p.parse_args(argv)
    reason = runtime.unavailable_reason()
    if reason:
        sys.exit(f"sparse EP unavailable: {reason}")
    rng = np.random.default_rng(0)
    rows = []
    for name in [n for n in args.layers.split(",") if n]:
        k, n_out = layer_bench.FC[name]
        bias = rng.standard_normal(n_out).astype(np.float32)
        for sparsity in [float(s) for s in args.sparsities.split(",")]:
            model = layer_bench.fc_model(layer_bench.sparse_weight(rng, (n_out, k), sparsity), bias)
            so = layer_bench.options(args.threads)
            sessions = {"ort_dense": layer_bench.dense_session(model, args.threads),
                        "ep_max_formats_1": runtime.session(model, min_sparsity=0.0, sess_options=so, max_formats=1),
                        "ep_max_formats_2": runtime.session(model, min_sparsity=0.0, sess_options=so, max_formats=2)}
            claimed = {k2: bool(runtime.claimed_nodes(s)) for k2, s in sessions.items() if k2 != "ort_dense"}
            for batch in [int(b) for b in args.batches.split(",")]:
                x = rng.standard_normal((batch, k)).astype(np.float32)
                runs = {k2: (lambda s: lambda: s.run(None, {"x": x}))(s) for k2, s in sessions.items()}
                ms = layer_bench.round_robin(runs, args.budget)
                row = {"layer": name, "sparsity": sparsity, "batch": batch, "threads": args.threads,
                       "claimed": claimed, "ms": ms,
                       "speedup_vs_dense": {k2: round(ms["ort_dense"] / ms[k2], 3) for k2 in ms if k2 != "ort_dense"}}
                print(row, file=sys.stderr, flush=True)
                rows.append(row)
            sessions = None
    emit({"machine": machine(ort_threads=[args.threads]), "rows": rows}, args.out)


if __name__ == "__main__":
    main()
