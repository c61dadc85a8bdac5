"""Each slim rule on a tiny graph: exact outputs against ORT on the original, and what remains."""

import numpy as np
import onnx
import pytest
from onnx import TensorProto
from onnx import helper as h

from graphs import assert_same_outputs, conv_bn_model, init, make_model, vi
from onnxslim_cnn.passes import SlimPass

RNG = np.random.default_rng(1)
X = {"x": RNG.standard_normal((2, 4, 8, 8)).astype(np.float32)}


def slim(model, **opts):
    out, result = SlimPass(**opts).apply(model)
    onnx.checker.check_model(out, full_check=True)
    return out, result


def ops(model):
    return [n.op_type for n in model.graph.node]


@pytest.mark.parametrize("with_bias", [False, True])
def test_conv_bn_folds_exactly(with_bias):
    m = conv_bn_model(with_bias=with_bias)
    out, result = slim(m)
    assert ops(out) == ["Conv", "Relu"]
    assert result.stats["folded_batchnorm"] == 1
    assert_same_outputs(m, out, X)


def test_bn_that_is_graph_output_keeps_output_name():
    m = conv_bn_model(out_is_bn=True)
    out, _ = slim(m)
    assert ops(out) == ["Conv"]
    assert [o.name for o in out.graph.output] == ["y"]
    assert out.graph.output[0].type == m.graph.output[0].type
    assert_same_outputs(m, out, X)


def test_bn_with_shared_conv_output_is_skipped_with_reason():
    m = conv_bn_model()
    m.graph.node.append(h.make_node("Relu", ["c"], ["z"], name="side"))
    m.graph.output.append(vi("z", ["N", 6, 8, 8]))
    out, result = slim(m)
    assert "BatchNormalization" in ops(out)
    assert any("other consumers" in s["reason"] for s in result.skipped)
    assert_same_outputs(m, out, X)


def test_bn_after_maxpool_is_skipped_with_reason():
    m = make_model([h.make_node("MaxPool", ["x"], ["p"], kernel_shape=[2, 2], strides=[2, 2]),
                    h.make_node("BatchNormalization", ["p", "g", "b", "m", "v"], ["y"], name="bn")],
                   [vi("x", ["N", 4, 8, 8])], [vi("y", ["N", 4, 4, 4])],
                   [init("g", RNG.uniform(.5, 1.5, 4)), init("b", RNG.normal(size=4)),
                    init("m", RNG.normal(size=4)), init("v", RNG.uniform(.5, 2, 4))])
    out, result = slim(m)
    assert ops(out) == ["MaxPool", "BatchNormalization"]
    assert result.skipped == [{"item": "bn", "reason": "BatchNormalization kept: input comes from MaxPool, not Conv/ConvTranspose/Gemm"}]


