"""The native build never breaks the install, and says why when the library is not built."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _build_module():
    # runtime/build_ep.py installed as onnxslim_cnn.runtime.build_ep (setup.py loads it by path only
    # because its isolated build environment cannot import the package)
    from onnxslim_cnn.runtime import build_ep

    return build_ep


def _project_copy(tmp_path: Path) -> Path:
    """setup.py + pyproject + runtime/ in a scratch folder (no network, no compiler needed)."""
    for name in ("setup.py", "pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, tmp_path / name)
    shutil.copytree(ROOT / "runtime", tmp_path / "runtime",
                    ignore=shutil.ignore_patterns("*.so", "*.BUILD_FAILED.txt", "__pycache__"))
    headers = tmp_path / "headers"
    headers.mkdir()
    (headers / "onnxruntime_ep_c_api.h").write_text("")
    return tmp_path


def test_failed_inplace_build_leaves_the_reason_beside_the_package(tmp_path):
    # What `pip install -e .` does: build_ext --inplace. A library from an earlier build must go,
    # and the reason must be where loader.py looks for it (the package folder, not build/).
    setuptools = pytest.importorskip("setuptools", reason="setuptools is not installed here (pip builds in "
                                     "its own isolated environment)")
    if int(setuptools.__version__.split(".")[0]) < 68:
        pytest.skip(f"setuptools {setuptools.__version__} is older than the build's setuptools>=68")
    project = _project_copy(tmp_path)
    stale = project / "runtime" / "_sparse_ep.so"
    stale.write_bytes(b"old build")
    (project / "runtime" / "_sparse_cuda.so").write_bytes(b"old build")
    env = {**os.environ, "CXX": str(tmp_path / "no-such-compiler"), "ONNXSLIM_ORT_HEADERS": str(project / "headers")}
    proc = subprocess.run([sys.executable, "setup.py", "-q", "build_ext", "--inplace"], cwd=project, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "WARNING onnxslim-cnn: the sparse execution provider library was NOT built" in proc.stderr
    assert not stale.exists() and not (project / "runtime" / "_sparse_cuda.so").exists()
    reason = (project / "runtime" / "_sparse_ep.BUILD_FAILED.txt").read_text()
    assert "no-such-compiler" in reason.splitlines()[0]


def test_broken_compilers_give_a_first_line_that_says_why(tmp_path, monkeypatch):
    build = _build_module()
    false = shutil.which("false")
    if false is None:
        pytest.skip("no `false` program on this machine")
    monkeypatch.setenv("NVCC", false)
    monkeypatch.delenv("ONNXSLIM_SKIP_CUDA", raising=False)
    with pytest.raises(build.NativeBuildError) as info:
        build.build_cuda_library(ROOT / "runtime" / "src" / "cuda", tmp_path / "cuda.so", tmp_path / "tmp")
    first = str(info.value).splitlines()[0]
    assert first.startswith("the CUDA library does not build (exit status 1): ")
    assert not (tmp_path / "cuda.so").exists()

    headers = tmp_path / "headers"
    headers.mkdir()
    (headers / "onnxruntime_ep_c_api.h").write_text("")
    monkeypatch.setenv("CXX", false)
    monkeypatch.setenv("ONNXSLIM_ORT_HEADERS", str(headers))
    with pytest.raises(build.NativeBuildError) as info:
        build.build_library(ROOT / "runtime" / "src", tmp_path / "ep.so", tmp_path / "obj", log=lambda *_: None)
    assert "does not compile (exit status 1)" in str(info.value).splitlines()[0]


def test_sources_ship_in_the_sdist():
    # MANIFEST.in must carry everything build_ep.py compiles, or `pip install <sdist>` builds nothing.
    manifest = (ROOT / "MANIFEST.in").read_text()
    assert "include runtime/build_ep.py" in manifest
    patterns = {p for line in manifest.splitlines() if line.startswith("recursive-include runtime/src")
                for p in line.split()[2:]}
    sources = [p for p in (ROOT / "runtime" / "src").rglob("*") if p.is_file()]
    assert sources and all(f"*{p.suffix}" in patterns for p in sources), patterns


def test_unwritable_cache_falls_back_to_a_temp_cache(tmp_path, monkeypatch):
    build = _build_module()
    cached = build.cache_root() / "ort-headers" / build.HEADERS_TAG
    if not build._headers_ok(cached):
        pytest.skip(f"no verified header cache at {cached} to copy (the build downloads it)")
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv("ONNXSLIM_CACHE", str(blocker / "cache"))  # cannot be created
    monkeypatch.delenv("ONNXSLIM_ORT_HEADERS", raising=False)
    monkeypatch.setattr(build.tempfile, "gettempdir", lambda: str(tmp_path / "tmp"))
    user = os.getuid() if hasattr(os, "getuid") else "user"
    fallback = tmp_path / "tmp" / f"onnxslim-cnn-{user}" / "ort-headers" / build.HEADERS_TAG
    shutil.copytree(cached, fallback)
    assert build.fetch_headers(log=lambda *_: None) == fallback
