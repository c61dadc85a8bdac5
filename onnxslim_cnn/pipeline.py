"""The pipeline: load, run passes in order, validate after each, measure, report.

For each pass the pipeline hands it the current model (a GraphPass gets a fresh Graph wrapper,
a ModelPass the ModelProto; see ``pass_infra``), checks that it changed only what it declares,
validates what it returns (ONNX checker with ``full_check`` plus an ONNX Runtime load), and
collects its ``PassResult`` into the report. A pass that crashes, breaks its contract or returns
an invalid model is reported as such and the model before it is kept.
"""

from __future__ import annotations

import functools
import os
import time
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import onnx

from .analysis.calibration import DEFAULT_HELDOUT, check_heldout
from .budget import OFF, Budget, bisect_ladder, rounded, shortfall, spent, within
from . import workdir
from .analysis.cost import model_stats, sample_feeds
from .analysis.fidelity import fidelity as measure_fidelity
from .analysis.fidelity import latency as measure_latency
from .analysis.fidelity import reference_outputs
from .context import RANDOM, PassContext
from .errors import UserError
from .model_io import check_model, load_model
from .pass_infra import Pass, PassResult, checked_transform, resolve_passes
from .sessions import make_session

# --------------------------------------------------------------------------- pipeline

# Below this cosine similarity to the original outputs the report warns: exact passes stay
# above 0.999999, and lossy ones that keep accuracy stayed above 0.99 on our benches.
LOW_COSINE = 0.99
# Share of the fit samples the accuracy budget keeps for measuring its choices (``ctx.tuning``):
# the same rule as the held-out split (at least 8, only from 16 samples on).
TUNING_SHARE = 0.25
# A must_be_faster knob's rung must run in at most this share of the time before it (the
# margin keeps a tie on a noisy machine from flipping the decision, and so the output bytes)
LATENCY_MARGIN = 0.97


@dataclass
class PipelineResult:
    model: onnx.ModelProto
    report: "Any"  # report.Report


def validate(model: onnx.ModelProto) -> "tuple[str | None, object]":
    """(None, session) when the model passes the full ONNX check and loads in ONNX Runtime,
    else (why not, None). The session is reused for fidelity, loading big models is slow."""
    try:
        check_model(model, full_check=True)
    except Exception as exc:
        return f"ONNX checker: {str(exc).strip().splitlines()[0]}", None
    try:
        return None, make_session(model)
    except Exception as exc:
        return f"onnxruntime load: {str(exc).strip().splitlines()[0]}", None


