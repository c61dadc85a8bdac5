"""Pass ``share``: k-means weight sharing (Deep Compression, Han et al. 2016), stored as codes.

Each Conv/Gemm/MatMul constant float weight is clustered into at most ``2**bits`` values (bits
per layer type: ``conv_bits``, ``fc_bits``; per node: ``layer_bits``). Clustering is 1-D k-means
with the *linear* initialisation of Han et al. (centroids evenly spaced between the smallest and
largest weight, one run, so deterministic). Zeros left by an earlier ``sparsify`` stay exactly
zero: only the nonzero weights are clustered and code 0 is reserved for 0.0 (so a layer with
zeros gets ``2**bits - 1`` centroids). A layer with no more distinct nonzero values than
centroids keeps them exactly.

Storage (so the model runs in plain ONNX Runtime, which folds the constant sub-graph once at
session start):

* ``form=gather``: the weight becomes ``Gather(codebook, Cast(codes, int32))`` where ``codes``
  is a uint8 tensor of the weight's shape (uint16 for 9-16 bits: Gather only takes int32/int64
  indices, hence the Cast) and ``codebook`` a float32 vector.
* ``form=dequantize`` (needs ``codebook=uniform`` and bits <= 8): ``DequantizeLinear(codes,
  scale, zero_point)``, the standard ONNX spelling of a uniform codebook; 0.0 is on the grid
  (it is ``zero_point``), so pruned zeros stay zero.

``codebook=uniform`` skips k-means and uses the evenly spaced grid itself (with 0.0 on it), which
is what makes the DequantizeLinear form possible.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import numpy as np
import onnx_graphsurgeon as gs

from onnxslim_cnn.errors import UserError
from onnxslim_cnn.graph import Graph, weight_input_index
from onnxslim_cnn.options import option
from onnxslim_cnn.context import PassContext
from onnxslim_cnn.pass_infra import GraphPass, Knob, PassResult, register_pass


OPS = ("Conv", "Gemm", "MatMul")
# Above this many point-centroid distances per Lloyd iteration sklearn's generic KMeans is too
# slow (AlexNet's fc6 at 16 bits: 38M x 65536); the sorted 1-D Lloyd below does the same
# iterations in O(n log k).
SKLEARN_MAX_WORK = 2e8


@dataclasses.dataclass(frozen=True)
class ShareOptions:
    conv_bits: int = option(8, "code bits of Conv weights (2**bits shared values)", min=1, max=16)
    fc_bits: int = option(5, "code bits of Gemm/MatMul weights", min=1, max=16)
    layer_bits: dict[str, int] = option({}, "per-layer code bits by node name (name:bits,...)")
    exclude: list[str] = option([], "node names left as they are")
    min_params: int = option(256, "leave layers with fewer weights than this as they are", min=0)
    codebook: Literal["kmeans", "uniform"] = option(
        "kmeans", "kmeans: 1-D k-means with linear initialisation (Han et al.); uniform: evenly spaced "
                  "values with 0.0 on the grid")
    form: Literal["gather", "dequantize"] = option(
        "gather", "gather: uint8/uint16 codes + float codebook rebuilt by Gather; dequantize: "
                  "DequantizeLinear (needs codebook=uniform and bits <= 8)")
    max_iter: int = option(100, "k-means iterations at most", min=1)


@dataclasses.dataclass
class Shared:
    """One layer's clustering: ``codebook[codes]`` is the shared weight."""

    codes: np.ndarray  # uint8 / uint16, the weight's shape
    codebook: np.ndarray  # float32
    zero_code: "int | None"  # code of 0.0 when the layer has pruned zeros
    scale: float = 0.0  # uniform grid: codebook[i] == (i - zero_point) * scale
    zero_point: int = 0


