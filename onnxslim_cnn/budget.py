"""One accuracy budget for the whole pipeline, shared among its lossy passes.

The budget is what a user can judge a compressed model by: the least cosine similarity of every
output to the original's (over all samples: per sample, PP-OCRv4 rec's CTC probabilities swing
at uncertain positions, so one sample at 0.85 came with an unchanged character error rate), the least top-1 agreement for classifier-shaped outputs ([N, C]) and,
optionally, the largest error relative to each output's scale. Default: cosine >= 0.99 and top-1
agreement >= 0.99, measured in the end on the held-out samples no pass fitted on.

How it is shared. Each lossy pass declares a ``Knob`` (``pass_infra.Knob``): the option that
sets how hard it cuts and a ladder of values, strongest first. The error a pass may add is the
part of the allowance not yet spent, divided by the tunable lossy passes still to run, so what one
pass leaves unused goes to the next. Each pass is measured on the model as cut so far, so
what earlier passes spent is in its figure and errors need not add up for the share to hold.
A pass's rung is picked by bisection over its ladder (the error rises
with the cut, so three or four runs decide among seven rungs), each candidate measured against
the original model on the *fit* samples; a pass whose weakest rung still overspends is left out.
Per layer, each pass then chooses within its rung from its own measured sensitivity (prune's
importance scores, svd's per-layer output error, q8's float-kept sensitive layers).

Explicit settings win: a knob whose option the user set is run once as given, and its error is
charged to the budget like any other. When the whole result still misses the budget on the fit
samples (a fixed pass overspent), the pipeline backs off: the tuned pass with the least gain per
unit of error spent steps one rung weaker, the passes after it run again, and the result is
measured again, until the budget is met or nothing is left to give back. The held-out verdict
is final: a miss there exits 3 (``Report.problems``).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

from .errors import UserError

OFF = "off"  # the rung below a ladder's last: the pass is left out


@dataclass(frozen=True)
class Budget:
    """Least output cosine, least top-1 agreement (classifier-shaped outputs only), largest
    relative output error (None: not bounded)."""

    cosine: "float | None" = 0.99
    top1: "float | None" = 0.99
    rel_error: "float | None" = None
    # Cuts that exist for speed (prune, svd, lowrank, q8) must make the model run faster, timed
    # at batch 1; which are kept then depends on timings, and near-ties on a busy machine can
    # differ between runs. faster=off keeps the choice on the measured error alone (same bytes).
    faster: bool = True

    @classmethod
    def parse(cls, text: "str | dict | Budget | None") -> "Budget | None":
        """``"cosine=0.995,top1=0.98,rel_error=0.1"`` (unnamed keys keep their defaults), a dict
        of the same, a Budget, or ``"off"``/None-like for no budget."""
        if text is None or isinstance(text, Budget):
            return text
        if isinstance(text, str) and text.strip().lower() in ("off", "none", ""):
            return None
        items: dict[str, Any] = {}
        if isinstance(text, dict):
            items = dict(text)
        else:
            for part in str(text).split(","):
                key, sep, value = part.partition("=")
                if not sep:
                    raise UserError(f"bad --budget item {part!r}: use cosine=0.99,top1=0.99,rel_error=0.05 or off")
                items[key.strip()] = value.strip()
        fields = {"cosine": (0.0, 1.0), "top1": (0.0, 1.0), "rel_error": (0.0, math.inf)}
        values: dict[str, Any] = {}
        for key, raw in items.items():
            if key == "faster":
                flag = str(raw).strip().lower()
                if flag not in ("on", "off", "true", "false", "1", "0", "yes", "no"):
                    raise UserError(f"bad --budget faster={raw!r}: on or off")
                values[key] = flag in ("on", "true", "1", "yes")
                continue
            if key not in fields:
                raise UserError(f"unknown --budget key {key!r} (known: cosine, top1, rel_error, faster)")
            if raw is None or str(raw).strip().lower() in ("none", "off"):
                values[key] = None
                continue
            try:
                v = float(raw)
            except (TypeError, ValueError):
                v = math.nan
            lo, hi = fields[key]
            if not (lo <= v <= hi) or (key == "rel_error" and v == 0):
                raise UserError(f"bad --budget {key}={raw!r}: a number within [{lo}, {hi}]"
                                + (", above 0" if key == "rel_error" else ""))
            values[key] = v
        return cls(**values)

    def to_dict(self) -> dict:
        return asdict(self)

    def allowance(self) -> dict[str, float]:  # (faster is a rule, not an allowance)
        """The error each bounded figure may take: 1 - cosine, 1 - top1, rel_error."""
        out = {}
        if self.cosine is not None:
            out["cosine"] = 1.0 - self.cosine
        if self.top1 is not None:
            out["top1"] = 1.0 - self.top1
        if self.rel_error is not None:
            out["rel_error"] = self.rel_error
        return out

    def limits(self, spent: dict[str, float], passes_left: int) -> dict[str, float]:
        """The total error allowed after the next pass: what is spent plus an equal share (over
        the ``passes_left`` tunable passes including the next one) of what is left."""
        out = {}
        for key, allowed in self.allowance().items():
            used = spent.get(key, 0.0)
            out[key] = used + max(allowed - used, 0.0) / max(passes_left, 1)
        return out


def spent(fidelity: dict) -> dict[str, float]:
    """The error of a fidelity dict (``analysis.fidelity.compare``) in budget terms: 1 - least
    cosine, 1 - least top-1 agreement (classifier outputs), largest relative error. An output
    whose shape changed, or a non-finite figure, spends everything."""
    cos, top, rel = 0.0, 0.0, 0.0
    for f in fidelity.values():
        if "error" in f:
            return {"cosine": math.inf, "top1": math.inf, "rel_error": math.inf}
        c = f["cosine"]
        cos = max(cos, 1.0 - c if math.isfinite(c) else math.inf)
        r = f["rel_error"]
        rel = max(rel, r if math.isfinite(r) else math.inf)
        if "top1_agreement" in f:
            top = max(top, 1.0 - f["top1_agreement"])
    return {"cosine": cos, "top1": top, "rel_error": rel}


def within(error: dict[str, float], limits: dict[str, float]) -> bool:
    """Every bounded figure of ``error`` at or under its limit (a hair of float slack)."""
    return all(error.get(k, 0.0) <= v + 1e-9 for k, v in limits.items())


def shortfall(budget: Budget, error: dict[str, float]) -> list[str]:
    """Why ``error`` misses ``budget``, one phrase per figure ("cosine 0.9812 < 0.99")."""
    out = []
    if any(not math.isfinite(v) for v in error.values()):
        # a changed output shape, or outputs that are not finite (the original's own NaN on
        # these inputs included): nothing can vouch for the result
        return ["outputs not comparable (a shape changed or values are not finite)"]
    if budget.cosine is not None and error.get("cosine", 0.0) > 1.0 - budget.cosine + 1e-9:
        out.append(f"cosine {1.0 - error['cosine']:.4f} < {budget.cosine:g}")
    if budget.top1 is not None and error.get("top1", 0.0) > 1.0 - budget.top1 + 1e-9:
        out.append(f"top-1 agreement {1.0 - error['top1']:.4f} < {budget.top1:g}")
    if budget.rel_error is not None and error.get("rel_error", 0.0) > budget.rel_error + 1e-9:
        out.append(f"relative error {error['rel_error']:.4f} > {budget.rel_error:g}")
    return out


def rounded(error: dict[str, float]) -> dict[str, float]:
    return {k: (round(v, 6) if math.isfinite(v) else None) for k, v in error.items()}


def bisect_ladder(n: int, fits) -> int:
    """The first index in ``range(n + 1)`` for which ``fits(index)`` holds, assuming it holds
    from some index on and always at ``n`` (the "off" rung, which ``fits`` is never asked
    about). ``fits`` is called about log2(n + 1) times."""
    lo, hi = 0, n  # answer in [lo, hi]; hi known to fit
    while lo < hi:
        mid = (lo + hi) // 2
        if fits(mid):
            hi = mid
        else:
            lo = mid + 1
    return lo
