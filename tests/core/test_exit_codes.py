"""Exit codes: 3 when the run did not do all it was asked to, and outputs written all or nothing.

A pass that fails or is reverted used to leave exit 0 and, under -q, no word at all. Now: exit 3,
the reason on stderr even with -q, no output model unless --keep-anyway; --allow-skip accepts it.
A report that cannot be written leaves no model, and a missing output folder is refused (exit 2)
instead of being created.
"""

import json

import onnx
import pytest

from graphs import relu_swapping_pass
from onnxslim_cnn import GraphPass, pass_infra, register_pass
from onnxslim_cnn.cli import main


@pytest.fixture
def failing_passes():
    """Two throwaway passes: one crashes, one returns a model ORT cannot load."""

    @register_pass
    class Crashes(GraphPass):
        name = "_test_crashes"

        def run(self, graph, ctx):
            raise RuntimeError("boom")

    register_pass(relu_swapping_pass("_test_breaks", "NoSuchOp"))
    yield
    for name in ("_test_crashes", "_test_breaks"):
        del pass_infra._REGISTRY[name]


def test_failed_pass_exits_3_with_the_reason_under_quiet(model_path, tmp_path, failing_passes, capsys):
    out, report = tmp_path / "out.onnx", tmp_path / "r.json"
    code = main([str(model_path), str(out), "--passes", "_test_crashes,slim", "-q", "--report", str(report)])
    captured = capsys.readouterr()
    assert code == 3 and captured.out == ""
    lines = captured.err.splitlines()
    assert lines[0] == "onnxslim: error: pass _test_crashes failed: RuntimeError: boom"
    assert lines[-1] == (f"onnxslim: error: the run did not do all that was asked; {out} not written "
                         "(--keep-anyway writes it); --allow-skip accepts skipped passes")
    assert not out.exists()
    # the report is written: it is how the user finds out what happened
    assert json.loads(report.read_text())["problems"] == ["pass _test_crashes failed: RuntimeError: boom"]


def test_reverted_pass_exits_3(model_path, tmp_path, failing_passes, capsys):
    out = tmp_path / "out.onnx"
    assert main([str(model_path), str(out), "--passes", "_test_breaks", "-q"]) == 3
    first = capsys.readouterr().err.splitlines()[0]
    assert first.startswith("onnxslim: error: pass _test_breaks produced an invalid model and was reverted: ")
    assert "NoSuchOp" in first and not out.exists()


def test_keep_anyway_writes_and_still_exits_3(model_path, tmp_path, failing_passes, capsys):
    out = tmp_path / "out.onnx"
    assert main([str(model_path), str(out), "--passes", "_test_crashes,slim", "-q", "--keep-anyway"]) == 3
    assert f"wrote {out} anyway (--keep-anyway)" in capsys.readouterr().err
    model = onnx.load(out)
    onnx.checker.check_model(model, full_check=True)
    assert "BatchNormalization" not in {n.op_type for n in model.graph.node}  # slim still ran


def test_allow_skip_is_best_effort_exit_0_with_a_warning(model_path, tmp_path, failing_passes, capsys):
    out = tmp_path / "out.onnx"
    assert main([str(model_path), str(out), "--passes", "_test_crashes,slim", "-q", "--allow-skip"]) == 0
    assert capsys.readouterr().err.splitlines() == ["onnxslim: warning: pass _test_crashes failed: RuntimeError: boom"]
    assert out.exists()


def test_a_complete_run_has_no_problems(model_path, tmp_path, capsys):
    out, report = tmp_path / "out.onnx", tmp_path / "r.json"
    assert main([str(model_path), str(out), "-q", "--report", str(report)]) == 0
    assert capsys.readouterr().err == "" and json.loads(report.read_text())["problems"] == []


@pytest.mark.parametrize("fails", ["report", "model"])
def test_outputs_are_written_all_or_nothing(model_path, tmp_path, monkeypatch, capsys, fails):
    """A report that cannot be written leaves no model; a model that cannot be written takes
    its new report back."""
    from onnxslim_cnn import files, model_io
    from onnxslim_cnn.errors import UserError

    def refuse(*args):
        raise UserError(f"cannot write {args[0 if fails == 'report' else 1]}: No space left on device")

    monkeypatch.setattr(*((files, "write_atomic") if fails == "report" else (model_io, "save_model")), refuse)
    out, report = tmp_path / "out.onnx", tmp_path / "r.json"
    assert main([str(model_path), str(out), "-q", "--report", str(report)]) == 2
    assert capsys.readouterr().err == f"onnxslim: error: cannot write {report if fails == 'report' else out}: " \
                                      "No space left on device\n"
    assert not out.exists() and not report.exists()


@pytest.mark.parametrize("which", ["output", "--report"])
def test_missing_output_folder_is_refused_not_created(model_path, tmp_path, which, capsys):
    typo = tmp_path / "outt" / "sub"
    args = [str(model_path), str(typo / "o.onnx") if which == "output" else str(tmp_path / "o.onnx")]
    if which == "--report":
        args += ["--report", str(typo / "r.json")]
    assert main(args + ["-q"]) == 2
    label = "output" if which == "output" else "--report"
    name = "o.onnx" if which == "output" else "r.json"
    assert capsys.readouterr().err == (f"onnxslim: error: cannot write {label} {typo / name}: "
                                       f"folder {typo} does not exist\n")
    assert not (tmp_path / "outt").exists() and not (tmp_path / "o.onnx").exists()


def test_fpga_creates_its_folder_but_not_missing_parents(tmp_path, capsys):
    from pathlib import Path

    example = Path(__file__).resolve().parents[2] / "models" / "examples"
    args = [str(example / "digits_vgg.onnx")]
    calib = ["--calib", str(example / "digits_calib.npz"), "-q"]
    assert main(["fpga", *args, str(tmp_path / "a" / "b"), *calib]) == 2
    assert "folder" in capsys.readouterr().err and not (tmp_path / "a").exists()
    assert main(["fpga", *args, str(tmp_path / "a"), *calib]) == 0
    assert (tmp_path / "a" / "model.json").exists()
