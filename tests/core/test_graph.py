"""model_io.py: loading without side effects, external data, atomic saves; graph.py: round trips, editing helpers."""

import sys

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import helper as h

import onnxslim_cnn
import onnxslim_cnn.sessions as sessions
from graphs import assert_same_outputs, conv_bn_model, init, make_model, run, vi
from onnxslim_cnn import model_io
from onnxslim_cnn.errors import UserError
from onnxslim_cnn.graph import Graph
from onnxslim_cnn.model_io import load_model, save_model

FEED = {"x": np.random.default_rng(1).standard_normal((2, 4, 8, 8)).astype(np.float32)}


def big_model():
    """A Conv with a 16 kB weight (over 1024 bytes, so it goes to external data) plus small tensors."""
    rng = np.random.default_rng(3)
    nodes = [h.make_node("Conv", ["x", "w", "b"], ["c"], pads=[1, 1, 1, 1], name="conv"),
             h.make_node("Relu", ["c"], ["y"], name="relu")]
    inits = [init("w", rng.normal(size=(32, 4, 3, 3))), init("b", rng.normal(size=32))]
    return make_model(nodes, [vi("x", ["N", 4, 8, 8])], [vi("y", ["N", 32, 8, 8])], inits)


def rich_model():
    """conv_bn plus Constant nodes and value_info: things load/compress must not touch in the caller's proto."""
    m = conv_bn_model()
    m.graph.node.insert(0, h.make_node("Constant", [], ["k"], value_float=1.0, name="k"))
    m.graph.node.append(h.make_node("Mul", ["y", "k"], ["z"], name="mul"))
    m.graph.output[0].name = "z"
    for n in m.graph.node:
        if n.op_type == "Relu":
            n.output[0] = "y"
    m.graph.value_info.append(vi("c", ["N", 6, 8, 8]))
    onnx.checker.check_model(m, full_check=True)
    return m


def only_files(folder):
    return sorted(p.name for p in folder.iterdir())


@pytest.fixture
def tiny_threshold(monkeypatch):
    # Patch it also in every module that imported the constant by name.
    for name, module in list(sys.modules.items()):
        if name.startswith("onnxslim_cnn") and hasattr(module, "EXTERNAL_DATA_THRESHOLD"):
            monkeypatch.setattr(module, "EXTERNAL_DATA_THRESHOLD", 1000)


# --------------------------------------------------------------------------- loading


def test_load_model_copies_and_never_mutates_proto():
    m = rich_model()
    before = m.SerializeToString(deterministic=True)
    loaded = load_model(m)
    assert loaded is not m
    loaded.graph.node.pop()
    assert m.SerializeToString(deterministic=True) == before


def test_compress_never_mutates_proto():
    m = rich_model()
    before = m.SerializeToString(deterministic=True)
    out, report = onnxslim_cnn.compress(m)
    assert report.passes[0].changed
    assert m.SerializeToString(deterministic=True) == before
    assert_same_outputs(m, out, FEED)


def test_load_model_with_external_data(tmp_path):
    m = big_model()
    path = tmp_path / "ext.onnx"
    onnx.save_model(onnx.ModelProto.FromString(m.SerializeToString()), str(path), save_as_external_data=True,
                    all_tensors_to_one_file=True,
                    location="ext.onnx.data", size_threshold=0)
    assert (tmp_path / "ext.onnx.data").stat().st_size > path.stat().st_size
    loaded = load_model(path)
    assert all(t.data_location == onnx.TensorProto.DEFAULT for t in loaded.graph.initializer)
    for a, b in zip(m.graph.initializer, loaded.graph.initializer):
        np.testing.assert_array_equal(onnx.numpy_helper.to_array(a), onnx.numpy_helper.to_array(b))
    assert_same_outputs(m, loaded, FEED, rel=0)


def test_load_model_missing_external_data_is_user_error(tmp_path):
    path = tmp_path / "ext.onnx"
    onnx.save_model(big_model(), str(path), save_as_external_data=True, location="ext.data", size_threshold=0)
    (tmp_path / "ext.data").unlink()
    with pytest.raises(UserError, match="not a readable ONNX model"):
        load_model(path)


@pytest.mark.parametrize("content, expect", [(None, "not found"), (b"", "empty"), (b"\x00garbage" * 5, "ext")])
def test_load_model_bad_files(tmp_path, content, expect):
    path = tmp_path / "ext.onnx"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(UserError) as info:
        load_model(path)
    assert "\n" not in str(info.value)
    assert expect in str(info.value)


# --------------------------------------------------------------------------- saving


def test_save_small_model_is_one_file_and_atomic(tmp_path):
    m = big_model()
    out = tmp_path / "sub" / "out.onnx"
    assert save_model(m, out) == [out]
    assert only_files(out.parent) == ["out.onnx"]
    assert out.read_bytes() == m.SerializeToString(deterministic=True)


