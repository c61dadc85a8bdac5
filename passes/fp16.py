"""Pass ``fp16``: float32 weights and computation to float16.

Every float32 initializer becomes float16 (values beyond the float16 range are clamped, and
counted), every float32 activation is typed float16, ``Cast(to=FLOAT)`` inside the graph casts to
FLOAT16 and float ``ConstantOfShape`` values are converted. With ``keep_io_types`` (default) the
model's float32 inputs and outputs stay float32: a ``Cast`` to float16 follows each float32
input and a ``Cast`` back to float32 precedes each float32 output, as onnxconverter-common does.

BatchNormalization is folded first (``fold_bn``, by running ``slim``): BN statistics often lie
outside the float16 range (PP-OCRv4's detector has a running variance of 9.8e7), and clamping
them to 65504 wrecked that model's output (cosine 0.76 to float), while the folded conv weights
fit.

``op_block_list`` / ``node_block_list`` keep chosen nodes in float32, as onnxconverter-common's
options of the same names do: their float16 inputs get a ``Cast`` to float32, their float32
outputs a ``Cast`` back to float16, and the constants only they read stay float32. The default
block list is onnxconverter-common's list cut to the ops a CNN export contains (detection
post-processing and index arithmetic, whose float16 results are wrong or which ORT has no float16
kernel for, so it would cast around them anyway).

Inputs that the ONNX spec wants in float32 whatever the data type (Resize ``roi``/``scales``,
Upsample ``scales``) are left alone. ONNX Runtime's CPU provider runs the ops it has no float16
kernel for in float32 by inserting casts itself, so the result loads and runs there.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from onnxslim_cnn.graph import Graph
from onnxslim_cnn.options import option
from onnxslim_cnn.context import PassContext
from onnxslim_cnn.pass_infra import GraphPass, PassResult, register_pass

FP16_MAX = float(np.finfo(np.float16).max)
# (op, input index) whose float tensor stays float32 whatever the op's data type
FLOAT32_INPUTS = {("Resize", 1), ("Resize", 2), ("Upsample", 1)}
# ops whose outputs are not the float data type of their inputs, or that hold subgraphs
SKIP_OPS = {"If", "Loop", "Scan"}
# onnxconverter-common's DEFAULT_OP_BLOCK_LIST minus its ai.onnx.ml ops (never in a CNN export)
DEFAULT_OP_BLOCK_LIST = ["NonMaxSuppression", "TopK", "RoiAlign", "Range", "CumSum", "Min", "Max",
                         "Upsample", "RandomUniformLike"]


@dataclasses.dataclass(frozen=True)
class Fp16Options:
    keep_io_types: bool = option(True, "keep float32 graph inputs and outputs (Cast at the boundaries)")
    fold_bn: bool = option(True, "run slim first, folding BatchNormalization (whose variances can overflow "
                                 "float16) into the preceding Conv/Gemm")
    op_block_list: list[str] = option(list(DEFAULT_OP_BLOCK_LIST), "op types kept in float32 (Casts around "
                                      "them); [] converts every op")
    node_block_list: list[str] = option([], "node names kept in float32 (Casts around them)")


@register_pass
class Fp16Pass(GraphPass):
    name = "fp16"
    summary = ("Float16 weights and activations; float32 model inputs/outputs kept by Casts at the "
               "boundaries (keep_io_types).")
    Options = Fp16Options
    modifies = frozenset({"graph", "interface"})
    lossy = True

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        result = PassResult()
        if any(n.op in SKIP_OPS for n in graph.nodes):
            result.skip("graph", "control-flow subgraphs (If/Loop/Scan) are not converted")
            return result
        if self.options.fold_bn:
            from .slim import SlimPass

            slim_result = SlimPass().run(graph, ctx)
            result.stats["slim_changes"] = len(slim_result.changes)
            result.changed = result.changed or slim_result.changed
        f32 = np.dtype(np.float32)
        keep_io = self.options.keep_io_types
        io_ids = {id(t) for t in list(graph.inputs) + list(graph.outputs)}
        fixed = {id(node.inputs[i]) for node in graph.nodes for i in range(len(node.inputs))
                 if (node.op, i) in FLOAT32_INPUTS and node.inputs[i] is not None}

        blocked = [n for n in graph.nodes
                   if n.op in self.options.op_block_list or n.name in self.options.node_block_list]
        for name in sorted(set(self.options.node_block_list) - {n.name for n in graph.nodes}):
            result.skip(name, "node_block_list: no node of this name")
        blocked_ids = {id(n) for n in blocked}
        # constants that only blocked nodes read stay float32 (no Cast needed for them)
        fixed |= {id(t) for n in blocked for t in n.inputs
                  if isinstance(t, gs.Constant) and all(id(c) in blocked_ids for c in t.outputs)}

        # 1. initializers
        clamped = converted = 0
        for t in graph.tensors().values():
            if isinstance(t, gs.Constant) and id(t) not in fixed and _dtype(t.dtype) == f32:
                values = np.asarray(t.values)
                over = int(np.count_nonzero(np.abs(values[np.isfinite(values)]) > FP16_MAX))
                clamped += over
                t.values = np.clip(values, -FP16_MAX, FP16_MAX).astype(np.float16)
                converted += 1
        result.stats["initializers_fp16"] = converted
        if clamped:
            result.stats["values_clamped"] = clamped
            ctx.warnings.append(f"fp16: {clamped} weight values beyond the float16 range were clamped")

        # 2. activations (graph inputs/outputs handled below)
        for t in graph.tensors().values():
            if isinstance(t, gs.Variable) and id(t) not in io_ids and id(t) not in fixed and _dtype(t.dtype) == f32:
                t.dtype = np.float16

        # 3. attributes that name or hold float32
        for node in graph.nodes:
            if node.op == "Cast" and int(node.attrs.get("to", 0)) == onnx.TensorProto.FLOAT \
                    and not any(id(o) in fixed for o in node.outputs) \
                    and not (keep_io and any(id(o) in io_ids for o in node.outputs)):
                node.attrs["to"] = onnx.TensorProto.FLOAT16
                result.count("casts_retargeted")
            elif node.op == "ConstantOfShape":
                v = node.attrs.get("value")
                if isinstance(v, gs.Constant) and _dtype(v.dtype) == f32:
                    node.attrs["value"] = gs.Constant(v.name or node.name + "_value",
                                                      np.asarray(v.values).astype(np.float16))
                    result.count("constants_of_shape")

        # 4. boundaries
        for i, inp in enumerate(list(graph.inputs)):
            if _dtype(inp.dtype) != f32:
                continue
            if not keep_io:
                inp.dtype = np.float16
                continue
            if not inp.outputs:
                continue
            half = gs.Variable(graph.unique_name(f"{inp.name}_fp16"), dtype=np.float16, shape=inp.shape)
            cast = _cast(graph, f"{inp.name}_to_fp16", inp, half, onnx.TensorProto.FLOAT16)
            graph.replace_uses(inp, half)
            cast.inputs[0] = inp  # replace_uses rewired the Cast too
            graph.nodes.append(cast)
            result.change(inp.name, "input_cast")
        for out in list(graph.outputs):
            if _dtype(out.dtype) != f32:
                continue
            if not keep_io:
                out.dtype = np.float16
                continue
            producer = out.inputs[0] if out.inputs else None
            if producer is None:  # an input passed straight through
                continue
            half = gs.Variable(graph.unique_name(f"{out.name}_fp16"), dtype=np.float16, shape=out.shape)
            for j, t in enumerate(producer.outputs):
                if t is out:
                    producer.outputs[j] = half
            graph.replace_uses(out, half)  # internal consumers of the output read float16
            graph.nodes.append(_cast(graph, f"{out.name}_to_fp32", half, out, onnx.TensorProto.FLOAT))
            result.change(out.name, "output_cast")
        # 5. nodes kept in float32
        for node in blocked:
            _keep_float32(graph, node, result)
        if blocked:
            graph.remove_unused()  # input Casts that only kept nodes read
        result.changed = result.changed or converted > 0
        if result.changed:
            graph.toposort()
        return result


def _cast(graph: Graph, hint: str, src: gs.Tensor, dst: gs.Variable, to: int) -> gs.Node:
    """A Cast node ``src -> dst`` (not yet in the graph) with a unique name from ``hint``."""
    return gs.Node("Cast", graph.unique_name(hint), attrs={"to": to}, inputs=[src], outputs=[dst])


def _keep_float32(graph: Graph, node: gs.Node, result: PassResult) -> None:
    """Surround ``node`` with Casts so it computes in float32 inside a float16 graph.

    A float32 -> float16 Cast already in front of an input (the ``keep_io_types`` input Cast, or
    another kept node's output Cast) is looked through instead of adding a Cast back, and a
    float16 -> float32 output Cast that makes a graph output is replaced by writing the output
    directly: a kept node's results are not rounded to float16 on their way out.
    """
    f16, f32 = np.dtype(np.float16), np.dtype(np.float32)
    for i, t in enumerate(node.inputs):
        if t is None or _dtype(t.dtype) != f16:
            continue
        producer = graph.producer(t)
        if producer is not None and producer.op == "Cast" and _dtype(producer.inputs[0].dtype) == f32:
            node.inputs[i] = producer.inputs[0]
            continue
        wide = gs.Variable(graph.unique_name(f"{t.name}_fp32"), dtype=np.float32, shape=t.shape)
        graph.nodes.append(_cast(graph, f"{node.name}_in{i}_to_fp32", t, wide, onnx.TensorProto.FLOAT))
        node.inputs[i] = wide
    for j, t in enumerate(list(node.outputs)):
        if _dtype(t.dtype) != f16:
            continue
        to_output = next((c for c in graph.consumers(t) if c.op == "Cast"
                          and int(c.attrs.get("to", 0)) == onnx.TensorProto.FLOAT
                          and graph.is_graph_output(c.outputs[0])), None)
        if to_output is not None:
            wide = to_output.outputs[0]
            to_output.inputs.clear()
            to_output.outputs.clear()
            graph.nodes.remove(to_output)
        else:
            wide = gs.Variable(graph.unique_name(f"{t.name}_fp32"), dtype=np.float32, shape=t.shape)
        node.outputs[j] = wide
        if graph.consumers(t) or graph.is_graph_output(t):
            graph.nodes.append(_cast(graph, f"{node.name}_out{j}_to_fp16", wide, t, onnx.TensorProto.FLOAT16))
    result.change(node.name, "kept_float32", op=node.op)


def _dtype(dtype) -> "np.dtype | None":
    if dtype is None:
        return None
    try:
        return np.dtype(dtype)
    except TypeError:
        try:
            return np.dtype(onnx.helper.tensor_dtype_to_np_dtype(dtype))
        except Exception:
            return None
