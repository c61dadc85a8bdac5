"""The Python API: compress(), the report, options checking, Pass.apply, reverting a broken pass, determinism."""

import json
import os
import subprocess
import sys

import numpy as np
import onnx
import pytest
from onnx import helper as h

import onnxslim_cnn
from graphs import assert_same_outputs, conv_bn_model, relu_swapping_pass, user_error
from onnxslim_cnn import GraphPass, PassResult, Report, pass_infra, register_pass
from onnxslim_cnn.passes import SlimPass

FEED = {"x": np.random.default_rng(5).standard_normal((2, 4, 8, 8)).astype(np.float32)}
CALIB = {"x": np.random.default_rng(6).standard_normal((3, 4, 8, 8)).astype(np.float32)}


@pytest.fixture
def temp_pass():
    """Register throwaway passes for one test and remove them afterwards."""
    added = []

    def add(cls):
        register_pass(cls)
        added.append(cls.name)
        return cls

    yield add
    for name in added:
        del pass_infra._REGISTRY[name]


# --------------------------------------------------------------------------- compress


def test_compress_path_with_dict_calib_and_flat_option(model_path):
    model, report = onnxslim_cnn.compress(str(model_path), passes=["slim"], calib=CALIB, slim__cse=False)
    assert isinstance(model, onnx.ModelProto) and isinstance(report, Report)
    onnx.checker.check_model(model, full_check=True)
    assert_same_outputs(conv_bn_model(), model, FEED)
    [rec] = report.passes
    assert rec.name == "slim" and rec.status == "ok" and rec.changed
    assert rec.options["cse"] is False and rec.options["fold_batchnorm"] is True
    assert rec.stats.get("folded_batchnorm") == 1
    assert report.calibration == "arrays"
    assert report.warnings == []  # real samples: no random-data warning
    assert report.input.op_counts == {"BatchNormalization": 1, "Conv": 1, "Relu": 1}
    assert report.output.op_counts == {"Conv": 1, "Relu": 1}
    assert report.input.macs == report.output.macs == 6 * 64 * 4 * 9
    assert report.output.params == 6 * 4 * 9 + 6 < report.input.params
    assert report.fidelity["y"]["rel_error"] < 1e-5 and report.latency is None


def test_compress_proto_with_npz_calib_and_options_dict(tmp_path):
    p = tmp_path / "c.npz"
    np.savez(p, **CALIB)
    model, report = onnxslim_cnn.compress(conv_bn_model(), calib=str(p), options={"slim": {"fold_batchnorm": False}})
    assert report.calibration == f"file:{p}"
    assert report.passes[0].options["fold_batchnorm"] is False
    assert "BatchNormalization" in report.output.op_counts
    assert_same_outputs(conv_bn_model(), model, FEED)


def test_report_dict_and_json(model_path):
    _, report = onnxslim_cnn.compress(model_path, bench=True)
    d = report.to_dict()
    assert list(d) == ["input", "output", "passes", "fidelity", "fidelity_data", "latency", "calibration", "budget",
                       "warnings", "problems"]
    assert d["problems"] == []
    assert d["fidelity_data"] == {"set": "fit", "samples": 8, "source": "random(seed=0, samples=8)",
                                  "text": "fidelity is measured on the data the passes fit on (8 samples of "
                                          "random(seed=0, samples=8); 16 or more samples are needed to hold some out)"}
    assert d["calibration"] == "random(seed=0, samples=8)"
    assert any("no --calib given" in w for w in d["warnings"])
    assert d["input"]["nodes"] == 3 and d["output"]["nodes"] == 2
    assert set(d["passes"][0]) == {"name", "options", "changed", "stats", "changes", "skipped", "seconds",
                                   "status", "nodes_after"}
    assert d["passes"][0]["nodes_after"] == 2
    assert set(d["latency"]) == {"before", "after"} and d["latency"]["before"]["threads"] == 1
    assert json.loads(report.to_json()) == json.loads(json.dumps(d))
    stable = report.to_dict(timings=False)
    assert "seconds" not in stable["passes"][0] and stable["latency"] is None
    assert set(d["fidelity"]["y"]) == {"max_abs_error", "rel_error", "cosine", "cosine_min"}
    table = report.format_table()
    assert "parameters" in table and "Fidelity" in table and "Latency" in table


