"""Pass ``q8``: static int8 QDQ quantization, with ONNX Runtime's own quantization tool as the engine.

ORT's ``quantize_static`` inserts the QuantizeLinear/DequantizeLinear pairs, so the output is
exactly what ORT users expect. Around it, ``q8`` fixes what the tool gets wrong on its own:

* BatchNorm (and BN exported as per-channel Mul + Add) is folded first by running ``slim``;
  QDQ inserted around an unfolded BN keeps it in float and runs slower than fp32.
* opset < 13 is upgraded to 13 when quantizing per channel: the tool otherwise writes a
  DequantizeLinear with ``axis``, which is invalid before opset 13.
* activations default to uint8: on x86 ORT fuses every Conv and Add of a residual network into
  QLinear kernels with u8 activations, while with its default s8 several stay unfused.
* a model that is already quantized is passed through unchanged (the tool would re-quantize it).

The tool works on files, so the model is written to a temporary directory; the input is never
modified. The result counts the Q/DQ nodes inserted and, from the graph ORT builds at
``ORT_ENABLE_ALL``, the int8 kernels it actually runs next to the float ops left between Q and DQ.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import tempfile
from collections import Counter

import numpy as np
import onnx

from onnxslim_cnn.context import PassContext
from onnxslim_cnn.errors import UserError
from onnxslim_cnn.graph import Graph
from onnxslim_cnn.model_io import constants_to_initializers, needs_external_data, save_model
from onnxslim_cnn.options import option
from onnxslim_cnn.pass_infra import Knob, ModelPass, PassResult, register_pass
from onnxslim_cnn.sparse_storage import densify

# Ops that mark a model as already quantized (QDQ, QOperator or dynamic).
_QUANT_OPS = {"QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "MatMulInteger", "ConvInteger"}
_QUANT_PREFIXES = ("QLinear", "DynamicQuantize", "QGemm", "QAttention")
# Int8 kernels in ORT's optimized graph.
_INT8_PREFIXES = ("QLinear", "QGemm", "QAttention", "QEmbed", "DynamicQuantizeMatMul", "MatMulIntegerToFloat",
                  "ConvInteger", "MatMulInteger", "NhwcQLinear")
_QDQ_OPS = {"QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear"}


@dataclasses.dataclass(frozen=True)
class Q8Options:
    activations: str = option("uint8", "activation type; uint8 fuses every Conv and Add on x86 ORT",
                              choices=("uint8", "int8"))
    per_channel: bool = option(True, "int8 symmetric weights per output channel (else per tensor)")
    calibration: str = option("minmax", "activation range calibration: ORT's minmax / percentile / entropy, "
                                        "or mse (per-tensor range of least uint8 rounding error)",
                              choices=("minmax", "percentile", "entropy", "mse"))
    dynamic: bool = option(False, "ORT dynamic quantization (weights int8, activations quantized at run time)",
                           calibration_when=lambda dynamic: not dynamic)
    exclude: list[str] = option([], "node names kept in float (same as keep_float with names)")
    fold_bn: bool = option(True, "run slim first, folding BatchNormalization into the preceding Conv/Gemm")
    equalize: bool = option(False, "cross-layer equalization of Conv/Gemm pairs through ReLU/pooling "
                                   "(exact in float) before quantizing")
    bias_correction: bool = option(False, "subtract the expected output shift of int8 weight rounding "
                                          "(measured on calibration data) from each Conv/Gemm bias")
    keep_float: list[str] = option([], "node names kept in float; 'auto' adds the most sensitive layers "
                                       "until budget_cosine is met")
    budget_cosine: float = option(0.99, "keep_float=auto: least cosine similarity of every output to float "
                                        "on the calibration data", min=0.0, max=1.0)
    max_float_layers: int = option(16, "keep_float=auto: at most this many layers kept in float", min=0)
    fuse_hardswish: bool = option(False, "rewrite decomposed HardSwish (x * clip(x + 3, 0, 6) / 6) into one "
                                         "HardSwish node (opset 14) before quantizing")
    quantize_ops: str = option("all", "op types given Q/DQ: all that ORT's tool supports, or only the "
                                      "weight layers (Conv, MatMul, Gemm) with everything between them float",
                               choices=("all", "weighted"))
    float_head: bool = option(False, "keep the weight layer that produces each graph output float")
    float_weight_layers: int = option(0, "keep this many Conv/MatMul/Gemm layers float: those whose int8 "
                                         "weights alone lower the output cosine most on the calibration data",
                                      min=0)
    refit_weights: bool = option(False, "after the tool, refit each Conv/MatMul/Gemm's int8 weights and bias, layer "
                                        "by layer, to reproduce the float output from the int8 model's own "
                                        "inputs on the calibration data (GPTQ rounding on the tool's grid)")
    refit_damp: float = option(0.3, "refit_weights: ridge weight (times the mean input energy) that keeps "
                                    "the correction small on few calibration samples", min=0.0)
    sensitivity_samples: int = option(0, "keep_float=auto: calibration samples used to rank the layers "
                                         "(0: all; fewer is faster on big inputs)", min=0)


def is_quantized(model: onnx.ModelProto) -> bool:
    return any(n.op_type in _QUANT_OPS or n.op_type.startswith(_QUANT_PREFIXES) for n in model.graph.node)


def _is_int8_kernel(op_type: str) -> bool:
    return op_type.startswith(_INT8_PREFIXES)


class _Reader:
    """``CalibrationDataReader`` over ``ctx.calibration``: runs of ``batch`` samples."""

    def __init__(self, inputs: dict[str, np.ndarray], batch: int):
        from onnxruntime.quantization import CalibrationDataReader

        class Reader(CalibrationDataReader):
            def __init__(self):
                n = next(iter(inputs.values())).shape[0] if inputs else 0
                self._runs = [{k: v[i:i + batch] for k, v in inputs.items()} for i in range(0, n, max(batch, 1))]
                self._it = iter(self._runs)

            def get_next(self):
                return next(self._it, None)

            def rewind(self):
                self._it = iter(self._runs)

        self.reader = Reader()


def kernel_stats(model_path: str, work_dir: str) -> dict:
    """Load ``model_path`` in ORT at ORT_ENABLE_ALL and count what the optimized graph runs."""
    from onnxslim_cnn.sessions import make_session

    opt_path = os.path.join(work_dir, "ort_optimized.onnx")
    make_session(model_path, optimized_model_filepath=opt_path)  # optimize=True: ORT_ENABLE_ALL
    optimized = onnx.load(opt_path, load_external_data=False)
    nodes = list(optimized.graph.node)
    producer = {o: n for n in nodes for o in n.output}
    int8 = Counter(n.op_type for n in nodes if _is_int8_kernel(n.op_type))
    # A float op left between Q and DQ: a compute node that reads a dequantized tensor.
    left = Counter(n.op_type for n in nodes
                   if n.op_type not in _QDQ_OPS and not _is_int8_kernel(n.op_type)
                   and any(i in producer and producer[i].op_type == "DequantizeLinear" for i in n.input))
    return {
        "int8_kernels": sum(int8.values()),
        "int8_kernel_types": dict(sorted(int8.items())),
        "float_ops_in_qdq": sum(left.values()),
        "float_op_types_in_qdq": dict(sorted(left.items())),
        "ort_quantize_nodes": sum(n.op_type == "QuantizeLinear" for n in nodes),
        "ort_dequantize_nodes": sum(n.op_type == "DequantizeLinear" for n in nodes),
    }


def _tool_input(model: onnx.ModelProto) -> onnx.ModelProto:
    """The model as ORT's quantizer needs it: weights held in Constant nodes (Paddle exports keep
    every weight there) become initializers, or the tool quantizes them as activations; weights
    stored sparse (the sparse pass) become dense, which the tool cannot read otherwise; IR < 4
    becomes IR 4. The input is not modified; without any of these, it is returned as it is.

    Why IR 4: IR < 4 requires every initializer among the graph inputs, and the tool adds
    initializers that are not (the Reshape shapes and Reduce axes of its augmented calibration
    model, the scales and zero points of its output): ORT then refuses to load the augmented
    model ("initializer_arg was false ... Missing: <uuid>", PyTorch's old exports such as the
    onnx backend test models pytorch-converted/test_ELU), and the checker rejects the output
    ("0_zero_point in initializer but not in graph input"). Turning Constant nodes into
    initializers has the same problem. The initializers an IR 3 model lists as inputs are
    taken out of them (ORT would not treat them as constants) and listed again in the output
    where they are still there (:func:`_relist_inputs`)."""
    g = model.graph
    old_ir = model.ir_version < 4
    if not old_ir and not g.sparse_initializer and \
            not any(n.op_type == "Constant" and n.domain in ("", "ai.onnx") for n in g.node):
        return model
    work = onnx.ModelProto()
    work.CopyFrom(model)
    if old_ir:
        work.ir_version = 4
        weights = {t.name for t in work.graph.initializer}
        inputs = [i for i in work.graph.input if i.name not in weights]
        del work.graph.input[:]
        work.graph.input.extend(inputs)
    constants_to_initializers(work)
    densify(work)
    return work


def _relist_inputs(source: onnx.ModelProto, out: onnx.ModelProto) -> None:
    """List again, in ``source``'s order, the graph inputs of ``source`` that are initializers
    there and still are in ``out``: slim (fold_bn) and the tool drop initializers from the
    inputs, which an IR < 4 model lists them among. A weight the tool replaced by its int8
    copy is gone and stays so."""
    listed = {i.name: i for i in out.graph.input}
    src_inits = {t.name for t in source.graph.initializer}
    out_inits = {t.name: t for t in out.graph.initializer}
    if not any(i.name in src_inits and i.name not in listed and i.name in out_inits for i in source.graph.input):
        return
    inputs = []
    for i in source.graph.input:
        if i.name in listed:
            inputs.append(listed.pop(i.name))
        elif i.name in src_inits and i.name in out_inits:
            t = out_inits[i.name]  # its type as it is now (the interface check compares it)
            inputs.append(onnx.helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
    inputs += listed.values()
    del out.graph.input[:]
    out.graph.input.extend(inputs)


def _name_nodes(model: onnx.ModelProto) -> onnx.ModelProto:
    """Give every unnamed node a unique name: keep_float and the report refer to nodes by name."""
    if all(n.name for n in model.graph.node) and len({n.name for n in model.graph.node}) == len(model.graph.node):
        return model
    out = onnx.ModelProto()
    out.CopyFrom(model)
    seen: set[str] = set()
    for i, n in enumerate(out.graph.node):
        if not n.name or n.name in seen:
            base = f"{n.op_type}_{i}"
            name, k = base, 1
            while name in seen:
                name, k = f"{base}_{k}", k + 1
            n.name = name
        seen.add(n.name)
    return out


class _NoPreprocessingHint(logging.Filter):
    """Drops the tool's 'Please consider (to run) pre-processing before quantization' warning:
    it is logged on the root logger whenever the model lacks the tag of ORT's quant_pre_process,
    and q8 does that work itself (slim, opset upgrade, shape inference)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "pre-processing before quantization" not in record.getMessage()


