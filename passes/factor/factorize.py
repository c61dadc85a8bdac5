"""Low-rank factorisation maths shared by ``svd`` and ``lowrank``.

Convention: a linear map is ``y = x @ W`` with ``W`` of shape ``[n_in, n_out]``; a rank-k
factorisation is ``W ~= A @ B`` with ``A [n_in, k]`` (first layer) and ``B [k, n_out]`` (second).
Results are float64 and deterministic for a given seed.

Three routes to the top-k SVD, by cost (``top_svd``):
- small matrices: LAPACK's SVD in float64 (exact, well under a second);
- large matrices, small k: randomized SVD (Halko et al.) with the big products in float32 —
  the weights are float32 anyway, and float32 GEMM is twice as fast and halves the memory
  traffic; the small l x n SVD at the end is float64. VGG-16's 25088x4096 FC at rank 256:
  ~3.4 s instead of ~12.6 s with scikit-learn's float64 version (2 cores, quiet);
- large matrices, large k: the eigen-decomposition of the Gram matrix of the smaller side
  (one GEMM and one n x n eigh instead of an m x n SVD).
Data-aware factorisation of a wide-input layer (n_in > n_out) never forms the n_in x n_in input
covariance (5 GB for VGG-16's FC1): it works on the n_out x n_out matrix W^T C W instead.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import numpy as np
import scipy.linalg as sla

# Randomized SVD only where it pays: both sides at least this long, and k a small share of
# them (its cost grows with k + oversampling; past a quarter the Gram route is cheaper).
RANDOMIZED_MIN_DIM = 1024
RANDOMIZED_MAX_RANK_SHARE = 0.25
# Two power iterations. Rank-128 approximation error of 2048x1024 float32 matrices against the
# exact SVD's: +1.6% with a flat (random) spectrum, +0.8% with singular values ~ i^-1/2
# (one iteration: +3.1% / +3.0%, four: +0.6% / +0.1%); each iteration costs ~0.8 s on
# VGG-16's FC1, and trained weights have decaying spectra.
POWER_ITERATIONS = 2
# Below this many elements LAPACK's float64 SVD is fast (1024x1024: ~0.5 s) and exact.
EXACT_MAX_ELEMENTS = 1 << 20
# Gram matrices whose GEMM costs more than this many multiply-adds are formed in float32.
GRAM64_MAX_MACS = 2e9
# Symmetric eigen-problems from this size on are solved in float32 (see _eig_input).
EIGH32_MIN_DIM = 2048
# Directions with singular value below this share of the largest carry nothing; their factor
# columns are set to zero rather than divided by ~0 (rank-deficient weights).
TINY = 1e-7


@dataclass
class Factors:
    A: np.ndarray  # [n_in, k]
    B: np.ndarray  # [k, n_out]
    singular_values: np.ndarray  # of the matrix that was truncated (whitened one when data-aware)
    total_energy: float  # sum of all its squared singular values

    @property
    def rank(self) -> int:
        return self.A.shape[1]

    def kept_energy(self) -> float:
        s = self.singular_values[: self.rank]
        return float(min(1.0, np.sum(s * s) / self.total_energy)) if self.total_energy > 0 else 1.0

    def truncated(self, k: int) -> "Factors":
        """The rank-k factors (SVD truncations are nested: the best rank k is a prefix)."""
        return Factors(self.A[:, :k], self.B[:k], self.singular_values, self.total_energy)


def max_useful_rank(n_in: int, n_out: int) -> int:
    """Largest k for which two factors hold fewer parameters than W: k (n_in + n_out) < n_in n_out."""
    return max(0, (n_in * n_out - 1) // (n_in + n_out))


def rank_for_ratio(n_in: int, n_out: int, ratio: float) -> int:
    """Largest k whose factors hold at most ``ratio`` of W's parameters (at least 1)."""
    return max(1, int(np.floor(ratio * n_in * n_out / (n_in + n_out))))


def rank_for_energy(s: np.ndarray, total_energy: float, energy: float) -> int:
    """Smallest k whose top-k squared singular values keep ``energy`` of ``total_energy``."""
    if total_energy <= 0:
        return 1
    cum = np.cumsum(s.astype(np.float64) ** 2) / total_energy
    idx = int(np.searchsorted(cum, energy - 1e-12))
    return min(idx + 1, len(s))


