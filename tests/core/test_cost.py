"""analysis/cost.py: exact MAC counts worked out by hand, parameter counting, node counts."""

import numpy as np
import pytest
from onnx import TensorProto
from onnx import helper as h
from onnx import numpy_helper as nh

from graphs import init, make_model, vi
from onnxslim_cnn.analysis.cost import count_params, model_stats, node_macs
from onnxslim_cnn.graph import Graph


def w(*shape, dtype=np.float32):
    return np.zeros(shape, dtype=dtype)


def single(op, x_shape, y_shape, weights, **attrs):
    """One MAC node named 'n' reading graph input x and constant weights, writing graph output y."""
    inits = [init(f"w{i}", a) for i, a in enumerate(weights)]
    node = h.make_node(op, ["x"] + [t.name for t in inits], ["y"], name="n", **attrs)
    return make_model([node], [vi("x", x_shape)], [vi("y", y_shape)], inits)


def macs(model, shapes):
    found, unknown = node_macs(model, shapes)
    assert unknown == []
    return found


# --------------------------------------------------------------------------- Conv


@pytest.mark.parametrize("x, wshape, attrs, y, expected", [
    # stride 2, pads 1: H_out = (9 + 2 - 3) // 2 + 1 = 5; 6 * 5 * 5 outputs, each 4 * 3 * 3 MACs
    ((1, 4, 9, 9), (6, 4, 3, 3), dict(strides=[2, 2], pads=[1, 1, 1, 1]), (1, 6, 5, 5), 6 * 25 * 36),
    # dilation 2 without pads: effective kernel 5, H_out = 10 - 5 + 1 = 6
    ((1, 2, 10, 10), (3, 2, 3, 3), dict(dilations=[2, 2]), (1, 3, 6, 6), 3 * 36 * 2 * 9),
    # groups=2: every output reads C_in / 2 = 2 channels
    ((1, 4, 8, 8), (6, 2, 3, 3), dict(group=2, pads=[1, 1, 1, 1]), (1, 6, 8, 8), 6 * 64 * 2 * 9),
    # depthwise: one input channel per output
    ((1, 4, 8, 8), (4, 1, 3, 3), dict(group=4, pads=[1, 1, 1, 1]), (1, 4, 8, 8), 4 * 64 * 9),
    # asymmetric kernel and strides, batch 2
    ((2, 3, 7, 11), (5, 3, 1, 3), dict(strides=[1, 2]), (2, 5, 7, 5), 2 * 5 * 7 * 5 * 3 * 3),
])
def test_conv_macs(x, wshape, attrs, y, expected):
    m = single("Conv", list(x), list(y), [w(*wshape)], **attrs)
    assert macs(m, {"x": x}) == {"n": expected}


@pytest.mark.parametrize("x, wshape, attrs, y, expected", [
    # every input element scatters into C_out/groups * k * k outputs: 4 * 25 * 3 * 9
    ((1, 4, 5, 5), (4, 3, 3, 3), dict(strides=[2, 2]), (1, 3, 11, 11), 4 * 25 * 3 * 9),
    # groups=2: weight [C_in, C_out/2, k, k] = [4, 2, 3, 3]; C_out = 4
    ((1, 4, 5, 5), (4, 2, 3, 3), dict(strides=[2, 2], group=2), (1, 4, 11, 11), 4 * 25 * 2 * 9),
])
def test_conv_transpose_macs(x, wshape, attrs, y, expected):
    m = single("ConvTranspose", list(x), list(y), [w(*wshape)], **attrs)
    assert macs(m, {"x": x}) == {"n": expected}


# --------------------------------------------------------------------------- Gemm / MatMul


def test_gemm_transposed_operands():
    # A is [K=5, M=3] (transA), B is [N=4, K=5] (transB): Y [3, 4], 3 * 4 * 5 MACs
    m = single("Gemm", [5, 3], [3, 4], [w(4, 5), w(4)], transA=1, transB=1)
    assert macs(m, {"x": (5, 3)}) == {"n": 60}


def test_gemm_plain_and_symbolic_batch():
    m = single("Gemm", ["N", 7], ["N", 2], [w(2, 7), w(2)], transB=1)
    assert macs(m, {"x": (1, 7)}) == {"n": 14}
    assert macs(m, {"x": (5, 7)}) == {"n": 70}


