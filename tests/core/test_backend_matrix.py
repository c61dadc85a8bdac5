"""Every pass set over the onnx wheel's backend test models, through the CLI (issue 16).

Each backend test model that ONNX Runtime loads and runs on its own ``test_data_set_0`` inputs is
run through ``python -m onnxslim_cnn IN OUT --passes P --calib random -q`` in a subprocess, with
a per-run timeout. Every run must be either

* ok (exit 0): the output passes ``onnx.checker`` full_check, loads in ORT, runs on the test
  inputs with the original's output names and shapes, and for ``slim`` matches the original
  within 1e-5 relative; or
* a clean refusal (exit 2) or an incomplete run (exit 3: a pass failed, was reverted or missed
  the budget): something on stderr, never a traceback;

never exit 1 (internal error). The counts (ok / exit 2 / exit 3 / exit 1, and the models ORT
itself cannot run) are printed at the end and, for a run of the whole selection, written to
bench/results/backend_matrix.json.

Marked ``matrix`` (deselected by default): ``python3 -m pytest -q -m matrix tests/core/test_backend_matrix.py``.
By default slim and q8 run on every model and the other pass sets on a deterministic fifth of
them (a different fifth each; about 20 minutes on a quiet 2-core machine); ``ONNXSLIM_MATRIX_FULL=1``
runs every pass set on every model.
``ONNXSLIM_MATRIX_TIMEOUT`` is the per-run timeout in seconds (default 180).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from functools import lru_cache
from pathlib import Path

import numpy as np
import onnx
import pytest

pytestmark = pytest.mark.matrix

PASS_SETS = ["slim", "prune", "svd", "lowrank", "sparsify", "q8", "fp16", "share", "sparse"]
EVERY_MODEL = {"slim", "q8"}  # the rest: every SAMPLE_STEP-th model unless ONNXSLIM_MATRIX_FULL=1
SAMPLE_STEP = 5
SUITES = ("node", "simple", "pytorch-converted", "pytorch-operator")
TIMEOUT = float(os.environ.get("ONNXSLIM_MATRIX_TIMEOUT", "180"))
FULL = os.environ.get("ONNXSLIM_MATRIX_FULL", "") not in ("", "0")
RESULTS = Path(__file__).resolve().parents[2] / "bench" / "results" / "backend_matrix.json"


def _data_root() -> Path:
    return Path(onnx.__file__).parent / "backend" / "test" / "data"


def backend_models() -> "list[Path]":
    """Every backend test case folder with a model.onnx and a test_data_set_0, sorted."""
    root = _data_root()
    found = []
    for suite in SUITES:
        d = root / suite
        if d.is_dir():
            found += [c for c in sorted(d.iterdir())
                      if (c / "model.onnx").is_file() and (c / "test_data_set_0").is_dir()]
    return found


def _cases() -> "list[tuple[str, str]]":
    models = backend_models()
    cases = []
    for k, passes in enumerate(PASS_SETS):
        for i, m in enumerate(models):
            if FULL or passes in EVERY_MODEL or i % SAMPLE_STEP == k % SAMPLE_STEP:
                cases.append((f"{m.parent.name}/{m.name}", passes))
    return cases


def _read_tensors(folder: Path, prefix: str) -> "list[np.ndarray]":
    from onnx import numpy_helper

    files = sorted(folder.glob(f"{prefix}_*.pb"), key=lambda p: int(p.stem.split("_")[-1]))
    out = []
    for f in files:
        t = onnx.TensorProto()
        t.ParseFromString(f.read_bytes())
        out.append(numpy_helper.to_array(t))
    return out


def _session(path: str):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 4
    so.intra_op_num_threads = 1
    return ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])


@lru_cache(maxsize=None)
def reference(case: str):
    """(feeds, {output name: array}) from ORT on the original model and its test_data_set_0,
    or the reason ORT cannot run it (a str)."""
    folder = _data_root() / case
    try:
        sess = _session(str(folder / "model.onnx"))
        arrays = _read_tensors(folder / "test_data_set_0", "input")
        names = [i.name for i in sess.get_inputs()]
        if len(arrays) != len(names):
            return f"{len(arrays)} input files for {len(names)} inputs"
        feeds = dict(zip(names, arrays))
        outs = sess.run(None, feeds)
        return feeds, {o.name: v for o, v in zip(sess.get_outputs(), outs)}
    except Exception as exc:  # ORT itself cannot run it: not a case for the matrix
        return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


_SUMMARY: "dict" = {"runs": []}


@pytest.fixture(scope="session")
def summary(request):
    """Collects one record per run; at the end prints the counts and writes the JSON."""
    yield _SUMMARY
    runs = _SUMMARY["runs"]
    if not runs:
        return
    counts = {"ok": 0, "exit2": 0, "exit3": 0, "exit1": 0, "other": 0, "not_run_by_ort": 0}
    per_pass: "dict[str, dict[str, int]]" = {}
    for r in runs:
        key = r["outcome"]
        counts[key] = counts.get(key, 0) + 1
        per_pass.setdefault(r["passes"], {}).setdefault(key, 0)
        per_pass[r["passes"]][key] += 1
    doc = {
        "command": "python -m onnxslim_cnn IN OUT --passes P --calib random -q",
        "sampling": "every pass set on every model" if FULL else
                    f"slim and q8 on every model; the other pass sets on every {SAMPLE_STEP}th model",
        "onnx": onnx.__version__,
        "onnxruntime": __import__("onnxruntime").__version__,
        "timeout_s": TIMEOUT,
        "counts": counts,
        "per_pass": dict(sorted(per_pass.items())),
        "seconds": round(sum(r.get("seconds", 0.0) for r in runs), 1),
        "runs": sorted(runs, key=lambda r: (r["passes"], r["model"])),
    }
    # Only a run of the whole selection (default or FULL) replaces the recorded figures; a -k
    # subset just prints its counts.
    complete = len(runs) == len(_cases())
    if complete:
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        RESULTS.write_text(json.dumps(doc, indent=1) + "\n")
    line = "backend matrix: " + ", ".join(f"{k} {v}" for k, v in counts.items()) + \
        (f" -> {RESULTS}" if complete else f" ({len(runs)} of {len(_cases())} runs: not recorded)")
    lines = ["", line] + [f"  {p:9s} " + ", ".join(f"{k} {v}" for k, v in sorted(c.items()))
                          for p, c in sorted(per_pass.items())]
    capman = request.config.pluginmanager.get_plugin("capturemanager")
    if capman is not None:
        with capman.global_and_fixture_disabled():
            print("\n".join(lines))
    else:
        print("\n".join(lines))


def _check_output(out: Path, feeds: dict, ref: dict, passes: str) -> None:
    onnx.checker.check_model(str(out), full_check=True)
    sess = _session(str(out))
    names = {i.name for i in sess.get_inputs()}
    outs = sess.run(None, {k: v for k, v in feeds.items() if k in names})
    got = {o.name: v for o, v in zip(sess.get_outputs(), outs)}
    assert list(got) == list(ref), f"output names {list(got)} != {list(ref)}"
    for name, want in ref.items():
        have = np.asarray(got[name])
        want = np.asarray(want)
        assert have.shape == want.shape, f"output {name}: shape {have.shape} != {want.shape}"
        if passes != "slim":
            continue
        if want.dtype.kind in "fc":
            # NaN where the original has NaN (test_operator_sqrt of negative inputs), nowhere else
            nan = np.isnan(want)
            assert np.array_equal(nan, np.isnan(have)), f"slim output {name}: NaN where the original has none"
            have, want = have[~nan], want[~nan]
            scale = max(float(np.max(np.abs(want))) if want.size else 0.0, 1.0)
            err = float(np.max(np.abs(have.astype(np.float64) - want))) if want.size else 0.0
            assert err <= 1e-5 * scale, f"slim output {name}: max abs err {err:g} (scale {scale:g})"
        else:
            assert np.array_equal(have, want), f"slim output {name} differs"


@pytest.mark.parametrize("case,passes", _cases())
def test_backend_matrix(case, passes, tmp_path, summary):
    ref = reference(case)
    record = {"model": case, "passes": passes}
    if isinstance(ref, str):
        summary["runs"].append({**record, "outcome": "not_run_by_ort", "error": ref})
        pytest.skip(f"ONNX Runtime cannot run the original: {ref}")
    feeds, outputs = ref
    out = tmp_path / "out.onnx"
    cmd = [sys.executable, "-m", "onnxslim_cnn", str(_data_root() / case / "model.onnx"), str(out),
           "--passes", passes, "--calib", "random", "-q"]
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT, cwd=tmp_path)
    except subprocess.TimeoutExpired:
        summary["runs"].append({**record, "outcome": "other", "error": f"timeout after {TIMEOUT:g} s",
                                "seconds": TIMEOUT})
        pytest.fail(f"{case} --passes {passes}: no exit within {TIMEOUT:g} s")
    record["seconds"] = round(time.perf_counter() - t0, 2)
    rc, err = proc.returncode, proc.stderr
    errors = [ln for ln in err.splitlines() if ln.startswith("onnxslim: ")]
    record["rc"] = rc
    record["outcome"] = {0: "ok", 1: "exit1", 2: "exit2", 3: "exit3"}.get(rc, "other")
    if rc != 0:
        record["error"] = (errors or err.strip().splitlines() or [""])[0][:400]
    try:
        assert "Traceback" not in err, f"traceback on stderr:\n{err[-2000:]}"
        assert rc in (0, 2, 3), f"exit {rc}: {record.get('error')}"
        if rc in (2, 3):
            assert err.strip(), f"exit {rc} with nothing on stderr"
            assert errors, f"exit {rc} without an 'onnxslim: ...' line on stderr:\n{err[-2000:]}"
        else:
            assert out.is_file(), "exit 0 without an output model"
            _check_output(out, feeds, outputs, passes)
    except AssertionError as exc:
        if record["outcome"] == "ok":
            record["outcome"] = "bad_output"
        record.setdefault("error", str(exc).splitlines()[0][:400])
        summary["runs"].append(record)
        raise
    except Exception as exc:  # the output does not load / check: a bad output, not a test bug
        record["outcome"] = "bad_output"
        record["error"] = f"{type(exc).__name__}: {(str(exc).strip().splitlines() or [''])[0][:400]}"
        summary["runs"].append(record)
        raise AssertionError(f"{case} --passes {passes}: output {record['error']}") from None
    summary["runs"].append(record)