# --------------------------------------------------------------------------- SVD routes


def top_svd(M: np.ndarray, k: "int | None", seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """U [m,k], s [k], Vt [k,n] of the best rank-k approximation (all of them when k is None)."""
    m, n = M.shape
    full = min(m, n)
    k = full if k is None else max(1, min(int(k), full))
    if m * n <= EXACT_MAX_ELEMENTS:
        U, s, Vt = np.linalg.svd(np.asarray(M, dtype=np.float64), full_matrices=False)
        return U[:, :k], s[:k], Vt[:k]
    if full >= RANDOMIZED_MIN_DIM and k <= RANDOMIZED_MAX_RANK_SHARE * full:
        return _randomized_svd(M, k, seed)
    return _gram_svd(M, k)


def _orth(Y: np.ndarray) -> np.ndarray:
    # scipy's economic QR is ~5x faster than numpy's on tall float32 matrices (no full Q)
    return sla.qr(Y, mode="economic", overwrite_a=True, check_finite=False)[0]


def _lu(Y: np.ndarray) -> np.ndarray:
    return sla.lu(Y, permute_l=True, overwrite_a=True, check_finite=False)[0]


def _randomized_svd(M: np.ndarray, k: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    A = np.asarray(M, dtype=np.float32)
    transposed = A.shape[0] < A.shape[1]
    if transposed:  # the sketch lives on the longer side; the small SVD on the shorter one
        A = A.T
    n = A.shape[1]
    width = min(n, k + max(10, k // 4))  # oversampling
    omega = np.random.default_rng(seed).standard_normal((n, width), dtype=np.float32)
    Q = A @ omega
    for _ in range(POWER_ITERATIONS):
        # normalising between products keeps the small directions alive; LU (as scikit-learn
        # does) is enough for that and costs half a QR; the last basis must be orthonormal
        Q = _lu(A @ _lu(A.T @ _lu(Q)))
    Q = _orth(Q)
    Ub, s, Vt = np.linalg.svd((Q.T @ A).astype(np.float64), full_matrices=False)
    U = Q @ Ub[:, :k].astype(np.float32)
    U, s, Vt = U.astype(np.float64), s[:k], Vt[:k]
    return (Vt.T, s, U.T) if transposed else (U, s, Vt)


def _gram(M: np.ndarray) -> np.ndarray:
    """M^T M, in float64 when affordable, else float32 (weights are float32 to begin with).

    The last result is kept for the same memory: choosing a rank by energy takes the spectrum
    and then the factors of one weight, and its Gram product is the costly part (2 s for
    VGG-16's FC1). The key is the buffer (a weak reference to the array owning it, address,
    shape, strides, dtype) plus a sample of its values, so a transposed view of the same
    weight hits and a recycled or rewritten buffer does not.
    """
    owner = M
    while isinstance(owner.base, np.ndarray):
        owner = owner.base
    key = (M.__array_interface__["data"][0], M.shape, M.strides, M.dtype.str, _sample(M))
    ref, cached_key, G = _GRAM_CACHE
    if ref is not None and ref() is owner and cached_key == key:
        return G
    m, n = M.shape
    dtype = np.float64 if m * n * n <= GRAM64_MAX_MACS else np.float32
    Mc = np.asarray(M, dtype=dtype)
    G = Mc.T @ Mc
    try:
        _GRAM_CACHE[:] = [weakref.ref(owner), key, G]
    except TypeError:  # not weak-referenceable: no caching
        pass
    return G


def _sample(M: np.ndarray) -> bytes:
    return np.ascontiguousarray(M[:: max(1, M.shape[0] // 31), :: max(1, M.shape[1] // 31)]).tobytes()


_GRAM_CACHE: list = [None, None, None]


def _eig_input(G: np.ndarray) -> np.ndarray:
    # LAPACK's float64 eigh on 4096x4096 takes ~10 s against ~4 s in float32, and a Gram
    # matrix of float32 weights holds no more than float32 precision anyway
    return G.astype(np.float32, copy=False) if len(G) >= EIGH32_MIN_DIM else G


def _eigvals(G: np.ndarray) -> np.ndarray:
    """All eigenvalues of a symmetric matrix, descending, clipped at 0, float64."""
    w = sla.eigh(_eig_input(G), eigvals_only=True, driver="evd", check_finite=False)
    return np.maximum(np.sort(w.astype(np.float64))[::-1], 0.0)


def _top_eigh(G: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-k eigenvalues (descending, clipped at 0) and eigenvectors of a symmetric matrix."""
    n = len(G)
    if n >= 1024 and k <= n // 4:  # only the wanted eigenvectors (MRRR): 3x faster for k = 256 of 4096
        w, V = sla.eigh(_eig_input(G), subset_by_index=[n - k, n - 1], driver="evr", check_finite=False)
    else:
        w, V = sla.eigh(_eig_input(G), driver="evd", check_finite=False)
    order = np.argsort(w)[::-1][:k]  # ties keep LAPACK's order: deterministic
    return np.maximum(w[order].astype(np.float64), 0.0), V[:, order].astype(np.float64)


def _gram_svd(M: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    transposed = M.shape[0] < M.shape[1]
    A = M.T if transposed else M
    G = _gram(A)
    ev, V = _top_eigh(G, k)
    s = np.sqrt(ev)
    work = G.dtype  # float32 exactly when the Gram product itself was too big for float64
    U = np.asarray(A, dtype=work) @ V.astype(work)
    U /= np.where(s > TINY * max(s[0], 1e-30), s, np.inf).astype(work)  # in place: U can be 600 MB
    U = U.astype(np.float64, copy=False)
    return (V, s, U.T) if transposed else (U, s, V.T)


def _sq_norm(M: np.ndarray) -> float:
    """||M||_F^2 accumulated in float64 by blocks of ~4M values (no float64 copy of a big weight)."""
    if not M.flags.c_contiguous and M.T.flags.c_contiguous:
        M = M.T  # same norm; row blocks of a transposed view would be strided copies
    step = max(1, (1 << 22) // max(M.shape[1], 1))
    total = 0.0
    for i in range(0, M.shape[0], step):
        c = np.asarray(M[i:i + step], dtype=np.float64).ravel()
        total += float(np.dot(c, c))
    return total


# --------------------------------------------------------------------------- factorisation


def spectrum(W: np.ndarray, X: "np.ndarray | None" = None, ridge: float = 1e-4,
             k_max: "int | None" = None, seed: int = 0) -> tuple[np.ndarray, float]:
    """Singular values (top ``k_max`` or all) and total energy of W, or of the whitened W."""
    if X is None and k_max is None:
        if W.shape[0] * W.shape[1] <= EXACT_MAX_ELEMENTS:
            s = np.linalg.svd(np.asarray(W, dtype=np.float64), compute_uv=False)
        else:  # eigenvalues only of the smaller Gram matrix: a fraction of a full SVD's cost
            s = np.sqrt(_eigvals(_gram(W.T if W.shape[0] < W.shape[1] else W)))
        return s, _sq_norm(W)
    if X is not None and _use_output_gram(W):
        G = _output_gram(W, X, ridge)
        s = np.sqrt(_eigvals(G))
        return s[:k_max] if k_max else s, float(np.trace(G))
    M = np.asarray(W, dtype=np.float64) if X is None else _whiten(W, X, ridge)[0]
    _, s, _ = top_svd(M, k_max, seed)
    return s, _sq_norm(M)


def factor(W: np.ndarray, k: int, X: "np.ndarray | None" = None, ridge: float = 1e-4,
           seed: int = 0) -> Factors:
    """Best rank-k factors of W: in weight space, or (``X`` given) for the outputs ``X @ W``.

    Data-aware: with C = X^T X / N + ridge * mean(diag) * I = L L^T, minimising
    ||X W - X A B||_F is minimising ||L^T (W - A B)||_F, so the SVD of L^T W gives
    A = L^-T U_k S_k^1/2 and B = S_k^1/2 V_k^T (whiten, factor, un-whiten). When n_in > n_out
    the same factors come from the eigenvectors V of W^T C W (= M^T M for M = L^T W):
    A = W V_k S_k^-1/2, B = S_k^1/2 V_k^T, without the n_in x n_in covariance.
    """
    if X is None:
        U, s, Vt = top_svd(W, k, seed)
        root = np.sqrt(s)
        U *= root  # in place: top_svd's U is always a fresh array
        return Factors(U, root[:, None] * Vt, s, _sq_norm(W))
    if _use_output_gram(W):
        G = _output_gram(W, X, ridge)
        ev, V = _top_eigh(G, min(k, W.shape[1]))
        s = np.sqrt(ev)
        ok = s > TINY * max(s[0], 1e-30)
        scale = np.where(ok, 1.0 / np.sqrt(np.where(ok, s, 1.0)), 0.0)
        work = np.float32 if W.dtype == np.float32 else np.float64  # no float64 copy of a big weight
        A = (W @ V.astype(work)).astype(np.float64) * scale
        return Factors(A, (np.sqrt(s) * ok)[:, None] * V.T, s, float(np.trace(G)))
    M, L = _whiten(W, X, ridge)
    U, s, Vt = top_svd(M, k, seed)
    root = np.sqrt(s)
    A = sla.solve_triangular(L.T, U * root, lower=False, check_finite=False)
    return Factors(A, root[:, None] * Vt, s, _sq_norm(M))


def _use_output_gram(W: np.ndarray) -> bool:
    # Whitening costs n_in^3 (Cholesky) + n_in^2 n_out; the output-side Gram n_in n_out^2 + n_out^3.
    return W.shape[0] > W.shape[1] and W.shape[0] > 512


def _flat(X: np.ndarray, n_in: int) -> np.ndarray:
    return np.asarray(X, dtype=np.float64).reshape(-1, n_in)


def _output_gram(W: np.ndarray, X: np.ndarray, ridge: float) -> np.ndarray:
    """W^T C W with C = X^T X / N + ridge * mean(diag(X^T X / N)) * I, never forming C."""
    X = _flat(X, W.shape[0])
    Y = X @ np.asarray(W, dtype=np.float64)
    lam = ridge * max(float(np.sum(X * X)) / max(X.size, 1), 1e-12)
    return (Y.T @ Y) / max(len(X), 1) + lam * _gram(W).astype(np.float64)


def _whiten(W: np.ndarray, X: np.ndarray, ridge: float) -> tuple[np.ndarray, np.ndarray]:
    X = _flat(X, W.shape[0])
    C = X.T @ X / max(len(X), 1)
    # a floor under the ridge: with fewer samples than inputs C is singular, and Cholesky fails
    C += (max(ridge, 1e-10) * max(float(np.mean(np.diag(C))), 1e-12)) * np.eye(C.shape[0])
    L = np.linalg.cholesky(C)
    return L.T @ np.asarray(W, dtype=np.float64), L


def output_error(W: np.ndarray, A: np.ndarray, B: np.ndarray, X: np.ndarray) -> float:
    """Relative output error ||X W - X A B|| / ||X W|| on samples X (Frobenius)."""
    X = _flat(X, W.shape[0])
    ref = X @ np.asarray(W, dtype=np.float64)
    denom = float(np.linalg.norm(ref))
    return float(np.linalg.norm(ref - (X @ A) @ B) / denom) if denom > 0 else 0.0


def output_errors(W: np.ndarray, F: Factors, X: np.ndarray) -> np.ndarray:
    """Relative output error of every truncation F.truncated(k), k = 1..rank, in one go.

    Rows b_i of B are mutually orthogonal (B = S^1/2 V^T), so with Y = X W and Z = X A,
    ||Y - Z_k B_k||^2 = ||Y||^2 - sum_{i<k} (2 z_i^T Y b_i - |z_i|^2 |b_i|^2).
    """
    X = _flat(X, W.shape[0])
    Y = X @ np.asarray(W, dtype=np.float64)
    Z = X @ F.A
    total = float(np.sum(Y * Y))
    if total <= 0:
        return np.zeros(F.rank)
    gain = 2.0 * np.einsum("ni,ni->i", Z, Y @ F.B.T) - np.sum(Z * Z, axis=0) * np.sum(F.B * F.B, axis=1)
    return np.sqrt(np.maximum(total - np.cumsum(gain), 0.0) / total)
