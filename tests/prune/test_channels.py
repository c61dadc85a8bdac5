"""Channel dependency analysis on small graphs: what is coupled, what is frozen and why."""

import numpy as np
from onnx import helper as h

from graphs import init, make_model, vi
from onnxslim_cnn.analysis.channels import analyze
from onnxslim_cnn.graph import Graph

RNG = np.random.default_rng(0)


def conv(name, x, y, cin, cout, k=1, group=1, pads=None):
    w = init(f"{name}.w", RNG.normal(size=(cout, cin // group, k, k)))
    node = h.make_node("Conv", [x, f"{name}.w"], [y], name=name, group=group, pads=pads or [k // 2] * 4)
    return node, w


def build(nodes_inits, x_shape, out_name, out_shape):
    nodes = [n for n, _ in nodes_inits]
    inits = [w for _, w in nodes_inits if w is not None]
    return make_model(nodes, [vi("x", x_shape)], [vi(out_name, out_shape)], inits)


def groups_by_producers(a):
    return {tuple(sorted(g.producers)): g for g in a.groups}


def test_residual_add_couples_and_output_freezes():
    parts = [conv("c1", "x", "a", 4, 8), conv("c2", "a", "b", 8, 8), (h.make_node("Add", ["a", "b"], ["s"]), None),
             conv("c3", "s", "y", 8, 6)]
    a = analyze(Graph.from_model(build(parts, ["N", 4, 8, 8], "y", ["N", 6, 8, 8])))
    g = groups_by_producers(a)
    assert set(g) == {("c1", "c2"), ("c3",)}
    assert g[("c1", "c2")].channels == 8 and not g[("c1", "c2")].frozen
    assert g[("c3",)].frozen == "feeds graph output y"
    # groups are numbered in the order of their first producer, members in producer order
    assert [(grp.index, grp.producers) for grp in a.groups] == [(0, ["c1", "c2"]), (1, ["c3"])]


def test_concat_offsets_split_and_flatten_blocks():
    parts = [conv("c1", "x", "a", 4, 3), conv("c2", "x", "b", 4, 5), (h.make_node("Concat", ["a", "b"], ["cat"], axis=1), None),
             (h.make_node("Flatten", ["cat"], ["f"], axis=1), None),
             (h.make_node("Gemm", ["f", "fw"], ["y"], transB=1), init("fw", RNG.normal(size=(10, 8 * 16))))]
    a = analyze(Graph.from_model(build(parts, ["N", 4, 4, 4], "y", ["N", 10])))
    ids_a, ids_b = a.producers["c1"].ids, a.producers["c2"].ids
    assert list(a.info["cat"].ids) == list(ids_a) + list(ids_b)
    # one conv channel = a block of 16 FC input features
    assert list(a.info["f"].ids) == list(np.repeat(np.concatenate([ids_a, ids_b]), 16))


def test_depthwise_couples_in_and_out_and_se_mul_couples():
    parts = [conv("c1", "x", "a", 4, 8), conv("dw", "a", "d", 8, 8, k=3, group=8),
             (h.make_node("GlobalAveragePool", ["d"], ["p"]), None), conv("fc1", "p", "q", 8, 2),
             (h.make_node("Relu", ["q"], ["qr"]), None), conv("fc2", "qr", "e", 2, 8),
             (h.make_node("HardSigmoid", ["e"], ["es"]), None), (h.make_node("Mul", ["d", "es"], ["m"]), None),
             conv("c3", "m", "y", 8, 6)]
    a = analyze(Graph.from_model(build(parts, ["N", 4, 8, 8], "y", ["N", 6, 8, 8])))
    g = groups_by_producers(a)
    assert ("c1", "fc2") in g  # the SE expand conv is tied to the feature map it scales
    assert "dw" not in a.producers  # depthwise passes channels through
    assert g[("c1", "fc2")].channels == 8 and ("fc1",) in g


def test_unknown_op_and_channel_softmax_freeze_with_the_op_named():
    parts = [conv("c1", "x", "a", 4, 8), (h.make_node("Softmax", ["a"], ["s"], axis=1), None), conv("c2", "s", "y", 8, 6)]
    a = analyze(Graph.from_model(build(parts, ["N", 4, 8, 8], "y", ["N", 6, 8, 8])))
    assert groups_by_producers(a)[("c1",)].frozen == "normalises over the channel axis (Softmax s)"
    parts[1] = (h.make_node("TopK", ["a", "k"], ["s", "idx"], axis=1), init("k", np.array([8], np.int64)))
    a = analyze(Graph.from_model(build(parts, ["N", 4, 8, 8], "y", ["N", 6, 8, 8])))
    assert groups_by_producers(a)[("c1",)].frozen == "not understood (TopK s)"


def test_grouped_conv_couples_positions_across_groups():
    parts = [conv("c1", "x", "a", 4, 8), conv("g2", "a", "b", 8, 12, group=2), conv("c3", "b", "y", 12, 6)]
    a = analyze(Graph.from_model(build(parts, ["N", 4, 8, 8], "y", ["N", 6, 8, 8])))
    g = groups_by_producers(a)
    assert g[("c1",)].channels == 4  # 8 channels in 4 units: channel k and k+4 go together
    assert sorted(len(v) for v in g[("c1",)].unit_ids.values()) == [2, 2, 2, 2]
    assert len(g[("g2",)].units) == 6
    assert list(a.root(a.producers["c1"].ids[:4])) == list(a.root(a.producers["c1"].ids[4:]))


def test_fixed_weight_conv_freezes():
    dfl = init("dfl.w", np.arange(16, dtype=np.float32).reshape(1, 16, 1, 1))
    parts = [conv("c1", "x", "a", 4, 16), (h.make_node("Softmax", ["a"], ["sm"], axis=2), None),
             (h.make_node("Conv", ["sm", "dfl.w"], ["y"], name="dfl"), dfl)]
    a = analyze(Graph.from_model(build(parts, ["N", 4, 8, 8], "y", ["N", 1, 8, 8])))
    assert "dfl" not in a.producers
    assert "fixed-weight conv" in groups_by_producers(a)[("c1",)].frozen


def test_split_halves_then_concat_back_c2f():
    parts = [conv("c1", "x", "a", 4, 8), (h.make_node("Split", ["a", "sz"], ["s0", "s1"], axis=1), init("sz", np.array([4, 4], np.int64))),
             conv("c2", "s1", "b", 4, 4, k=3), (h.make_node("Concat", ["s0", "s1", "b"], ["cat"], axis=1), None),
             conv("c3", "cat", "y", 12, 6)]
    a = analyze(Graph.from_model(build(parts, ["N", 4, 8, 8], "y", ["N", 6, 8, 8])))
    ids = a.producers["c1"].ids
    assert list(a.info["cat"].ids) == list(ids[:4]) + list(ids[4:]) + list(a.producers["c2"].ids)
