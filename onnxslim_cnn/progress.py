"""Progress of a run: a bar on a terminal, plain lines anywhere else (CI logs, notebooks, pipes).

The pipeline calls ``progress(done, total, label)`` when a step starts (``done`` steps finished,
``label`` the step now running; ``(total, total, "measure")`` once the passes are done). Any
callable of that shape works with :func:`onnxslim_cnn.pipeline.run_pipeline`; :class:`Progress`
is the one the command line uses, and the Python API can use it too::

    from onnxslim_cnn.progress import Progress
    with Progress() as progress:              # lines on stderr unless it is a terminal
        run_pipeline("m.onnx", ["prune", "q8"], calib="c.npz", progress=progress)

Off a terminal, lines come at a bounded rate: none in the first ``interval`` seconds (a run that
short needs none, and its stderr stays clean), then one when a step starts if ``interval``
seconds have passed since the last line or the run advanced by ``min_fraction`` of its steps,
and, while one step runs long (a 9-minute ``share``), a "still running" line every ``interval``
seconds from a background thread, each with the elapsed time and an ETA from the steps done.

Why not rich or tqdm (the issue asks for a maintained library unless there is a reason): neither
gives what a non-terminal needs here. tqdm writes its updates with carriage returns whatever the
stream, so a CI log gets one line that only grows (or a notebook one that is redrawn), and it
writes only when it is called, so one long step shows nothing until it ends; rich's progress
display does not refresh at all when the console is not a terminal. Both would need the same
heartbeat thread and line format written around them; that, the bar and the ETA are the ~150
lines below, with no new dependency for every install.
"""

from __future__ import annotations

import os
import sys
import threading
import time
import weakref
from typing import Callable, Optional, TextIO

Callback = Callable[[int, int, str], None]

# Seconds between lines off a terminal; ONNXSLIM_CNN_PROGRESS_INTERVAL sets it (a CI log that
# wants fewer lines: 60).
DEFAULT_INTERVAL = 10.0
DEFAULT_MIN_FRACTION = 0.10  # or this share of the steps done since the last line


def _default_interval() -> float:
    text = os.environ.get("ONNXSLIM_CNN_PROGRESS_INTERVAL", "")
    try:
        value = float(text)
    except ValueError:
        return DEFAULT_INTERVAL
    return value if value > 0 and value == value else DEFAULT_INTERVAL


def format_seconds(s: float) -> str:
    """``4.2s``, ``1m05s``, ``1h02m``."""
    s = max(0.0, float(s))
    if s < 60:
        return f"{s:.1f}s"
    m, sec = divmod(int(round(s)), 60)
    if m < 60:
        return f"{m}m{sec:02d}s"
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m"


