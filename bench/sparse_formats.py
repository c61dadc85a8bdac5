"""Batch widths the declared batch did not plan for (EP options max_formats, dense_fallback), JSON.

    python bench/sparse_formats.py --out bench/results/sparse_formats.json
    python bench/sparse_formats.py --compare dense_fallback --out bench/results/sparse_fallback.json

The FC layers of bench/sparse.py (same weights: exactly s % zeros at random positions, a
dynamic batch axis, so the claim is made for batch 1) at 50-70 % zeros, fed batch 1, 8 and 32,
one ORT thread. Three contenders in one round-robin loop, medians: ORT's dense CPU kernel and the
EP twice. --compare max_formats: max_formats=1 (the format chosen for the declared batch runs
every batch) vs 2 (each of the cost model's regimes N = 1, 2..8, > 8 runs its own pick, at most
two formats held), both with dense_fallback=off. --compare dense_fallback: dense_fallback=off
(the EP before the fallback existed) vs auto (the default: regimes where the cost model expects
ORT's MLAS to win run through it).
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
    p.add_argument("--compare", default="max_formats", choices=["max_formats", "dense_fallback"])
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
            settings = ({"ep_max_formats_1": dict(max_formats=1), "ep_max_formats_2": dict(max_formats=2)}
                        if args.compare == "max_formats" else
                        {"ep_dense_fallback_off": dict(dense_fallback="off"),
                         "ep_dense_fallback_auto": dict(dense_fallback="auto")})
            sessions = {"ort_dense": layer_bench.dense_session(model, args.threads)}
            for label, kw in settings.items():
                kw.setdefault("dense_fallback", "off")
                sessions[label] = runtime.session(model, min_sparsity=0.0, sess_options=so, **kw)
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
    emit({"machine": machine(ort_threads=[args.threads]), "compare": args.compare, "rows": rows}, args.out)


if __name__ == "__main__":
    main()
