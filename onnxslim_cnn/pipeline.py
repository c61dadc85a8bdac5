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

import onnx

from .analysis.calibration import DEFAULT_HELDOUT, check_heldout
from . import workdir
from .analysis.cost import model_stats, sample_feeds
from .analysis.fidelity import fidelity as measure_fidelity
from .analysis.fidelity import latency as measure_latency
from .analysis.fidelity import reference_outputs
from .context import PassContext
from .errors import UserError
from .model_io import check_model, load_model
from .pass_infra import Pass, PassResult, checked_transform, resolve_passes
from .sessions import make_session

# --------------------------------------------------------------------------- pipeline

# Below this cosine similarity to the original outputs the report warns: exact passes stay
# above 0.999999, and lossy ones that keep accuracy stayed above 0.99 on our benches.
LOW_COSINE = 0.99


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


@_in_run_folder
def run_pipeline(source: "str | onnx.ModelProto", passes: "list[str | Pass] | None" = None, *,
                 options: "dict[str, dict] | None" = None, calib: Any = None,
                 input_shapes: "dict[str, tuple] | None" = None, seed: int = 0,
                 fidelity: bool = True, bench: bool = False,
                 progress: "Callable[[int, int, str], None] | None" = None,
                 preprocess: Any = None, heldout: "float | None" = None) -> PipelineResult:
    """Load, run ``passes`` in order (default: ``slim``), validate after each, measure, report.

    ``calib``: an ``.npz`` path, a folder of images (with ``preprocess``, see
    ``analysis/images.py``), a dict of arrays, or ``"random"`` (the documented generator, asked
    for explicitly); None is allowed only when no pass is lossy. ``heldout``: the share of the
    samples kept out of fitting for the report's fidelity (default 0.25, see ``calibration.split``).
    """
    from .report import PassRecord, Report

    pass_objs = resolve_passes(list(passes) if passes else ["slim"], options)
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
    ctx = PassContext(original, calib=calib, input_shapes=input_shapes, seed=seed, preprocess=preprocess,
                      heldout=heldout)
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

    current, session = original, original_session
    total = len(pass_objs)
    for i, p in enumerate(pass_objs):
        if progress:
            progress(i, total, p.name)
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
            ctx.warnings.append(f"pass {p.name} failed and was skipped ({type(exc).__name__}: {exc})".splitlines()[0])
        problem, new_session = validate(candidate) if result.changed else (None, None)
        status = "ok" if not (result.skipped and result.skipped[-1]["reason"].startswith("pass failed")) else "failed"
        if problem:
            # A pass that breaks the model is a bug; the user still gets a valid model.
            status = f"reverted: {problem}"
            ctx.warnings.append(f"pass {p.name} produced an invalid model and was reverted ({problem})")
        elif result.changed:
            current, session = candidate, new_session
        report.passes.append(PassRecord.from_result(p, result, time.perf_counter() - t0, status,
                                                    nodes_after=len(current.graph.node)))
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
            elif f["cosine"] < LOW_COSINE:
                ctx.warnings.append(f"output {name}: cosine {f['cosine']:.4f} to the original on the {where} "
                                    "inputs; the model changed noticeably, check its task accuracy")
    if bench:
        report.latency = {"before": measure_latency(original, ctx.calibration),
                          "after": measure_latency(current, ctx.calibration)}
    report.warnings = list(ctx.warnings)
    return PipelineResult(current, report)