@register_pass
class SharePass(GraphPass):
    name = "share"
    summary = ("Weight sharing (Deep Compression): cluster each Conv/Gemm/MatMul weight into 2^bits "
               "values (k-means, linear init; 8 bits conv, 5 bits FC by default), pruned zeros kept "
               "exact; stored as uint8/uint16 codes + float codebook (Gather) or DequantizeLinear.")
    Options = ShareOptions
    modifies = frozenset({"graph"})
    lossy = True
    budget_knob = Knob(option="fc_bits", ladder=(4, 5, 6, 8), gain="bytes")

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        o = self.options
        if o.form == "dequantize" and o.codebook != "uniform":
            raise UserError("share.form=dequantize needs share.codebook=uniform (k-means codebooks are not a "
                            "uniform grid)")
        for name, bits in o.layer_bits.items():
            if not 1 <= int(bits) <= 16:
                raise UserError(f"share.layer_bits: bits of '{name}' must be in [1, 16], got {bits}")
        names = {n.name for n in graph.nodes}
        for name in list(o.layer_bits) + list(o.exclude):
            if name not in names:
                ctx.warnings.append(f"share: no node named '{name}' (layer_bits/exclude)")
        result = PassResult()
        weights = bits_total = 0
        seen: set[int] = set()
        for node in list(graph.nodes):
            if node.op not in OPS or len(node.inputs) < 2:
                continue
            name = node.name
            idx = weight_input_index(node)
            w = node.inputs[idx]
            reason = _ineligible(node, w, o, seen)
            if reason:
                result.skip(name, reason)
                continue
            seen.add(id(w))
            values = np.asarray(w.values)
            bits = int(o.layer_bits.get(name, o.conv_bits if node.op == "Conv" else o.fc_bits))
            if o.form == "dequantize" and bits > 8:
                raise UserError(f"share.form=dequantize stores uint8 codes: bits of '{name}' is {bits} (> 8)")
            shared = (uniform_share(values, bits) if o.codebook == "uniform"
                      else kmeans_share(values, bits, o.max_iter))
            rebuilt = shared.codebook[shared.codes.astype(np.int64)]
            err = values.astype(np.float64) - rebuilt
            norm = float(np.linalg.norm(values))
            _rewrite(graph, node, idx, shared, o.form, values.dtype)
            weights += values.size
            bits_total += values.size * bits
            result.change(name, "shared", bits=bits, codebook=int(shared.codebook.size),
                          used=int(np.unique(shared.codes).size),
                          rel_error=round(float(np.linalg.norm(err)) / norm, 6) if norm else 0.0,
                          max_abs_error=float(np.max(np.abs(err))) if err.size else 0.0,
                          zeros=int(values.size - np.count_nonzero(rebuilt)), total=int(values.size))
        result.stats["weights"] = weights
        if weights:
            result.stats["mean_bits"] = round(bits_total / weights, 3)
            graph.remove_unused()
        return result


def _ineligible(node: gs.Node, w, o: ShareOptions, seen: set[int]) -> "str | None":
    if node.name in o.exclude:
        return "excluded"
    if not isinstance(w, gs.Constant):
        return "weight is not a constant"
    if id(w) in seen or len(w.outputs) > 1:
        return "weight shared with another node"
    dtype = np.dtype(w.dtype)
    if dtype.kind != "f" or len(w.shape) < 2:
        return f"weight is not a float matrix ({dtype}, {len(w.shape)}-D)"
    if int(np.prod(w.shape)) < o.min_params:
        return f"{int(np.prod(w.shape))} weights < min_params {o.min_params}"
    if o.form == "dequantize" and dtype != np.float32:  # float16 scales need opset 19; keep it simple
        return f"form=dequantize makes float32 weights; this one is {dtype}"
    return None


def _rewrite(graph: Graph, node: gs.Node, idx: int, shared: Shared, form: str, dtype) -> None:
    label = node.name or "layer"
    weight = gs.Variable(graph.unique_name(f"{label}_shared_weight"), dtype=dtype, shape=list(shared.codes.shape))
    codes = graph.add_constant(f"{label}_codes", shared.codes)
    if form == "dequantize":
        # scalars (per-tensor); add_constant's ascontiguousarray would make them 1-D
        scale = gs.Constant(graph.unique_name(f"{label}_scale"), np.array(shared.scale, dtype=np.float32))
        zp = gs.Constant(graph.unique_name(f"{label}_zero_point"), np.array(shared.zero_point, dtype=np.uint8))
        graph.gs.nodes.append(gs.Node("DequantizeLinear", graph.unique_name(f"{label}_dequantize"),
                                      inputs=[codes, scale, zp], outputs=[weight]))
    else:
        book = graph.add_constant(f"{label}_codebook", shared.codebook.astype(dtype))
        index = gs.Variable(graph.unique_name(f"{label}_codes_int32"), dtype=np.int32, shape=list(shared.codes.shape))
        graph.gs.nodes.append(gs.Node("Cast", graph.unique_name(f"{label}_codes_cast"), attrs={"to": 6},
                                      inputs=[codes], outputs=[index]))
        graph.gs.nodes.append(gs.Node("Gather", graph.unique_name(f"{label}_gather"), attrs={"axis": 0},
                                      inputs=[book, index], outputs=[weight]))
    node.inputs[idx] = weight


