"""The report as one self-contained HTML page: ``onnxslim IN OUT --report r.html``, ``Report.to_html()``.

Everything is inline: CSS, a few lines of JavaScript (only to sort the per-layer table; the page
reads the same without it) and the charts, drawn here as inline SVG. No chart library, no font,
no image is fetched: the page opens offline, in a mail attachment or a CI artifact viewer, and
prints (a print style sheet keeps the colours and breaks between sections, not inside them).
There is no vendored code, so no third-party licence applies.

Like the terminal table, the page knows no pass's own keys; it is built from what the report
holds, generically:

* per-layer size: every change whose details carry numeric ``<x>_before`` / ``<x>_after`` pairs
  (prune's channels, svd's params, ...) gives a before/after bar per layer, one chart per pass and
  pair name, and one row per pair in the sortable table;
* per-layer error: numeric details named like an error figure (``*error*``, ``*sensitivity*``,
  ``*energy*``, ``*cosine*``): one chart per pass and name;
* sparsity: details ``sparsity``, or ``zeros`` and ``total``;
* q8's decision: ``stats.float_layers`` with each layer's reason (its ``kept_float`` change, the
  options that named it, mixed precision's measured sensitivity), int8 for the other layers the
  report names, and the int8 kernels ONNX Runtime built;
* per-node figures of the model statistics, when ``ModelStats`` holds them (any
  ``<x>_by_node`` / ``<x>_by_layer`` mapping present before and after), and MACs by op type;
* the accuracy budget (``report.budget``), when the run had one: target, verdict, and per pass
  the setting chosen, what was tried and its share of the allowance.

Every figure that comes from the report is written with ``data-key`` (where it is) and
``data-value`` (the JSON value, exactly) attributes, so a test can check the page against the JSON.
"""

from __future__ import annotations

import html
import json
import math
import numbers
import re
from typing import Any, Iterable

ERROR_KEY = re.compile(r"error|sensitivity|energy|cosine", re.I)
LOW_COSINE = 0.99  # as pipeline.LOW_COSINE: below it the run warns (not imported: onnx-free module)
MAX_LABEL = 34


# --------------------------------------------------------------------------- entry point

def render_html(report: Any, *, title: str = "onnxslim-cnn report") -> str:
    """The page for a ``Report`` or for its ``to_dict()`` / JSON (a dict)."""
    if isinstance(report, dict):
        d = _plain(report)
    else:
        d = _plain(report.to_dict())
        if d.get("budget") is None and getattr(report, "budget", None) is not None:
            d["budget"] = _plain(report.budget)
    return _Page(d, title).render()


def _plain(obj: Any) -> Any:
    """JSON types only (numpy scalars, tuples, dataclasses as the JSON report writes them)."""
    from dataclasses import asdict, is_dataclass

    if is_dataclass(obj) and not isinstance(obj, type):
        obj = asdict(obj)
    elif hasattr(obj, "to_dict") and not isinstance(obj, dict):
        obj = obj.to_dict()

    def default(o: Any) -> Any:
        if hasattr(o, "item"):
            return o.item()
        if isinstance(o, (set, tuple)):
            return list(o)
        return str(o)

    return json.loads(json.dumps(obj, default=default, allow_nan=True))


# --------------------------------------------------------------------------- formatting

def esc(s: Any) -> str:
    return html.escape(str(s), quote=True)


def is_num(v: Any) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


def fmt_num(v: Any, digits: int = 4) -> str:
    """Integers in full with thousands separators; floats to ``digits`` significant digits."""
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, numbers.Integral):
        return f"{int(v):,}"
    if is_num(v):
        f = float(v)
        if not math.isfinite(f):
            return str(f)
        if f == int(f) and abs(f) < 1e15:
            return f"{int(f):,}"
        return f"{f:.{digits}g}"
    return str(v)


def human(n: Any, unit: str = "") -> str:
    if not is_num(n):
        return "-"
    if unit == "B":
        for u, div in (("GB", 1 << 30), ("MB", 1 << 20), ("kB", 1 << 10)):
            if abs(n) >= div:
                return f"{n / div:.2f} {u}"
        return f"{n} B"
    for u, div in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.2f}{u}"
    return fmt_num(n)


def ratio(before: Any, after: Any) -> "float | None":
    if is_num(before) and is_num(after) and before:
        return after / before
    return None


def jv(v: Any) -> str:
    """The exact JSON text of a value, for ``data-value``."""
    return esc(json.dumps(v, allow_nan=True))


def fig(value: Any, key: "str | None" = None, text: "str | None" = None, tag: str = "span",
        cls: str = "", title: "str | None" = None) -> str:
    """A figure from the report: shown as ``text`` (default ``fmt_num``), exact in data-value."""
    attrs = [f'data-value="{jv(value)}"']
    if key:
        attrs.insert(0, f'data-key="{esc(key)}"')
    if cls:
        attrs.append(f'class="{esc(cls)}"')
    if title:
        attrs.append(f'title="{esc(title)}"')
    if tag == "td" and is_num(value):
        attrs.append(f'data-sort="{jv(value)}"')
    return f"<{tag} {' '.join(attrs)}>{esc(fmt_num(value) if text is None else text)}</{tag}>"


def short(label: str, n: int = MAX_LABEL) -> str:
    return label if len(label) <= n else label[: n - 1] + "\u2026"


