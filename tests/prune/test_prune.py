"""`prune` on every reference model: zeroed filters pruned exactly; random ratios stay valid."""

import numpy as np
import onnx
import pytest

import onnxslim_cnn
from graphs import zero_units
from onnxslim_cnn.analysis.channels import analyze
from onnxslim_cnn.graph import Graph
from onnxslim_cnn.models import reference

REDUCED = {"width": 0.25, "input_size": 64, "num_classes": 10}


@pytest.mark.parametrize("name", sorted(reference.REFERENCE_MODELS))
def test_pruning_zeroed_filters_is_exact(name):
    model = reference.build(name, **REDUCED)
    assert zero_units(model, 0.25, seed=1) > 0
    out, report = onnxslim_cnn.compress(model, passes=["prune"], calib="random", prune__zero_only=True,
                                        prune__protect_first=False)
    assert report.passes[0].status == "ok"
    assert report.passes[0].stats["channels_removed"] > 0
    for f in report.fidelity.values():
        assert f["rel_error"] <= 1e-5, f
    assert report.output.macs < report.input.macs
    assert [o.type for o in out.graph.output] == [o.type for o in model.graph.output]


@pytest.mark.parametrize("name", sorted(reference.REFERENCE_MODELS))
@pytest.mark.parametrize("ratio,scope,criterion", [(0.3, "uniform", "l1"), (0.6, "global", "l2"),
                                                   (0.5, "uniform", "bn_gamma"), (0.4, "uniform", "activation")])
def test_random_ratios_give_valid_models(name, ratio, scope, criterion):
    model = reference.build(name, **REDUCED)
    out, report = onnxslim_cnn.compress(model, passes=["prune"], calib="random", prune__ratio=ratio, prune__scope=scope,
                                        prune__criterion=criterion, prune__round_to=2)
    assert report.passes[0].status == "ok", report.passes[0].status
    onnx.checker.check_model(out, full_check=True)
    assert report.output.params < report.input.params and report.output.macs < report.input.macs
    for f in report.fidelity.values():
        assert "error" not in f  # output shapes unchanged
    for change in report.passes[0].changes:
        after = change["channels_after"]
        assert after >= 2 and after % 2 == 0