class Progress:
    """A progress callback ``(done, total, label)``.

    ``mode``: ``"auto"`` (a bar when the stream is a terminal, else lines), ``"bar"``,
    ``"lines"`` or ``"off"``. ``stream``: default ``sys.stderr`` as it is at each write (so
    pytest's capture and notebooks' redirection apply). ``interval``, ``min_fraction`` and
    ``quiet_for`` (default ``interval``) bound the rate of lines; ``heartbeat=False`` drops the
    background "still running" lines. ``clock`` is for tests. Call :meth:`close` (or use it as a
    context manager) when the run ends; a printer that is dropped stops its thread too.
    """

    def __init__(self, mode: str = "auto", stream: Optional[TextIO] = None, *, interval: Optional[float] = None,
                 min_fraction: float = DEFAULT_MIN_FRACTION, quiet_for: Optional[float] = None,
                 heartbeat: bool = True, prefix: str = "onnxslim", clock: Callable[[], float] = time.monotonic):
        if mode not in ("auto", "bar", "lines", "off"):
            raise ValueError(f"progress mode must be auto, bar, lines or off, not {mode!r}")
        self._mode = mode
        self._stream = stream
        self.interval = _default_interval() if interval is None else float(interval)
        self.min_fraction = float(min_fraction)
        self.quiet_for = self.interval if quiet_for is None else float(quiet_for)
        self.heartbeat = heartbeat
        self.prefix = prefix
        self.clock = clock
        self.lines_written = 0
        self._lock = threading.Lock()
        self._start: Optional[float] = None
        self._step: Optional[tuple[int, int, str, float]] = None  # done, total, label, started at
        self._last_line: Optional[float] = None
        self._last_fraction = 0.0
        self._bar_open = False
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    # ------------------------------------------------------------------ setup

    @property
    def stream(self) -> TextIO:
        return self._stream if self._stream is not None else sys.stderr

    @property
    def mode(self) -> str:
        if self._mode != "auto":
            return self._mode
        try:
            return "bar" if self.stream.isatty() else "lines"
        except (AttributeError, ValueError):  # a closed or minimal stream
            return "lines"

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------ the callback

    def __call__(self, done: int, total: int, label: str) -> None:
        mode = self.mode
        if mode == "off":
            return
        with self._lock:
            now = self.clock()
            if self._start is None:
                self._start = now
            self._step = (int(done), int(total), str(label), now)
            if mode == "bar":
                self._draw_bar()
                return
            fraction = done / total if total > 0 else 1.0
            if self._due(now) or (now - self._start >= self.quiet_for
                                  and fraction - self._last_fraction >= self.min_fraction):
                self._write_line(now, running=False)
            if self.heartbeat and self._thread is None:
                self._start_heartbeat()

    def close(self) -> None:
        """Stop the heartbeat; end an open bar; off a terminal, a last line if any was written."""
        self._stop.set()
        with self._lock:
            self._stop, self._thread = threading.Event(), None  # usable again for another run
            if self._bar_open:
                self._write("\n")
                self._bar_open = False
            elif self.lines_written and self._start is not None:
                self._write(f"{self.prefix}: finished in {format_seconds(self.clock() - self._start)}\n")
                self.lines_written += 1
            self._start = None

    # ------------------------------------------------------------------ output

    def _due(self, now: float) -> bool:
        if now - self._start < self.quiet_for:
            return False
        return self._last_line is None or now - self._last_line >= self.interval

    def eta(self, now: Optional[float] = None) -> Optional[float]:
        """Seconds left: the mean time of the finished steps times the steps left, less what the
        current one has run (never below the steps after it); None before a step has finished
        or once all have."""
        if self._step is None or self._start is None:
            return None
        done, total, _, step_start = self._step
        now = self.clock() if now is None else now
        if done <= 0 or done >= total:
            return None
        per_step = (step_start - self._start) / done
        return per_step * (total - done - 1) + max(per_step - (now - step_start), 0.0)

    def _eta_text(self, now: float) -> str:
        eta = self.eta(now)
        done, total, _, step_start = self._step
        if eta is None:
            return "ETA unknown" if done < total else ""
        if done > 0 and now - step_start > (step_start - self._start) / done:
            # this step already runs longer than the mean: only the steps after it are estimated
            return f"ETA over {format_seconds(eta)}" if done < total - 1 else "ETA unknown (longer than the mean step)"
        return f"ETA {format_seconds(eta)}"

    def _line(self, now: float, running: bool) -> str:
        done, total, label, step_start = self._step
        head = f"{self.prefix}: step {min(done + 1, total)}/{total} {label}" if done < total \
            else f"{self.prefix}: {total}/{total} passes done, {label}"
        parts = [head]
        if running:
            parts.append(f"running for {format_seconds(now - step_start)}")
        parts.append(f"elapsed {format_seconds(now - self._start)}")
        eta = self._eta_text(now)
        if eta:
            parts.append(eta)
        return ", ".join(parts)

    def _write_line(self, now: float, running: bool) -> None:
        self._write(self._line(now, running) + "\n")
        self.lines_written += 1
        self._last_line = now
        done, total = self._step[0], self._step[1]
        self._last_fraction = done / total if total > 0 else 1.0

    def _draw_bar(self) -> None:
        done, total, label, _ = self._step
        width = 24
        filled = int(width * done / max(total, 1))
        eta = self._eta_text(self.clock()) if self._start is not None else ""
        tail = f" {eta}" if eta and eta != "ETA unknown" else ""
        self._write(f"\r[{'#' * filled}{'.' * (width - filled)}] {done}/{total} {label:<20}{tail:<12}")
        self._bar_open = True
        if done >= total:
            self._write("\n")
            self._bar_open = False

    def _write(self, text: str) -> None:
        try:
            self.stream.write(text)
            self.stream.flush()
        except (OSError, ValueError):  # a closed stream must not fail the run
            pass

    # ------------------------------------------------------------------ heartbeat

    def _tick(self) -> None:
        """One heartbeat: a "still running" line when the current step has been silent for
        ``interval`` seconds (past the quiet start)."""
        with self._lock:
            if self._step is None or self._start is None or self.mode != "lines":
                return
            now = self.clock()
            if self._due(now) and (self._last_line is None or now - self._last_line >= self.interval):
                self._write_line(now, running=True)

    def _start_heartbeat(self) -> None:
        # The thread holds only a weak reference: a printer its caller dropped (an exception
        # out of the pipeline) stops it, as close() does.
        ref, stop = weakref.ref(self), self._stop
        poll = max(0.05, min(1.0, self.interval / 4))

        def beat() -> None:
            while not stop.wait(poll):
                p = ref()
                if p is None:
                    return
                p._tick()
                del p

        self._thread = threading.Thread(target=beat, name="onnxslim-progress", daemon=True)
        weakref.finalize(self, stop.set)
        self._thread.start()


def make_progress(quiet: bool = False, stream: Optional[TextIO] = None, **kw) -> Progress:
    """The command line's printer: off with ``quiet``, else a bar or lines by the stream."""
    return Progress("off" if quiet else "auto", stream, **kw)