# --------------------------------------------------------------------------- charts (inline SVG)

SERIES = ("before", "after")


def bar_chart(rows: list[tuple[str, list[Any]]], series: Iterable[str] = SERIES, *, key: str, unit: str = "",
              percent: bool = False, scale_max: "float | None" = None, caption: str = "",
              marker: "float | None" = None, marker_label: str = "",
              widths: tuple[int, int, int] = (230, 400, 110)) -> str:
    """Horizontal bars, one group per row (``label``, one value per series), as inline SVG.

    Each bar is a ``<rect>`` inside ``<g class="bar" data-chart data-row data-series
    data-value>``; its value is printed after it. ``percent``: values are fractions shown as %.
    ``marker``: a dashed vertical line at that value (a budget's allowance)."""
    series = list(series)
    if not rows:
        return ""
    label_w, bar_w, value_w = widths
    one = len(series) == 1  # a single series is drawn in the "after" colour
    width = label_w + bar_w + value_w
    bar_h, gap = 13, 7
    group_h = bar_h * len(series) + gap
    top = 18 if len(series) > 1 or marker is not None else 4
    height = top + group_h * len(rows) + 4
    finite = [float(v) for _, vs in rows for v in vs if is_num(v) and math.isfinite(v)]
    vmax = scale_max if scale_max is not None else max(finite + [marker or 0.0, 0.0])
    vmax = vmax or 1.0
    out = [f'<svg class="chart" role="img" data-chart="{esc(key)}" viewBox="0 0 {width} {height}" '
           f'width="100%" preserveAspectRatio="xMinYMin meet" xmlns="http://www.w3.org/2000/svg">']
    if caption:
        out.append(f"<title>{esc(caption)}</title>")
    if len(series) > 1:
        x = label_w
        for i, s in enumerate(series):
            out.append(f'<rect x="{x}" y="3" width="10" height="10" class="s{i}"/>'
                       f'<text x="{x + 14}" y="12" class="legend">{esc(s)}</text>')
            x += 24 + 7 * len(s)
    for r, (label, values) in enumerate(rows):
        y0 = top + r * group_h
        out.append(f'<text x="{label_w - 6}" y="{y0 + group_h / 2 + 1:.1f}" class="label" text-anchor="end">'
                   f"<title>{esc(label)}</title>{esc(short(label))}</text>")
        for i, (s, v) in enumerate(zip(series, values)):
            y = y0 + i * bar_h
            ok = is_num(v) and math.isfinite(v)
            w = max(0.0, min(float(v) / vmax, 1.0)) * bar_w if ok else 0.0
            text = (f"{100 * float(v):.2f}%" if percent else fmt_num(v) + (f" {unit}" if unit else "")) if ok \
                else ("-" if v is None else str(v))
            out.append(f'<g class="bar" data-row="{esc(label)}" data-series="{esc(s)}" data-value="{jv(v)}">'
                       f'<rect x="{label_w}" y="{y + 1}" width="{w:.1f}" height="{bar_h - 2}" class="s{1 if one else i}">'
                       f"<title>{esc(label)} {esc(s)}: {esc(text)}</title></rect>"
                       f'<text x="{label_w + w + 4:.1f}" y="{y + bar_h - 3}" class="value">{esc(text)}</text></g>')
    if marker is not None and marker <= vmax:
        x = label_w + marker / vmax * bar_w
        out.append(f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{top - 4}" y2="{height}" class="marker"/>'
                   f'<text x="{x + 3:.1f}" y="{top - 6}" class="legend">{esc(marker_label)}</text>')
    out.append("</svg>")
    return "".join(out)


# --------------------------------------------------------------------------- report walking

def layer_changes(d: dict) -> list[dict]:
    """One entry per change of every pass: pass, layer, action, before/after pairs, the other
    scalar details, and sparsity when the details give it."""
    from .report import before_after_pairs

    out = []
    for p in d.get("passes") or []:
        for c in p.get("changes") or []:
            pairs = before_after_pairs(c)
            paired = {f"{n}_before" for n, _, _ in pairs} | {f"{n}_after" for n, _, _ in pairs}
            details = {k: v for k, v in c.items() if k not in ("item", "action", "layers") and k not in paired}
            out.append({"pass": p["name"], "layer": str(c.get("item")), "action": c.get("action", ""),
                        "pairs": pairs, "details": details, "sparsity": _sparsity(c)})
    return out


def _sparsity(c: dict) -> "float | None":
    if is_num(c.get("sparsity")):
        return float(c["sparsity"])
    if is_num(c.get("zeros")) and is_num(c.get("total")) and c["total"]:
        return c["zeros"] / c["total"]
    return None


