"""Pass `sparse` (sparse weight storage + per-layer report) and `onnxslim bench --sparse-ep`."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from graphs import init, make_model, run, vi
from onnx import helper as h

import onnxslim_cnn
from onnxslim_cnn import cli, runtime
from onnxslim_cnn.analysis.cost import count_params
from onnxslim_cnn.passes.sparse import SparsePass
from onnxslim_cnn.sparse_storage import densify, store_sparse, to_dense, to_sparse

REASON = runtime.unavailable_reason()


def small_model(rng):
    """Conv(group 1) -> Relu -> grouped Conv -> Flatten -> Gemm; all weights dense."""
    nodes = [h.make_node("Conv", ["x", "Wc"], ["c"], pads=[1, 1, 1, 1], name="conv"),
             h.make_node("Relu", ["c"], ["r"], name="relu"),
             h.make_node("Conv", ["r", "Wg"], ["g"], group=2, name="grouped"),
             h.make_node("Flatten", ["g"], ["f"], name="flat"),
             h.make_node("Gemm", ["f", "Wf", "Bf"], ["y"], transB=1, name="fc")]
    inits = [init("Wc", rng.standard_normal((16, 8, 3, 3))), init("Wg", rng.standard_normal((16, 8, 1, 1))),
             init("Wf", rng.standard_normal((32, 256))), init("Bf", rng.standard_normal(32))]
    return make_model(nodes, [vi("x", [1, 8, 4, 4])], [vi("y", [1, 32])], inits)


def test_sparse_pass_stores_claimable_weights_and_reports_them():
    rng = np.random.default_rng(0)
    model = small_model(rng)
    pruned, _ = onnxslim_cnn.compress(model, passes=["sparsify"], calib="random", sparsify__ratio=0.9,
                                      sparsify__scope="layer", sparsify__min_params=0, sparsify__skip_depthwise=False,
                                      fidelity=False)
    out, report = onnxslim_cnn.compress(pruned, passes=["sparse"], fidelity=False)
    result = report.passes[0]
    stats = result["stats"] if isinstance(result, dict) else result.stats
    assert stats["layers"] == 2
    assert [e["node"] for e in stats["expected"]] == ["conv", "fc"]
    assert all(e["sparsity"] == pytest.approx(0.9, abs=1e-3) and e["expected_speedup"] > 1 for e in stats["expected"])
    stored = [n for n in out.graph.node if n.op_type == "Constant"]
    weight_of = {n.name: n.input[1] for n in out.graph.node if n.op_type in ("Conv", "Gemm")}
    assert sorted(n.output[0] for n in stored) == sorted([weight_of["conv"], weight_of["fc"]])
    assert all(n.attribute[0].name == "sparse_value" for n in stored)
    # the grouped conv stays dense (reported as skipped); the file shrinks; computation is identical
    assert weight_of["grouped"] in {i.name for i in out.graph.initializer}
    assert len(out.SerializeToString()) < 0.45 * len(pruned.SerializeToString())
    assert count_params(out) == count_params(pruned)
    onnx.checker.check_model(out, full_check=True)
    x = {"x": rng.standard_normal((1, 8, 4, 4)).astype(np.float32)}
    np.testing.assert_array_equal(run(out, x)[0], run(pruned, x)[0])


def test_sparse_pass_threshold_and_store_off():
    rng = np.random.default_rng(1)
    pruned, _ = onnxslim_cnn.compress(small_model(rng), passes=["sparsify"], calib="random", sparsify__ratio=0.6,
                                      sparsify__scope="layer", sparsify__min_params=0, fidelity=False)
    out, report = onnxslim_cnn.compress(pruned, passes=["sparse"], sparse__min_sparsity=0.7, fidelity=False)
    text = report.format_table()
    assert "sparsity 0.600 < min_sparsity 0.7" in text and "grouped / depthwise convolution" in text
    assert not any(n.op_type == "Constant" for n in out.graph.node)
    out, report = onnxslim_cnn.compress(pruned, passes=["sparse"], sparse__min_sparsity=0.5, sparse__store=False,
                                        fidelity=False)
    # 60 % zeros: reported, but int64 COO would be larger than dense, and store is off anyway
    assert not any(n.op_type == "Constant" for n in out.graph.node)


def test_sparse_storage_round_trips_through_other_passes():
    rng = np.random.default_rng(2)
    w = rng.standard_normal((64, 48)).astype(np.float32)
    w[rng.random(w.shape) < 0.95] = 0
    t = onnx.numpy_helper.from_array(w, "W")
    np.testing.assert_array_equal(onnx.numpy_helper.to_array(to_dense(to_sparse(t))), w)
    nodes = [h.make_node("MatMul", ["x", "W"], ["m"], name="mm"), h.make_node("Identity", ["m"], ["y"], name="id")]
    model = make_model(nodes, [vi("x", [2, 64])], [vi("y", [2, 48])], [init("W", w)])
    # a graph sparse_initializer (what other tools write) is read too, and comes out as Constant(sparse_value)
    as_sparse_init = onnx.ModelProto()
    as_sparse_init.CopyFrom(model)
    del as_sparse_init.graph.initializer[:]
    as_sparse_init.graph.sparse_initializer.append(to_sparse(t))
    slimmed, _ = onnxslim_cnn.compress(as_sparse_init, passes=["slim"], fidelity=False)
    assert [n.op_type for n in slimmed.graph.node].count("Constant") == 1
    x = {"x": rng.standard_normal((2, 64)).astype(np.float32)}
    np.testing.assert_allclose(run(slimmed, x)[0], run(model, x)[0], rtol=1e-6, atol=1e-6)
    copy = onnx.ModelProto()
    copy.CopyFrom(slimmed)
    assert densify(copy) == {"W"} and store_sparse(copy, {"W"}) == ["W"]


@pytest.mark.skipif(REASON is not None, reason=f"sparse EP unavailable: {REASON}")
def test_cli_bench_sparse_ep(tmp_path, capsys):
    rng = np.random.default_rng(3)
    pruned, _ = onnxslim_cnn.compress(small_model(rng), passes=["sparsify", "sparse"], calib="random", sparsify__ratio=0.9,
                                      sparsify__scope="layer", sparsify__min_params=0, fidelity=False)
    path = tmp_path / "m.onnx"
    onnxslim_cnn.save(pruned, str(path))
    out_json = tmp_path / "bench.json"
    assert cli.main(["bench", str(path), "--sparse-ep", "--repeats", "3", "--json", str(out_json)]) == 0
    text = capsys.readouterr().out
    assert "with the sparse EP" in text
    result = json.loads(out_json.read_text())
    assert [n["name"] for n in result["claimed_nodes"]] == ["conv", "relu", "fc"]
    assert result["max_rel_diff"] < 1e-5 and result["speedup"] > 0
    assert cli.main(["bench", str(path)]) == 0
    assert "sparse EP" not in capsys.readouterr().out


def test_cli_bench_bad_input(tmp_path, capsys):
    assert cli.main(["bench", str(tmp_path / "missing.onnx"), "--sparse-ep"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("onnxslim: error:") and len(err.strip().splitlines()) == 1
    assert cli.main(["bench", str(tmp_path / "missing.onnx"), "--threads", "0"]) == 2


def test_cli_bench_model_onnxruntime_cannot_run(tmp_path, capsys):
    # Valid ONNX that ORT cannot run (an op of an unknown domain): a user error, not a crash.
    graph = h.make_graph([h.make_node("Bar", ["x"], ["y"], domain="example.custom")], "g", [vi("x", [2])],
                         [vi("y", [2])])
    model = h.make_model(graph, opset_imports=[h.make_opsetid("", 17), h.make_opsetid("example.custom", 1)])
    model.ir_version = 8
    path = tmp_path / "custom.onnx"
    onnx.save(model, str(path))
    assert cli.main(["bench", str(path), "--repeats", "1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("onnxslim: error: onnxruntime cannot run") and len(err.strip().splitlines()) == 1


def test_sparse_pass_takes_a_constant_left_operand_like_the_ep():
    # W @ x and Gemm(A constant, x): the EP claims them (tests/test_sparse_ep_claims.py), so the
    # pass reports and stores them; a Gemm C per output column is left, as the EP leaves it.
    rng = np.random.default_rng(5)

    def sparse(shape):
        w = rng.standard_normal(shape).astype(np.float32)
        w.reshape(-1)[rng.permutation(w.size)[: int(0.9 * w.size)]] = 0.0
        return w

    nodes = [h.make_node("MatMul", ["Wm", "x"], ["m"], name="left_mm"),
             h.make_node("Gemm", ["Wa", "m", "Crow"], ["g"], name="left_gemm"),
             h.make_node("Gemm", ["Wb", "g", "Ccol"], ["y"], name="per_column_c")]
    inits = [init("Wm", sparse((48, 64))), init("Wa", sparse((40, 48))), init("Crow", rng.standard_normal((40, 1))),
             init("Wb", sparse((24, 40))), init("Ccol", rng.standard_normal((1, 6)))]
    model = make_model(nodes, [vi("x", [64, 6])], [vi("y", [24, 6])], inits)
    out, report = onnxslim_cnn.compress(model, passes=["sparse"], fidelity=False)
    result = report.passes[0]
    stats = result["stats"] if isinstance(result, dict) else result.stats
    assert [e["node"] for e in stats["expected"]] == ["left_mm", "left_gemm"]
    skipped = result["skipped"] if isinstance(result, dict) else result.skipped
    assert any("per_column_c" in str(s) and "not per output row" in str(s) for s in skipped)
    stored = sorted(n.output[0] for n in out.graph.node if n.op_type == "Constant")
    assert stored == ["Wa", "Wm"]
    x = {"x": rng.standard_normal((64, 6)).astype(np.float32)}
    np.testing.assert_array_equal(run(out, x)[0], run(model, x)[0])
    if REASON is None:  # and the EP takes exactly those two from the stored file
        sess = runtime.session(out, min_sparsity=0.8)
        assert sorted(n["name"] for n in runtime.claimed_nodes(sess)) == ["left_gemm", "left_mm"]


def _conv_model(sparsity, seed=6):
    """64->64 3x3 conv on 56x56 with ``sparsity`` zeros (the EP's cost-model test shape)."""
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((64, 64, 3, 3)).astype(np.float32)
    w[rng.random(w.shape) < sparsity] = 0.0
    x = onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 64, 56, 56])
    y = onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 64, 56, 56])
    node = onnx.helper.make_node("Conv", ["x", "w"], ["y"], name="conv", pads=[1, 1, 1, 1])
    graph = onnx.helper.make_graph([node], "g", [x], [y], [onnx.numpy_helper.from_array(w, "w")])
    return onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)])


