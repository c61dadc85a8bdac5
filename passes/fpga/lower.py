"""ONNX (BN already folded) -> fixed-point IR, formats chosen from calibration ranges.

Compute nodes (Conv, Gemm, Add, AveragePool, GlobalAveragePool) produce a full-precision
accumulator; a Relu/Clip that alone consumes it is applied on the accumulator (exact), then one
``requant`` rounds to the activation format of the ONNX tensor it stands for. Data-movement nodes
(MaxPool, Flatten, Concat, a Relu/Clip after them) keep their input's format, so they never add
rounding. Formats: integer bits from the calibration max |x| (times 1 + margin), fractional bits
whatever the word length leaves; unsigned when the tensor is never negative.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import helper, numpy_helper

from onnxslim_cnn.errors import UserError
from onnxslim_cnn.fixed_point.ir import (MAX_ACCUMULATOR_BITS, FixedFormat, FixedPointModel, Layer, Tensor,
                                         accumulator_format, ceil_log2, format_for_bound, integer_bits)

SUPPORTED_OPS = ("Conv", "Gemm", "Add", "Relu", "Clip", "MaxPool", "AveragePool", "GlobalAveragePool",
                 "Concat", "Flatten", "Reshape")
_COMPUTE = ("Conv", "Gemm", "Add", "AveragePool", "GlobalAveragePool")
_ACTIVATIONS = ("Relu", "Clip")
# Precision of the reciprocal multiplier of average pools: 2**-16 relative error at most.
_RECIPROCAL_BITS = 16


@dataclass
class LowerConfig:
    bits: int = 16
    weight_bits: int = 0  # 0: same as bits
    margin: float = 0.0
    rounding: str = "round_half_up"
    saturation: str = "sat"
    layer_bits: dict = field(default_factory=dict)  # ONNX node name -> word length (weights and output)
    # imported from a QDQ model (fpga.qdq): activation formats by tensor, weight fraction bits by weight tensor
    formats: dict = field(default_factory=dict)
    weight_frac: dict = field(default_factory=dict)


def _fail(node: onnx.NodeProto, why: str) -> UserError:
    return UserError(f"fpga: cannot lower node '{node.name}' ({node.op_type}): {why}")


def _attrs(node: onnx.NodeProto) -> dict:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def check_supported(model: onnx.ModelProto) -> None:
    """Stop at the first node the IR has no layer for, naming it (before any calibration work)."""
    for node in model.graph.node:
        if node.op_type not in SUPPORTED_OPS:
            raise _fail(node, f"op not supported by the fixed-point IR (supported: {', '.join(SUPPORTED_OPS)})")


def _pads(node, a: dict, spatial: int = 2) -> list[int]:
    auto = a.get("auto_pad", b"NOTSET")
    auto = auto.decode() if isinstance(auto, bytes) else auto
    if auto not in ("NOTSET", "VALID"):
        raise _fail(node, f"auto_pad={auto} (give explicit pads)")
    p = list(a.get("pads", [0] * (2 * spatial)))
    return [p[0], p[1], p[2], p[3]]  # t, l, b, r


class _Lowering:
    def __init__(self, model: onnx.ModelProto, acts: dict[str, np.ndarray], cfg: LowerConfig):
        self.model, self.acts, self.cfg = model, acts, cfg
        self.inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
        self.consumers: dict[str, list[onnx.NodeProto]] = {}
        for n in model.graph.node:
            for i in n.input:
                self.consumers.setdefault(i, []).append(n)
        self.graph_outputs = {o.name for o in model.graph.output}
        self.tensors: dict[str, Tensor] = {}
        self.layers: list[Layer] = []
        self.names: set[str] = set()
        self.ir_of: dict[str, str] = {}  # ONNX tensor -> IR tensor holding its value
        self.absorbed: set[int] = set()
        self.order = {id(n): i for i, n in enumerate(model.graph.node)}

    # ------------------------------------------------------------------ helpers

    def unique(self, hint: str) -> str:
        name, k = hint, 1
        while name in self.names:
            name, k = f"{hint}_{k}", k + 1
        self.names.add(name)
        return name

    def add_tensor(self, hint: str, shape, fmt: FixedFormat, source: "str | None") -> str:
        name = self.unique(hint)
        self.tensors[name] = Tensor(name, tuple(int(s) for s in shape), fmt, source)
        return name

    def add_layer(self, op, name, inputs, output, attrs=None, weights=None, source=None) -> None:
        self.layers.append(Layer(op, name, list(inputs), output, dict(attrs or {}), dict(weights or {}), source))

    def bits_for(self, node_name: str) -> int:
        return int(self.cfg.layer_bits.get(node_name, self.cfg.bits))

    def activation_format(self, onnx_tensor: str, bits: int) -> FixedFormat:
        if onnx_tensor in self.cfg.formats:
            return self.cfg.formats[onnx_tensor]
        x = self.acts[onnx_tensor]
        signed = bool(x.size and float(x.min()) < 0)
        max_abs = float(np.abs(x).max()) if x.size else 0.0
        return FixedFormat(signed, bits, integer_bits(max_abs * (1.0 + self.cfg.margin), signed))

    def shape(self, onnx_tensor: str) -> tuple:
        return tuple(self.acts[onnx_tensor].shape[1:])

    def src(self, onnx_tensor: str) -> str:
        if onnx_tensor not in self.ir_of:
            raise UserError(f"fpga: tensor '{onnx_tensor}' is not produced by a lowered layer")
        return self.ir_of[onnx_tensor]

    def const(self, node, index: int) -> "np.ndarray | None":
        if index >= len(node.input) or not node.input[index]:
            return None
        name = node.input[index]
        if name not in self.inits:
            raise _fail(node, f"input {index} ('{name}') must be a constant")
        return self.inits[name].astype(np.float64)

    # ------------------------------------------------------------------ the walk

    def run(self) -> FixedPointModel:
        inits = set(self.inits)
        inputs = [i.name for i in self.model.graph.input if i.name not in inits]
        for name in inputs:
            fmt = self.activation_format(name, self.cfg.bits)
            self.ir_of[name] = self.add_tensor(name, self.shape(name), fmt, name)
        for idx, node in enumerate(self.model.graph.node):
            if idx in self.absorbed:
                continue
            if node.op_type in _COMPUTE:
                acc, acc_name = self.compute(node)
                self.finish(node, idx, acc, acc_name)
            else:
                self.movement(node)
        outputs = [self.src(o.name) for o in self.model.graph.output]
        return FixedPointModel(self.model.graph.name or "model", [self.ir_of[n] for n in inputs], outputs,
                               self.tensors, self.layers)

    def compute(self, node) -> tuple[FixedFormat, str]:
        a = _attrs(node)
        name = self.unique(node.name or f"{node.op_type.lower()}_{len(self.layers)}")
        out = node.output[0]
        if node.op_type in ("Conv", "Gemm"):
            return self.weighted(node, a, name, out)
        if node.op_type == "Add":
            if len(node.input) != 2 or any(i in self.inits for i in node.input):
                raise _fail(node, "only the sum of two activations is supported")
            ins = [self.src(i) for i in node.input]
            fa, fb = (self.tensors[i].fmt for i in ins)
            if self.tensors[ins[0]].shape != self.tensors[ins[1]].shape:
                raise _fail(node, "inputs of different shapes (broadcasting) are not supported")
            frac = max(fa.frac, fb.frac)
            bound = fa.max_abs_int * (1 << (frac - fa.frac)) + fb.max_abs_int * (1 << (frac - fb.frac))
            fmt = format_for_bound(bound, frac, signed=fa.signed or fb.signed)
            acc = self.add_tensor(f"{name}_sum", self.shape(out), fmt, out)
            self.add_layer("add", name, ins, acc, source=node.name)
            return fmt, acc
        x = self.src(node.input[0])
        fx = self.tensors[x].fmt
        if node.op_type == "GlobalAveragePool":
            c, h, w = self.tensors[x].shape
            count, op, attrs = h * w, "global_avgpool", {}
        else:
            if a.get("ceil_mode", 0):
                raise _fail(node, "ceil_mode=1 is not supported")
            pads = _pads(node, a)
            if any(pads) and not a.get("count_include_pad", 0):
                raise _fail(node, "padding with count_include_pad=0 (a per-position divisor) is not supported")
            k = list(a["kernel_shape"])
            count, op = k[0] * k[1], "avgpool"
            attrs = {"kernel": k, "stride": list(a.get("strides", [1, 1])), "pads": pads}
        self.pool_count = count
        fmt = format_for_bound(fx.max_abs_int * count, fx.frac, fx.signed)
        acc = self.add_tensor(f"{name}_sum", self.shape(out), fmt, None)
        self.add_layer(op, name, [x], acc, {**attrs, "count": count}, source=node.name)
        return fmt, acc

    def weighted(self, node, a, name, out) -> tuple[FixedFormat, str]:
        x = self.src(node.input[0])
        fx = self.tensors[x].fmt
        w = self.const(node, 1)
        bias_idx = 2
        if node.op_type == "Gemm":
            if a.get("transA", 0) or len(self.tensors[x].shape) != 1:
                raise _fail(node, "only Gemm on a flat (batch, n) input without transA is supported")
            w = w * a.get("alpha", 1.0)
            if not a.get("transB", 0):
                w = w.T
            b = self.const(node, 2)
            b = None if b is None else np.broadcast_to(b * a.get("beta", 1.0), (w.shape[0],))
            bias_idx = -1
        else:
            if any(d != 1 for d in a.get("dilations", [1, 1])) or w.ndim != 4:
                raise _fail(node, "only 2-D convolution without dilation is supported")
            b = self.const(node, bias_idx)
        if b is None:
            b = np.zeros(w.shape[0])
        w_int = integer_bits(float(np.abs(w).max()), True)
        if node.input[1] in self.cfg.weight_frac:
            fw = FixedFormat(True, max(w_int + self.cfg.weight_frac[node.input[1]], 2), w_int)
        else:
            wbits = self.cfg.layer_bits.get(node.name) or self.cfg.weight_bits or self.cfg.bits
            fw = FixedFormat(True, int(wbits), w_int)
        qw = fw.quantize(w)
        reduction = int(np.prod(w.shape[1:]))
        frac = fx.frac + fw.frac
        qb = np.rint(b * 2.0 ** frac)
        if np.abs(qb).max(initial=0) >= 2.0 ** MAX_ACCUMULATOR_BITS:
            raise _fail(node, "bias too large for the accumulator at this precision")
        qb = qb.astype(np.int64)
        fmt = accumulator_format(fx, fw, reduction, int(np.abs(qb).max(initial=0)))
        if fmt.width > MAX_ACCUMULATOR_BITS:
            raise _fail(node, f"accumulator needs {fmt.width} bits (> {MAX_ACCUMULATOR_BITS}); lower fpga.bits")
        acc = self.add_tensor(f"{name}_acc", self.shape(out), fmt, out)
        weights = {"weight": qw, "bias": qb}
        attrs = {"weight_format": {"signed": True, "width": fw.width, "integer": fw.integer}}
        if node.op_type == "Conv":
            attrs.update(kernel=list(w.shape[2:]), stride=list(a.get("strides", [1, 1])), pads=_pads(node, a),
                         groups=int(a.get("group", 1)))
            self.add_layer("conv2d", name, [x], acc, attrs, weights, node.name)
        else:
            self.add_layer("dense", name, [x], acc, attrs, weights, node.name)
        return fmt, acc

    def finish(self, node, idx: int, fmt: FixedFormat, acc: str) -> None:
        """Absorb a Relu/Clip chain that alone reads the accumulator, then requant to the activation format."""
        onnx_out = node.output[0]
        # a pool's accumulator is count x the mean: relu commutes with that scale, a clip does not
        absorbable = ("Relu",) if node.op_type in ("AveragePool", "GlobalAveragePool") else _ACTIVATIONS
        while onnx_out not in self.graph_outputs:
            users = self.consumers.get(onnx_out, [])
            if len(users) != 1 or users[0].op_type not in absorbable:
                break
            act = users[0]
            acc = self.activation(act, acc, fmt, act.output[0])
            self.absorbed.add(self.order[id(act)])
            onnx_out = act.output[0]
        target = self.activation_format(onnx_out, self.bits_for(node.name))
        attrs = {"multiplier": 1, "shift": fmt.frac - target.frac, "rounding": self.cfg.rounding,
                 "saturation": self.cfg.saturation}
        if node.op_type in ("AveragePool", "GlobalAveragePool"):
            count = self.pool_count
            if count & (count - 1):  # not a power of two: integer reciprocal
                p = _RECIPROCAL_BITS + ceil_log2(count)
                attrs["multiplier"], attrs["shift"] = int(round(2 ** p / count)), attrs["shift"] + p
            else:
                attrs["shift"] += ceil_log2(count)
            if fmt.width + attrs["multiplier"].bit_length() > MAX_ACCUMULATOR_BITS:
                raise _fail(node, "average pool sum too wide for the reciprocal multiply")
        out = self.add_tensor(onnx_out, self.shape(onnx_out), target, onnx_out)
        self.add_layer("requant", self.unique(f"{node.name or onnx_out}_requant"), [acc], out, attrs, source=node.name)
        self.ir_of[onnx_out] = out

    def activation(self, node, x: str, fmt: FixedFormat, onnx_out: str) -> str:
        name = self.unique(node.name or f"{node.op_type.lower()}_{len(self.layers)}")
        out = self.add_tensor(f"{name}_act", self.tensors[x].shape, fmt, onnx_out)
        if node.op_type == "Relu":
            self.add_layer("relu", name, [x], out, source=node.name)
            return out
        a = _attrs(node)
        lo = self.const(node, 1) if len(node.input) > 1 else a.get("min")
        hi = self.const(node, 2) if len(node.input) > 2 else a.get("max")
        lo_i = fmt.min_int if lo is None else max(fmt.min_int, int(np.rint(float(lo) * 2.0 ** fmt.frac)))
        hi_i = fmt.max_int if hi is None else min(fmt.max_int, int(np.rint(float(hi) * 2.0 ** fmt.frac)))
        self.add_layer("clip", name, [x], out, {"lo": lo_i, "hi": hi_i}, source=node.name)
        return out

    def movement(self, node) -> None:
        a = _attrs(node)
        out = node.output[0]
        if node.op_type in _ACTIVATIONS:
            x = self.src(node.input[0])
            self.ir_of[out] = self.activation(node, x, self.tensors[x].fmt, out)
            return
        name = self.unique(node.name or f"{node.op_type.lower()}_{len(self.layers)}")
        if node.op_type == "Concat":
            if a.get("axis") not in (1, -3):
                raise _fail(node, "only concatenation along channels (axis 1) is supported")
            ins = [self.src(i) for i in node.input]
            fmts = [self.tensors[i].fmt for i in ins]
            signed = any(f.signed for f in fmts)
            frac = max(f.frac for f in fmts)
            integer = max(f.integer + (1 if signed and not f.signed else 0) for f in fmts)
            fmt = FixedFormat(signed, integer + frac, integer)
            self.ir_of[out] = self.add_tensor(out, self.shape(out), fmt, out)
            self.add_layer("concat", name, ins, self.ir_of[out], {"axis": 1}, source=node.name)
            return
        x = self.src(node.input[0])
        fx = self.tensors[x].fmt
        if node.op_type == "MaxPool":
            if any(d != 1 for d in a.get("dilations", [1, 1])):
                raise _fail(node, "dilation is not supported")
            k, st, pads = list(a["kernel_shape"]), list(a.get("strides", [1, 1])), _pads(node, a)
            if a.get("ceil_mode", 0):
                # ceil_mode: the last window hangs over the end; padding there never wins a max
                _, h, w = self.tensors[x].shape
                _, oh, ow = self.shape(out)
                pads[2] += max((oh - 1) * st[0] + k[0] - (h + pads[0] + pads[2]), 0)
                pads[3] += max((ow - 1) * st[1] + k[1] - (w + pads[1] + pads[3]), 0)
            attrs = {"kernel": k, "stride": st, "pads": pads}
            self.ir_of[out] = self.add_tensor(out, self.shape(out), fx, out)
            self.add_layer("maxpool", name, [x], self.ir_of[out], attrs, source=node.name)
            return
        # Flatten / Reshape to (batch, n): a no-op on C-ordered data.
        if len(self.shape(out)) != 1 or (node.op_type == "Flatten" and a.get("axis", 1) != 1):
            raise _fail(node, "only flattening to (batch, n) is supported")
        self.ir_of[out] = self.add_tensor(out, self.shape(out), fx, out)
        self.add_layer("flatten", name, [x], self.ir_of[out], source=node.name)


def activation_names(model: onnx.ModelProto) -> list[str]:
    inits = {t.name for t in model.graph.initializer}
    names = [i.name for i in model.graph.input if i.name not in inits]
    names += [o for n in model.graph.node for o in n.output[:1]]
    return names


def lower(model: onnx.ModelProto, acts: dict[str, np.ndarray], cfg: LowerConfig) -> FixedPointModel:
    """``model``: BN folded, only SUPPORTED_OPS; ``acts``: float values of every ``activation_names`` tensor."""
    check_supported(model)
    ir = _Lowering(model, acts, cfg).run()
    ir.metadata = {"imported_qdq_formats": len(cfg.formats), "bits": cfg.bits, "weight_bits": cfg.weight_bits or cfg.bits, "margin": cfg.margin,
                   "rounding": cfg.rounding, "saturation": cfg.saturation, "layer_bits": dict(cfg.layer_bits)}
    return ir
