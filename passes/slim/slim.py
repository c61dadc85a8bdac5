"""Pass ``slim``: graph clean-up that keeps outputs equal (the default pass).

The clean-up is a list of small rewrite rules (``RULES``), each a function that finds one
pattern and rewrites it, run in rounds until nothing changes. Exact algebra only: every rule
keeps the model's outputs equal up to float rounding.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import numpy as np
import onnx_graphsurgeon as gs

from onnxslim_cnn.graph import Graph, array_digest
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
        for _ in range(o.max_rounds):
            changed = 0
            if o.fold_constants:
                changed += fold_constants(graph, result, int(o.fold_size_limit_mb * (1 << 20)))
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
        return result


def fold_constants(graph: Graph, result: PassResult, size_limit: int) -> int:
    """Evaluate all-constant subgraphs with ONNX Runtime (onnx-graphsurgeon's folder).

    Q/DQ nodes are kept (gs never folds them), so a quantized model stays quantized.
    """
    before = len(graph.nodes)
    graph.toposort()
    try:
        graph.gs.fold_constants(fold_shapes=True, partitioning="recursive", error_ok=True,
                                size_threshold=size_limit,
                                should_exclude_node=lambda n: n.op in rules.NONDETERMINISTIC or n.domain not in ("", "ai.onnx", None))
    except Exception as exc:  # folding is an optimisation: a model it cannot evaluate stays as is
        result.skip("constant folding", f"onnx-graphsurgeon could not fold: {str(exc).splitlines()[0]}")
        return 0
    graph.remove_unused()
    folded = before - len(graph.nodes)
    if folded:
        result.changed = True
        result.count("constant_nodes_folded", folded)
    return folded


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
