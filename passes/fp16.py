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
from onnxslim_cnn.pipeline import Pass, PassContext, PassResult, register_pass

FP16_MAX = float(np.finfo(np.float16).max)
# (op, input index) whose float tensor stays float32 whatever the op's data type
FLOAT32_INPUTS = {("Resize", 1), ("Resize", 2), ("Upsample", 1)}
# ops whose outputs are not the float data type of their inputs, or that hold subgraphs
SKIP_OPS = {"If", "Loop", "Scan"}


@dataclasses.dataclass(frozen=True)
class Fp16Options:
    keep_io_types: bool = option(True, "keep float32 graph inputs and outputs (Cast at the boundaries)")
    fold_bn: bool = option(True, "run slim first, folding BatchNormalization (whose variances can overflow "
                                 "float16) into the preceding Conv/Gemm")


@register_pass
class Fp16Pass(Pass):
    name = "fp16"
    summary = ("Float16 weights and activations; float32 model inputs/outputs kept by Casts at the "
               "boundaries (keep_io_types).")
    Options = Fp16Options

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
            cast = gs.Node("Cast", graph.unique_name(f"{inp.name}_to_fp16"), attrs={"to": onnx.TensorProto.FLOAT16},
                           inputs=[inp], outputs=[half])
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
            cast = gs.Node("Cast", graph.unique_name(f"{out.name}_to_fp32"), attrs={"to": onnx.TensorProto.FLOAT},
                           inputs=[half], outputs=[out])
            graph.nodes.append(cast)
            result.change(out.name, "output_cast")
        result.changed = result.changed or converted > 0
        if result.changed:
            graph.toposort()
        return result


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
