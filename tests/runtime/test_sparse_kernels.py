"""The sparse CPU kernels (runtime/src/kernels_*.cc) through their C ABI, against float64 numpy.

Runs twice: on a standalone g++ build of the kernel sources as they are (skipped with the reason
when there is no compiler) and on the installed EP library when it exports the ABI (skipped when
it is not built). Both ISA paths: the AVX2+FMA
one (when the CPU has it) and the portable one, forced through onnxslim_sparse_set_isa and,
in a fresh process, through the ONNXSLIM_SPARSE_ISA environment variable.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("bench_sparse_kernels", ROOT / "bench" / "sparse_kernels.py")
sk = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(sk)

FORMATS = ["csr", "block1x4", "block4x1", "dense"]
SPARSITIES = [0.0, 0.5, 0.9, 0.99, 1.0]
BATCHES = [1, 7, 32, 45, 196]  # 45 = 32 + 8 + 5 and 16 + 16 + 8 + 5: every vector tile and the tail


@pytest.fixture(scope="module", params=["standalone", "installed"])
def kernels(request):
    if request.param == "standalone":
        try:
            lib = sk.build_standalone()
        except FileNotFoundError as e:
            pytest.skip(str(e))
    else:
        lib = sk.installed_library()
        if lib is None:
            pytest.skip("no installed onnxslim_cnn.runtime library exports the kernels' C ABI")
        newest = max(p.stat().st_mtime for p in sk.kernel_sources())
        if lib.stat().st_mtime < newest:
            pytest.skip(f"{lib} is older than runtime/src/kernels_*.cc: rebuild it (pip install -e .)")
    k = sk.Kernels(lib)
    yield k
    k.set_isa("auto")


def _isas(k) -> list[str]:
    k.set_isa("auto")
    return ["portable"] if k.isa() == "portable" else ["avx2+fma", "portable"]


def _weight(rng, m, k, sparsity):
    w = rng.standard_normal((m, k)).astype(np.float32)
    w[rng.random((m, k)) < sparsity] = 0.0
    w[3] = 0.0  # an all-zero row in every case
    if m > 10:
        w[m - 2] = 0.0
    return w


def _reference(w, x, alpha, bias, relu):
    y = alpha * (w.astype(np.float64) @ x.astype(np.float64))
    if bias is not None:
        y += bias.astype(np.float64)[:, None]
    return np.maximum(y, 0.0) if relu else y


def _assert_close(y, ref, what):
    scale = np.abs(ref).max()
    err = np.abs(y.astype(np.float64) - ref).max()
    assert err <= 1e-5 * max(scale, 1e-30), f"{what}: max error {err:.3g} vs scale {scale:.3g}"


@pytest.mark.parametrize("fmt", FORMATS)
def test_formats_match_float64_reference(kernels, fmt):
    """formats x sparsity {0,50,90,99,100}% x N x bias/relu/alpha x ISA, odd M and K, empty rows."""
    rng = np.random.default_rng(7)
    variants = [(1.0, False, False), (0.75, True, False), (1.0, False, True), (-1.5, True, True)]
    for isa in _isas(kernels):
        kernels.set_isa(isa)
        for sparsity in SPARSITIES:
            w = _weight(rng, 37, 53, sparsity)
            m = kernels.matrix(w, fmt)
            assert (m.format, m.rows, m.cols, m.nonzeros) == (fmt, 37, 53, np.count_nonzero(w))
            for n in BATCHES:
                x = rng.standard_normal((53, n)).astype(np.float32)
                bias = rng.standard_normal(37).astype(np.float32)
                for alpha, use_bias, relu in variants:
                    b = bias if use_bias else None
                    y = m.multiply(x, alpha=alpha, bias=b, relu=relu)
                    what = f"{isa} {fmt} sparsity={sparsity} n={n} alpha={alpha} bias={use_bias} relu={relu}"
                    if sparsity == 1.0:  # no product at all: exactly the epilogue of zero
                        exact = np.zeros((37, n)) + (bias[:, None] if use_bias else 0.0)
                        assert np.array_equal(y, np.maximum(exact, 0) if relu else exact), what
                    else:
                        _assert_close(y, _reference(w, x, alpha, b, relu), what)


@pytest.mark.parametrize("fmt", FORMATS)
def test_long_rows_and_strides(kernels, fmt):
    """Rows long enough for the unrolled batch-1 loops, M not a multiple of 4, ldx/ldy > n."""
    rng = np.random.default_rng(11)
    w = _weight(rng, 70, 403, 0.6)
    m = kernels.matrix(w, fmt)
    for isa in _isas(kernels):
        kernels.set_isa(isa)
        for n in (1, 33):
            xbig = rng.standard_normal((403, n + 5)).astype(np.float32)
            x = xbig[:, 2:2 + n]  # row stride n + 5
            ybig = np.full((70, n + 3), 7.0, np.float32)
            m.multiply(x, bias=np.arange(70, dtype=np.float32), out=ybig[:, :n])
            _assert_close(ybig[:, :n], _reference(w, x, 1.0, np.arange(70, dtype=np.float32), False), f"{isa} n={n}")
            assert np.all(ybig[:, n:] == 7.0), "wrote outside the n columns"


def test_threads_give_identical_bits(kernels):
    rng = np.random.default_rng(3)
    w = _weight(rng, 301, 257, 0.9)
    for fmt in FORMATS:
        m = kernels.matrix(w, fmt)
        for n in (1, 300):
            x = rng.standard_normal((257, n)).astype(np.float32)
            one = m.multiply(x, bias=np.ones(301, np.float32), relu=True, threads=1)
            for threads in (2, 3, 8):
                assert np.array_equal(one, m.multiply(x, bias=np.ones(301, np.float32), relu=True, threads=threads))


def test_storage_counts(kernels):
    w = np.zeros((5, 9), np.float32)
    w[0, [0, 1, 7]] = 1.0  # 1x4: blocks at 0 and at 5 (moved left to end inside the row)
    w[2, 8] = 2.0          # 4x1: strip 0 has columns 0, 1, 7, 8; strip 1 (row 4) none
    csr = kernels.matrix(w, "csr")
    assert (csr.nonzeros, csr.bytes) == (4, 6 * 8 + 4 * 2 + 4 * 4)  # 16-bit column indices (k <= 65536)
    assert kernels.matrix(w, "block1x4").bytes == 6 * 8 + 3 * 4 + 3 * 16
    assert kernels.matrix(w, "block4x1").bytes == 3 * 8 + 4 * 4 + 4 * 16
    assert kernels.matrix(w, "dense").bytes == 45 * 4


def test_choose_format(kernels):
    rng = np.random.default_rng(5)
    random90 = _weight(rng, 256, 512, 0.9)
    strips = np.repeat(_weight(rng, 64, 512, 0.9), 4, axis=0)  # 4x1 structure: rows in fours
    dense = rng.standard_normal((128, 128)).astype(np.float32)
    assert kernels.choose_format(random90, 1) == "csr"
    assert kernels.choose_format(_weight(rng, 256, 512, 0.5), 1) == "csr"
    assert kernels.choose_format(_weight(rng, 256, 512, 0.5), 8) == "block4x1"  # X rows shared by 4 rows
    assert kernels.choose_format(_weight(rng, 256, 512, 0.5), 32) == "csr"
    assert kernels.choose_format(strips, 32) == "block4x1"
    assert kernels.choose_format(dense, 1) == "dense"
    assert kernels.choose_format(dense, 32) == "dense"
    assert [kernels.choose_format(strips, 32) for _ in range(3)] == ["block4x1"] * 3
    assert kernels.matrix(strips, "auto", n_hint=32).format == "block4x1"


def test_errors_are_messages(kernels):
    with pytest.raises(sk.KernelError, match="1x4 block format needs at least 4 columns"):
        kernels.matrix(np.ones((3, 3), np.float32), "block1x4")
    with pytest.raises(sk.KernelError, match="unknown ISA"):
        kernels.set_isa("sse9")
    m = kernels.matrix(np.ones((3, 4), np.float32), "csr")
    assert kernels.lib.onnxslim_sparse_multiply(m.handle, None, 0, 0, None, 0, 1.0, None, 0, 1) == -1
    assert "n >= 1" in kernels.error()


def test_only_the_avx2_unit_holds_avx_instructions():
    """The library must load and run on a CPU without AVX2: every VEX-encoded instruction (any
    v-prefixed mnemonic) must sit in kernels_avx2.o, which runs only after the CPU check."""
    objdump = shutil.which("objdump")
    if objdump is None:
        pytest.skip("objdump (binutils) not found")
    try:
        lib = sk.build_standalone()
    except FileNotFoundError as e:
        pytest.skip(str(e))
    digest = lib.stem.rsplit("_", 1)[1]
    vex = re.compile(r"^\s*[0-9a-f]+:\s+(?:[0-9a-f]{2} )+\s*v[a-z0-9]+\s", re.M)
    counts = {}
    for src in sk.kernel_sources():
        text = subprocess.run([objdump, "-d", str(lib.parent / f"{src.stem}_{digest}.o")], capture_output=True,
                              text=True, check=True).stdout
        counts[src.stem] = len(vex.findall(text))
    assert counts.pop("kernels_avx2") > 100
    assert counts == dict.fromkeys(counts, 0)


def test_env_var_forces_portable_path(kernels):
    code = ("import importlib.util,sys;s=importlib.util.spec_from_file_location('b',sys.argv[1]);"
            "m=importlib.util.module_from_spec(s);s.loader.exec_module(m);print(m.Kernels(sys.argv[2]).isa())")
    out = subprocess.run([sys.executable, "-c", code, str(ROOT / "bench" / "sparse_kernels.py"), str(kernels.path)],
                         env={**os.environ, "ONNXSLIM_SPARSE_ISA": "portable"}, capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "portable"


@pytest.fixture(scope="module")
def cuda_kernels():
    """The CUDA library built with nvcc (the build itself is checked wherever nvcc exists)."""
    try:
        lib = sk.CudaKernels(sk.build_cuda())
    except FileNotFoundError as e:
        pytest.skip(str(e))
    return lib


def test_cuda_matches_float64_reference(cuda_kernels):
    if cuda_kernels.device_count() == 0:
        pytest.skip("no CUDA GPU on this machine (cudaGetDeviceCount found none); the library built with nvcc")
    rng = np.random.default_rng(9)
    for sparsity in SPARSITIES:
        w = _weight(rng, 37, 53, sparsity)
        for n in (1, 7, 32, 45):
            x = rng.standard_normal((53, n)).astype(np.float32)
            bias = rng.standard_normal(37).astype(np.float32)
            for alpha, b, relu in [(1.0, None, False), (-1.5, bias, True)]:
                y, nnz = cuda_kernels.multiply(w, x, alpha=alpha, bias=b, relu=relu)
                assert nnz == np.count_nonzero(w)
                ref = _reference(w, x, alpha, b, relu)
                if sparsity == 1.0:  # only the epilogue: exact
                    np.testing.assert_array_equal(y, ref.astype(np.float32))
                else:
                    _assert_close(y, ref, f"cuda sparsity={sparsity} n={n} alpha={alpha} relu={relu}")
