"""The HTML report (onnxslim_cnn/report_html.py), rendered in headless Chromium.

Real runs (the digits example; a PP-OCR corpus model) are written as JSON and as HTML, the page
is loaded in Chromium (the Debian package: ``apt-get install chromium``) and the DOM it builds is
checked against the JSON report: every figure the page shows (``data-key`` / ``data-value``
attributes) equals the JSON's, the per-layer table has one row per change pair and skip, q8's
float layers are the report's. The page makes no request: its HTML names no external resource,
and Chromium's network log (``--log-net-log``) of the load has no request made by the page (a
control page with one external image shows that the check sees one). Each run leaves a screenshot
(and a PDF print) next to the page; with ``ONNXSLIM_CNN_SCREENSHOTS=DIR`` they are copied there
(docs/img holds the ones in the docs).

Skipped, with the reason, when no Chromium is installed.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest

from onnxslim_cnn.report_html import fmt_num, render_html

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "models" / "examples"
BROWSERS = ("chromium", "chromium-headless-shell", "chromium-browser", "google-chrome")
VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "track", "wbr",
        "path", "rect", "line", "circle"}  # (the SVG ones are written self-closed)


def chromium() -> str:
    for name in BROWSERS:
        path = shutil.which(name)
        if path:
            return path
    pytest.skip("no Chromium found (apt-get install chromium): the HTML report tests render in headless Chromium")


def browser(*args: str, profile: Path, timeout: int = 120) -> subprocess.CompletedProcess:
    cmd = [chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--no-first-run",
           f"--user-data-dir={profile}", "--disable-background-networking", "--disable-component-update",
           "--disable-sync", "--disable-default-apps", '--host-resolver-rules=MAP * ~NOTFOUND', *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


def dump_dom(page: Path, tmp: Path, fragment: str = "") -> str:
    res = browser("--dump-dom", page.resolve().as_uri() + fragment, profile=tmp / "profile")
    assert res.returncode == 0 and "<html" in res.stdout, res.stderr[-2000:]
    return res.stdout


def page_requests(page: Path, tmp: Path) -> list[str]:
    """URLs the page itself asked for while loading (not the browser's own background requests,
    whose initiator is "not an origin"), from Chromium's network log."""
    log = tmp / f"{page.stem}.netlog.json"
    log.unlink(missing_ok=True)
    res = browser(f"--log-net-log={log}", "--dump-dom", page.resolve().as_uri(), profile=tmp / "profile-net")
    assert res.returncode == 0, res.stderr[-2000:]
    text = log.read_text()
    data, _ = json.JSONDecoder().raw_decode(text)
    kinds = {v: k for k, v in data["constants"]["logEventTypes"].items()}
    urls = []
    for e in data["events"]:
        p = e.get("params") or {}
        if kinds.get(e["type"]) == "URL_REQUEST_START_JOB" and p.get("url") and p.get("initiator") != "not an origin":
            urls.append(p.get("url", ""))
    return [u for u in urls if not u.startswith(("file:", "data:", "blob:", "about:"))]


def screenshot(page: Path, tmp: Path, name: str, height: int = 2600) -> Path:
    shot = page.with_name(f"{name}.png")
    res = browser(f"--screenshot={shot}", f"--window-size=1280,{height}", page.resolve().as_uri(),
                  profile=tmp / "profile-shot")
    assert res.returncode == 0 and shot.is_file(), res.stderr[-2000:]
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 20_000
    pdf = page.with_name(f"{name}.pdf")
    res = browser(f"--print-to-pdf={pdf}", "--no-pdf-header-footer", page.resolve().as_uri(),
                  profile=tmp / "profile-shot")
    assert res.returncode == 0 and pdf.read_bytes()[:5] == b"%PDF-", res.stderr[-2000:]
    keep = os.environ.get("ONNXSLIM_CNN_SCREENSHOTS")
    if keep:
        Path(keep).mkdir(parents=True, exist_ok=True)
        shutil.copy(shot, Path(keep) / shot.name)
    print(f"screenshot: {shot}  print: {pdf}")
    return shot


