"""Build the sparse execution-provider library (used by setup.py; no import of the package).

Why a setuptools build step and not scikit-build-core + CMake: the project already installs
with setuptools and maps passes/, runtime/ and models/ into onnxslim_cnn.* through
``package-dir``; setuptools' editable installs keep that mapping working, and an extension
marked optional lets ``pip install`` carry on with the pure-Python tool when the C++ build
fails (no compiler, headers unreachable). scikit-build-core would need CMake in every build
environment and its own editable-redirect machinery for the remapped packages, for one
shared library of a handful of .cc files that a direct compiler call builds in seconds.

The pip ``onnxruntime`` wheel ships no C headers. They come from a pinned, sha256-checked npm
tarball (``com.github.asus4.onnxruntime`` 0.4.9, whose Android .aar holds ``headers/`` with
``onnxruntime_ep_c_api.h``, C API version 29), unpacked once into a cache directory. The
library never links libonnxruntime: ORT hands it the API table through ``CreateEpFactories``.

Environment knobs: ``ONNXSLIM_ORT_HEADERS`` = a folder that already holds the headers (offline
builds); ``ONNXSLIM_CACHE`` = cache root (default ~/.cache/onnxslim-cnn); ``CXX`` = compiler;
``ONNXSLIM_SKIP_NATIVE=1`` = do not build the library; ``ONNXSLIM_SKIP_CUDA=1`` = no CUDA target.
"""

from __future__ import annotations

import hashlib
import http.client
import io
import os
import shutil
import subprocess
import tarfile
import tempfile
import urllib.request
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

HEADERS_URL = ("https://registry.npmjs.org/com.github.asus4.onnxruntime/-/"
               "com.github.asus4.onnxruntime-0.4.9.tgz")
HEADERS_TARBALL_SHA256 = "e59788788818fdde1b2e522e766a21ba0f7d8391de55737abf81e32cc801785d"
AAR_MEMBER = "package/Plugins/Android/onnxruntime.aar"
# Checked again on every build, so a cached copy cannot drift from the pinned tarball.
HEADER_SHA256 = {
    "onnxruntime_c_api.h": "acc0cf4b3f28d39339c76770d76164bb7a0637dc89f5fde764b4017b632f6743",
    "onnxruntime_ep_c_api.h": "e6c986c9e98583f8113b2c6bc3864814883b806d501cf24da4d239c45753e235",
    "onnxruntime_cxx_api.h": "9c63ed5bf0427ddf1c10a99aca0beeec77318ce77d2ea6f7ae76d7d933660f67",
    "onnxruntime_cxx_inline.h": "c508dbb7d8203003a2584b8712118cb88e5b4ef1e1c7876a9974156fb7489301",
}
HEADERS_TAG = "asus4-0.4.9-api29"
# nvcc builds the one .cu file in a few seconds (2.5 s on the 2-core CI machine); a toolkit that
# takes this long is broken, and the CUDA target is optional.
CUDA_BUILD_TIMEOUT_S = 300


class NativeBuildError(RuntimeError):
    """The library could not be built; the message's first line says why (setup.py's warning and
    onnxslim_cnn.runtime quote only that line), the compiler's output follows."""


def _tool_failed(what: str, proc: subprocess.CompletedProcess) -> NativeBuildError:
    # The first "error" line of the tool's output goes on the first line of the message: that is
    # all the install warning and BUILD_FAILED.txt readers show.
    lines = [ln.strip() for ln in (proc.stderr + proc.stdout).splitlines() if ln.strip()]
    first = next((ln for ln in lines if "error" in ln.lower()), lines[-1] if lines else "no output")
    return NativeBuildError(f"{what} (exit status {proc.returncode}): {first}\n{proc.stderr[-4000:]}")


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _headers_ok(folder: Path) -> bool:
    return all((folder / n).is_file() and _sha256(folder / n) == h for n, h in HEADER_SHA256.items())


def cache_root() -> Path:
    return Path(os.environ.get("ONNXSLIM_CACHE") or Path.home() / ".cache" / "onnxslim-cnn")