def test_matmul_3d_by_2d():
    m = single("MatMul", [2, 3, 5], [2, 3, 4], [w(5, 4)])
    assert macs(m, {"x": (2, 3, 5)}) == {"n": 2 * 3 * 4 * 5}


@pytest.mark.parametrize("a, b, y", [
    ((2, 3, 4, 5), (2, 3, 5, 6), (2, 3, 4, 6)),
    ((2, 1, 4, 5), (1, 3, 5, 6), (2, 3, 4, 6)),  # broadcast batch dims
])
def test_matmul_4d_by_4d(a, b, y):
    node = h.make_node("MatMul", ["a", "b"], ["y"], name="mm")
    m = make_model([node], [vi("a", list(a)), vi("b", list(b))], [vi("y", list(y))])
    assert macs(m, {"a": a, "b": b}) == {"mm": 2 * 3 * 4 * 6 * 5}


def test_symbolic_batch_takes_given_shape():
    m = single("Conv", ["N", 4, 9, 9], ["N", 6, 5, 5], [w(6, 4, 3, 3)], strides=[2, 2], pads=[1, 1, 1, 1])
    assert macs(m, {"x": (1, 4, 9, 9)}) == {"n": 5400}
    assert macs(m, {"x": (3, 4, 9, 9)}) == {"n": 3 * 5400}
    # dynamic spatial dims: the given shape decides everything
    m = single("Conv", ["N", 4, "H", "W"], ["N", 6, "h", "w"], [w(6, 4, 3, 3)], strides=[2, 2], pads=[1, 1, 1, 1])
    assert macs(m, {"x": (1, 4, 9, 9)}) == {"n": 5400}


def test_unknown_shapes_are_listed_not_guessed():
    m = single("Conv", ["N", 4, "H", "W"], ["N", 6, "h", "w"], [w(6, 4, 3, 3)])
    found, unknown = node_macs(m, {})
    assert found == {} and unknown == ["n"]
    stats = model_stats(m, {})
    assert stats.macs == 0 and stats.macs_unknown == ["n"]
    assert model_stats(m, None).macs_unknown == []


def chain_model():
    """Conv -> Relu -> Flatten -> Gemm, plus an unnamed MatMul (keyed by its output) and two Adds."""
    nodes = [
        h.make_node("Conv", ["x", "cw"], ["c"], name="conv", pads=[1, 1, 1, 1]),
        h.make_node("Relu", ["c"], ["r"], name="relu"),
        h.make_node("Flatten", ["r"], ["f"], name="flat"),
        h.make_node("Gemm", ["f", "gw", "gb"], ["g"], name="fc", transB=1),
        h.make_node("MatMul", ["g", "mw"], ["mm_out"]),
        h.make_node("Add", ["mm_out", "ab"], ["a1"], name="add1"),
        h.make_node("Add", ["a1", "ab"], ["y"], name="add2"),
    ]
    inits = [init("cw", w(2, 3, 3, 3)), init("gw", w(5, 2 * 4 * 4)), init("gb", w(5)), init("mw", w(5, 3)),
             init("ab", w(3))]
    return make_model(nodes, [vi("x", ["N", 3, 4, 4])], [vi("y", ["N", 3])], inits)


def test_model_stats_sums_and_counts():
    m = chain_model()
    conv, fc, mm = 2 * 16 * 3 * 9, 5 * 32, 3 * 5
    stats = model_stats(m, {"x": (1, 3, 4, 4)})
    assert stats.macs == conv + fc + mm
    assert stats.macs_by_op == {"Conv": conv, "Gemm": fc, "MatMul": mm}
    assert stats.nodes == 7
    assert stats.op_counts == {"Add": 2, "Conv": 1, "Flatten": 1, "Gemm": 1, "MatMul": 1, "Relu": 1}
    assert stats.params == 2 * 27 + 5 * 32 + 5 + 15 + 3
    assert stats.file_bytes == m.ByteSize()
    assert model_stats(m, {"x": (4, 3, 4, 4)}).macs == 4 * (conv + fc + mm)
    assert set(stats.to_dict()) == {"params", "file_bytes", "macs", "macs_by_op", "nodes", "op_counts",
                                    "macs_unknown", "macs_by_node", "params_by_node"}
    # per layer, keyed like node_macs (an unnamed node by its output)
    assert stats.macs_by_node == {"conv": conv, "fc": fc, "mm_out": mm}
    assert stats.params_by_node == {"conv": 2 * 27, "fc": 5 * 32 + 5, "mm_out": 15}


