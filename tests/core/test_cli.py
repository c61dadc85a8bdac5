"""The command line: normal runs, options, recipes, reports, and every kind of bad input.

Bad input must give exactly one line on stderr, exit code 2, no output file, and leave the
input byte-identical.
"""

import hashlib
import json
import subprocess
import sys

import numpy as np
import onnx
import pytest
from onnx import helper as h

from graphs import vi
from onnxslim_cnn.cli import main


def cli(*args):
    """Run the real console entry point in a subprocess (exit code, stdout, stderr)."""
    proc = subprocess.run([sys.executable, "-m", "onnxslim_cnn", *map(str, args)], capture_output=True, text=True)
    return proc.returncode, proc.stdout, proc.stderr


def digest(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def assert_bad_input(args, tmp_path, expect, inputs=()):
    before = {p: digest(p) for p in inputs}
    out = tmp_path / "out.onnx"
    code, stdout, stderr = cli(*args)
    assert code == 2, stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith("onnxslim: error: ")
    assert expect in lines[0], lines[0]
    assert "Traceback" not in stderr
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".onnxslim-")]
    for p, d in before.items():
        assert digest(p) == d


def test_default_run_prints_report_and_writes_model(model_path, tmp_path):
    out, rep = tmp_path / "out.onnx", tmp_path / "r.json"
    code, stdout, stderr = cli(model_path, out, "--report", rep)
    assert code == 0, stderr
    assert "folded_batchnorm=1" in stdout and "Fidelity" in stdout and "MACs" in stdout
    model = onnx.load(out)
    onnx.checker.check_model(model, full_check=True)
    report = json.loads(rep.read_text())
    assert report["input"]["op_counts"] == {"BatchNormalization": 1, "Conv": 1, "Relu": 1}
    assert report["output"]["op_counts"] == {"Conv": 1, "Relu": 1}
    assert report["input"]["macs"] == report["output"]["macs"] == 6 * 8 * 8 * 4 * 9
    assert report["fidelity"]["y"]["rel_error"] < 1e-5
    assert report["passes"][0]["name"] == "slim"
    assert any("random(seed=0" in w for w in report["warnings"])


def test_output_is_deterministic(model_path, tmp_path):
    a, b = tmp_path / "a.onnx", tmp_path / "b.onnx"
    assert cli(model_path, a, "-q")[0] == 0
    assert cli(model_path, b, "-q")[0] == 0
    assert a.read_bytes() == b.read_bytes()


def test_list_passes_documents_options():
    code, stdout, _ = cli("--list-passes")
    assert code == 0
    assert "slim" in stdout and "--set slim.fold_batchnorm=<bool>" in stdout and "fold BatchNormalization" in stdout


def test_set_and_recipe(model_path, tmp_path):
    out = tmp_path / "o.onnx"
    assert cli(model_path, out, "--set", "slim.fold_batchnorm=false", "-q")[0] == 0
    assert "BatchNormalization" in [n.op_type for n in onnx.load(out).graph.node]
    recipe = tmp_path / "r.yaml"
    recipe.write_text("passes:\n  - slim: {fold_batchnorm: false}\n")
    assert cli(model_path, out, "--recipe", recipe, "-q")[0] == 0
    assert "BatchNormalization" in [n.op_type for n in onnx.load(out).graph.node]
    rj = tmp_path / "r.json"
    rj.write_text(json.dumps({"passes": ["slim"], "options": {"slim": {"fold_batchnorm": True}}}))
    assert cli(model_path, out, "--recipe", rj, "-q")[0] == 0
    assert "BatchNormalization" not in [n.op_type for n in onnx.load(out).graph.node]


def test_calib_file_and_bench(model_path, tmp_path):
    calib = tmp_path / "c.npz"
    np.savez(calib, x=np.random.default_rng(0).standard_normal((5, 4, 8, 8)).astype(np.float32))
    rep = tmp_path / "r.json"
    code, stdout, stderr = cli(model_path, tmp_path / "o.onnx", "--calib", calib, "--bench", "--report", rep)
    assert code == 0, stderr
    r = json.loads(rep.read_text())
    assert r["calibration"] == f"file:{calib}"
    assert r["latency"]["before"]["median_ms"] > 0 and r["latency"]["after"]["threads"] == 1
    assert not any("random" in w for w in r["warnings"])


