"""Pass ``prune``: structured filter/neuron pruning driven by the channel dependency analysis.

1. ``analysis.channels.analyze`` groups coupled channels and freezes what it cannot follow.
2. Each pruning unit (a class of coupled channels) gets an importance (``prune.importance``, one
   class per ``criterion``): the criterion's score of every member filter, normalised per
   producer (so a residual stream's convs count alike), summed.
3. Allocation picks the least important units: the same ratio in every group (``scope=uniform``)
   or one threshold across all groups (``scope=global``), per-layer overrides, protected layers,
   and channel counts kept a multiple of ``round_to``.
4. ``prune.rewrite.Rewriter`` removes them everywhere, compensating the consumers' biases with
   the removed channels' mean activation (exact for dead channels).
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import numpy as np
import onnx_graphsurgeon as gs

from onnxslim_cnn.analysis.channels import ChannelAnalysis, ChannelGroup, analyze
from onnxslim_cnn.graph import Graph
from onnxslim_cnn.options import option
from onnxslim_cnn.context import PassContext
from onnxslim_cnn.pass_infra import GraphPass, Knob, PassResult, register_pass

from .importance import IMPORTANCE
from .recover import MIN_ROWS_PER_FEATURE
from .rewrite import RefitItem, Rewriter


@dataclasses.dataclass(frozen=True)
class PruneOptions:
    ratio: float = option(0.5, "share of channels to remove in each group (uniform) or overall (global)",
                          min=0.0, max=0.95)
    criterion: Literal["l1", "l2", "bn_gamma", "activation", "reconstruction"] = option(
        "l1", "importance: filter L1/L2 norm, |gamma| of the following BN (network slimming), "
        "mean |activation| on calibration data, or the consumers' output error after removing the "
        "channel and refitting by least squares (reconstruction; pairs with reconstruct=true)",
        calibration_when=lambda criterion: IMPORTANCE[criterion].needs_calibration)
    scope: Literal["uniform", "global"] = option("uniform", "same ratio per group, or one ranking across groups")
    layer_ratio: dict[str, float] = option({}, "per-layer ratio overrides by producer node name (name:ratio,...)")
    protect: list[str] = option([], "producer node names never pruned (in addition to the defaults)")
    protect_first: bool = option(True, "protect the group of the first conv (fed by a graph input)")
    round_to: int = option(1, "keep channel counts a multiple of this (e.g. 8 for SIMD-friendly shapes)", min=1)
    compensate: bool = option(True, "replace removed channels by their mean activation in consumers' "
                                    "biases (exact for dead channels); needs calibration data", calibration_when=bool)
    zero_only: bool = option(False, "remove only channels whose filters are entirely zero (exact)")
    reconstruct: bool = option(False, "refit each consumer's remaining weights and bias by ridge least "
                                      "squares on calibration activations (training-free recovery)",
                                      calibration_when=bool)
    ridge: float = option(1e-3, "ridge term of the refit, relative to the mean Gram diagonal", min=0.0)
    sequential: bool = option(True, "with reconstruct: refit layer by layer on the pruned network's own "
                                    "activations, so each refit also absorbs the error upstream")


@register_pass
class PrunePass(GraphPass):
    name = "prune"
    summary = ("Structured pruning: removes whole conv filters / FC neurons and everything coupled to "
               "them (BN channels, residual Adds, Concat offsets, depthwise convs, SE blocks, "
               "Flatten->FC blocks, consumers' input channels); frozen groups are reported with the "
               "op that froze them.")
    Options = PruneOptions
    modifies = frozenset({"graph"})
    lossy = True
    budget_knob = Knob(option="ratio", ladder=(0.5, 0.3, 0.2, 0.1, 0.05, 0.02), recovery={"reconstruct": True},
                       fixed_by=("zero_only",), must_be_faster=True)

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        o = self.options
        result = PassResult()
        folded = _fold_constant_operands(graph)
        if folded:
            result.stats["constants_folded"] = folded
        analysis = analyze(graph)
        protected = set(o.protect)
        if o.protect_first:
            protected |= _first_convs(graph, analysis)
        scores = IMPORTANCE[o.criterion]()(graph, analysis, ctx)
        removed_units: dict[int, list[int]] = {}
        for group in analysis.groups:
            if group.frozen:
                result.skip(",".join(group.producers[:3]), f"frozen: {group.frozen}")
                continue
            if protected & set(group.producers):
                result.skip(",".join(group.producers[:3]), "protected layer")
                continue
            for root, why in list(group.frozen_units.items())[:1]:
                result.skip(",".join(group.producers[:3]), f"{len(group.frozen_units)} channel(s) frozen: {why}")
        candidates = [g for g in analysis.groups if not g.frozen and not (protected & set(g.producers))]
        if o.zero_only:
            removed_units = {g.index: [u for u in g.prunable if scores[g.index][u] == 0.0] for g in candidates}
        elif o.scope == "uniform":
            for g in candidates:
                ratio = max((o.layer_ratio.get(p, o.ratio) for p in g.producers), default=o.ratio)
                removed_units[g.index] = _pick(g, scores[g.index], _n_remove(g, ratio, o.round_to))
        else:
            removed_units = _global(candidates, scores, o)
        removed_ids = [g.unit_ids[u] for g in candidates for u in removed_units.get(g.index, [])]
        if not removed_ids:
            return result
        removed = np.concatenate(removed_ids)
        rewriter = Rewriter(graph, analysis, removed)
        compensation = _compensation(graph, rewriter, ctx) if o.compensate else {}
        refit_inputs = {}
        # zero_only removes dead channels exactly: a refit would only move the weights away
        reconstruct = o.reconstruct and not o.zero_only
        if reconstruct:
            names = sorted({t.name for _, t, _ in rewriter.consumer_inputs()})
            refit_inputs = ctx.activations(graph.source, names) if names else {}
        plan = rewriter.apply(compensation, refit_inputs, o.ridge)
        for label in rewriter.refit_skipped:
            result.skip(label, f"not refitted: fewer than {MIN_ROWS_PER_FEATURE:g} calibration rows per input "
                               "feature (kept the mean-compensated weights)")
        if reconstruct and o.sequential:
            _sequential_refit(graph, plan, ctx, o.ridge)
        for g in candidates:
            n = len(removed_units.get(g.index, []))
            if n:
                result.change(",".join(g.producers[:3]) + ("..." if len(g.producers) > 3 else ""),
                              "pruned_channels", layers=g.producers, channels_before=g.channels,
                              channels_after=g.channels - n)
        result.stats["channels_removed"] = int(sum(len(v) for v in removed_units.values()))
        result.stats["groups_frozen"] = sum(1 for g in analysis.groups if g.frozen)
        return result


_SHAPE_ONLY = ("Reshape", "Unsqueeze", "Squeeze", "Identity")


def _fold_constant_operands(graph: Graph) -> int:
    """Constants behind a shape-only node, feeding an element-wise op, become constants: Paddle
    exports a conv's bias as ``Add(conv, Reshape(bias, [1, C, 1, 1]))``, which the channel analysis
    can only slice (and prune) as a constant; as a computed tensor it has to freeze the conv."""
    from onnxslim_cnn.analysis.channels import BINARY

    n = 0
    for node in list(graph.nodes):
        if node.op not in _SHAPE_ONLY or len(node.outputs) != 1:
            continue
        out = node.outputs[0]
        ins = [t for t in node.inputs if t is not None and t.name]
        if (not ins or not all(isinstance(t, gs.Constant) for t in ins) or graph.is_graph_output(out)
                or not any(c.op in BINARY for c in out.outputs)):
            continue
        value = _shape_only_value(node, [np.asarray(t.values) for t in ins])
        if value is None:
            continue
        graph.replace_uses(out, graph.add_constant(f"{out.name}.folded", value))
        n += 1
    if n:
        graph.remove_unused()  # the folded nodes
    return n


def _shape_only_value(node, vals: list) -> "np.ndarray | None":
    x = vals[0]
    if node.op == "Identity":
        return x
    if node.op == "Reshape":
        if len(vals) < 2:
            return None
        shape = [int(d) for d in vals[1].reshape(-1)]
        if not node.attrs.get("allowzero", 0):
            shape = [x.shape[i] if d == 0 and i < x.ndim else d for i, d in enumerate(shape)]
        try:
            return x.reshape(shape)
        except ValueError:
            return None
    axes = vals[1] if len(vals) > 1 else node.attrs.get("axes")
    if node.op == "Squeeze":
        return np.squeeze(x, axis=None if axes is None else tuple(int(a) for a in np.asarray(axes).reshape(-1)))
    if axes is None:
        return None
    axes = sorted(int(a) % (x.ndim + len(np.asarray(axes).reshape(-1))) for a in np.asarray(axes).reshape(-1))
    for a in axes:
        x = np.expand_dims(x, a)
    return x


def _first_convs(graph: Graph, a: ChannelAnalysis) -> set[str]:
    inputs = {t.name for t in graph.inputs}
    return {name for name, p in a.producers.items() if p.node.inputs[0].name in inputs}


def _n_remove(g: ChannelGroup, ratio: float, round_to: int) -> int:
    total, prunable = g.channels, len(g.prunable)
    keep = total - int(np.floor(ratio * total))
    if round_to > 1:
        keep = max(round_to, int(np.ceil(keep / round_to)) * round_to)
    keep = max(keep, 1, total - prunable)
    return max(0, min(total - keep, prunable))


def _pick(g: ChannelGroup, scores: dict[int, float], n: int) -> list[int]:
    order = sorted(g.prunable, key=lambda u: (scores[u], u))  # ties: by id, deterministic
    return order[:n]


def _global(groups: list[ChannelGroup], scores, o: PruneOptions) -> dict[int, list[int]]:
    ranked = sorted(((scores[g.index][u], g.index, u) for g in groups for u in g.prunable))
    total = sum(g.channels for g in groups)
    budget = int(np.floor(o.ratio * total))
    taken: dict[int, list[int]] = {g.index: [] for g in groups}
    cap = {g.index: _n_remove(g, 0.95, o.round_to) for g in groups}  # never empty a group
    for _, gi, u in ranked:
        if budget <= 0:
            break
        if len(taken[gi]) < cap[gi]:
            taken[gi].append(u)
            budget -= 1
    if o.round_to > 1:  # give back the most important picks until the kept count is a multiple
        for g in groups:
            while taken[g.index] and (g.channels - len(taken[g.index])) % o.round_to:
                taken[g.index].pop()
    return taken


def _compensation(graph: Graph, rewriter: Rewriter, ctx: PassContext) -> dict[str, dict]:
    """Per consumer input tensor: the per-channel mean, the per-position mean map (over the
    batch only) and which channels are dead (the same at every sample: input-independent)."""
    targets = rewriter.consumer_inputs()
    names = sorted({t.name for _, t, _ in targets})
    if not names:
        return {}
    acts = ctx.activations(graph.source, names)
    out = {}
    for name in names:
        x = acts[name].astype(np.float64)
        axis = rewriter.a.info[name].axis
        x = np.moveaxis(x, axis, 1)
        fmap = x.mean(axis=0)  # [C, *spatial]
        spread = (x.max(axis=0) - x.min(axis=0)).reshape(x.shape[1], -1).max(axis=1)
        scale = max(float(np.abs(x).max()), 1e-12)
        out[name] = {"mean": fmap.reshape(fmap.shape[0], -1).mean(axis=1), "map": fmap,
                     "dead": spread <= 1e-6 * scale}
    return out


def _sequential_refit(graph: Graph, plan: list[RefitItem], ctx: PassContext, ridge: float) -> None:
    """Refit each consumer of the plan, in topological order, from its input in the pruned network."""
    from onnxslim_cnn.analysis.activations import capture

    from .recover import fit_to_target

    graph.toposort()
    position = {id(n): k for k, n in enumerate(graph.nodes)}
    plan = sorted(plan, key=lambda item: position[id(item.node)])
    target_names = sorted({item.target for item in plan})
    # one sample set for the targets and every refit input, within the memory bound
    data = ctx.activation_data(graph.source, target_names + sorted({item.node.inputs[0].name for item in plan}))
    targets = ctx.activations(graph.source, target_names, data)
    for item in plan:
        node = item.node
        model = graph.to_model()
        x = capture(model, [node.inputs[0].name], data)[node.inputs[0].name]
        y = targets[item.target]
        w_old = np.asarray(node.inputs[1].values)
        trans_b = node.op == "Gemm" and node.attrs.get("transB", 0)
        shape = w_old.T.shape if trans_b else w_old.shape
        if item.out_mask is not None:
            y = np.compress(item.out_mask, y, axis=1 if node.op == "Conv" else y.ndim - 1)
        w, b = fit_to_target(node.op, dict(node.attrs), shape, x, y, ridge)
        w = (w.T if trans_b else w).astype(w_old.dtype)
        node.inputs[1] = graph.add_constant(f"{node.inputs[1].name}.seq", np.ascontiguousarray(w))
        bias_index = 2 if node.op != "MatMul" else None
        if bias_index is not None:
            node.inputs[2] = graph.add_constant(f"{node.inputs[2].name}.seq", b.astype(w_old.dtype))
        else:  # MatMul: its bias lives in the Add that the first refit placed after it
            add = node.outputs[0].outputs[0]
            add.inputs[1] = graph.add_constant(f"{add.inputs[1].name}.seq", b.astype(w_old.dtype))
