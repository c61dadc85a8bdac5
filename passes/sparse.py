"""Pass ``sparse``: get a pruned model ready for the sparse runtime (run it after ``sparsify``).

For every Gemm / MatMul / Conv that the sparse execution provider (onnxslim_cnn.runtime) would
claim at ``min_sparsity``, the pass reports the layer's sparsity and the speedup over ORT's
dense kernel expected at batch 1, one thread: for a Conv the EP's own conv cost model (read from
the native library; a conv it predicts to lose is reported as skipped, since the EP leaves it to
ORT), otherwise, or without the library, the bench's medians (EXPECTED_SPEEDUP) and, with
``store=true``, keeps its weight sparse in the file so the file shrinks too: an ONNX Constant
node with a ``sparse_value`` (COO), which ONNX Runtime densifies at load, so the model stays
standard ONNX (why not a graph ``sparse_initializer``: see onnxslim_cnn/sparse_storage.py).
The graph's computation is unchanged. ``Constant(sparse_value)`` exists from opset 11: a model
below it that gets a weight stored sparse is first converted to opset 11 (onnx.version_converter,
as q8 does for 13); a model the converter cannot take keeps its weights dense, and says why.
"""

from __future__ import annotations

import dataclasses
import functools

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnxslim_cnn.runtime import DEFAULT_MIN_SPARSITY

from onnxslim_cnn.graph import Graph
from onnxslim_cnn.options import option
from onnxslim_cnn.context import PassContext
from onnxslim_cnn.pass_infra import GraphPass, PassResult, register_pass
from onnxslim_cnn.sparse_storage import INDEX_BYTES

# Speedup of the sparse EP over ORT's dense CPU kernel, batch 1, one thread, median over the
# bench's layer shapes of each kind, by sparsity. FC: VGG-16 fc6/fc7 and ddddocr 1024x8210, the
# cells of bench/results/sparse.json and bench/results/sparse_merged_fc.json together (two runs
# on the shared machine; 3-6 cells per point). Conv: six ResNet-50 and five VGG-16 layers from
# bench/results/sparse.json, 1.0 where the EP's conv cost model leaves the layer to ORT. Linear
# in between; below 50 % the pass says "not measured" (None).
EXPECTED_SPEEDUP = {
    "fc": [(0.5, 0.89), (0.6, 1.19), (0.7, 1.7), (0.8, 2.16), (0.9, 4.17), (0.95, 6.77)],
    "conv": [(0.5, 1.0), (0.6, 1.0), (0.7, 1.47), (0.8, 2.08), (0.9, 3.69), (0.95, 5.17)],
}


def expected_speedup(kind: str, sparsity: float) -> "float | None":
    points = EXPECTED_SPEEDUP[kind]
    if sparsity < points[0][0]:
        return None
    if sparsity >= points[-1][0]:
        return points[-1][1]
    for (s0, v0), (s1, v1) in zip(points, points[1:]):
        if s0 <= sparsity <= s1:
            return round(v0 + (v1 - v0) * (sparsity - s0) / (s1 - s0), 2)
    return None


@dataclasses.dataclass(frozen=True)
class SparseOptions:
    min_sparsity: float = option(DEFAULT_MIN_SPARSITY, "share of zeros from which a layer is taken by the sparse "
                                 "execution provider (as runtime.session's min_sparsity)", min=0.0, max=1.0)
    store: bool = option(True, "store those weights sparse in the file (ONNX Constant sparse_value, COO) where "
                               "that makes them smaller (int64 indices: fewer than 1/3 nonzeros)")


def weight_input(node: gs.Node) -> int:
    """Which input holds the weight: 1 (x * W; Conv), or 0 for a Gemm/MatMul whose constant is
    on the left (W * x, ep_graph.cc WeightInput)."""
    if node.op in ("Gemm", "MatMul") and len(node.inputs) >= 2 and isinstance(node.inputs[0], gs.Constant) \
            and not isinstance(node.inputs[1], gs.Constant):
        return 0
    return 1


