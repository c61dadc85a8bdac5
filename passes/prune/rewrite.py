"""Rewriting for ``prune``: remove a set of channel ids everywhere they appear.

Given the channel analysis and the ids to remove, every tensor that carries ids gets a keep mask
and every node touching such a tensor is edited: producers lose output filters (and biases),
BN/InstanceNorm lose their per-channel parameters, per-channel constants of element-wise ops are
sliced, depthwise convs shrink their group count, Split/Slice/Reshape parameters are recomputed,
and consumers (Conv, Gemm, MatMul) lose the matching input channels or FC input blocks. A Pad
of the channel axis pads as many fewer channels as it loses padded ones.

Removed channels are not simply dropped from consumers: their contribution is replaced by its
mean over the calibration data (``compensate``). For a channel whose activation is a constant
(a dead filter: ReLU of a BN shift) this is exact — and where the consumer conv pads its input,
the constant's contribution differs at the borders, so the exact per-position map is added.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from onnxslim_cnn.analysis.channels import ChannelAnalysis, ChannelInfo, channel_pads
from onnxslim_cnn.graph import Graph
from onnxslim_cnn.graph import constant_value as _const, node_label as _label  # shared helpers


@dataclass(frozen=True)
class RefitItem:
    """One consumer that ``apply`` refitted by least squares (``reconstruct``), for the
    sequential refit that follows: ``node`` is the consumer (its weights already refitted),
    ``target`` the name of its original output tensor (the activations to fit to, in the
    unpruned model), ``out_mask`` the output channels it keeps (None: all)."""

    node: gs.Node
    target: str
    out_mask: "np.ndarray | None"


class Rewriter:
    def __init__(self, graph: Graph, analysis: ChannelAnalysis, removed_ids: np.ndarray):
        self.graph = graph
        self.a = analysis
        self.removed = np.unique(np.asarray(removed_ids, np.int64))
        self.refit_inputs: dict[str, np.ndarray] = {}
        self.refit_skipped: list[str] = []  # consumers with too few calibration rows to refit
        self.ridge = 1e-3
        self.keep: dict[str, np.ndarray] = {}
        # a unit goes as a whole class: its producers' ids and the ids of channels nobody
        # produces that it was coupled with (a Pad's zero channels)
        removed_roots = np.unique(analysis.root(self.removed)) if self.removed.size else self.removed
        for name, ci in analysis.info.items():
            mask = ~np.isin(analysis.root(ci.ids), removed_roots)
            if not mask.all():
                self.keep[name] = mask

    def mask(self, t) -> "np.ndarray | None":
        return None if t is None or isinstance(t, gs.Constant) else self.keep.get(t.name)

    # ---------------------------------------------------------------------------------------
    def consumer_inputs(self) -> list[tuple[gs.Node, gs.Tensor, np.ndarray]]:
        """(node, input tensor, keep mask) of every weighted consumer that loses input channels."""
        out = []
        for node in self.graph.nodes:
            if node.op in ("Conv", "Gemm", "MatMul") and int(node.attrs.get("group", 1)) == 1:
                m = self.mask(node.inputs[0])
                if m is not None and _const(node.inputs[1]) is not None:
                    out.append((node, node.inputs[0], m))
        return out

    def apply(self, compensation: "dict[str, dict] | None" = None,
              refit_inputs: "dict[str, np.ndarray] | None" = None, ridge: float = 1e-3) -> list[RefitItem]:
        """Edit every node. ``compensation``: consumer input name -> statistics of the removed
        positions (their mean replaces them); ``refit_inputs``: consumer input name -> its
        activations, for a least-squares refit of the consumer instead (``reconstruct``).
        Returns the refit plan: the consumers refitted, in graph order at the time of the call."""
        compensation = compensation or {}
        self.refit_inputs = refit_inputs or {}
        self.ridge = ridge
        plan: list[RefitItem] = []
        for node in list(self.graph.nodes):
            op = node.op
            if op in ("Conv", "ConvTranspose", "Gemm", "MatMul") and _const(node.inputs[1]) is not None:
                item = self._weighted(node, compensation)
                if item is not None:
                    plan.append(item)
            elif op in ("BatchNormalization", "InstanceNormalization"):
                m = self.mask(node.inputs[0])
                if m is not None:
                    for i in range(1, len(node.inputs)):
                        if _const(node.inputs[i]) is not None:
                            self._slice_input(node, i, m, 0)
            elif op in ("Add", "Sub", "Mul", "Div", "Max", "Min", "Sum", "Mean", "Pow", "Where", "PRelu"):
                self._elementwise_constants(node)
            elif op in ("Split", "Slice") and (m := self.mask(node.inputs[0])) is not None:
                cut = self._split if op == "Split" else self._slice
                cut(node, m, self.a.info[node.inputs[0].name])
            elif op == "Reshape":
                self._reshape(node)
            elif op == "Pad":
                self._pad(node)
        return plan

    # ---------------------------------------------------------------------------------------
    def _slice_input(self, node: gs.Node, index: int, mask: np.ndarray, axis: int) -> None:
        v = _const(node.inputs[index])
        new = np.compress(mask, v, axis=axis)
        node.inputs[index] = self.graph.add_constant(f"{node.inputs[index].name}.pruned", np.ascontiguousarray(new))

    def _weighted(self, node: gs.Node, compensation) -> "RefitItem | None":
        """Slice a weighted node's filters and input channels; a refitted consumer is returned."""
        w = _const(node.inputs[1])
        op = node.op
        group = int(node.attrs.get("group", 1))
        out_mask = self.mask(node.outputs[0])
        in_mask = self.mask(node.inputs[0])
        trans_b = op == "Gemm" and node.attrs.get("transB", 0)
        if op == "Conv" and group > 1 and w.shape[1] > 1:
            # grouped: the analysis coupled position k of every group, so every group keeps the
            # same inputs; slice outputs, and inputs by the first group's mask
            if out_mask is not None:
                w = w[out_mask]
            if in_mask is not None:
                w = w[:, in_mask.reshape(group, -1)[0]]
            node.inputs[1] = self.graph.add_constant(f"{node.inputs[1].name}.pruned", np.ascontiguousarray(w))
            if out_mask is not None and len(node.inputs) > 2 and node.inputs[2] is not None:
                self._slice_input(node, 2, out_mask, 0)
            return None
        if op == "Conv" and group > 1:  # depthwise: in = out, one filter per channel
            m = in_mask if in_mask is not None else out_mask
            if m is None:
                return None
            w = w[m]
            node.attrs["group"] = int(m.sum())
            node.inputs[1] = self.graph.add_constant(f"{node.inputs[1].name}.pruned", w)
            if len(node.inputs) > 2 and node.inputs[2] is not None:
                self._slice_input(node, 2, m, 0)
            return None
        if in_mask is not None and node.inputs[0].name in self.refit_inputs \
                and op in ("Conv", "Gemm", "MatMul") and node.attrs.get("auto_pad", "NOTSET") in ("NOTSET", b"NOTSET"):
            from .recover import enough_rows

            x_shape = self.refit_inputs[node.inputs[0].name].shape
            if enough_rows(op, dict(node.attrs), w.shape, x_shape, int(in_mask.sum())):
                return self._refit(node, w, in_mask, out_mask, trans_b)
            self.refit_skipped.append(_label(node))
        out_axis = {"Conv": 0, "ConvTranspose": 1, "Gemm": 0 if trans_b else 1, "MatMul": 1}[op]
        in_axis = {"Conv": 1, "ConvTranspose": 0, "Gemm": 1 if trans_b else 0, "MatMul": 0}[op]
        bias_add = None
        if in_mask is not None:
            comp = compensation.get(node.inputs[0].name) if op in ("Conv", "Gemm", "MatMul") else None
            if comp is not None:
                bias_add = self._compensation(node, w, in_mask, comp, in_axis)
            w = np.compress(in_mask, w, axis=in_axis)
        if out_mask is not None:
            w = np.compress(out_mask, w, axis=out_axis)
        node.inputs[1] = self.graph.add_constant(f"{node.inputs[1].name}.pruned", np.ascontiguousarray(w))
        if len(node.inputs) > 2 and node.inputs[2] is not None and _const(node.inputs[2]) is not None:
            b = _const(node.inputs[2])
            if op == "Gemm" and b.size > 1 and out_mask is not None:
                b = np.compress(out_mask, b, axis=b.ndim - 1)
            elif op != "Gemm" and out_mask is not None:
                b = b[out_mask]
            node.inputs[2] = self.graph.add_constant(f"{node.inputs[2].name}.pruned", np.ascontiguousarray(b))
        if bias_add is not None:
            self._add_bias(node, bias_add, out_mask)
        return None

    def _refit(self, node, w, in_mask, out_mask, trans_b) -> RefitItem:
        from .recover import refit

        op = node.op
        item = RefitItem(node, node.outputs[0].name, out_mask)  # before a MatMul's output moves
        bias = _const(node.inputs[2]) if len(node.inputs) > 2 and node.inputs[2] is not None else None
        if op == "Gemm":
            w_eff = (w.T if trans_b else w).astype(np.float64) * float(node.attrs.get("alpha", 1.0))
            bias = None if bias is None else bias.astype(np.float64) * float(node.attrs.get("beta", 1.0))
        else:
            w_eff = w
        new_w, new_b = refit(op, dict(node.attrs), w_eff, bias, self.refit_inputs[node.inputs[0].name],
                             in_mask, out_mask, self.ridge)
        if op == "Gemm":
            new_w = new_w.T if trans_b else new_w
            node.attrs["alpha"], node.attrs["beta"] = 1.0, 1.0
        node.inputs[1] = self.graph.add_constant(f"{node.inputs[1].name}.refit", np.ascontiguousarray(new_w.astype(w.dtype)))
        if op == "MatMul":
            self._add_bias(node, new_b.astype(np.float64), None)
            return item
        b_const = self.graph.add_constant(f"{_label(node)}.bias_refit", new_b.astype(w.dtype))
        if bias is not None:
            node.inputs[2] = b_const
        else:
            node.inputs.append(b_const)
        return item

    def _compensation(self, node, w, in_mask, comp, in_axis):
        """What the removed inputs contributed, as a bias vector or (dead channels through a
        padded or spatially varying path) the exact per-position map."""
        removed = ~in_mask
        vals = comp["mean"][removed]
        if node.op in ("Gemm", "MatMul"):
            wr = np.compress(removed, w.astype(np.float64), axis=in_axis)
            contrib = vals @ wr if in_axis == 0 else wr @ vals
            if node.op == "Gemm":
                contrib = contrib * float(node.attrs.get("alpha", 1.0))
            return contrib
        wr = np.compress(removed, w.astype(np.float64), axis=1)
        fmap = comp["map"][removed]
        flat = fmap.reshape(fmap.shape[0], -1)
        uniform = bool(np.all(flat.max(axis=1) - flat.min(axis=1) <= 1e-6 * max(float(np.abs(flat).max()), 1e-12)))
        pads = list(node.attrs.get("pads", [0] * (2 * (w.ndim - 2))))
        auto_pad = node.attrs.get("auto_pad", "NOTSET")
        unpadded = not any(pads) and auto_pad in ("NOTSET", b"NOTSET", "VALID", b"VALID")
        if uniform and unpadded or not bool(np.all(comp["dead"][removed])):
            # a live channel has no exact replacement: its mean is the best constant
            return wr.reshape(wr.shape[0], wr.shape[1], -1).sum(-1) @ vals
        return ("map", wr, fmap)

    def _add_bias(self, node, bias, out_mask) -> None:
        if isinstance(bias, tuple):
            self._add_border_map(node, bias, out_mask)
            return
        if out_mask is not None:
            bias = bias[out_mask]
        w = _const(node.inputs[1])
        if node.op == "MatMul":
            # MatMul has no bias input: add one after it (slim turns MatMul+Add into Gemm)
            out = node.outputs[0]
            mid = gs.Variable(self.graph.unique_name(f"{out.name}_premm"), dtype=out.dtype)
            node.outputs[0] = mid
            add = gs.Node("Add", name=self.graph.unique_name(f"{_label(node)}_compensation"),
                          inputs=[mid, self.graph.add_constant(f"{_label(node)}.compensation", bias.astype(w.dtype))],
                          outputs=[out])
            self.graph.nodes.append(add)
            return
        has_bias = len(node.inputs) > 2 and node.inputs[2] is not None
        if node.op == "Gemm":
            beta = float(node.attrs.get("beta", 1.0))
            old = _const(node.inputs[2]).astype(np.float64) * beta if has_bias else np.zeros(1)
            new = (np.broadcast_to(old.reshape(-1) if old.size > 1 else old, bias.shape) + bias)
            node.attrs["beta"] = 1.0
        else:
            old = _const(node.inputs[2]).astype(np.float64) if has_bias else np.zeros_like(bias)
            new = old + bias
        const = self.graph.add_constant(f"{_label(node)}.bias_compensated", new.astype(w.dtype))
        if has_bias:
            node.inputs[2] = const
        else:
            node.inputs.append(const)

    def _add_border_map(self, node, spec, out_mask) -> None:
        """Exact contribution of input-independent channels: the conv of their mean map."""
        _, wr, fmap = spec
        from onnx import TensorProto, helper, numpy_helper

        from onnxslim_cnn.sessions import make_session

        attrs = {k: v for k, v in node.attrs.items() if k in ("pads", "strides", "dilations", "auto_pad", "kernel_shape")}
        g = helper.make_graph([helper.make_node("Conv", ["x", "w"], ["y"], **attrs)], "m",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, None)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              [numpy_helper.from_array(wr.astype(np.float32), "w")])
        m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
        m.ir_version = 8
        contribution = make_session(m).run(None, {"x": fmap[None].astype(np.float32)})[0][0]  # [C_out, Ho, Wo]
        if out_mask is not None:
            contribution = contribution[out_mask]
        out = node.outputs[0]
        mid = gs.Variable(self.graph.unique_name(f"{out.name}_precompensation"), dtype=out.dtype)
        node.outputs[0] = mid
        add = gs.Node("Add", name=self.graph.unique_name(f"{_label(node)}_compensation"),
                      inputs=[mid, self.graph.add_constant(f"{_label(node)}.compensation",
                                                           contribution[None].astype(np.float32))],
                      outputs=[out])
        self.graph.nodes.append(add)

    def _elementwise_constants(self, node: gs.Node) -> None:
        out = node.outputs[0]
        m = self.mask(out)
        ci = self.a.info.get(out.name)
        if m is None or ci is None or out.shape is None:
            return
        rank = len(out.shape)
        for i, t in enumerate(node.inputs):
            v = _const(t)
            if v is None or v.ndim == 0:
                continue
            axis = ci.axis - (rank - v.ndim)
            if 0 <= axis < v.ndim and v.shape[axis] == len(m):
                self._slice_input(node, i, m, axis)

    def _split(self, node: gs.Node, m: np.ndarray, ci: ChannelInfo) -> None:
        """Split of a tensor that loses channels (keep mask ``m``): new split sizes."""
        x = node.inputs[0]
        axis = int(node.attrs.get("axis", 0)) % len(x.shape)
        if axis != ci.axis:
            return
        sizes = [int(self.keep[o.name].sum()) if o.name in self.keep else len(self.a.info[o.name].ids)
                 for o in node.outputs]
        if len(node.inputs) > 1 and node.inputs[1] is not None:
            node.inputs[1] = self.graph.add_constant(f"{_label(node)}.split", np.array(sizes, np.int64))
        else:
            node.attrs["split"] = sizes
        node.attrs.pop("num_outputs", None)

    def _slice(self, node: gs.Node, m: np.ndarray, ci: ChannelInfo) -> None:
        """Slice of a tensor that loses channels (keep mask ``m``): starts/ends among the kept."""
        x = node.inputs[0]
        starts, ends = _const(node.inputs[1]).astype(np.int64), _const(node.inputs[2]).astype(np.int64)
        rank = len(x.shape)
        axes = _const(node.inputs[3]).reshape(-1) % rank if len(node.inputs) > 3 else np.arange(len(starts))
        n = len(m)
        new_s, new_e = starts.copy(), ends.copy()
        for k, a in enumerate(axes):
            if a == ci.axis:
                s = int(starts[k]) + n if starts[k] < 0 else int(starts[k])
                e = int(ends[k]) + n if ends[k] < 0 else int(min(ends[k], n))
                new_s[k], new_e[k] = int(m[:s].sum()), int(m[:e].sum())
        node.inputs[1] = self.graph.add_constant(f"{_label(node)}.starts", new_s)
        node.inputs[2] = self.graph.add_constant(f"{_label(node)}.ends", new_e)

    def _pad(self, node: gs.Node) -> None:
        """Pad of the channel axis whose padded channels lose some: pad that many fewer."""
        m = self.mask(node.outputs[0])
        ci = self.a.info.get(node.outputs[0].name)
        if m is None or ci is None:
            return
        pads, lo_i, hi_i = channel_pads(node, ci.axis)
        if lo_i < 0:
            return
        lo, hi = int(pads[lo_i]), int(pads[hi_i])
        new = pads.copy()
        new[lo_i], new[hi_i] = int(m[:lo].sum()), int(m[len(m) - hi:].sum()) if hi else 0
        if len(node.inputs) > 1 and node.inputs[1] is not None and node.inputs[1].name:
            node.inputs[1] = self.graph.add_constant(f"{_label(node)}.pads", new)
        else:
            node.attrs["pads"] = [int(v) for v in new]

    def _reshape(self, node: gs.Node) -> None:
        out = node.outputs[0]
        m = self.mask(out)
        target = _const(node.inputs[1])
        if m is None or target is None or target.size != 2 or target[1] == -1:
            return
        node.inputs[1] = self.graph.add_constant(f"{_label(node)}.shape", np.array([target[0], int(m.sum())], np.int64))
