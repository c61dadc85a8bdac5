"""Maths of ``lowrank``: the seed's cost formulas, Jaderberg and Tucker-2 factors, data-aware refit.

Notation of the seed "CNN的压缩和加速": a Conv with C input and N output channels, kernel Kh x Kw,
input H x W, output Ho x Wo, ONNX weight layout [N, C, Kh, Kw].

Jaderberg split (vertical then horizontal). With M = W reshaped to (C·Kh) x (Kw·N),
M[(c,i),(j,n)] = W[n,c,i,j], a rank-D factorisation M ~= A B gives
  conv 1: kernel (Kh,1), D filters  V[d,c,i] = A[(c,i),d]   stride (sh,1), pads (pt,0,pb,0), dilation (dh,1)
  conv 2: kernel (1,Kw), N filters  H[n,d,j] = B[d,(j,n)]   stride (1,sw), pads (0,pl,0,pr), dilation (1,dw)
and sum_d V[d,c,i] H[n,d,j] ~= W[n,c,i,j] (exact at D = min(C·Kh, Kw·N)). Conv 1 has no bias, so
it maps zero columns to zero: the horizontal padding can be applied to its output (by conv 2)
instead of to its input. That is what we do, because it is cheaper: conv 1 then produces Ho rows
(vertical stride and padding are its own) and exactly W columns (the *unpadded* input width;
padding first would make it W + pl + pr). Conv 2 produces Ho x Wo. Hence the seed's formulas
hold literally, with W = the input width:
  T  = C·Kh·Kw·N·Ho·Wo                     (original)
  T1 = C·Kh·D·Ho·W,   T2 = D·Kw·N·Ho·Wo     (split; Ho cancels in the ratio)
  r  = T / (T1 + T2) = C·Kh·Kw·N·Wo / (D·(C·Kh·W + Kw·N·Wo))
  D  = C·Kh·Kw·N·Wo / (r·(C·Kh·W + Kw·N·Wo))                  (``rank_for_speedup``)
A horizontal stride sw > 1 makes W ~= sw·Wo, so strided convs gain less than the seed's
padding-1 special case r = 3CN / (D(C + N)) suggests.
Storage: P = C·Kh·Kw·N, P1 + P2 = D·(C·Kh + Kw·N); the split saves storage iff
D < C·Kh·Kw·N / (C·Kh + Kw·N) (``storage_max_rank`` is the largest such integer).

Tucker-2 (Kim et al. 2016): W ~= G x_1 U_out x_2 U_in, i.e. a 1x1 reduce conv C->R1 (U_in^T),
a KxK core R1->R2 with the original stride/pads/dilations (G), a 1x1 expand R2->N (U_out, bias).
The reduce conv has no bias, so zero padding commutes with it and the core may pad as before.
"""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np

from onnxslim_cnn.analysis.conv_patches import ConvGeometry, patches

from .factorize import top_svd

# --------------------------------------------------------------------------- the seed's formulas


def conv_params(C: int, N: int, Kh: int, Kw: int) -> int:
    """S = C·Kh·Kw·N weights of the original conv (bias not included)."""
    return C * Kh * Kw * N


def split_params(C: int, N: int, Kh: int, Kw: int, D: int) -> tuple[int, int]:
    """(P1, P2) = (C·Kh·D, D·Kw·N): weights of the (Kh,1) conv and of the (1,Kw) conv."""
    return C * Kh * D, D * Kw * N