@pytest.mark.skipif(not runtime.available(), reason="the native sparse EP library is not built")
@pytest.mark.parametrize("sparsity", [0.2, 0.95])
def test_sparse_pass_agrees_with_the_eps_conv_claims(sparsity):
    """The pass applies the EP's conv cost model: a conv the EP leaves to ORT is skipped with the
    model's figure, a claimed one reports the model's speedup (not the table's)."""
    model = _conv_model(sparsity)
    _, result = SparsePass(min_sparsity=0.0, store=False).apply(model)
    claimed = [n["name"] for n in runtime.claimed_nodes(runtime.session(model, min_sparsity=0.0))]
    reported = [e["node"] for e in result.stats["expected"]]
    assert reported == claimed == ([] if sparsity < 0.5 else ["conv"])
    assert result.stats["conv_speedup_source"] == "EP conv cost model"
    if reported:
        assert result.stats["expected"][0]["expected_speedup"] > 1.0
    else:
        assert "conv cost model expects" in result.skipped[0]["reason"]


def _resnet18_opset10():
    """ResNet-18 as an opset-10 export (IR 5): every op the builder writes is valid there."""
    from onnxslim_cnn.models import reference

    model = reference.build("resnet18", width=0.25, input_size=32, num_classes=10)
    model.opset_import[0].version = 10
    model.ir_version = 5
    onnx.checker.check_model(model, full_check=True)
    return model