def q8_decisions(p: dict, d: dict) -> list[dict]:
    """q8's per-layer precision for one q8 pass record: layer, precision, reason, sensitivity."""
    stats, opts = p.get("stats") or {}, p.get("options") or {}
    float_layers = [str(x) for x in stats.get("float_layers") or []]
    mixed = stats.get("mixed_precision") or {}
    sens = {str(k): v for k, v in (mixed.get("sensitivity") or {}).items()}
    kept = {str(c["item"]): c for c in p.get("changes") or [] if c.get("action") == "kept_float"}
    named = set(map(str, opts.get("exclude") or [])) | {str(n) for n in opts.get("keep_float") or [] if n != "auto"}
    head = set(map(str, stats.get("float_head") or []))
    rows = []
    for name in float_layers:
        c = kept.get(name)
        if c is not None:
            reason, s = c.get("reason") or "kept float", c.get("sensitivity")
        elif name in named:
            reason, s = "named by the exclude / keep_float option", None
        elif name in head:
            reason, s = "float_head: produces a graph output", None
        else:
            reason, s = "not chosen itself: kept float with the float layer it is fused to (activation)", None
        rows.append({"layer": name, "precision": "float", "reason": reason, "sensitivity": s if s is not None
                     else sens.get(name)})
    quantized = any(c.get("action") == "quantized" for c in p.get("changes") or [])
    if quantized:
        known: list[str] = list(sens)
        for q in d.get("passes") or []:
            for c in (q.get("changes") or []) + (q.get("skipped") or []):
                for name in c.get("layers") or [c.get("item")]:
                    if isinstance(name, str) and name != "model" and "->" not in name and "," not in name:
                        known.append(name)
        floats = set(float_layers)
        budget = mixed.get("budget_cosine")
        for name in dict.fromkeys(known):
            if name in floats:
                continue
            if name in sens:
                why = (f"int8: its measured sensitivity was not needed to keep cosine >= {budget}"
                       if budget is not None else "int8: measured, not among the most sensitive")
            else:
                why = "int8: not kept float (named by the report; ORT's tool quantizes the layers it supports)"
            rows.append({"layer": name, "precision": "int8", "reason": why, "sensitivity": sens.get(name)})
    return rows


def per_node(d: dict) -> list[tuple[str, dict, dict]]:
    """``(figure, before, after)`` for each per-node mapping the model statistics hold."""
    inp, out = d.get("input") or {}, d.get("output") or {}
    found = []
    for k, v in inp.items():
        if (k.endswith("_by_node") or k.endswith("_by_layer")) and isinstance(v, dict) and isinstance(out.get(k), dict):
            found.append((k, v, out[k]))
    return found


# --------------------------------------------------------------------------- the page