def test_duplicate_node_names_are_all_counted():
    # Node names need not be unique in ONNX; two nodes sharing one must not hide each other's MACs.
    nodes = [h.make_node("MatMul", ["x", "w1"], ["a"], name="mm"), h.make_node("MatMul", ["a", "w2"], ["y"], name="mm")]
    m = make_model(nodes, [vi("x", [2, 3])], [vi("y", [2, 5])], [init("w1", w(3, 4)), init("w2", w(4, 5))])
    stats = model_stats(m, {"x": (2, 3)})
    assert stats.macs == 2 * 4 * 3 + 2 * 5 * 4
    assert stats.macs_by_op == {"MatMul": stats.macs}


# --------------------------------------------------------------------------- parameters


def params_model():
    nodes = [
        h.make_node("Constant", [], ["cf"], value=nh.from_array(w(4), "cf")),          # float: 4
        h.make_node("Constant", [], ["cfs"], value_floats=[1.0, 2.0, 3.0]),           # float: 3
        h.make_node("Constant", [], ["cs"], value_float=1.0),                        # float scalar: 1
        h.make_node("Constant", [], ["ci"], value_ints=[1, 4]),                      # int64 shape: 0
        h.make_node("Constant", [], ["cit"], value=nh.from_array(np.array([1, 4], np.int64), "cit")),  # 0
        h.make_node("Add", ["x", "cf"], ["a"]),
        h.make_node("Mul", ["a", "cs"], ["b"]),
        h.make_node("Reshape", ["b", "shape"], ["r"]),
        h.make_node("Reshape", ["r", "ci"], ["r2"]),
        h.make_node("Reshape", ["r2", "cit"], ["r3"]),
        h.make_node("Cast", ["q"], ["qf"], to=TensorProto.FLOAT),
        h.make_node("Add", ["r3", "qf"], ["s"]),
        h.make_node("Cast", ["h16"], ["hf"], to=TensorProto.FLOAT),
        h.make_node("Add", ["s", "hf"], ["t"]),
        h.make_node("Gather", ["cfs", "idx"], ["gi"], axis=0),
        h.make_node("Add", ["t", "gi"], ["y"]),
    ]
    inits = [
        init("shape", np.array([1, 4], np.int64)),                 # 0
        init("idx", np.array([0, 1, 2, 0], np.int32)),             # 0
        init("q", np.arange(4, dtype=np.int8).reshape(1, 4)),      # int8 weights: 4
        init("h16", np.ones((1, 4), np.float16)),                  # fp16: 4
    ]
    return make_model(nodes, [vi("x", [1, 4])], [vi("y", [1, 4])], inits)


def test_params_count_weight_types_only():
    m = params_model()
    assert count_params(m) == 4 + 3 + 1 + 4 + 4


def test_params_unchanged_when_constants_become_initializers():
    m = params_model()
    assert count_params(Graph.from_model(m).to_model()) == count_params(m)


def test_params_of_double_initializer_and_large_float():
    m = single("Gemm", [1, 7], [1, 2], [w(2, 7), w(2)], transB=1)
    assert count_params(m) == 16
    m.graph.initializer.append(nh.from_array(np.zeros((3, 3), np.float64), "unused"))
    assert count_params(m) == 25


# --------------------------------------------------------------------------- shapes only known at run time


