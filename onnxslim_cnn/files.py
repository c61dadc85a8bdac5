"""Atomic file writes: readers see the old file or the new one, never a partial one."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from . import workdir
from .errors import UserError


def write_atomic(path: "str | os.PathLike", data: bytes) -> None:
    """Write ``data`` to a temp file next to ``path``, flush it to disk, then rename it over ``path``.

    Readers see the old file or the new one, never a partial one; an OSError (disk full,
    permissions, a file where a folder should be) is a one-line ``UserError``."""
    write_atomic_many({path: data})


def write_atomic_many(files: "dict[str | os.PathLike, bytes]") -> None:
    """Write several files as one: all are staged as temp files (written and flushed) before any
    is renamed into place, so a failure while writing (disk full) leaves none of them."""
    staged: list[tuple[str, Path]] = []
    try:
        for path, data in files.items():
            path = Path(path)
            folder = path.parent if str(path.parent) else Path(".")
            try:
                folder.mkdir(parents=True, exist_ok=True)
                workdir.sweep(folder, staged=True)
                fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".onnxslim-{path.name}.{os.getpid()}.",
                                           suffix=".part")
                staged.append((tmp, path))
                workdir.track(tmp)
                with os.fdopen(fd, "wb") as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
                umask = os.umask(0)
                os.umask(umask)
                os.chmod(tmp, 0o666 & ~umask)
            except OSError as exc:
                raise write_error(path, exc) from None
        for tmp, path in staged:
            try:
                os.replace(tmp, path)
            except OSError as exc:
                raise write_error(path, exc) from None
            workdir.untrack(tmp)
    except BaseException:
        for tmp, _ in staged:
            Path(tmp).unlink(missing_ok=True)
            workdir.untrack(tmp)
        raise


def write_error(path: "str | os.PathLike", exc: OSError) -> UserError:
    """The one-line error for an output that cannot be written."""
    return UserError(f"cannot write {path}: {exc.strerror or exc}")


def check_outputs(outputs: "dict[str, str | os.PathLike | None]", inputs: "tuple = ()",
                  folders: "tuple[str | os.PathLike, ...]" = ()) -> None:
    """Refuse, before any work is done, output paths that cannot be written as files: a folder,
    a path under a regular file or in a folder that does not exist (like ``cp``: a typo in a
    path must not make new folders), an input file (never modified), or two outputs on one path.

    ``outputs`` maps a label ("output", "--report") to a path (None = not asked for);
    ``folders`` are output folders the command itself creates (``onnxslim fpga``'s OUTDIR),
    whose own parent must exist."""
    created = {Path(f).resolve() for f in folders}
    seen: dict[Path, str] = {}
    for label, path in outputs.items():
        if path is None:
            continue
        p = Path(path)
        if p.is_dir():
            raise UserError(f"{label} {p} is a directory")
        for src in inputs:
            if src is not None and p.exists() and Path(src).exists() and os.path.samefile(src, p):
                raise UserError(f"{label} {p} is the input; choose another path")
        parent = p.resolve().parent
        if parent in created:
            parent = parent.parent
        existing = parent
        while not existing.exists():
            existing = existing.parent
        if not existing.is_dir():
            raise UserError(f"cannot write {label} {p}: {existing} is not a folder")
        if existing != parent:
            raise UserError(f"cannot write {label} {p}: folder {parent} does not exist")
        key = p.resolve()
        if key in seen:
            raise UserError(f"{seen[key]} and {label} are the same file ({p})")
        seen[key] = label
