"""Session creation with the sparse EP: wall time and peak memory, prints JSON.

    python bench/sparse_session.py --out bench/results/sparse_session.json

Each measurement runs in a fresh child process so one session's memory cannot hide another's:
the child imports onnxruntime and our runtime, resets the kernel's peak-RSS mark
(/proc/self/clear_refs), creates one session from a model file on disk and reports the time
that took and how far the peak RSS (VmHWM) rose above the RSS before it. Contenders: ORT's
plain CPU session (what the model costs without us) and runtime.session(min_sparsity=0.8).
Models: the VGG-16 fc6 layer (25088 -> 4096, 90 % random zeros) as Gemm(transB=1) (the
PyTorch export form, weight stored out x in) and as MatMul (weight stored in x out, the form
the EP has to transpose); `fc6_gemm_transB1_s50`: 50 % zeros, claimed with min_sparsity 0.5,
where the EP also holds ORT's dense kernel (dense_fallback) for batches > 1; VGG-16 end to end
after `sparsify` at 90 % (global). Medians of
--repeats children per contender, interleaved. `--baseline-library old.so` adds a third
contender, the same runtime.session with an older build of the EP library (before/after in one
run; build one from a commit's runtime/src with runtime/build_ep.py's build_library).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import emit, machine  # noqa: E402

CHILD = r"""
import json, sys, time
import onnxruntime as ort
from onnxslim_cnn import runtime
runtime.available()  # register the library before the measurement

def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
path, kind, min_sparsity = sys.argv[1], sys.argv[2], float(sys.argv[3])
so = ort.SessionOptions()
so.intra_op_num_threads = 1
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # peak RSS := current RSS
before = status("VmRSS")
t = time.perf_counter()
if kind == "ort_dense":  # sparse_ep_baseline: same as sparse_ep, the library comes from the environment
    sess = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
    claimed = 0
else:
    sess = runtime.session(path, sess_options=so, min_sparsity=min_sparsity)
    claimed = len(runtime.claimed_nodes(sess))
seconds = time.perf_counter() - t
print(json.dumps({"seconds": seconds, "peak_rise_bytes": status("VmHWM") - before,
                  "held_bytes": status("VmRSS") - before, "claimed_nodes": claimed}))
"""


def fc6_models(folder: Path, sparsity: float = 0.9, suffix: str = "") -> dict:
    import onnx
    from onnx import TensorProto
    from onnx import helper as h
    from onnx import numpy_helper as nh

    rng = np.random.default_rng(0)
    k, n = 25088, 4096
    w = rng.standard_normal((n, k)).astype(np.float32)
    w.reshape(-1)[rng.permutation(w.size)[: int(sparsity * w.size)]] = 0.0
    bias = rng.standard_normal(n).astype(np.float32)
    x = h.make_tensor_value_info("x", TensorProto.FLOAT, ["N", k])
    y = h.make_tensor_value_info("y", TensorProto.FLOAT, ["N", n])
    forms = {
        "fc6_gemm_transB1": ([h.make_node("Gemm", ["x", "W", "B"], ["y"], transB=1)], w),
        "fc6_matmul": ([h.make_node("MatMul", ["x", "W"], ["y"])], np.ascontiguousarray(w.T)),
    }
    paths = {}
    forms = {name + suffix: form for name, form in forms.items()}
    for name, (nodes, weight) in forms.items():
        inits = [nh.from_array(weight, "W")] + ([nh.from_array(bias, "B")] if len(nodes[0].input) > 2 else [])
        model = h.make_model(h.make_graph(nodes, name, [x], [y], inits), opset_imports=[h.make_opsetid("", 17)])
        model.ir_version = 8
        paths[name] = folder / f"{name}.onnx"
        onnx.save(model, paths[name])
    return paths


def vgg16_model(folder: Path) -> Path:
    import onnx

    import onnxslim_cnn
    from onnxslim_cnn.models.reference import build

    pruned, _ = onnxslim_cnn.compress(build("vgg16"), passes=["sparsify"], calib="random", fidelity=False,
                                      options={"sparsify": {"ratio": 0.9, "scope": "global"}})
    path = folder / "vgg16_sparsify90.onnx"
    onnx.save(pruned, path)
    return path


def measure(path: Path, kind: str, baseline: "str | None" = None, min_sparsity: float = 0.8) -> dict:
    env = dict(os.environ)
    if kind == "sparse_ep_baseline":
        env["ONNXSLIM_SPARSE_EP_LIBRARY"] = baseline
    out = subprocess.run([sys.executable, "-c", CHILD, str(path), kind, repr(min_sparsity)], capture_output=True,
                         text=True, env=env)
    if out.returncode != 0:
        raise RuntimeError(f"child failed on {path.name} / {kind}: {out.stderr.strip()[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", help="also write the JSON here")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--models", default="fc6_gemm_transB1,fc6_matmul,fc6_gemm_transB1_s50,vgg16")
    p.add_argument("--cache", help="folder to keep the generated models in (default: a temp folder)")
    p.add_argument("--baseline-library", help="an older _sparse_ep.so to compare with (third contender)")
    args = p.parse_args(argv)
    wanted = [m for m in args.models.split(",") if m]
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(args.cache or tmp)
        folder.mkdir(parents=True, exist_ok=True)
        paths = {}
        if any(m.startswith("fc6") and not m.endswith("_s50") for m in wanted):
            paths.update({k: v for k, v in fc6_models(folder).items() if k in wanted})
        if any(m.endswith("_s50") for m in wanted):  # claimed at min_sparsity 0.5: MLAS fallback for batch > 1
            paths.update({k: v for k, v in fc6_models(folder, 0.5, "_s50").items() if k in wanted})
        if "vgg16" in wanted:
            paths["vgg16"] = vgg16_model(folder)
        rows = []
        for name, path in paths.items():
            samples = {"ort_dense": [], "sparse_ep": []}
            if args.baseline_library:
                samples["sparse_ep_baseline"] = []
            for _ in range(args.repeats):
                for kind in samples:
                    samples[kind].append(measure(path, kind, args.baseline_library,
                                                 0.5 if name.endswith("_s50") else 0.8))
            row = {"model": name, "file_bytes": path.stat().st_size}
            for kind, runs in samples.items():
                row[kind] = {"seconds": round(statistics.median(r["seconds"] for r in runs), 3),
                             "peak_rise_mb": round(statistics.median(r["peak_rise_bytes"] for r in runs) / 2**20, 1),
                             "held_mb": round(statistics.median(r["held_bytes"] for r in runs) / 2**20, 1),
                             "claimed_nodes": runs[0]["claimed_nodes"]}
            print(row, file=sys.stderr, flush=True)
            rows.append(row)
    emit({"machine": machine(), "baseline_library": args.baseline_library, "method": "fresh child per sample, peak RSS mark reset before the session, "
          f"medians of {args.repeats}; min_sparsity 0.8 (0.5 for *_s50), format auto, 1 intra-op thread", "rows": rows}, args.out)


if __name__ == "__main__":
    main()