def _in_run_folder(fn):
    """Run ``fn`` inside this run's temporary folder (``workdir.run_folder``): every temp file
    of the passes and of ORT's tools lands there and goes with it."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with workdir.run_folder():
            return fn(*args, **kwargs)
    return wrapper


@dataclass
class _Outcome:
    """One run of one pass on one model: what it returned and how that went."""

    model: onnx.ModelProto          # the model after the pass (the one it was given when it did nothing)
    result: PassResult
    status: str                     # "ok", "failed", "reverted: <why>"
    session: Any                    # ORT session of ``model`` when the pass changed it
    seconds: float
    error: "dict[str, float] | None" = None  # budget terms vs the original on the tuning samples


def _run_pass(p: Pass, current: onnx.ModelProto, session: Any, ctx: PassContext) -> _Outcome:
    """Run ``p`` on ``current``; a crash, a broken contract or an invalid result keeps ``current``."""
    t0 = time.perf_counter()
    try:
        candidate, result = checked_transform(p, current, ctx)
    except UserError:
        raise
    except Exception as exc:
        # A crashing pass is a bug; the model it was given is still good, so keep it and say so.
        if os.environ.get("ONNXSLIM_CNN_DEBUG"):
            raise
        result, candidate = PassResult(), current
        result.skip(p.name, f"pass failed: {type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}")
    problem, new_session = validate(candidate) if result.changed else (None, None)
    failed = bool(result.skipped and result.skipped[-1]["reason"].startswith("pass failed"))
    status = "failed" if failed else "ok"
    if problem:
        # A pass that breaks the model is a bug; the user still gets a valid model.
        status = f"reverted: {problem}"
    if result.changed and not problem:
        return _Outcome(candidate, result, status, new_session, time.perf_counter() - t0)
    return _Outcome(current, result, status, session, time.perf_counter() - t0)


@dataclass
class _Step:
    """A pass of the pipeline, with what the budget needs to re-run it at another setting."""

    pass_: Pass
    user: dict                       # the options the user set (they always win)
    base: dict                       # user options over the recovery defaults
    knob: Any = None                 # pass_infra.Knob when the budget tunes this pass
    rung: "int | None" = None        # chosen index into knob.ladder (len(ladder): left out)
    before: Any = None               # (model, session, error) the step started from
    outcome: "_Outcome | None" = None
    tried: list = None
    limits: "dict | None" = None

    @property
    def tuned(self) -> bool:
        return self.knob is not None

    def make(self, rung: "int | None", limits: "dict | None") -> Pass:
        if rung is None:
            return self.pass_
        opts = {**self.knob.rung_options.get(rung, {}), **self.base}
        opts[self.knob.option] = self.knob.ladder[rung]
        if self.knob.target_option and self.knob.target_option not in self.user and limits and "cosine" in limits:
            opts[self.knob.target_option] = round(max(0.0, 1.0 - limits["cosine"]), 6)
        return type(self.pass_)(opts)


def _steps(pass_objs: list[Pass], names: list, options: dict, real_data: bool, tune: bool) -> list[_Step]:
    """Recovery on for named lossy passes when real data is given; the knob when it is free."""
    steps = []
    for p, given in zip(pass_objs, names):
        knob = type(p).budget_knob if isinstance(given, str) else None
        if knob is None:
            steps.append(_Step(p, {}, {}))
            continue
        user = dict(options.get(p.name) or {})
        base = {**(knob.recovery if real_data else {}), **user}
        if base != user:
            p = type(p)(base)
        free = tune and knob.option not in user and not set(knob.fixed_by) & set(user)
        steps.append(_Step(p, user, base, knob if free else None))
    return steps


@_in_run_folder
def run_pipeline(source: "str | onnx.ModelProto", passes: "list[str | Pass] | None" = None, *,
                 options: "dict[str, dict] | None" = None, calib: Any = None,
                 input_shapes: "dict[str, tuple] | None" = None, seed: int = 0,
                 fidelity: bool = True, bench: bool = False,
                 progress: "Callable[[int, int, str], None] | None" = None,
                 preprocess: Any = None, heldout: "float | None" = None,
                 budget: Any = "default") -> PipelineResult:
    """Load, run ``passes`` in order (default: ``slim``), validate after each, measure, report.

    ``calib``: an ``.npz`` path, a folder of images (with ``preprocess``, see
    ``analysis/images.py``), a dict of arrays, or ``"random"`` (the documented generator, asked
    for explicitly); None is allowed only when no pass is lossy. ``heldout``: the share of the
    samples kept out of fitting for the report's fidelity (default 0.25, see ``calibration.split``).
    ``budget``: the accuracy budget the lossy passes share (``budget.Budget``, its text form
    ``"cosine=0.99,top1=0.99"``, a dict, or ``"off"``/None to run the passes as configured);
    default cosine >= 0.99 and top-1 agreement >= 0.99 (see ``onnxslim_cnn/budget.py``).
    """
    from .report import PassRecord, Report

    target = Budget() if isinstance(budget, str) and budget == "default" else Budget.parse(budget)
    names = list(passes) if passes else ["slim"]
    pass_objs = resolve_passes(names, options)
    heldout = DEFAULT_HELDOUT if heldout is None else check_heldout(heldout)
    original = load_model(source)
    try:
        original_session = make_session(original)
    except Exception as exc:
        raise UserError(f"onnxruntime cannot load the input model: {str(exc).strip().splitlines()[0]}") from None
    lossy = [p.name for p in pass_objs if p.lossy]
    if calib is None and lossy:
        raise UserError(f"{', '.join(lossy)} {'is' if len(lossy) == 1 else 'are'} lossy: give --calib FILE.npz or "
                        "--calib DIR --preprocess PRESET with real samples to fit and check on, or --calib random "
                        "to accept unverified output from random inputs")
    tunes = target is not None and bool(lossy)
    ctx = PassContext(original, calib=calib, input_shapes=input_shapes, seed=seed, preprocess=preprocess,
                      heldout=heldout, tuning=TUNING_SHARE if tunes else 0.0)
    ctx.original_session = original_session
    try:
        calibration = ctx.calibration
    except UserError as exc:
        # Dynamic spatial dims and no --input-shape: passes that need data cannot run, but a
        # clean-up still can; only MACs and fidelity are lost, and the report says so.
        if calib is not None or any(p.needs_calibration for p in pass_objs):
            raise
        calibration = None
        fidelity = bench = False
        ctx.warnings.append(f"{exc}; MACs, fidelity and latency not measured")
    cost_shapes = calibration.cost_shapes() if calibration else None
    cost_feeds = sample_feeds(calibration.inputs, cost_shapes) if calibration else None  # shapes static inference lacks
    report = Report(input=model_stats(original, cost_shapes, cost_feeds),
                    calibration=calibration.source if calibration else None)

    real_data = calib is not None and not (isinstance(calib, str) and calib == RANDOM)
    use_budget = tunes and calibration is not None
    steps = _steps(pass_objs, names, options or {}, real_data, use_budget)
    tuner = _Tuner(steps, ctx, original, target, cost_shapes, cost_feeds) if use_budget else None
    current, session = original, original_session
    total = len(steps)
    for i, step in enumerate(steps):
        if progress:
            progress(i, total, step.pass_.name)
        if tuner is not None:
            current, session = tuner.run_step(i, current, session)
        else:
            step.outcome = _run_pass(step.pass_, current, session, ctx)
            current, session = step.outcome.model, step.outcome.session
    if tuner is not None:
        current, session = tuner.back_off(current, session)
    for step in steps:
        out = step.outcome
        if out.status == "failed":
            ctx.warnings.append(f"pass {step.pass_.name} failed and was skipped ({out.result.skipped[-1]['reason'][len('pass failed: '):]})")
        elif out.status.startswith("reverted"):
            ctx.warnings.append(f"pass {step.pass_.name} produced an invalid model and was reverted ({out.status[len('reverted: '):]})")
        shown = step.make(step.rung, step.limits) if step.tuned and step.rung is not None \
            and step.rung < len(step.knob.ladder) else step.pass_
        report.passes.append(PassRecord.from_result(shown, out.result, out.seconds, out.status,
                                                    nodes_after=len(out.model.graph.node)))
    if progress:
        progress(total, total, "measure")
    report.output = model_stats(current, cost_shapes, cost_feeds)
    if fidelity:
        # On the held-out samples, which no pass has fitted on; the report says which data it was.
        held = ctx.heldout
        data, ref = (held, reference_outputs(original, held, session=original_session)) if held is not None \
            else (ctx.calibration, ctx.reference())
        report.fidelity = measure_fidelity(original, current, data, ref, session=session)
        report.fidelity_data = {"set": "held-out" if held is not None else "fit", "samples": data.samples,
                                "source": ctx.calibration.source, "text": ctx.heldout_note}
        if held is None and any(p.lossy or p.needs_calibration for p in pass_objs):
            ctx.warnings.append(ctx.heldout_note)  # (exact passes fit on nothing: no warning)
        where = "held-out" if held is not None else "calibration"
        for name, f in report.fidelity.items():
            if "error" in f:
                ctx.warnings.append(f"output {name}: {f['error']}")
            elif f["cosine"] < LOW_COSINE and not use_budget:
                ctx.warnings.append(f"output {name}: cosine {f['cosine']:.4f} to the original on the {where} "
                                    "inputs; the model changed noticeably, check its task accuracy")
    if tuner is not None:
        report.budget = tuner.summary(report.fidelity, report.fidelity_data)
    if bench:
        report.latency = {"before": measure_latency(original, ctx.calibration),
                          "after": measure_latency(current, ctx.calibration)}
    report.warnings = list(ctx.warnings)
    return PipelineResult(current, report)


class _Tuner:
    """The budget's search (module docstring of ``budget.py``): a rung per tuned pass, the error
    of every pass measured on the tuning samples, then the back-off."""

    MAX_BACK_OFFS = 12

    def __init__(self, steps: list[_Step], ctx: PassContext, original: onnx.ModelProto, target: Budget,
                 cost_shapes, cost_feeds):
        self.steps, self.ctx, self.original, self.target = steps, ctx, original, target
        self.cost_shapes, self.cost_feeds = cost_shapes, cost_feeds
        self.log: list[str] = []
        self.zero = {k: 0.0 for k in target.allowance()}

    def error(self, outcome: _Outcome) -> dict:
        """Budget terms of ``outcome.model`` against the original on the tuning samples."""
        if outcome.error is None:
            fid = measure_fidelity(self.original, outcome.model, self.ctx.tuning, self.ctx.tuning_reference(),
                                   session=outcome.session)
            outcome.error = spent(fid)
        return outcome.error

    def _begin(self, i: int, current, session) -> None:
        """Step ``i`` starts from (model, session, its error): the error the step before left."""
        self.steps[i].before = (current, session, self.steps[i - 1].outcome.error if i else self.zero)

    def _charge(self, step: _Step) -> None:
        """The error after the step: what it started from when the model did not change."""
        out, (current, _, err) = step.outcome, step.before
        out.error = dict(err) if out.model is current else self.error(out)

    def run_step(self, i: int, current, session):
        step = self.steps[i]
        self._begin(i, current, session)
        if not step.tuned:
            step.outcome = _run_pass(step.pass_, current, session, self.ctx)
            self._charge(step)
            return step.outcome.model, step.outcome.session
        left = sum(1 for s in self.steps[i:] if s.tuned)
        step.limits = self.target.limits(step.before[2], left)
        step.tried = []
        ladder = step.knob.ladder
        outcomes: dict[int, _Outcome] = {}

        def fits(rung: int) -> bool:
            out = _run_pass(step.make(rung, step.limits), current, session, self.ctx)
            outcomes[rung] = out
            changed = out.status == "ok" and out.result.changed
            err = self.error(out) if changed else None
            # a rung that changes nothing spends nothing (and gains nothing): it fits
            good = out.status == "ok" and (not changed or within(err, step.limits))
            entry = {"setting": ladder[rung], "error": rounded(err) if err else None,
                     "status": out.status if out.status != "ok" or out.result.changed else "no change", "fits": good}
            if good and changed and step.knob.must_be_faster and self.target.faster:
                before_ms, after_ms = self.latencies(session or make_session(current), out.session or make_session(out.model))
                entry["latency_ms"] = {"before": round(before_ms, 4), "after": round(after_ms, 4)}
                if after_ms > LATENCY_MARGIN * before_ms:
                    good = entry["fits"] = False
                    entry["status"] = "slower"
            step.tried.append(entry)
            return good

        if step.knob.search == "first":
            if fits(0):
                step.rung = 0
            elif step.tried[-1]["status"] == "slower":  # keeping layers float will not beat float
                step.rung = len(ladder)
            else:
                step.rung = 1 + bisect_ladder(len(ladder) - 1, lambda r: fits(r + 1))
        else:
            step.rung = bisect_ladder(len(ladder), fits)
        self._settle(step, outcomes)
        return step.outcome.model, step.outcome.session

    def latencies(self, a, b, rounds: int = 15, warmup: int = 3) -> "tuple[float, float]":
        """Median ms of one ORT run of sessions ``a`` and ``b`` at batch 1 (the model's batch when
        it is fixed), interleaved (a, b, a, b, ...) so that a busy machine slows both alike.
        Batch 1 is how these models are deployed; int8 that wins at batch 12 (digits VGG 0.32
        against 0.36 ms) can lose at batch 1 (0.095 against 0.065 ms)."""
        data = self.ctx.tuning
        n = data.batch if data.fixed_batch else 1
        feeds = {k: v[:n] for k, v in data.inputs.items()}
        times: dict[int, list] = {0: [], 1: []}
        for i in range(warmup + rounds):
            for k, s in enumerate((a, b)):
                t0 = time.perf_counter()
                s.run(None, {n.name: feeds[n.name] for n in s.get_inputs() if n.name in feeds})
                if i >= warmup:
                    times[k].append(time.perf_counter() - t0)
        return float(np.median(times[0]) * 1e3), float(np.median(times[1]) * 1e3)

    def _settle(self, step: _Step, outcomes: dict, backed_off: bool = False) -> None:
        """The step's outcome for its rung (left out: the model it started from, and why)."""
        ladder = step.knob.ladder
        current, session, err = step.before
        if step.rung < len(ladder):
            step.outcome = outcomes[step.rung]
            self._charge(step)
            return
        result = PassResult()
        failures = [o for o in outcomes.values() if o.status != "ok"]
        if failures and len(failures) == len(outcomes):
            step.outcome = failures[-1]  # every rung tried failed: that is a failure, not the budget
            step.outcome.model, step.outcome.session = current, session
            step.outcome.error = dict(err)
            return
        for rung, o in sorted(outcomes.items()):
            if o.status != "ok":  # a rung that crashed or was invalid: a bug worth seeing
                reason = o.status if o.status != "failed" else o.result.skipped[-1]["reason"]
                result.skip(step.pass_.name, f"{step.knob.option}={ladder[rung]!r}: {reason}")
        slower = [t for t in (step.tried or []) if t.get("status") == "slower"]
        if backed_off:
            why = "left out by the back-off: the passes after it overspent the accuracy budget"
        elif slower:
            # the times are in the budget's "tried" entries: a skip or warning with timings in it
            # would make two runs' reports differ
            why = (f"left out: the model ran slower with it at batch "
                   f"{self.ctx.tuning.batch if self.ctx.tuning.fixed_batch else 1} (ORT CPU, one thread; the "
                   "times are in the report's budget section)")
        else:
            why = (f"left out: even {step.knob.option}={ladder[-1]!r} spends more than its share of the "
                   f"accuracy budget ({_limits_text(step.limits)})")
        result.skip(step.pass_.name, why)
        step.outcome = _Outcome(current, result, "ok", session, sum(o.seconds for o in outcomes.values()), dict(err))
        self.ctx.warnings.append(f"{step.pass_.name} {why if slower else why.split(' (')[0]}")

    def _gain(self, step: _Step) -> float:
        """Share of MACs (or bytes) the step's cut saves."""
        before, after = step.before[0], step.outcome.model
        if after is before:
            return 0.0
        a = model_stats(before, self.cost_shapes, self.cost_feeds)
        b = model_stats(after, self.cost_shapes, self.cost_feeds)
        x, y = (a.macs, b.macs) if step.knob.gain == "macs" and a.macs else (a.file_bytes, b.file_bytes)
        return (x - y) / x if x else 0.0

    def back_off(self, current, session):
        """Weaken the least valuable cut until the tuning samples meet the budget (module docstring)."""
        allowed = self.target.limits(self.zero, 1)
        for _ in range(self.MAX_BACK_OFFS):
            err = self.steps[-1].outcome.error
            if within(err, allowed):
                break
            movable = [k for k, s in enumerate(self.steps) if s.tuned and s.rung < len(s.knob.ladder)]
            if not movable:
                self.log.append(f"nothing left to give back: {', '.join(shortfall(self.target, err))} on the tuning samples")
                break

            def value(k: int) -> float:
                s = self.steps[k]
                added = max(max(s.outcome.error.get(key, 0.0) - s.before[2].get(key, 0.0), 0.0) / max(a, 1e-12)
                            for key, a in self.target.allowance().items())
                return self._gain(s) / max(added, 1e-12)

            k = min(movable, key=value)
            s = self.steps[k]
            old = s.knob.ladder[s.rung]
            s.rung += 1
            new = s.knob.ladder[s.rung] if s.rung < len(s.knob.ladder) else OFF
            self.log.append(f"{s.pass_.name}: {s.knob.option} {old!r} -> {new!r} "
                            f"({', '.join(shortfall(self.target, err))} on the tuning samples)")
            self._rerun_from(k)
        last = self.steps[-1].outcome
        return last.model, last.session

    def _rerun_from(self, k: int) -> None:
        for j in range(k, len(self.steps)):
            s = self.steps[j]
            if j > k:
                prev = self.steps[j - 1].outcome
                self._begin(j, prev.model, prev.session)
            current, session, _ = s.before
            if not s.tuned:
                s.outcome = _run_pass(s.pass_, current, session, self.ctx)
                self._charge(s)
                continue
            outcomes = {}
            if s.rung < len(s.knob.ladder):
                out = _run_pass(s.make(s.rung, s.limits), current, session, self.ctx)
                outcomes[s.rung] = out
                if out.status != "ok":  # a rung that worked before: keep the step's input instead
                    s.rung = len(s.knob.ladder)
            self._settle(s, outcomes, backed_off=True)
            s.tried.append({"setting": s.knob.ladder[s.rung] if s.rung < len(s.knob.ladder) else OFF,
                            "error": rounded(s.outcome.error), "status": "back-off", "fits": None})

    def summary(self, fidelity: "dict | None", fidelity_data: "dict | None") -> dict:
        passes = []
        for s in self.steps:
            if s.outcome is None or not (s.pass_.lossy or s.tuned):
                continue
            before = s.before[2] if s.before else self.zero
            after = s.outcome.error
            entry = {"pass": s.pass_.name, "tuned": s.tuned,
                     "spent": rounded({k: max(after.get(k, 0.0) - before.get(k, 0.0), 0.0) for k in self.zero}),
                     "error_after": rounded({k: after.get(k, 0.0) for k in self.zero})}
            if s.tuned:
                entry.update(option=s.knob.option,
                             setting=s.knob.ladder[s.rung] if s.rung < len(s.knob.ladder) else OFF,
                             limit=rounded(s.limits), tried=s.tried)
            else:
                entry["why"] = ("options set explicitly" if s.knob is None and type(s.pass_).budget_knob
                                else "no budget knob: run as configured")
            passes.append(entry)
        out = {"target": self.target.to_dict(), "passes": passes, "back_off": list(self.log),
               "tuning_samples": self.ctx.tuning.samples, "tuning_set": self.ctx.tuning_note,
               "tuning_error": rounded(self.steps[-1].outcome.error)}
        if fidelity is None:
            out.update(met=None, measured_on=None,
                       why="fidelity not measured (--no-fidelity): the budget was checked on the tuning samples only")
            return out
        err = spent(fidelity)
        missed = shortfall(self.target, err)
        out.update(met=not missed, measured_on=(fidelity_data or {}).get("set"),
                   samples=(fidelity_data or {}).get("samples"), error=rounded(err), missed=missed)
        return out


def _limits_text(limits: dict) -> str:
    names = {"cosine": "cosine >= {:.4f}", "top1": "top-1 agreement >= {:.4f}", "rel_error": "relative error <= {:.4f}"}
    return ", ".join(names[k].format(1.0 - v if k != "rel_error" else v) for k, v in limits.items())