def claim_problem(node: gs.Node) -> "str | None":
    """Why the sparse EP would not take ``node`` whatever its sparsity (mirror of ep_graph.cc)."""
    if node.domain not in ("", "ai.onnx", None):
        return "not an ONNX-domain op"
    left = weight_input(node) == 0
    if left:
        pass  # W * x: input 0 is the constant weight, input 1 the activation
    elif len(node.inputs) < 2 or not isinstance(node.inputs[1], gs.Constant):
        return "weight (input 1) is not a constant"
    elif isinstance(node.inputs[0], gs.Constant):
        return "activation (input 0) is a constant"
    w = node.inputs[0 if left else 1]
    if np.dtype(w.dtype) != np.float32:
        return f"weight is {np.dtype(w.dtype)}, not float32"
    rank = len(w.shape)
    if node.op in ("Gemm", "MatMul") and rank != 2:
        return f"weight is {rank}-D, not 2-D"
    if node.op == "Gemm" and len(node.inputs) > 2 and node.inputs[2] is not None and node.inputs[2].name:
        c = node.inputs[2]
        if not isinstance(c, gs.Constant):
            return "bias C is not a constant"
        dims = list(c.shape)
        size = int(np.prod(dims)) if dims else 1
        if left:  # Y = A' B': C must be constant along each output row, [M, 1] or one value
            rows = w.shape[1] if int(node.attrs.get("transA", 0)) else w.shape[0]
            if len(dims) > 2 or not (size == 1 or (len(dims) == 2 and dims == [rows, 1])):
                return f"bias C of shape {dims} is not per output row"
        else:
            features = w.shape[0] if int(node.attrs.get("transB", 0)) else w.shape[1]
            if len(dims) > 2 or size not in (1, features) or any(d != 1 for d in dims[:-1]):
                return f"bias C of shape {dims} is not per output feature"
    if node.op == "Conv":
        if rank not in (3, 4):
            return f"{rank - 2}-D convolution"
        if int(node.attrs.get("group", 1)) != 1:
            return "grouped / depthwise convolution"
        if len(node.inputs) > 2 and node.inputs[2] is not None and node.inputs[2].name and \
                not isinstance(node.inputs[2], gs.Constant):
            return "bias is not a constant"
    return None


def conv_relative_cost(node: gs.Node, nonzeros: int) -> "float | None":
    """The EP's own conv claim model (ConvRelativeCost in runtime/src/kernels_choose.cc, through
    the library's C ABI so the pass and the EP cannot disagree): expected time of the sparse run
    over ORT's dense Conv; >= 1 means the EP (format=auto) leaves the layer to ORT. None when
    the native library is not built."""
    fn = _conv_cost_function()
    if fn is None:
        return None
    w = node.inputs[1]
    oc, ic = int(w.shape[0]), int(w.shape[1])
    kh, kw = (int(w.shape[2]), int(w.shape[3])) if len(w.shape) == 4 else (1, int(w.shape[2]))
    strides = list(node.attrs.get("strides", []))
    pads = list(node.attrs.get("pads", []))
    stride1 = all(int(v) == 1 for v in strides)
    no_pads = node.attrs.get("auto_pad", "NOTSET") not in ("NOTSET", b"NOTSET") or all(int(v) == 0 for v in pads)
    pointwise = stride1 and kh == 1 and kw == 1 and no_pads
    direct = stride1 and not pointwise

    def spatial(t, default):  # same reading of the shapes as ep_graph.cc ConvPathOf: 16 when unknown
        shape = list(t.shape) if t is not None and t.shape is not None else []
        if len(shape) != len(w.shape) or not all(isinstance(d, int) and d > 0 for d in shape[2:]):
            return default
        return (int(shape[2]), int(shape[3])) if len(shape) == 4 else (1, int(shape[2]))

    in_h, in_w = spatial(node.inputs[0], (16, 16))
    out_h, out_w = spatial(node.outputs[0], (in_h, in_w))
    return float(fn(nonzeros, oc, ic, kh, kw, out_h, out_w, in_h, in_w, int(direct)))


@functools.cache
def _conv_cost_function():
    """ConvRelativeCost from the installed EP library, loaded once; None without the library."""
    try:
        import ctypes

        from onnxslim_cnn.runtime.loader import library_path

        fn = ctypes.CDLL(str(library_path())).onnxslim_sparse_conv_relative_cost
    except Exception:  # library not built / too old: the pass falls back to the measured table
        return None
    fn.restype = ctypes.c_double
    fn.argtypes = [ctypes.c_int64] * 9 + [ctypes.c_int]
    return fn