def fetch_headers(log=print) -> Path:
    """Folder holding the pinned ORT C/C++ API headers, downloading them on first use."""
    given = os.environ.get("ONNXSLIM_ORT_HEADERS")
    if given:
        folder = Path(given)
        if not (folder / "onnxruntime_ep_c_api.h").is_file():
            raise NativeBuildError(f"ONNXSLIM_ORT_HEADERS={given} holds no onnxruntime_ep_c_api.h")
        return folder
    folder = cache_root() / "ort-headers" / HEADERS_TAG
    if _headers_ok(folder):
        return folder
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        usable = os.access(folder.parent, os.W_OK)
    except OSError:
        usable = False
    if not usable:  # a read-only or absent home (CI containers, HOME=/): a per-user temp cache
        user = os.getuid() if hasattr(os, "getuid") else "user"
        folder = Path(tempfile.gettempdir()) / f"onnxslim-cnn-{user}" / "ort-headers" / HEADERS_TAG
        if _headers_ok(folder):
            return folder
        folder.parent.mkdir(parents=True, exist_ok=True)
    log(f"onnxslim-cnn: fetching ONNX Runtime C API headers from {HEADERS_URL}")
    with tempfile.TemporaryDirectory(dir=folder.parent) as tmp:
        tarball = Path(tmp) / "ort.tgz"
        try:
            with urllib.request.urlopen(HEADERS_URL, timeout=120) as resp, open(tarball, "wb") as out:
                shutil.copyfileobj(resp, out, 1 << 20)
        except (OSError, http.client.HTTPException) as exc:  # URLError, timeouts, truncated bodies
            raise NativeBuildError(f"cannot download the ORT headers ({exc!r})") from exc
        if _sha256(tarball) != HEADERS_TARBALL_SHA256:
            raise NativeBuildError(f"{HEADERS_URL} does not match its pinned sha256")
        with tarfile.open(tarball) as tar:
            member = tar.extractfile(AAR_MEMBER)
            if member is None:
                raise NativeBuildError(f"{AAR_MEMBER} missing from the headers tarball")
            aar = zipfile.ZipFile(io.BytesIO(member.read()))
        staged = Path(tmp) / "headers"
        staged.mkdir()
        for name in aar.namelist():
            if name.startswith("headers/") and name.endswith((".h", ".inc")):
                (staged / Path(name).name).write_bytes(aar.read(name))
        if not _headers_ok(staged):
            raise NativeBuildError("the unpacked ORT headers do not match their pinned sha256")
        if folder.exists():
            shutil.rmtree(folder, ignore_errors=True)
        try:
            staged.rename(folder)
        except OSError:
            if not _headers_ok(folder):  # else a concurrent build put the same verified headers there
                raise
    return folder


def find_cxx() -> str:
    cxx = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")
    if not cxx:
        raise NativeBuildError("no C++ compiler found (set CXX or install g++)")
    return cxx


def build_library(src_dir: Path, output: Path, temp_dir: Path, log=print) -> Path:
    """Compile runtime/src/*.cc into one shared library at ``output``."""
    cxx = find_cxx()
    headers = fetch_headers(log)
    sources = sorted(src_dir.glob("*.cc"))
    if not sources:
        raise NativeBuildError(f"no C++ sources in {src_dir}")
    temp_dir.mkdir(parents=True, exist_ok=True)
    # No per-file ISA flags: the kernels pick AVX2 with target pragmas at run time, so the
    # library builds with plain -O3 and still loads on any x86-64.
    common = ["-std=c++17", "-O3", "-fPIC", "-fvisibility=hidden", "-pthread", "-DORT_API_MANUAL_INIT",
              "-I", str(src_dir), "-I", str(headers)]

    def compile_one(source: Path) -> Path:
        obj = temp_dir / (source.stem + ".o")
        cmd = [cxx, *common, "-c", str(source), "-o", str(obj)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise _tool_failed(f"{source.name} does not compile", proc)
        return obj

    log(f"onnxslim-cnn: compiling {len(sources)} sources of the sparse EP with {cxx}")
    with ThreadPoolExecutor(max_workers=max(1, min(4, os.cpu_count() or 1))) as pool:
        objects = list(pool.map(compile_one, sources))
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp_out = output.with_name(output.name + ".tmp")
    cmd = [cxx, "-shared", "-pthread", *map(str, objects), "-o", str(tmp_out)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise _tool_failed("linking the sparse EP failed", proc)
    os.replace(tmp_out, output)
    return output


def build_cuda_library(cuda_dir: Path, output: Path, temp_dir: Path, log=print) -> "Path | None":
    """Optional second target: runtime/src/cuda/*.cu (+ host .cc there) with nvcc, when present.

    The .cu files carry no ORT headers (the kernels' own C ABI), so this needs only nvcc.
    Returns None when there is nothing to build or no nvcc.
    """
    if os.environ.get("ONNXSLIM_SKIP_CUDA") == "1":
        return None
    cuda_dir = cuda_dir.resolve()
    sources = sorted([*cuda_dir.glob("*.cu"), *cuda_dir.glob("*.cc")]) if cuda_dir.is_dir() else []
    nvcc = os.environ.get("NVCC") or shutil.which("nvcc")
    if not sources or not nvcc:
        return None
    temp_dir.mkdir(parents=True, exist_ok=True)
    tmp_out = output.resolve().with_name(output.name + ".tmp")
    # Only cudart (nvcc's default): the kernels are hand-written, and a toolkit without
    # cuSPARSE/cuBLAS must still build. ONNXSLIM_CUDA_LIBS adds e.g. "-lcusparse".
    extra_libs = os.environ.get("ONNXSLIM_CUDA_LIBS", "").split()
    cmd = [nvcc, "-std=c++17", "-O3", "-shared", "-Xcompiler", "-fPIC",
           "-I", str(cuda_dir), "-I", str(cuda_dir.parent), *map(str, sources), *extra_libs, "-o", str(tmp_out)]
    log(f"onnxslim-cnn: compiling {len(sources)} CUDA sources with {nvcc}")
    try:  # a broken toolkit must not hang the install
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=temp_dir, timeout=CUDA_BUILD_TIMEOUT_S)
    except subprocess.TimeoutExpired as exc:
        raise NativeBuildError(f"{nvcc} did not finish within {CUDA_BUILD_TIMEOUT_S} s") from exc
    if proc.returncode != 0:
        raise _tool_failed("the CUDA library does not build", proc)
    os.replace(tmp_out, output)
    return output
