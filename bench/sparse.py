"""Sparse EP through ONNX Runtime: layer shapes and whole models, prints JSON.

    python bench/sparse.py --out bench/results/sparse.json            # everything (~15 min)
    python bench/sparse.py --quick                                    # a smoke subset

Kernel level: one-op models on real layer shapes (VGG-16 fc6/fc7, ResNet-50 3x3 and 1x1
convs, the 1024x8210 Gemm of ddddocr_common), weights with exactly s% zeros at random
positions (what magnitude pruning of a trained layer looks like to a kernel), batch 1/8/32,
ORT intra-op threads 1 then 2. Three contenders run round-robin in the same loop, medians:
ORT's dense CPU kernel (MLAS), our EP (runtime.session, min_sparsity=0), and ORT's contrib
SparseToDenseMatMul (FC shapes, batch 1, one thread only: it takes the sparse matrix as a graph
input, so a Conv would need an im2col outside ORT, and it needs seconds per run on fc6). End to end: VGG-16 and ResNet-50 from
onnxslim_cnn.models.reference after the `sparsify` pass at 80 % and 90 %, batch 1.
Raw-kernel numbers without ORT are bench/sparse_kernels.py's job.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
from onnx import TensorProto
from onnx import helper as h
from onnx import numpy_helper as nh

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import emit, machine  # noqa: E402

from onnxslim_cnn import runtime  # noqa: E402

FC = {"vgg16_fc6": (25088, 4096), "vgg16_fc7": (4096, 4096), "ddddocr_fc_1024x8210": (1024, 8210)}
# (in channels, out channels, kernel, feature map, stride): ResNet-50 bottleneck layers
CONV = {"resnet50_layer2_3x3": (128, 128, 3, 28, 1), "resnet50_layer3_3x3": (256, 256, 3, 14, 1),
        "resnet50_layer1_1x1": (256, 64, 1, 56, 1), "resnet50_layer3_1x1": (1024, 256, 1, 14, 1),
        "resnet50_layer4_3x3": (512, 512, 3, 7, 1), "resnet50_layer2_3x3_s2": (128, 128, 3, 56, 2),
        # the VGG-16 3x3 convs (stride 1, pad 1) that lost with the explicit im2col
        "vgg16_conv1_2": (64, 64, 3, 224, 1), "vgg16_conv2_2": (128, 128, 3, 112, 1),
        "vgg16_conv3_2": (256, 256, 3, 56, 1), "vgg16_conv4_2": (512, 512, 3, 28, 1),
        "vgg16_conv5_2": (512, 512, 3, 14, 1)}
# Feature maps of 56x56 and up at batch 32 take seconds per dense run: batch 1 (and 8) only there.
BIG_MAP = 56
SPARSITIES = [0.5, 0.6, 0.7, 0.8, 0.9, 0.95]
BATCHES = [1, 8, 32]
BUDGET_S = 0.5  # wall time per contender per measurement; repeats = budget / one run, 3..15
SLOW_S = 1.0  # slower than this: one timed run only (layers)
MODEL_BUDGET_S = 6.0  # whole models: their time varies more run to run, so more repeats


def sparse_weight(rng, shape, sparsity):
    w = rng.standard_normal(shape).astype(np.float32)
    flat = w.reshape(-1)
    flat[rng.permutation(flat.size)[: int(round(sparsity * flat.size))]] = 0.0
    return w


def model_bytes(nodes, inputs, outputs, inits, extra_opsets=()):
    graph = h.make_graph(nodes, "bench", inputs, outputs, inits)
    model = h.make_model(graph, opset_imports=[h.make_opsetid("", 17), *extra_opsets])
    model.ir_version = 8
    return model.SerializeToString()


def fc_model(w, bias):
    n, k = w.shape
    return model_bytes([h.make_node("Gemm", ["x", "W", "B"], ["y"], transB=1)],
                       [h.make_tensor_value_info("x", TensorProto.FLOAT, ["N", k])],
                       [h.make_tensor_value_info("y", TensorProto.FLOAT, ["N", n])],
                       [nh.from_array(w, "W"), nh.from_array(bias, "B")])


def conv_model(w, bias, stride, hw):
    oc, c, k, _ = w.shape
    return model_bytes([h.make_node("Conv", ["x", "W", "B"], ["y"], pads=[k // 2] * 4, strides=[stride] * 2)],
                       [h.make_tensor_value_info("x", TensorProto.FLOAT, ["N", c, hw, hw])],
                       [h.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                       [nh.from_array(w, "W"), nh.from_array(bias, "B")])


def sparse_to_dense_model(n, k):
    return model_bytes([h.make_node("SparseToDenseMatMul", ["A", "X"], ["y"], domain="com.microsoft")],
                       [h.make_sparse_tensor_value_info("A", TensorProto.FLOAT, [n, k]),
                        h.make_tensor_value_info("X", TensorProto.FLOAT, [k, "N"])],
                       [h.make_tensor_value_info("y", TensorProto.FLOAT, [n, "N"])], [],
                       [h.make_opsetid("com.microsoft", 1)])


def options(threads):
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    return so


def dense_session(model, threads):
    return ort.InferenceSession(model, options(threads), providers=["CPUExecutionProvider"])


def round_robin(runs: dict, budget: float = BUDGET_S) -> dict:
    """Median ms of each zero-argument callable, alternating them so load drift hits all alike.

    A contender whose single run exceeds SLOW_S is timed once (reported as such): ORT's
    SparseToDenseMatMul takes seconds on the big FC layers and would dominate the bench time.
    """
    one = {}
    for name, fn in runs.items():
        fn()  # warm-up (first-run allocations)
        t = time.perf_counter()
        fn()
        one[name] = time.perf_counter() - t
    timed = [n for n in runs if one[n] <= SLOW_S or budget > BUDGET_S]
    repeats = int(min(15, max(3, budget / max([one[n] for n in timed] or [1.0]))))
    times = {name: [] for name in timed}
    for _ in range(repeats):
        for name in timed:
            t = time.perf_counter()
            runs[name]()
            times[name].append((time.perf_counter() - t) * 1e3)
    out = {name: round(statistics.median(v), 4) for name, v in times.items()}
    out.update({name: round(one[name] * 1e3, 4) for name in runs if name not in out})
    return out


def csr_value(w):
    rows, cols = np.nonzero(w)
    ptr = np.concatenate([[0], np.cumsum(np.bincount(rows, minlength=w.shape[0]))]).astype(np.int64)
    st = ort.SparseTensor.sparse_csr_from_numpy(np.array(w.shape, dtype=np.int64), w[rows, cols],
                                                cols.astype(np.int64), ptr, ort.OrtDevice.make("cpu", 0))
    return ort.OrtValue.ort_value_from_sparse_tensor(st)


def bench_layers(names, sparsities, batches, threads_list, rng, log, fmt="auto"):
    rows = []
    for name in names:
        is_fc = name in FC
        if is_fc:
            k, n = FC[name]
            shape = (n, k)
        else:
            c, oc, kk, hw, stride = CONV[name]
            shape = (oc, c, kk, kk)
        bias = rng.standard_normal(shape[0]).astype(np.float32)
        for sparsity in sparsities:
            w = sparse_weight(rng, shape, sparsity)
            model = fc_model(w, bias) if is_fc else conv_model(w, bias, stride, hw)
            a_value = csr_value(w) if is_fc else None
            std_model = sparse_to_dense_model(*shape) if is_fc else None
            for threads in threads_list:
                dense = dense_session(model, threads)
                ours = runtime.session(model, min_sparsity=0.0, sess_options=options(threads), format=fmt)
                # format auto: a layer the kernels' cost model would run densely stays with ORT
                claimed = bool(runtime.claimed_nodes(ours))
                std = dense_session(std_model, threads) if is_fc else None
                for batch in batches:
                    if not is_fc and hw >= BIG_MAP and batch > (8 if hw == BIG_MAP else 1):
                        continue
                    x = rng.standard_normal((batch, shape[1]) if is_fc else (batch, shape[1], hw, hw)).astype(np.float32)
                    runs = {"ort_dense": lambda: dense.run(None, {"x": x}), "sparse_ep": lambda: ours.run(None, {"x": x})}
                    if is_fc and batch == 1 and threads == 1:  # seconds per run elsewhere (see docstring)
                        xt = ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(x.T))
                        runs["ort_sparse_to_dense_matmul"] = lambda: std.run_with_ort_values(["y"], {"A": a_value, "X": xt})
                    ms = round_robin(runs)
                    row = {"layer": name, "shape": list(shape), "sparsity": sparsity, "batch": batch,
                           "threads": threads, "claimed": claimed, "format": fmt, "ms": ms,
                           "speedup_vs_dense": round(ms["ort_dense"] / ms["sparse_ep"], 3)}
                    if "ort_sparse_to_dense_matmul" in ms:
                        row["sparse_to_dense_matmul_vs_dense"] = round(ms["ort_dense"] / ms["ort_sparse_to_dense_matmul"], 3)
                    log(row)
                    rows.append(row)
                dense = ours = std = None  # free the big sessions before the next ones
    return rows


def break_even(rows):
    """Per layer/batch/threads: the lowest measured sparsity from which the EP beats dense."""
    out = {}
    for row in rows:
        key = f"{row['layer']}|batch{row['batch']}|threads{row['threads']}"
        out.setdefault(key, [])
        out[key].append((row["sparsity"], row["speedup_vs_dense"]))
    result = {}
    for key, points in out.items():
        points.sort()
        winning = [s for i, (s, _) in enumerate(points) if all(sp >= 1.0 for _, sp in points[i:])]
        result[key] = winning[0] if winning else None
    return result


def bench_models(names, ratios, threads_list, rng, log, scope="global", min_sparsity=None):
    from onnxslim_cnn.models.reference import build

    import onnxslim_cnn

    rows = []
    for name in names:
        base = build(name)
        dims = [d.dim_value or 1 for d in base.graph.input[0].type.tensor_type.shape.dim]  # batch 1
        x = rng.standard_normal(dims).astype(np.float32)
        feed_name = base.graph.input[0].name
        for ratio in ratios:
            pruned, _ = onnxslim_cnn.compress(base, passes=["sparsify"], calib="random", fidelity=False,
                                              options={"sparsify": {"ratio": ratio, "scope": scope}})
            data = pruned.SerializeToString()
            for threads in threads_list:
                dense = dense_session(data, threads)
                ours = runtime.session(data, sess_options=options(threads), min_sparsity=min_sparsity)
                claimed = runtime.claimed_nodes(ours)
                got, ref = ours.run(None, {feed_name: x})[0], dense.run(None, {feed_name: x})[0]
                ms = round_robin({"ort_dense": lambda: dense.run(None, {feed_name: x}),
                                  "sparse_ep": lambda: ours.run(None, {feed_name: x})}, budget=MODEL_BUDGET_S)
                row = {"model": name, "sparsify_ratio": ratio, "sparsify_scope": scope, "batch": x.shape[0], "threads": threads,
                       "min_sparsity": min_sparsity if min_sparsity is not None else runtime.DEFAULT_MIN_SPARSITY, "ms": ms,
                       "speedup_vs_dense": round(ms["ort_dense"] / ms["sparse_ep"], 3),
                       "claimed_nodes": len(claimed),
                       "claimed_ops": sorted({n["op_type"] for n in claimed}),
                       "max_rel_diff": float(np.abs(got - ref).max() / max(np.abs(ref).max(), 1e-30))}
                log(row)
                rows.append(row)
                dense = ours = None
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", help="also write the JSON here")
    p.add_argument("--quick", action="store_true", help="small subset (smoke test of the script)")
    p.add_argument("--layers", help="comma-separated layer names (default: all; '' = none)")
    p.add_argument("--models", default="vgg16,resnet50", help="comma-separated reference models ('' = none)")
    p.add_argument("--threads", default="1,2")
    p.add_argument("--scope", default="global", choices=["global", "layer"],
                   help="sparsify scope for the end-to-end models (global = one magnitude threshold)")
    p.add_argument("--ratios", default="0.8,0.9", help="sparsify ratios for the end-to-end models")
    p.add_argument("--sparsities", help="comma-separated layer sparsities (default 0.5..0.95)")
    p.add_argument("--batches", help="comma-separated layer batches (default 1,8,32)")
    p.add_argument("--format", default="auto", help="EP format for the layers (csr: claim every layer, "
                   "to time the sparse kernels where the cost model would decline them)")
    p.add_argument("--min-sparsity", type=float, help="EP min_sparsity for the models (default: the EP's)")
    args = p.parse_args(argv)
    reason = runtime.unavailable_reason()
    if reason:
        sys.exit(f"sparse EP unavailable: {reason}")
    rng = np.random.default_rng(0)
    threads_list = [int(t) for t in args.threads.split(",")]
    layers = [n for n in args.layers.split(",") if n] if args.layers is not None else [*FC, *CONV]
    sparsities, batches, models = SPARSITIES, BATCHES, [m for m in args.models.split(",") if m]
    if args.sparsities:
        sparsities = [float(v) for v in args.sparsities.split(",")]
    if args.batches:
        batches = [int(v) for v in args.batches.split(",")]
    if args.quick:
        layers, sparsities, batches, models = ["vgg16_fc7", "resnet50_layer3_3x3"], [0.5, 0.9], [1, 8], []
    log = lambda row: print(row, file=sys.stderr, flush=True)  # noqa: E731
    from onnxslim_cnn.runtime.loader import library_path

    layer_rows = bench_layers(layers, sparsities, batches, threads_list, rng, log, args.format)
    model_rows = bench_models(models, [float(r) for r in args.ratios.split(",")], threads_list, rng, log, args.scope,
                              args.min_sparsity)
    isa = None
    try:
        import ctypes

        lib = ctypes.CDLL(str(library_path()))
        lib.onnxslim_sparse_isa.restype = ctypes.c_char_p
        isa = lib.onnxslim_sparse_isa().decode()
    except (OSError, AttributeError):
        pass
    emit({"machine": machine(ort_threads=threads_list, kernel_isa=isa), "layers": layer_rows,
          "break_even_sparsity": break_even(layer_rows), "models": model_rows}, args.out)


if __name__ == "__main__":
    main()
