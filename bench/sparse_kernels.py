"""Kernel-level bench of the sparse CPU kernels (runtime/src/kernels_*.cc) against dense GEMM.

    python bench/sparse_kernels.py [--out bench/results/sparse_kernels.json] [--quick]

Drives the kernels through their C ABI (kernels_capi.cc) with ctypes: on the library named by
ONNXSLIM_SPARSE_KERNELS_LIB, else on a standalone build of runtime/src/kernels_*.cc made here with
g++ (the sources as they are now), else on the installed EP library when it exports the ABI. The dense baseline is numpy's
float32 matmul (OpenBLAS) limited to the same thread count through threadpoolctl; ORT's MLAS
comparison is bench/sparse.py's. For each shape, sparsity (random unstructured, exact zeros) and
batch: median latency of every format, of ChooseFormat's pick and of dense, with 1 thread then 2,
and the break-even sparsity (lowest measured sparsity where the picked format beats dense).

This module is also the ctypes wrapper the kernel tests use (tests/runtime/test_sparse_kernels.py).
"""

from __future__ import annotations

import argparse
import ctypes
import hashlib
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "runtime" / "src"
FORMATS = {"csr": 0, "block1x4": 1, "block4x1": 2, "dense": 3}
FORMAT_NAMES = {v: k for k, v in FORMATS.items()}


class KernelError(RuntimeError):
    """A C-API call failed; the message is the library's last error."""


def kernel_sources() -> list[Path]:
    return sorted(SRC.glob("kernels_*.cc"))