# --------------------------------------------------------------------------- DOM reading

class Dom(HTMLParser):
    """The figures (elements with data-key), the layer table's rows, q8 rows, and a nesting check."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.figures: dict[str, tuple[str, str]] = {}  # data-key -> (data-value, text)
        self.rows: list[dict] = []  # rows of #layer-table
        self.q8: list[dict] = []
        self.ids: list[str] = []
        self.refs: list[tuple[str, str, str]] = []  # (tag, attribute, value) of src/href-like attributes
        self.styles: list[str] = []
        self.stack: list[str] = []
        self.errors: list[str] = []
        self._open: list[tuple[str, dict, list]] = []  # elements whose text is being collected
        self._in_layer_table = False
        self._row: "dict | None" = None
        self._cell: "dict | None" = None
        self._style = False
        self.doctype = False

    def handle_decl(self, decl):
        self.doctype = decl.lower() == "doctype html"

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        raw = self.get_starttag_text() or ""
        if re.search(r"\s[\w:-]+=(?=[\s>/])", raw) or len(a) != len(attrs):
            self.errors.append(f"missing or repeated attribute in {raw[:80]}")
        if "id" in a:
            self.ids.append(a["id"])
        for k, v in attrs:
            if k in ("src", "href", "xlink:href", "action", "poster", "srcset", "data", "formaction") and v:
                self.refs.append((tag, k, v))
        if tag == "style":
            self._style = True
        if tag == "table" and a.get("id") == "layer-table":
            self._in_layer_table = True
        if self._in_layer_table and tag == "tr" and "data-layer" in a:
            self._row = {"attrs": a, "cells": []}
        if self._row is not None and tag == "td":
            self._cell = {"attrs": a, "text": []}
        if tag == "tr" and "data-precision" in a:
            self.q8.append(a)
        if tag not in VOID:
            self.stack.append(tag)
        if "data-key" in a:
            self._open.append((tag, a, []))

    def handle_startendtag(self, tag, attrs):
        a = dict(attrs)
        if "id" in a:
            self.ids.append(a["id"])

    def handle_endtag(self, tag):
        if tag in VOID:
            return
        if not self.stack or self.stack[-1] != tag:
            self.errors.append(f"</{tag}> closes <{self.stack[-1] if self.stack else None}>")
            if tag in self.stack:
                while self.stack and self.stack.pop() != tag:
                    pass
        else:
            self.stack.pop()
        if tag == "style":
            self._style = False
        if self._open and self._open[-1][0] == tag:
            _, a, text = self._open.pop()
            self.figures[a["data-key"]] = (a.get("data-value"), "".join(text).strip())
        if self._cell is not None and tag == "td":
            self._row["cells"].append({"attrs": self._cell["attrs"], "text": "".join(self._cell["text"]).strip()})
            self._cell = None
        if self._row is not None and tag == "tr":
            self.rows.append(self._row)
            self._row = None
        if tag == "table":
            self._in_layer_table = False

    def handle_data(self, data):
        if self._style:
            self.styles.append(data)
        for _, _, text in self._open:
            text.append(data)
        if self._cell is not None:
            self._cell["text"].append(data)


def parse(text: str) -> Dom:
    dom = Dom()
    dom.feed(text)
    dom.close()
    return dom


def value(dom: Dom, key: str):
    assert key in dom.figures, f"{key} not on the page"
    return json.loads(dom.figures[key][0])


def shown_number(text: str) -> float:
    """The number a cell shows ("1,421,527 B" -> 1421527, "0.510×" -> 0.51)."""
    m = re.search(r"-?[\d,]*\.?\d+(?:e[-+]?\d+)?", text.replace("\u2212", "-"))
    assert m, text
    return float(m.group(0).replace(",", ""))


def close(shown: float, exact: float) -> bool:
    return abs(shown - exact) <= max(abs(exact) * 1e-3, 5e-7)


# --------------------------------------------------------------------------- checks against the JSON

def check_page(dom: Dom, d: dict, *, bench: bool) -> None:
    assert dom.doctype and not dom.errors, dom.errors[:5]
    assert dom.stack == [], dom.stack
    assert len(dom.ids) == len(set(dom.ids))
    # summary: before/after and ratio of each model figure
    inp, out = d["input"], d["output"]
    for key in ("params", "file_bytes", "macs", "nodes"):
        for side, stats in (("before", inp), ("after", out)):
            assert value(dom, f"summary.{key}.{side}") == stats[key]
            assert shown_number(dom.figures[f"summary.{key}.{side}"][1]) == stats[key]
        r = value(dom, f"summary.{key}.ratio")
        assert close(r, out[key] / inp[key])
        assert close(shown_number(dom.figures[f"summary.{key}.ratio"][1]), out[key] / inp[key]) or \
            abs(shown_number(dom.figures[f"summary.{key}.ratio"][1]) - out[key] / inp[key]) < 5e-4
    for op in set(inp["op_counts"]) | set(out["op_counts"]):
        assert value(dom, f"ops.{op}.before") == inp["op_counts"].get(op, 0)
        assert value(dom, f"ops.{op}.after") == out["op_counts"].get(op, 0)
    # fidelity per output
    for name, f in d["fidelity"].items():
        for k in ("cosine", "top1_agreement", "rel_error", "max_abs_error"):
            if k in f:
                assert value(dom, f"fidelity.{name}.{k}") == f[k]
                assert abs(shown_number(dom.figures[f"fidelity.{name}.{k}"][1]) - f[k]) <= max(abs(f[k]) * 1e-3, 5e-5)
    # latency
    if bench:
        for side in ("before", "after"):
            ms = d["latency"][side]["median_ms"]
            assert value(dom, f"latency.{side}.median_ms") == ms
            assert abs(shown_number(dom.figures[f"latency.{side}.median_ms"][1]) - ms) <= 5e-4
    else:
        assert "latency.before.median_ms" not in dom.figures
    # the budget, when the run had one
    b = d.get("budget")
    if b:
        assert value(dom, "budget.met") == b["met"]
        for k, t in b["target"].items():
            if t is not None:
                assert value(dom, f"budget.target.{k}") == t
        for i, p in enumerate(b["passes"]):
            for k, v in p["spent"].items():
                if b["target"].get(k) is not None:
                    assert value(dom, f"budget.passes.{i}.spent.{k}") == v
    # warnings, all of them, in order
    warns = [v for k, v in sorted(dom.figures.items()) if k.startswith("warnings.")]
    assert len(warns) == len(d["warnings"])
    assert [dom.figures[f"warnings.{i}"][1] for i in range(len(d["warnings"]))] == d["warnings"]
    # the per-layer table: a row per before/after pair of each change, per other change, per skip
    check_layer_table(dom, d)
    # q8's decisions
    for p in d["passes"]:
        if p["name"] == "q8" and p["changed"]:  # (the budget leaves q8 out where int8 runs slower)
            floats = {r["data-layer"] for r in dom.q8 if r["data-precision"] == "float"}
            assert floats == set(p["stats"]["float_layers"])
            assert value(dom, "q8.float_layers") == len(p["stats"]["float_layers"])
            if "int8_kernels" in p["stats"]:
                assert value(dom, "q8.int8_kernels") == p["stats"]["int8_kernels"]
    # self-contained: no external reference in attributes or CSS
    assert not [r for r in dom.refs if not r[2].startswith(("#", "data:"))], dom.refs
    css = "".join(dom.styles)
    assert "@import" not in css and "url(" not in css


def check_layer_table(dom: Dom, d: dict) -> None:
    from onnxslim_cnn.report import before_after_pairs

    expected = []
    for p in d["passes"]:
        for c in p["changes"]:
            pairs = before_after_pairs(c)
            for name, b, a in pairs or [(None, None, None)]:
                expected.append((p["name"], str(c["item"]), name or "", b, a))
        for s in p["skipped"]:
            expected.append((p["name"], str(s["item"]), "", None, None))
    got = []
    for r in dom.rows:
        a, cells = r["attrs"], r["cells"]
        b = json.loads(cells[4]["attrs"]["data-value"]) if "data-value" in cells[4]["attrs"] else None
        af = json.loads(cells[5]["attrs"]["data-value"]) if "data-value" in cells[5]["attrs"] else None
        if b is not None:
            assert shown_number(cells[4]["text"]) == b and shown_number(cells[5]["text"]) == af
            assert cells[4]["text"] == fmt_num(b)
        got.append((a["data-pass"], a["data-layer"], a["data-measure"], b, af))
    assert sorted(got, key=repr) == sorted(expected, key=repr)


# --------------------------------------------------------------------------- runs

def cli(*args) -> subprocess.CompletedProcess:
    res = subprocess.run([sys.executable, "-m", "onnxslim_cnn", *map(str, args), "-q"],
                         capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr
    return res


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    """The issue's command, once with --report r.json and once with --report r.html (no --bench:
    every figure is deterministic, so the two runs' reports agree). The passes' settings are
    given: under the budget alone, which cuts are kept depends on timings (a cut that makes the
    model slower is left out), and the two runs must make the same choices; a loose budget keeps
    its section on the page."""
    chromium()
    tmp = tmp_path_factory.mktemp("digits_html")
    base = [EXAMPLES / "digits_vgg.onnx", tmp / "out.onnx", "--passes", "prune,svd,q8",
            "--calib", EXAMPLES / "digits_calib.npz", "--set", "prune.ratio=0.3", "--set", "svd.max_output_error=0.1",
            "--set", "q8.keep_float=", "--budget", "cosine=0.5,top1=0.5"]
    cli(*base, "--report", tmp / "r.json")
    cli(*base, "--report", tmp / "r.html")
    return tmp


def test_digits_page_equals_json_report(digits_run):
    tmp = digits_run
    d = json.loads((tmp / "r.json").read_text())
    page = tmp / "r.html"
    assert page.read_text().startswith("<!DOCTYPE html>")
    check_page(parse(page.read_text()), d, bench=False)  # the file as written
    dom = parse(dump_dom(page, tmp))  # and the DOM Chromium builds from it
    check_page(dom, d, bench=False)
    assert dom.rows, "no per-layer rows"


def test_digits_page_makes_no_request_and_is_screenshotted(digits_run):
    tmp = digits_run
    control = tmp / "control.html"
    control.write_text('<!DOCTYPE html><html><body><img src="http://192.0.2.1/x.png"></body></html>')
    assert page_requests(control, tmp) == ["http://192.0.2.1/x.png"]  # the check sees a request
    assert page_requests(tmp / "r.html", tmp) == []
    screenshot(tmp / "r.html", tmp, "report_digits")


def test_table_sorts_in_the_browser(digits_run):
    tmp = digits_run
    for fragment, reverse in (("#sort=4-desc", True), ("#sort=4-asc", False)):
        dom = parse(dump_dom(tmp / "r.html", tmp, fragment))
        before = [json.loads(r["cells"][4]["attrs"]["data-value"]) for r in dom.rows
                  if "data-value" in r["cells"][4]["attrs"]]
        assert len(before) >= 2 and before == sorted(before, reverse=reverse)
        # rows without a figure (skips) go last either way
        last = [("data-value" in r["cells"][4]["attrs"]) for r in dom.rows]
        assert last == sorted(last, reverse=True)


def test_api_page_with_latency_and_report_objects(tmp_path):
    """Report.to_html() of an API run with --bench figures; the page of the report's dict is the same."""
    chromium()
    from onnxslim_cnn.pipeline import run_pipeline

    result = run_pipeline(str(EXAMPLES / "digits_vgg.onnx"), ["prune", "q8"], calib=str(EXAMPLES / "digits_calib.npz"),
                          bench=True, options={"q8": {"float_weight_layers": 1}}, budget="off")
    report = result.report
    d = json.loads(report.to_json())
    page = tmp_path / "api.html"
    page.write_text(report.to_html())
    assert render_html(d) == page.read_text()
    dom = parse(dump_dom(page, tmp_path))
    check_page(dom, d, bench=True)
    q8 = next(p for p in d["passes"] if p["name"] == "q8")
    kept = [c for c in q8["changes"] if c["action"] == "kept_float"]
    assert kept, "float_weight_layers=1 keeps one layer float"
    rows = {r["data-layer"]: r for r in dom.q8}
    assert rows[kept[0]["item"]]["data-precision"] == "float"


