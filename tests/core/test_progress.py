"""Progress (onnxslim_cnn/progress.py): a bar on a terminal, bounded-rate lines with an ETA elsewhere."""

from __future__ import annotations

import gc
import io
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from onnxslim_cnn.progress import Progress, format_seconds, make_progress

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "models" / "examples"


class Clock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def lines_printer(**kw):
    clock, out = Clock(), io.StringIO()
    kw.setdefault("heartbeat", False)
    return Progress("lines", out, clock=clock, **kw), clock, out


def test_format_seconds():
    assert format_seconds(4.24) == "4.2s"
    assert format_seconds(65) == "1m05s"
    assert format_seconds(3725) == "1h02m"


def test_off_and_quiet_print_nothing():
    out = io.StringIO()
    p = make_progress(quiet=True, stream=out)
    p(0, 2, "prune")
    p(2, 2, "measure")
    p.close()
    assert out.getvalue() == "" and p.mode == "off"


def test_auto_is_lines_off_a_terminal_and_bar_on_one():
    class Tty(io.StringIO):
        def isatty(self):
            return True

    assert Progress("auto", io.StringIO()).mode == "lines"
    assert Progress("auto", Tty()).mode == "bar"
    with pytest.raises(ValueError):
        Progress("loud")


def test_lines_quiet_start_then_one_line_per_step_with_eta():
    p, clock, out = lines_printer(interval=10)
    p(0, 4, "prune")  # in the first 10 s: nothing (a short run stays silent)
    clock.t += 4
    p(1, 4, "svd")
    assert out.getvalue() == ""
    clock.t += 8  # 12 s in: svd took 8 s, prune 4 s -> mean 6 s per step
    p(2, 4, "q8")
    text = out.getvalue()
    assert text == "onnxslim: step 3/4 q8, elapsed 12.0s, ETA 12.0s\n"
    clock.t += 3
    p(3, 4, "share")  # 25 % more of the run since the last line: a line although < 10 s
    assert out.getvalue().splitlines()[-1] == "onnxslim: step 4/4 share, elapsed 15.0s, ETA 5.0s"
    clock.t += 1
    p(4, 4, "measure")
    assert out.getvalue().splitlines()[-1] == "onnxslim: 4/4 passes done, measure, elapsed 16.0s"
    p.close()
    assert out.getvalue().splitlines()[-1] == "onnxslim: finished in 16.0s"
    assert "\r" not in out.getvalue() and "[" not in out.getvalue()


def test_lines_rate_is_bounded():
    """1000 fine-grained steps over 100 s: a line per 10 s or per 10 % of the steps, not 1000."""
    p, clock, out = lines_printer(interval=10, quiet_for=0)
    for i in range(1000):
        p(i, 1000, f"layer {i}")
        clock.t += 0.1
    n = len(out.getvalue().splitlines())
    assert 5 <= n <= 21, out.getvalue()


def test_heartbeat_line_while_one_step_runs_long():
    p, clock, out = lines_printer(interval=10)
    p(0, 2, "share")
    clock.t += 5
    p._tick()
    assert out.getvalue() == ""  # still in the quiet start
    clock.t += 6
    p._tick()
    assert out.getvalue() == "onnxslim: step 1/2 share, running for 11.0s, elapsed 11.0s, ETA unknown\n"
    clock.t += 5
    p._tick()  # only 5 s since the last line: nothing
    assert len(out.getvalue().splitlines()) == 1
    clock.t += 5
    p._tick()
    assert out.getvalue().splitlines()[-1].startswith("onnxslim: step 1/2 share, running for 21.0s")
    clock.t += 1
    p(1, 2, "q8")
    clock.t += 30  # q8 runs longer than share did: the ETA is a lower bound
    p._tick()
    assert out.getvalue().splitlines()[-1] == ("onnxslim: step 2/2 q8, running for 30.0s, elapsed 52.0s, "
                                               "ETA unknown (longer than the mean step)")


