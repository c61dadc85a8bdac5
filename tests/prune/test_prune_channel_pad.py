"""`prune` on residual models whose shortcut zero-pads or slices the channel axis (issue 16, item 3).

The CIFAR ResNet-20 (option-A shortcut: Slice ::2 on H, W, then Pad on the channel axis) and
PP-OCR's direction classifier (Paddle's conv biases as ``Add(conv, Reshape(bias))``) used to come
out of prune invalid ("Incompatible dimensions" at the residual / bias Add) and be reverted. Each
pruned model must pass the checker with ``full_check``, load and run in ONNX Runtime with the
original output shapes, and cost fewer MACs; with channels zeroed first, prune of the zeroed
channels must keep the outputs.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from graphs import init, make_model, vi, zero_units
from onnx import helper as h

import onnxslim_cnn
from onnxslim_cnn.analysis.channels import analyze
from onnxslim_cnn.graph import Graph
from onnxslim_cnn.models import reference
from onnxslim_cnn.sessions import make_session

CIFAR = {"width": 0.5, "input_size": 32, "num_classes": 10}


def _calib(shape, n=8, seed=0):
    return np.random.default_rng(seed).standard_normal((n, *shape)).astype(np.float32)


def assert_valid(model: onnx.ModelProto, out: onnx.ModelProto, feeds: dict) -> list[np.ndarray]:
    """checker full_check, ORT load and run, output shapes of the original; returns the outputs."""
    onnx.checker.check_model(out, full_check=True)
    got = make_session(out).run(None, feeds)
    ref = make_session(model).run(None, feeds)
    assert [g.shape for g in got] == [r.shape for r in ref]
    return got


def _pads(model: onnx.ModelProto) -> dict[str, list[int]]:
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
    return {n.name: inits[n.input[1]].tolist() for n in model.graph.node if n.op_type == "Pad"}


# --------------------------------------------------------------------------- the CIFAR ResNet


def test_channel_padding_couples_the_padded_channels():
    """The Pad's zero channels get ids of their own that the residual Add couples with the other
    branch; the channels that come through it join the previous stage's stream: one group."""
    model = reference.build("resnet20_cifar", **CIFAR)
    a = analyze(Graph.from_model(model))
    stream = a.group_of("layer3.0.conv2")
    assert stream is a.group_of("layer2.0.conv2") is a.group_of("conv1")  # coupled through both Pads
    assert stream.channels == 32 and not stream.frozen_units
    pad = next(n for n in Graph.from_model(model).nodes if n.op == "Pad" and n.name == "layer3.0.shortcut.pad")
    ids = a.info[pad.outputs[0].name].ids
    assert len(ids) == 32 and np.array_equal(ids[8:24], a.info[pad.inputs[0].name].ids)


@pytest.mark.parametrize("protect_first", [True, False])
@pytest.mark.parametrize("ratio", [0.3, 0.5])
def test_cifar_resnet_prunes_validly(ratio, protect_first):
    model = reference.build("resnet20_cifar", **CIFAR)
    x = _calib((3, 32, 32))
    out, report = onnxslim_cnn.compress(model, passes=["prune"], calib={"input": x}, prune__ratio=ratio,
                                        prune__protect_first=protect_first)
    rec = report.passes[0]
    assert rec.status == "ok", rec.status
    assert_valid(model, out, {"input": x[:2]})
    assert report.output.macs < report.input.macs and report.output.params < report.input.params
    pads = _pads(out)
    assert set(pads) == {"layer2.0.shortcut.pad", "layer3.0.shortcut.pad"}
    if protect_first:  # the stem's stream, through both Pads, is one protected group
        assert "protected layer" in [s["reason"] for s in rec.skipped]
        assert pads == _pads(model)
    else:  # the stream is pruned too: its padded channels by padding fewer
        assert sum(map(sum, pads.values())) < sum(map(sum, _pads(model).values()))


def test_cifar_resnet_zeroed_channels_pruned_exactly():
    model = reference.build("resnet20_cifar", **CIFAR)
    assert zero_units(model, 0.3, seed=1) > 0
    x = _calib((3, 32, 32))
    out, report = onnxslim_cnn.compress(model, passes=["prune"], calib={"input": x}, prune__zero_only=True,
                                        prune__protect_first=False)
    assert report.passes[0].status == "ok" and report.passes[0].stats["channels_removed"] > 0
    assert sum(map(sum, _pads(out).values())) < sum(map(sum, _pads(model).values()))  # some padded ones went
    got, ref = assert_valid(model, out, {"input": x})[0], make_session(model).run(None, {"input": x})[0]
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4 * float(np.abs(ref).max()))
    assert report.output.macs < report.input.macs


# --------------------------------------------------------------------------- the rules, one by one


def _residual(shortcut_nodes, shortcut_inits, c_out=8):
    """x -> conv a (4 ch) -> relu -> r; conv b (c_out) of r; y = b + shortcut(r) -> conv c."""
    rng = np.random.default_rng(5)
    nodes = [h.make_node("Conv", ["x", "wa"], ["a"], name="a", pads=[1] * 4), h.make_node("Relu", ["a"], ["r"]),
             h.make_node("Conv", ["r", "wb"], ["b"], name="b", pads=[1] * 4), *shortcut_nodes,
             h.make_node("Add", ["b", "s"], ["y0"], name="add"), h.make_node("Relu", ["y0"], ["y1"]),
             h.make_node("Conv", ["y1", "wc"], ["y"], name="c")]
    inits = [init("wa", rng.normal(size=(4, 3, 3, 3))), init("wb", rng.normal(size=(c_out, 4, 3, 3))),
             init("wc", rng.normal(size=(5, c_out, 1, 1))), *shortcut_inits]
    return make_model(nodes, [vi("x", ["N", 3, 8, 8])], [vi("y", ["N", 5, 8, 8])], inits)


