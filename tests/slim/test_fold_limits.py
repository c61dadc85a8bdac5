"""slim's constant folding never evaluates a node whose output would exceed fold_size_limit_mb.

gs's ``size_threshold`` only drops a folded value after ONNX Runtime computed it, and a node
inside a foldable chain is computed even when only the chain's small end is kept: a
ConstantOfShape of [60000, 60000] took slim to 24 GB. The sizes are estimated first; nodes over
the limit stay, the pass reports them as skipped, and ORT's log lines stay off stderr.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import onnxruntime as ort
import pytest
from onnx import helper as h
from onnx import numpy_helper as nh

from graphs import assert_same_outputs, init, make_model, vi
from onnxslim_cnn.context import PassContext
from onnxslim_cnn.graph import Graph
from onnxslim_cnn.passes.slim import SlimPass
from onnxslim_cnn.passes.slim import slim as slim_mod

ONE = nh.from_array(np.array([1.0], np.float32))


def _slim(model, **options):
    g = Graph.from_model(model)
    result = SlimPass(**options).run(g, PassContext(model))
    return g.to_model(), result


@pytest.fixture
def evaluated(monkeypatch):
    """The op types of every model ONNX Runtime is asked to load while the test runs."""
    seen: list[list[str]] = []
    real = ort.InferenceSession

    def session(model, *args, **kw):
        m = onnx.load_from_string(model) if isinstance(model, bytes) else onnx.load(model)
        ops = [n.op_type for n in m.graph.node]
        for n in m.graph.node:
            for a in n.attribute:
                if a.type == onnx.AttributeProto.GRAPH:
                    ops += [x.op_type for x in a.g.node]
        seen.append(ops)
        return real(model, *args, **kw)

    monkeypatch.setattr(ort, "InferenceSession", session)
    return seen


def constant_of_shape_model(shape_nodes, shape_name="shape", inits=()):
    nodes = list(shape_nodes) + [
        h.make_node("ConstantOfShape", [shape_name], ["big"], name="big", value=ONE),
        h.make_node("ReduceSum", ["big"], ["s"], keepdims=0),
        h.make_node("Add", ["x", "s"], ["y"])]
    return make_model(nodes, [vi("x", [1, 4])], [vi("y", [1, 4])], list(inits))


def test_node_over_the_limit_is_never_evaluated(evaluated):
    m = constant_of_shape_model([], inits=[init("shape", np.array([1024, 1024], np.int64))])  # 4 MiB
    out, result = _slim(m, fold_size_limit_mb=1)
    assert not any("ConstantOfShape" in ops for ops in evaluated)
    assert [n.op_type for n in out.graph.node] == ["ConstantOfShape", "ReduceSum", "Add"]
    assert result.skipped == [{"item": "big", "reason": "not folded: its output 'big' would take 4.0 MiB (1024x1024), "
                                                        "over the 1 MiB limit (fold_size_limit_mb); it is left to run "
                                                        "time"}]
    # under the (default 64 MiB) limit the same chain folds into one constant
    folded, result = _slim(m)
    assert [n.op_type for n in folded.graph.node] == ["Add"] and result.skipped == []
    assert_same_outputs(m, folded, {"x": np.ones((1, 4), np.float32)})


@pytest.mark.parametrize("op", ["Expand", "Tile", "Range"])
def test_other_value_sized_ops(op, evaluated):
    """4 MiB from tiny constants: Expand to [1024, 1024], Tile of [1, 1024] by [1024, 1], Range to 2**20."""
    if op == "Expand":
        node, inits = h.make_node("Expand", ["v", "shape"], ["big"], name="big"), [
            init("v", np.ones(1, np.float32)), init("shape", np.array([1024, 1024], np.int64))]
    elif op == "Tile":
        node, inits = h.make_node("Tile", ["v", "reps"], ["big"], name="big"), [
            init("v", np.ones((1, 1024), np.float32)), init("reps", np.array([1024, 1], np.int64))]
    else:
        node, inits = h.make_node("Range", ["start", "limit", "delta"], ["big"], name="big"), [
            init("start", np.float32(0)), init("limit", np.float32(1 << 20)), init("delta", np.float32(1))]
    m = make_model([node, h.make_node("ReduceSum", ["big"], ["s"], keepdims=0), h.make_node("Add", ["x", "s"], ["y"])],
                   [vi("x", [1, 4])], [vi("y", [1, 4])], inits)
    out, result = _slim(m, fold_size_limit_mb=1)
    assert not any(op in ops for ops in evaluated)
    assert [n.op_type for n in out.graph.node] == [op, "ReduceSum", "Add"]
    assert [s["item"] for s in result.skipped] == ["big"] and "would take 4.0 MiB" in result.skipped[0]["reason"]
    folded, result = _slim(m)
    assert [n.op_type for n in folded.graph.node] == ["Add"]
    assert_same_outputs(m, folded, {"x": np.ones((1, 4), np.float32)})


def test_shape_from_folded_nodes(evaluated):
    """The shape comes from Concat of constants: the size is known from data propagation (or once
    the Concat is folded), so the big node is still never evaluated and a small one folds."""
    big = constant_of_shape_model([h.make_node("Concat", ["a", "b"], ["shape"], axis=0)],
                                  inits=[init("a", np.array([60000], np.int64)), init("b", np.array([60000], np.int64))])
    out, result = _slim(big)
    assert not any("ConstantOfShape" in ops for ops in evaluated)
    assert [n.op_type for n in out.graph.node] == ["ConstantOfShape", "ReduceSum", "Add"]
    assert [s["reason"] for s in result.skipped] == [
        "not folded: its output 'big' would take 13.4 GiB (60000x60000), over the 64 MiB limit (fold_size_limit_mb); "
        "it is left to run time"]
    small = constant_of_shape_model([h.make_node("Concat", ["a", "b"], ["shape"], axis=0)],
                                    inits=[init("a", np.array([3], np.int64)), init("b", np.array([5], np.int64))])
    out, result = _slim(small)
    assert [n.op_type for n in out.graph.node] == ["Add"] and result.skipped == []
    assert_same_outputs(small, out, {"x": np.ones((1, 4), np.float32)})


def test_if_bodies_are_guarded_and_still_folded(evaluated):
    one = h.make_node("ConstantOfShape", ["shp"], ["big"], name="big", value=ONE)
    then = h.make_graph([one, h.make_node("ReduceSum", ["big"], ["s"], keepdims=0),
                         h.make_node("Add", ["c1", "c1"], ["c2"]),  # foldable, small
                         h.make_node("Add", ["x", "s"], ["t0"]), h.make_node("Add", ["t0", "c2"], ["t"])],
                        "then", [], [vi("t", [1, 4])])
    other = h.make_graph([h.make_node("Identity", ["x"], ["e"])], "else", [], [vi("e", [1, 4])])
    m = make_model([h.make_node("ReduceMax", ["x"], ["mx"], keepdims=0),
                    h.make_node("Greater", ["mx", "zero"], ["cond"]),
                    h.make_node("If", ["cond"], ["y"], then_branch=then, else_branch=other)],
                   [vi("x", [1, 4])], [vi("y", [1, 4])],
                   [init("shp", np.array([60000, 60000], np.int64)), init("zero", np.float32(0)),
                    init("c1", np.ones(4, np.float32))])
    out, result = _slim(m)
    assert not any("ConstantOfShape" in ops for ops in evaluated)
    body = next(a.g for a in out.graph.node[-1].attribute if a.name == "then_branch")
    assert [n.op_type for n in body.node] == ["ConstantOfShape", "ReduceSum", "Add", "Add"]  # c1 + c1 folded
    assert [s["item"] for s in result.skipped] == ["big"]


def test_fold_blocker_sizes():
    value = {"value": nh.from_array(np.array([0], np.int32))}
    var = gs.Variable("shape", dtype=np.int64, shape=None)  # a value not known before evaluation
    node = gs.Node("ConstantOfShape", "n", dict(value), inputs=[var], outputs=[gs.Variable("o")])
    assert "makes its output size from input values" in slim_mod.fold_blocker(node, 1 << 20)
    const = gs.Constant("shape", np.array([1024, 512], np.int64))  # int32: 2 MiB, from a one-node inference
    node = gs.Node("ConstantOfShape", "n", dict(value), inputs=[const], outputs=[gs.Variable("o")])
    assert slim_mod.fold_blocker(node, 2 << 20) is None
    assert "would take 2.0 MiB (1024x512)" in slim_mod.fold_blocker(node, (2 << 20) - 1)
    # a size-preserving op of unknown output shape is not held back
    node = gs.Node("Relu", "r", {}, inputs=[gs.Variable("a")], outputs=[gs.Variable("b")])
    assert slim_mod.fold_blocker(node, 0) is None


def test_failed_folds_keep_ort_quiet(capfd):
    """A constant Gather ORT cannot evaluate (index out of range): gs's own session fails, and
    nothing of ORT's reaches stderr."""
    m = make_model([h.make_node("Gather", ["table", "idx"], ["row"], axis=0),
                    h.make_node("Add", ["x", "row"], ["y"])],
                   [vi("x", [1, 4])], [vi("y", [1, 4])],
                   [init("table", np.ones((3, 4), np.float32)), init("idx", np.array([7], np.int64))])
    capfd.readouterr()
    out, _ = _slim(m)
    assert capfd.readouterr().err == ""
    assert "Gather" in [n.op_type for n in out.graph.node]
