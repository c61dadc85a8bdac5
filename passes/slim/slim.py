"""Pass ``slim``: graph clean-up that keeps outputs equal (the default pass).

The clean-up is a list of small rewrite rules (``RULES``), each a function that finds one
pattern and rewrites it, run in rounds until nothing changes. Exact algebra only: every rule
keeps the model's outputs equal up to float rounding.
"""

from __future__ import annotations

import contextlib
import dataclasses
import threading
from typing import Callable

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx_graphsurgeon.importers.onnx_importer import get_itemsize

from onnxslim_cnn.graph import Graph, array_digest
from onnxslim_cnn.graph import node_label as _node_label
from onnxslim_cnn.options import option
from onnxslim_cnn.context import PassContext
from onnxslim_cnn.pass_infra import GraphPass, PassResult, register_pass

from . import rules
from . import shape_rules


@dataclasses.dataclass(frozen=True)
class SlimOptions:
    fold_constants: bool = option(True, "evaluate subgraphs whose inputs are all constants (ONNX Runtime)")
    fold_size_limit_mb: float = option(64.0, "do not fold a constant subgraph whose result exceeds this size",
                                       min=0.0)
    eliminate_identity: bool = option(True, "remove Identity, Dropout, no-op Cast/Reshape/Transpose/Pad, x*1, x+0")
    fold_batchnorm: bool = option(True, "fold BatchNormalization, and per-channel Mul/Add, into the preceding Conv/Gemm")
    fuse_matmul_add: bool = option(True, "turn MatMul(x, W) + b with 2-D x and constant W, b into one Gemm")
    fuse_pad: bool = option(True, "fold a zero constant Pad on spatial axes into the following Conv's pads")
    merge_chains: bool = option(True, "collapse Reshape->Reshape, Transpose->Transpose and Slice->Slice chains")
    simplify_shapes: bool = option(True, "turn run-time Reshape targets built from the input's own Shape into constants (0 = copy dim)")
    dedup_initializers: bool = option(True, "merge initializers with identical dtype, shape and bytes")
    cse: bool = option(True, "merge nodes computing the same op on the same inputs with the same attributes")
    max_rounds: int = option(8, "stop after this many rounds of rules even if still changing", min=1)


@register_pass
class SlimPass(GraphPass):
    name = "slim"
    summary = ("Exact graph clean-up: constant folding, dead-code and identity elimination, "
               "BatchNormalization folding into the preceding Conv/Gemm (also BN exported as "
               "per-channel Mul+Add), MatMul+Add->Gemm, Pad->Conv, reshape/transpose chains, "
               "duplicate initializer merging and common-subexpression elimination.")
    Options = SlimOptions
    modifies = frozenset({"graph", "interface"})

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        o = self.options
        result = PassResult()
        enabled: list[tuple[str, Callable[[Graph, PassResult], int]]] = [
            (name, fn) for name, flag, fn in (
                ("eliminate_identity", o.eliminate_identity, rules.eliminate_identity),
                ("merge_chains", o.merge_chains, rules.merge_chains),
                ("merge_slices", o.merge_chains, shape_rules.merge_slices),
                ("simplify_shapes", o.simplify_shapes, shape_rules.constant_reshape_targets),
                ("transpose_to_reshape", o.simplify_shapes, shape_rules.transpose_to_reshape),
                ("fold_batchnorm", o.fold_batchnorm, rules.fold_batchnorm),
                ("fold_mul_add", o.fold_batchnorm, rules.fold_channel_affine),
                ("fuse_matmul_add", o.fuse_matmul_add, rules.fuse_matmul_add),
                ("fuse_pad", o.fuse_pad, rules.fuse_pad_into_conv),
                ("cse", o.cse, rules.eliminate_common_subexpressions),
            ) if flag
        ]
        nodes_before = len(graph.nodes)
        too_big: dict[str, str] = {}  # node label -> why folding left it (fold_constants)
        for _ in range(o.max_rounds):
            changed = 0
            if o.fold_constants:
                changed += fold_constants(graph, result, int(o.fold_size_limit_mb * (1 << 20)), too_big)
            for _name, fn in enabled:
                changed += fn(graph, result)
                graph.remove_unused()
            if not changed:
                break
            graph.refresh_shapes()  # rewrites may have made shapes knowable for the next round
        if o.dedup_initializers:
            dedup_initializers(graph, result)
        graph.remove_unused()
        correct_output_shapes(graph, result)
        if len(graph.nodes) != nodes_before:
            result.changed = True
        result.stats["nodes_removed"] = nodes_before - len(graph.nodes)
        rules.report_unfolded_batchnorms(graph, result)
        left = {_node_label(n) for n in graph.nodes} | {_node_label(n) for sub in graph.gs.subgraphs(recursive=True)
                                                        for n in sub.nodes}
        for label, why in too_big.items():
            if label in left:  # (a node whose size became known later and folded is not reported)
                result.skip(label, why)
        return result


