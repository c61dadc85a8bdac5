"""A small ONNX graph builder used by :mod:`onnxslim_cnn.models.reference`.

It emits graphs in the style of ``torch.onnx.export`` of an eval-mode torchvision model:
Conv / BatchNormalization (un-fused) / Relu / Clip / MaxPool / GlobalAveragePool / Flatten /
Gemm(transB=1) ..., with module-path names (``layer1.0.conv1``, ``layer1.0.conv1.weight``,
``layer1.0.bn1.running_mean``).

Weights are drawn from a per-tensor generator seeded by ``(seed, crc32(tensor name))``, so a
model is a pure function of its arguments (byte-identical on every build) and a tensor's values
do not depend on the order in which the other tensors were created.

The builder tracks the (C, H, W) / (F,) shape of every activation so architectures can make
decisions on the real feature-map size (e.g. the Flatten size before VGG's first FC layer).
With ``materialize=False`` no arrays are created at all: only shapes and the parameter count
are tracked, which makes counting the parameters of a 550 MB VGG-16 instantaneous.
"""

from __future__ import annotations

import copy
import math
import zlib
from typing import Sequence

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 17
IR_VERSION = 8
BN_EPS = 1e-5
BN_MOMENTUM = 0.9  # what torch.onnx writes for nn.BatchNorm2d(momentum=0.1)

# Initializers that are buffers, not trainable parameters (torch's model.parameters()).
BUFFER_SUFFIXES = ("running_mean", "running_var", "num_batches_tracked")


