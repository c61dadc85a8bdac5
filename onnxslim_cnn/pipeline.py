"""Pass protocol, registry and the pipeline that runs passes, validates and reports.

A pass is a small object: a ``name``, a one-paragraph ``summary``, an ``Options`` dataclass, and
``run(graph, ctx) -> PassResult``. It never parses arguments, prints or writes files; the
pipeline builds the ``Graph`` it works on, validates what it returns (ONNX checker with
``full_check`` plus an ONNX Runtime load), and collects its ``PassResult`` into the report.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar

import numpy as np
import onnx

from .analysis import calibration as calib_mod
from .analysis.calibration import CalibrationData
from .analysis.cost import model_stats
from .analysis.fidelity import fidelity as measure_fidelity
from .analysis.fidelity import latency as measure_latency
from .analysis.fidelity import reference_outputs
from .errors import UserError
from .graph import Graph
from .model_io import check_model, load_model
from .options import NoOptions, make_options
from .sessions import make_session

# --------------------------------------------------------------------------- results


@dataclass
class PassResult:
    """What a pass did: per-item changes, skipped items with reasons, summary counters."""

    changed: bool = False
    changes: list[dict] = field(default_factory=list)
    skipped: list[dict] = field(default_factory=list)
    stats: dict[str, Any] = field(default_factory=dict)
    # Objects a pass produces besides the graph (e.g. fpga's fixed-point IR), for the API/CLI to
    # use or write; never serialised into the report.
    artifacts: dict[str, Any] = field(default_factory=dict)

    def change(self, item: str, action: str, **details: Any) -> None:
        self.changed = True
        self.changes.append({"item": item, "action": action, **details})
        self.stats[action] = self.stats.get(action, 0) + 1

    def skip(self, item: str, reason: str) -> None:
        self.skipped.append({"item": item, "reason": reason})

    def count(self, key: str, n: int = 1) -> None:
        self.stats[key] = self.stats.get(key, 0) + n


# --------------------------------------------------------------------------- pass protocol and registry


class Pass:
    """Base class of all passes. Subclasses set ``name``, ``summary``, ``Options`` and ``run``."""

    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    Options: ClassVar[type] = NoOptions
    needs_calibration: ClassVar[bool] = False

    def __init__(self, options: "dict[str, Any] | None" = None, **kwargs: Any):
        merged = {**(options or {}), **kwargs}
        self.options = make_options(self.Options, merged, self.name)

    def run(self, graph: Graph, ctx: "PassContext") -> PassResult:  # pragma: no cover - interface
        raise NotImplementedError

    def apply(self, model: "onnx.ModelProto | str", *, calib: Any = None,
              input_shapes: "dict | None" = None, seed: int = 0) -> tuple[onnx.ModelProto, PassResult]:
        """Run this pass alone on a model (path or ModelProto); returns (new model, result)."""
        original = load_model(model)
        ctx = PassContext(original, calib=calib, input_shapes=input_shapes, seed=seed)
        graph = Graph.from_model(original)
        result = self.run(graph, ctx)
        return (graph.to_model() if result.changed else original), result


_REGISTRY: dict[str, type[Pass]] = {}


def register_pass(cls: type[Pass]) -> type[Pass]:
    if not cls.name or cls.name in _REGISTRY:
        raise ValueError(f"pass name missing or registered twice: {cls.name!r}")
    _REGISTRY[cls.name] = cls
    return cls


def available_passes() -> dict[str, type[Pass]]:
    from . import passes  # noqa: F401  (registers the built-in passes)

    return dict(_REGISTRY)


def get_pass(name: str) -> type[Pass]:
    registry = available_passes()
    if name not in registry:
        raise UserError(f"unknown pass '{name}' (available: {', '.join(sorted(registry))})")
    return registry[name]


def resolve_passes(passes: "list[str | Pass]", options: "dict[str, dict] | None" = None) -> list[Pass]:
    """Instantiate named passes with their options; every name and option is checked up front."""
    options = dict(options or {})
    names = [p for p in passes if isinstance(p, str)]
    for pass_name in options:
        if pass_name not in names:
            get_pass(pass_name)  # unknown pass name -> UserError
            raise UserError(f"options given for pass '{pass_name}', which is not in the pass list")
    out = []
    for p in passes:
        if isinstance(p, Pass):
            out.append(p)
        else:
            out.append(get_pass(p)(options.get(p)))
    return out


# --------------------------------------------------------------------------- context


class PassContext:
    """Shared, cached analysis handed to every pass: calibration inputs, reference outputs, seed."""

    def __init__(self, original: onnx.ModelProto, *, calib: Any = None,
                 input_shapes: "dict[str, tuple] | None" = None, seed: int = 0, samples: int = 8):
        self.original = original
        self.seed = seed
        self.input_shapes = input_shapes or {}
        self.samples = samples
        self.warnings: list[str] = []
        self._calib_arg = calib
        self._calib: CalibrationData | None = None
        self._reference = None
        self.cache: dict[str, Any] = {}
        self.original_session = None  # set by the pipeline, which has loaded the model already

    @property
    def calibration(self) -> CalibrationData:
        """Calibration inputs: the ``--calib`` file, a dict of arrays, or the seeded generator."""
        if self._calib is None:
            c = self._calib_arg
            if isinstance(c, CalibrationData):
                self._calib = c
            elif c is None:
                self._calib = calib_mod.random_inputs(self.original, samples=self.samples, seed=self.seed,
                                                      input_shapes=self.input_shapes)
            elif isinstance(c, dict):
                # same validation as a file, without a temp file whose name would show in errors
                self._calib = calib_mod.from_arrays(c, self.original, "calib arrays", "arrays")
            else:
                self._calib = calib_mod.load_npz(c, self.original)
            self.warnings.extend(self._calib.warnings)
        return self._calib

    def activations(self, model: onnx.ModelProto, names: "list[str]") -> dict[str, np.ndarray]:
        """Values of intermediate tensors ``names`` of ``model`` on the calibration inputs.

        One ORT run over all calibration samples with the tensors exposed as extra outputs;
        chunks are concatenated along axis 0 (the batch axis of CNN activations). Cached per
        model and tensor, so passes asking for the same activations share one run.
        """
        from .analysis.activations import capture

        key = id(model)
        cached = self.cache.setdefault(("activations", key), {"model": model, "values": {}})
        missing = [n for n in names if n not in cached["values"]]
        if missing:
            cached["values"].update(capture(model, missing, self.calibration))
        return {n: cached["values"][n] for n in names}

    def reference(self):
        """Original model's outputs on the calibration inputs (computed once)."""
        if self._reference is None:
            self._reference = reference_outputs(self.original, self.calibration, session=self.original_session)
        return self._reference


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