SPARSE_VALUE_OPSET = 11  # Constant's sparse_value attribute
SPARSE_VALUE_IR = 6  # the IR version that goes with opset 11


def _default_opset(model: onnx.ModelProto) -> int:
    return next((op.version for op in model.opset_import if op.domain in ("", "ai.onnx")), 0)


@register_pass
class SparsePass(GraphPass):
    name = "sparse"
    summary = ("Prepare a pruned model for the sparse runtime: report each Gemm/MatMul/Conv the sparse "
               "execution provider would take (sparsity, expected speedup) and store those weights sparse "
               "(Constant sparse_value, COO) so the file shrinks. Run after sparsify.")
    Options = SparseOptions
    modifies = frozenset({"graph", "opset"})  # opset: raised to 11 for Constant(sparse_value)

    def transform(self, model: onnx.ModelProto, ctx: PassContext) -> "tuple[onnx.ModelProto, PassResult]":
        """GraphPass.transform, with the opset raised to SPARSE_VALUE_OPSET first when the pass
        stores a weight sparse in a model below it (the pass runs again on the converted model:
        it only counts zeros)."""
        out, result = super().transform(model, ctx)
        opset = _default_opset(model)
        if not result.changed or opset >= SPARSE_VALUE_OPSET:
            return out, result
        from onnx import version_converter

        try:
            upgraded = version_converter.convert_version(model, SPARSE_VALUE_OPSET)
            upgraded.ir_version = max(upgraded.ir_version, SPARSE_VALUE_IR)
        except Exception as exc:  # noqa: BLE001 - the converter's failures are of every kind
            # store nothing: the report still lists every layer the EP would take
            dense = type(self)({**dataclasses.asdict(self.options), "store": False})
            out, result = GraphPass.transform(dense, model, ctx)
            why = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            result.skip("store", f"Constant(sparse_value) needs opset {SPARSE_VALUE_OPSET}; cannot convert "
                                 f"opset {opset}: {why}")
            return out, result
        out, result = super().transform(upgraded, ctx)
        result.stats["opset_upgraded"] = f"{opset}->{SPARSE_VALUE_OPSET}"
        return out, result

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        o = self.options
        result = PassResult()
        layers = stored_bytes = dense_bytes = 0
        report = []
        for node in graph.nodes:
            if node.op not in ("Gemm", "MatMul", "Conv"):
                continue
            problem = claim_problem(node)
            if problem:
                result.skip(node.name, problem)
                continue
            w = node.inputs[weight_input(node)]
            values = np.asarray(w.values)
            nnz = int(np.count_nonzero(values))
            sparsity = float(1.0 - nnz / values.size) if values.size else 0.0
            if sparsity < o.min_sparsity:
                result.skip(node.name, f"sparsity {sparsity:.3f} < min_sparsity {o.min_sparsity}")
                continue
            speedup = expected_speedup("conv" if node.op == "Conv" else "fc", sparsity)
            if node.op == "Conv":
                cost = conv_relative_cost(node, nnz)
                if cost is not None and cost >= 1.0:
                    result.skip(node.name, f"the EP's conv cost model expects {1.0 / cost:.2f}x of ORT's dense Conv "
                                           "(format=auto leaves it to ORT)")
                    continue
                if cost is not None:
                    speedup = round(1.0 / cost, 2)
            layers += 1
            coo = nnz * (values.itemsize + INDEX_BYTES)
            details = {"sparsity": round(sparsity, 4), "shape": list(values.shape), "expected_speedup": speedup}
            if o.store and coo < values.nbytes and w.name not in graph.sparse_initializers:
                graph.sparse_initializers.add(w.name)
                stored_bytes += coo
                dense_bytes += values.nbytes
                details["bytes"] = {"dense": int(values.nbytes), "sparse": int(coo)}
                result.change(node.name, "sparse weight stored", **details)
            report.append({"node": node.name, **details})
        result.stats["layers"] = layers
        result.stats["conv_speedup_source"] = ("EP conv cost model" if _conv_cost_function() is not None
                                               else "bench medians (native library not built)")
        result.stats["expected"] = report  # every layer the EP would take, stored sparse or not
        result.stats["bytes_saved"] = int(dense_bytes - stored_bytes)
        return result