class _Page:
    def __init__(self, d: dict, title: str):
        self.d, self.title = d, title
        self.changes = layer_changes(d)

    def render(self) -> str:
        body = [self.header(), self.verdict(), self.summary(), self.fidelity(), self.budget(), self.notes(),
                self.layer_charts(), self.error_charts(), self.q8(), self.sparsity(), self.ops(), self.table(),
                self.pass_details(), self.footer()]
        return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
                f'<meta name="viewport" content="width=device-width, initial-scale=1">'
                f"<title>{esc(self.title)}</title><style>{CSS}</style></head>"
                f'<body><main>{"".join(b for b in body if b)}</main><script>{JS}</script></body></html>\n')

    # ---- top

    def header(self) -> str:
        d = self.d
        names = [p["name"] for p in d.get("passes") or []]
        try:
            from . import __version__ as version
        except Exception:  # pragma: no cover
            version = "?"
        arrow, dot = " \u2192 ", " \u00b7 "
        sub = [f"passes: {arrow.join(names) if names else 'none'}"]
        if d.get("calibration"):
            sub.append(f"calibration: {d['calibration']}")
        sub.append(f"onnxslim-cnn {version}")
        return (f'<header><h1>{esc(self.title)}</h1><p class="sub" data-key="passes" '
                f'data-value="{jv(names)}">{esc(dot.join(sub))}</p></header>')

    def verdict(self) -> str:
        d = self.d
        problems, budget, fid = d.get("problems") or [], d.get("budget"), d.get("fidelity") or {}
        data = d.get("fidelity_data") or {}
        where = data.get("text") or ("calibration inputs" if fid else "")
        lines, cls = [], "neutral"
        if budget:
            met = budget.get("met")
            cls = {True: "ok", False: "bad"}.get(met, "warn")
            word = {True: "met", False: "missed", None: "not measured"}[met]
            on = f" on {budget.get('samples')} {budget.get('measured_on')} samples" if budget.get("measured_on") else ""
            lines.append(f'<p class="big">Accuracy budget <b data-key="budget.met" data-value="{jv(met)}">{word}</b>'
                         f"{esc(on)}: {esc(_budget_target_text(budget))}</p>")
            if budget.get("missed"):
                lines.append(f"<p>{esc('; '.join(budget['missed']))}</p>")
            if budget.get("why"):
                lines.append(f"<p>{esc(budget['why'])}</p>")
        elif fid:
            cos = [f["cosine"] for f in fid.values() if is_num(f.get("cosine"))]
            errors = [n for n, f in fid.items() if "error" in f]
            least = min(cos) if cos else None
            good = not errors and least is not None and least >= LOW_COSINE
            cls = "ok" if good else "bad"
            text = (f"least output cosine to the original {fmt_num(least, 6)} "
                    f"({'at or above' if good else 'below'} {LOW_COSINE})" if least is not None else "")
            if errors:
                text = f"output(s) {', '.join(errors)} not comparable; " + text
            lines.append(f'<p class="big">{"Outputs close to the original" if good else "Check task accuracy"}: '
                         f'<span data-key="verdict.least_cosine" data-value="{jv(least)}">{esc(text)}</span></p>')
        else:
            lines.append('<p class="big">Fidelity not measured</p>')
        if where:
            lines.append(f'<p class="muted">fidelity data: {esc(where)}</p>')
        if problems:
            cls = "bad"
            lines.append('<p class="big">The run did not do all it was asked to:</p><ul>'
                         + "".join(f"<li>{esc(x)}</li>" for x in problems) + "</ul>")
        inp, out = d.get("input") or {}, d.get("output") or {}
        bits = []
        for key, name in (("params", "parameters"), ("file_bytes", "file size"), ("macs", "MACs")):
            r = ratio(inp.get(key), out.get(key))
            if r is not None and (key != "macs" or d.get("calibration")):
                bits.append(f"{name} {r:.3f}\u00d7")
        lat = d.get("latency")
        if lat:
            r = ratio(lat["after"]["median_ms"], lat["before"]["median_ms"])
            if r is not None:
                bits.append(f"latency speed-up {r:.2f}\u00d7")
        if bits:
            lines.append(f'<p>after/before: {esc(", ".join(bits))}</p>')
        return f'<section id="verdict" class="card verdict {cls}"><h2>Verdict</h2>{"".join(lines)}</section>'

    def summary(self) -> str:
        d = self.d
        inp, out = d.get("input") or {}, d.get("output") or {}
        macs_known = bool(d.get("calibration"))
        rows = []
        for key, name, unit in (("params", "parameters", ""), ("file_bytes", "file size", "B"),
                                ("macs", "MACs", ""), ("nodes", "nodes", "")):
            b, a = inp.get(key), out.get(key)
            if key == "macs" and not macs_known:
                rows.append(f"<tr><th>{name}</th><td colspan=3>unknown (no concrete input shapes)</td></tr>")
                continue
            r = ratio(b, a)
            rows.append(f"<tr><th>{name}</th>{self._sized(b, f'summary.{key}.before', unit)}"
                        f"{self._sized(a, f'summary.{key}.after', unit)}"
                        f"{fig(r, f'summary.{key}.ratio', '-' if r is None else f'{r:.3f}×', 'td')}</tr>")
        lat = d.get("latency")
        setup = ""
        if lat:
            b, a = lat["before"], lat["after"]
            sp = ratio(a["median_ms"], b["median_ms"])
            mb, ma = b["median_ms"], a["median_ms"]
            rows.append(f"<tr><th>latency (median)</th>"
                        f"{fig(mb, 'latency.before.median_ms', f'{mb:.3f} ms', 'td')}"
                        f"{fig(ma, 'latency.after.median_ms', f'{ma:.3f} ms', 'td')}"
                        f"{fig(sp, 'latency.speedup', '-' if sp is None else f'speed-up {sp:.2f}×', 'td')}</tr>")
            setup = (f'<p class="muted">latency: ONNX Runtime CPU, {esc(b.get("threads"))} thread(s), batch '
                     f'{esc(b.get("batch"))}, median of {esc(b.get("repeats"))} runs</p>')
        table = ('<table class="summary num" id="summary-table"><thead><tr><th></th><th>before</th><th>after</th>'
                 f'<th>after/before</th></tr></thead><tbody>{"".join(rows)}</tbody></table>')
        chart_rows = []
        for key, name in (("params", "parameters"), ("file_bytes", "file size"), ("macs", "MACs"), ("nodes", "nodes")):
            r = ratio(inp.get(key), out.get(key))
            if r is not None and (key != "macs" or macs_known):
                chart_rows.append((name, [1.0, r]))
        if lat and lat["before"].get("median_ms"):
            chart_rows.append(("latency", [1.0, lat["after"]["median_ms"] / lat["before"]["median_ms"]]))
        chart = bar_chart(chart_rows, key="summary.relative", percent=True,
                          scale_max=max([1.0] + [v[1] for _, v in chart_rows]),
                          caption="after as a share of before", widths=(80, 280, 70))
        notes = []
        for label, stats in (("input", inp), ("output", out)):
            if stats.get("macs_unknown"):
                notes.append(f"MACs not counted for {len(stats['macs_unknown'])} {label} node(s) with unknown shapes")
        return (f'<section id="summary" class="card"><h2>Model before and after</h2><div class="two">'
                f'<div>{table}{setup}{"".join(f"<p class=muted>{esc(n)}</p>" for n in notes)}</div>'
                f'<div><h3>After as a share of before</h3>{chart}</div></div></section>')

    @staticmethod
    def _sized(v: Any, key: str, unit: str) -> str:
        text = fmt_num(v) + (" B" if unit == "B" else "")
        hint = human(v, unit)
        return (f'<td class="n" data-sort="{jv(v)}"><span data-key="{esc(key)}" data-value="{jv(v)}">{esc(text)}</span>'
                f'<small>{esc(hint) if hint != fmt_num(v) else ""}</small></td>')

    def fidelity(self) -> str:
        fid = self.d.get("fidelity")
        if not fid:
            return ""
        data = self.d.get("fidelity_data") or {}
        rows = []
        for name, f in fid.items():
            if "error" in f:
                rows.append(f"<tr><th>{esc(name)}</th><td colspan=5>{esc(f['error'])}</td></tr>")
                continue
            cells = []
            for k, digits in (("cosine", 6), ("cosine_min", 6), ("top1_agreement", 4), ("rel_error", 4),
                              ("max_abs_error", 4)):
                v = f.get(k)
                cells.append(fig(v, f"fidelity.{name}.{k}", "-" if v is None else f"{v:.{digits}f}"
                                 if k in ("cosine", "cosine_min", "top1_agreement") else fmt_num(v, digits), "td"))
            rows.append(f"<tr><th>{esc(name)}</th>{''.join(cells)}</tr>")
        on = data.get("text") or "the calibration inputs (nothing held out)"
        return (f'<section id="fidelity" class="card"><h2>Output error vs the original</h2>'
                f'<p class="muted">ONNX Runtime, on {esc(on)}</p>'
                '<table class="num"><thead><tr><th>output</th><th>cosine</th><th>least per sample</th><th>top-1 agreement</th><th>relative error</th>'
                f'<th>max abs error</th></tr></thead><tbody>{"".join(rows)}</tbody></table></section>')

    def budget(self) -> str:
        b = self.d.get("budget")
        if not b:
            return ""
        target = b.get("target") or {}
        allow = {}
        for k, v in target.items():
            if is_num(v):
                allow[k] = v if k == "rel_error" else 1.0 - v
        head = ['<table class="num"><thead><tr><th>figure</th><th>target</th><th>allowance</th><th>error (verdict)</th>'
                "<th>error (tuning samples)</th></tr></thead><tbody>"]
        names = {"cosine": "cosine \u2265", "top1": "top-1 agreement \u2265", "rel_error": "relative error \u2264"}
        for k, v in target.items():
            if v is None:
                continue
            err, fit = (b.get("error") or {}).get(k), (b.get("tuning_error") or b.get("fit_error") or {}).get(k)
            head.append(f"<tr><th>{esc(names.get(k, k))}</th>{fig(v, f'budget.target.{k}', tag='td')}"
                        f"{fig(allow.get(k), f'budget.allowance.{k}', tag='td')}"
                        f"{fig(err, f'budget.error.{k}', tag='td')}{fig(fit, f'budget.tuning_error.{k}', tag='td')}</tr>")
        head.append("</tbody></table>")
        rows, charts = [], []
        for i, p in enumerate(b.get("passes") or []):
            spent = p.get("spent") or {}
            setting = (f"{p.get('option')}={p.get('setting')!r}" if p.get("tuned") or "setting" in p
                       else p.get("why", ""))
            tried = p.get("tried") or []
            tried_text = " ".join(f"{t.get('setting')!r}"
                                  f"{'✓' if t.get('fits') else '✗' if t.get('fits') is False else '~'}"
                                  for t in tried)
            cells = "".join(fig(spent.get(k), f"budget.passes.{i}.spent.{k}", tag="td") for k in allow)
            rows.append(f'<tr data-pass="{esc(p.get("pass"))}"><th>{esc(p.get("pass"))}</th><td>{esc(setting)}</td>'
                        f"{cells}<td>{esc(tried_text) or '-'}</td></tr>")
        for k, a in allow.items():
            data = [(str(p.get("pass")), [((p.get("spent") or {}).get(k) or 0.0) / a if a else None])
                    for p in b.get("passes") or []]
            if data:
                charts.append(f"<h3>Share of the {esc(k)} allowance ({fmt_num(a)}) spent per pass</h3>"
                              + bar_chart(data, ["share"], key=f"budget.share.{k}", percent=True,
                                          scale_max=max([1.0] + [v[0] or 0.0 for _, v in data]),
                                          marker=1.0, marker_label="allowance"))
        ths = "".join(f"<th>spent: {esc(k)}</th>" for k in allow)
        back = "".join(f"<li>{esc(x)}</li>" for x in b.get("back_off") or [])
        return (f'<section id="budget" class="card"><h2>Accuracy budget</h2>{"".join(head)}'
                f'<table><thead><tr><th>pass</th><th>setting</th>{ths}<th>tried (✓ fits, ✗ overspends)</th></tr>'
                f'</thead><tbody>{"".join(rows)}</tbody></table>'
                + (f"<h3>Back-off</h3><ul>{back}</ul>" if back else "") + "".join(charts) + "</section>")

    def notes(self) -> str:
        warnings = self.d.get("warnings") or []
        if not warnings:
            return '<section id="warnings" class="card"><h2>Warnings</h2><p class="muted">none</p></section>'
        items = "".join(f'<li data-key="warnings.{i}">{esc(w)}</li>' for i, w in enumerate(warnings))
        return f'<section id="warnings" class="card warn-list"><h2>Warnings</h2><ul>{items}</ul></section>'

    # ---- per layer

    def layer_charts(self) -> str:
        parts = []
        for figure, before, after in per_node(self.d):
            names = [n for n in dict.fromkeys(list(before) + list(after))]
            rows = [(n, [before.get(n), after.get(n)]) for n in names]
            parts.append(f"<h3>{esc(figure.replace('_', ' '))} before and after</h3>"
                         + bar_chart(rows, key=f"node.{figure}"))
        by_op_b, by_op_a = (self.d.get("input") or {}).get("macs_by_op"), (self.d.get("output") or {}).get("macs_by_op")
        groups: dict[tuple[str, str], list] = {}
        for c in self.changes:
            for name, b, a in c["pairs"]:
                groups.setdefault((c["pass"], name), []).append((c["layer"], [b, a]))
        for (pname, name), rows in groups.items():
            parts.append(f"<h3>{esc(pname)}: {esc(name.replace('_', ' '))} per layer, before and after</h3>"
                         + bar_chart(rows, key=f"{pname}.{name}"))
        if not parts and not by_op_b:
            return ""
        if by_op_b and self.d.get("calibration"):
            ops = sorted(set(by_op_b) | set(by_op_a or {}))
            parts.append("<h3>MACs by op type, before and after</h3>"
                         + bar_chart([(op, [by_op_b.get(op, 0), (by_op_a or {}).get(op, 0)]) for op in ops],
                                     key="macs_by_op"))
        note = ("" if per_node(self.d) else '<p class="muted">Per-layer MACs and parameters are charted where a '
                "pass reports them; the model statistics of this report hold MACs per op type, not per node.</p>")
        return f'<section id="layers" class="card"><h2>Where the cuts went</h2>{note}{"".join(parts)}</section>'

    def error_charts(self) -> str:
        groups: dict[tuple[str, str], list] = {}
        for c in self.changes:
            for k, v in c["details"].items():
                if ERROR_KEY.search(k) and is_num(v):
                    groups.setdefault((c["pass"], k), []).append((c["layer"], [v]))
        if not groups:
            return ""
        parts = [f"<h3>{esc(p)}: {esc(k.replace('_', ' '))} per layer</h3>" + bar_chart(rows, [k], key=f"{p}.{k}")
                 for (p, k), rows in groups.items()]
        return (f'<section id="errors" class="card"><h2>What each layer cost in error</h2>'
                '<p class="muted">Each pass\'s own per-layer measurement (svd: energy of the singular values kept; '
                "q8: output cosine lost by the layer's int8 weights; share/sparsify: weight error).</p>"
                f'{"".join(parts)}</section>')

    def q8(self) -> str:
        parts = []
        for p in self.d.get("passes") or []:
            if p.get("name") != "q8" and "float_layers" not in (p.get("stats") or {}):
                continue
            stats = p.get("stats") or {}
            rows = q8_decisions(p, self.d)
            body = "".join(
                f'<tr data-layer="{esc(r["layer"])}" data-precision="{r["precision"]}"><td>{esc(r["layer"])}</td>'
                f'<td class="prec {r["precision"]}">{r["precision"]}</td>{fig(r["sensitivity"], tag="td")}'
                f'<td>{esc(r["reason"])}</td></tr>' for r in rows)
            kernels = stats.get("int8_kernel_types") or {}
            left = stats.get("float_op_types_in_qdq") or {}
            mixed = stats.get("mixed_precision") or {}
            facts = []
            if kernels:
                facts.append(f'int8 kernels ONNX Runtime builds: <b data-key="q8.int8_kernels" '
                             f'data-value="{jv(stats.get("int8_kernels"))}">{fmt_num(stats.get("int8_kernels"))}</b> ('
                             + esc(", ".join(f"{k} {v}" for k, v in kernels.items())) + ")")
            if left:
                facts.append("float ops left between Q/DQ: " + esc(", ".join(f"{k} {v}" for k, v in left.items())))
            if mixed:
                facts.append(f"keep_float=auto: cosine with every layer int8 {fmt_num(mixed.get('cosine_all_quantized'), 6)}"
                             f" (budget {fmt_num(mixed.get('budget_cosine'))}), "
                             f"{fmt_num(mixed.get('candidates'))} candidates, {len(mixed.get('trials') or [])} trials")
            for c in p.get("changes") or []:
                if c.get("action") == "quantized":
                    facts.append(esc(f"mode {c.get('mode')}, activations {c.get('activations')}, "
                                     f"per-channel {c.get('per_channel')}"))
            floats = sum(r["precision"] == "float" for r in rows)
            chart = bar_chart([(r["layer"], [r["sensitivity"]]) for r in rows if is_num(r["sensitivity"])],
                              ["sensitivity"], key="q8.sensitivity")
            parts.append(f'<p>{"<br>".join(facts)}</p><p><b data-key="q8.float_layers" data-value="{floats}">{floats}'
                         f"</b> layer(s) kept float.</p>"
                         + (f"<h3>Measured sensitivity</h3>{chart}" if chart else "")
                         + '<table class="q8"><thead><tr><th>layer</th><th>precision</th><th>sensitivity</th>'
                         f'<th>why</th></tr></thead><tbody>{body}</tbody></table>')
        if not parts:
            return ""
        return f'<section id="q8" class="card"><h2>q8: int8 or float, per layer</h2>{"".join(parts)}</section>'

    def sparsity(self) -> str:
        rows = [(f"{c['layer']}", [c["sparsity"]]) for c in self.changes if c["sparsity"] is not None]
        if not rows:
            return ""
        return (f'<section id="sparsity" class="card"><h2>Sparsity per layer</h2>'
                '<p class="muted">Share of zero weights after the pass.</p>'
                + bar_chart(rows, ["sparsity"], key="sparsity", percent=True, scale_max=1.0) + "</section>")

    def ops(self) -> str:
        inp, out = self.d.get("input") or {}, self.d.get("output") or {}
        a, b = inp.get("op_counts") or {}, out.get("op_counts") or {}
        ops = sorted(set(a) | set(b))
        if not ops:
            return ""
        body = "".join(f'<tr class="{"changed" if a.get(op, 0) != b.get(op, 0) else ""}"><td>{esc(op)}</td>'
                       f"{fig(a.get(op, 0), f'ops.{op}.before', tag='td')}{fig(b.get(op, 0), f'ops.{op}.after', tag='td')}</tr>"
                       for op in ops)
        return (f'<section id="ops" class="card"><h2>Operators</h2><table class="ops num"><thead><tr><th>op</th>'
                f"<th>before</th><th>after</th></tr></thead><tbody>{body}</tbody></table></section>")

    def table(self) -> str:
        rows, dash = [], '<td data-sort="">-</td>'
        for c in self.changes:
            details = "; ".join(f"{k}={fmt_num(v) if is_num(v) else v}" for k, v in c["details"].items())
            pairs = c["pairs"] or [(None, None, None)]
            for name, b, a in pairs:
                r = ratio(b, a)
                rows.append(
                    f'<tr data-pass="{esc(c["pass"])}" data-layer="{esc(c["layer"])}" data-measure="{esc(name or "")}">'
                    f'<td>{esc(c["layer"])}</td><td>{esc(c["pass"])}</td><td>{esc(c["action"])}</td>'
                    f'<td>{esc((name or "-").replace("_", " "))}</td>'
                    f'{fig(b, tag="td") if name else dash}'
                    f'{fig(a, tag="td") if name else dash}'
                    f'{fig(r, None, "-" if r is None else f"{r:.3f}", "td") if name else dash}'
                    f"<td>{esc(details)}</td></tr>")
        for p in self.d.get("passes") or []:
            for s in p.get("skipped") or []:
                rows.append(f'<tr class="skipped" data-pass="{esc(p["name"])}" data-layer="{esc(s.get("item"))}" '
                            f'data-measure=""><td>{esc(s.get("item"))}</td><td>{esc(p["name"])}</td><td>skipped</td>'
                            f'<td>-</td><td data-sort="">-</td><td data-sort="">-</td><td data-sort="">-</td>'
                            f'<td>{esc(s.get("reason"))}</td></tr>')
        if not rows:
            return ""
        cols = ["layer", "pass", "action", "measure", "before", "after", "after/before", "details / reason"]
        ths = "".join(f'<th data-col="{i}" tabindex="0" aria-sort="none">{esc(c)}</th>' for i, c in enumerate(cols))
        return (f'<section id="table" class="card"><h2>Every layer the passes touched</h2>'
                '<p class="muted noprint">Click a column heading to sort (again to reverse).</p>'
                f'<table id="layer-table" class="sortable"><thead><tr>{ths}</tr></thead>'
                f'<tbody>{"".join(rows)}</tbody></table></section>')

    def pass_details(self) -> str:
        items = []
        for p in self.d.get("passes") or []:
            stats = "".join(f"<tr><th>{esc(k)}</th><td>{esc(_compact(v))}</td></tr>" for k, v in (p.get("stats") or {}).items())
            secs = p.get("seconds")
            items.append(f'<div class="pass" data-pass="{esc(p["name"])}"><h3>{esc(p["name"])} '
                         f'<small>{esc(p.get("status"))}'
                         f'{f", {secs:.2f} s" if is_num(secs) else ""}, {esc(p.get("nodes_after"))} nodes after, '
                         f'{len(p.get("changes") or [])} changes, {len(p.get("skipped") or [])} skipped</small></h3>'
                         + (f'<p class="opts"><b>options</b> {esc(_compact(p.get("options")))}</p>' if p.get("options") else "")
                         + (f'<table class="kv">{stats}</table>' if stats else "<p class=muted>no statistics</p>")
                         + "</div>")
        if not items:
            return ""
        return f'<section id="passes" class="card"><h2>Passes</h2>{"".join(items)}</section>'

    def footer(self) -> str:
        return ('<footer>Written by onnxslim-cnn (onnxslim_cnn/report_html.py). Self-contained: inline CSS, '
                "SVG and script; nothing is loaded from the network. The same figures are in the JSON report "
                "(--report FILE.json).</footer>")


