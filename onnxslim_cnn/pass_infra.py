"""The pass protocol: results, the two pass kinds, what a pass may modify, and the registry.

A pass is a small object: a ``name``, a one-paragraph ``summary``, an ``Options`` dataclass, a
``modifies`` declaration and ``run``. It never parses arguments, prints or writes files. Two
kinds, after what they work on (onnx-ir's ``passes/_pass_infra.py`` has the same split of
in-place graph passes and functional model passes):

- :class:`GraphPass` rewrites a :class:`~onnxslim_cnn.graph.Graph` (the onnx-graphsurgeon
  wrapper) in place: ``run(graph, ctx)``. Most passes: slim, prune, svd, lowrank, sparsify, share,
  sparse, fp16.
- :class:`ModelPass` works on the whole ``onnx.ModelProto``: ``run(model, ctx)`` and, when it
  changed something, returns the new model in ``PassResult.model``. For passes whose work is done
  by a tool that takes and gives whole models (``q8``: ONNX Runtime's quantizer) or that produce
  something other than a graph (``fpga``: the fixed-point IR, an artifact). The pipeline builds
  no Graph wrapper for them: on a 60 MB detector the wrapper's import with shape inference and
  export cost q8 four conversions.

``modifies`` is checked, not trusted: after a pass, :func:`check_modifications` compares the
model before and after, and a pass that changed what it did not declare is treated as a failed
pass (its result is dropped, the report says why). The aspects, each implying the ones above it:

- ``weights``: values (and names) of constant tensors (initializers, Constant nodes); their
  shapes and dtypes and the node structure stay.
- ``graph``: nodes, edges and the set of constants (implies ``weights``).
- ``interface``: names, element types, ranks and fixed dimensions of the graph's inputs and
  outputs (a symbolic dimension becoming concrete is no change).
- ``opset``: ``ir_version`` and the opset imports.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import onnx

from .errors import UserError
from .options import NoOptions, make_options
from .options import needs_calibration as options_need_calibration

if TYPE_CHECKING:
    from .context import PassContext
    from .graph import Graph

ASPECTS = ("weights", "graph", "interface", "opset")


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
    # A ModelPass's new model when ``changed``; GraphPasses leave it None (the graph is the result).
    model: "onnx.ModelProto | None" = None

    def change(self, item: str, action: str, **details: Any) -> None:
        self.changed = True
        self.changes.append({"item": item, "action": action, **details})
        self.stats[action] = self.stats.get(action, 0) + 1

    def skip(self, item: str, reason: str) -> None:
        self.skipped.append({"item": item, "reason": reason})

    def count(self, key: str, n: int = 1) -> None:
        self.stats[key] = self.stats.get(key, 0) + n


@dataclass(frozen=True)
class Knob:
    """How the pipeline's accuracy budget (``onnxslim_cnn/budget.py``) tunes a lossy pass.

    ``option`` is searched over ``ladder`` (strongest cut first; below the last rung the pass is
    left out), unless the user set it. ``recovery`` are the option values that undo part of the
    error from real calibration data (prune's reconstruct, svd's data-aware fit, ...): on by
    default whenever real data is given, each still overridden by an explicit setting.
    ``target_option`` (q8's ``budget_cosine``) receives the cosine the pass may fall to, for a
    pass that chooses per layer itself. ``gain`` is what the cut saves: "macs" or "bytes".
    ``fixed_by``: options that, set by the user, decide the cut instead of ``option``.
    """

    option: str
    ladder: tuple
    recovery: "dict[str, Any]" = field(default_factory=dict)
    target_option: "str | None" = None
    gain: str = "macs"
    # Other options that, when the user sets one, decide the cut instead (svd's rank): the knob
    # is then left as configured too.
    fixed_by: tuple = ()
    # "bisect" (about log2 of the ladder's length runs) or "first": try the strongest rung
    # first and bisect the rest only when it misses, for ladders whose strongest rung usually
    # fits and whose weaker ones cost more to run (q8: all int8, then its sensitivity search).
    search: str = "bisect"
    # Options that go with a rung (index -> {option: value}), unless the user set them: q8's
    # sensitivity search is bounded when the budget, not the user, asked for it.
    rung_options: "dict[int, dict[str, Any]]" = field(default_factory=dict)
    # The cut exists to make the model faster (q8): a rung that does not run faster than the
    # model before it (ORT CPU, one thread, one calibration batch) does not fit either.
    must_be_faster: bool = False


class PassContractError(RuntimeError):
    """A pass broke the protocol (changed what it does not declare, or a changed ModelPass
    returned no model): a bug in the pass, handled like a crash."""


# --------------------------------------------------------------------------- pass kinds


class Pass:
    """Base of both pass kinds. Subclass :class:`GraphPass` or :class:`ModelPass`."""

    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    Options: ClassVar[type] = NoOptions
    modifies: ClassVar[frozenset] = frozenset()
    always_uses_calibration: ClassVar[bool] = False
    # Its result only approximates the input model (prune, svd, lowrank, sparsify, q8, share,
    # fp16, fpga's fixed-point IR): the pipeline refuses to run it without calibration data
    # unless the user asks for random inputs (--calib random). Exact passes (slim, sparse) need none.
    lossy: ClassVar[bool] = False
    # How the accuracy budget tunes this pass (lossy passes); None: run as configured.
    budget_knob: ClassVar["Knob | None"] = None

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        unknown = set(cls.modifies) - set(ASPECTS)
        if unknown:
            raise TypeError(f"{cls.__name__}.modifies names unknown aspects {sorted(unknown)} (known: {ASPECTS})")

    def __init__(self, options: "dict[str, Any] | None" = None, **kwargs: Any):
        merged = {**(options or {}), **kwargs}
        self.options = make_options(self.Options, merged, self.name)

    @property
    def needs_calibration(self) -> bool:
        """Whether this pass, with its options, reads calibration data (the pipeline then
        refuses to run without usable inputs): always for ``always_uses_calibration`` passes,
        else when one of its option values does (``option(calibration_when=...)``)."""
        return self.always_uses_calibration or options_need_calibration(self.options)

    def transform(self, model: onnx.ModelProto, ctx: "PassContext") -> "tuple[onnx.ModelProto, PassResult]":
        """Run on ``model`` (never modified); (the new or the same model, result). Not checked
        against ``modifies``: :func:`checked_transform` is."""
        raise NotImplementedError  # pragma: no cover - implemented by the two kinds

    def apply(self, model: "onnx.ModelProto | str", *, calib: Any = None,
              input_shapes: "dict | None" = None, seed: int = 0) -> tuple[onnx.ModelProto, PassResult]:
        """Run this pass alone on a model (path or ModelProto); returns (new model, result)."""
        from .context import PassContext
        from .model_io import load_model

        original = load_model(model)
        ctx = PassContext(original, calib=calib, input_shapes=input_shapes, seed=seed)
        return checked_transform(self, original, ctx)


class GraphPass(Pass):
    """A pass that rewrites the Graph wrapper in place: implement ``run(graph, ctx)``."""

    def run(self, graph: "Graph", ctx: "PassContext") -> PassResult:  # pragma: no cover - interface
        raise NotImplementedError

    def transform(self, model: onnx.ModelProto, ctx: "PassContext") -> "tuple[onnx.ModelProto, PassResult]":
        from .graph import Graph

        graph = Graph.from_model(model)
        result = self.run(graph, ctx)
        return (graph.to_model() if result.changed else model), result


class ModelPass(Pass):
    """A pass on the whole ModelProto: implement ``run(model, ctx)``; never modify ``model``,
    return a changed model in ``PassResult.model``."""

    def run(self, model: onnx.ModelProto, ctx: "PassContext") -> PassResult:  # pragma: no cover - interface
        raise NotImplementedError

    def transform(self, model: onnx.ModelProto, ctx: "PassContext") -> "tuple[onnx.ModelProto, PassResult]":
        result = self.run(model, ctx)
        if not result.changed:
            return model, result
        if result.model is None:
            raise PassContractError(f"pass {self.name} reported changes but returned no model")
        return result.model, result


def checked_transform(p: Pass, model: onnx.ModelProto, ctx: "PassContext") -> "tuple[onnx.ModelProto, PassResult]":
    """``p.transform`` followed by :func:`check_modifications`; PassContractError if it fails."""
    candidate, result = p.transform(model, ctx)
    problem = check_modifications(p, model, candidate)
    if problem:
        raise PassContractError(problem)
    return candidate, result


# --------------------------------------------------------------------------- what changed


def _dims(vi: onnx.ValueInfoProto) -> tuple:
    t = vi.type.tensor_type
    if not t.HasField("shape"):
        return (t.elem_type, None)
    return (t.elem_type, tuple(d.dim_value if d.HasField("dim_value") else d.dim_param for d in t.shape.dim))


def _constants(model: onnx.ModelProto) -> "dict[str, onnx.TensorProto | onnx.AttributeProto]":
    """Every constant tensor by name: initializers and Constant nodes' values (the Graph wrapper
    turns Constant nodes into initializers, which is no change of the model)."""
    out: dict = {t.name: t for t in model.graph.initializer}
    for n in model.graph.node:
        if n.op_type == "Constant" and n.domain in ("", "ai.onnx") and n.output:
            out[n.output[0]] = n.attribute[0] if n.attribute else None
    return out


def _constant_kind(value: Any) -> tuple:
    if isinstance(value, onnx.TensorProto):
        return ("tensor", value.data_type, tuple(value.dims))
    if isinstance(value, onnx.AttributeProto) and value.type == onnx.AttributeProto.TENSOR:
        return ("tensor", value.t.data_type, tuple(value.t.dims))
    return ("other",)


def _constant_digest(value: Any) -> str:
    if isinstance(value, onnx.AttributeProto) and value.type == onnx.AttributeProto.TENSOR:
        value = value.t
    if isinstance(value, onnx.TensorProto):
        from onnx import numpy_helper

        if value.data_location != onnx.TensorProto.EXTERNAL:
            arr = numpy_helper.to_array(value)
            return hashlib.blake2b(arr.tobytes(), digest_size=16).hexdigest() + str(arr.dtype) + str(arr.shape)
    return hashlib.blake2b(value.SerializeToString(deterministic=True) if value is not None else b"",
                           digest_size=16).hexdigest()


def _structure(model: onnx.ModelProto, constants: dict) -> list:
    """The non-Constant nodes as a sorted list of (op, domain, inputs, outputs): the dataflow,
    independent of node order and names (the wrapper re-sorts nodes topologically). A constant
    input stands as its kind (dtype, shape), not its name: a pass that rewrites a weight's values
    may store them under a new name without changing the graph."""
    def ref(name: str):
        return f"<constant {_constant_kind(constants[name])}>" if name in constants else name

    return sorted((n.op_type, n.domain, tuple(ref(i) for i in n.input), tuple(n.output)) for n in model.graph.node
                  if not (n.op_type == "Constant" and n.domain in ("", "ai.onnx")))


def _interface_kept(before: onnx.ModelProto, after: onnx.ModelProto) -> bool:
    """Same input and output names, element types and ranks, and every dimension that was a
    number still that number. A symbolic or unknown dimension may become concrete: the Graph
    wrapper's shape inference refines declared outputs, which changes nothing a caller relied on."""
    def sig(m):
        # IR < 4 lists every initializer as a graph input too: those are weights, not the
        # interface (q8 must drop a float weight it quantizes), so only inputs without one count
        weights = {t.name for t in m.graph.initializer}
        inputs = [v for v in m.graph.input if v.name not in weights]
        return [[(v.name, _dims(v)) for v in vs] for vs in (inputs, m.graph.output)]

    for side_b, side_a in zip(sig(before), sig(after)):
        if [n for n, _ in side_b] != [n for n, _ in side_a]:
            return False
        for (_, (tb, db)), (_, (ta, da)) in zip(side_b, side_a):
            if tb != ta or (db is not None and (da is None or len(db) != len(da)
                                                or any(isinstance(x, int) and x > 0 and x != y for x, y in zip(db, da)))):
                return False
    return True


