"""Pass ``svd``: SVD bottlenecks for fully connected layers.

An FC weight W (n_in x n_out, ``y = x @ W``) becomes two thin layers, x @ A (n_in x k) then
@ B (k x n_out) with the bias on the second, for Gemm (every transA/transB/alpha/beta form),
MatMul with a constant 2-D weight (input of any rank) and 1x1 Conv with groups = 1 (an FC
over channels). Output names and the graph interface stay as they were.

Rank per layer, first option given wins: ``rank`` > ``ratio`` > ``max_output_error`` >
``energy``. A layer is only factorised when k (m + n) < m n (``factorize.max_useful_rank``);
otherwise it would grow, and it is listed as skipped with the rank it would have needed.
``data_aware`` factors for the layer's outputs on calibration data instead of its weights
(whiten by the input covariance, factor, un-whiten; see ``factorize.factor``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import onnx_graphsurgeon as gs

from onnxslim_cnn.analysis.activations import capture
from onnxslim_cnn.errors import UserError
from onnxslim_cnn.graph import Graph
from onnxslim_cnn.graph import node_label as _label  # shared helpers
from onnxslim_cnn.options import option
from onnxslim_cnn.context import PassContext
from onnxslim_cnn.pass_infra import GraphPass, Knob, PassResult, register_pass

from . import factorize as fz

# Data-aware statistics use at most this many input values per layer (rows x n_in, float64:
# 256 MB); a 1x1 conv early in a network sees N*H*W rows, and evenly spaced rows suffice.
MAX_SAMPLE_VALUES = 1 << 25
# data_aware whitens by the input covariance of the calibration rows; from too few rows per input
# feature that covariance describes those rows, not the input distribution, and the factors
# overfit them: digits VGG's FCs (1024 and 256 inputs, 48 samples: 0.05 and 0.19 rows per
# feature) at max_output_error 0.1 kept held-out cosine 0.9992 by weight SVD and fell to 0.9837
# data-aware, while all three at rank 8 from 256 samples (0.25 rows per feature) keep 97 % top-1
# data-aware against 88 % by weight SVD. Below this many rows per feature a layer gets the
# weight SVD, and the report says so.
MIN_ROWS_PER_FEATURE = 0.25


@dataclasses.dataclass(frozen=True)
class SvdOptions:
    rank: "int | None" = option(None, "rank k of every factorised layer (overrides ratio, max_output_error, energy)",
                                min=1)
    ratio: "float | None" = option(None, "parameter budget per layer: the factors hold at most this share of "
                                         "the weight's parameters (overrides max_output_error and energy)",
                                   min=0.0, max=1.0)
    max_output_error: "float | None" = option(
        None, "smallest k whose relative output error on calibration data is at most this (per layer; "
              "protects near-full-rank heads; overrides energy)", min=0.0,
              calibration_when=lambda limit: limit is not None)
    energy: float = option(0.9, "smallest k keeping this share of the sum of squared singular values "
                                "(of the whitened weight when data_aware), in (0, 1]", min=0.0, max=1.0)
    data_aware: bool = option(False, "minimise the layer's output error on calibration inputs instead of the "
                                     "weight error (whiten by the input covariance, factor, un-whiten)",
                                     calibration_when=bool)
    ridge: float = option(1e-4, "ridge added to the input covariance, relative to its mean diagonal", min=0.0)
    min_params: int = option(4096, "skip layers whose weight has fewer parameters than this", min=0)
    layers: list[str] = option([], "only these node names (empty: every eligible layer)")
    exclude: list[str] = option([], "never these node names")
    ops: list[Literal["Gemm", "MatMul", "Conv"]] = option(["Gemm", "MatMul", "Conv"],
                                                          "op types to factorise (Conv: 1x1, groups = 1)")
    conv_fc_only: bool = option(True, "factorise a 1x1 Conv only when it is an FC over channels (its input "
                                      "is 1x1 spatially, e.g. after global pooling); pointwise convs on "
                                      "feature maps are left to `lowrank`/`prune`")
    sequential: bool = option(True, "take each layer's calibration inputs from the model with the layers before "
                                    "it already factorised (one extra ONNX Runtime run per layer) rather than "
                                    "from the original: each layer then fits the inputs it will really see")
    measure_error: bool = option(False, "report each layer's output error on calibration data even when "
                                        "nothing else needs it (one extra ONNX Runtime run)", calibration_when=bool)
    allow_growth: bool = option(False, "testing aid: factorise even when k >= mn/(m+n), i.e. the layer grows "
                                       "(up to k = min(m, n), which reproduces the layer exactly)")


@dataclass
class _Use:
    """One node applying the weight: x -> node -> y."""

    node: gs.Node
    label: str
    kind: str  # "gemm" | "matmul" | "conv"


@dataclass
class _Layer:
    """A weight and the nodes that use it; factorised once, both factors shared by every use."""

    weight: gs.Constant
    layout: str  # "in_out" (W stored [n_in, n_out]), "out_in" (stored transposed), "conv"
    uses: list[_Use] = field(default_factory=list)

    @property
    def W(self) -> np.ndarray:  # [n_in, n_out], a view (no copy of a big weight)
        w = np.asarray(self.weight.values)
        if self.layout == "in_out":
            return w
        return (w.reshape(w.shape[0], -1) if self.layout == "conv" else w).T


@register_pass
class SvdPass(GraphPass):
    name = "svd"
    summary = ("SVD bottlenecks for FC layers: a Gemm, MatMul with a constant 2-D weight, or 1x1 "
               "Conv (groups=1) with an m x n weight becomes two layers (m x k)(k x n), bias on the "
               "second. Rank by rank > ratio > max_output_error > energy; a layer is only "
               "factorised when k < mn/(m+n). data_aware=true factors for the outputs on "
               "calibration data (whitened SVD) and keeps accuracy at much lower ranks.")
    Options = SvdOptions
    modifies = frozenset({"graph"})
    lossy = True
    budget_knob = Knob(option="max_output_error", ladder=(0.2, 0.1, 0.05, 0.02, 0.01, 0.005),
                       recovery={"data_aware": True},
                       fixed_by=("rank", "ratio", "energy"), must_be_faster=True)

    def __init__(self, options=None, **kwargs):
        super().__init__(options, **kwargs)
        o = self.options
        # option() bounds are inclusive; these two are open at 0
        if o.energy <= 0:
            raise UserError(f"bad value for svd.energy: {o.energy!r} (must be within (0, 1])")
        if o.ratio is not None and o.ratio <= 0:
            raise UserError(f"bad value for svd.ratio: {o.ratio!r} (must be within (0, 1])")

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        o = self.options
        result = PassResult()
        layers = self._collect(graph, result)
        inputs: dict[str, np.ndarray] = {}
        if self.needs_calibration and layers:
            names = sorted({u.node.inputs[0].name for layer in layers for u in layer.uses})
            data = ctx.activation_data(graph.source, names)  # within the memory bound
            inputs = ctx.activations(graph.source, names, data)
        removed, stale = 0, False
        for i, layer in enumerate(layers):
            labels = ",".join(u.label for u in layer.uses)
            W = layer.W
            if inputs and o.sequential and stale:
                # Upstream layers changed: their errors reach this layer's inputs, and fitting
                # those inputs recovers much of it (digits VGG, all FCs at rank 8: 94.7% top-1
                # from the original model's activations, 99.1% from the factorised model's).
                # One run serves every remaining layer until the next rewrite; not cached in
                # ctx, since each partial model is used once.
                names = sorted({u.node.inputs[0].name for later in layers[i:] for u in later.uses})
                inputs, stale = capture(graph.to_model(), names, data), False
            X = _samples(layer, inputs) if inputs else None
            aware = o.data_aware and X is not None and X.shape[0] >= MIN_ROWS_PER_FEATURE * X.shape[1]
            k, how, F = _choose_rank(o, W, X, ctx.seed, aware)
            m, n = W.shape
            limit = min(m, n) if o.allow_growth else fz.max_useful_rank(m, n)
            if k > limit:
                result.skip(labels, f"rank {k} would not save parameters (needs k <= {limit})"
                            if not o.allow_growth else f"rank {k} exceeds min(m, n) = {limit}")
                continue
            F = F.truncated(k) if F is not None else fz.factor(W, k, X if aware else None, o.ridge, ctx.seed)
            details = {"m": m, "n": n, "rank": k, "selected_by": how, "data_aware": aware,
                       "params_before": m * n, "params_after": k * (m + n),
                       "kept_energy": round(F.kept_energy(), 6)}
            if X is not None:
                details["output_error"] = round(fz.output_error(W, F.A, F.B, X), 6)
            if o.data_aware and not aware and X is not None:
                details["data_aware_skipped"] = (f"{X.shape[0]} calibration rows < {MIN_ROWS_PER_FEATURE:g} per "
                                                 f"input x {X.shape[1]} inputs: weight SVD")
            if len(layer.uses) > 1:
                details["shared_by"] = [u.label for u in layer.uses]
            _rewrite(graph, layer, F)
            stale = True
            result.change(labels, "factorised", **details)
            removed += m * n - k * (m + n)
        result.stats["params_removed"] = removed
        return result

    # ------------------------------------------------------------------ finding layers

    def _collect(self, graph: Graph, result: PassResult) -> list[_Layer]:
        o = self.options
        known = {_label(n) for n in graph.nodes} | {n.name for n in graph.nodes if n.name}
        for name in list(o.layers) + list(o.exclude):
            if name not in known:
                result.skip(name, "no node of that name in the graph")
        wanted, excluded = set(o.layers), set(o.exclude)
        by_weight: dict[int, _Layer] = {}
        order: list[_Layer] = []
        for node in graph.nodes:
            if node.op not in o.ops:
                continue
            label = _label(node)
            picked = not wanted or label in wanted or node.name in wanted
            found = _eligible(node)
            if found is None:
                continue  # not a linear layer at all (e.g. a 3x3 conv): nothing to report
            weight, layout, reason = found
            if not picked:
                continue
            if label in excluded or node.name in excluded:
                result.skip(label, "excluded by option")
                continue
            if reason:
                result.skip(label, reason)
                continue
            if node.op == "Conv" and o.conv_fc_only and not _spatially_1x1(node.inputs[0]):
                result.skip(label, "1x1 conv on a feature map, not an FC over channels (set conv_fc_only=false)")
                continue
            layer = by_weight.get(id(weight))
            if layer is None:
                layer = by_weight[id(weight)] = _Layer(weight, layout)
                order.append(layer)
            elif layer.layout != layout:
                layer.layout = "mixed"
            layer.uses.append(_Use(node, label, node.op.lower()))
        out = []
        for layer in order:
            labels = ",".join(u.label for u in layer.uses)
            others = [_label(c) for c in layer.weight.outputs if all(c is not u.node for u in layer.uses)]
            W = np.asarray(layer.weight.values)
            if layer.layout == "mixed":
                result.skip(labels, "weight shared by nodes that read it in different layouts (transB)")
            elif others or graph.is_graph_output(layer.weight):
                result.skip(labels, f"weight also used by {', '.join(others) or 'the graph outputs'}, which "
                                    "would keep it: factors would be added, not substituted")
            elif W.size < o.min_params:
                result.skip(labels, f"{W.size} parameters < min_params = {o.min_params}")
            else:
                out.append(layer)
        return out


def _spatially_1x1(x: gs.Tensor) -> bool:
    return x.shape is not None and len(x.shape) > 2 and all(d == 1 for d in x.shape[2:])


def _eligible(node: gs.Node) -> "tuple[gs.Tensor, str, str] | None":
    """(weight, layout, reason-not-eligible or "") for a candidate node, None when it is no FC."""
    ins = node.inputs
    if len(ins) < 2 or ins[0] is None or ins[1] is None or len(node.outputs) != 1:
        return None
    x, w = ins[0], ins[1]
    if node.op == "Conv":
        shape = tuple(w.shape) if w.shape is not None else None
        if shape is not None and (len(shape) < 3 or any(d != 1 for d in shape[2:])):
            return None  # a spatial conv: lowrank's business
        if not isinstance(w, gs.Constant):
            return w, "conv", "weight is not a constant"
        if int(node.attrs.get("group", 1)) != 1:
            return w, "conv", f"1x1 conv with group={node.attrs.get('group')} (groups = 1 only)"
        layout = "conv"
    elif node.op == "Gemm":
        layout = "out_in" if int(node.attrs.get("transB", 0)) else "in_out"
        if not isinstance(w, gs.Constant):
            return w, layout, "weight (input B) is not a constant"
    elif node.op == "MatMul":
        layout = "in_out"
        if not isinstance(w, gs.Constant):
            why = "constant is the first input (W @ x)" if isinstance(x, gs.Constant) else "no constant weight"
            return w, layout, why
        if len(w.shape) != 2:
            return w, layout, f"weight is {len(w.shape)}-D, not 2-D"
    else:
        return None
    if isinstance(x, gs.Constant):
        return w, layout, "input is a constant too (constant folding's business)"
    if np.dtype(w.dtype).kind != "f":
        return w, layout, f"weight dtype {np.dtype(w.dtype)} is not floating point"
    return w, layout, ""


# --------------------------------------------------------------------------- rank choice


def _choose_rank(o: SvdOptions, W: np.ndarray, X: "np.ndarray | None", seed: int, aware: bool
                 ) -> "tuple[int, str, fz.Factors | None]":
    """(k, which option chose it, full-rank factors when they were computed on the way)."""
    m, n = W.shape
    full = min(m, n)
    Xw = X if aware else None
    if o.rank is not None:
        return min(o.rank, full), "rank", None
    if o.ratio is not None:
        return fz.rank_for_ratio(m, n, o.ratio), "ratio", None
    if o.max_output_error is not None:
        # One full factorisation gives every truncation's error (factorize.output_errors); the
        # weight's energy would not see a head whose small singular values still matter.
        F = fz.factor(W, full, Xw, o.ridge, seed)
        errors = fz.output_errors(W, F, X)
        ok = np.nonzero(errors <= o.max_output_error)[0]
        return (int(ok[0]) + 1 if len(ok) else full), "max_output_error", F
    s, total = fz.spectrum(W, Xw, o.ridge, seed=seed)
    return fz.rank_for_energy(s, total, o.energy), "energy", None


def _samples(layer: _Layer, inputs: dict[str, np.ndarray]) -> np.ndarray:
    """The rows x (n_in features each) that every use of the weight saw on calibration data."""
    n_in = layer.W.shape[0]
    parts = []
    for u in layer.uses:
        v = np.asarray(inputs[u.node.inputs[0].name])
        if u.kind == "conv":
            v = np.moveaxis(v, 1, -1)
        elif u.kind == "gemm" and int(u.node.attrs.get("transA", 0)):
            # x is [n_in, M]; calibration chunks were concatenated on axis 0
            v = v.reshape(-1, n_in, v.shape[-1]).transpose(0, 2, 1)
        parts.append(v.reshape(-1, n_in))
    X = np.concatenate(parts, axis=0)
    cap = max(1, MAX_SAMPLE_VALUES // n_in)
    if len(X) > cap:
        X = X[np.linspace(0, len(X) - 1, cap).astype(np.int64)]
    return X


# --------------------------------------------------------------------------- rewriting


def _rewrite(graph: Graph, layer: _Layer, F: fz.Factors) -> None:
    """Replace every use of the weight by two nodes; the original node becomes the second one.

    Gemm -> Gemm + Gemm, not MatMul + Gemm: ONNX Runtime pre-packs a constant B for both ops
    and both ran within 2% on VGG-16's FC shapes (batch 1 and 8, either transB); Gemm carries
    the user's alpha and transA as attributes, so the factors need no scaling and stay shared
    between uses with different alpha. The factors keep the weight's layout (transB=1 stays
    [out, in], like a PyTorch Linear).
    """
    dtype = np.asarray(layer.weight.values).dtype
    A, B = F.A, F.B  # [n_in, k], [k, n_out], float64
    k = A.shape[1]
    base = layer.weight.name
    if layer.layout != "in_out":
        A, B = A.T, B.T
    # cast and lay out in one copy (VGG-16's FC1 factor at high rank is 600 MB in float64)
    first, second = np.ascontiguousarray(A, dtype=dtype), np.ascontiguousarray(B, dtype=dtype)
    if layer.layout == "conv":
        ones = [1] * (len(layer.weight.shape) - 2)
        first, second = first.reshape(k, first.shape[1], *ones), second.reshape(second.shape[0], k, *ones)
    c1, c2 = graph.add_constant(f"{base}_svd_a", first), graph.add_constant(f"{base}_svd_b", second)
    for u in layer.uses:
        node, out = u.node, u.node.outputs[0]
        hidden = gs.Variable(graph.unique_name(f"{out.name}_svd_h"), dtype=out.dtype)
        x, rest = node.inputs[0], list(node.inputs[2:])
        attrs = dict(node.attrs)
        if u.kind == "gemm":
            tb = int(attrs.get("transB", 0))
            first_attrs = {"alpha": float(attrs.get("alpha", 1.0)), "transA": int(attrs.get("transA", 0)),
                           "transB": tb}
            node.attrs = {"beta": float(attrs.get("beta", 1.0)), "transB": tb}
        elif u.kind == "conv":
            # stride, padding and dilation all belong to the first conv: padded positions give
            # 0 there and the bias in the second, as in the original
            first_attrs = {key: v for key, v in attrs.items() if key != "group"}
            first_attrs["kernel_shape"] = [1] * (len(layer.weight.shape) - 2)
            node.attrs = {"kernel_shape": [1] * (len(layer.weight.shape) - 2)}
        else:
            first_attrs = {}
        graph.gs.nodes.append(gs.Node(u.node.op, graph.unique_name(f"{u.label}_svd_a"), first_attrs,
                                      inputs=[x, c1], outputs=[hidden]))
        Graph.set_inputs(node, [hidden, c2, *rest])
