"""`slim` on every reference model, the trained digits fixtures and the real corpus models.

Outputs must stay equal (max abs error <= 1e-4 of the output scale, through ONNX Runtime on the
original), the node count must not exceed OnnxSlim's on the same input, and task quality of the
trained/real models must not move at all.
"""

import onnx
import pytest

import onnxslim_cnn
from onnxslim_cnn.models import corpus, digits, reference

onnxslim = pytest.importorskip("onnxslim", reason="OnnxSlim (the peer tool) is in the test extra")

REDUCED = {"width": 0.25, "input_size": 64, "num_classes": 10}


def onnxslim_nodes(model: onnx.ModelProto) -> int:
    return len(onnxslim.slim(model).graph.node)


def assert_equal_outputs(report, tol=1e-4):
    assert report.fidelity, "fidelity was not measured"
    for name, f in report.fidelity.items():
        assert "error" not in f, f
        assert f["rel_error"] <= tol, (name, f)


@pytest.mark.parametrize("name", sorted(reference.REFERENCE_MODELS))
def test_reference_model(name):
    model = reference.build(name, **REDUCED)
    out, report = onnxslim_cnn.compress(model)
    assert_equal_outputs(report)
    onnx.checker.check_model(out, full_check=True)
    ops = report.output.op_counts
    assert "BatchNormalization" not in ops, "every BN in a reference model follows a Conv or Gemm"
    assert report.output.nodes <= onnxslim_nodes(model)
    if "BatchNormalization" in report.input.op_counts:
        assert report.output.params < report.input.params  # BN statistics folded away
    else:
        assert report.output.params == report.input.params
    assert report.output.macs == report.input.macs  # exact clean-up: same compute
    # the symbolic batch dimension survives
    assert out.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "N"


@pytest.mark.parametrize("name", digits.FIXTURES)
def test_digits_fixture_accuracy_unchanged(name):
    path = digits.fixture_path(name)
    x, _ = digits.load_split("test")
    out, report = onnxslim_cnn.compress(str(path), calib={"input": x[:64]})
    assert_equal_outputs(report)
    assert report.fidelity["logits"]["top1_agreement"] == 1.0
    assert report.output.nodes <= onnxslim_nodes(onnx.load(path))
    assert digits.evaluate_top1(out) == digits.evaluate_top1(str(path))


@pytest.mark.corpus
@pytest.mark.parametrize("mid", [m for m in corpus.IDS])
def test_real_model(corpus_paths, mid):
    from onnxslim_cnn.models import tasks

    path = corpus_paths[mid]
    out, report = onnxslim_cnn.compress(str(path), calib=tasks.sample_inputs(mid, 2))
    assert_equal_outputs(report)
    assert report.output.nodes < report.input.nodes
    assert report.passes[0].status == "ok"
    before, after = tasks.evaluate(mid, str(path)), tasks.evaluate(mid, out)
    assert after == before  # the same predictions, so every task metric is identical