def test_missing_file(tmp_path):
    assert_bad_input([tmp_path / "nope.onnx", tmp_path / "out.onnx"], tmp_path, "input model not found")


def test_not_onnx(tmp_path):
    p = tmp_path / "text.onnx"
    p.write_text("this is not a model\n" * 10)
    assert_bad_input([p, tmp_path / "out.onnx"], tmp_path, "not", inputs=[p])


def test_truncated_model(model_path, tmp_path):
    data = model_path.read_bytes()
    p = tmp_path / "trunc.onnx"
    p.write_bytes(data[: len(data) // 2])
    assert_bad_input([p, tmp_path / "out.onnx"], tmp_path, "trunc.onnx", inputs=[p])


def test_unknown_pass(model_path, tmp_path):
    assert_bad_input([model_path, tmp_path / "out.onnx", "--passes", "slim,shrink"], tmp_path,
                     "unknown pass 'shrink' (available: ", inputs=[model_path])


@pytest.mark.parametrize("setting,expect", [
    ("slim.fold_batchnorm=maybe", "bad value for slim.fold_batchnorm: 'maybe' (expected true or false)"),
    ("slim.max_rounds=0", "bad value for slim.max_rounds: 0 (must be >= 1)"),
    ("slim.colour=red", "unknown option 'slim.colour'"),
    ("slim", "bad --set 'slim'"),
])
def test_bad_option(model_path, tmp_path, setting, expect):
    assert_bad_input([model_path, tmp_path / "out.onnx", "--set", setting], tmp_path, expect, inputs=[model_path])


def test_graph_onnxruntime_cannot_load(tmp_path):
    g = h.make_graph([h.make_node("Mystery", ["x"], ["y"], domain="com.example")], "g", [vi("x", [1, 4])], [vi("y", [1, 4])])
    m = h.make_model(g, opset_imports=[h.make_opsetid("", 17), h.make_opsetid("com.example", 1)])
    m.ir_version = 8
    p = tmp_path / "custom.onnx"
    onnx.save(m, p)
    assert_bad_input([p, tmp_path / "out.onnx"], tmp_path, "onnxruntime cannot load the input model", inputs=[p])


def test_output_same_as_input_refused(model_path, tmp_path):
    before = digest(model_path)
    code, _, stderr = cli(model_path, model_path)
    assert code == 2 and "is the input model" in stderr
    assert digest(model_path) == before


def test_bad_calib_file(model_path, tmp_path):
    calib = tmp_path / "c.npz"
    np.savez(calib, wrong=np.zeros((2, 4, 8, 8), np.float32))
    assert_bad_input([model_path, tmp_path / "out.onnx", "--calib", calib], tmp_path,
                     "no array for model input(s) x", inputs=[model_path])


def test_missing_arguments(tmp_path):
    code, _, stderr = cli()
    assert code == 2 and stderr.count("\n") == 1 and "need an input and an output" in stderr


def test_in_process_main_returns_exit_code(tmp_path):
    assert main([str(tmp_path / "missing.onnx"), str(tmp_path / "o.onnx")]) == 2


def test_progress_bar_only_when_enabled(capsys):
    from onnxslim_cnn.cli import _Progress

    _Progress(enabled=False)(0, 1, "slim")
    assert capsys.readouterr().err == ""
    bar = _Progress(enabled=True)
    bar(0, 1, "slim")
    bar(1, 1, "measure")
    err = capsys.readouterr().err
    assert "0/1 slim" in err and "1/1 measure" in err and err.endswith("\n")


def test_quiet_and_non_tty_print_no_progress(model_path, tmp_path):
    code, stdout, stderr = cli(model_path, tmp_path / "o.onnx")  # stderr is a pipe here
    assert code == 0 and "[" not in stderr
    code, stdout, stderr = cli(model_path, tmp_path / "o.onnx", "--quiet")
    assert code == 0 and stdout == "" and stderr == ""
