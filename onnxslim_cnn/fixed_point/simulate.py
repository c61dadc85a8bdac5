"""Bit-exact reference simulator of the fixed-point IR (int64 numpy, vectorised over the batch).

Everything is integer arithmetic on int64 codes. Sums of products go through float64 BLAS when
the layer's accumulator is at most 53 bits wide: every operand, product and partial sum is then
an integer below 2**53, which float64 represents exactly whatever order BLAS adds in, so the
result equals the int64 sum bit for bit and is ~50x faster than numpy's integer matmul (no BLAS).
Wider accumulators use int64 matmul.
"""

from __future__ import annotations

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from .ir import FixedFormat, FixedPointModel, Layer

EXACT_FLOAT_BITS = 53


def round_shift(x: np.ndarray, shift: int, rounding: str) -> np.ndarray:
    """x / 2**shift rounded as ``rounding``; exact multiplication for shift <= 0."""
    x = np.asarray(x, dtype=np.int64)
    if shift <= 0:
        return x * (np.int64(1) << np.int64(-shift))
    floor = x >> np.int64(shift)  # arithmetic shift = floor division
    if rounding == "trunc":
        return floor
    rem = x - (floor << np.int64(shift))
    half = np.int64(1) << np.int64(shift - 1)
    if rounding == "round_half_up":
        return floor + (rem >= half)
    if rounding == "round_half_even":
        return floor + ((rem > half) | ((rem == half) & ((floor & 1) == 1)))
    raise ValueError(f"unknown rounding {rounding!r}")


def saturate(x: np.ndarray, fmt: FixedFormat, mode: str) -> np.ndarray:
    if mode == "sat":
        return np.clip(x, fmt.min_int, fmt.max_int)
    if mode == "wrap":
        mask = np.int64((1 << fmt.width) - 1) if fmt.width < 64 else np.int64(-1)
        low = x & mask
        if fmt.signed:
            low = np.where(low > fmt.max_int, low - (np.int64(1) << np.int64(fmt.width)), low)
        return low
    raise ValueError(f"unknown saturation {mode!r}")


def requantize(x: np.ndarray, multiplier: int, shift: int, rounding: str, saturation: str,
               fmt: FixedFormat) -> np.ndarray:
    return saturate(round_shift(np.asarray(x, np.int64) * np.int64(multiplier), shift, rounding), fmt, saturation)


def _matmul(a: np.ndarray, b: np.ndarray, acc_bits: int) -> np.ndarray:
    if acc_bits <= EXACT_FLOAT_BITS:
        return np.rint(np.matmul(a.astype(np.float64), b.astype(np.float64))).astype(np.int64)
    return np.matmul(a.astype(np.int64), b.astype(np.int64))


def _pad(x: np.ndarray, pads, value: int) -> np.ndarray:
    t, l, b, r = pads
    if not any(pads):
        return x
    return np.pad(x, ((0, 0), (0, 0), (t, b), (l, r)), constant_values=value)


def _windows(x: np.ndarray, kernel, stride) -> np.ndarray:
    """(B, C, H, W) -> (B, C, OH, OW, kh, kw) strided view."""
    w = sliding_window_view(x, tuple(kernel), axis=(2, 3))
    return w[:, :, ::stride[0], ::stride[1]]


def conv2d(x: np.ndarray, layer: Layer, acc: FixedFormat) -> np.ndarray:
    a = layer.attrs
    w, bias = layer.weights["weight"], layer.weights["bias"]
    groups = a["groups"]
    out_ch, cg, kh, kw = w.shape
    win = _windows(_pad(x, a["pads"], 0), (kh, kw), a["stride"])  # B, C, OH, OW, kh, kw
    b, c, oh, ow = win.shape[:4]
    # -> (G, B*OH*OW, Cg*kh*kw) @ (G, Cg*kh*kw, O/G)
    cols = win.reshape(b, groups, cg, oh, ow, kh, kw).transpose(1, 0, 3, 4, 2, 5, 6).reshape(groups, b * oh * ow, cg * kh * kw)
    wm = w.reshape(groups, out_ch // groups, cg * kh * kw).transpose(0, 2, 1)
    y = _matmul(cols, wm, acc.width)  # G, B*OH*OW, O/G
    y = y.reshape(groups, b, oh, ow, out_ch // groups).transpose(1, 0, 4, 2, 3).reshape(b, out_ch, oh, ow)
    return y + bias.reshape(1, -1, 1, 1)


def run_layer(layer: Layer, args: list[np.ndarray], model: FixedPointModel) -> np.ndarray:
    op, a = layer.op, layer.attrs
    out_fmt = model.tensors[layer.output].fmt
    in_fmts = [model.tensors[n].fmt for n in layer.inputs]
    if op == "conv2d":
        return conv2d(args[0], layer, out_fmt)
    if op == "dense":
        return _matmul(args[0], layer.weights["weight"].T, out_fmt.width) + layer.weights["bias"]
    if op in ("add", "concat"):
        aligned = [v * (np.int64(1) << np.int64(out_fmt.frac - f.frac)) for v, f in zip(args, in_fmts)]
        return aligned[0] + aligned[1] if op == "add" else np.concatenate(aligned, axis=1)
    if op == "relu":
        return np.maximum(args[0], 0)
    if op == "clip":
        return np.clip(args[0], a["lo"], a["hi"])
    if op == "maxpool":
        return _windows(_pad(args[0], a["pads"], in_fmts[0].min_int), a["kernel"], a["stride"]).max(axis=(4, 5))
    if op == "avgpool":
        return _windows(_pad(args[0], a["pads"], 0), a["kernel"], a["stride"]).sum(axis=(4, 5))
    if op == "global_avgpool":
        return args[0].sum(axis=(2, 3), keepdims=True)
    if op == "flatten":
        return args[0].reshape(args[0].shape[0], -1)
    if op == "requant":
        return requantize(args[0], a["multiplier"], a["shift"], a["rounding"], a["saturation"], out_fmt)
    raise ValueError(f"unknown IR op {op!r}")


def simulate(model: FixedPointModel, inputs: "dict[str, np.ndarray]", keep_all: bool = False) -> dict[str, np.ndarray]:
    """Run the IR on integer inputs ``{name: (B, ...) int64 codes}``; returns the outputs (or every tensor)."""
    values = {k: np.asarray(v, dtype=np.int64) for k, v in inputs.items()}
    for layer in model.layers:
        values[layer.output] = run_layer(layer, [values[n] for n in layer.inputs], model)
    return values if keep_all else {n: values[n] for n in model.outputs}


def quantize_inputs(model: FixedPointModel, inputs: "dict[str, np.ndarray]") -> dict[str, np.ndarray]:
    return {n: model.tensors[n].fmt.quantize(inputs[n]) for n in model.inputs}


def run_float(model: FixedPointModel, inputs: "dict[str, np.ndarray]", batch: int = 256) -> dict[str, np.ndarray]:
    """Quantize float inputs, simulate in chunks, dequantize the outputs."""
    n = next(iter(inputs.values())).shape[0]
    parts: dict[str, list] = {o: [] for o in model.outputs}
    for i in range(0, n, batch):
        q = quantize_inputs(model, {k: v[i:i + batch] for k, v in inputs.items()})
        for o, v in simulate(model, q).items():
            parts[o].append(model.tensors[o].fmt.dequantize(v))
    return {o: np.concatenate(v) for o, v in parts.items()}