def test_sparse_pass_raises_opset_10_to_11_for_sparse_value():
    """Constant(sparse_value) is opset 11: the pass used to be reverted on an opset-10 model
    ("Unrecognized attribute: sparse_value for operator Constant"); it now converts the model."""
    calib = {"input": np.random.default_rng(0).standard_normal((8, 3, 32, 32)).astype(np.float32)}
    pruned, _ = onnxslim_cnn.compress(_resnet18_opset10(), passes=["sparsify"], calib=calib, sparsify__ratio=0.9,
                                      fidelity=False)
    assert pruned.opset_import[0].version == 10
    out, report = onnxslim_cnn.compress(pruned, passes=["sparse"], calib=calib)
    rec = report.passes[0]
    assert rec.status == "ok", rec.status
    assert rec.stats["opset_upgraded"] == "10->11" and rec.stats["bytes_saved"] > 0
    assert [(o.domain, o.version) for o in out.opset_import] == [("", 11)] and out.ir_version >= 6
    assert any(n.op_type == "Constant" and n.attribute[0].name == "sparse_value" for n in out.graph.node)
    onnx.checker.check_model(out, full_check=True)
    assert len(out.SerializeToString()) < len(pruned.SerializeToString())
    np.testing.assert_allclose(run(out, {"input": calib["input"]})[0], run(pruned, {"input": calib["input"]})[0],
                               rtol=1e-5, atol=1e-6)
    assert SparsePass.modifies == frozenset({"graph", "opset"})
    # nothing to store (store=false): the opset stays, nothing changes
    same, report = onnxslim_cnn.compress(pruned, passes=["sparse"], calib=calib, sparse__store=False, fidelity=False)
    assert same.opset_import[0].version == 10 and "opset_upgraded" not in report.passes[0].stats


