"""Channel dependency analysis: which channel dimensions must be pruned together, and which never.

Every output channel of a prunable producer (Conv/ConvTranspose with groups=1, Gemm/MatMul with a
constant weight) gets a global integer id. Ids flow through the graph: each tensor that carries
them knows its channel axis and, per position on that axis, the id of the channel it came from
(a Flatten repeats each id H*W times, a Concat concatenates id lists, a Slice/Split cuts them,
a constant Pad of the channel axis adds new ids for the padded channels, which the rewrite can
remove by padding less).
Where two tensors must keep the same channels (a residual Add, an SE scale Mul, a depthwise conv's
in = out coupling, a Concat along another axis) their ids are unified (union-find). A class of
unified ids is one pruning *unit*: removing it removes that channel from every producer, BN,
per-channel constant and consumer that touches it. Producers whose units are unified form a
``ChannelGroup`` (e.g. all convs writing a ResNet stage's residual stream).

Anything not understood freezes the ids it touches, with the op that froze them: they are never
pruned and the report lists them. Its output carries no ids, and an element-wise op that meets
such an untracked tensor along the channel axis freezes its other operands too (their channel
count must stay that of the untracked side). Graph outputs freeze their ids so output shapes
never change.
The design follows Torch-Pruning's dependency graph (index mappings through Concat/Split/Flatten),
written for ONNX graphs.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx_graphsurgeon as gs

from ..graph import Graph
from ..graph import constant_value as _const, node_label as _label  # shared helpers

# Element-wise ops: channel ids pass through unchanged (and variable operands are unified).
UNARY = {"Relu", "LeakyRelu", "PRelu", "Clip", "Sigmoid", "HardSigmoid", "HardSwish", "Tanh", "Elu",
         "Selu", "Softplus", "Softsign", "Mish", "Gelu", "Erf", "Exp", "Abs", "Neg", "Sqrt", "Identity",
         "Dropout", "Cast", "Floor", "Ceil", "Round", "Reciprocal", "Sin", "Cos", "Log", "Not", "Sign",
         "ThresholdedRelu", "Celu", "Swish", "QuickGelu"}
BINARY = {"Add", "Sub", "Mul", "Div", "Max", "Min", "Sum", "Mean", "Pow", "Where", "Equal", "Greater", "Less"}
# Ops that only touch spatial axes (N and C pass through).
SPATIAL = {"MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool", "LpPool", "GlobalLpPool",
           "Resize", "Upsample", "DepthToSpace_never", "LRN_never"}
NORM_PER_CHANNEL = {"BatchNormalization", "InstanceNormalization"}


@dataclass
class ChannelInfo:
    axis: int
    ids: np.ndarray  # int64, one id per position along `axis`


@dataclass
class Producer:
    node: gs.Node
    kind: str  # "conv" | "convtranspose" | "gemm" | "matmul"
    ids: np.ndarray  # ids of its output channels, in order


@dataclass
class ChannelGroup:
    """Producers whose output channels are coupled; ``units`` are the classes to prune together."""

    index: int
    producers: list[str]
    units: list[int]  # union-find roots, ordered by first appearance
    unit_ids: dict[int, np.ndarray]  # root -> member ids
    frozen_units: dict[int, str] = field(default_factory=dict)  # root -> why it cannot be pruned

    @property
    def channels(self) -> int:
        return len(self.units)

    @property
    def prunable(self) -> list[int]:
        return [u for u in self.units if u not in self.frozen_units]

    @property
    def frozen(self) -> "str | None":
        """Why the whole group is frozen (None when at least one unit can be pruned)."""
        return next(iter(self.frozen_units.values())) if not self.prunable else None


@dataclass
class ChannelAnalysis:
    info: dict[str, ChannelInfo]  # tensor name -> channel ids on its channel axis
    producers: dict[str, Producer]  # node name -> producer
    id_owner: np.ndarray  # id -> index into producer list order (for reporting)
    groups: list[ChannelGroup]
    frozen_reasons: dict[int, str] = field(default_factory=dict)  # root -> why
    parent: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))

    def root(self, ids: np.ndarray) -> np.ndarray:
        return _find_all(self.parent, ids)

    def group_of(self, producer_name: str) -> "ChannelGroup | None":
        for g in self.groups:
            if producer_name in g.producers:
                return g
        return None


# --------------------------------------------------------------------------- union-find over ids


class _UF:
    """Union-find over integer ids 0..n-1 (numpy parent array); the root of a class is its
    smallest member. Used for channel ids, then for grouping producers."""

    def __init__(self) -> None:
        self.parent = np.zeros(0, np.int64)
        self.frozen: dict[int, str] = {}

    def new(self, n: int) -> np.ndarray:
        start = len(self.parent)
        self.parent = np.concatenate([self.parent, np.arange(start, start + n, dtype=np.int64)])
        return np.arange(start, start + n, dtype=np.int64)

    def find(self, i: int) -> int:
        p = self.parent
        root = i
        while p[root] != root:
            root = p[root]
        while p[i] != root:  # path compression
            p[i], i = root, p[i]
        return int(root)

    def union(self, a: np.ndarray, b: np.ndarray) -> None:
        for x, y in zip(a.tolist(), b.tolist()):
            rx, ry = self.find(x), self.find(y)
            if rx != ry:
                self.parent[max(rx, ry)] = min(rx, ry)

    def freeze(self, ids: np.ndarray, reason: str) -> None:
        for i in np.unique(ids).tolist():
            self.frozen.setdefault(int(i), reason)


def _find_all(parent: np.ndarray, ids: np.ndarray) -> np.ndarray:
    out = np.asarray(ids, np.int64).copy()
    while True:
        nxt = parent[out]
        if np.array_equal(nxt, out):
            return out
        out = nxt


# --------------------------------------------------------------------------- propagation


def _rank(t: gs.Tensor) -> "int | None":
    return len(t.shape) if t.shape is not None else None


def is_structural_constant(w: np.ndarray) -> bool:
    """Integer-valued weights (a detector's DFL conv holds arange(16)): part of the architecture."""
    return w.size > 1 and bool(np.all(np.equal(np.mod(w, 1), 0))) and float(np.max(np.abs(w))) >= 1.0


def analyze(graph: Graph) -> ChannelAnalysis:
    """Propagate channel ids through ``graph`` (topologically sorted) and build the groups."""
    graph.toposort()
    uf = _UF()
    info: dict[str, ChannelInfo] = {}
    producers: dict[str, Producer] = {}

    def carry(t: gs.Tensor) -> "ChannelInfo | None":
        return info.get(t.name) if t is not None and not isinstance(t, gs.Constant) else None

    def freeze_inputs(node: gs.Node, why: str) -> None:
        for t in node.inputs:
            ci = carry(t)
            if ci is not None:
                uf.freeze(ci.ids, f"{why} ({node.op} {_label(node)})")

    for node in graph.nodes:
        op = node.op
        ins = [carry(t) for t in node.inputs]
        out = node.outputs[0] if node.outputs else None
        try:
            handled = _propagate(graph, node, op, ins, out, uf, info, producers)
        except _Freeze as exc:
            freeze_inputs(node, str(exc))
            handled = True
        if not handled:
            freeze_inputs(node, "not understood")
    for t in graph.outputs:
        ci = info.get(t.name)
        if ci is not None:
            uf.freeze(ci.ids, f"feeds graph output {t.name}")
    return _build(uf, info, producers)


class _Freeze(Exception):
    """Raised by a propagation rule that must freeze its inputs' channels."""


def _propagate(graph, node, op, ins, out, uf, info, producers) -> bool:  # noqa: C901 - one rule per op family
    x = ins[0] if ins else None
    if op in ("Conv", "ConvTranspose"):
        w = _const(node.inputs[1])
        group = int(node.attrs.get("group", 1))
        if w is None:
            raise _Freeze("weight is not a constant")
        c_out = w.shape[0] if op == "Conv" else w.shape[1] * group
        c_in = w.shape[1] * group if op == "Conv" else w.shape[0]
        if group == 1:
            if x is not None and x.axis != 1:
                raise _Freeze("channel axis is not 1")
            if is_structural_constant(w):
                if x is not None:
                    uf.freeze(x.ids, f"input of a fixed-weight conv ({op} {_label(node)})")
                return True  # output channels are not prunable either: no ids
            ids = uf.new(c_out)
            producers[_label(node)] = Producer(node, op.lower(), ids)
            info[out.name] = ChannelInfo(1, ids)
            return True
        if op == "Conv" and group == c_in == c_out and w.shape[1] == 1:
            # depthwise: output channel k is input channel k filtered; in = out coupling
            if x is None:
                return True
            info[out.name] = ChannelInfo(1, x.ids)
            return True
        if op == "Conv" and c_in % group == 0 and c_out % group == 0:
            # grouped conv: every group must keep as many inputs and outputs as the others, so
            # position k of each group is coupled across groups (Torch-Pruning does the same)
            if x is not None:
                if x.axis != 1:
                    raise _Freeze("channel axis is not 1")
                per_group = x.ids.reshape(group, c_in // group)
                for r in range(1, group):
                    uf.union(per_group[0], per_group[r])
            ids = uf.new(c_out)
            per_group = ids.reshape(group, c_out // group)
            for r in range(1, group):
                uf.union(per_group[0], per_group[r])
            producers[_label(node)] = Producer(node, "conv", ids)
            info[out.name] = ChannelInfo(1, ids)
            return True
        raise _Freeze(f"grouped {op} (group={group}) is not supported")
    if op in ("Gemm", "MatMul"):
        w = _const(node.inputs[1])
        if w is None or w.ndim != 2 or (op == "Gemm" and node.attrs.get("transA", 0)):
            raise _Freeze("not a constant-weight FC layer")
        rank = _rank(node.inputs[0])
        if x is not None and rank is not None and x.axis != rank - 1:
            raise _Freeze("features are not on the last axis")
        n_out = w.shape[0] if op == "Gemm" and node.attrs.get("transB", 0) else w.shape[1]
        ids = uf.new(n_out)
        producers[_label(node)] = Producer(node, op.lower(), ids)
        info[out.name] = ChannelInfo((rank or 2) - 1, ids)
        return True
    if x is None and not any(i is not None for i in ins):
        return True  # nothing channel-carrying goes in: nothing to track
    if op in ("Softmax", "LogSoftmax", "Hardmax"):
        r = _rank(node.inputs[0])
        if r is None or int(node.attrs.get("axis", -1)) % r == x.axis:
            raise _Freeze("normalises over the channel axis")
        info[out.name] = ChannelInfo(x.axis, x.ids)
        return True
    if op in ("Shape", "Size"):
        return True  # reads dims at run time, which follow the pruned shape by themselves
    if op in NORM_PER_CHANNEL or op in UNARY:
        if op == "PRelu" and _const(node.inputs[1]) is None:
            raise _Freeze("PRelu slope is not a constant")
        info[out.name] = ChannelInfo(x.axis, x.ids)
        return True
    if op == "Pad":
        return _pad(node, x, out, uf, info)
    if op in SPATIAL:
        if op in ("Resize", "Upsample"):
            scales = [t for t in node.inputs[1:] if _const(t) is not None and _const(t).size]
            if any(_const(t).size > x.axis and _const(t).dtype.kind == "f" and _const(t)[x.axis] != 1 for t in scales):
                raise _Freeze("resizes the channel axis")
        info[out.name] = ChannelInfo(x.axis, x.ids)
        return True
    if op in BINARY:
        return _binary(node, ins, out, uf, info)
    if op == "Concat":
        return _concat(node, ins, out, uf, info)
    if op in ("Split", "Slice"):
        return _split_slice(node, x, uf, info)
    if op == "Transpose":
        perm = node.attrs.get("perm")
        if perm is None:
            raise _Freeze("Transpose without perm")
        info[out.name] = ChannelInfo(list(perm).index(x.axis), x.ids)
        return True
    if op in ("Flatten", "Reshape"):
        return _flatten(node, x, out, info)
    if op in ("Squeeze", "Unsqueeze"):
        return _squeeze(node, x, out, info)
    return False


def channel_pads(node: gs.Node, axis: int) -> "tuple[np.ndarray, int, int] | None":
    """A Pad's pads as an int64 array and the indices in it of the channel axis's two sides
    (-1 when ``axes`` leaves that axis out); None when the pads or axes are not constants."""
    if len(node.inputs) > 1 and node.inputs[1] is not None and node.inputs[1].name:
        pads = _const(node.inputs[1])
    else:
        pads = np.asarray(node.attrs.get("pads", []), np.int64)  # opset < 11: an attribute
    rank = _rank(node.inputs[0])
    if pads is None or rank is None:
        return None
    pads = np.asarray(pads, np.int64).reshape(-1)
    if len(node.inputs) > 3 and node.inputs[3] is not None and node.inputs[3].name:  # opset 18 axes
        axes = _const(node.inputs[3])
        if axes is None:
            return None
        axes = [int(a) % rank for a in np.asarray(axes).reshape(-1)]
    else:
        axes = list(range(rank))
    if pads.size != 2 * len(axes):
        return None
    if axis not in axes:
        return pads, -1, -1
    k = axes.index(axis)
    return pads, k, k + len(axes)


def _pad(node, x, out, uf, info) -> bool:
    """Pad: spatial pads pass ids through. Constant padding of the channel axis (the option-A
    shortcut of the CIFAR ResNets) gets new ids for the padded channels, so a residual Add couples
    them with the other branch: removing such a channel pads one channel less."""
    found = channel_pads(node, x.axis)
    if found is None:
        raise _Freeze("Pad with non-constant pads or axes")
    pads, lo_i, hi_i = found
    lo, hi = (int(pads[lo_i]), int(pads[hi_i])) if lo_i >= 0 else (0, 0)
    if lo == hi == 0:
        info[out.name] = ChannelInfo(x.axis, x.ids)
        return True
    mode = node.attrs.get("mode", "constant")
    mode = mode.decode() if isinstance(mode, bytes) else str(mode)
    if mode != "constant":
        raise _Freeze(f"{mode} padding of the channel axis copies channels")
    if lo < 0 or hi < 0:
        raise _Freeze("Pad crops the channel axis")
    info[out.name] = ChannelInfo(x.axis, np.concatenate([uf.new(lo), x.ids, uf.new(hi)]))
    return True


def _binary(node, ins, out, uf, info) -> bool:
    out_rank = _rank(out)
    carried = [(i, c) for i, c in enumerate(ins) if c is not None]
    if out_rank is None:
        raise _Freeze("unknown output rank")
    # align every carrying operand's channel axis to the output's axes (right-aligned broadcast)
    axis_out, ids = None, None
    for i, c in carried:
        r = _rank(node.inputs[i])
        a = c.axis + (out_rank - r)
        if axis_out is None:
            axis_out, ids = a, c.ids
        elif a != axis_out:
            raise _Freeze("operands carry channels on different axes")
        elif len(c.ids) != len(ids):
            if len(c.ids) == 1 or len(ids) == 1:
                raise _Freeze("a single channel broadcast over channels")
            raise _Freeze("channel counts differ")
        else:
            uf.union(ids, c.ids)  # residual Add, SE scale Mul: same channels on both sides
    # a variable operand that carries no ids (the output of something frozen or not understood,
    # or computed at run time) keeps its channel count: unless it broadcasts, nothing here may go
    for i, t in enumerate(node.inputs):
        if ins[i] is not None or t is None or isinstance(t, gs.Constant) or not t.name:
            continue
        if t.shape is None:
            raise _Freeze(f"combined with {t.name}, of unknown shape, which carries no channel ids")
        k = axis_out - (out_rank - len(t.shape))
        if 0 <= k < len(t.shape) and t.shape[k] != 1:
            raise _Freeze(f"combined with {t.name}, whose channels are fixed")
    # constant operands must be per-channel along that axis (sliced on rewrite) or broadcast
    for t in node.inputs:
        v = _const(t)
        if v is None or v.ndim == 0:
            continue
        full = (1,) * (out_rank - v.ndim) + v.shape
        if full[axis_out] not in (1, len(ids)):
            raise _Freeze("constant does not match the channel count")
    info[out.name] = ChannelInfo(axis_out, ids)
    return True


def _concat(node, ins, out, uf, info) -> bool:
    axis = int(node.attrs.get("axis", 0))
    rank = _rank(out)
    if rank is None:
        raise _Freeze("unknown rank")
    axis %= rank
    if any(c is None for c in ins):
        # a Concat with an untracked part: the tracked parts keep their ids, the rest is opaque
        if all(c is None or c.axis == axis for c in ins):
            sizes = [t.shape[axis] if t.shape is not None else None for t in node.inputs]
            if any(s is None or not isinstance(s, (int, np.integer)) for s, c in zip(sizes, ins) if c is None):
                raise _Freeze("untracked Concat input of unknown size")
            raise _Freeze("Concat mixes prunable and fixed channels")
        raise _Freeze("Concat of untracked inputs")
    if all(c.axis == axis for c in ins):
        info[out.name] = ChannelInfo(axis, np.concatenate([c.ids for c in ins]))
        return True
    if all(c.axis == ins[0].axis and len(c.ids) == len(ins[0].ids) for c in ins):
        for c in ins[1:]:
            uf.union(ins[0].ids, c.ids)  # concat along another axis: channels must stay aligned
        info[out.name] = ChannelInfo(ins[0].axis, ins[0].ids)
        return True
    raise _Freeze("Concat inputs disagree on channels")


def _split_slice(node, x, uf, info) -> bool:
    rank = _rank(node.inputs[0])
    if node.op == "Split":
        axis = int(node.attrs.get("axis", 0)) % rank
        if axis != x.axis:
            for o in node.outputs:
                info[o.name] = ChannelInfo(x.axis, x.ids)
            return True
        sizes = [o.shape[axis] if o.shape is not None else None for o in node.outputs]
        if any(not isinstance(s, (int, np.integer)) for s in sizes):
            raise _Freeze("Split sizes unknown")
        start = 0
        for o, s in zip(node.outputs, sizes):
            info[o.name] = ChannelInfo(axis, x.ids[start:start + s])
            start += s
        return True
    vals = [_const(t) for t in node.inputs[1:]]
    if any(v is None for v in vals[:2]) or (len(vals) > 2 and vals[2] is None) or (len(vals) > 3 and vals[3] is None):
        raise _Freeze("Slice with non-constant parameters")
    starts, ends = vals[0].reshape(-1), vals[1].reshape(-1)
    axes = vals[2].reshape(-1) % rank if len(vals) > 2 else np.arange(len(starts))
    steps = vals[3].reshape(-1) if len(vals) > 3 else np.ones_like(starts)
    sl = slice(None)
    for s, e, a, st in zip(starts, ends, axes, steps):
        if a == x.axis:
            if st != 1:  # which channels a stride picks depends on the count before them
                raise _Freeze(f"Slice with step {int(st)} on the channel axis")
            sl = slice(int(max(min(s, 2**62), -2**62)), int(max(min(e, 2**62), -2**62)))
    info[node.outputs[0].name] = ChannelInfo(x.axis, x.ids[sl])
    return True


def _flatten(node, x, out, info) -> bool:
    """Flatten/Reshape of [N, C, H, W] into [N, C*H*W]: feature f comes from channel f // (H*W)."""
    src, dst = node.inputs[0].shape, out.shape
    if src is None or dst is None:
        raise _Freeze("reshape with unknown shapes")
    if node.op == "Flatten" and int(node.attrs.get("axis", 1)) != 1 or x.axis != 1:
        raise _Freeze("reshape that is not a flatten of the channel axis")
    if len(dst) == len(src) and list(dst) == list(src):
        info[out.name] = ChannelInfo(x.axis, x.ids)
        return True
    inner = src[2:]
    if len(dst) != 2 or any(not isinstance(d, (int, np.integer)) for d in inner):
        raise _Freeze("reshape that is not a flatten of the channel axis")
    if node.op == "Reshape":
        target = _const(node.inputs[1])
        if target is None or target.size != 2 or target[1] not in (-1, len(x.ids) * int(np.prod(inner))):
            raise _Freeze("reshape target depends on the channel count")
    info[out.name] = ChannelInfo(1, np.repeat(x.ids, int(np.prod(inner))))
    return True


def _squeeze(node, x, out, info) -> bool:
    src, dst = node.inputs[0].shape, out.shape
    if src is None or dst is None:
        raise _Freeze("unknown shapes")
    axes = _const(node.inputs[1]) if len(node.inputs) > 1 else np.asarray(node.attrs.get("axes", []))
    if axes is None:
        raise _Freeze("non-constant axes")
    axes = [int(a) % (len(dst) if node.op == "Unsqueeze" else len(src)) for a in np.asarray(axes).reshape(-1)]
    if node.op == "Squeeze":
        if x.axis in axes:
            raise _Freeze("squeezes the channel axis")
        new_axis = x.axis - sum(a < x.axis for a in axes)
    else:
        new_axis = x.axis
        for a in sorted(axes):
            if a <= new_axis:
                new_axis += 1
    info[out.name] = ChannelInfo(new_axis, x.ids)
    return True


# --------------------------------------------------------------------------- groups


def _build(uf: _UF, info, producers) -> ChannelAnalysis:
    n = len(uf.parent)
    roots = _find_all(uf.parent, np.arange(n, dtype=np.int64)) if n else np.zeros(0, np.int64)
    frozen_roots: dict[int, str] = {}
    for i, why in uf.frozen.items():
        frozen_roots.setdefault(int(roots[i]), why)
    owner = np.full(n, -1, np.int64)
    names = list(producers)
    for k, name in enumerate(names):
        owner[producers[name].ids] = k
    # producers are in one group when any of their ids share a root: the same union-find, over
    # producer indices (a class's root is its smallest member, so groups come in producer order)
    first_owner: dict[int, int] = {}
    linked = {(owner_k, k) for k, name in enumerate(names) for r in np.unique(roots[producers[name].ids]).tolist()
              if (owner_k := first_owner.setdefault(r, k)) != k}
    comp = _UF()
    comp.new(len(names))
    comp.union(*np.asarray(sorted(linked), np.int64).reshape(-1, 2).T)
    members: dict[int, list[int]] = {}
    for k in range(len(names)):
        members.setdefault(comp.find(k), []).append(k)
    groups = []
    for gi, (_, ks) in enumerate(sorted(members.items())):
        unit_ids: dict[int, list[int]] = {}
        order: list[int] = []
        for k in ks:
            for i in producers[names[k]].ids.tolist():
                r = int(roots[i])
                if r not in unit_ids:
                    unit_ids[r] = []
                    order.append(r)
                unit_ids[r].append(i)
        groups.append(ChannelGroup(gi, [names[k] for k in ks], order,
                                   {r: np.asarray(v, np.int64) for r, v in unit_ids.items()},
                                   {r: frozen_roots[r] for r in order if r in frozen_roots}))
    return ChannelAnalysis(info, producers, owner, groups, frozen_roots, uf.parent)
