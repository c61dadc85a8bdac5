"""Tiny hand-built graphs and an ORT comparison helper for tests."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto
from onnx import helper as h
from onnx import numpy_helper as nh

from onnxslim_cnn.errors import UserError

RNG_SEED = 0


def init(name: str, a) -> onnx.TensorProto:
    a = np.asarray(a)
    return nh.from_array(a.astype(np.float32) if a.dtype == np.float64 else a, name)


def make_model(nodes, inputs, outputs, inits=(), opset=17, ir_version=8, **kw) -> onnx.ModelProto:
    g = h.make_graph(nodes, "test", inputs, outputs, list(inits))
    m = h.make_model(g, opset_imports=[h.make_opsetid("", opset)], **kw)
    m.ir_version = ir_version
    onnx.checker.check_model(m, full_check=True)
    return m


def vi(name, shape, dtype=TensorProto.FLOAT):
    return h.make_tensor_value_info(name, dtype, shape)


def run(model: onnx.ModelProto, feeds: dict) -> list[np.ndarray]:
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)


def assert_same_outputs(a: onnx.ModelProto, b: onnx.ModelProto, feeds: dict, rel: float = 1e-4) -> None:
    ra, rb = run(a, feeds), run(b, feeds)
    assert len(ra) == len(rb)
    for x, y in zip(ra, rb):
        assert x.shape == y.shape
        scale = max(float(np.max(np.abs(x))), 1e-12)
        err = float(np.max(np.abs(x.astype(np.float64) - y))) / scale
        assert err <= rel, f"relative error {err:.3g} > {rel}"


def conv_bn_model(rng=None, with_bias=False, out_is_bn=False) -> onnx.ModelProto:
    rng = rng or np.random.default_rng(RNG_SEED)
    ins = ["x", "w"] + (["cb"] if with_bias else [])
    nodes = [h.make_node("Conv", ins, ["c"], pads=[1, 1, 1, 1], name="conv"),
             h.make_node("BatchNormalization", ["c", "g", "b", "m", "v"], ["y" if out_is_bn else "bn"], name="bn",
                         epsilon=1e-3)]
    if not out_is_bn:
        nodes.append(h.make_node("Relu", ["bn"], ["y"], name="relu"))
    inits = [init("w", rng.normal(size=(6, 4, 3, 3))), init("g", rng.uniform(0.5, 1.5, 6)),
             init("b", rng.normal(size=6) * 0.1), init("m", rng.normal(size=6) * 0.3),
             init("v", rng.uniform(0.5, 2.0, 6))]
    if with_bias:
        inits.append(init("cb", rng.normal(size=6)))
    return make_model(nodes, [vi("x", ["N", 4, 8, 8])], [vi("y", ["N", 6, 8, 8])], inits)


def user_error(fn, *args, **kw) -> str:
    """Call fn expecting a UserError; return its message, checked to be one non-empty line."""
    with pytest.raises(UserError) as info:
        fn(*args, **kw)
    msg = str(info.value)
    assert msg and "\n" not in msg
    return msg


def relu_swapping_pass(name: str, new_op: str, modifies=frozenset({"graph"})):
    """A throwaway GraphPass class that changes every Relu's op type to ``new_op`` (an unknown
    op makes an invalid model; another op changes the graph). Register it to use it."""
    from onnxslim_cnn import GraphPass, PassResult

    def run(self, graph, ctx):
        result = PassResult()
        for node in graph.nodes:
            if node.op == "Relu":
                node.op = new_op
                result.change(node.name, f"relu_to_{new_op}")
        return result

    return type(f"Swap{new_op}", (GraphPass,), {"name": name, "modifies": frozenset(modifies), "run": run})


def zero_units(model: onnx.ModelProto, share: float, seed: int) -> int:
    """Zero every filter of a random share of the prunable units of each group (in place);
    returns how many filters were zeroed. Pruning exactly those units must keep the outputs."""
    from onnxslim_cnn.analysis.channels import analyze
    from onnxslim_cnn.graph import Graph

    a = analyze(Graph.from_model(model))
    rng = np.random.default_rng(seed)
    inits = {t.name: t for t in model.graph.initializer}
    owner = {int(i): (name, k) for name, p in a.producers.items() for k, i in enumerate(p.ids.tolist())}
    zeroed = 0
    for g in a.groups:
        units = g.prunable
        if g.frozen or not units:
            continue
        for u in rng.choice(len(units), size=max(1, int(share * len(units))), replace=False):
            for i in g.unit_ids[units[u]].tolist():
                name, k = owner[i]
                p = a.producers[name]
                t = inits[p.node.inputs[1].name]
                w = onnx.numpy_helper.to_array(t).copy()
                if p.kind == "conv" or p.kind == "gemm" and p.node.attrs.get("transB", 0):
                    w[k] = 0
                else:
                    w[:, k] = 0
                t.CopyFrom(onnx.numpy_helper.from_array(w, t.name))
                zeroed += 1
    return zeroed
