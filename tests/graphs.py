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