def fold_constants(graph: Graph, result: PassResult, size_limit: int,
                   too_big: "dict[str, str] | None" = None) -> int:
    """Evaluate all-constant subgraphs with ONNX Runtime (onnx-graphsurgeon's folder).

    Q/DQ nodes are kept (gs never folds them), so a quantized model stays quantized. No node
    whose output would exceed ``size_limit`` bytes is evaluated at all (:func:`fold_blocker`,
    estimated before evaluation: gs's own threshold only drops a result after computing it, and
    a ConstantOfShape of [60000, 60000] is 14.4 GB); why each was left is put in ``too_big``
    (node label -> reason), for the pass to report those still there at its end. gs's folding
    sessions are built without options, so ORT's default logger is silenced meanwhile.
    """
    before = len(graph.nodes)
    graph.toposort()
    opsets = list(graph._template.opset_import)
    blocked = {} if too_big is None else too_big

    def exclude(node: gs.Node) -> bool:
        if node.op in rules.NONDETERMINISTIC or node.domain not in ("", "ai.onnx", None):
            return True
        why = fold_blocker(node, size_limit, opsets)
        if why:
            blocked[_node_label(node)] = why
        return why is not None

    try:
        with _quiet_ort():
            graph.gs.fold_constants(fold_shapes=True, partitioning="recursive", error_ok=True,
                                    size_threshold=size_limit, recurse_subgraphs=False,
                                    should_exclude_node=exclude)
            # gs would fold If/Loop bodies without ``exclude``: fold them here, with it
            for sub in list(graph.gs.subgraphs(recursive=True)):
                sub.toposort()
                sub.fold_constants(fold_shapes=True, partitioning="recursive", error_ok=True,
                                   size_threshold=size_limit, recurse_subgraphs=False,
                                   recurse_functions=False, should_exclude_node=exclude)
    except Exception as exc:  # folding is an optimisation: a model it cannot evaluate stays as is
        result.skip("constant folding", f"onnx-graphsurgeon could not fold: {str(exc).splitlines()[0]}")
        return 0
    graph.remove_unused()
    folded = before - len(graph.nodes)
    if folded:
        result.changed = True
        result.count("constant_nodes_folded", folded)
    return folded


# Ops whose output size comes from input *values* (a shape, repeats, a range, sizes, scales,
# pads, a depth) rather than from input sizes: with an unknown output shape their size cannot be
# bounded before evaluation, so they wait for their inputs to be constants and their shape known.
SIZE_FROM_VALUES = frozenset({"ConstantOfShape", "Expand", "Tile", "Range", "Resize", "Upsample", "Pad",
                              "OneHot", "CenterCropPad", "Col2Im", "MaxUnpool"})
_TINY_CONSTANT_BYTES = 1 << 19  # constants copied by value into the one-node inference model


def fold_blocker(node: gs.Node, size_limit: int, opsets: "list | None" = None) -> "str | None":
    """Why ``node`` must not be evaluated by folding (None: it may): an output over ``size_limit``
    bytes, or, for an op of ``SIZE_FROM_VALUES``, an output size not known beforehand."""
    sizes = [_tensor_bytes(t) for t in node.outputs]
    shapes = [list(t.shape) if b is not None else None for b, t in zip(sizes, node.outputs)]
    if any(b is None for b in sizes) and node.op in SIZE_FROM_VALUES:
        one = _infer_one(node, opsets) if all(isinstance(t, gs.Constant) or t.is_empty() for t in node.inputs) else None
        if one is None:
            return (f"not folded: {node.op} makes its output size from input values, and that size is not known "
                    "before evaluation")
        sizes, shapes = [b for b, _ in one], [d for _, d in one]
    known = [(b, d, t.name) for b, d, t in zip(sizes, shapes, node.outputs) if b is not None]
    if not known:
        return None
    big, dims, name = max(known, key=lambda k: k[0])
    if big <= size_limit:
        return None
    return (f"not folded: its output '{name}' would take {_format_bytes(big)} ({'x'.join(map(str, dims))}), over "
            f"the {size_limit / (1 << 20):g} MiB limit (fold_size_limit_mb); it is left to run time")


def _tensor_bytes(t: gs.Tensor) -> "int | None":
    """Size of ``t`` from its static shape and dtype, without touching its values."""
    shape, dtype = t.shape, t.dtype
    if shape is None or dtype is None or any(not isinstance(d, (int, np.integer)) or d < 0 for d in shape):
        return None
    try:
        itemsize = get_itemsize(dtype)
    except Exception:
        return None
    return int(np.prod([int(d) for d in shape], dtype=object)) * int(itemsize)