@pytest.mark.parametrize("group", [1, 2])
def test_convtranspose_bn(group):
    m = make_model([h.make_node("ConvTranspose", ["x", "w", "cb"], ["c"], strides=[2, 2], group=group),
                    h.make_node("BatchNormalization", ["c", "g", "b", "m", "v"], ["y"])],
                   [vi("x", ["N", 4, 8, 8])], [vi("y", ["N", 6, 17, 17])],
                   [init("w", RNG.normal(size=(4, 6 // group * 1 if group == 1 else 3, 3, 3))),
                    init("cb", RNG.normal(size=6)), init("g", RNG.uniform(.5, 1.5, 6)),
                    init("b", RNG.normal(size=6)), init("m", RNG.normal(size=6)), init("v", RNG.uniform(.5, 2, 6))])
    out, _ = slim(m)
    assert ops(out) == ["ConvTranspose"]
    assert_same_outputs(m, out, X)


@pytest.mark.parametrize("trans_b,with_c,alpha,beta", [(0, False, 1.0, 1.0), (1, True, 0.5, 2.0), (1, False, 1.0, 1.0),
                                                       (0, True, 1.0, 0.3)])
def test_gemm_bn_all_forms(trans_b, with_c, alpha, beta):
    w = RNG.normal(size=(5, 7) if trans_b else (7, 5))
    ins = ["x", "w"] + (["c"] if with_c else [])
    m = make_model([h.make_node("Gemm", ins, ["g0"], transB=trans_b, alpha=alpha, beta=beta),
                    h.make_node("BatchNormalization", ["g0", "g", "b", "m", "v"], ["y"])],
                   [vi("x", ["N", 7])], [vi("y", ["N", 5])],
                   [init("w", w), init("g", RNG.uniform(.5, 1.5, 5)), init("b", RNG.normal(size=5)),
                    init("m", RNG.normal(size=5)), init("v", RNG.uniform(.5, 2, 5))]
                   + ([init("c", RNG.normal(size=5))] if with_c else []))
    out, _ = slim(m)
    assert ops(out) == ["Gemm"]
    assert_same_outputs(m, out, {"x": RNG.standard_normal((3, 7)).astype(np.float32)})


@pytest.mark.parametrize("shape", [(1, 6, 1, 1), (6, 1, 1), (1,)])
def test_bn_exported_as_mul_add_folds(shape):
    m = make_model([h.make_node("Conv", ["x", "w"], ["c"], name="conv"),
                    h.make_node("Mul", ["s", "c"], ["mu"]), h.make_node("Add", ["mu", "t"], ["a"]),
                    h.make_node("Sub", ["a", "u"], ["su"]), h.make_node("Div", ["su", "d"], ["y"])],
                   [vi("x", ["N", 4, 8, 8])], [vi("y", ["N", 6, 8, 8])],
                   [init("w", RNG.normal(size=(6, 4, 1, 1))), init("s", RNG.normal(size=shape)),
                    init("t", RNG.normal(size=shape)), init("u", RNG.normal(size=shape)),
                    init("d", RNG.uniform(1, 2, size=shape))])
    out, _ = slim(m)
    assert ops(out) == ["Conv"]
    assert_same_outputs(m, out, X)


def test_mul_that_broadcasts_spatially_is_not_folded():
    m = make_model([h.make_node("Conv", ["x", "w"], ["c"]), h.make_node("Mul", ["c", "s"], ["y"])],
                   [vi("x", ["N", 4, 8, 8])], [vi("y", ["N", 6, 8, 8])],
                   [init("w", RNG.normal(size=(6, 4, 1, 1))), init("s", RNG.normal(size=(1, 1, 8, 8)))])
    out, _ = slim(m)
    assert ops(out) == ["Conv", "Mul"]


def test_matmul_add_becomes_gemm():
    m = make_model([h.make_node("MatMul", ["x", "w"], ["mm"]), h.make_node("Add", ["b", "mm"], ["y"])],
                   [vi("x", ["N", 7])], [vi("y", ["N", 5])], [init("w", RNG.normal(size=(7, 5))), init("b", RNG.normal(size=5))])
    out, _ = slim(m)
    assert ops(out) == ["Gemm"]
    assert_same_outputs(m, out, {"x": RNG.standard_normal((3, 7)).astype(np.float32)})


def test_matmul_add_on_3d_input_is_kept():
    m = make_model([h.make_node("MatMul", ["x", "w"], ["mm"]), h.make_node("Add", ["mm", "b"], ["y"])],
                   [vi("x", ["N", 3, 7])], [vi("y", ["N", 3, 5])], [init("w", RNG.normal(size=(7, 5))), init("b", RNG.normal(size=5))])
    out, _ = slim(m)
    assert ops(out) == ["MatMul", "Add"]


@pytest.mark.parametrize("opset", [10, 13])
def test_zero_pad_fuses_into_conv(opset):
    pads = [0, 0, 1, 2, 0, 0, 2, 1]
    if opset >= 11:
        pad = h.make_node("Pad", ["x", "p"], ["xp"], mode="constant")
        extra = [init("p", np.array(pads, dtype=np.int64))]
    else:
        pad, extra = h.make_node("Pad", ["x"], ["xp"], mode="constant", pads=pads, value=0.0), []
    m = make_model([pad, h.make_node("Conv", ["xp", "w"], ["y"], pads=[1, 0, 0, 1], strides=[2, 2])],
                   [vi("x", ["N", 4, 8, 8])], [vi("y", ["N", 6, 5, 5])], [init("w", RNG.normal(size=(6, 4, 3, 3)))] + extra,
                   opset=opset, ir_version=7 if opset == 10 else 8)
    out, _ = slim(m)
    assert ops(out) == ["Conv"]
    assert_same_outputs(m, out, X)


def test_reflect_pad_is_kept():
    m = make_model([h.make_node("Pad", ["x", "p"], ["xp"], mode="reflect"), h.make_node("Conv", ["xp", "w"], ["y"])],
                   [vi("x", ["N", 4, 8, 8])], [vi("y", ["N", 6, 8, 8])],
                   [init("w", RNG.normal(size=(6, 4, 3, 3))), init("p", np.array([0, 0, 1, 1, 0, 0, 1, 1], dtype=np.int64))])
    out, _ = slim(m)
    assert ops(out) == ["Pad", "Conv"]


def test_identities_removed_including_at_the_output():
    nodes = [h.make_node("Identity", ["x"], ["i0"]), h.make_node("Relu", ["i0"], ["r"]),
             h.make_node("Dropout", ["r"], ["d"]), h.make_node("Cast", ["d"], ["c"], to=TensorProto.FLOAT),
             h.make_node("Transpose", ["c"], ["t"], perm=[0, 1, 2, 3]), h.make_node("Mul", ["t", "one"], ["mu"]),
             h.make_node("Add", ["zero", "mu"], ["a"]), h.make_node("Identity", ["a"], ["y"])]
    m = make_model(nodes, [vi("x", ["N", 4, 8, 8])], [vi("y", ["N", 4, 8, 8])],
                   [init("one", np.ones((1, 1), np.float32)), init("zero", np.zeros((1,), np.float32))])
    out, _ = slim(m)
    assert ops(out) == ["Relu"]
    assert out.graph.node[0].output[0] == "y"
    assert_same_outputs(m, out, X)


def test_noop_rules_are_a_table_tried_in_order():
    from onnxslim_cnn.graph import Graph
    from onnxslim_cnn.passes.slim.rules import NOOP_RULES, noop_rule

    assert [r.name for r in NOOP_RULES] == ["identity", "inference_dropout", "same_type_cast", "identity_permutation",
                                            "reshape_to_own_shape", "same_static_shape", "zero_pad", "single_input",
                                            "neutral_element"]
    nodes = [h.make_node("Reshape", ["x", "s"], ["r"]), h.make_node("Flatten", ["r"], ["f"], axis=1),
             h.make_node("Add", ["zero", "f"], ["a"]), h.make_node("Relu", ["a"], ["y"])]
    m = make_model(nodes, [vi("x", [2, 4])], [vi("y", [2, 4])],
                   [init("s", np.array([0, -1], np.int64)), init("zero", np.zeros((1,), np.float32))])
    graph = Graph.from_model(m)
    found = {n.op: noop_rule(graph, n) for n in graph.nodes}
    assert {op: r and r.name for op, r in found.items()} == {
        "Reshape": "reshape_to_own_shape", "Flatten": "same_static_shape", "Add": "neutral_element", "Relu": None}
    out, result = slim(m)
    assert ops(out) == ["Relu"]
    assert [c["action"] for c in result.changes] == ["removed_reshape", "removed_flatten", "removed_add"]


def test_mul_by_one_that_broadcasts_is_kept():
    m = make_model([h.make_node("Mul", ["x", "one"], ["y"])], [vi("x", ["N", 4, 8, 1])], [vi("y", ["N", 4, 8, 8])],
                   [init("one", np.ones((1, 1, 1, 8), np.float32))])
    out, _ = slim(m)
    assert ops(out) == ["Mul"]


def test_torch_style_flatten_shape_subgraph_folds():
    # Shape -> Gather(0) -> Unsqueeze -> Concat([-1]) -> Reshape: torch's x.view(x.size(0), -1)
    nodes = [h.make_node("Relu", ["x"], ["r"]), h.make_node("Shape", ["r"], ["s"]),
             h.make_node("Gather", ["s", "i0"], ["n"], axis=0), h.make_node("Unsqueeze", ["n", "ax"], ["n1"]),
             h.make_node("Concat", ["n1", "m1"], ["shape"], axis=0), h.make_node("Reshape", ["r", "shape"], ["f"]),
             h.make_node("Reshape", ["f", "s2"], ["y"])]
    m = make_model(nodes, [vi("x", ["N", 4, 8, 8])], [vi("y", ["N", 256])],
                   [init("i0", np.array(0, np.int64)), init("ax", np.array([0], np.int64)),
                    init("m1", np.array([-1], np.int64)), init("s2", np.array([-1, 256], np.int64))])
    out, _ = slim(m)
    assert ops(out) == ["Relu", "Reshape"]
    assert_same_outputs(m, out, X)


def test_transpose_chain_cancels():
    m = make_model([h.make_node("Transpose", ["x"], ["t1"], perm=[0, 2, 3, 1]),
                    h.make_node("Transpose", ["t1"], ["t2"], perm=[0, 3, 1, 2]), h.make_node("Relu", ["t2"], ["y"])],
                   [vi("x", ["N", 4, 8, 8])], [vi("y", ["N", 4, 8, 8])])
    out, _ = slim(m)
    assert ops(out) == ["Relu"]
    assert_same_outputs(m, out, X)


def test_common_subexpressions_merge_and_constants_dedup():
    w = RNG.normal(size=(4, 4, 1, 1))
    nodes = [h.make_node("Relu", ["x"], ["r1"]), h.make_node("Relu", ["x"], ["r2"]),
             h.make_node("Conv", ["r1", "w1"], ["c1"]), h.make_node("Conv", ["r2", "w2"], ["c2"]),
             h.make_node("Add", ["c1", "c2"], ["y"])]
    m = make_model(nodes, [vi("x", ["N", 4, 8, 8])], [vi("y", ["N", 4, 8, 8])], [init("w1", w), init("w2", w)])
    out, result = slim(m)
    assert ops(out) == ["Relu", "Conv", "Add"]
    assert len(out.graph.initializer) == 1
    assert_same_outputs(m, out, X)


def test_quantized_weights_are_not_folded_back_to_float():
    q = RNG.integers(-127, 127, size=(6, 4, 3, 3)).astype(np.int8)
    nodes = [h.make_node("DequantizeLinear", ["wq", "ws", "wz"], ["w"], axis=0),
             h.make_node("Conv", ["x", "w"], ["y"])]
    m = make_model(nodes, [vi("x", ["N", 4, 8, 8])], [vi("y", ["N", 6, 6, 6])],
                   [init("wq", q), init("ws", RNG.uniform(0.01, 0.02, 6).astype(np.float32)),
                    init("wz", np.zeros(6, np.int8))])
    out, _ = slim(m)
    assert ops(out) == ["DequantizeLinear", "Conv"]


def test_options_disable_rules():
    m = conv_bn_model()
    out, result = slim(m, fold_batchnorm=False)
    assert "BatchNormalization" in ops(out)


def test_dynamic_flatten_target_becomes_constant_with_copy_dims():
    # Paddle style: Cast(Slice(Cast(Shape(x)))) -> Concat([-1]) -> Reshape, then MatMul + Add
    nodes = [h.make_node("Relu", ["x"], ["r"]), h.make_node("Shape", ["r"], ["s"]),
             h.make_node("Cast", ["s"], ["s32"], to=TensorProto.INT32),
             h.make_node("Slice", ["s32", "st", "en", "st", "en"], ["n"]),
             h.make_node("Cast", ["n"], ["n64"], to=TensorProto.INT64),
             h.make_node("Concat", ["n64", "m1"], ["shape"], axis=-1), h.make_node("Reshape", ["r", "shape"], ["f"]),
             h.make_node("MatMul", ["f", "w"], ["mm"]), h.make_node("Add", ["mm", "b"], ["y"])]
    m = make_model(nodes, [vi("x", ["N", 4, 8, 8])], [vi("y", ["N", 5])],
                   [init("st", np.array([0], np.int32)), init("en", np.array([1], np.int32)),
                    init("m1", np.array([-1], np.int64)), init("w", RNG.normal(size=(256, 5))), init("b", RNG.normal(size=5))])
    out, result = slim(m)
    assert ops(out) == ["Relu", "Reshape", "Gemm"]
    assert result.stats["constant_reshape_target"] == 1
    shape = [onnx.numpy_helper.to_array(t) for t in out.graph.initializer if t.name.endswith(".shape")]
    assert [s.tolist() for s in shape] == [[0, -1]]
    assert_same_outputs(m, out, X)


def test_transpose_of_unit_axis_becomes_reshape_and_merges():
    m = make_model([h.make_node("Transpose", ["x"], ["t"], perm=[0, 2, 1, 3]),
                    h.make_node("Reshape", ["t", "s"], ["y"])],
                   [vi("x", ["T", 2, 1, 5])], [vi("y", ["T", 1, 10])], [init("s", np.array([0, 0, -1], np.int64))])
    out, _ = slim(m)
    assert ops(out) == ["Reshape"]
    assert_same_outputs(m, out, {"x": RNG.standard_normal((3, 2, 1, 5)).astype(np.float32)})


def test_transpose_that_moves_data_is_kept():
    m = make_model([h.make_node("Transpose", ["x"], ["y"], perm=[0, 2, 1, 3])],
                   [vi("x", ["T", 2, 3, 5])], [vi("y", ["T", 3, 2, 5])])
    out, _ = slim(m)
    assert ops(out) == ["Transpose"]


def test_focus_stem_slices_merge():
    nodes, outs = [], []
    for k, (a, b) in enumerate([(0, 0), (1, 0), (0, 1), (1, 1)]):
        nodes += [h.make_node("Slice", ["x", f"s{a}", "big", "ax2", "two"], [f"h{k}"]),
                  h.make_node("Slice", [f"h{k}", f"s{b}", "big", "ax3", "two"], [f"q{k}"])]
        outs.append(f"q{k}")
    nodes.append(h.make_node("Concat", outs, ["y"], axis=1))
    consts = [init("s0", np.array([0], np.int64)), init("s1", np.array([1], np.int64)),
              init("big", np.array([2**62], np.int64)), init("ax2", np.array([2], np.int64)),
              init("ax3", np.array([3], np.int64)), init("two", np.array([2], np.int64))]
    m = make_model(nodes, [vi("x", ["N", 4, 8, 8])], [vi("y", ["N", 16, 4, 4])], consts)
    out, _ = slim(m)
    assert ops(out) == ["Slice"] * 4 + ["Concat"]
    assert_same_outputs(m, out, X)


def test_wrong_declared_output_shape_is_corrected():
    # ddddocr's OCR model declares [1, seqlen] for a [T, 1, C] output; the checker only sees it
    # once the reshape target is constant
    nodes = [h.make_node("Relu", ["x"], ["r"]), h.make_node("Shape", ["r"], ["s"]),
             h.make_node("Gather", ["s", "i0"], ["n"], axis=0),
             h.make_node("Unsqueeze", ["n", "ax"], ["n1"]), h.make_node("Concat", ["n1", "rest"], ["shape"], axis=0),
             h.make_node("Reshape", ["r", "shape"], ["y"])]
    g = h.make_graph(nodes, "g", [vi("x", ["T", 1, 6])], [vi("y", [1, "seqlen"])],
                     [init("i0", np.array(0, np.int64)), init("ax", np.array([0], np.int64)),
                      init("rest", np.array([1, -1], np.int64))])
    m = h.make_model(g, opset_imports=[h.make_opsetid("", 17)])
    m.ir_version = 8
    out, result = slim(m)
    assert ops(out) == ["Relu"]  # Reshape(r, [0, 1, -1]) keeps r's shape
    assert [c for c in result.changes if c["action"] == "corrected_output_shape"][0]["declared"] == [1, "seqlen"]
    dims = out.graph.output[0].type.tensor_type.shape.dim
    assert len(dims) == 3 and dims[1].dim_value == 1 and dims[2].dim_value == 6
    assert_same_outputs(m, out, {"x": RNG.standard_normal((4, 1, 6)).astype(np.float32)})