def test_sparse_pass_keeps_weights_dense_when_the_opset_cannot_be_converted(monkeypatch):
    from onnx import version_converter

    def refuse(model, version):
        raise RuntimeError("No Adapter From Version $10 for SomeOp")

    monkeypatch.setattr(version_converter, "convert_version", refuse)
    calib = {"input": np.random.default_rng(0).standard_normal((4, 3, 32, 32)).astype(np.float32)}
    pruned, _ = onnxslim_cnn.compress(_resnet18_opset10(), passes=["sparsify"], calib=calib, sparsify__ratio=0.9,
                                      fidelity=False)
    out, report = onnxslim_cnn.compress(pruned, passes=["sparse"], calib=calib, fidelity=False)
    rec = report.passes[0]
    assert rec.status == "ok" and out.opset_import[0].version == 10
    assert not any(n.op_type == "Constant" for n in out.graph.node)
    assert rec.stats["layers"] >= 1  # the report still lists what the EP would take
    (skip,) = [s for s in rec.skipped if s["item"] == "store"]
    assert skip["reason"] == "Constant(sparse_value) needs opset 11; cannot convert opset 10: No Adapter From Version $10 for SomeOp"


def test_cli_bench_help_prints_the_default_min_sparsity(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["bench", "--help"])
    assert exc.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert f"(default {runtime.DEFAULT_MIN_SPARSITY})" in text and "DEFAULT_MIN_SPARSITY" not in text
