"""Benchmark of `prune`: accuracy without fine-tuning vs Torch-Pruning, speed on big models, real models.

Prints JSON with three sections (choose with --sections):

* ``digits``: both digits fixtures at ``--ratio`` (default 0.5): top-1 for every criterion, with
  no recovery, with mean compensation, and with ``reconstruct``; next to Torch-Pruning's L1
  (MagnitudePruner, same ratio, no fine-tuning) on the torch twin of the same network (weights
  loaded from the ONNX file). Needs the bench extra: torch and torch-pruning.
* ``speed``: ResNet-50 and VGG-16 (full size) after `slim`, pruned at 0.5 with L1: params and
  MACs before/after, ORT CPU latency (1 thread, medians) at batch 1 and 8, and the pass time.
* ``corpus``: PP-OCR det/rec/cls pruned at 0.3 with reconstruct: frozen groups and their
  reasons, output agreement, task quality before/after.

    python bench/prune.py --sections digits,speed,corpus --out prune.json
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
from onnxslim_cnn.analysis.calibration import random_inputs
from onnxslim_cnn.analysis.fidelity import latency
from onnxslim_cnn.models import corpus, digits, reference

CRITERIA = ("l1", "l2", "bn_gamma", "activation", "reconstruction")


# --------------------------------------------------------------------------- digits vs Torch-Pruning


def torch_pruning_top1(name: str, ratio: float) -> dict:
    try:
        import torch
        import torch_pruning as tp
    except ImportError as exc:
        return {"error": f"torch/torch-pruning not installed ({exc}); pip install torch==2.13.0 torch-pruning"}
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "models"))
    import train_digits  # the torch twins of the fixtures

    net = train_digits.DigitsVGG() if name == "digits_vgg" else train_digits.DigitsResNet()
    weights = {t.name: torch.from_numpy(onnx.numpy_helper.to_array(t).copy())
               for t in onnx.load(digits.fixture_path(name)).graph.initializer}
    state = net.state_dict()
    state.update({k: v for k, v in weights.items() if k in state})
    net.load_state_dict(state)
    net.eval()
    x, y = digits.load_split("test")
    example = torch.from_numpy(x[:1])
    last = net.classifier[-1] if name == "digits_vgg" else net.fc
    pruner = tp.pruner.MagnitudePruner(net, example, importance=tp.importance.MagnitudeImportance(p=1),
                                       pruning_ratio=ratio, ignored_layers=[last])
    pruner.step()
    macs, params = tp.utils.count_ops_and_params(net, example)
    with torch.no_grad():
        pred = net(torch.from_numpy(x)).argmax(1).numpy()
    return {"top1": float(np.mean(pred == y)), "params": int(params), "macs": int(macs)}


def section_digits(ratio: float) -> list[dict]:
    rows = []
    calib = {"input": digits.load_split("train")[0][:512]}
    for name in digits.FIXTURES:
        path = str(digits.fixture_path(name))
        row = {"model": name, "ratio": ratio, "top1_unpruned": digits.evaluate_top1(path), "ours": {}}
        for crit in CRITERIA:
            entry = {}
            for mode, opts in (("plain", {"prune__compensate": False}), ("compensate", {}),
                               ("reconstruct", {"prune__reconstruct": True})):
                t0 = time.perf_counter()
                out, rep = onnxslim_cnn.compress(path, passes=["prune"], calib=calib, prune__ratio=ratio,
                                                 prune__criterion=crit, fidelity=False, **opts)
                entry[mode] = {"top1": digits.evaluate_top1(out), "seconds": round(time.perf_counter() - t0, 2)}
            entry["params"], entry["macs"] = rep.output.params, rep.output.macs
            row["ours"][crit] = entry
        row["params_unpruned"], row["macs_unpruned"] = rep.input.params, rep.input.macs
        row["torch_pruning_l1"] = torch_pruning_top1(name, ratio)
        rows.append(row)
    return rows


# --------------------------------------------------------------------------- speed


def section_speed(ratio: float, repeats: int) -> list[dict]:
    rows = []
    for name in ("resnet50", "vgg16"):
        model, _ = onnxslim_cnn.compress(reference.build(name), fidelity=False)  # BN folded first
        t0 = time.perf_counter()
        pruned, rep = onnxslim_cnn.compress(model, passes=["prune"], calib="random", prune__ratio=ratio,
                                            prune__compensate=False, fidelity=False)
        seconds = time.perf_counter() - t0
        row = {"model": name, "ratio": ratio, "pass_seconds": round(rep.passes[0].seconds, 2),
               "pipeline_seconds": round(seconds, 2), "params": [rep.input.params, rep.output.params],
               "macs": [rep.input.macs, rep.output.macs],
               "channels_removed": rep.passes[0].stats.get("channels_removed")}
        for batch in (1, 8):
            calib = random_inputs(model, samples=batch)
            calib.batch = batch
            reps = repeats if batch == 1 or name != "vgg16" else max(3, repeats // 3)
            before = latency(model, calib, repeats=reps)["median_ms"]
            after = latency(pruned, calib, repeats=reps)["median_ms"]
            row[f"latency_ms_b{batch}"] = {"before": before, "after": after, "speedup": round(before / after, 3)}
        rows.append(row)
    return rows


# --------------------------------------------------------------------------- real models


def section_corpus(ratio: float) -> list[dict]:
    from onnxslim_cnn.models import tasks

    try:
        paths = corpus.fetch(["ppocrv4_det", "ppocrv4_rec", "ppocr_cls_v2"], quiet=True)
    except corpus.CorpusUnavailable as exc:
        return [{"error": f"corpus unavailable: {exc}"}]
    rows = []
    for mid, path in paths.items():
        calib = tasks.sample_inputs(mid, 64)  # fewer samples over-fit the refit of small FC layers
        slim, _ = onnxslim_cnn.compress(str(path), calib=calib, fidelity=False)
        out, rep = onnxslim_cnn.compress(slim, passes=["prune"], calib=calib, prune__ratio=ratio,
                                         prune__reconstruct=True)
        p = rep.passes[0]
        rows.append({
            "model": mid, "ratio": ratio, "status": p.status,
            "params": [rep.input.params, rep.output.params], "macs": [rep.input.macs, rep.output.macs],
            "channels_removed": p.stats.get("channels_removed"), "groups_frozen": p.stats.get("groups_frozen"),
            "skipped": p.skipped,
            "fidelity": {k: {m: v[m] for m in ("cosine", "rel_error") if m in v} for k, v in rep.fidelity.items()},
            "task_before": tasks.evaluate(mid, str(path)), "task_after": tasks.evaluate(mid, out),
        })
    return rows


def main(argv: "list[str] | None" = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sections", default="digits,speed,corpus")
    ap.add_argument("--ratio", type=float, default=0.5)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--out")
    args = ap.parse_args(argv)
    doc: dict = {"bench": "prune", "machine": machine()}
    for section in args.sections.split(","):
        print(f"bench: {section} ...", file=sys.stderr, flush=True)
        if section == "digits":
            doc["digits"] = section_digits(args.ratio)
        elif section == "speed":
            doc["speed"] = section_speed(0.5, args.repeats)
        elif section == "corpus":
            doc["corpus"] = section_corpus(0.3)
    emit(doc, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
