"""The report: model statistics before/after, what each pass changed or skipped, fidelity, latency.

The table knows no pass's own keys. Under each pass it lists the changes whose details carry
numeric ``<name>_before`` / ``<name>_after`` pairs, one line per change:
``item: <before> -> <after> <name>`` (several pairs joined by ", ", underscores of the name
shown as spaces), e.g. prune's ``channels_before=16, channels_after=8`` as ``16 -> 8 channels``.
"""

from __future__ import annotations

import json
import numbers
from dataclasses import dataclass, field
from typing import Any

from .analysis.cost import ModelStats


@dataclass
class PassRecord:
    name: str
    options: dict[str, Any]
    changed: bool
    stats: dict[str, Any]
    changes: list[dict]
    skipped: list[dict]
    seconds: float
    status: str
    nodes_after: int

    @classmethod
    def from_result(cls, p: Any, result: Any, seconds: float, status: str, nodes_after: int) -> "PassRecord":
        from dataclasses import asdict

        return cls(p.name, asdict(p.options), result.changed, dict(result.stats), list(result.changes),
                   list(result.skipped), seconds, status, nodes_after)


@dataclass
class Report:
    input: ModelStats
    calibration: "str | None" = None
    output: "ModelStats | None" = None
    passes: list[PassRecord] = field(default_factory=list)
    fidelity: "dict | None" = None
    # What fidelity was measured on: {"set": "held-out"|"fit", "samples", "source", "text"}
    fidelity_data: "dict | None" = None
    latency: "dict | None" = None
    warnings: list[str] = field(default_factory=list)
    # The accuracy budget: target, per pass the setting chosen, what was tried and what it spent,
    # the back-off, and the verdict on the held-out samples (pipeline._Tuner.summary)
    budget: "dict | None" = None

    @property
    def problems(self) -> list[str]:
        """Why the run did not do all it was asked to, one line each: a pass that failed (crashed
        or broke its declared contract) or whose output was invalid and reverted. Empty when
        every pass ran; the CLI exits 3 when it is not."""
        out = []
        for p in self.passes:
            if p.status == "failed":
                reason = next((s["reason"] for s in reversed(p.skipped) if s["reason"].startswith("pass failed")),
                              "pass failed")
                out.append(f"pass {p.name} failed{reason[len('pass failed'):]}")
            elif p.status.startswith("reverted"):
                out.append(f"pass {p.name} produced an invalid model and was reverted{p.status[len('reverted'):]}")
        if self.budget and self.budget.get("met") is False:
            where = "held-out" if self.budget.get("measured_on") == "held-out" else "calibration"
            out.append(f"accuracy budget missed on the {self.budget.get('samples')} {where} samples: "
                       f"{', '.join(self.budget['missed'])} (loosen it with --budget, or give more or "
                       "more representative --calib data)")
        return out

    def to_dict(self, *, timings: bool = True) -> dict:
        """JSON-ready dict; ``timings=False`` drops wall-clock figures (for byte-stable reports)."""
        passes = []
        for p in self.passes:
            d = {k: v for k, v in p.__dict__.items() if timings or k != "seconds"}
            passes.append(d)
        return {
            "input": self.input.to_dict(),
            "output": self.output.to_dict() if self.output else None,
            "passes": passes,
            "fidelity": self.fidelity,
            "fidelity_data": self.fidelity_data,
            "latency": self.latency if timings else None,
            "calibration": self.calibration,
            "budget": self.budget,
            "warnings": self.warnings,
            "problems": self.problems,
        }

    def to_json(self, **kw: Any) -> str:
        return json.dumps(self.to_dict(**kw), indent=2, sort_keys=False, default=_jsonable)

    def to_html(self, **kw: Any) -> str:
        """One self-contained HTML page (inline SVG charts, no network at view time): see report_html."""
        from .report_html import render_html

        return render_html(self, **kw)

    def format_table(self, *, max_items: int = 12) -> str:
        return "\n".join(_table_lines(self, max_items))


def _jsonable(obj: Any) -> Any:
    if hasattr(obj, "item"):
        return obj.item()
    if isinstance(obj, (set, tuple)):
        return list(obj)
    return str(obj)


def _fmt_int(n: "int | None") -> str:
    if n is None:
        return "-"
    for unit, div in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.2f}{unit}"
    return str(n)


def _fmt_bytes(n: int) -> str:
    for unit, div in (("GB", 1 << 30), ("MB", 1 << 20), ("kB", 1 << 10)):
        if n >= div:
            return f"{n / div:.2f} {unit}"
    return f"{n} B"


def before_after_pairs(details: dict) -> list[tuple[str, Any, Any]]:
    """``(name, before, after)`` for every numeric ``<name>_before`` / ``<name>_after`` pair in a
    change's details, in the order of the ``_before`` keys."""
    pairs = []
    for key, before in details.items():
        if key.endswith("_before") and key[:-7]:
            name = key[:-7]
            after = details.get(f"{name}_after")
            if _is_number(before) and _is_number(after):
                pairs.append((name, before, after))
    return pairs


def _is_number(v: Any) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


def _fmt_value(v: Any) -> str:
    return str(v) if isinstance(v, numbers.Integral) else f"{float(v):.4g}"


def _ratio(a: float, b: float) -> str:
    return f"{b / a:.3f}x" if a else "-"