class ToolError(RuntimeError):
    """ORT's quantization tool itself failed (its message, one line): the model, or some node of
    it, is beyond what the tool handles; not a bug of this pass."""


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}"[:300] if text else type(exc).__name__


def quantize_with_ort(model: onnx.ModelProto, o: Q8Options, ctx: PassContext, exclude: "list[str]",
                      dst: str, tmp: str) -> None:
    """Write ``model`` quantized by ORT's tool (``o``'s set-up, ``exclude`` kept float) to ``dst``.
    Raises :class:`ToolError` where the tool fails."""
    import onnxruntime as ort

    hint = _NoPreprocessingHint()
    logging.getLogger().addFilter(hint)
    # The tool's sessions log warnings on stderr (unused initializers it added itself): errors only.
    ort.set_default_logger_severity(3)
    try:
        _quantize_with_ort(model, o, ctx, exclude, dst, tmp)
    finally:
        ort.set_default_logger_severity(2)
        logging.getLogger().removeFilter(hint)


# Tool runs the search for nodes to leave float may take (each calibrates once).
_MAX_TOOL_RUNS = 32


def quantize_leaving_out(model: onnx.ModelProto, o: Q8Options, ctx: PassContext, keep: "list[str]",
                         dst: str, tmp: str) -> "tuple[list[tuple[str, str]], str | None]":
    """Quantize with ORT's tool as :func:`quantize_with_ort`, leaving float the nodes it fails on.

    Returns ``(left_out, None)`` with ``dst`` written, ``left_out`` the ``(node, reason)`` pairs
    kept float besides ``keep`` (empty when the tool ran at once), or ``([], reason)`` when the
    tool fails even with every node left float (nothing can be quantized; ``dst`` not written).

    Where the tool fails: first the nodes its message names are left float; else a bisection in
    graph order finds a node whose quantization breaks it (quantizing the nodes before it
    works, adding it fails), which is left float, and so on until the tool runs. Past
    ``_MAX_TOOL_RUNS`` runs, every node of the op types found so far is left float; failing
    that too, nothing is quantized.
    """
    try:
        quantize_with_ort(model, o, ctx, keep, dst, tmp)
        return [], None
    except ToolError as exc:
        first = str(exc)
    runs = [1]

    def attempt(extra: "list[str]") -> "str | None":
        runs[0] += 1
        try:
            quantize_with_ort(model, o, ctx, list(keep) + [n for n in extra if n not in keep], dst, tmp)
            return None
        except ToolError as exc:
            return str(exc)

    nodes = [n for n in model.graph.node if n.name not in keep and n.op_type != "Constant"]
    names = [n.name for n in nodes]
    if not names:
        return [], first
    # What can be quantized at all: with every node float the tool must run (it then inserts
    # nothing), else the failure is not a node's and nothing can be quantized.
    if attempt(names) is not None:
        return [], first
    named = _named_in(first, names)
    if named and attempt(named) is None:
        return [(n, first) for n in named], None

    left: "list[tuple[str, str]]" = []
    error = first
    while error is not None:
        rest = [n for n in names if n not in {x for x, _ in left}]
        if runs[0] >= _MAX_TOOL_RUNS or not rest:
            break
        # Invariant: quantizing rest[:lo] works, quantizing rest[:hi] fails (with `why`).
        lo, hi, why = 0, len(rest), error
        while hi - lo > 1 and runs[0] < _MAX_TOOL_RUNS:
            mid = (lo + hi) // 2
            failed = attempt([x for x, _ in left] + rest[mid:])
            if failed is None:
                lo = mid
            else:
                hi, why = mid, failed
        if hi - lo > 1:
            break  # out of runs mid-search
        left.append((rest[hi - 1], why))
        error = attempt([x for x, _ in left])
    if error is None:
        return left, None
    # Out of runs: leave float every node of the op types found so far, then give up.
    types = {n.op_type for n in nodes if n.name in {x for x, _ in left}}
    by_type = [n.name for n in nodes if n.op_type in types]
    if by_type and attempt(by_type) is None:
        reasons = dict(left)
        return [(n, reasons.get(n, f"op type {t} left float: the tool failed on nodes of it ({first})"))
                for n, t in ((m.name, m.op_type) for m in nodes if m.name in by_type)], None
    return [], first


