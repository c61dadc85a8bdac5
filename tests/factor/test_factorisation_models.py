"""`svd` and `lowrank` at full rank reproduce every reference model's outputs (1e-4 relative)."""

import pytest

import onnxslim_cnn
from onnxslim_cnn.models import reference

REDUCED = {"width": 0.25, "input_size": 64, "num_classes": 10}


@pytest.mark.parametrize("name", sorted(reference.REFERENCE_MODELS))
def test_svd_full_rank_is_exact(name):
    model = reference.build(name, **REDUCED)
    out, report = onnxslim_cnn.compress(model, passes=["slim", "svd"], calib="random",
                                        svd__allow_growth=True, svd__energy=1.0, svd__min_params=0,
                                        svd__conv_fc_only=False)
    rec = report.passes[1]
    assert rec.status == "ok"
    assert rec.stats.get("factorised", 0) > 0, rec.skipped
    for f in report.fidelity.values():
        assert f["rel_error"] <= 1e-4, f


@pytest.mark.parametrize("name", sorted(reference.REFERENCE_MODELS))
def test_lowrank_full_rank_is_exact(name):
    model = reference.build(name, **REDUCED)
    out, report = onnxslim_cnn.compress(model, passes=["slim", "lowrank"], calib="random", lowrank__allow_growth=True,
                                        lowrank__energy=1.0)
    rec = report.passes[1]
    assert rec.status == "ok"
    assert sum(v for k, v in rec.stats.items() if k.startswith("split")) > 0, rec.skipped
    for f in report.fidelity.values():
        assert f["rel_error"] <= 1e-4, f
