"""Importance criteria of ``prune``: one small class per value of the ``criterion`` option.

An :class:`Importance` scores every channel id of the channel analysis (``scores``); calling it
sums those scores over each pruning unit, per group (``{group index: {unit: score}}``), which
is what the allocation ranks: lower scores are pruned first.

Criteria that score a producer's own output channels (:class:`ProducerImportance`) normalise
each producer's scores by their mean, so the coupled producers of one residual stream weigh
alike. ``IMPORTANCE`` maps the option value to its class (the habit of Torch-Pruning's
``pruner/importance.py``).
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from onnxslim_cnn.analysis.channels import ChannelAnalysis, Producer
from onnxslim_cnn.graph import Graph


def filter_norms(p: Producer, criterion: str) -> np.ndarray:
    """Per output channel of ``p``: the L1 (``"l1"``) or L2 norm of its filter."""
    w = np.asarray(p.node.inputs[1].values, np.float64)
    node = p.node
    if p.kind == "conv":
        flat = w.reshape(w.shape[0], -1)
    elif p.kind == "convtranspose":
        g = int(node.attrs.get("group", 1))
        flat = np.moveaxis(w.reshape(g, w.shape[0] // g, w.shape[1], -1), 2, 1).reshape(g * w.shape[1], -1)
    elif p.kind == "gemm" and node.attrs.get("transB", 0):
        flat = w
    else:
        flat = w.T
    return np.abs(flat).sum(1) if criterion == "l1" else np.sqrt((flat ** 2).sum(1))


def bn_gammas(p: Producer) -> "np.ndarray | None":
    """|gamma| of the BatchNormalization (or the per-channel Mul of a BN exported as Mul + Add)
    that is the producer's only consumer; None when there is none."""
    users = list(p.node.outputs[0].outputs)
    if len(users) == 1 and users[0].op == "BatchNormalization" and isinstance(users[0].inputs[1], gs.Constant):
        return np.abs(np.asarray(users[0].inputs[1].values, np.float64))
    if len(users) == 1 and users[0].op == "Mul":  # BN exported as Mul + Add
        for t in users[0].inputs:
            if isinstance(t, gs.Constant) and np.asarray(t.values).size == len(p.ids):
                return np.abs(np.asarray(t.values, np.float64).reshape(-1))
    return None


class Importance:
    """A pruning criterion: ``scores`` gives one score per channel id, calling it one per unit.

    ``ctx`` is the pass context (calibration activations through ``ctx.activations``)."""

    needs_calibration = False

    def __call__(self, graph: Graph, a: ChannelAnalysis, ctx) -> dict[int, dict[int, float]]:
        per_id = self.scores(graph, a, ctx)
        return {g.index: {u: float(per_id[ids].sum()) for u, ids in g.unit_ids.items()} for g in a.groups}

    def scores(self, graph: Graph, a: ChannelAnalysis, ctx) -> np.ndarray:
        """One score per channel id (``len(a.parent)`` of them)."""
        raise NotImplementedError


class ProducerImportance(Importance):
    """Scores each producer's output channels, divided by their mean (when positive)."""

    def scores(self, graph: Graph, a: ChannelAnalysis, ctx) -> np.ndarray:
        per_id = np.zeros(len(a.parent))
        data = self.prepare(graph, a, ctx)
        for p in a.producers.values():
            s = self.producer_scores(a, p, data)
            mean = float(np.mean(s)) if np.mean(s) > 0 else 1.0
            per_id[p.ids] = s / mean
        return per_id

    def prepare(self, graph: Graph, a: ChannelAnalysis, ctx) -> dict:
        """What the producers' scores need (activations), computed once."""
        return {}

    def producer_scores(self, a: ChannelAnalysis, p: Producer, data: dict) -> np.ndarray:
        raise NotImplementedError


class L1Importance(ProducerImportance):
    """L1 norm of each filter (Li et al. 2017, "Pruning Filters for Efficient ConvNets")."""

    def producer_scores(self, a, p, data):
        return filter_norms(p, "l1")


class L2Importance(ProducerImportance):
    """L2 norm of each filter."""

    def producer_scores(self, a, p, data):
        return filter_norms(p, "l2")


class BNGammaImportance(ProducerImportance):
    """|gamma| of the BN after each producer (network slimming, Liu et al. 2017); a producer
    without one is scored by its filters' L1 norm."""

    def producer_scores(self, a, p, data):
        s = bn_gammas(p)
        return filter_norms(p, "l1") if s is None else s


class ActivationImportance(ProducerImportance):
    """Mean |activation| of each output channel on the calibration data."""

    needs_calibration = True

    def prepare(self, graph, a, ctx):
        return ctx.activations(graph.source, [p.node.outputs[0].name for p in a.producers.values()])

    def producer_scores(self, a, p, data):
        x = data[p.node.outputs[0].name]
        axis = a.info[p.node.outputs[0].name].axis
        return np.abs(x).mean(axis=tuple(i for i in range(x.ndim) if i != axis))


class ReconstructionImportance(Importance):
    """Per id: summed over the layers that consume it, the output error left after removing it
    and refitting (``recover.removal_errors``). Ids no layer consumes score by weight norm."""

    needs_calibration = True

    def scores(self, graph, a, ctx):
        from .recover import removal_errors

        per_id = np.full(len(a.parent), np.nan)
        consumers = [n for n in graph.nodes if n.op in ("Conv", "Gemm", "MatMul") and int(n.attrs.get("group", 1)) == 1
                     and isinstance(n.inputs[1], gs.Constant) and n.inputs[0].name in a.info
                     and not (n.op == "Gemm" and n.attrs.get("transA", 0))]
        acts = ctx.activations(graph.source, sorted({n.inputs[0].name for n in consumers}))
        for n in consumers:
            w = np.asarray(n.inputs[1].values)
            if n.op == "Gemm" and n.attrs.get("transB", 0):
                w = w.T
            ci = a.info[n.inputs[0].name]
            x = acts[n.inputs[0].name]
            if n.op != "Conv":
                x = np.moveaxis(x, ci.axis, -1)
            for i, err in removal_errors(n.op, dict(n.attrs), w, x, ci.ids).items():
                per_id[i] = err if np.isnan(per_id[i]) else per_id[i] + err
        fallback = np.zeros(len(a.parent))
        for p in a.producers.values():
            s = filter_norms(p, "l2")
            fallback[p.ids] = s / (s.mean() or 1.0) * 1e3  # unconsumed ids: keep unless nothing else goes
        return np.where(np.isnan(per_id), fallback, per_id)


# PruneOptions.criterion -> its class
IMPORTANCE: dict[str, type[Importance]] = {
    "l1": L1Importance,
    "l2": L2Importance,
    "bn_gamma": BNGammaImportance,
    "activation": ActivationImportance,
    "reconstruction": ReconstructionImportance,
}