def _named_in(message: str, names: "list[str]") -> "list[str]":
    """The node names that ``message`` mentions as names (quoted, or a whole word of 3+ characters)."""
    import re

    out = []
    for name in names:
        quoted = any(f"{q}{name}{q}" in message for q in ("'", '"', "`"))
        word = len(name) >= 3 and re.search(rf"(?<![\w./-]){re.escape(name)}(?![\w./-])", message)
        if quoted or word:
            out.append(name)
    return out


def _quantize_with_ort(model: onnx.ModelProto, o: Q8Options, ctx: PassContext, exclude: "list[str]",
                       dst: str, tmp: str) -> None:
    from onnxruntime.quantization import (
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_dynamic,
        quantize_static,
    )

    src = os.path.join(tmp, "float.onnx")
    save_model(model, src)
    big = needs_external_data(model)  # the tool then writes its output with external data too
    if o.dynamic:
        try:
            quantize_dynamic(src, dst, per_channel=o.per_channel, weight_type=QuantType.QInt8,
                             nodes_to_exclude=list(exclude) or None, use_external_data_format=big)
        except (MemoryError, RecursionError):
            raise
        except Exception as exc:
            raise ToolError(_one_line(exc)) from exc
        return
    tool_out = os.path.join(tmp, "tool_q8.onnx") if exclude else dst
    calib = ctx.calibration
    method = {"minmax": CalibrationMethod.MinMax, "percentile": CalibrationMethod.Percentile,
              "entropy": CalibrationMethod.Entropy, "mse": CalibrationMethod.MinMax}[o.calibration]
    act = QuantType.QUInt8 if o.activations == "uint8" else QuantType.QInt8
    extra = {"WeightSymmetric": True, "ActivationSymmetric": o.activations == "int8"}
    if o.calibration == "mse":
        extra["TensorQuantOverrides"] = _mse_overrides(model, calib, ctx)
    try:
        quantize_static(src, tool_out, _Reader(calib.inputs, calib.batch).reader,
                        quant_format=QuantFormat.QDQ, per_channel=o.per_channel,
                        activation_type=act, weight_type=QuantType.QInt8,
                        nodes_to_exclude=list(exclude) or None, use_external_data_format=big,
                        calibrate_method=method,
                        op_types_to_quantize=_WEIGHTED if o.quantize_ops == "weighted" else None,
                        extra_options=extra)
    except (MemoryError, RecursionError):
        raise
    except Exception as exc:
        raise ToolError(_one_line(exc)) from exc
    if exclude:
        from .mixed import float_islands

        float_producers = {t: n.name for n in model.graph.node for t in n.output}
        float_producers.update({i.name: i.name for i in model.graph.input})
        save_model(float_islands(onnx.load(tool_out), list(exclude), float_producers), dst)