def test_eta_is_a_lower_bound_once_a_step_outruns_the_mean():
    p, clock, out = lines_printer(interval=10, quiet_for=0)
    p(0, 3, "prune")
    clock.t += 10
    p(1, 3, "svd")
    clock.t += 25  # svd: 25 s, the mean step 10 s; the q8 after it is still estimated at 10 s
    p._tick()
    assert out.getvalue().splitlines()[-1].endswith("running for 25.0s, elapsed 35.0s, ETA over 10.0s")


def test_heartbeat_thread_writes_and_stops_on_close():
    out = io.StringIO()
    p = Progress("lines", out, interval=0.05, quiet_for=0)
    p(0, 1, "share")
    deadline = time.monotonic() + 10
    while out.getvalue().count("running for") < 2 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert out.getvalue().count("running for") >= 2
    p.close()
    assert out.getvalue().endswith("\n") and "finished in" in out.getvalue().splitlines()[-1]
    after = out.getvalue()
    time.sleep(0.3)
    assert out.getvalue() == after
    assert not any(t.name == "onnxslim-progress" and t.is_alive() for t in threading.enumerate()
                   if t is p._thread)


def test_dropped_printer_stops_its_thread():
    out = io.StringIO()
    p = Progress("lines", out, interval=0.05, quiet_for=100)
    p(0, 1, "share")
    thread = p._thread
    assert thread.is_alive()
    del p
    gc.collect()
    thread.join(5)
    assert not thread.is_alive()


def test_bar_on_a_terminal():
    out = io.StringIO()
    p = Progress("bar", out)
    p(0, 2, "prune")
    p(1, 2, "svd")
    p(2, 2, "measure")
    text = out.getvalue()
    assert text.startswith("\r[") and "0/2 prune" in text and "2/2 measure" in text and text.endswith("\n")
    p.close()
    assert out.getvalue() == text  # a closed bar adds nothing more


def test_closed_stream_does_not_fail_the_run():
    out = io.StringIO()
    p = Progress("lines", out, quiet_for=0, heartbeat=False)
    out.close()
    p(0, 1, "slim")
    p.close()


def test_interval_from_environment(monkeypatch):
    monkeypatch.setenv("ONNXSLIM_CNN_PROGRESS_INTERVAL", "2.5")
    assert Progress("lines").interval == 2.5
    monkeypatch.setenv("ONNXSLIM_CNN_PROGRESS_INTERVAL", "soon")
    assert Progress("lines").interval == 10.0


def test_api_callback_receives_every_step():
    from onnxslim_cnn.pipeline import run_pipeline

    calls = []
    run_pipeline(str(EXAMPLES / "digits_vgg.onnx"), ["slim"], fidelity=False,
                 progress=lambda done, total, label: calls.append((done, total, label)))
    assert calls == [(0, 1, "slim"), (1, 1, "measure")]


def test_cli_prints_progress_lines_off_a_terminal(tmp_path):
    """A non-terminal run (stderr a pipe, as in CI): step lines with an ETA, and heartbeat lines
    while a pass runs; -q silences them. The interval is cut to 0.2 s so that the digits run
    counts as long."""
    env = dict(os.environ, ONNXSLIM_CNN_PROGRESS_INTERVAL="0.2")
    cmd = [sys.executable, "-m", "onnxslim_cnn", str(EXAMPLES / "digits_vgg.onnx"), str(tmp_path / "o.onnx"),
           "--passes", "prune,svd,q8", "--calib", str(EXAMPLES / "digits_calib.npz")]
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert res.returncode == 0, res.stderr
    lines = res.stderr.splitlines()
    progress = [x for x in lines if x.startswith("onnxslim: ")]
    assert progress and progress == lines, res.stderr  # nothing else on stderr, no \r bar
    assert "\r" not in res.stderr
    assert any(re.match(r"onnxslim: step [23]/3 (svd|q8), elapsed [\d.]+s, ETA [\d.]+s$", x) for x in progress)
    assert any("running for" in x for x in progress)
    assert progress[-1].startswith("onnxslim: finished in ")
    slim = cmd[:5] + ["--passes", "slim", "-q"]
    quiet = subprocess.run(slim, capture_output=True, text=True, env=env, timeout=600)
    assert quiet.returncode == 0 and quiet.stderr == "" and quiet.stdout == ""