def runtime_reshape_model():
    """Conv -> Reshape to [N, C*H, W] with the target computed Shape -> Gather -> Mul -> Concat
    (as ddddocr's LSTM head does, opset 12: Unsqueeze's axes an attribute), then MatMul and a
    transB Gemm: beyond ONNX's data propagation."""
    def i64(name, v):  # a Constant node, as torch.onnx writes the Gather indices
        return h.make_node("Constant", [], [name], value=nh.from_array(np.asarray(v, np.int64), name))

    nodes = [
        i64("i0", 0), i64("i1", 1), i64("i2", 2), i64("i3", 3), i64("flat", [-1, 7]),
        h.make_node("Conv", ["x", "cw"], ["c"], name="conv", pads=[1, 1, 1, 1]),
        h.make_node("Shape", ["c"], ["s"]),
        h.make_node("Gather", ["s", "i0"], ["n"], axis=0), h.make_node("Gather", ["s", "i1"], ["ch"], axis=0),
        h.make_node("Gather", ["s", "i2"], ["hh"], axis=0), h.make_node("Gather", ["s", "i3"], ["ww"], axis=0),
        h.make_node("Mul", ["ch", "hh"], ["chh"]),
        h.make_node("Unsqueeze", ["n"], ["n1"], axes=[0]), h.make_node("Unsqueeze", ["chh"], ["chh1"], axes=[0]),
        h.make_node("Unsqueeze", ["ww"], ["ww1"], axes=[0]),
        h.make_node("Concat", ["n1", "ww1", "chh1"], ["target"], axis=0),
        h.make_node("Transpose", ["c"], ["ct"], perm=[0, 3, 1, 2]),
        h.make_node("Reshape", ["ct", "target"], ["seq"]),  # [N, W, C*H]
        h.make_node("MatMul", ["seq", "mw"], ["m"], name="mm"),  # [N, W, 7]
        h.make_node("Reshape", ["m", "flat"], ["m2"]),
        h.make_node("Gemm", ["m2", "gw"], ["y"], name="fc", transB=1),
    ]
    inits = [init("cw", w(2, 3, 3, 3)), init("mw", w(2 * 4, 7)), init("gw", w(5, 7))]
    return make_model(nodes, [vi("x", [1, 3, 4, "W"])], [vi("y", ["M", 5])], inits, opset=12, ir_version=7)


def test_shapes_static_inference_lacks_come_from_one_runtime_run():
    from onnxslim_cnn.analysis.cost import sample_feeds

    m = runtime_reshape_model()
    shapes = {"x": (1, 3, 4, 10)}
    conv, mm, fc = 2 * 4 * 10 * 27, 10 * 7 * 8, 10 * 5 * 7
    found, unknown = node_macs(m, shapes)
    assert found == {"conv": conv} and sorted(unknown) == ["fc", "mm"]  # static inference alone
    x = np.random.default_rng(0).standard_normal((3, 3, 4, 10)).astype(np.float32)
    feeds = sample_feeds({"x": x}, shapes)
    assert feeds["x"].shape == (1, 3, 4, 10)
    assert node_macs(m, shapes, feeds) == ({"conv": conv, "mm": mm, "fc": fc}, [])
    stats = model_stats(m, shapes, feeds)
    assert stats.macs == conv + mm + fc and stats.macs_unknown == [] and stats.macs_by_op["MatMul"] == mm
    # feeds that do not match the shapes are not used; a run that fails leaves the nodes unknown
    assert sample_feeds({"x": x[:, :, :2]}, shapes) is None
    assert node_macs(m, shapes, {"y_missing": x})[1] == ["mm", "fc"]


def test_pipeline_counts_runtime_shapes_in_the_report():
    import onnxslim_cnn

    m = runtime_reshape_model()
    x = np.random.default_rng(1).standard_normal((4, 3, 4, 10)).astype(np.float32)
    _, report = onnxslim_cnn.compress(m, passes=["slim"], calib={"x": x}, fidelity=False)
    assert report.input.macs == 2 * 4 * 10 * 27 + 10 * 7 * 8 + 10 * 5 * 7 and report.input.macs_unknown == []


@pytest.mark.corpus
def test_ddddocr_common_macs_do_not_rise_after_svd(corpus_paths):
    """Its 1024x8210 Gemm sits behind an LSTM and a computed Reshape: it used to be counted as
    unknown on the input only, so MACs 'rose' after svd (507M -> 605M). Now: 776M -> 605M."""
    import onnxslim_cnn
    from onnxslim_cnn.models import tasks

    calib = tasks.sample_inputs("ddddocr_common", 4)
    _, report = onnxslim_cnn.compress(str(corpus_paths["ddddocr_common"]), passes=["svd"], calib=calib, fidelity=False)
    assert report.passes[0].stats["factorised"] == 1
    assert report.input.macs_unknown == [] and report.output.macs_unknown == []
    seq = calib["input1"].shape[-1] // 8  # the LSTM's time steps at this width
    assert report.input.macs_by_op["Gemm"] == 1024 * 8210 * seq
    assert report.output.macs < report.input.macs
