"""Killed and interrupted runs: nothing left behind after the next run, SIGINT acts within 2 s.

A run keeps every temp file in one folder ``$TMPDIR/onnxslim-cnn-run.<pid>.*`` and stages its
outputs as ``.onnxslim-*<pid>*`` next to them; a SIGKILL leaves those, and the next run removes the
ones whose owner is dead. SIGINT is taken by a waiting thread, so it acts while ORT is busy.
"""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from onnxslim_cnn import workdir

EXAMPLES = Path(__file__).resolve().parents[2] / "models" / "examples"


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_sweep_removes_only_dead_runs_leftovers(tmp_path):
    dead, live = dead_pid(), os.getpid()
    (tmp_path / f"onnxslim-cnn-run.{dead}.abc").mkdir()
    (tmp_path / f"onnxslim-cnn-run.{dead}.abc" / "q8.onnx").write_bytes(b"x")
    (tmp_path / f"onnxslim-cnn-run.{live}.def").mkdir()
    (tmp_path / "unrelated").mkdir()
    assert workdir.sweep(tmp_path) == [f"onnxslim-cnn-run.{dead}.abc"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"onnxslim-cnn-run.{live}.def", "unrelated"]

    staged = [f".onnxslim-out.onnx.{dead}.k2j3.part", f".onnxslim-{dead}-x8y"]
    kept = [f".onnxslim-out.onnx.{live}.a1.part", ".onnxslim-out.onnx.zz.part", "out.onnx"]
    for name in staged + kept:
        (tmp_path / name).write_bytes(b"x") if name.endswith((".part", ".onnx")) else (tmp_path / name).mkdir()
    assert sorted(workdir.sweep(tmp_path, staged=True)) == sorted(staged)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == sorted(kept[:2])


def test_run_folder_holds_the_temp_files_and_goes(tmp_path, monkeypatch):
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    with workdir.run_folder() as folder:
        assert Path(folder).parent == tmp_path and Path(folder).name.startswith(f"onnxslim-cnn-run.{os.getpid()}.")
        with tempfile.TemporaryDirectory(prefix="ort.quant.") as inner:
            assert Path(inner).parent == Path(folder)  # libraries' temp files follow
        with workdir.run_folder() as again:
            assert again == folder  # re-entrant: the pipeline inside the CLI shares it
    assert list(tmp_path.iterdir()) == [] and tempfile.tempdir == str(tmp_path)


def _start(args, tmp: Path) -> subprocess.Popen:
    env = {**os.environ, "TMPDIR": str(tmp)}
    return subprocess.Popen([sys.executable, "-m", "onnxslim_cnn", *map(str, args)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _leftovers(tmp: Path, out_dir: Path) -> list[str]:
    return sorted([p.name for p in tmp.iterdir() if p.name.startswith(("onnxslim", "ort.quant"))]
                  + [p.name for p in out_dir.iterdir() if p.name.startswith(".onnxslim")])


@pytest.mark.corpus
def test_sigkill_at_any_point_leaves_nothing_after_the_next_run(corpus_paths, tmp_path):
    det = corpus_paths["ppocrv4_det"]
    tmp, out_dir = tmp_path / "tmp", tmp_path / "out"
    tmp.mkdir(), out_dir.mkdir()
    q8 = [det, out_dir / "det.q8.onnx", "--passes", "q8", "--input-shape", "x=1,3,320,320", "--calib", "random", "-q"]
    seen_leftovers = False
    for delay in (1.5, 3.0, 4.5):  # import, calibration, the tool's quantization and save
        proc = _start(q8, tmp)
        time.sleep(delay)
        proc.kill()
        proc.wait()
        seen_leftovers |= bool(_leftovers(tmp, out_dir))
    assert seen_leftovers  # the kills did land mid-run
    slim = [EXAMPLES / "digits_vgg.onnx", out_dir / "digits.onnx", "-q"]
    assert _start(slim, tmp).wait() == 0
    assert _leftovers(tmp, out_dir) == []


@pytest.mark.corpus
def test_sigint_exits_within_2_s_during_ort_work_and_cleans_up(corpus_paths, tmp_path):
    det = corpus_paths["ppocrv4_det"]
    tmp, out = tmp_path / "tmp", tmp_path / "det.q8.onnx"
    tmp.mkdir()
    proc = _start([det, out, "--passes", "q8", "--input-shape", "x=1,3,640,640", "--calib", "random", "-q"], tmp)
    time.sleep(3.0)  # past the imports, inside ORT calibration
    assert proc.poll() is None
    t0 = time.monotonic()
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=30)
    waited = time.monotonic() - t0
    assert proc.returncode == 130 and err.strip().splitlines()[-1] == "onnxslim: interrupted"
    assert waited <= 2.0, f"SIGINT took {waited:.1f} s"
    assert not out.exists() and _leftovers(tmp, tmp_path) == []


def test_run_folder_shared_by_threads_goes_with_the_last(tmp_path, monkeypatch):
    """Pipelines run from two threads share the folder; the first to end does not remove it."""
    import tempfile
    import threading

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    inside, release = threading.Event(), threading.Event()
    seen = []

    def other():
        with workdir.run_folder() as folder:
            seen.append(folder)
            inside.set()
            release.wait(10)

    t = threading.Thread(target=other)
    t.start()
    inside.wait(10)
    with workdir.run_folder() as folder:
        assert folder == seen[0]
    assert Path(folder).is_dir()  # the other thread's run is still on
    release.set()
    t.join()
    assert not Path(folder).exists() and tempfile.tempdir == str(tmp_path)