def _table_lines(r: Report, max_items: int) -> list[str]:
    inp, out = r.input, r.output or r.input
    lines = ["", "Model                    before          after        after/before"]
    rows = [
        ("parameters", _fmt_int(inp.params), _fmt_int(out.params), _ratio(inp.params, out.params)),
        ("file size", _fmt_bytes(inp.file_bytes), _fmt_bytes(out.file_bytes), _ratio(inp.file_bytes, out.file_bytes)),
        ("MACs", _fmt_int(inp.macs) if r.calibration else "unknown", _fmt_int(out.macs) if r.calibration else "unknown",
         _ratio(inp.macs, out.macs) if r.calibration else "-"),
        ("nodes", str(inp.nodes), str(out.nodes), _ratio(inp.nodes, out.nodes)),
    ]
    lines += [f"  {a:<20}{b:>12}{c:>15}{d:>15}" for a, b, c, d in rows]
    ops = sorted(set(inp.op_counts) | set(out.op_counts))
    changed_ops = [op for op in ops if inp.op_counts.get(op, 0) != out.op_counts.get(op, 0)]
    if changed_ops:
        lines.append("  ops changed: " + ", ".join(
            f"{op} {inp.op_counts.get(op, 0)}->{out.op_counts.get(op, 0)}" for op in changed_ops))
    for label, stats in (("input", inp), ("output", r.output)):
        if stats is not None and stats.macs_unknown:
            lines.append(f"  MACs not counted for {len(stats.macs_unknown)} {label} node(s) with unknown shapes")
    lines.append("")
    lines.append("Passes")
    for p in r.passes:
        stats = ", ".join(f"{k}={v}" for k, v in p.stats.items()) or "no change"
        lines.append(f"  {p.name:<10} {p.seconds:6.2f}s  {p.status:<4}  nodes->{p.nodes_after}  {stats}")
        sized = [(c["item"], pairs) for c in p.changes if (pairs := before_after_pairs(c))]
        for item, pairs in sized[:max_items]:
            lines.append(f"      {item}: " + ", ".join(f"{_fmt_value(b)} -> {_fmt_value(a)} {name.replace('_', ' ')}"
                                                      for name, b, a in pairs))
        if len(sized) > max_items:
            lines.append(f"      ... {len(sized) - max_items} more layers (see --report)")
        for s in p.skipped[:max_items]:
            lines.append(f"      skipped {s['item']}: {s['reason']}")
        if len(p.skipped) > max_items:
            lines.append(f"      ... {len(p.skipped) - max_items} more skipped (see --report)")
    if r.fidelity is not None:
        lines.append("")
        on = r.fidelity_data["text"] if r.fidelity_data and r.fidelity_data["set"] == "held-out" else f"{r.calibration} inputs"
        lines.append(f"Fidelity vs original (ONNX Runtime, {on})")
        for name, f in r.fidelity.items():
            if "error" in f:
                lines.append(f"  {name}: {f['error']}")
                continue
            top1 = f"  top1 agreement {f['top1_agreement']:.4f}" if "top1_agreement" in f else ""
            cosmin = f" (least per sample {f['cosine_min']:.6f})" if "cosine_min" in f else ""
            lines.append(f"  {name}: max abs err {f['max_abs_error']:.3g}  rel {f['rel_error']:.3g}"
                         f"  cosine {f['cosine']:.6f}{cosmin}{top1}")
    if r.budget:
        lines.extend(_budget_lines(r.budget))
    if r.latency:
        b, a = r.latency["before"], r.latency["after"]
        lines.append("")
        lines.append(f"Latency (ORT CPU, {b['threads']} thread, batch {b['batch']}, median of {b['repeats']})")
        lines.append(f"  before {b['median_ms']:.3f} ms   after {a['median_ms']:.3f} ms   "
                     f"speed-up {b['median_ms'] / a['median_ms']:.2f}x")
    for w in r.warnings:
        lines.append(f"warning: {w}")
    return lines


def _budget_lines(b: dict) -> list[str]:
    t = b["target"]
    wants = [f"cosine >= {t['cosine']:g}" if t.get("cosine") is not None else "",
             f"top-1 agreement >= {t['top1']:g}" if t.get("top1") is not None else "",
             f"relative error <= {t['rel_error']:g}" if t.get("rel_error") is not None else ""]
    verdict = {True: "met", False: "MISSED", None: "not measured"}[b.get("met")]
    where = f" on {b.get('samples')} {b.get('measured_on')} samples" if b.get("measured_on") else ""
    lines = ["", f"Accuracy budget ({', '.join(w for w in wants if w)}): {verdict}{where}"
             + (f": {', '.join(b['missed'])}" if b.get("missed") else "")]
    for p in b["passes"]:
        spent = ", ".join(f"{k} {v:.4f}" for k, v in p["spent"].items() if v is not None)
        if p["tuned"]:
            tried = " ".join(f"{t['setting']!r}{'+' if t['fits'] else '-' if t['fits'] is False else '~'}"
                             for t in p["tried"])
            lines.append(f"  {p['pass']:<10} {p['option']}={p['setting']!r}  spent {spent}  (tried {tried})")
        else:
            lines.append(f"  {p['pass']:<10} {p['why']}  spent {spent}")
    for line in b.get("back_off", []):
        lines.append(f"  back-off: {line}")
    return lines