def test_page_without_optional_parts():
    """A report with no fidelity, latency, budget or changes still renders, and says so."""
    d = {"input": {"params": 10, "file_bytes": 100, "macs": 0, "macs_by_op": {}, "nodes": 1, "op_counts": {"Relu": 1},
                   "macs_unknown": []},
         "output": {"params": 10, "file_bytes": 90, "macs": 0, "macs_by_op": {}, "nodes": 1, "op_counts": {"Relu": 1},
                    "macs_unknown": []},
         "passes": [{"name": "slim", "options": {}, "changed": False, "stats": {}, "changes": [], "skipped": [],
                     "seconds": 0.01, "status": "ok", "nodes_after": 1}],
         "fidelity": None, "fidelity_data": None, "latency": None, "calibration": None, "warnings": [], "problems": []}
    text = render_html(d)
    dom = parse(text)
    assert dom.doctype and not dom.errors and "Fidelity not measured" in text and "MACs" in text
    assert "unknown (no concrete input shapes)" in text


def test_layer_names_are_escaped():
    d = {"input": {"params": 2, "file_bytes": 2, "macs": 2, "macs_by_op": {}, "nodes": 1, "op_counts": {}},
         "output": {"params": 1, "file_bytes": 1, "macs": 1, "macs_by_op": {}, "nodes": 1, "op_counts": {}},
         "passes": [{"name": "prune", "options": {}, "changed": True, "stats": {},
                     "changes": [{"item": "<script>alert(1)</script>", "action": "pruned",
                                  "channels_before": 4, "channels_after": 2}],
                     "skipped": [{"item": "a&b", "reason": "<b>why</b>"}], "seconds": 0.0, "status": "ok",
                     "nodes_after": 1}],
         "fidelity": None, "fidelity_data": None, "latency": None, "calibration": "x", "warnings": ["<i>w</i>"],
         "problems": []}
    text = render_html(d)
    assert "<script>alert" not in text and "&lt;script&gt;alert(1)&lt;/script&gt;" in text
    assert "<b>why</b>" not in text and "<i>w</i>" not in text
    dom = parse(text)
    assert not dom.errors and [r["attrs"]["data-layer"] for r in dom.rows] == ["<script>alert(1)</script>", "a&b"]


