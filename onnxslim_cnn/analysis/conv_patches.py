"""Conv geometry and im2col on sampled output positions: the one home of this maths.

Three families fit convs to calibration data and need the layer's input patches: ``prune``'s
least-squares recovery, ``sparsify``'s refit, ``lowrank``'s data-aware split, and ``q8``'s int8
weight refit. Each used to carry its own im2col; they differed only in how output positions are
picked, so this module builds patches at given flat positions and leaves the picking to them.

Building patches at sampled positions only (instead of every position, then sampling) bounds the
memory by the sample: a 3x3 conv with 256 inputs on 80x80 maps and 8 samples needs ~1 GB of
float64 columns in full, and 20000 sampled rows of the same layer need 368 MB.

Patch columns are in the ONNX weight's (channel, ky, kx) order, so ``patches @ W.reshape(O, -1).T``
is the conv's output at those positions (before the bias). Only 2-D convs; the callers skip others.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np


# Sampled output positions per conv for the least-squares refits (prune, sparsify): enough rows
# for a few thousand unknowns.
MAX_POSITIONS = 20000


def sample_positions(total: int, seed: int, limit: int = MAX_POSITIONS) -> "np.ndarray | None":
    """Output positions a conv refit uses: all of them (None) up to ``limit``, else a seeded
    random ``limit`` of them, in the generator's order."""
    if total <= limit:
        return None
    return np.random.default_rng(seed).choice(total, limit, replace=False)


@dataclass(frozen=True)
class ConvGeometry:
    """A 2-D conv's kernel size, strides, explicit pads ``(top, left, bottom, right)``, dilations
    and group count. ``auto_pad`` must have been resolved into ``pads`` by the caller."""

    kernel: tuple[int, int]
    strides: tuple[int, int] = (1, 1)
    pads: tuple[int, int, int, int] = (0, 0, 0, 0)
    dilations: tuple[int, int] = (1, 1)
    group: int = 1

    @classmethod
    def from_attrs(cls, attrs: "dict[str, Any]", kernel: "tuple[int, ...]") -> "ConvGeometry":
        """From a Conv's attributes as a dict (an onnx-graphsurgeon node's ``attrs``, or
        :func:`node_attrs` of a NodeProto) and the weight's spatial shape."""
        kernel = tuple(int(k) for k in kernel)
        if len(kernel) != 2:
            raise ValueError(f"only 2-D convs have patches here (kernel {kernel})")
        return cls(kernel=kernel,  # type: ignore[arg-type]
                   strides=tuple(int(v) for v in attrs.get("strides", (1, 1))),  # type: ignore[arg-type]
                   pads=tuple(int(v) for v in attrs.get("pads", (0, 0, 0, 0))),  # type: ignore[arg-type]
                   dilations=tuple(int(v) for v in attrs.get("dilations", (1, 1))),  # type: ignore[arg-type]
                   group=int(attrs.get("group", 1)))

    def output_size(self, height: int, width: int) -> tuple[int, int]:
        """Output height and width for an input of ``height`` x ``width`` (ONNX's floor rule)."""
        (kh, kw), (sh, sw), (dh, dw) = self.kernel, self.strides, self.dilations
        pt, pl, pb, pr = self.pads
        return ((height + pt + pb - dh * (kh - 1) - 1) // sh + 1,
                (width + pl + pr - dw * (kw - 1) - 1) // sw + 1)

    def positions(self, x_shape: "tuple[int, ...]") -> int:
        """Number of output positions (samples x output height x output width) for ``x_shape``."""
        ho, wo = self.output_size(x_shape[2], x_shape[3])
        return int(x_shape[0]) * ho * wo


def node_attrs(node: Any) -> "dict[str, Any]":
    """The attributes of an ``onnx.NodeProto`` as a dict of Python values."""
    import onnx

    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def patches(x: np.ndarray, geometry: ConvGeometry, positions: "np.ndarray | None" = None,
            dtype: "np.dtype | type | None" = None) -> np.ndarray:
    """im2col of ``x`` [N, C, H, W] at flat output ``positions`` (index ``n*Ho*Wo + ho*Wo + wo``;
    all positions in that order when None): [len(positions), C * kh * kw], rows in the order of
    ``positions``, columns in the weight's (channel, ky, kx) order, in ``dtype`` (default x's).

    The values are copies of ``x``'s (or 0 in the padding), so the result does not depend on
    whether the cast happens before or after the gather.
    """
    (kh, kw), (sh, sw), (dh, dw) = geometry.kernel, geometry.strides, geometry.dilations
    pt, pl, pb, pr = geometry.pads
    n_samples, channels = x.shape[:2]
    ho, wo = geometry.output_size(x.shape[2], x.shape[3])
    if positions is None:
        positions = np.arange(n_samples * ho * wo)
    sample, rest = np.divmod(np.asarray(positions, dtype=np.int64), ho * wo)
    row, col = np.divmod(rest, wo)
    xp = np.pad(x, ((0, 0), (0, 0), (pt, pb), (pl, pr)))
    rows = row[:, None] * sh + np.arange(kh)[None, :] * dh
    cols = col[:, None] * sw + np.arange(kw)[None, :] * dw
    gathered = xp[sample[:, None, None, None], np.arange(channels)[None, :, None, None],
                  rows[:, None, :, None], cols[:, None, None, :]]
    out = gathered.reshape(len(sample), channels * kh * kw)
    return out if dtype is None else out.astype(dtype, copy=False)


def output_rows(y: np.ndarray, positions: "np.ndarray | None" = None) -> np.ndarray:
    """A conv output [N, O, Ho, Wo] as rows [positions, O] in the order :func:`patches` uses."""
    flat = np.moveaxis(y, 1, -1).reshape(-1, y.shape[1])
    return flat if positions is None else flat[positions]