_WEIGHTED = ["Conv", "ConvTranspose", "MatMul", "Gemm"]


def _refit(reference: onnx.ModelProto, dst: str, o: Q8Options, ctx: PassContext, result: PassResult) -> None:
    """refit_weights on the tool's output at ``dst`` (rewritten in place), kept only when it raises
    the least output cosine to ``reference`` on the calibration data."""
    from onnxslim_cnn.analysis.compare import least_cosine, outputs

    from .refit import refit

    tool = onnx.load(dst)
    fitted, records, skipped = refit(tool, reference, ctx.calibration, damp=o.refit_damp)
    for item, why in skipped:
        result.skip(item, why)
    if not records:
        return
    ref = outputs(reference, ctx.calibration)
    before = least_cosine(ref, outputs(tool, ctx.calibration))
    after = least_cosine(ref, outputs(fitted, ctx.calibration))
    result.stats["refit"] = {"layers": len(records), "calibration_cosine_nearest": round(before, 6),
                             "calibration_cosine_refit": round(after, 6), "applied": after > before}
    if not after > before:
        result.skip("model", f"refit_weights: calibration cosine {before:.4f} -> {after:.4f}; kept the tool's rounding")
        return
    for rec in records:
        result.change(rec.pop("layer"), "weights_refit", **rec)
    save_model(fitted, dst)