def _infer_one(node: gs.Node, opsets: "list | None") -> "list[tuple] | None":
    """(bytes, dims) of each output of ``node`` ((None, None) where unknown) from ONNX shape
    inference with data propagation on a one-node model of its constant inputs (those up to
    ``_TINY_CONSTANT_BYTES`` by value, larger ones by type only), or None when nothing is known."""
    try:
        ins, graph_inputs = [], []
        for i, t in enumerate(node.inputs):
            if t.is_empty():
                ins.append(gs.Variable.empty())
                continue
            size = _tensor_bytes(t)
            if size is not None and size <= _TINY_CONSTANT_BYTES:
                ins.append(gs.Constant(f"in{i}", np.asarray(t.values)))
            else:
                v = gs.Variable(f"in{i}", dtype=t.dtype, shape=list(t.shape) if t.shape is not None else None)
                ins.append(v)
                graph_inputs.append(v)
        outs = [gs.Variable(f"out{k}") for k in range(len(node.outputs))]
        one = gs.Node(node.op, name="n", attrs=dict(node.attrs), inputs=ins, outputs=outs, domain=node.domain)
        model = gs.export_onnx(gs.Graph(nodes=[one], inputs=graph_inputs, outputs=outs), do_type_check=False)
        if opsets:
            del model.opset_import[:]
            model.opset_import.extend(opsets)
        info = onnx.shape_inference.infer_shapes(model, strict_mode=False, data_prop=True)
    except Exception:
        return None
    found = {}
    for vi in info.graph.output:
        tt = vi.type.tensor_type
        dims = [d.dim_value if d.HasField("dim_value") else None for d in tt.shape.dim] \
            if tt.HasField("shape") and tt.elem_type else None
        if dims is None or any(d is None for d in dims):
            continue
        itemsize = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type)).itemsize
        found[vi.name] = (int(np.prod(dims, dtype=object)) * itemsize, dims)
    sizes = [found.get(f"out{k}", (None, None)) for k in range(len(node.outputs))]
    return sizes if any(b is not None for b, _ in sizes) else None


def _format_bytes(n: float) -> str:
    for unit, div in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= div:
            return f"{n / div:.1f} {unit}"
    return f"{int(n)} B"


_quiet = {"depth": 0}
_quiet_lock = threading.Lock()


@contextlib.contextmanager
def _quiet_ort():
    """ORT's default logger at FATAL while gs folds: its sessions take no options, and a
    partition it fails to evaluate (we report skips ourselves) would print ORT's error lines to
    stderr. Nested and concurrent folds share one setting; the last restores ORT's default
    (WARNING). The compiler's own sessions set their own level (``sessions.make_session``)."""
    import onnxruntime as ort

    with _quiet_lock:
        if _quiet["depth"] == 0:
            ort.set_default_logger_severity(4)
        _quiet["depth"] += 1
    try:
        yield
    finally:
        with _quiet_lock:
            _quiet["depth"] -= 1
            if _quiet["depth"] == 0:
                ort.set_default_logger_severity(2)


def correct_output_shapes(graph: Graph, result: PassResult) -> int:
    """Replace a declared graph-output shape that contradicts shape inference by the inferred one.

    Some exporters declare wrong output shapes (ddddocr's OCR model declares [1, seqlen] for a
    [T, 1, 8210] output). ONNX Runtime only warns at run time, but once clean-up makes the shape
    computable the ONNX checker rejects the model; the runtime's actual shape is what counts.
    """
    declared = {t.name: (list(t.shape) if t.shape is not None else None) for t in graph.outputs}
    graph.refresh_shapes(outputs=True)
    fixed = 0
    for tensor in graph.outputs:
        before, after = declared.get(tensor.name), tensor.shape
        if before is None or after is None:
            tensor.shape = before if after is None else after
            continue
        conflict = len(before) != len(after) or any(
            isinstance(a, (int, np.integer)) and isinstance(b, (int, np.integer)) and a != b
            for a, b in zip(before, after))
        if conflict:
            tensor.shape = [b if b is not None else f"{tensor.name}_dim{k}" for k, b in enumerate(after)]
            result.change(tensor.name, "corrected_output_shape", declared=before, inferred=list(tensor.shape))
            fixed += 1
        else:
            tensor.shape = before  # the declared shape stands (it may carry the user's dim names)
    return fixed


def dedup_initializers(graph: Graph, result: PassResult) -> int:
    """Point every user of a repeated constant at its first copy (by dtype, shape and bytes)."""
    uses: list[tuple[gs.Node, int, gs.Constant]] = []
    by_layout: dict[tuple, list[gs.Constant]] = {}
    for node in graph.nodes:
        for i, t in enumerate(node.inputs):
            if isinstance(t, gs.Constant) and not graph.is_graph_output(t):
                uses.append((node, i, t))
                group = by_layout.setdefault((str(t.dtype), tuple(t.shape)), [])
                if all(c is not t for c in group):
                    group.append(t)
    # Only constants that share dtype and shape can be equal: hash just those (big weights
    # are usually unique, and hashing VGG-16's 550 MB costs seconds).
    keep: dict[int, gs.Constant] = {}
    for group in by_layout.values():
        if len(group) < 2:
            continue
        first: dict[str, gs.Constant] = {}
        for t in group:
            keep[id(t)] = first.setdefault(array_digest(np.asarray(t.values)), t)
    merged = set()
    for node, i, t in uses:
        k = keep.get(id(t), t)
        if k is not t:
            node.inputs[i] = k
            merged.add(t.name)
    if merged:
        result.changed = True
        result.count("duplicate_initializers_merged", len(merged))
    return len(merged)
