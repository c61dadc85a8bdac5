"""`slim` on every reference model, the trained digits fixtures and the real corpus models.

Outputs must stay equal (max abs error <= 1e-4 of the output scale, through ONNX Runtime on the
original), the node count must not exceed OnnxSlim's on the same input (only when OnnxSlim
is installed: pip install -e '.[bench]'), and task quality of the trained/real models must not
move at all.
"""

import functools

import onnx
import pytest

import onnxslim_cnn
from onnxslim_cnn.models import corpus, digits, reference

try:  # the peer tool comes with the bench extra only; without it just the node-count comparisons skip
    import onnxslim
except ImportError:
    onnxslim = None

needs_onnxslim = pytest.mark.skipif(
    onnxslim is None, reason="OnnxSlim (the peer tool, PyPI onnxslim) is not installed: pip install -e '.[bench]'")

REDUCED = {"width": 0.25, "input_size": 64, "num_classes": 10}


def onnxslim_nodes(model: onnx.ModelProto) -> int:
    copy = onnx.ModelProto()
    copy.CopyFrom(model)  # OnnxSlim may rewrite its input in place
    return len(onnxslim.slim(copy).graph.node)


@functools.lru_cache(maxsize=None)
def compressed_reference(name: str):
    """The reduced reference model and our ``compress`` of it, shared by the tests of one name."""
    model = reference.build(name, **REDUCED)
    out, report = onnxslim_cnn.compress(model)
    return model, out, report


@functools.lru_cache(maxsize=None)
def compressed_digits(name: str):
    x, _ = digits.load_split("test")
    return onnxslim_cnn.compress(str(digits.fixture_path(name)), calib={"input": x[:64]})


def assert_equal_outputs(report, tol=1e-4):
    assert report.fidelity, "fidelity was not measured"
    for name, f in report.fidelity.items():
        assert "error" not in f, f
        assert f["rel_error"] <= tol, (name, f)


@pytest.mark.parametrize("name", sorted(reference.REFERENCE_MODELS))
def test_reference_model(name):
    model, out, report = compressed_reference(name)
    assert_equal_outputs(report)
    onnx.checker.check_model(out, full_check=True)
    ops = report.output.op_counts
    assert "BatchNormalization" not in ops, "every BN in a reference model follows a Conv or Gemm"
    if "BatchNormalization" in report.input.op_counts:
        assert report.output.params < report.input.params  # BN statistics folded away
    else:
        assert report.output.params == report.input.params
    assert report.output.macs == report.input.macs  # exact clean-up: same compute
    # the symbolic batch dimension survives
    assert out.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "N"


@needs_onnxslim
@pytest.mark.parametrize("name", sorted(reference.REFERENCE_MODELS))
def test_reference_model_no_more_nodes_than_onnxslim(name):
    model, _, report = compressed_reference(name)
    assert report.output.nodes <= onnxslim_nodes(model)


@pytest.mark.parametrize("name", digits.FIXTURES)
def test_digits_fixture_accuracy_unchanged(name):
    path = digits.fixture_path(name)
    out, report = compressed_digits(name)
    assert_equal_outputs(report)
    assert report.fidelity["logits"]["top1_agreement"] == 1.0
    assert digits.evaluate_top1(out) == digits.evaluate_top1(str(path))


@needs_onnxslim
@pytest.mark.parametrize("name", digits.FIXTURES)
def test_digits_fixture_no_more_nodes_than_onnxslim(name):
    _, report = compressed_digits(name)
    assert report.output.nodes <= onnxslim_nodes(onnx.load(digits.fixture_path(name)))


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