# --------------------------------------------------------------------------- clustering


def _code_dtype(bits: int):
    return np.uint8 if bits <= 8 else np.uint16


def kmeans_share(values: np.ndarray, bits: int, max_iter: int = 100) -> Shared:
    """Cluster the nonzero weights into ``2**bits`` (``2**bits - 1`` with zeros) sorted centroids."""
    flat = values.ravel()
    nonzero = flat != 0
    has_zeros = not bool(nonzero.all())
    k = 2 ** bits - (1 if has_zeros else 0)
    x = flat[nonzero].astype(np.float64)
    distinct = np.unique(x)
    if distinct.size <= k:  # nothing to share: every distinct value is its own centroid
        centroids, labels = distinct, np.searchsorted(distinct, x)
    else:
        centroids, labels = _kmeans_1d(x, k, max_iter)
    first = 1 if has_zeros else 0
    codebook = np.concatenate([[0.0] * first, centroids]).astype(np.float32)
    codes = np.zeros(flat.size, dtype=_code_dtype(bits))
    codes[nonzero] = labels + first
    return Shared(codes.reshape(values.shape), codebook, 0 if has_zeros else None)


def _kmeans_1d(x: np.ndarray, k: int, max_iter: int) -> tuple[np.ndarray, np.ndarray]:
    """k-means on scalars, linear initialisation (Han et al.); sorted centroids and labels."""
    init = np.linspace(x.min(), x.max(), k)
    if x.size * k <= SKLEARN_MAX_WORK:
        from sklearn.cluster import KMeans

        km = KMeans(n_clusters=k, init=init.reshape(-1, 1), n_init=1, max_iter=max_iter, tol=1e-8,
                    algorithm="lloyd", random_state=0).fit(x.reshape(-1, 1))
        centroids = km.cluster_centers_.ravel()
    else:
        centroids = _lloyd_sorted(x, init, max_iter)
    # sorted codebook, labels = nearest centroid (what Lloyd converged to, made order-independent)
    centroids = np.unique(centroids)
    mids = (centroids[1:] + centroids[:-1]) / 2
    labels = np.searchsorted(mids, x)
    return centroids, labels


def _lloyd_sorted(x: np.ndarray, centroids: np.ndarray, max_iter: int) -> np.ndarray:
    """Lloyd iterations for 1-D data: sorted centroids, assignment by binary search on midpoints."""
    c = centroids.copy()
    for _ in range(max_iter):
        labels = np.searchsorted((c[1:] + c[:-1]) / 2, x)
        sums = np.bincount(labels, weights=x, minlength=c.size)
        counts = np.bincount(labels, minlength=c.size)
        new = np.where(counts > 0, sums / np.maximum(counts, 1), c)  # empty cluster: keep its centroid
        new.sort()
        if np.allclose(new, c, rtol=0, atol=1e-12 * max(1.0, float(np.abs(x).max()))):
            return new
        c = new
    return c


def uniform_share(values: np.ndarray, bits: int) -> Shared:
    """Evenly spaced codebook ``(i - zero_point) * scale`` over [min, max] with 0.0 on the grid."""
    flat = values.ravel().astype(np.float64)
    levels = 2 ** bits
    lo, hi = min(float(flat.min()), 0.0), max(float(flat.max()), 0.0)
    scale = (hi - lo) / (levels - 1) if hi > lo else 1.0
    zero_point = int(np.clip(round(-lo / scale), 0, levels - 1))
    scale32 = np.float32(scale)
    codes = np.clip(np.round(flat / scale32) + zero_point, 0, levels - 1).astype(_code_dtype(bits))
    codes[flat == 0] = zero_point
    # the same float32 arithmetic as DequantizeLinear: (q - zero_point) * scale
    codebook = ((np.arange(levels, dtype=np.int32) - zero_point).astype(np.float32) * scale32).astype(np.float32)
    has_zeros = bool((flat == 0).any())
    return Shared(codes.reshape(values.shape), codebook, zero_point if has_zeros else None,
                  float(scale32), zero_point)