def test_compress_dynamic_spatial_dims_without_shapes_still_cleans_up():
    m = conv_bn_model()
    for vinfo in (m.graph.input[0], m.graph.output[0]):
        vinfo.type.tensor_type.shape.dim[2].dim_param = "H"
        vinfo.type.tensor_type.shape.dim[3].dim_param = "W"
    model, report = onnxslim_cnn.compress(m)
    assert report.output.op_counts == {"Conv": 1, "Relu": 1}
    assert report.calibration is None and report.fidelity is None
    assert any("MACs, fidelity and latency not measured" in w and "--input-shape x=" in w for w in report.warnings)
    _, report = onnxslim_cnn.compress(m, input_shapes={"x": (1, 4, 8, 8)})
    assert report.input.macs == 6 * 64 * 4 * 9 and report.fidelity["y"]["rel_error"] < 1e-5


@pytest.mark.parametrize("kwargs, expect", [
    ({"cse": False}, "unknown argument 'cse' (pass options are written PASS__OPTION, e.g. slim__cse=False)"),
    ({"slim__bogus": 1}, "unknown option 'slim.bogus' (options of slim: "),
    ({"slim__max_rounds": 0}, "bad value for slim.max_rounds: 0"),
    ({"nopass__x": 1}, "unknown pass 'nopass' (available: "),
    ({"passes": ["nopass"]}, "unknown pass 'nopass' (available: "),
    ({"calib": {"x": np.zeros((2, 4, 8))}}, "calib arrays: array 'x' has shape (2, 4, 8), the model input has rank 4"),
])
def test_bad_arguments(kwargs, expect):
    assert user_error(onnxslim_cnn.compress, conv_bn_model(), **kwargs).startswith(expect)


def test_bad_model_sources(tmp_path):
    assert user_error(onnxslim_cnn.compress, tmp_path / "missing.onnx").startswith("input model not found")
    assert user_error(onnxslim_cnn.compress, 42) == "expected a path or onnx.ModelProto, got int"


def test_options_for_pass_not_in_list(temp_pass):
    @temp_pass
    class Noop(GraphPass):
        name = "_test_noop"

        def run(self, graph, ctx):
            return PassResult()

    msg = user_error(onnxslim_cnn.compress, conv_bn_model(), passes=["slim"], _test_noop__x=1)
    assert msg == "options given for pass '_test_noop', which is not in the pass list"
    msg = user_error(onnxslim_cnn.compress, conv_bn_model(), passes=[SlimPass()], slim__cse=False)
    assert msg == "options given for pass 'slim', which is not in the pass list"
    model, report = onnxslim_cnn.compress(conv_bn_model(), passes=["_test_noop", "slim"])
    assert [p.name for p in report.passes] == ["_test_noop", "slim"] and not report.passes[0].changed


# --------------------------------------------------------------------------- passes


def test_pass_apply_standalone(model_path):
    src = conv_bn_model()
    before = src.SerializeToString()
    model, result = SlimPass(cse=False).apply(src)
    assert src.SerializeToString() == before
    assert isinstance(result, PassResult) and result.changed and result.stats["folded_batchnorm"] == 1
    assert SlimPass(cse=False).options.cse is False
    onnx.checker.check_model(model, full_check=True)
    assert_same_outputs(src, model, FEED)
    from_path, _ = SlimPass({"cse": False}).apply(model_path)
    assert from_path.SerializeToString(deterministic=True) == model.SerializeToString(deterministic=True)
    again, result = SlimPass().apply(model)
    assert not result.changed and again.SerializeToString() == model.SerializeToString()
    assert user_error(SlimPass, cse="maybe") == "bad value for slim.cse: 'maybe' (expected true or false)"


