"""Find the built sparse-EP library and register it with ONNX Runtime (once per process)."""

from __future__ import annotations

import os
import threading
from pathlib import Path

from onnxslim_cnn.errors import UserError

EP_NAME = "OnnxSlimSparseEP"  # the name the library's factory reports (ep_common.h kEpName)
REGISTRATION_NAME = "onnxslim_sparse"
MIN_ORT_VERSION = (1, 24)  # ep_common.h kMinOrtApiVersion: plugin EP API with graph access
_LIBRARY_STEM = "_sparse_ep"
_lock = threading.Lock()
_registered: "str | None" = None


class SparseRuntimeUnavailable(UserError):
    """The sparse EP cannot be used here; the message says why and what to do."""


def _package_dir() -> Path:
    return Path(__file__).resolve().parent


def library_path() -> Path:
    """The EP shared library of this installation (ONNXSLIM_SPARSE_EP_LIBRARY overrides it)."""
    override = os.environ.get("ONNXSLIM_SPARSE_EP_LIBRARY")
    if override:
        path = Path(override)
        if not path.is_file():
            raise SparseRuntimeUnavailable(f"ONNXSLIM_SPARSE_EP_LIBRARY={override} does not exist")
        return path
    folder = _package_dir()
    for suffix in (".so", ".dll", ".dylib"):
        path = folder / (_LIBRARY_STEM + suffix)
        if path.is_file():
            return path
    failed = folder / (_LIBRARY_STEM + ".BUILD_FAILED.txt")
    why = failed.read_text().strip().splitlines()[0] if failed.is_file() else "it was not built"
    raise SparseRuntimeUnavailable(
        f"the sparse execution provider library is missing from {folder} ({why}); reinstall with a C++ "
        "compiler and network access to registry.npmjs.org (or ONNXSLIM_ORT_HEADERS=<headers dir>): "
        "python3 -m pip install -e . in a checkout, else python3 -m pip install --force-reinstall --no-deps "
        "--no-binary onnxslim-cnn onnxslim-cnn"
    )


def _ort_version(ort) -> "tuple[int, int]":
    parts = ort.__version__.split(".")
    try:
        return int(parts[0]), int(parts[1])
    except (IndexError, ValueError):
        return (0, 0)


def check_onnxruntime():
    """The onnxruntime module, or a clear refusal when it is too old for plugin EPs."""
    import onnxruntime as ort

    if _ort_version(ort) < MIN_ORT_VERSION or not hasattr(ort, "register_execution_provider_library"):
        need = ".".join(map(str, MIN_ORT_VERSION))
        raise SparseRuntimeUnavailable(
            f"the sparse execution provider needs onnxruntime >= {need} (plugin EP API); "
            f"this is onnxruntime {ort.__version__}: python3 -m pip install -U onnxruntime"
        )
    return ort


def ensure_registered() -> list:
    """Register the library with ORT's environment (idempotent) and return its OrtEpDevices."""
    global _registered
    ort = check_onnxruntime()
    path = str(library_path())
    with _lock:
        if _registered is None:
            try:
                ort.register_execution_provider_library(REGISTRATION_NAME, path)
            except Exception as exc:  # ORT raises its own types; the reason is in the message
                raise SparseRuntimeUnavailable(f"onnxruntime refused to load {path}: {exc}") from exc
            _registered = path
    devices = [d for d in ort.get_ep_devices() if d.ep_name == EP_NAME]
    if not devices:
        raise SparseRuntimeUnavailable(f"{path} is registered but offers no {EP_NAME} device")
    return devices
