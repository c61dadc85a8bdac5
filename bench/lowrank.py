"""Benchmark of the low-rank passes. Prints JSON, one key per section.

Sections (``--sections``, comma-separated; default all):

* ``resnet18``: full-size ResNet-18 (``reference.build("resnet18")``, seeded weights), ``slim``
  first so BN is folded, then ``lowrank speedup=2`` plain and data-aware: MACs and params
  before/after, ORT CPU latency (1 thread, median of ``--repeats`` >= 10 runs, batch 1 and 8),
  fidelity against the original (cosine, error relative to the output scale) on held-out inputs,
  and per split layer the one-conv model timed alone against its two-conv replacement, to show
  honestly where fewer MACs do not mean less time in ORT.
* ``digits``: the trained ``digits_resnet`` fixture: test top-1 after ``lowrank`` at energy
  0.9 / 0.95 and speedup 2, plain vs data-aware (calibrated on training images, never test).

* ``svd``: VGG-16 and AlexNet (full size, after ``slim``), ``svd`` on the FC layers at energy 0.9
  and at rank 256: params, fidelity on held-out random inputs, latency at batch 1 and 8, pass time.

    python bench/lowrank.py                       # all sections
    python bench/lowrank.py --sections digits --out /tmp/lowrank.json
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np
import onnx
from onnx import helper as h
from onnx import numpy_helper as nh

import onnxslim_cnn
from _common import emit, machine  # bench/ is on sys.path when a script here runs
from onnxslim_cnn.analysis import calibration
from onnxslim_cnn.analysis.fidelity import fidelity
from onnxslim_cnn.sessions import make_session
from onnxslim_cnn.models import digits, reference


def median_ms(models: list, feeds: dict, repeats: int, warmup: int = 3) -> list:
    """Median wall time (ms) of one ORT run per model, CPU EP, 1 thread, graph optimisations on.

    The models run in turn within each repeat, so a load change on a shared machine hits them
    alike and the ratios stay meaningful even when the absolute times drift.
    """
    sessions = [make_session(m, threads=1) for m in models]
    for sess in sessions:
        for _ in range(warmup):
            sess.run(None, feeds)
    times = [[] for _ in sessions]
    for _ in range(repeats):
        for sess, t in zip(sessions, times):
            t0 = time.perf_counter()
            sess.run(None, feeds)
            t.append(time.perf_counter() - t0)
    return [round(float(np.median(t)) * 1e3, 3) for t in times]


def _fid(fid: dict) -> dict:
    f = next(iter(fid.values()))
    return {k: round(v, 6) for k, v in f.items() if k in ("cosine", "rel_error", "top1_agreement")}


# --------------------------------------------------------------------------- resnet18


def _single_conv(node: onnx.NodeProto, inits: dict, shape: tuple) -> onnx.ModelProto:
    nodes, names = [node], set(node.input)
    return _model(nodes, names, inits, node.input[0], shape, node.output[0])


def _model(nodes, names, inits, x, shape, y) -> onnx.ModelProto:
    g = h.make_graph(nodes, "layer", [h.make_tensor_value_info(x, onnx.TensorProto.FLOAT, list(shape))],
                     [h.make_tensor_value_info(y, onnx.TensorProto.FLOAT, None)],
                     [nh.from_array(inits[n], n) for n in sorted(names) if n in inits])
    m = h.make_model(g, opset_imports=[h.make_opsetid("", 17)])
    m.ir_version = 8
    return m


def layer_timings(before: onnx.ModelProto, after: onnx.ModelProto, changes: list, input_hw: dict,
                  batches: tuple, repeats: int) -> list:
    """Each split conv alone (original one-conv model) vs its replacement (the new convs)."""
    init_b = {t.name: nh.to_array(t) for t in before.graph.initializer}
    init_a = {t.name: nh.to_array(t) for t in after.graph.initializer}
    by_name_b = {n.name: n for n in before.graph.node}
    by_name_a = {n.name: n for n in after.graph.node}
    rows = []
    for c in changes:
        orig = by_name_b[c["item"]]
        new = [by_name_a[n] for n in c["nodes"]]
        row = {"layer": c["item"], "C": c["C"], "N": c["N"], "K": f'{c["Kh"]}x{c["Kw"]}',
               "stride": next((list(a.ints) for a in orig.attribute if a.name == "strides"), [1, 1]),
               "D": c.get("D"), "macs_before": c["macs_before"], "macs_after": c["macs_after"],
               "macs_ratio": round(c["macs_before"] / c["macs_after"], 3)}
        H, W = input_hw[orig.input[0]]
        for b in batches:
            shape = (b, c["C"], H, W)
            x = {orig.input[0]: np.random.default_rng(0).normal(size=shape).astype(np.float32)}
            names = {i for n in new for i in n.input}
            t0, t1 = median_ms([_single_conv(orig, init_b, shape),
                                _model(new, names, init_a, orig.input[0], shape, new[-1].output[0])], x, repeats)
            row[f"batch{b}"] = {"original_ms": t0, "split_ms": t1, "time_ratio": round(t0 / t1, 3),
                                "split_slower": t1 > t0}
        rows.append(row)
    return rows


def _input_sizes(model: onnx.ModelProto, shape: tuple) -> dict:
    from onnxslim_cnn.model_io import inferred, with_static_inputs

    info = inferred(with_static_inputs(model, {"input": shape}))
    out = {"input": shape[2:]}
    for vi in info.graph.value_info:
        d = vi.type.tensor_type.shape.dim
        if len(d) == 4:
            out[vi.name] = (d[2].dim_value, d[3].dim_value)
    return out


def bench_resnet18(repeats: int, reduced: bool = False) -> dict:
    size = {"width": 0.25, "input_size": 64} if reduced else {}
    model = reference.build("resnet18", **size)
    calib = calibration.random_inputs(model, samples=8, seed=0)
    held_out = calibration.random_inputs(model, samples=8, seed=1)
    slim, _ = onnxslim_cnn.compress(model, passes=["slim"], calib=calib, fidelity=False)
    x = held_out.inputs["input"]
    feeds = {b: {"input": np.ascontiguousarray(x[:1].repeat(b, 0) if b > len(x) else x[:b])} for b in (1, 8)}
    out = {"model": "resnet18", "input": list(x.shape[1:]), "calibration": calib.source,
           "fidelity_inputs": "random(seed=1, samples=8), not the calibration samples", "variants": {}}
    models = {"slim": slim}
    # floor rounding: every layer reaches at least 2x (the default, nearest, is the seed's rounding)
    s2 = {"speedup": 2, "speedup_rounding": "floor"}
    for label, opts in (("speedup2", s2), ("speedup2_data_aware", {**s2, "data_aware": True})):
        t0 = time.perf_counter()
        new, rep = onnxslim_cnn.compress(slim, passes=["lowrank"], calib=calib, options={"lowrank": opts},
                                         fidelity=False)
        seconds = time.perf_counter() - t0
        rec = rep.passes[0]
        models[label] = new
        entry = {"options": opts, "pass_seconds": round(rec.seconds, 2), "pipeline_seconds": round(seconds, 2),
                 "layers_split": rec.stats.get("split_jaderberg", 0),
                 "skipped": [f'{s["item"]}: {s["reason"]}' for s in rec.skipped],
                 "macs_before": rep.input.macs, "macs_after": rep.output.macs,
                 "macs_ratio": round(rep.input.macs / rep.output.macs, 3),
                 "params_before": rep.input.params, "params_after": rep.output.params,
                 "fidelity_vs_original": _fid(fidelity(model, new, held_out))}
        entry["per_layer_error"] = {c["item"]: {k: c.get(k) for k in ("D", "kept_energy", "output_error",
                                                                     "output_error_plain") if k in c}
                                    for c in rec.changes}
        if label == "speedup2":  # the graph is the same for both variants; time the layers once
            sizes = _input_sizes(slim, (1,) + tuple(x.shape[1:]))
            entry["layers"] = layer_timings(slim, new, rec.changes, sizes, (1, 8), repeats)
            entry["layers_slower_despite_fewer_macs"] = {
                f"batch{b}": [r["layer"] for r in entry["layers"] if r[f"batch{b}"]["split_slower"]] for b in (1, 8)}
        out["variants"][label] = entry
    # whole models timed in turn (slim, plain split, data-aware split) per batch size
    out["latency_ms"] = {}
    for b, f in feeds.items():
        ms = median_ms(list(models.values()), f, repeats)
        out["latency_ms"][f"batch{b}"] = dict(zip(models, ms))
        for label in out["variants"]:
            out["variants"][label].setdefault("latency_ratio_slim_over_lowrank", {})[f"batch{b}"] = \
                round(ms[0] / ms[list(models).index(label)], 3)
    return out


# --------------------------------------------------------------------------- digits


def bench_digits(repeats: int, reduced: bool = False) -> dict:
    model = onnx.load(digits.fixture_path("digits_resnet"))
    calib = {"input": digits.load_split("train")[0][:256]}
    out = {"model": "digits_resnet", "calibration": "256 training images", "evaluation": "450 test images",
           "top1_original": digits.evaluate_top1(model), "runs": []}
    variants = (("plain", {}), ("data_aware", {"data_aware": True, "sequential": False}),
                ("data_aware_sequential", {"data_aware": True, "sequential": True}))
    s2 = {"speedup": 2, "speedup_rounding": "floor"}
    runs = [(sel, label, extra) for sel in ({"energy": 0.9}, {"energy": 0.95}, s2)
            for label, extra in variants]
    # Tucker-2 for comparison at the same targets (plain and the recommended data-aware mode)
    runs += [({**sel, "method": "tucker2"}, label, extra) for sel in ({"energy": 0.9}, s2)
             for label, extra in (variants[0], variants[2])]
    for sel, label, extra in runs:
        new, rep = onnxslim_cnn.compress(model, passes=["slim", "lowrank"], calib=calib,
                                         options={"lowrank": {**sel, **extra}}, fidelity=False)
        rec = rep.passes[1]
        out["runs"].append({"selection": sel, "variant": label, "top1": round(digits.evaluate_top1(new), 4),
                            "layers_split": [c["item"] for c in rec.changes],
                            "macs_before": rep.input.macs, "macs_after": rep.output.macs,
                            "params_before": rep.input.params, "params_after": rep.output.params,
                            "pass_seconds": round(rec.seconds, 2)})
    return out


def bench_svd(repeats: int, reduced: bool = False) -> dict:
    """VGG-16 and AlexNet: `svd` on the FC layers at energy 0.9 and at rank 256."""
    out = {}
    size = {"width": 0.25, "input_size": 64} if reduced else {}
    for name in ("vgg16", "alexnet"):
        model = reference.build(name, **size)
        calib = calibration.random_inputs(model, samples=8, seed=0)
        held_out = calibration.random_inputs(model, samples=8, seed=1)
        slim, _ = onnxslim_cnn.compress(model, passes=["slim"], calib=calib, fidelity=False)
        x = held_out.inputs["input"]
        feeds = {b: {"input": np.ascontiguousarray(x[:b])} for b in (1, 8)}
        models, entry = {"slim": slim}, {"variants": {}}
        for label, opts in (("energy0.9", {"energy": 0.9, "ops": ["Gemm"]}), ("rank256", {"rank": 256, "ops": ["Gemm"]})):
            t0 = time.perf_counter()
            new, rep = onnxslim_cnn.compress(slim, passes=["svd"], calib=calib, options={"svd": opts}, fidelity=False)
            rec = rep.passes[0]
            models[label] = new
            entry["variants"][label] = {
                "options": opts, "pass_seconds": round(rec.seconds, 2),
                "pipeline_seconds": round(time.perf_counter() - t0, 2),
                "params_before": rep.input.params, "params_after": rep.output.params,
                "layers": {c["item"]: {k: c[k] for k in ("m", "n", "rank", "kept_energy")} for c in rec.changes},
                "skipped": [f'{s["item"]}: {s["reason"]}' for s in rec.skipped],
                "fidelity_vs_original": _fid(fidelity(model, new, held_out))}
        entry["latency_ms"] = {}
        for b, f in feeds.items():
            ms = median_ms(list(models.values()), f, max(5, repeats // 3) if name == "vgg16" else repeats)
            entry["latency_ms"][f"batch{b}"] = dict(zip(models, ms))
        out[name] = entry
    return out


SECTIONS = {"resnet18": bench_resnet18, "digits": bench_digits, "svd": bench_svd}


def main(argv: "list[str] | None" = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated subset of {', '.join(SECTIONS)}")
    ap.add_argument("--repeats", type=int, default=15, help="latency repeats per measurement (>= 10)")
    ap.add_argument("--reduced", action="store_true", help="ResNet-18 at width 0.25, 64x64 (quick check)")
    ap.add_argument("--out", help="also write the JSON here")
    args = ap.parse_args(argv)
    wanted = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = [s for s in wanted if s not in SECTIONS]
    if unknown:
        ap.error(f"unknown section(s) {', '.join(unknown)} (choose from {', '.join(SECTIONS)})")
    doc = {"bench": "lowrank", "machine": machine(), "repeats": max(args.repeats, 10)}
    for name in wanted:
        print(f"bench: {name} ...", file=sys.stderr, flush=True)
        doc[name] = SECTIONS[name](max(args.repeats, 10), reduced=args.reduced)
    emit(doc, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
