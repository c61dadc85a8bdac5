"""One temporary folder per run; what a killed run left behind is swept by the next one.

Every temporary file of a run (q8's work folder, ONNX Runtime's quantizer's ``ort.quant.*``
copies of the model, sessions of big models) goes under one folder,
``$TMPDIR/onnxslim-cnn-run.<pid>.<random>``, removed when the run ends. ``tempfile.tempdir``
points there for the run's duration, so libraries that take their temp folder from ``tempfile``
(ORT's quantizer does) follow without being told. Before this a SIGKILL during q8 left about two
model copies in ``$TMPDIR`` (``onnxslim_q8_*``, ``ort.quant.*``) for good.

A SIGKILL still leaves the folder, and the files staged next to an output
(``.onnxslim-<name>.<pid>.<random>.part``, ``.onnxslim-<pid>-<random>/``): both carry the owner's
pid, and the next run removes those whose owner process is gone (:func:`sweep`) — in ``$TMPDIR``
when it starts, in an output folder before it writes there. A pid reused by a live process keeps
its leftovers until that process ends; nothing of a live run is ever removed.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

RUN_PREFIX = "onnxslim-cnn-run."
_RUN_NAME = re.compile(r"^onnxslim-cnn-run\.(\d+)\.")
# staged next to an output: files by files.write_atomic_many, folders by model_io.save_model
_STAGED_NAME = re.compile(r"^\.onnxslim-(?:.+\.(\d+)\.[^.]+\.part|(\d+)-.+)$")

_current: "str | None" = None  # this process's run folder while a run is on
_previous: "str | None" = None  # tempfile.tempdir before it
_users = 0  # runs using _current
_lock = threading.Lock()
_staged: set[str] = set()  # staged output paths of this process not yet renamed or removed


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def sweep(folder: "str | os.PathLike", staged: bool = False) -> list[str]:
    """Remove the leftovers of dead runs in ``folder``: run folders (``staged=False``, for
    ``$TMPDIR``) or files staged next to outputs (``staged=True``). Returns what was removed;
    a folder that cannot be listed is left alone (sweeping is housekeeping, never an error)."""
    pattern = _STAGED_NAME if staged else _RUN_NAME
    removed = []
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return removed
    for entry in entries:
        m = pattern.match(entry.name)
        if not m:
            continue
        pid = int(next(g for g in m.groups() if g))
        if _alive(pid):
            continue
        try:
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.path)
            else:
                os.unlink(entry.path)
            removed.append(entry.name)
        except OSError:
            pass
    return removed


@contextmanager
def run_folder() -> Iterator[str]:
    """This run's temporary folder (``tempfile.tempdir`` while it lasts), removed at the end.
    Shared, not nested: a pipeline inside a CLI command, or pipelines run from several threads of
    one process (``tempfile.tempdir`` is process-wide), use one folder, removed when the last of
    them ends."""
    global _current, _previous, _users
    with _lock:
        if _users == 0:
            base = tempfile.gettempdir()
            sweep(base)
            _current = tempfile.mkdtemp(prefix=f"{RUN_PREFIX}{os.getpid()}.", dir=base)
            _previous, tempfile.tempdir = tempfile.tempdir, _current
        _users += 1
        path = _current
    try:
        yield path
    finally:
        with _lock:
            _users -= 1
            if _users == 0:
                tempfile.tempdir, _current = _previous, None
                shutil.rmtree(path, ignore_errors=True)


def track(path: "str | os.PathLike") -> None:
    """Remember a path staged next to an output, for :func:`remove_all` on an interrupt."""
    _staged.add(str(path))


def untrack(path: "str | os.PathLike") -> None:
    _staged.discard(str(path))


def remove_all() -> None:
    """What this process has in flight, removed at once: staged outputs and run folders. For the
    SIGINT handler, which then exits without unwinding; it may come between a folder's creation
    and its registration, so every run folder carrying this pid goes, registered or not."""
    for p in list(_staged):
        shutil.rmtree(p, ignore_errors=True) if Path(p).is_dir() else Path(p).unlink(missing_ok=True)
    base = Path(_current).parent if _current is not None else Path(tempfile.gettempdir())
    for folder in base.glob(f"{RUN_PREFIX}{os.getpid()}.*"):
        shutil.rmtree(folder, ignore_errors=True)