@pytest.mark.corpus
def test_ppocr_page_equals_json_report(corpus_paths, tmp_path):
    """A PP-OCR run (the direction classifier, calibrated on 32 rendered text lines): the page
    of its JSON report. (The digits tests cover --report FILE.html itself.)"""
    chromium()
    pytest.importorskip("PIL", reason="the PP-OCR calibration lines are rendered with Pillow")
    from onnxslim_cnn.models import tasks

    calib = tmp_path / "calib.npz"
    np.savez(calib, **tasks.sample_inputs("ppocr_cls_v2", n=32))
    # settings fixed (as for digits): under the default budget what is kept depends on timings,
    # and on a busy machine every cut can be left out, leaving the page nearly empty
    cli(corpus_paths["ppocr_cls_v2"], tmp_path / "out.onnx", "--passes", "prune,svd,q8", "--calib", calib,
        "--report", tmp_path / "r.json", "--set", "prune.ratio=0.3", "--set", "svd.max_output_error=0.1",
        "--set", "q8.keep_float=", "--budget", "cosine=0,top1=0")
    d = json.loads((tmp_path / "r.json").read_text())
    (tmp_path / "r.html").write_text(render_html(d))  # the page of the saved JSON (one run, not two)
    dom = parse(dump_dom(tmp_path / "r.html", tmp_path))
    check_page(dom, d, bench=False)
    assert len(dom.rows) > 20
    assert page_requests(tmp_path / "r.html", tmp_path) == []
    screenshot(tmp_path / "r.html", tmp_path, "report_ppocr_cls", height=3200)


