"""Output paths every command writes (model, container, report, fpga folder): a path that cannot
be written, or that would overwrite the input, is bad input -> one line, exit 2, nothing written,
the input untouched. Checked before any work, so a bad ``--report`` never leaves the model or
container written without it."""

from __future__ import annotations

import hashlib

import pytest

from onnxslim_cnn.cli import main


def _digest(p):
    return hashlib.sha256(p.read_bytes()).hexdigest()


def _bad(argv, capsys, expect):
    assert main([str(a) for a in argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("onnxslim: error: ") and expect in err, err
    assert "internal error" not in err


def _leftovers(folder):
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(".onnxslim-"))


@pytest.mark.parametrize("command", [[], ["pack"]])
def test_report_over_the_input_is_refused(model_path, tmp_path, capsys, command):
    before = _digest(model_path)
    out = tmp_path / "out.bin"
    _bad([*command, model_path, out, "--report", model_path, "-q"], capsys, "is the input")
    assert _digest(model_path) == before and not out.exists()


@pytest.mark.parametrize("command", [[], ["pack"]])
def test_report_same_as_output_is_refused(model_path, tmp_path, capsys, command):
    out = tmp_path / "out.bin"
    _bad([*command, model_path, out, "--report", out, "-q"], capsys, "same file")
    assert not out.exists()


@pytest.mark.parametrize("command", [[], ["pack"]])
def test_report_is_a_directory_writes_nothing(model_path, tmp_path, capsys, command):
    out, folder = tmp_path / "out.bin", tmp_path / "reports"
    folder.mkdir()
    _bad([*command, model_path, out, "--report", folder, "-q"], capsys, "is a directory")
    assert not out.exists() and _leftovers(tmp_path) == []


@pytest.mark.parametrize("command", [[], ["pack"], ["fpga"]])
def test_output_under_a_file_is_bad_input(model_path, tmp_path, capsys, command):
    """The parent 'folder' is a regular file: OSError at write time used to exit 1 ('internal error')."""
    blocker = tmp_path / "blocker"
    blocker.write_bytes(b"x")
    _bad([*command, model_path, blocker / "out.bin", "-q"], capsys, str(blocker))
    assert blocker.read_bytes() == b"x" and _leftovers(tmp_path) == []


def test_unpack_output_under_a_file_is_bad_input(model_path, tmp_path, capsys):
    z = tmp_path / "m.onnxz"
    assert main(["pack", str(model_path), str(z), "-q"]) == 0
    blocker = tmp_path / "blocker"
    blocker.write_bytes(b"x")
    _bad(["unpack", z, blocker / "back.onnx"], capsys, str(blocker))


def test_write_error_is_a_user_error(tmp_path, monkeypatch):
    """Any OSError while writing (disk full, permission) is reported in one line, temp file removed."""
    import os

    from onnxslim_cnn.errors import UserError
    from onnxslim_cnn.files import write_atomic

    def full(*_):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(UserError, match="cannot write .*out.bin.*No space left on device"):
        write_atomic(tmp_path / "out.bin", b"data")
    assert list(tmp_path.iterdir()) == []


def test_help_lists_the_subcommands_and_each_has_help(capsys):
    from onnxslim_cnn.cli import SUBCOMMANDS

    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0
    text = capsys.readouterr().out
    for name in ("pack", "unpack", "fpga"):
        assert f"onnxslim {name} " in text, name
        with pytest.raises(SystemExit) as info:
            main([name, "--help"])
        assert info.value.code == 0 and f"usage: onnxslim {name}" in capsys.readouterr().out
    assert set(SUBCOMMANDS) >= {"pack", "unpack", "fpga"}


@pytest.mark.parametrize("command", [[], ["pack"], ["fpga"]])
def test_a_container_given_as_model_says_unpack(model_path, tmp_path, capsys, command):
    z = tmp_path / "m.onnxz"
    assert main(["pack", str(model_path), str(z), "-q"]) == 0
    _bad([*command, z, tmp_path / "out.bin"], capsys, "is an onnxslim container (written by 'onnxslim pack'); "
         "run 'onnxslim unpack' first")


def test_fpga_write_failure_leaves_no_part_of_the_set(tmp_path, monkeypatch, capsys):
    """The seven fpga files are staged first and renamed together: a failure while writing
    (disk full on the third file) leaves none of them, and no temp files."""
    import os

    from onnxslim_cnn.models import digits

    calls = []
    real_fsync = os.fsync

    def third_fails(fd):
        calls.append(fd)
        if len(calls) == 3:
            raise OSError(28, "No space left on device")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", third_fails)
    out = tmp_path / "out"
    _bad(["fpga", digits.fixture_path("digits_resnet"), out, "-q", "--set", "fpga.bits=8", "--calib", "random"],
         capsys,
         "No space left on device")
    assert not out.exists() or sorted(p.name for p in out.iterdir()) == []


def test_pack_of_a_tiny_model_says_larger(model_path, tmp_path, capsys):
    """A model with nothing to code grows by the container header: say so, not '0.9x smaller'."""
    assert main(["pack", str(model_path), str(tmp_path / "m.onnxz")]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert "x larger: nothing to code)" in last and "smaller" not in last, last
