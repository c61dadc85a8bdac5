"""Training-free recovery for ``prune``: refit consumers by least squares (He et al. 2017, ThiNet).

After channels are removed, each consumer (Conv with groups=1, Gemm, MatMul) still has to produce
its original outputs from fewer inputs. With its input activations X (calibration data, original
model) and its original pre-activation output Y = X W + b, the remaining weights and the bias are
refitted by ridge least squares: min ||X_kept W' + b' - Y||^2 + ridge * ||W'||^2. Convs go through
the shared im2col (``analysis.conv_patches``) on a deterministic subsample of output positions.
"""

from __future__ import annotations

import numpy as np

from onnxslim_cnn.analysis.conv_patches import MAX_POSITIONS, ConvGeometry, output_rows, patches, sample_positions


# A refit from fewer rows (samples, or sampled output positions of a conv) than about one per
# two input features fits those rows, not the input distribution: digits VGG pruned at 0.1 kept
# held-out cosine 0.9908 with the mean-compensated weights and fell to 0.9602 refitted on 48
# samples (0.2 rows per feature of its 256-input FC), while at 0.5 from 288 samples (0.56 rows
# per feature of the 513 left to its first FC) the refit keeps top-1 within 2 points where the
# unrefitted model falls below 50 %. Such a layer keeps its compensated weights.
MIN_ROWS_PER_FEATURE = 0.5


def enough_rows(op: str, attrs: dict, w_shape: tuple, x_shape: tuple, kept_inputs: int) -> bool:
    """Whether the calibration activations ``x_shape`` give a refit of the layer enough rows."""
    if op == "Conv":
        geometry = ConvGeometry.from_attrs(attrs, w_shape[2:])
        rows = min(geometry.positions(x_shape), MAX_POSITIONS)
        features = kept_inputs * int(np.prod(w_shape[2:]))
    else:
        rows = int(np.prod(x_shape[:-1]))
        features = kept_inputs
    return rows >= MIN_ROWS_PER_FEATURE * (features + 1)


def design_matrix(op: str, attrs: dict, w: np.ndarray, x: np.ndarray, seed: int) -> np.ndarray:
    """Rows = samples (or sampled output positions), columns = the layer's input features."""
    if op != "Conv":
        return x.reshape(-1, x.shape[-1]).astype(np.float64)
    geometry = ConvGeometry.from_attrs(attrs, w.shape[2:])
    return patches(x, geometry, sample_positions(geometry.positions(x.shape), seed), np.float64)


def refit(op: str, attrs: dict, w: np.ndarray, bias: "np.ndarray | None", x: np.ndarray,
          in_mask: np.ndarray, out_mask: "np.ndarray | None", ridge: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """New (weight, bias) for a consumer that keeps only ``in_mask`` inputs (and ``out_mask`` outputs).

    ``w`` is in ONNX layout: Conv [O, C, kh, kw]; Gemm/MatMul given as [K, O] (y = x @ w).
    Returns the weight in the same layout with the kept inputs/outputs, and a 1-D bias [O_kept].
    """
    A = design_matrix(op, attrs, w, x, seed)
    if op == "Conv":
        o, c = w.shape[:2]
        wf = w.reshape(o, -1).T.astype(np.float64)  # [C*k, O]
        col_keep = np.repeat(in_mask, int(np.prod(w.shape[2:])))
    else:
        wf = w.astype(np.float64)
        col_keep = in_mask
    b = np.zeros(wf.shape[1]) if bias is None else np.broadcast_to(bias.astype(np.float64).reshape(-1), (wf.shape[1],))
    if out_mask is not None:
        wf, b = wf[:, out_mask], b[out_mask]
    target = A @ wf + b
    Ak = np.concatenate([A[:, col_keep], np.ones((len(A), 1))], axis=1)
    gram = Ak.T @ Ak
    reg = ridge * float(np.mean(np.diag(gram))) * np.eye(len(gram))
    reg[-1, -1] = 0.0  # the bias is not shrunk
    sol = np.linalg.solve(gram + reg, Ak.T @ target)
    new_w, new_b = sol[:-1], sol[-1]
    if op == "Conv":
        kept_c = int(in_mask.sum())
        new_w = new_w.T.reshape(new_w.shape[1], kept_c, *w.shape[2:])
    return new_w.astype(w.dtype), new_b.astype(w.dtype)


def fit_to_target(op: str, attrs: dict, w_shape: tuple, x: np.ndarray, y: np.ndarray, ridge: float,
                  seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Weights and bias that map the (pruned) input ``x`` to the original output ``y``.

    Sequential recovery: ``x`` comes from the already-pruned upstream network, so the refit also
    absorbs the error of the layers before it. ``w_shape`` is the weight's ONNX shape (Conv
    [O, C, kh, kw]) or [K, O] for Gemm/MatMul; the result has that shape, and a bias [O].
    """
    if op == "Conv":
        geometry = ConvGeometry.from_attrs(attrs, w_shape[2:])
        pick = sample_positions(geometry.positions(x.shape), seed)
        A = patches(x, geometry, pick, np.float64)
        Y = output_rows(y, pick).astype(np.float64)
    else:
        A = x.reshape(-1, x.shape[-1]).astype(np.float64)
        Y = y.reshape(-1, y.shape[-1]).astype(np.float64)
    A1 = np.concatenate([A, np.ones((len(A), 1))], axis=1)
    gram = A1.T @ A1
    reg = ridge * float(np.mean(np.diag(gram))) * np.eye(len(gram))
    reg[-1, -1] = 0.0
    sol = np.linalg.solve(gram + reg, A1.T @ Y)
    w, b = sol[:-1], sol[-1]
    if op == "Conv":
        w = w.T.reshape(w_shape)
    return w, b


def removal_errors(op: str, attrs: dict, w: np.ndarray, x: np.ndarray, ids: np.ndarray,
                   ridge: float = 1e-3, seed: int = 0) -> dict[int, float]:
    """Per channel id: the output error left after removing that channel and refitting the rest.

    With A the layer's input features (im2col for convs), G = A^T A and W the weights, removing
    the block B of features of one channel and refitting the others by least squares raises the
    squared error by tr(W_B^T (G^-1_BB)^-1 W_B) (the block form of the Optimal Brain Surgeon
    saliency). Normalised by the output energy tr(W^T G W), so layers compare. ``w`` is [F, O]
    for Gemm/MatMul or the ONNX conv weight; ``ids`` has one id per input channel position.
    """
    A = design_matrix(op, attrs, w, x, seed)
    if op == "Conv":
        kk = int(np.prod(w.shape[2:]))
        wf = w.reshape(w.shape[0], -1).T.astype(np.float64)
        col_ids = np.repeat(ids, kk)
    else:
        wf = w.astype(np.float64)
        col_ids = ids
    A1 = np.concatenate([A, np.ones((len(A), 1))], axis=1)
    G = A1.T @ A1 / len(A1)
    G += ridge * float(np.mean(np.diag(G))) * np.eye(len(G))
    Ginv = np.linalg.inv(G)[:-1, :-1]  # the bias column stays in the model
    energy = float(np.trace(wf.T @ G[:-1, :-1] @ wf)) or 1.0
    out: dict[int, float] = {}
    for i in np.unique(col_ids).tolist():
        B = np.flatnonzero(col_ids == i)
        WB = wf[B]
        out[int(i)] = float(np.trace(WB.T @ np.linalg.solve(Ginv[np.ix_(B, B)], WB))) / energy
    return out