def test_sparsity_error_and_q8_reasons_charted_from_generic_keys():
    """No pass is known by name except q8's decision table: sparsity from ``sparsity`` or
    ``zeros``/``total``, error figures from their names, q8 reasons from its changes and options."""
    stats = {"params": 100, "file_bytes": 400, "macs": 50, "macs_by_op": {"Conv": 50}, "nodes": 3,
             "op_counts": {"Conv": 2}}
    d = {"input": stats, "output": stats, "calibration": "x", "warnings": [], "problems": [],
         "fidelity": None, "fidelity_data": None, "latency": None,
         "passes": [
             {"name": "sparsify", "options": {}, "changed": True, "stats": {}, "skipped": [], "seconds": 0,
              "status": "ok", "nodes_after": 3,
              "changes": [{"item": "c1", "action": "sparsified", "zeros": 5, "total": 10, "sparsity": 0.5,
                           "search_error": 0.01}]},
             {"name": "share", "options": {}, "changed": True, "stats": {}, "skipped": [], "seconds": 0,
              "status": "ok", "nodes_after": 3,
              "changes": [{"item": "c2", "action": "shared", "bits": 4, "zeros": 1, "total": 4, "rel_error": 0.2}]},
             {"name": "q8", "options": {"exclude": ["c3"], "keep_float": []}, "changed": True, "seconds": 0,
              "status": "ok", "nodes_after": 3, "skipped": [],
              "stats": {"float_layers": ["c1", "c3", "r1"], "int8_kernels": 1,
                        "mixed_precision": {"sensitivity": {"c1": 0.02, "c2": 0.001}, "budget_cosine": 0.99}},
              "changes": [{"item": "c1", "action": "kept_float", "sensitivity": 0.02, "reason": "most sensitive"},
                          {"item": "model", "action": "quantized"}]}]}
    dom = parse(render_html(d))
    assert not dom.errors
    text = render_html(d)
    assert 'data-chart="sparsity"' in text and 'data-row="c1" data-series="sparsity" data-value="0.5"' in text
    assert 'data-row="c2" data-series="sparsity" data-value="0.25"' in text
    assert 'data-chart="share.rel_error"' in text and 'data-chart="sparsify.search_error"' in text
    rows = {r["data-layer"]: r["data-precision"] for r in dom.q8}
    assert rows == {"c1": "float", "c3": "float", "r1": "float", "c2": "int8"}
    assert "most sensitive" in text and "named by the exclude / keep_float option" in text
    assert "fused to (activation)" in text
    # per-node figures, should the model statistics carry them
    d["input"] = dict(stats, macs_by_node={"c1": 30, "c2": 20})
    d["output"] = dict(stats, macs_by_node={"c1": 10, "c2": 20})
    text = render_html(d)
    assert 'data-chart="node.macs_by_node"' in text
    assert 'data-row="c1" data-series="after" data-value="10"' in text
