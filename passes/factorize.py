"""Low-rank factorisation maths shared by ``svd`` and ``lowrank``.

Convention: a linear map is ``y = x @ W`` with ``W`` of shape ``[n_in, n_out]``; a rank-k
factorisation is ``W ~= A @ B`` with ``A [n_in, k]`` (first layer) and ``B [k, n_out]`` (second).
Everything is float64 inside and deterministic for a given seed.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# Above this many rows and columns, and for ranks well below them, scikit-learn's randomized
# SVD is used: VGG-16's 25088x4096 FC factors in seconds instead of a minute.
RANDOMIZED_MIN_DIM = 1024
RANDOMIZED_MAX_RANK_SHARE = 0.5


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
        return float(np.sum(s * s) / self.total_energy) if self.total_energy > 0 else 1.0


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


def top_svd(M: np.ndarray, k: "int | None", seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """U [m,k], s [k], Vt [k,n] of the best rank-k approximation (all of them when k is None)."""
    m, n = M.shape
    full = min(m, n)
    if k is not None and min(m, n) >= RANDOMIZED_MIN_DIM and k <= RANDOMIZED_MAX_RANK_SHARE * full:
        from sklearn.utils.extmath import randomized_svd

        U, s, Vt = randomized_svd(M, n_components=k, n_oversamples=max(10, k // 4), n_iter=4,
                                  random_state=seed)
        return U, s, Vt
    U, s, Vt = np.linalg.svd(M, full_matrices=False)
    k = full if k is None else min(k, full)
    return U[:, :k], s[:k], Vt[:k]


def spectrum(W: np.ndarray, X: "np.ndarray | None" = None, ridge: float = 1e-4,
             k_max: "int | None" = None, seed: int = 0) -> tuple[np.ndarray, float]:
    """Singular values (top ``k_max`` or all) and total energy of W, or of the whitened W."""
    M = W.astype(np.float64) if X is None else _whiten(W, X, ridge)[0]
    total = float(np.sum(M * M))
    _, s, _ = top_svd(M, k_max, seed)
    return s, total


def factor(W: np.ndarray, k: int, X: "np.ndarray | None" = None, ridge: float = 1e-4,
           seed: int = 0) -> Factors:
    """Best rank-k factors of W: in weight space, or (``X`` given) for the outputs ``X @ W``.

    Data-aware: with C = X^T X / N + ridge * mean(diag) * I = L L^T, minimising
    ||X W - X A B||_F is minimising ||L^T (W - A B)||_F, so the SVD of L^T W gives
    A = L^-T U_k S_k^1/2 and B = S_k^1/2 V_k^T (whiten, factor, un-whiten).
    """
    W = W.astype(np.float64)
    if X is None:
        U, s, Vt = top_svd(W, k, seed)
        total = float(np.sum(W * W))
        root = np.sqrt(s)
        return Factors(U * root, root[:, None] * Vt, s, total)
    M, L = _whiten(W, X, ridge)
    U, s, Vt = top_svd(M, k, seed)
    root = np.sqrt(s)
    A = np.linalg.solve(L.T, U * root)
    return Factors(A, root[:, None] * Vt, s, float(np.sum(M * M)))


def _whiten(W: np.ndarray, X: np.ndarray, ridge: float) -> tuple[np.ndarray, np.ndarray]:
    X = X.reshape(-1, W.shape[0]).astype(np.float64)
    C = X.T @ X / max(len(X), 1)
    C += (ridge * max(float(np.mean(np.diag(C))), 1e-12)) * np.eye(C.shape[0])
    L = np.linalg.cholesky(C)
    return L.T @ W.astype(np.float64), L


def output_error(W: np.ndarray, A: np.ndarray, B: np.ndarray, X: np.ndarray) -> float:
    """Relative output error ||X W - X A B|| / ||X W|| on samples X (Frobenius)."""
    X = X.reshape(-1, W.shape[0]).astype(np.float64)
    ref = X @ W.astype(np.float64)
    denom = float(np.linalg.norm(ref))
    return float(np.linalg.norm(ref - (X @ A) @ B) / denom) if denom > 0 else 0.0