def build_standalone(out_dir: "Path | None" = None) -> Path:
    """Compile kernels_*.cc (one of them is kernels_capi.cc) into a shared library with g++.

    Cached by a hash of the sources and headers, so repeated test runs compile once. Raises
    FileNotFoundError when no C++ compiler is on PATH, KernelError when the build fails."""
    cxx = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    if not cxx:
        raise FileNotFoundError("no C++ compiler (g++/c++ or $CXX) to build the standalone kernel library")
    files = kernel_sources() + sorted(SRC.glob("kernels_*.h")) + [SRC / "sparse_kernels.h"]
    digest = hashlib.sha256(b"".join(p.read_bytes() for p in files)).hexdigest()[:16]
    out_dir = Path(out_dir or Path(tempfile.gettempdir()) / f"onnxslim-sparse-kernels-{os.getuid()}")
    out_dir.mkdir(parents=True, exist_ok=True)
    lib = out_dir / f"libonnxslim_sparse_kernels_{digest}.so"
    if lib.is_file() and all((out_dir / f"{src.stem}_{digest}.o").is_file() for src in kernel_sources()):
        return lib
    # One object per source, kept beside the library: the tests read them to check that only
    # kernels_avx2.o holds AVX instructions (the library must load on a CPU without AVX2).
    objects = []
    for src in kernel_sources():
        obj = out_dir / f"{src.stem}_{digest}.o"
        cmd = [cxx, "-std=c++17", "-O3", "-fPIC", "-pthread", "-c", str(src), "-o", str(obj)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise KernelError(f"standalone kernel build failed: {' '.join(cmd)}\n{proc.stderr[-3000:]}")
        objects.append(obj)
    tmp = lib.with_suffix(f".{os.getpid()}.tmp")
    cmd = [cxx, "-shared", "-pthread", *map(str, objects), "-o", str(tmp)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise KernelError(f"standalone kernel link failed: {' '.join(cmd)}\n{proc.stderr[-3000:]}")
    tmp.replace(lib)
    return lib


def build_cuda(out_dir: "Path | None" = None) -> Path:
    """nvcc-compile runtime/src/cuda/*.cu into a shared library (cached by source hash). Works
    without a GPU. Raises FileNotFoundError when nvcc is absent, KernelError when it fails."""
    nvcc = os.environ.get("NVCC") or shutil.which("nvcc")
    if not nvcc:
        raise FileNotFoundError("nvcc not found (set NVCC or put the CUDA toolkit on PATH)")
    sources = sorted((SRC / "cuda").glob("*.cu"))
    digest = hashlib.sha256(b"".join(p.read_bytes() for p in sources)).hexdigest()[:16]
    out_dir = Path(out_dir or Path(tempfile.gettempdir()) / f"onnxslim-sparse-kernels-{os.getuid()}")
    out_dir.mkdir(parents=True, exist_ok=True)
    lib = out_dir / f"libonnxslim_sparse_cuda_{digest}.so"
    if lib.is_file():
        return lib
    tmp = lib.with_suffix(f".{os.getpid()}.tmp")
    cmd = [nvcc, "-std=c++17", "-O3", "-shared", "-Xcompiler", "-fPIC", *map(str, sources), "-o", str(tmp)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise KernelError(f"CUDA kernel build failed: {' '.join(cmd)}\n{proc.stderr[-3000:]}")
    tmp.replace(lib)
    return lib


class CudaKernels:
    """The C ABI of runtime/src/cuda/sparse_kernels_cuda.cu (host-pointer calls)."""

    def __init__(self, path: "str | Path"):
        lib = self.lib = ctypes.CDLL(str(path))
        lib.onnxslim_sparse_cuda_create.restype = ctypes.c_void_p
        lib.onnxslim_sparse_cuda_create.argtypes = [_F, _I64, _I64]
        lib.onnxslim_sparse_cuda_multiply_host.argtypes = [ctypes.c_void_p, _F, _I64, _F, ctypes.c_float, _F,
                                                           ctypes.c_int]
        lib.onnxslim_sparse_cuda_nonzeros.restype = _I64
        lib.onnxslim_sparse_cuda_nonzeros.argtypes = [ctypes.c_void_p]
        lib.onnxslim_sparse_cuda_free.argtypes = [ctypes.c_void_p]
        lib.onnxslim_sparse_cuda_last_error.restype = ctypes.c_char_p

    def device_count(self) -> int:
        return self.lib.onnxslim_sparse_cuda_device_count()

    def multiply(self, w: np.ndarray, x: np.ndarray, *, alpha=1.0, bias=None, relu=False) -> "tuple[np.ndarray, int]":
        """(act(alpha * w @ x + bias), nonzeros held) computed on the GPU."""
        w = np.ascontiguousarray(w, dtype=np.float32)
        x = np.ascontiguousarray(x, dtype=np.float32)
        handle = self.lib.onnxslim_sparse_cuda_create(_ptr(w), w.shape[0], w.shape[1])
        if not handle:
            raise KernelError(self.lib.onnxslim_sparse_cuda_last_error().decode())
        try:
            y = np.empty((w.shape[0], x.shape[1]), np.float32)
            b = None if bias is None else np.ascontiguousarray(bias, dtype=np.float32)
            if self.lib.onnxslim_sparse_cuda_multiply_host(handle, _ptr(x), x.shape[1], _ptr(y), alpha, _ptr(b),
                                                           int(relu)) != 0:
                raise KernelError(self.lib.onnxslim_sparse_cuda_last_error().decode())
            return y, self.lib.onnxslim_sparse_cuda_nonzeros(handle)
        finally:
            self.lib.onnxslim_sparse_cuda_free(handle)


def installed_library() -> "Path | None":
    """The EP library of the installed package, when it exports the kernels' C ABI."""
    try:
        import onnxslim_cnn.runtime as rt
    except ImportError:
        return None
    for lib in sorted(Path(rt.__file__).parent.glob("**/*.so")):
        try:
            if hasattr(ctypes.CDLL(str(lib)), "onnxslim_sparse_create"):
                return lib
        except OSError:
            continue
    return None


def find_library() -> Path:
    given = os.environ.get("ONNXSLIM_SPARSE_KERNELS_LIB")
    if given:
        return Path(given)
    try:
        return build_standalone()
    except FileNotFoundError:
        lib = installed_library()
        if lib is None:
            raise
        return lib


_F = ctypes.POINTER(ctypes.c_float)
_I64 = ctypes.c_int64


def _ptr(a: "np.ndarray | None"):
    return None if a is None else a.ctypes.data_as(_F)


class Kernels:
    """The C ABI of kernels_capi.cc, with numpy arrays in and out."""

    def __init__(self, path: "str | Path"):
        self.path = Path(path)
        lib = self.lib = ctypes.CDLL(str(path))
        lib.onnxslim_sparse_create.restype = ctypes.c_void_p
        lib.onnxslim_sparse_create.argtypes = [_F, _I64, _I64, ctypes.c_int, _I64]
        lib.onnxslim_sparse_choose_format.argtypes = [_F, _I64, _I64, _I64]
        lib.onnxslim_sparse_multiply.argtypes = [ctypes.c_void_p, _F, _I64, _I64, _F, _I64, ctypes.c_float, _F,
                                                 ctypes.c_int, ctypes.c_int]
        for name in ("rows", "cols", "nonzeros", "bytes"):
            getattr(lib, f"onnxslim_sparse_{name}").restype = _I64
            getattr(lib, f"onnxslim_sparse_{name}").argtypes = [ctypes.c_void_p]
        lib.onnxslim_sparse_format.argtypes = [ctypes.c_void_p]
        lib.onnxslim_sparse_free.argtypes = [ctypes.c_void_p]
        lib.onnxslim_sparse_isa.restype = ctypes.c_char_p
        lib.onnxslim_sparse_set_isa.argtypes = [ctypes.c_char_p]
        lib.onnxslim_sparse_last_error.restype = ctypes.c_char_p
        if hasattr(lib, "onnxslim_sparse_conv_create"):  # direct sparse conv (SparseConv)
            lib.onnxslim_sparse_conv_create.restype = ctypes.c_void_p
            lib.onnxslim_sparse_conv_create.argtypes = [_F, _I64, _I64, _I64, _I64]
            lib.onnxslim_sparse_conv_run.argtypes = [ctypes.c_void_p, _F, _I64, ctypes.POINTER(_I64), _F, _F,
                                                     ctypes.c_int, ctypes.c_int]
            lib.onnxslim_sparse_conv_nonzeros.restype = _I64
            lib.onnxslim_sparse_conv_nonzeros.argtypes = [ctypes.c_void_p]
            lib.onnxslim_sparse_conv_free.argtypes = [ctypes.c_void_p]
            lib.onnxslim_sparse_conv_path_runs.restype = _I64
            lib.onnxslim_sparse_conv_path_runs.argtypes = [ctypes.c_int]
            lib.onnxslim_sparse_conv_relative_cost.restype = ctypes.c_double
            lib.onnxslim_sparse_conv_relative_cost.argtypes = [_I64] * 9 + [ctypes.c_int]

    def direct_conv(self, w: np.ndarray, x: np.ndarray, *, pads=(0, 0, 0, 0), dilations=(1, 1), bias=None,
                    relu: bool = False, threads: int = 1) -> np.ndarray:
        """Stride-1 NCHW conv of x [N, C, H, W] with w [OC, C, kh, kw] through SparseConv;
        pads = (top, left, bottom, right)."""
        w = np.ascontiguousarray(w, dtype=np.float32)
        x = np.ascontiguousarray(x, dtype=np.float32)
        oc, c, kh, kw = w.shape
        n, _, ih, iw = x.shape
        oh = ih + pads[0] + pads[2] - (kh - 1) * dilations[0]
        ow = iw + pads[1] + pads[3] - (kw - 1) * dilations[1]
        handle = self.lib.onnxslim_sparse_conv_create(_ptr(w), oc, c, kh, kw)
        if not handle:
            raise KernelError(self.error())
        try:
            geometry = (_I64 * 8)(ih, iw, dilations[0], dilations[1], pads[0], pads[1], oh, ow)
            y = np.empty((n, oc, oh, ow), np.float32)
            b = None if bias is None else np.ascontiguousarray(bias, dtype=np.float32)
            if self.lib.onnxslim_sparse_conv_run(handle, _ptr(x), n, geometry, _ptr(y), _ptr(b), int(relu),
                                                 threads) != 0:
                raise KernelError(self.error())
            return y
        finally:
            self.lib.onnxslim_sparse_conv_free(handle)

    def conv_path_runs(self) -> dict:
        return {name: self.lib.onnxslim_sparse_conv_path_runs(i) for i, name in enumerate(("direct", "im2col",
                                                                                           "pointwise"))}

    def error(self) -> str:
        return self.lib.onnxslim_sparse_last_error().decode()

    def isa(self) -> str:
        return self.lib.onnxslim_sparse_isa().decode()

    def set_isa(self, name: str) -> None:
        if self.lib.onnxslim_sparse_set_isa(name.encode()) != 0:
            raise KernelError(self.error())

    def choose_format(self, w: np.ndarray, n_hint: int) -> str:
        w = np.ascontiguousarray(w, dtype=np.float32)
        return FORMAT_NAMES[self.lib.onnxslim_sparse_choose_format(_ptr(w), w.shape[0], w.shape[1], n_hint)]

    def matrix(self, w: np.ndarray, fmt: str = "auto", n_hint: int = 1) -> "Matrix":
        w = np.ascontiguousarray(w, dtype=np.float32)
        code = -1 if fmt == "auto" else FORMATS[fmt]
        handle = self.lib.onnxslim_sparse_create(_ptr(w), w.shape[0], w.shape[1], code, n_hint)
        if not handle:
            raise KernelError(self.error())
        return Matrix(self, handle)


class Matrix:
    def __init__(self, kernels: Kernels, handle: int):
        self.k, self.lib, self.handle = kernels, kernels.lib, handle
        self.rows = self.lib.onnxslim_sparse_rows(handle)
        self.cols = self.lib.onnxslim_sparse_cols(handle)

    def __del__(self):
        if getattr(self, "handle", None):
            self.lib.onnxslim_sparse_free(self.handle)
            self.handle = None

    @property
    def format(self) -> str:
        return FORMAT_NAMES[self.lib.onnxslim_sparse_format(self.handle)]

    @property
    def nonzeros(self) -> int:
        return self.lib.onnxslim_sparse_nonzeros(self.handle)

    @property
    def bytes(self) -> int:
        return self.lib.onnxslim_sparse_bytes(self.handle)

    def multiply(self, x: np.ndarray, *, alpha: float = 1.0, bias: "np.ndarray | None" = None, relu: bool = False,
                 threads: int = 1, out: "np.ndarray | None" = None) -> np.ndarray:
        """act(alpha * W @ x + bias) for x of shape (cols, n), row-major (views with row stride ok)."""
        if x.dtype != np.float32 or x.ndim != 2 or x.shape[0] != self.cols or x.strides[1] != 4:
            raise ValueError(f"x must be float32 ({self.cols}, n) with contiguous rows")
        n = x.shape[1]
        y = np.empty((self.rows, n), np.float32) if out is None else out
        b = None if bias is None else np.ascontiguousarray(bias, dtype=np.float32)
        rc = self.lib.onnxslim_sparse_multiply(self.handle, _ptr(x), n, x.strides[0] // 4, _ptr(y), y.strides[0] // 4,
                                               alpha, _ptr(b), int(relu), threads)
        if rc != 0:
            raise KernelError(self.k.error())
        return y


# ---------------------------------------------------------------------------------------------
# The bench

# (name, M = output rows, K = reduction, batches). FC weights are W[out x in]; convs are the
# im2col product W[OC x C*kh*kw] x X[C*kh*kw x OH*OW] of ResNet-50 (224 input).
SHAPES = [
    ("vgg16_fc6_25088x4096", 4096, 25088, [1, 8, 32]),
    ("vgg16_fc7_4096x4096", 4096, 4096, [1, 8, 32]),
    ("resnet50_conv3x3_256x2304_n196", 256, 2304, [196]),
    ("resnet50_conv1x1_1024x256_n196", 1024, 256, [196]),
    ("resnet50_conv1x1_128x512_n784", 128, 512, [784]),
]
SPARSITIES = [0.5, 0.6, 0.7, 0.8, 0.9, 0.95]
FLUSH = np.zeros(64 << 20 >> 2, np.float32)  # 64 MiB, twice the L3 of the bench machine


def _flush() -> None:
    """Evict W and X from the caches, as the other layers of a network would between calls."""
    np.add(FLUSH, 1.0, out=FLUSH)


def _interleaved_times(calls: dict, reps: int) -> dict:
    """Seconds of each call per rep, candidates run in rotating order rep after rep (caches
    flushed before each), so that load from other processes on a shared machine hits every
    candidate alike and one rep's times are close together in time."""
    times = {k: [] for k in calls}
    names = list(calls)
    for fn in calls.values():
        fn()  # warm-up: page faults, thread start
    for r in range(reps):
        for name in names[r % len(names):] + names[:r % len(names)]:
            _flush()
            t0 = time.perf_counter()
            calls[name]()
            times[name].append(time.perf_counter() - t0)
    return times


def _interleaved_medians(calls: dict, reps: int) -> dict:
    return {k: statistics.median(v) for k, v in _interleaved_times(calls, reps).items()}


def _sparse_weight(rng, dense: np.ndarray, sparsity: float, structure: str) -> np.ndarray:
    m, k = dense.shape
    if structure == "4x1":  # whole 4-row groups of a column pruned together
        keep = rng.random(((m + 3) // 4, k), dtype=np.float32) >= sparsity
        keep = np.repeat(keep, 4, axis=0)[:m]
    else:
        keep = rng.random((m, k), dtype=np.float32) >= sparsity
    return np.where(keep, dense, np.float32(0))


def bench_shape(kern: Kernels, name, m, k, batches, sparsities, structure, reps, rng) -> dict:
    from threadpoolctl import threadpool_limits

    dense_w = rng.standard_normal((m, k), dtype=np.float32)
    out = {"shape": name, "M": m, "K": k, "structure": structure, "runs": []}
    for sparsity in sparsities:
        w = _sparse_weight(rng, dense_w, sparsity, structure)
        mats = {f: kern.matrix(w, f) for f in ("csr", "block1x4", "block4x1")}
        for n in batches:
            x = rng.standard_normal((k, n), dtype=np.float32)
            chosen = kern.choose_format(w, n)
            for threads in (1, 2):
                calls = {f: (lambda mat=mat: mat.multiply(x, threads=threads)) for f, mat in mats.items()}
                calls["dense_numpy"] = lambda: w @ x
                with threadpool_limits(limits=threads):
                    times = _interleaved_times(calls, reps)
                med = {k: statistics.median(v) for k, v in times.items()}
                # Median over reps of the ratio within one rep: steadier than a ratio of medians
                # when the machine's load drifts during the run.
                paired = {f: statistics.median(d / t for d, t in zip(times["dense_numpy"], times[f])) for f in mats}
                dense_s = med["dense_numpy"]
                out["runs"].append({
                    "sparsity": sparsity, "n": n, "threads": threads, "chosen": chosen,
                    "dense_ms": round(dense_s * 1e3, 4),
                    "ms": {f: round(med[f] * 1e3, 4) for f in mats},
                    "speedup_vs_dense": {f: round(dense_s / med[f], 3) for f in mats},
                    "speedup_vs_dense_paired": {f: round(paired[f], 3) for f in mats},
                    "chosen_speedup": round(paired[chosen], 3) if chosen in paired else 1.0,
                    "best_format": min(mats, key=lambda f: med[f]),
                })
                print(f"{name} {structure} s={sparsity} n={n} t={threads}: dense {dense_s * 1e3:.2f} ms, "
                      + ", ".join(f"{f} {paired[f]:.2f}x" for f in mats) + f", chosen {chosen}",
                      file=sys.stderr, flush=True)
    return out


def break_even(runs: list) -> list:
    """Per (n, threads): the lowest measured sparsity from which ChooseFormat's pick beats dense
    (paired ratio > 1) at every higher measured sparsity too (None when it never does)."""
    found = []
    for key in sorted({(r["n"], r["threads"]) for r in runs}):
        rs = sorted((r for r in runs if (r["n"], r["threads"]) == key), key=lambda r: r["sparsity"])
        point = None
        for r in reversed(rs):
            if r["chosen_speedup"] <= 1.0:
                break
            point = r["sparsity"]
        found.append({"n": key[0], "threads": key[1], "break_even_sparsity": point})
    return found


def isa_comparison(kern: Kernels, reps: int, rng) -> list:
    """The portable loops (what a CPU without AVX2 runs) against the AVX2 ones and dense, 1 thread,
    CSR at 90 % random sparsity."""
    from threadpoolctl import threadpool_limits

    rows = []
    for name, m, k, n in [("vgg16_fc6_25088x4096", 4096, 25088, 1), ("vgg16_fc7_4096x4096", 4096, 4096, 32),
                          ("resnet50_conv3x3_256x2304_n196", 256, 2304, 196)]:
        w = _sparse_weight(rng, rng.standard_normal((m, k), dtype=np.float32), 0.9, "random")
        x = rng.standard_normal((k, n), dtype=np.float32)
        mat = kern.matrix(w, "csr")

        def run(isa):
            kern.set_isa(isa)
            mat.multiply(x)

        with threadpool_limits(limits=1):
            times = _interleaved_times({"avx2+fma": lambda: run("avx2+fma"), "portable": lambda: run("portable"),
                                        "dense_numpy": lambda: w @ x}, reps)
        kern.set_isa("auto")
        rows.append({"shape": name, "n": n, "sparsity": 0.9,
                     "ms": {k: round(statistics.median(v) * 1e3, 4) for k, v in times.items()},
                     "portable_over_avx2_time": round(statistics.median(
                         p / a for p, a in zip(times["portable"], times["avx2+fma"])), 3),
                     "portable_speedup_vs_dense": round(statistics.median(
                         d / p for d, p in zip(times["dense_numpy"], times["portable"])), 3)})
        print(f"isa {name} n={n}: {rows[-1]}", file=sys.stderr, flush=True)
    return rows


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", help="also write the JSON here (bench/results/sparse_kernels.json)")
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--quick", action="store_true", help="small shapes only (a smoke run)")
    args = ap.parse_args(argv)
    sys.path.insert(0, str(Path(__file__).parent))
    from _common import emit, machine

    kern = Kernels(find_library())
    rng = np.random.default_rng(0)
    shapes = SHAPES[2:] if args.quick else SHAPES
    results = [bench_shape(kern, *s, SPARSITIES, "random", args.reps, rng) for s in shapes]
    if not args.quick:  # blocked structure: what the block formats and ChooseFormat are for
        results.append(bench_shape(kern, "vgg16_fc7_4096x4096", 4096, 4096, [1, 32], [0.8, 0.9], "4x1", args.reps, rng))
    for r in results:
        r["break_even"] = break_even(r["runs"])
    portable = [] if args.quick or kern.isa() != "avx2+fma" else isa_comparison(kern, args.reps, rng)
    import threadpoolctl

    emit({"bench": "sparse_kernels", "machine": machine(kernel_isa=kern.isa(), kernel_library=kern.path.name,
                                                    load_average_1_5_15min_at_end=os.getloadavg(),
                                                    blas=[i.get("internal_api") for i in threadpoolctl.threadpool_info()]),
          "method": ("--reps calls per candidate, candidates interleaved, caches flushed (64 MiB write) before "
                     "every call; ms = medians; speedup_vs_dense = ratio of medians; speedup_vs_dense_paired and "
                     "chosen_speedup (ChooseFormat's pick; 1.0 when it picks dense) = median over reps of the "
                     "ratio within one rep; break_even from chosen_speedup; dense = numpy float32 matmul "
                     "(OpenBLAS) at the same thread count; random unstructured sparsity unless structure is 4x1"),
          "reps": args.reps, "results": results, "portable_vs_avx2": portable}, args.out)


if __name__ == "__main__":
    main()