def test_report_lists_frozen_groups_and_cli_options(tmp_path):
    model = reference.build("resnet18", **REDUCED)
    out, report = onnxslim_cnn.compress(model, passes=["prune"], calib="random", prune__ratio=0.5)
    reasons = [s["reason"] for s in report.passes[0].skipped]
    assert "frozen: feeds graph output logits" in reasons
    assert "protected layer" in reasons  # the stem conv's residual stream
    changes = report.passes[0].changes
    assert all(c["channels_after"] == c["channels_before"] - c["channels_before"] // 2 for c in changes)


def test_report_table_lists_before_after_pairs_of_any_pass():
    """The table's per-layer lines come from any ``<name>_before``/``<name>_after`` detail pair,
    not from prune's keys: prune's channels, another pass's params and ratios alike."""
    from onnxslim_cnn.report import PassRecord

    _, report = onnxslim_cnn.compress(reference.build("resnet18", **REDUCED), passes=["prune"], calib="random",
                                      prune__ratio=0.5)
    assert "\n      layer1.0.conv1: 16 -> 8 channels\n" in report.format_table()
    change = {"item": "fc", "action": "split", "params_before": 100, "params_after": 40, "macs_before": 5,
              "macs_after": None, "range_ratio_before": 2.5, "range_ratio_after": 1.25, "kept_before": "x"}
    report.passes.append(PassRecord("other", {}, True, {}, [change], [], 0.0, "ok", 3))
    assert "\n      fc: 100 -> 40 params, 2.5 -> 1.25 range ratio\n" in report.format_table()


def test_reconstruct_recovers_digits_accuracy():
    from onnxslim_cnn.models import digits

    path = str(digits.fixture_path("digits_vgg"))
    calib = {"input": digits.load_split("train")[0][:512]}
    plain, _ = onnxslim_cnn.compress(path, passes=["prune"], calib=calib, prune__ratio=0.5, prune__compensate=False,
                                 prune__reconstruct=False)
    refit, report = onnxslim_cnn.compress(path, passes=["prune"], calib=calib, prune__ratio=0.5, prune__reconstruct=True)
    base, acc_plain, acc_refit = (digits.evaluate_top1(m) for m in (path, plain, refit))
    assert report.output.params < 0.3 * report.input.params
    # measured: 0.9978 unpruned, 0.2556 pruned by L1 without recovery, 0.9911 with the refit
    assert acc_plain < 0.5
    assert acc_refit >= base - 0.02


def test_reconstruction_criterion_is_exact_obs_saliency():
    """Removing one input of a linear layer and refitting the rest raises the error by the OBS term."""
    from onnxslim_cnn.passes.prune.recover import removal_errors

    rng = np.random.default_rng(0)
    x = rng.standard_normal((400, 5)) @ rng.standard_normal((5, 5))
    w = rng.standard_normal((5, 3))
    errs = removal_errors("Gemm", {}, w, x, np.arange(5), ridge=0.0)
    y = x @ w
    for j in range(5):
        keep = np.delete(np.arange(5), j)
        a = np.concatenate([x[:, keep], np.ones((400, 1))], axis=1)
        sol, *_ = np.linalg.lstsq(a, y, rcond=None)
        direct = np.sum((a @ sol - y) ** 2) / 400
        a1 = np.concatenate([x, np.ones((400, 1))], axis=1)
        energy = np.trace(w.T @ (a1.T @ a1 / 400)[:-1, :-1] @ w)
        assert abs(errs[j] - direct / energy) < 1e-9


def test_grouped_conv_pruned_exactly_and_validly():
    from onnx import helper as h

    from graphs import init, make_model, vi

    rng = np.random.default_rng(2)
    w1 = rng.normal(size=(8, 4, 3, 3))
    w1[[1, 5]] = 0  # position 1 of both groups of g2's input: a prunable unit, dead
    nodes = [h.make_node("Conv", ["x", "w1"], ["a"], name="c1", pads=[1] * 4),
             h.make_node("Relu", ["a"], ["r"]),
             h.make_node("Conv", ["r", "wg", "bg"], ["b"], name="g2", group=2, pads=[1] * 4),
             h.make_node("Relu", ["b"], ["rb"]), h.make_node("Conv", ["rb", "w3"], ["y"], name="c3")]
    m = make_model(nodes, [vi("x", ["N", 4, 8, 8])], [vi("y", ["N", 6, 8, 8])],
                   [init("w1", w1), init("wg", rng.normal(size=(12, 4, 3, 3))), init("bg", rng.normal(size=12)),
                    init("w3", rng.normal(size=(6, 12, 1, 1)))])
    out, rep = onnxslim_cnn.compress(m, passes=["prune"], calib="random", prune__zero_only=True,
                                     prune__protect_first=False)
    assert rep.passes[0].stats["channels_removed"] == 1  # one unit = 2 channels
    assert list(onnx.numpy_helper.to_array([t for t in out.graph.initializer if t.name.startswith("wg")][0]).shape) == [12, 3, 3, 3]
    assert rep.fidelity["y"]["rel_error"] < 1e-5
    out, rep = onnxslim_cnn.compress(m, passes=["prune"], calib="random", prune__ratio=0.5, prune__protect_first=False)
    assert rep.passes[0].status == "ok"
    onnx.checker.check_model(out, full_check=True)


@pytest.mark.corpus
@pytest.mark.parametrize("mid", ["ppocrv4_det", "ppocrv4_rec", "ppocr_cls_v2"])
def test_real_ppocr_models_prune_at_0_3(corpus_paths, mid):
    from onnxslim_cnn.models import tasks

    path = corpus_paths[mid]
    calib = tasks.sample_inputs(mid, 4)
    out, report = onnxslim_cnn.compress(str(path), passes=["slim", "prune"], calib=calib, prune__ratio=0.3)
    rec = report.passes[1]
    assert rec.status == "ok" and rec.stats["channels_removed"] > 0
    assert report.output.macs < report.input.macs
    frozen = [s["reason"] for s in rec.skipped if s["reason"].startswith("frozen: ")]
    assert frozen and all("(" in r or "graph output" in r for r in frozen)  # each names the op or output
    for f in report.fidelity.values():
        assert "error" not in f and 0 < f["cosine"] <= 1.0000001  # output shapes kept, agreement reported


def test_rewriter_returns_the_refit_plan():
    """``Rewriter.apply`` hands back what it refitted (consumer, original output, kept outputs);
    nothing is stored on the graph's nodes."""
    from onnx import helper as h

    from graphs import init, make_model, vi
    from onnxslim_cnn.passes.prune.rewrite import RefitItem, Rewriter

    rng = np.random.default_rng(3)
    nodes = [h.make_node("Conv", ["x", "w1"], ["a"], name="c1", pads=[1] * 4), h.make_node("Relu", ["a"], ["r"]),
             h.make_node("Conv", ["r", "w2", "b2"], ["y"], name="c2")]
    m = make_model(nodes, [vi("x", ["N", 3, 6, 6])], [vi("y", ["N", 5, 6, 6])],
                   [init("w1", rng.normal(size=(4, 3, 3, 3))), init("w2", rng.normal(size=(5, 4, 1, 1))),
                    init("b2", rng.normal(size=5))])
    graph = Graph.from_model(m)
    a = analyze(graph)
    rewriter = Rewriter(graph, a, a.producers["c1"].ids[:2])
    plan = rewriter.apply({}, {"r": np.maximum(rng.normal(size=(8, 4, 6, 6)), 0).astype(np.float32)})
    c2 = next(n for n in graph.nodes if n.name == "c2")
    assert plan == [RefitItem(c2, "y", None)]
    assert plan[0].node is c2
    assert not any(k.startswith("_refit") for n in graph.nodes for k in vars(n))


def test_every_criterion_has_an_importance_class():
    import dataclasses
    import typing

    from onnxslim_cnn.passes.prune.importance import IMPORTANCE, Importance
    from onnxslim_cnn.passes.prune.prune import PruneOptions

    field = next(f for f in dataclasses.fields(PruneOptions) if f.name == "criterion")
    hint = typing.get_type_hints(PruneOptions)["criterion"]
    assert list(IMPORTANCE) == list(typing.get_args(hint)) and field.default in IMPORTANCE
    assert all(issubclass(c, Importance) for c in IMPORTANCE.values())
    assert sorted(k for k, c in IMPORTANCE.items() if c.needs_calibration) == ["activation", "reconstruction"]