def test_pass_that_breaks_the_model_is_reverted(temp_pass):
    temp_pass(relu_swapping_pass("_test_break", "NoSuchOp"))
    src = conv_bn_model()
    model, report = onnxslim_cnn.compress(src, passes=["_test_break"])
    rec = report.passes[0]
    assert rec.changed and rec.status.startswith("reverted: ")
    assert "NoSuchOp" in rec.status and "\n" not in rec.status
    assert rec.nodes_after == 3
    assert model.SerializeToString(deterministic=True) == src.SerializeToString(deterministic=True)
    assert any("_test_break produced an invalid model and was reverted" in w for w in report.warnings)
    assert report.fidelity["y"]["max_abs_error"] == 0.0
    # the passes after it work on the last valid model
    model, report = onnxslim_cnn.compress(src, passes=["_test_break", "slim"])
    assert [p.status for p in report.passes][1] == "ok"
    assert report.output.op_counts == {"Conv": 1, "Relu": 1}


def test_a_pass_that_changes_what_it_does_not_declare_is_dropped(temp_pass):
    """modifies is checked: a weights-only pass that adds a node, and a pass that declares
    nothing but edits a weight, fail with the reason; the model before them is kept."""
    from onnxslim_cnn.graph import Graph

    Grows = temp_pass(relu_swapping_pass("_test_grows", "Sigmoid", modifies={"weights"}))

    @temp_pass
    class Scales(GraphPass):
        name = "_test_scales"

        def run(self, graph, ctx):
            result = PassResult()
            for node in graph.nodes:
                if node.op == "Conv":
                    w = node.inputs[1]
                    w.values = w.values * 2
                    result.change(node.name, "scaled")
            return result

    src = conv_bn_model()
    for name, why in (("_test_grows", "pass _test_grows changed graph but declares it modifies weights"),
                      ("_test_scales", "pass _test_scales changed weights but declares it modifies nothing")):
        model, report = onnxslim_cnn.compress(src, passes=[name])
        rec = report.passes[0]
        assert rec.status == "failed" and rec.skipped[-1]["reason"] == f"pass failed: PassContractError: {why}"
        assert model.SerializeToString(deterministic=True) == src.SerializeToString(deterministic=True)
    # the same edits are accepted when declared
    Grows.modifies = frozenset({"graph"})
    Scales.modifies = frozenset({"weights"})
    for name in ("_test_grows", "_test_scales"):
        _, report = onnxslim_cnn.compress(src, passes=[name])
        assert report.passes[0].status == "ok" and report.passes[0].changed
    # the Graph wrapper's own round trip (Constant nodes become initializers) is no change
    assert pass_infra.changed_aspects(src, Graph.from_model(src).to_model()) == []


def test_model_pass_gets_the_model_and_must_return_one(temp_pass):
    seen = []

    @temp_pass
    class Renames(onnxslim_cnn.ModelPass):
        name = "_test_model_pass"
        modifies = frozenset({"graph"})

        def run(self, model, ctx):
            seen.append(type(model))
            result = PassResult()
            result.change("model", "touched")
            if ctx.seed == 0:
                new = onnx.ModelProto()
                new.CopyFrom(model)
                new.graph.node[-1].name = "renamed"
                result.model = new
            return result

    src = conv_bn_model()
    model, report = onnxslim_cnn.compress(src, passes=["_test_model_pass"])
    assert seen == [onnx.ModelProto] and report.passes[0].status == "ok"
    assert model.graph.node[-1].name == "renamed" and src.graph.node[-1].name != "renamed"
    _, report = onnxslim_cnn.compress(src, passes=["_test_model_pass"], seed=1)
    assert report.passes[0].status == "failed"
    assert "reported changes but returned no model" in report.passes[0].skipped[-1]["reason"]