def _mse_overrides(model: onnx.ModelProto, calib, ctx: PassContext) -> dict:
    """calibration=mse ranges, cached per model bytes (mixed precision calls the tool many times)."""
    import hashlib

    from .ranges import mse_overrides

    key = "q8_mse_ranges:" + hashlib.sha1(model.SerializeToString()).hexdigest()
    if key not in ctx.cache:
        ctx.cache[key] = mse_overrides(model, calib)
    return ctx.cache[key]


@register_pass
class Q8Pass(ModelPass):
    name = "q8"
    summary = ("Int8 quantization with ONNX Runtime's quantize_static (QDQ; int8 symmetric per-channel "
               "weights, uint8 activations by default) after folding BatchNorm; opset upgraded to 13 "
               "for per-channel; reports the int8 kernels ORT actually builds. dynamic=true uses ORT "
               "dynamic quantization. Already-quantized models pass through unchanged.")
    Options = Q8Options
    modifies = frozenset({"graph", "opset"})
    lossy = True
    budget_knob = Knob(option="keep_float", ladder=([], ["auto"]), target_option="budget_cosine", gain="bytes",
                       fixed_by=("dynamic",), search="first",
                       # the search ranks every layer and tries up to 2 x max_float_layers of them,
                       # each a run of ORT's tool: on PP-OCRv4 rec the defaults (all samples, 16)
                       # took over 10 minutes
                       rung_options={1: {"sensitivity_samples": 8, "max_float_layers": 4}},
                       # int8 QDQ made every small corpus model slower at batch 1 on one thread
                       # (ppocr_cls_v2 0.54x, digits 0.66-0.69x): kept float there, and the
                       # report gives both times
                       must_be_faster=True)

    def run(self, model: onnx.ModelProto, ctx: PassContext) -> PassResult:
        o = self.options
        result = PassResult()
        source = model
        model = _tool_input(model)
        if is_quantized(model):
            result.skip("model", "already quantized (has QuantizeLinear/DequantizeLinear, QLinear* or "
                                 "integer ops); passed through unchanged")
            return result

        if o.fold_bn:
            from ..slim import SlimPass

            model, slim_result = SlimPass().apply(model)
            result.stats["slim_changes"] = len(slim_result.changes)
            result.stats["batchnorm_left"] = sum(n.op_type == "BatchNormalization" for n in model.graph.node)
        model = _name_nodes(model)

        names = {n.name for n in model.graph.node}
        wanted = list(dict.fromkeys(list(o.exclude) + [n for n in o.keep_float if n != "auto"]))
        if o.float_head:
            from .mixed import head_layers

            heads = [n for n in head_layers(model) if n not in wanted]
            result.stats["float_head"] = heads
            wanted += heads
        from .mixed import with_fused_activations

        keep = with_fused_activations(model, [n for n in wanted if n in names])
        for n in wanted:
            if n not in names:
                result.skip(n, "keep_float/exclude: no node of this name")

        opset = next((op.version for op in model.opset_import if op.domain in ("", "ai.onnx")), 0)
        if opset < 13 and (o.per_channel or not o.dynamic):
            # DequantizeLinear's axis (per-channel) needs opset 13; the tool itself would write an
            # invalid model. Per-tensor static QDQ is also upgraded: one opset for both set-ups.
            from onnx import version_converter

            try:
                model = version_converter.convert_version(model, 13)
            except Exception as exc:
                raise UserError(f"q8: cannot upgrade opset {opset} to 13 for per-channel quantization: "
                                f"{str(exc).strip().splitlines()[0]}") from None
            result.stats["opset_upgraded"] = f"{opset}->13"
            model.ir_version = max(model.ir_version, 7)  # opset 13 came with IR 7

        if o.fuse_hardswish:
            from .fuse import fuse_hardswish

            model, fused = fuse_hardswish(model)
            for name in fused:
                result.change(name, "hardswish_fused")
        if o.float_weight_layers and not o.dynamic:
            from .mixed import weight_sensitive_layers

            chosen, sensitivity = weight_sensitive_layers(model, ctx.calibration, o.float_weight_layers, set(keep))
            result.stats["float_weight_layers"] = chosen
            for name in chosen:
                result.change(name, "kept_float", sensitivity=sensitivity[name],
                              reason="int8 weights of this layer alone cost the most output cosine")
            keep += [n for n in with_fused_activations(model, chosen) if n not in keep]
        if o.equalize:
            from .equalize import equalize

            g = Graph.from_model(model)
            pairs, eq_skipped = equalize(g, exclude=set(keep))
            if pairs:
                model = g.to_model()
            result.stats["equalized_pairs"] = len(pairs)
            for rec in pairs:
                result.change(f"{rec['first']}->{rec['second']}", "equalized", **rec)
            for item, why in eq_skipped:
                result.skip(item, f"equalize: {why}")
        reference = model  # refit_weights targets this float model (exact float, before bias correction)
        if o.bias_correction and not o.dynamic:
            from .equalize import bias_correct

            model, corrected, bc_skipped = bias_correct(model, ctx.calibration, o.per_channel, set(keep))
            result.stats.setdefault("bias_corrected", 0)
            for rec in corrected:
                result.change(rec["layer"], "bias_corrected", max_abs_shift=rec["max_abs_shift"],
                              added_bias=rec["added_bias"])
            for item, why in bc_skipped:
                result.skip(item, f"bias_correction: {why}")
        elif o.bias_correction:
            result.skip("model", "bias_correction: needs static quantization (dynamic=true)")

        q_before = sum(n.op_type == "QuantizeLinear" for n in model.graph.node)
        dq_before = sum(n.op_type == "DequantizeLinear" for n in model.graph.node)
        with tempfile.TemporaryDirectory(prefix="onnxslim_q8_") as tmp:
            dst = os.path.join(tmp, "q8.onnx")

            def leave_out_failing(keep: "list[str]") -> "list[str] | None":
                """``keep`` plus the nodes the tool fails on (each a skip with the tool's reason),
                ``dst`` written; None (a skip with the reason) when nothing can be quantized."""
                left, failure = quantize_leaving_out(model, o, ctx, keep, dst, tmp)
                if failure is not None:
                    result.skip("model", "ONNX Runtime's quantization tool fails on this model even with every "
                                         f"node left float, nothing quantized: {failure}")
                    return None
                for name, why in left:
                    result.skip(name, f"left float: ONNX Runtime's quantization tool fails when it is quantized "
                                      f"({why})")
                if left:
                    result.stats.setdefault("tool_left_float", []).extend(n for n, _ in left)
                return keep + [n for n, _ in left if n not in keep]

            if "auto" in o.keep_float and not o.dynamic:
                from .mixed import choose_float_layers

                def choose(keep):
                    return choose_float_layers(
                        model, lambda m, excl, dst: quantize_with_ort(m, o, ctx, excl, dst, tmp),
                        ctx.calibration, keep, o.budget_cosine, o.max_float_layers, tmp, o.sensitivity_samples)

                try:
                    chosen, report = choose(keep)
                except ToolError:
                    keep = leave_out_failing(keep)
                    if keep is None:
                        return result
                    chosen, report = choose(keep)
                result.stats["mixed_precision"] = report
                for name in chosen:
                    if name in report["sensitivity"]:
                        why = f"among the most sensitive layers; needed for cosine >= {o.budget_cosine}"
                    else:
                        why = "activation fused into a layer kept float"
                    result.change(name, "kept_float", sensitivity=report["sensitivity"].get(name), reason=why)
                keep = keep + [n for n in chosen if n not in keep]
            elif "auto" in o.keep_float:
                result.skip("model", "keep_float=auto: needs static quantization (dynamic=true)")
            keep = leave_out_failing(keep)
            if keep is None:
                return result
            if o.refit_weights and not o.dynamic:
                _refit(reference, dst, o, ctx, result)
            elif o.refit_weights:
                result.skip("model", "refit_weights: needs static quantization (dynamic=true)")
            quantized = onnx.load(dst)
            _relist_inputs(source, quantized)
            # The tool's intermediate shapes, as the Graph export used to drop them: a later pass
            # re-infers shapes, and stale value_info is what a rewrite must not leave behind.
            del quantized.graph.value_info[:]
            result.stats.update(kernel_stats(dst, tmp))
        if not o.dynamic:
            result.stats["calibration_samples"] = ctx.calibration.samples

        q = sum(n.op_type == "QuantizeLinear" for n in quantized.graph.node) - q_before
        dq = sum(n.op_type == "DequantizeLinear" for n in quantized.graph.node) - dq_before
        dyn = sum(n.op_type == "DynamicQuantizeLinear" for n in quantized.graph.node)
        result.stats["quantize_linear_inserted"] = q
        result.stats["dequantize_linear_inserted"] = dq
        if o.dynamic:
            result.stats["dynamic_quantize_inserted"] = dyn
        result.stats["excluded"] = len(keep)
        result.stats["float_layers"] = list(keep)
        if q + dq + dyn == 0:
            result.skip("model", "ONNX Runtime's quantization tool found nothing to quantize")
            return result

        result.model = quantized
        result.change("model", "quantized", mode="dynamic" if o.dynamic else "static",
                      activations=None if o.dynamic else o.activations, per_channel=o.per_channel)
        return result