@pytest.mark.parametrize("kind,frozen_by", [
    ("pad_constant", None),
    ("pad_reflect", "reflect padding of the channel axis copies channels (Pad"),
    ("slice_step2", "Slice with step 2 on the channel axis (Slice"),
    ("slice_step1", None),
])
def test_pad_and_slice_on_the_channel_axis(kind, frozen_by):
    """Constant padding couples; a stepped slice or a reflecting pad freeze, and the report names the op."""
    def i64(name, v):
        return init(name, np.asarray(v, np.int64))

    if kind.startswith("pad"):
        mode = kind.split("_")[1]
        sc = [h.make_node("Pad", ["r", "pads"], ["s"], name="pad", mode=mode)]
        inits = [i64("pads", [0, 2, 0, 0, 0, 2, 0, 0])]
        c_out = 8
    else:
        step = int(kind[-1])
        sc = [h.make_node("Slice", ["r", "st", "en", "ax", "sp"], ["s"], name="slice")]
        inits = [i64("st", [0]), i64("en", [4]), i64("ax", [1]), i64("sp", [step])]
        c_out = 2 if step == 2 else 4
    model = _residual(sc, inits, c_out)
    onnx.checker.check_model(model, full_check=True)
    x = {"x": _calib((3, 8, 8))}
    for ratio in (0.3, 0.5):
        out, report = onnxslim_cnn.compress(model, passes=["prune"], calib=x, prune__ratio=ratio,
                                            prune__protect_first=False)
        rec = report.passes[0]
        assert rec.status == "ok", rec.status
        assert_valid(model, out, x)
        reasons = [s["reason"] for s in rec.skipped]
        if frozen_by:
            assert any(frozen_by in r for r in reasons), reasons
        else:
            assert report.output.macs < report.input.macs


def test_untracked_operand_freezes_the_tracked_one():
    """An Add of a conv and a tensor the analysis cannot follow (here a Reshape of a graph input)
    must not prune the conv: the other side keeps its channel count."""
    rng = np.random.default_rng(7)
    nodes = [h.make_node("Conv", ["x", "w"], ["c"], name="conv"),
             h.make_node("Reshape", ["z", "shape"], ["zr"], name="zr"),
             h.make_node("Add", ["c", "zr"], ["s"], name="add"),
             h.make_node("Conv", ["s", "w2"], ["y"], name="conv2")]
    model = make_model(nodes, [vi("x", ["N", 3, 4, 4]), vi("z", ["N", 96])], [vi("y", ["N", 2, 4, 4])],
                       [init("w", rng.normal(size=(6, 3, 1, 1))), init("w2", rng.normal(size=(2, 6, 1, 1))),
                        init("shape", np.array([-1, 6, 4, 4], np.int64))])
    a = analyze(Graph.from_model(model))
    assert a.group_of("conv").frozen.startswith("combined with zr")
    assert "(Add add)" in a.group_of("conv").frozen


# --------------------------------------------------------------------------- PP-OCR direction classifier


@pytest.mark.corpus
@pytest.mark.parametrize("ratio", [0.3, 0.5])
def test_ppocr_cls_v2_prunes_validly(corpus_paths, ratio):
    """Was reverted at 0.5 ("Add@2 Incompatible dimensions"): the SE convs' biases are
    Reshape(bias, [1, C, 1, 1]) tensors the analysis did not follow, so an SE conv lost channels
    that its bias kept. prune folds them into constants (and freezes what it still cannot follow)."""
    from onnxslim_cnn.models import tasks

    path = str(corpus_paths["ppocr_cls_v2"])
    model = onnx.load(path)
    calib = tasks.sample_inputs("ppocr_cls_v2", 4)
    out, report = onnxslim_cnn.compress(path, passes=["prune"], calib=calib, prune__ratio=ratio)
    rec = report.passes[0]
    assert rec.status == "ok", rec.status
    assert rec.stats["constants_folded"] == 18 and rec.stats["channels_removed"] > 0
    assert_valid(model, out, {"x": calib["x"][:2]})
    assert report.output.macs < 0.85 * report.input.macs  # measured: 16.3M -> 9.9M (0.3), 6.0M (0.5)


@pytest.mark.corpus
def test_ppocr_cls_v2_zeroed_channels_pruned_exactly(corpus_paths):
    from onnxslim_cnn.models import tasks

    from onnxslim_cnn.model_io import constants_to_initializers

    model = onnx.load(str(corpus_paths["ppocr_cls_v2"]))
    constants_to_initializers(model)  # Paddle's weights are Constant nodes
    assert zero_units(model, 0.3, seed=2) > 0
    calib = tasks.sample_inputs("ppocr_cls_v2", 4)
    out, report = onnxslim_cnn.compress(model, passes=["prune"], calib=calib, prune__zero_only=True,
                                        prune__protect_first=False)
    assert report.passes[0].status == "ok" and report.passes[0].stats["channels_removed"] > 0
    assert report.output.macs < report.input.macs
    got = assert_valid(model, out, calib)[0]
    ref = make_session(model).run(None, calib)[0]
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-5)