def _compact(v: Any) -> str:
    if isinstance(v, float):
        return fmt_num(v, 6)
    if isinstance(v, (dict, list)):
        text = json.dumps(v, allow_nan=True)
        return text if len(text) < 400 else text[:397] + "..."
    return str(v)


def _budget_target_text(b: dict) -> str:
    t = b.get("target") or {}
    parts = []
    if t.get("cosine") is not None:
        parts.append(f"cosine \u2265 {t['cosine']:g}")
    if t.get("top1") is not None:
        parts.append(f"top-1 agreement \u2265 {t['top1']:g}")
    if t.get("rel_error") is not None:
        parts.append(f"relative error \u2264 {t['rel_error']:g}")
    return ", ".join(parts) or "no bound"


# --------------------------------------------------------------------------- style and script

CSS = """
:root { --fg:#1d2330; --muted:#5b6475; --line:#d9dde5; --bg:#f5f6f9; --card:#fff;
        --s0:#9aa7bd; --s1:#2f6fdf; --ok:#1f8a4c; --bad:#c0392b; --warn:#b7791f; }
* { box-sizing: border-box; }
body { margin:0; background:var(--bg); color:var(--fg);
       font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif; }
main { max-width: 1180px; margin: 0 auto; padding: 16px 20px 40px; }
header h1 { margin: 4px 0 0; font-size: 22px; }
.sub, .muted { color: var(--muted); }
.sub { margin: 2px 0 12px; }
.card { background:var(--card); border:1px solid var(--line); border-radius:8px; padding:12px 16px; margin:12px 0;
        break-inside: avoid-page; }
h2 { font-size: 17px; margin: 2px 0 8px; }
h3 { font-size: 14px; margin: 14px 0 4px; }
h3 small { font-weight: normal; color: var(--muted); }
.verdict { border-left: 6px solid var(--muted); }
.verdict.ok { border-left-color: var(--ok); } .verdict.bad { border-left-color: var(--bad); }
.verdict.warn { border-left-color: var(--warn); }
.verdict .big { font-size: 16px; margin: 4px 0; }
.verdict.ok .big b, .verdict.ok h2 { color: var(--ok); } .verdict.bad .big b, .verdict.bad h2 { color: var(--bad); }
.two { display: grid; grid-template-columns: minmax(0, 1fr) minmax(0, 1fr); gap: 16px; align-items: start; }
@media (max-width: 900px) { .two { grid-template-columns: 1fr; } }
table { border-collapse: collapse; width: 100%; font-variant-numeric: tabular-nums; }
th, td { text-align: left; padding: 3px 8px; border-bottom: 1px solid var(--line); vertical-align: top; }
td[data-value], td.n { text-align: right; white-space: nowrap; }
td small { display: block; color: var(--muted); font-size: 11px; }
thead th { background: #eef1f6; font-weight: 600; }
table.num thead th:not(:first-child) { text-align: right; }
table.sortable thead th { cursor: pointer; user-select: none; white-space: nowrap; }
table.sortable thead th[aria-sort=ascending]::after { content: " \\25B2"; font-size: 10px; }
table.sortable thead th[aria-sort=descending]::after { content: " \\25BC"; font-size: 10px; }
tr.skipped td { color: var(--muted); }
tr.changed td { font-weight: 600; }
#layer-table { font-size: 12.5px; }
#layer-table td:last-child { word-break: break-word; }
table.kv th { width: 16em; font-weight: 500; color: var(--muted); }
table.ops { width: auto; min-width: 40%; }
table.kv td { word-break: break-word; font-family: ui-monospace, Menlo, Consolas, monospace; font-size: 12px; }
td.prec.int8 { color: var(--s1); font-weight: 600; } td.prec.float { color: var(--warn); font-weight: 600; }
.warn-list li { color: var(--warn); margin: 2px 0; }
svg.chart { display: block; max-width: 860px; margin: 2px 0 8px; }
svg.chart text { font-size: 11px; fill: var(--fg); }
svg.chart text.value, svg.chart text.legend { fill: var(--muted); }
svg.chart .s0 { fill: var(--s0); } svg.chart .s1 { fill: var(--s1); }
svg.chart line.marker { stroke: var(--bad); stroke-dasharray: 4 3; stroke-width: 1.2; }
p.opts { font-family: ui-monospace, Menlo, Consolas, monospace; font-size: 12px; word-break: break-word; margin: 2px 0 6px; }
footer { color: var(--muted); font-size: 12px; margin-top: 20px; }
@media print {
  @page { margin: 12mm; }
  body { background: #fff; font-size: 11px; }
  main { max-width: none; padding: 0; }
  .card { border: 1px solid #bbb; border-radius: 0; box-shadow: none; }
  .noprint { display: none; }
  * { -webkit-print-color-adjust: exact; print-color-adjust: exact; }
  tr { break-inside: avoid; }
  .two { grid-template-columns: 1fr 1fr; }
}
"""

