"""Pass ``sparsify``: unstructured magnitude pruning of Conv/Gemm/MatMul weights.

The smallest-magnitude weights are set to zero; the weights stay dense (the sparse runtime
executes them sparsely). ``scope=global`` ranks every eligible weight together (raw magnitudes)
and zeroes exactly ``round(ratio * total)`` of them; ``scope=layer`` zeroes ``round(ratio * n)``
in each layer. ``layer_ratio`` overrides the ratio of named layers (those are then pruned on
their own and left out of the global ranking); ``exclude`` names layers left dense.

With ``refit=true`` the surviving weights of each layer are refitted by ridge least squares on
calibration activations of the dense model so that the layer's outputs match the dense layer's:
per output channel, on the unmasked inputs only (the mask is kept, so sparsity is unchanged).
Gemm/MatMul use the activations directly, Conv (groups=1) goes through im2col.

``mode=sensitivity`` finds each layer's ratio instead: the largest one (up to ``max_ratio``)
whose pruning, with the refit when ``refit=true``, keeps the model outputs within ``budget``
(relative L2 error to the dense model on the calibration inputs) when that layer alone is
pruned; see ``sparsify.search``. ``layer_ratio`` still fixes the ratio of the layers it names.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import numpy as np
import onnx_graphsurgeon as gs
import scipy.linalg

from onnxslim_cnn.analysis.conv_patches import ConvGeometry, patches, sample_positions
from onnxslim_cnn.graph import Graph, weight_input_index
from onnxslim_cnn.options import option
from onnxslim_cnn.context import PassContext
from onnxslim_cnn.pass_infra import GraphPass, Knob, PassResult, register_pass


OPS = ("Conv", "Gemm", "MatMul")


@dataclasses.dataclass(frozen=True)
class SparsifyOptions:
    ratio: float = option(0.5, "share of eligible weights set to zero (overall or per layer, see scope)",
                          min=0.0, max=1.0)
    scope: Literal["global", "layer"] = option("global", "one magnitude threshold over all eligible weights, "
                                               "or the same ratio in every layer")
    layer_ratio: dict[str, float] = option({}, "per-layer ratio overrides by node name (name:ratio,...)")
    exclude: list[str] = option([], "node names left dense")
    skip_depthwise: bool = option(True, "leave depthwise convolutions dense")
    min_params: int = option(256, "leave layers with fewer weights than this dense", min=0)
    refit: bool = option(False, "refit the surviving weights of each layer by ridge least squares on "
                                "calibration activations (per output channel)", calibration_when=bool)
    ridge: float = option(1e-3, "ridge term of the refit, relative to the mean Gram diagonal", min=0.0)
    refit_max_features: int = option(4096, "skip the refit of layers with more inputs per output channel", min=1)
    mode: Literal["ratio", "sensitivity"] = option(
        "ratio", "ratio: the ratio/scope above; sensitivity: per layer, the largest ratio that keeps the "
                 "outputs within budget when that layer alone is pruned (binary search on calibration data)",
                 calibration_when=lambda mode: mode == "sensitivity")
    budget: float = option(0.05, "sensitivity: relative L2 error of the outputs allowed per layer", min=0.0)
    max_ratio: float = option(0.99, "sensitivity: largest ratio tried", min=0.0, max=1.0)
    search_steps: int = option(8, "sensitivity: binary-search halvings per layer", min=1, max=30)


@dataclasses.dataclass
class _Layer:
    node: gs.Node
    weight: gs.Constant
    values: np.ndarray  # float weights in ONNX layout
    ratio: "float | None" = None  # per-layer ratio; None = in the global ranking
    mask: "np.ndarray | None" = None  # True = kept


@register_pass
class SparsifyPass(GraphPass):
    name = "sparsify"
    summary = ("Unstructured magnitude pruning: zero the smallest Conv/Gemm/MatMul weights by one "
               "global ratio, per layer, or per-layer overrides (weights stay dense); optional "
               "least-squares refit of the surviving weights on calibration data.")
    Options = SparsifyOptions
    modifies = frozenset({"weights"})
    lossy = True
    budget_knob = Knob(option="ratio", ladder=(0.9, 0.8, 0.7, 0.6, 0.5, 0.3), recovery={"refit": True},
                       gain="bytes", fixed_by=("mode",))

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        o = self.options
        result = PassResult()
        names = {n.name for n in graph.nodes}
        for name in list(o.layer_ratio) + list(o.exclude):
            if name not in names:
                ctx.warnings.append(f"sparsify: no node named '{name}' (layer_ratio/exclude)")
        for name, r in o.layer_ratio.items():
            if not 0.0 <= float(r) <= 1.0:
                from onnxslim_cnn.errors import UserError
                raise UserError(f"sparsify.layer_ratio: ratio of '{name}' must be in [0, 1], got {r}")
        layers = _eligible(graph, o, result)
        for layer in layers:
            name = layer.node.name
            if name in o.layer_ratio:
                layer.ratio = float(o.layer_ratio[name])
            elif o.scope == "layer":
                layer.ratio = o.ratio
        acts = _refit_inputs(graph, ctx, layers, o, result) if o.refit else {}
        searched = {}
        if o.mode == "sensitivity":
            searched = _sensitivity(graph, ctx, [la for la in layers if la.node.name not in o.layer_ratio], acts, o)
            for layer in layers:
                if layer.node.name in searched:
                    layer.ratio = searched[layer.node.name][0]
        # masks: per-layer ratios exactly, global ranking over the rest
        for layer in layers:
            if layer.ratio is not None:
                layer.mask = _mask_smallest(np.abs(layer.values).ravel(), layer.ratio).reshape(layer.values.shape)
        pooled = [layer for layer in layers if layer.ratio is None]
        if pooled:
            mags = np.concatenate([np.abs(layer.values).ravel() for layer in pooled])
            keep = _mask_smallest(mags, o.ratio)
            start = 0
            for layer in pooled:
                n = layer.values.size
                layer.mask = keep[start:start + n].reshape(layer.values.shape)
                start += n

        total = zeros = 0
        for layer in layers:
            new = np.where(layer.mask, layer.values, 0).astype(layer.values.dtype)
            name = layer.node.name
            if o.refit and name in acts:
                refitted = _refit(layer, acts[name], o.ridge, ctx.seed)
                if refitted is not None:
                    new = refitted
                    result.count("refitted")
            nz = int(new.size - np.count_nonzero(new))
            total += new.size
            zeros += nz
            if nz == int(layer.values.size - np.count_nonzero(layer.values)) and not o.refit:
                result.skip(name, "no weight below the threshold")
                continue
            graph.replace_constant(layer.node, weight_input_index(layer.node), new)
            extra = {}
            if name in searched:
                extra = {"ratio": searched[name][0], "search_error": round(searched[name][1], 6)}
            result.change(name, "sparsified", zeros=nz, total=int(new.size),
                          sparsity=round(nz / new.size, 6), **extra)
        result.stats["weights"] = total
        result.stats["zeros"] = zeros
        result.stats["sparsity"] = round(zeros / total, 6) if total else 0.0
        if result.changed:
            graph.remove_unused()
        return result


# --------------------------------------------------------------------------- selection


def _eligible(graph: Graph, o: SparsifyOptions, result: PassResult) -> list[_Layer]:
    layers, seen = [], set()
    for node in graph.nodes:
        if node.op not in OPS or len(node.inputs) < 2:
            continue
        name = node.name
        if name in o.exclude:
            result.skip(name, "excluded")
            continue
        idx = weight_input_index(node)
        w = node.inputs[idx]
        if not isinstance(w, gs.Constant):
            result.skip(name, "weight is not a constant")
            continue
        values = np.asarray(w.values)
        if values.dtype.kind != "f" or values.ndim < 2:
            result.skip(name, f"weight is not a float matrix ({values.dtype}, {values.ndim}-D)")
            continue
        if node.op == "Conv" and o.skip_depthwise and int(node.attrs.get("group", 1)) > 1 and values.shape[1] == 1:
            result.skip(name, "depthwise convolution (skip_depthwise)")
            continue
        if values.size < o.min_params:
            result.skip(name, f"{values.size} weights < min_params {o.min_params}")
            continue
        if id(w) in seen or len(w.outputs) > 1:
            result.skip(name, "weight shared with another node")
            continue
        seen.add(id(w))
        layers.append(_Layer(node, w, values))
    return layers


def _mask_smallest(mags: np.ndarray, ratio: float) -> np.ndarray:
    """Keep-mask that drops exactly round(ratio * n) entries of smallest magnitude (stable ties)."""
    k = int(round(ratio * mags.size))
    keep = np.ones(mags.size, dtype=bool)
    if k > 0:
        keep[np.argsort(mags, kind="stable")[:k]] = False
    return keep


def _sensitivity(graph: Graph, ctx: PassContext, layers: list[_Layer], acts: dict, o: SparsifyOptions) -> dict:
    from .search import search_ratios

    systems: dict[str, tuple] = {}  # the refit's normal equations depend on the layer, not the ratio

    def prune(layer: _Layer, ratio: float) -> np.ndarray:
        layer.mask = _mask_smallest(np.abs(layer.values).ravel(), ratio).reshape(layer.values.shape)
        new = np.where(layer.mask, layer.values, 0).astype(layer.values.dtype)
        name = layer.node.name
        if name in acts:
            if name not in systems:
                systems[name] = _refit_system(layer, acts[name], o.ridge, ctx.seed)
            refitted = _refit(layer, acts[name], o.ridge, ctx.seed, systems[name])
            if refitted is not None:
                new = refitted
        return new

    base = graph.to_model()  # every weight an initializer named like its gs constant
    return search_ratios(base, ctx.calibration, layers, o.budget, o.max_ratio, o.search_steps, prune)


# --------------------------------------------------------------------------- refit


def _refit_inputs(graph: Graph, ctx: PassContext, layers: list[_Layer], o: SparsifyOptions,
                  result: PassResult) -> dict[str, np.ndarray]:
    wanted: dict[str, str] = {}
    for layer in layers:
        node = layer.node
        name = node.name
        if node.op == "Gemm" and int(node.attrs.get("transA", 0)):
            result.skip(name, "refit: Gemm with transA not supported")
            continue
        if node.op == "MatMul" and (weight_input_index(node) == 0 or layer.values.ndim != 2):
            result.skip(name, "refit: MatMul weight must be a 2-D right operand")
            continue
        if node.op == "Conv":
            if int(node.attrs.get("group", 1)) != 1:
                result.skip(name, "refit: grouped convolution not supported")
                continue
            if layer.values.ndim != 4 or node.attrs.get("auto_pad", "NOTSET") not in ("NOTSET", b"NOTSET"):
                result.skip(name, "refit: only 2-D convolutions with explicit pads")
                continue
        features = int(np.prod(layer.values.shape[1:])) if node.op == "Conv" else layer.values.shape[
            1 if node.op == "Gemm" and int(node.attrs.get("transB", 0)) else 0]
        if features > o.refit_max_features:
            result.skip(name, f"refit: {features} inputs per channel > refit_max_features")
            continue
        x = node.inputs[0]
        if isinstance(x, gs.Constant):
            result.skip(name, "refit: input is a constant")
            continue
        wanted[name] = x.name
    if not wanted:
        return {}
    values = ctx.activations(graph.source, sorted(set(wanted.values())))
    return {layer: values[t] for layer, t in wanted.items()}


def _refit(layer: _Layer, x: np.ndarray, ridge: float, seed: int,
           system: "tuple | None" = None) -> "np.ndarray | None":
    """Refitted sparse weight (same layout and mask), or None when the layer cannot be refitted.

    ``system``: the layer's ``_refit_system`` when already computed (the sensitivity search
    refits one layer at many ratios)."""
    node, w, mask = layer.node, layer.values, layer.mask
    system = system if system is not None else _refit_system(layer, x, ridge, seed)
    if system is None:
        return None
    gram, rhs, lam, wf = system
    transposed = node.op == "Gemm" and int(node.attrs.get("transB", 0))
    mf = mask.reshape(w.shape[0], -1).T if node.op == "Conv" else (mask.T if transposed else mask)
    # inputs never active on the calibration data carry no information: their weights are kept
    silent = np.diag(gram) <= 0
    new = np.where(mf, wf, 0.0)
    for j in range(wf.shape[1]):
        keep = mf[:, j] & ~silent
        if not keep.any():
            continue
        g = gram[np.ix_(keep, keep)]
        g[np.diag_indices_from(g)] += lam
        # the silent inputs' fixed weights contribute nothing on this data, so the target is unchanged
        try:  # gram + ridge is symmetric positive definite: Cholesky, half the work of LU
            new[keep, j] = scipy.linalg.solve(g, rhs[keep, j], assume_a="pos", check_finite=False)
        except np.linalg.LinAlgError:
            pass
    if node.op == "Conv":
        return new.T.reshape(w.shape).astype(w.dtype)
    return (new.T if transposed else new).astype(w.dtype)


def _refit_system(layer: _Layer, x: np.ndarray, ridge: float, seed: int) -> "tuple | None":
    """Normal equations of the refit, independent of the mask: (gram, rhs, ridge term, dense W
    as [inputs, outputs]); None when the activations do not match the weight."""
    node, w = layer.node, layer.values
    if node.op == "Conv":
        geometry = ConvGeometry.from_attrs(node.attrs, w.shape[2:])
        A = patches(x, geometry, sample_positions(geometry.positions(x.shape), seed), np.float64)
        wf = w.reshape(w.shape[0], -1).T.astype(np.float64)  # [C*k, O]
    else:
        A = x.reshape(-1, x.shape[-1]).astype(np.float64)
        transposed = node.op == "Gemm" and int(node.attrs.get("transB", 0))
        wf = (w.T if transposed else w).astype(np.float64)  # [K, O]
        if A.shape[1] != wf.shape[0]:
            return None
    target = A @ wf  # bias unchanged: the dense and sparse layers share it
    gram = A.T @ A
    lam = ridge * float(np.mean(np.diag(gram))) if len(gram) else 0.0
    rhs = A.T @ target  # [K, O]
    return gram, rhs, lam, wf