def changed_aspects(before: onnx.ModelProto, after: onnx.ModelProto, allowed: "set[str] | frozenset" = frozenset()
                    ) -> list[str]:
    """Which of :data:`ASPECTS` differ between two models. Values of constants are hashed only
    when nothing structural changed and ``weights`` is not ``allowed`` anyway, so the check
    costs one hash pass at most and none for the passes that declare weight changes."""
    if after is before:
        return []
    out = []
    opset = lambda m: (m.ir_version, sorted((o.domain, o.version) for o in m.opset_import))  # noqa: E731
    if opset(before) != opset(after):
        out.append("opset")
    if not _interface_kept(before, after):
        out.append("interface")
    cb, ca = _constants(before), _constants(after)
    if _structure(before, cb) != _structure(after, ca):
        out.append("graph")
    elif "weights" not in allowed and any(k not in ca or _constant_digest(cb[k]) != _constant_digest(ca[k]) for k in cb):
        out.append("weights")
    return out


def check_modifications(p: Pass, before: onnx.ModelProto, after: onnx.ModelProto) -> "str | None":
    """None when ``after`` differs from ``before`` only in what ``p.modifies`` declares, else why."""
    allowed = set(p.modifies)
    if "graph" in allowed:
        allowed.add("weights")
    undeclared = [a for a in changed_aspects(before, after, allowed) if a not in allowed]
    if not undeclared:
        return None
    declared = ", ".join(sorted(p.modifies)) or "nothing"
    return f"pass {p.name} changed {', '.join(undeclared)} but declares it modifies {declared}"


# --------------------------------------------------------------------------- registry


_REGISTRY: dict[str, type[Pass]] = {}


def register_pass(cls: type[Pass]) -> type[Pass]:
    if not cls.name or cls.name in _REGISTRY:
        raise ValueError(f"pass name missing or registered twice: {cls.name!r}")
    if not issubclass(cls, (GraphPass, ModelPass)):
        raise TypeError(f"pass {cls.name!r} must subclass GraphPass or ModelPass")
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