def run_pipeline(source: "str | onnx.ModelProto", passes: "list[str | Pass] | None" = None, *,
                 options: "dict[str, dict] | None" = None, calib: Any = None,
                 input_shapes: "dict[str, tuple] | None" = None, seed: int = 0,
                 fidelity: bool = True, bench: bool = False,
                 progress: "Callable[[int, int, str], None] | None" = None) -> PipelineResult:
    """Load, run ``passes`` in order (default: ``slim``), validate after each, measure, report."""
    from .report import PassRecord, Report

    pass_objs = resolve_passes(list(passes) if passes else ["slim"], options)
    original = load_model(source)
    try:
        original_session = make_session(original)
    except Exception as exc:
        raise UserError(f"onnxruntime cannot load the input model: {str(exc).strip().splitlines()[0]}") from None
    ctx = PassContext(original, calib=calib, input_shapes=input_shapes, seed=seed)
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
    report = Report(input=model_stats(original, cost_shapes),
                    calibration=calibration.source if calibration else None)

    current, session = original, original_session
    total = len(pass_objs)
    for i, p in enumerate(pass_objs):
        if progress:
            progress(i, total, p.name)
        t0 = time.perf_counter()
        graph = Graph.from_model(current)
        try:
            result = p.run(graph, ctx)
            candidate = graph.to_model() if result.changed else current
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
    report.output = model_stats(current, cost_shapes)
    if fidelity:
        report.fidelity = measure_fidelity(original, current, ctx.calibration, ctx.reference(), session=session)
        for name, f in report.fidelity.items():
            if "error" in f:
                ctx.warnings.append(f"output {name}: {f['error']}")
            elif f["cosine"] < LOW_COSINE:
                ctx.warnings.append(f"output {name}: cosine {f['cosine']:.4f} to the original on the calibration "
                                    "inputs; the model changed noticeably, check its task accuracy")
    if bench:
        report.latency = {"before": measure_latency(original, ctx.calibration),
                          "after": measure_latency(current, ctx.calibration)}
    report.warnings = list(ctx.warnings)
    return PipelineResult(current, report)