def test_save_writes_external_data_over_threshold(tmp_path, tiny_threshold):
    m = big_model()
    out = tmp_path / "out.onnx"
    written = save_model(m, out)
    data = tmp_path / "out.onnx.data"
    assert written == [out, data]
    assert only_files(tmp_path) == ["out.onnx", "out.onnx.data"]
    assert out.stat().st_size < 1000 < data.stat().st_size
    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    np.testing.assert_array_equal(sess.run(None, FEED)[0], run(m, FEED)[0])
    assert_same_outputs(m, load_model(out), FEED, rel=0)
    # the in-memory model still has its weights inline
    assert all(t.data_location == onnx.TensorProto.DEFAULT for t in m.graph.initializer)


def test_save_over_threshold_with_only_small_tensors(tmp_path, tiny_threshold):
    # Over the threshold but no tensor reaches the 1 kB external-data size: no .data file at all.
    m = conv_bn_model()
    assert m.ByteSize() > 1000
    out = tmp_path / "out.onnx"
    assert save_model(m, out) == [out]
    assert only_files(tmp_path) == ["out.onnx"]
    assert_same_outputs(m, load_model(out), FEED, rel=0)


def test_large_path_session_check_and_compress(tiny_threshold):
    # make_session, check_model and infer_shapes go through files with external data.
    m = big_model()
    sess = sessions.make_session(m)
    np.testing.assert_array_equal(sess.run(None, FEED)[0], run(m, FEED)[0])
    model_io.check_model(m)
    inferred = model_io.infer_shapes(m)
    assert any(v.name == "c" for v in inferred.graph.value_info)
    out, report = onnxslim_cnn.compress(m)
    assert report.passes[0].status == "ok"
    assert report.input.macs == 32 * 64 * 4 * 9
    assert_same_outputs(m, out, FEED)


class ExplodingModel:
    """A ModelProto stand-in whose serialization fails (everything else is the real model's)."""

    def __init__(self, model):
        self.model = model

    def __getattr__(self, name):
        return getattr(self.model, name)

    def SerializeToString(self, **kw):
        raise RuntimeError("serialization failed")


def test_failed_save_keeps_old_file_and_leaves_nothing(tmp_path):
    out = tmp_path / "out.onnx"
    out.write_bytes(b"old")
    with pytest.raises(RuntimeError, match="serialization failed"):
        save_model(ExplodingModel(big_model()), out)
    assert out.read_bytes() == b"old"
    assert only_files(tmp_path) == ["out.onnx"]


def test_failed_external_save_leaves_no_partial_file(tmp_path, tiny_threshold, monkeypatch):
    def partial_save(model, path, *args, location=None, **kw):
        with open(path, "wb") as f:
            f.write(b"partial")
        with open(str(path) + ".data", "wb") as f:
            f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(onnx, "save_model", partial_save)
    out = tmp_path / "out.onnx"
    with pytest.raises(UserError, match="cannot write .*out.onnx: disk full"):  # exit 2, one line
        save_model(big_model(), out)
    assert only_files(tmp_path) == []


# --------------------------------------------------------------------------- Graph round trip


def test_round_trip_keeps_model_fields():
    m = conv_bn_model()
    m.producer_name, m.producer_version, m.domain = "unit-test", "9.9", "org.test"
    m.doc_string, m.model_version = "a model", 7
    onnx.helper.set_model_props(m, {"author": "me", "license": "none"})
    m.opset_import.append(h.make_opsetid("com.microsoft", 1))
    out = Graph.from_model(m).to_model()
    for field in ("ir_version", "producer_name", "producer_version", "domain", "doc_string", "model_version"):
        assert getattr(out, field) == getattr(m, field), field
    assert [(o.domain, o.version) for o in out.opset_import] == [(o.domain, o.version) for o in m.opset_import]
    assert {p.key: p.value for p in out.metadata_props} == {"author": "me", "license": "none"}
    onnx.checker.check_model(out, full_check=True)
    assert_same_outputs(m, out, FEED, rel=0)


def dims(value_info):
    return [d.dim_param or d.dim_value for d in value_info.type.tensor_type.shape.dim]


def test_symbolic_batch_survives_round_trip_and_compress():
    m = conv_bn_model()
    out = Graph.from_model(m).to_model()
    assert dims(out.graph.input[0]) == ["N", 4, 8, 8]
    assert dims(out.graph.output[0]) == ["N", 6, 8, 8]
    slim, _ = onnxslim_cnn.compress(m)
    assert dims(slim.graph.input[0]) == ["N", 4, 8, 8]
    assert dims(slim.graph.output[0]) == ["N", 6, 8, 8]