def test_every_builtin_pass_declares_a_kind_and_known_aspects():
    for name, cls in onnxslim_cnn.available_passes().items():
        assert issubclass(cls, (GraphPass, onnxslim_cnn.ModelPass)), name
        assert set(cls.modifies) <= set(pass_infra.ASPECTS), name
    assert onnxslim_cnn.get_pass("fpga").modifies == frozenset()  # an exporter: the graph stays
    assert issubclass(onnxslim_cnn.get_pass("q8"), onnxslim_cnn.ModelPass)
    with pytest.raises(TypeError, match="unknown aspects"):
        type("Bad", (GraphPass,), {"modifies": frozenset({"everything"})})


def test_register_pass_rejects_duplicates_and_nameless():
    class Nameless(GraphPass):
        pass

    with pytest.raises(ValueError):
        register_pass(Nameless)
    with pytest.raises(ValueError):
        register_pass(type("Slim2", (GraphPass,), {"name": "slim"}))
    assert onnxslim_cnn.get_pass("slim") is SlimPass
    assert "slim" in onnxslim_cnn.available_passes()


# --------------------------------------------------------------------------- determinism


def big_slim_model():
    """conv_bn plus Identity/duplicate work for slim to do, so the output has something to order."""
    m = conv_bn_model()
    m.graph.node.append(h.make_node("Identity", ["y"], ["i1"], name="id1"))
    m.graph.node.append(h.make_node("Sigmoid", ["i1"], ["s1"], name="s1"))
    m.graph.node.append(h.make_node("Sigmoid", ["i1"], ["s2"], name="s2"))
    m.graph.node.append(h.make_node("Add", ["s1", "s2"], ["z"], name="add"))
    m.graph.output[0].name = "z"
    return m


def test_compress_is_deterministic():
    m = big_slim_model()
    a, _ = onnxslim_cnn.compress(m)
    b, _ = onnxslim_cnn.compress(m)
    assert a.SerializeToString(deterministic=True) == b.SerializeToString(deterministic=True)
    assert len(a.graph.node) < len(m.graph.node)


def test_compress_is_deterministic_across_hash_seeds(tmp_path):
    src = tmp_path / "in.onnx"
    onnx.save(big_slim_model(), src)
    code = ("import sys, onnxslim_cnn; m, _ = onnxslim_cnn.compress(sys.argv[1]); "
            "open(sys.argv[2], 'wb').write(m.SerializeToString(deterministic=True))")
    outs = []
    for seed in ("1", "2"):
        out = tmp_path / f"out{seed}.onnx"
        env = {**os.environ, "PYTHONHASHSEED": seed}
        subprocess.run([sys.executable, "-c", code, str(src), str(out)], check=True, env=env)
        outs.append(out.read_bytes())
    assert outs[0] == outs[1]


def test_a_pass_that_crashes_is_skipped_and_reported(tmp_path):
    from onnxslim_cnn.pass_infra import _REGISTRY, GraphPass, register_pass
    from graphs import conv_bn_model

    @register_pass
    class Crashing(GraphPass):
        name = "test_crashing"
        summary = "raises"

        def run(self, graph, ctx):
            raise RuntimeError("boom")

    try:
        model = conv_bn_model()
        out, report = onnxslim_cnn.compress(model, passes=["test_crashing", "slim"])
        assert report.passes[0].status == "failed"
        assert report.passes[0].skipped[0]["reason"] == "pass failed: RuntimeError: boom"
        assert any("test_crashing failed" in w for w in report.warnings)
        assert report.passes[1].status == "ok" and "BatchNormalization" not in report.output.op_counts
    finally:
        del _REGISTRY["test_crashing"]


def test_report_warns_when_outputs_change_noticeably():
    from onnxslim_cnn.models import reference

    model = reference.build("resnet18", width=0.25, input_size=32, num_classes=10)
    _, exact = onnxslim_cnn.compress(model)
    assert not any("changed noticeably" in w for w in exact.warnings)
    _, lossy = onnxslim_cnn.compress(model, passes=["prune"], prune__ratio=0.9, prune__compensate=False,
                                     calib="random", budget="off")
    cos = lossy.fidelity["logits"]["cosine"]
    assert cos < 0.99
    assert f"output logits: cosine {cos:.4f} to the original on the calibration inputs; the model changed " \
           "noticeably, check its task accuracy" in lossy.warnings