# Sorting only; the page is complete without it. "#sort=<column>-<asc|desc>" in the address sorts on
# load (a link to a sorted view; the tests use it).
JS = r"""
(function () {
  var table = document.getElementById("layer-table");
  if (!table) return;
  var heads = table.tHead.rows[0].cells;
  function key(cell) {
    var s = cell.getAttribute("data-sort");
    if (s !== null) { var n = parseFloat(s); return isNaN(n) ? null : n; }
    return cell.textContent.trim().toLowerCase();
  }
  function sort(col, dir) {
    var body = table.tBodies[0], rows = Array.prototype.slice.call(body.rows);
    rows.forEach(function (r, i) { r._i = i; });
    rows.sort(function (a, b) {
      var x = key(a.cells[col]), y = key(b.cells[col]);
      if (x === null && y === null) return a._i - b._i;
      if (x === null) return 1;
      if (y === null) return -1;
      var c = (typeof x === "number" && typeof y === "number") ? x - y : String(x).localeCompare(String(y));
      return (dir === "desc" ? -c : c) || a._i - b._i;
    });
    rows.forEach(function (r) { body.appendChild(r); });
    for (var i = 0; i < heads.length; i++) heads[i].setAttribute("aria-sort", "none");
    heads[col].setAttribute("aria-sort", dir === "desc" ? "descending" : "ascending");
  }
  for (var i = 0; i < heads.length; i++) (function (i) {
    function go() { sort(i, heads[i].getAttribute("aria-sort") === "ascending" ? "desc" : "asc"); }
    heads[i].addEventListener("click", go);
    heads[i].addEventListener("keydown", function (e) { if (e.key === "Enter" || e.key === " ") { e.preventDefault(); go(); } });
  })(i);
  var m = /sort=(\d+)-(asc|desc)/.exec(location.hash);
  if (m && +m[1] < heads.length) sort(+m[1], m[2]);
})();
"""