def test_constant_nodes_become_initializers():
    w = np.arange(6, dtype=np.float32).reshape(2, 3)
    nodes = [
        h.make_node("Constant", [], ["cw"], value=onnx.numpy_helper.from_array(w, "ignored")),
        h.make_node("Add", ["x", "cw"], ["a"]),
        h.make_node("Constant", [], ["s"], value_float=2.5),
        h.make_node("Mul", ["a", "s"], ["b"]),
        h.make_node("Constant", [], ["shape"], value_ints=[3, 2]),
        h.make_node("Reshape", ["b", "shape"], ["y"]),
    ]
    m = make_model(nodes, [vi("x", [2, 3])], [vi("y", [3, 2])])
    g = Graph.from_model(m)
    assert [n.op for n in g.nodes] == ["Add", "Mul", "Reshape"]
    out = g.to_model()
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in out.graph.initializer}
    np.testing.assert_array_equal(inits["cw"], w)
    assert inits["s"].dtype == np.float32 and inits["s"].shape == () and inits["s"] == 2.5
    assert inits["shape"].dtype == np.int64 and inits["shape"].tolist() == [3, 2]
    onnx.checker.check_model(out, full_check=True)
    feed = {"x": np.ones((2, 3), np.float32)}
    np.testing.assert_array_equal(run(m, feed)[0], run(out, feed)[0])


def relu_identity_model(extra_consumer=False):
    nodes = [h.make_node("Relu", ["x"], ["r"], name="relu"), h.make_node("Identity", ["r"], ["y"], name="id")]
    outputs = [vi("y", ["N", 4, 8, 8])]
    if extra_consumer:
        nodes.append(h.make_node("Sigmoid", ["r"], ["z"], name="sig"))
        outputs.append(vi("z", ["N", 4, 8, 8]))
    return make_model(nodes, [vi("x", ["N", 4, 8, 8])], outputs)


@pytest.mark.parametrize("extra_consumer", [False, True])
def test_bypass_of_node_feeding_graph_output_keeps_name(extra_consumer):
    m = relu_identity_model(extra_consumer)
    g = Graph.from_model(m)
    ident = next(n for n in g.nodes if n.op == "Identity")
    assert g.bypass(ident)
    g.remove_unused()
    out = g.to_model()
    assert [o.name for o in out.graph.output] == [o.name for o in m.graph.output]
    assert dims(out.graph.output[0]) == ["N", 4, 8, 8]
    assert "Identity" not in [n.op_type for n in out.graph.node]
    onnx.checker.check_model(out, full_check=True)
    assert_same_outputs(m, out, FEED, rel=0)


def test_bypass_refuses_when_input_is_graph_input():
    m = make_model([h.make_node("Identity", ["x"], ["y"])], [vi("x", [2])], [vi("y", [2])])
    g = Graph.from_model(m)
    assert not g.bypass(g.nodes[0])
    assert g.to_model().SerializeToString(deterministic=True) == Graph.from_model(m).to_model().SerializeToString(
        deterministic=True)


def test_bypass_internal_node_rewires_consumers():
    nodes = [h.make_node("Relu", ["x"], ["r"]), h.make_node("Identity", ["r"], ["i"]),
             h.make_node("Sigmoid", ["i"], ["y"])]
    m = make_model(nodes, [vi("x", ["N", 4, 8, 8])], [vi("y", ["N", 4, 8, 8])])
    g = Graph.from_model(m)
    assert g.bypass(g.nodes[1])
    g.remove_unused()
    out = g.to_model()
    assert [n.op_type for n in out.graph.node] == ["Relu", "Sigmoid"]
    assert_same_outputs(m, out, FEED, rel=0)


def test_unique_name_is_deterministic():
    m = conv_bn_model()  # tensors x, w, c, g, b, m, v, bn, y; nodes conv, bn, relu

    def names():
        g = Graph.from_model(m)
        return [g.unique_name(hint) for hint in ("w", "w", "conv", "relu", "fresh", "fresh", "w_1")]

    first = names()
    assert first == ["w_1", "w_2", "conv_1", "relu_1", "fresh", "fresh_1", "w_1_1"]
    assert names() == first
    g = Graph.from_model(m)
    c = g.add_constant("w", np.zeros(3, np.float32))
    assert c.name == "w_1"


def old_ir_model():
    """IR version 3 (opset 8): initializers must also be graph inputs; plus a Constant node."""
    m = conv_bn_model()
    m.ir_version = 3
    m.opset_import[0].version = 8
    for t in m.graph.initializer:
        m.graph.input.append(h.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
    m.graph.node.insert(0, h.make_node("Constant", [], ["k"], value=onnx.numpy_helper.from_array(np.ones(1, np.float32))))
    m.graph.node[-1].output[0] = "r"
    m.graph.node.append(h.make_node("Mul", ["r", "k"], ["y"]))
    onnx.checker.check_model(m, full_check=True)
    return m


def test_old_ir_version_lists_initializers_as_inputs():
    m = old_ir_model()
    out = Graph.from_model(m).to_model()
    assert out.ir_version == 3
    onnx.checker.check_model(out, full_check=True)
    assert [i.name for i in out.graph.input][0] == "x"
    assert {i.name for i in out.graph.input} == {"x"} | {t.name for t in out.graph.initializer}
    slim, report = onnxslim_cnn.compress(m)
    assert report.passes[0].status == "ok"  # new initializers (folded BN) are listed too
    assert "BatchNormalization" not in report.output.op_counts
    onnx.checker.check_model(slim, full_check=True)
    assert_same_outputs(m, slim, FEED)