def make_divisible(v: float, divisor: int = 8, min_value: int | None = None) -> int:
    """torchvision's ``_make_divisible``: round to a multiple of ``divisor``, never below 90%."""
    if min_value is None:
        min_value = divisor
    new_v = max(min_value, int(v + divisor / 2) // divisor * divisor)
    if new_v < 0.9 * v:
        new_v += divisor
    return int(new_v)


def scale_channels(c: int, width: float) -> int:
    """Channel rule for the non-mobile nets: ``round(c * width)``, at least 8 (exact at width 1)."""
    return max(8, int(round(c * width)))


def conv_out(size: int, k: int, s: int, p: int, ceil: bool = False) -> int:
    """Output spatial size of a conv/pool (torch semantics, including ceil_mode's last-window rule)."""
    num = size + 2 * p - k
    if num < 0:
        return 0
    out = (-(-num // s) if ceil else num // s) + 1
    if ceil and (out - 1) * s >= size + p:  # last window must start inside the input (+left pad)
        out -= 1
    return out


def _round_mantissa(x: np.ndarray, bits: int = 10) -> np.ndarray:
    m, e = np.frexp(np.asarray(x, dtype=np.float64))
    return np.ldexp(np.round(m * (1 << bits)) / (1 << bits), e).astype(np.float32)


class GraphBuilder:
    """Accumulates nodes and initializers; every op method returns its output tensor name."""

    def __init__(self, seed: int = 0, batch: str | int = "N", materialize: bool = True):
        self.seed = int(seed)
        self.batch = batch
        self.materialize = materialize
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self.shapes: dict[str, tuple[int, ...]] = {}  # activation name -> shape without batch
        self.param_count = 0
        self._init_names: set[str] = set()
        self._node_names: set[str] = set()
        self._consts: dict[tuple, str] = {}
        self.inputs: list[onnx.ValueInfoProto] = []

    # ------------------------------------------------------------------ plumbing
    def _rng(self, name: str) -> np.random.Generator:
        return np.random.default_rng([self.seed, zlib.crc32(name.encode("utf-8"))])

    def _unique(self, name: str) -> str:
        base, i = name, 0
        while name in self._node_names or name in self.shapes or name in self._init_names:
            i += 1
            name = f"{base}_{i}"
        self._node_names.add(name)
        return name

    def _add_init(self, name: str, shape: Sequence[int], make, trainable: bool = True) -> str:
        if name in self._init_names:
            raise ValueError(f"duplicate initializer {name!r}")
        self._init_names.add(name)
        shape = tuple(int(d) for d in shape)
        if trainable and not name.endswith(BUFFER_SUFFIXES):
            self.param_count += int(np.prod(shape, dtype=np.int64))
        if self.materialize:
            arr = np.ascontiguousarray(make(self._rng(name)), dtype=np.float32).reshape(shape)
            self.initializers.append(numpy_helper.from_array(arr, name))
        return name

    def _node(self, op: str, name: str, inputs: Sequence[str], shape: tuple[int, ...],
              out: str | None = None, **attrs) -> str:
        name = self._unique(name)
        out = out or name
        self.nodes.append(helper.make_node(op, list(inputs), [out], name=name, **attrs))
        self.shapes[out] = tuple(int(d) for d in shape)
        if any(d <= 0 for d in self.shapes[out]):
            raise ValueError(f"{name} ({op}) would produce an empty tensor {shape}; input too small")
        return out

    def const(self, value: float, name: str) -> str:
        """A shared float32 scalar initializer (Clip bounds); not a parameter."""
        key = (name, float(value))
        if key not in self._consts:
            self._consts[key] = self._add_init(
                name, (), lambda _r: np.array(value, np.float32), trainable=False)
        return self._consts[key]

    # ------------------------------------------------------------------ weights
    def conv_weight(self, name: str, shape: Sequence[int], gain: float = math.sqrt(2.0)) -> str:
        fan_in = int(np.prod(shape[1:]))
        std = gain / math.sqrt(fan_in)
        return self._add_init(name, shape, lambda r: r.standard_normal(shape, dtype=np.float32)
                              * np.float32(std))

    def bias(self, name: str, n: int, fan_in: int) -> str:
        bound = 1.0 / math.sqrt(fan_in)  # torch's default Conv/Linear bias init
        return self._add_init(name, (n,), lambda r: r.uniform(-bound, bound, n))

    # ------------------------------------------------------------------ ops
    def input(self, name: str, c: int, h: int, w: int) -> str:
        self.inputs.append(helper.make_tensor_value_info(
            name, TensorProto.FLOAT, [self.batch, c, h, w]))
        self.shapes[name] = (c, h, w)
        return name

    def conv(self, name: str, x: str, cout: int, k: int, stride: int = 1, pad: int | None = None,
             groups: int = 1, bias: bool = False, gain: float = math.sqrt(2.0),
             out: str | None = None) -> str:
        cin, h, w = self.shapes[x]
        if cin % groups or cout % groups:
            raise ValueError(f"{name}: channels {cin}->{cout} not divisible by groups={groups}")
        pad = (k - 1) // 2 if pad is None else pad
        wname = self.conv_weight(f"{name}.weight", (cout, cin // groups, k, k), gain)
        inputs = [x, wname]
        if bias:
            inputs.append(self.bias(f"{name}.bias", cout, cin // groups * k * k))
        shape = (cout, conv_out(h, k, stride, pad), conv_out(w, k, stride, pad))
        return self._node("Conv", name, inputs, shape, out, dilations=[1, 1], group=groups,
                          kernel_shape=[k, k], pads=[pad] * 4, strides=[stride, stride])

    def bn(self, name: str, x: str, out: str | None = None) -> str:
        """Un-fused BN; the running stats drawn here are replaced by :meth:`calibrate_batchnorm`."""
        c = self.shapes[x][0]
        g = self._add_init(f"{name}.weight", (c,), lambda r: r.uniform(0.5, 1.5, c))
        b = self._add_init(f"{name}.bias", (c,), lambda r: r.normal(0.0, 0.1, c))
        m = self._add_init(f"{name}.running_mean", (c,), lambda r: r.normal(0.0, 0.1, c))
        v = self._add_init(f"{name}.running_var", (c,), lambda r: r.uniform(0.5, 2.0, c))
        return self._node("BatchNormalization", name, [x, g, b, m, v], self.shapes[x], out,
                          epsilon=BN_EPS, momentum=BN_MOMENTUM)

    def relu(self, name: str, x: str, out: str | None = None) -> str:
        return self._node("Relu", name, [x], self.shapes[x], out)

    def relu6(self, name: str, x: str, out: str | None = None) -> str:
        lo, hi = self.const(0.0, "relu6.min"), self.const(6.0, "relu6.max")
        return self._node("Clip", name, [x, lo, hi], self.shapes[x], out)

    def hardswish(self, name: str, x: str, out: str | None = None) -> str:
        return self._node("HardSwish", name, [x], self.shapes[x], out)

    def hardsigmoid(self, name: str, x: str, out: str | None = None) -> str:
        return self._node("HardSigmoid", name, [x], self.shapes[x], out, alpha=1.0 / 6, beta=0.5)

    def act(self, kind: str | None, name: str, x: str) -> str:
        if kind is None:
            return x
        return {"relu": self.relu, "relu6": self.relu6, "hardswish": self.hardswish,
                "hardsigmoid": self.hardsigmoid}[kind](name, x)

    def maxpool(self, name: str, x: str, k: int, stride: int, pad: int = 0,
                ceil: bool = False) -> str:
        c, h, w = self.shapes[x]
        shape = (c, conv_out(h, k, stride, pad, ceil), conv_out(w, k, stride, pad, ceil))
        return self._node("MaxPool", name, [x], shape, ceil_mode=int(ceil), dilations=[1, 1],
                          kernel_shape=[k, k], pads=[pad] * 4, strides=[stride, stride])

    def avgpool(self, name: str, x: str, k: int, stride: int) -> str:
        c, h, w = self.shapes[x]
        shape = (c, conv_out(h, k, stride, 0), conv_out(w, k, stride, 0))
        return self._node("AveragePool", name, [x], shape, ceil_mode=0, count_include_pad=1,
                          kernel_shape=[k, k], pads=[0] * 4, strides=[stride, stride])

    def global_avgpool(self, name: str, x: str) -> str:
        return self._node("GlobalAveragePool", name, [x], (self.shapes[x][0], 1, 1))

    def flatten(self, name: str, x: str, out: str | None = None) -> str:
        return self._node("Flatten", name, [x], (int(np.prod(self.shapes[x])),), out, axis=1)

    def linear(self, name: str, x: str, n_out: int, gain: float = math.sqrt(2.0),
               out: str | None = None) -> str:
        (n_in,) = self.shapes[x]
        wname = self.conv_weight(f"{name}.weight", (n_out, n_in), gain)
        bname = self.bias(f"{name}.bias", n_out, n_in)
        return self._node("Gemm", name, [x, wname, bname], (n_out,), out,
                          alpha=1.0, beta=1.0, transB=1)

    def add(self, name: str, a: str, b: str) -> str:
        if self.shapes[a] != self.shapes[b]:
            raise ValueError(f"{name}: shape mismatch {self.shapes[a]} vs {self.shapes[b]}")
        return self._node("Add", name, [a, b], self.shapes[a])

    def mul(self, name: str, a: str, b: str) -> str:  # b may broadcast (N,C,1,1)
        return self._node("Mul", name, [a, b], self.shapes[a])

    def concat(self, name: str, xs: Sequence[str]) -> str:
        shapes = [self.shapes[x] for x in xs]
        if len({s[1:] for s in shapes}) != 1:
            raise ValueError(f"{name}: cannot concat {shapes}")
        return self._node("Concat", name, list(xs), (sum(s[0] for s in shapes),) + shapes[0][1:],
                          axis=1)

    # ------------------------------------------------------------------ composites
    def conv_bn_act(self, prefix: str, x: str, cout: int, k: int, stride: int = 1,
                    groups: int = 1, act: str | None = "relu", gain: float = math.sqrt(2.0),
                    idx: tuple[str, str, str] = ("0", "1", "2")) -> str:
        """torchvision's Conv2dNormActivation: ``prefix.0`` conv, ``prefix.1`` BN, ``prefix.2`` act."""
        y = self.conv(f"{prefix}.{idx[0]}", x, cout, k, stride, groups=groups, gain=gain)
        y = self.bn(f"{prefix}.{idx[1]}", y)
        return self.act(act, f"{prefix}.{idx[2]}", y)

    # ------------------------------------------------------------------ BN statistics
    def calibrate_batchnorm(self, input_name: str = "input", samples: int = 128) -> None:
        """Give every BatchNormalization running statistics that match its real input, the way a
        trained network's do: run the trunk once in onnxruntime with BN in training mode
        (momentum 0, so the "running" outputs are the batch statistics) on seeded N(0,1) input
        (batch large enough for >= ``samples`` values per channel at every BN), then store ``mean + N(0, 0.1) * std`` and ``var * U(0.5, 2)``.

        Without this, random running stats leave activations drifting layer after layer until
        biases/betas dominate and the logits hardly depend on the input. The statistics are
        rounded to 10 mantissa bits so thread-count / SIMD differences in the float sums cannot
        change the serialized model.
        """
        bn_idx = [i for i, n in enumerate(self.nodes) if n.op_type == "BatchNormalization"]
        if not self.materialize or not bn_idx:
            return
        import onnxruntime as ort  # lazy: only needed while building

        min_hw = min(int(np.prod(self.shapes[self.nodes[i].input[0]][1:])) for i in bn_idx)
        batch = int(min(64, max(2, -(-samples // min_hw))))

        nodes, stat_outputs = [], []
        for node in self.nodes[: bn_idx[-1] + 1]:
            node = copy.deepcopy(node)
            if node.op_type == "BatchNormalization":
                for a in node.attribute:
                    if a.name == "momentum":
                        a.f = 0.0
                node.attribute.append(helper.make_attribute("training_mode", 1))
                outs = [f"{node.name}::batch_mean", f"{node.name}::batch_var"]
                node.output.extend(outs)
                stat_outputs += outs
            nodes.append(node)
        used = {i for n in nodes for i in n.input}
        inits = {t.name: t for t in self.initializers}
        c, h, w = self.shapes[input_name]
        graph = helper.make_graph(
            nodes, "calibration",
            [helper.make_tensor_value_info(input_name, TensorProto.FLOAT, [batch, c, h, w])],
            [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in stat_outputs],
            initializer=[t for name, t in inits.items() if name in used])
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                                  ir_version=IR_VERSION)
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        sess = ort.InferenceSession(model.SerializeToString(), opts,
                                    providers=["CPUExecutionProvider"])
        x = self._rng("calibration.input").standard_normal((batch, c, h, w), dtype=np.float32)
        stats = dict(zip(stat_outputs, sess.run(stat_outputs, {input_name: x})))

        for i in bn_idx:
            node = self.nodes[i]
            mean = stats[f"{node.name}::batch_mean"].astype(np.float64)
            var = stats[f"{node.name}::batch_var"].astype(np.float64)
            var = np.maximum(var, 1e-2 * max(float(var.mean()), 1e-6))  # dead channels
            r = self._rng(f"{node.name}.calibration")
            mean = mean + r.normal(0.0, 0.1, mean.shape) * np.sqrt(var)
            var = var * r.uniform(0.5, 2.0, var.shape)
            for name, arr in ((node.input[3], mean), (node.input[4], var)):
                inits[name].CopyFrom(numpy_helper.from_array(_round_mantissa(arr), name))

    # ------------------------------------------------------------------ finish
    def to_model(self, output: str, graph_name: str, out_name: str = "logits") -> onnx.ModelProto:
        if not self.materialize:
            raise RuntimeError("shape-only builder cannot produce a model")
        for node in self.nodes:  # rename the final tensor to the public output name
            node.output[:] = [out_name if o == output else o for o in node.output]
        (n_out,) = self.shapes[output]
        graph = helper.make_graph(
            self.nodes, graph_name, self.inputs,
            [helper.make_tensor_value_info(out_name, TensorProto.FLOAT, [self.batch, n_out])],
            initializer=self.initializers)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                                  ir_version=IR_VERSION, producer_name="onnxslim_cnn.models.reference",
                                  producer_version="1")
        return model