def storage_max_rank(C: int, N: int, Kh: int, Kw: int) -> int:
    """Largest D with D·(C·Kh + Kw·N) < C·Kh·Kw·N (0 when no split saves storage)."""
    return max(0, (C * Kh * Kw * N - 1) // (C * Kh + Kw * N))


def conv_macs(C: int, N: int, Kh: int, Kw: int, Ho: int, Wo: int) -> int:
    """T = C·Kh·Kw·N·Ho·Wo."""
    return C * Kh * Kw * N * Ho * Wo


def split_macs(C: int, N: int, Kh: int, Kw: int, D: int, Ho: int, W: int, Wo: int) -> tuple[int, int]:
    """(T1, T2) = (C·Kh·D·Ho·W, D·Kw·N·Ho·Wo); W is the input width (see the module docstring)."""
    return C * Kh * D * Ho * W, D * Kw * N * Ho * Wo


def rank_for_speedup(C: int, N: int, Kh: int, Kw: int, W: int, Wo: int, r: float) -> float:
    """The real D at which T / (T1 + T2) = r: C·Kh·Kw·N·Wo / (r·(C·Kh·W + Kw·N·Wo))."""
    return C * Kh * Kw * N * Wo / (r * (C * Kh * W + Kw * N * Wo))


def integer_rank_for_speedup(C: int, N: int, Kh: int, Kw: int, W: int, Wo: int, r: float,
                             rounding: str = "floor") -> int:
    """``rank_for_speedup`` as an integer, in exact rational arithmetic.

    ``floor`` guarantees at least the requested speedup; ``nearest`` is the seed's "约等于"
    (3.79 -> 4, which gives r = 1.89 rather than 2).
    """
    exact = Fraction(C * Kh * Kw * N * Wo) / (Fraction(r) * (C * Kh * W + Kw * N * Wo))
    return math.floor(exact + Fraction(1, 2)) if rounding == "nearest" else math.floor(exact)


def compute_max_rank(C: int, N: int, Kh: int, Kw: int, W: int, Wo: int) -> int:
    """Largest D with T1 + T2 < T (0 when no split is cheaper)."""
    num, den = C * Kh * Kw * N * Wo, C * Kh * W + Kw * N * Wo
    return max(0, (num - 1) // den)


def tucker2_params(C: int, N: int, Kh: int, Kw: int, R1: int, R2: int) -> tuple[int, int, int]:
    """Weights of reduce, core and expand: (C·R1, R1·R2·Kh·Kw, R2·N)."""
    return C * R1, R1 * R2 * Kh * Kw, R2 * N


def tucker2_macs(C: int, N: int, Kh: int, Kw: int, R1: int, R2: int,
                 H: int, W: int, Ho: int, Wo: int) -> tuple[int, int, int]:
    """MACs of reduce (at the input size H x W), core and expand (at Ho x Wo)."""
    return C * R1 * H * W, R1 * R2 * Kh * Kw * Ho * Wo, R2 * N * Ho * Wo


def tucker2_ranks_for_speedup(C: int, N: int, Kh: int, Kw: int, H: int, W: int, Ho: int, Wo: int,
                              r: float) -> "tuple[int, int] | None":
    """Largest (R1, R2) in proportion to (C, N) whose MACs are at most T / r; None if none is."""
    budget = Fraction(conv_macs(C, N, Kh, Kw, Ho, Wo)) / Fraction(r)
    for R1 in range(C, 0, -1):
        R2 = max(1, min(N, round(R1 * N / C)))
        if sum(tucker2_macs(C, N, Kh, Kw, R1, R2, H, W, Ho, Wo)) <= budget:
            return R1, R2
    return None


# --------------------------------------------------------------------------- factors


def jaderberg_matrix(weight: np.ndarray) -> np.ndarray:
    """[N, C, Kh, Kw] -> M of shape (C·Kh, Kw·N), M[(c,i),(j,n)] = W[n,c,i,j]."""
    N, C, Kh, Kw = weight.shape
    return weight.astype(np.float64).transpose(1, 2, 3, 0).reshape(C * Kh, Kw * N)


def jaderberg_svd(weight: np.ndarray, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
    """Full SVD of the Jaderberg matrix (the whole spectrum is needed to choose D) and its energy."""
    M = jaderberg_matrix(weight)
    U, s, Vt = top_svd(M, None, seed)
    return U, s, Vt, float(np.sum(M * M))


def jaderberg_kernels(U: np.ndarray, s: np.ndarray, Vt: np.ndarray, D: int,
                      shape: tuple[int, int, int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Kernels of the two convs from a rank-D truncation: V [D, C, Kh, 1], H [N, D, 1, Kw].

    The singular values are split evenly (sqrt on each side) so both convs have the same scale.
    """
    N, C, Kh, Kw = shape
    root = np.sqrt(s[:D])
    A = U[:, :D] * root                 # (C·Kh, D)
    B = root[:, None] * Vt[:D]          # (D, Kw·N)
    V = A.T.reshape(D, C, Kh, 1)
    H = B.reshape(D, Kw, N).transpose(2, 0, 1)[:, :, None, :]
    return V, H


def mode_spectra(weight: np.ndarray, seed: int = 0) -> tuple[np.ndarray, np.ndarray, float]:
    """Singular values of the input-channel (C x N·Kh·Kw) and output-channel (N x C·Kh·Kw)
    unfoldings, and the total energy ||W||^2 (the same for both)."""
    W = weight.astype(np.float64)
    N, C = W.shape[:2]
    s_in = top_svd(W.transpose(1, 0, 2, 3).reshape(C, -1), None, seed)[1]
    s_out = top_svd(W.reshape(N, -1), None, seed)[1]
    return s_in, s_out, float(np.sum(W * W))


def tucker2_factors(weight: np.ndarray, R1: int, R2: int, refine: int = 1,
                    seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """HOSVD (plus ``refine`` HOOI sweeps): U_in [C, R1], core G [R2, R1, Kh, Kw], U_out [N, R2]."""
    W = weight.astype(np.float64)
    N, C = W.shape[:2]
    U_in = top_svd(W.transpose(1, 0, 2, 3).reshape(C, -1), R1, seed)[0]
    U_out = top_svd(W.reshape(N, -1), R2, seed)[0]
    for _ in range(refine):
        # HOOI: the best basis of one mode given the other's; never worse than plain HOSVD.
        P = np.einsum("nq,ncij->qcij", U_out, W)
        U_in = top_svd(P.transpose(1, 0, 2, 3).reshape(C, -1), R1, seed)[0]
        Q = np.einsum("cr,ncij->nrij", U_in, W)
        U_out = top_svd(Q.reshape(N, -1), R2, seed)[0]
    G = np.einsum("nq,cr,ncij->qrij", U_out, U_in, W)
    return U_in, G, U_out


# --------------------------------------------------------------------------- data-aware refit

# Upper bound on patch-matrix elements held at once (float32): 2^24 = 64 MB per layer.
PATCH_BUDGET = 1 << 24


def sample_patches(X: np.ndarray, kernel: tuple[int, int], strides: tuple[int, int],
                   pads: tuple[int, int, int, int], dilations: tuple[int, int],
                   max_positions: int, rng: np.random.Generator) -> np.ndarray:
    """im2col on a random subset of output positions: [n, C·Kh·Kw] in (c, i, j) order.

    At most ``max_positions`` positions, and never more than ``PATCH_BUDGET`` elements, so the
    memory stays bounded for any calibration set and layer width.
    """
    geometry = ConvGeometry(kernel=tuple(kernel), strides=tuple(strides), pads=tuple(pads),
                            dilations=tuple(dilations))
    total = geometry.positions(X.shape)
    n = int(min(max_positions, total, max(1, PATCH_BUDGET // (X.shape[1] * kernel[0] * kernel[1]))))
    idx = np.sort(rng.choice(total, size=n, replace=False))
    return patches(X, geometry, idx, np.float32)


def jaderberg_features(V: np.ndarray, Kw: int) -> np.ndarray:
    """Matrix F (C·Kh·Kw, Kw·D) mapping a patch to conv 1's outputs that conv 2 reads, (j, d) order."""
    D, C, Kh, _ = V.shape
    F = np.zeros((C, Kh, Kw, Kw, D))
    for j in range(Kw):  # conv 1 is one column wide: column j of the patch feeds tap j only
        F[:, :, j, j, :] = V[:, :, :, 0].transpose(1, 2, 0)
    return F.reshape(C * Kh * Kw, Kw * D)


def jaderberg_last_matrix(H: np.ndarray) -> np.ndarray:
    """H [N, D, 1, Kw] as a (Kw·D, N) matrix in the (j, d) order of ``jaderberg_features``."""
    N, D, _, Kw = H.shape
    return H[:, :, 0, :].transpose(2, 1, 0).reshape(Kw * D, N)


def jaderberg_last_kernel(B: np.ndarray, N: int, D: int, Kw: int) -> np.ndarray:
    """Inverse of ``jaderberg_last_matrix``."""
    return B.reshape(Kw, D, N).transpose(2, 1, 0)[:, :, None, :]


def tucker2_features(U_in: np.ndarray, G: np.ndarray) -> np.ndarray:
    """Matrix F (C·Kh·Kw, R2) mapping a patch to the core conv's output."""
    C = U_in.shape[0]
    return np.einsum("cr,qrij->cijq", U_in, G).reshape(C * G.shape[2] * G.shape[3], G.shape[0])


def rel_error(Y: np.ndarray, Z: np.ndarray) -> float:
    """||Y - Z||_F / ||Y||_F."""
    denom = float(np.linalg.norm(Y))
    return float(np.linalg.norm(Y - Z) / denom) if denom > 0 else 0.0


def refit_last(P: np.ndarray, weight: np.ndarray, bias: "np.ndarray | None", F: np.ndarray,
               B0: np.ndarray, ridge: float, rng: np.random.Generator,
               P_in: "np.ndarray | None" = None) -> dict:
    """Least-squares refit of the last layer (B, bias) so that (P_in F) B + b matches the
    original conv's output P W + b0 on calibration patches.

    ``P`` are the original conv's input patches; ``P_in`` (default ``P``) those the factorised
    layer actually sees, when earlier layers were already rewritten (then the refit also
    absorbs their error). The ridge pulls towards the SVD solution (B0, b0), not towards zero:
    with few positions (deep layers see 7x7 maps) the solve stays near the weight-space optimum
    instead of overfitting. A fifth of the positions is held out to pick the ridge among
    ``ridge`` x 1, 10, 100, 1000; the refit is kept only if it lowers the held-out error.
    Returns B, b, errors (all positions), the ridge used and whether the refit was kept.
    """
    N = weight.shape[0]
    b0 = np.zeros(N) if bias is None else bias.astype(np.float64)
    Y = P.astype(np.float64) @ weight.astype(np.float64).reshape(N, -1).T + b0
    Q = P if P_in is None else P_in
    Fa = np.hstack([Q.astype(np.float64) @ F, np.ones((len(Q), 1))])
    Ba0 = np.vstack([B0, b0[None, :]])
    hold = rng.random(len(P)) < 0.2
    if hold.all() or not hold.any():
        hold = np.zeros(len(P), bool)
        hold[::5] = True
    train = ~hold
    G, R = Fa[train].T @ Fa[train], Fa[train].T @ Y[train]
    scale = max(float(np.trace(G)) / G.shape[0], 1e-12)
    best, best_err, best_ridge = Ba0, rel_error(Y[hold], Fa[hold] @ Ba0), None
    for factor in (1.0, 10.0, 100.0, 1000.0):
        lam = ridge * factor * scale
        try:
            Ba = np.linalg.solve(G + lam * np.eye(G.shape[0]), R + lam * Ba0)
        except np.linalg.LinAlgError:  # ridge=0 on rank-deficient features
            continue
        err = rel_error(Y[hold], Fa[hold] @ Ba)
        if err < best_err:
            best, best_err, best_ridge = Ba, err, ridge * factor
    return {"B": best[:-1], "bias": best[-1], "kept": best_ridge is not None, "ridge": best_ridge,
            "error_plain": rel_error(Y, Fa @ Ba0), "error": rel_error(Y, Fa @ best),
            "positions": int(len(P))}


def plain_error(P: np.ndarray, weight: np.ndarray, bias: "np.ndarray | None", F: np.ndarray,
                B: np.ndarray) -> float:
    """Output error of the factorised conv on calibration patches, bias included on both sides
    (the same measure as ``refit_last``'s)."""
    N = weight.shape[0]
    b0 = np.zeros(N) if bias is None else bias.astype(np.float64)
    P = P.astype(np.float64)
    return rel_error(P @ weight.astype(np.float64).reshape(N, -1).T + b0, (P @ F) @ B + b0)

