"""``q8 refit_weights``: refit each layer's int8 weights and bias to the int8 model's own inputs.

ORT's tool rounds every weight to the nearest point of its int8 grid, layer by layer, as if the
layer's input were float. In the int8 model it is not: every uint8 activation upstream adds
rounding and clipping error, and on PP-OCRv4 the layer inputs deep in the backbone differ from
float by 30-100 % (relative L2) even though the output still reads right. This step takes the
tool's QDQ model and, for each Conv / MatMul / Gemm in graph order:

1. runs the int8 model (with the layers before it already refitted) and the float model on the
   calibration inputs up to this layer's input: ``Xq`` (as the int8 layer sees it) and ``Xf``;
2. moves the float weights ``W`` (bias as a last column against a row of ones) toward the
   least-squares map from ``Xq`` to the float output ``W Xf``:
   ``W* = W + W (Xf - Xq) Xq^T (Xq Xq^T + lambda I)^-1``. ``lambda`` (``damp`` times the mean
   diagonal) shrinks the correction toward zero, not the weights, so a small calibration set
   cannot pull a layer far from its float weights;
3. rounds ``W*`` onto the tool's own grid (same per-channel scales, [-127, 127]) column by column
   with GPTQ's error feedback (Frantar et al. 2023), largest ``Xq`` energy first; the bias stays
   continuous and takes the rest, then is re-quantized on the tool's int32 bias scale.

Only the int8 weight and int32 bias initializers change; scales, zero points and the graph are
the tool's, so ORT fuses exactly the same int8 kernels. A layer is left with the tool's rounding
when its fit does not lower its own output error on the calibration columns, or cannot be solved.

Why not GPTQ as published: fitted to float inputs it makes these int8 models *worse* (PP-OCRv4
rec 0.982 -> 0.971-0.976 cosine, measured), because its compensation assumes inputs that the
int8 model never sees. Fitting layer by layer to the quantized inputs is what closes the gap;
refitting several dependent layers from one capture corrects the same upstream error twice, so
each layer gets its own capture of the int8 model (``len(layers)`` truncated forward passes); the
float model's layer inputs are captured a group at a time, within a memory budget.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from onnxslim_cnn.analysis.calibration import CalibrationData
from onnxslim_cnn.analysis.conv_patches import ConvGeometry, node_attrs, patches
from onnxslim_cnn.sessions import make_session, run_chunks

from .mixed import dequantized_constant

_SEED = 0  # column sampling: same input, same options, same bytes out


def _attr(node: onnx.NodeProto, name: str, default):
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def _transposed(node: onnx.NodeProto) -> bool:
    """Whether the weight is (inputs, outputs): MatMul ``x @ W`` and Gemm without transB."""
    return node.op_type == "MatMul" or (node.op_type == "Gemm" and not _attr(node, "transB", 0))


class _Layer:
    """One refittable layer: its node in the int8 model, its float twin, and their initializers."""

    def __init__(self, node, float_node, weight_dq, bias_dq, bias_init):
        self.node, self.float_node = node, float_node
        self.weight_dq, self.bias_dq, self.bias_init = weight_dq, bias_dq, bias_init


def find_layers(qmodel: onnx.ModelProto, fmodel: onnx.ModelProto) -> tuple[list[_Layer], list[tuple[str, str]]]:
    """Layers of ``qmodel`` whose int8 weights can be refitted, in graph order, and those that cannot."""
    qinits = {t.name: t for t in qmodel.graph.initializer}
    finits = {t.name for t in fmodel.graph.initializer}
    producer = {o: n for n in qmodel.graph.node for o in n.output}
    uses: dict[str, int] = {}
    for n in qmodel.graph.node:
        for i in n.input:
            uses[i] = uses.get(i, 0) + 1
    fnodes = {n.name: n for n in fmodel.graph.node}
    layers, skipped = [], []
    for n in qmodel.graph.node:
        if n.op_type not in ("Conv", "MatMul", "Gemm", "ConvTranspose") or len(n.input) < 2:
            continue
        dq = producer.get(n.input[1])
        if dq is None or dq.op_type != "DequantizeLinear" or dq.input[0] not in qinits:
            continue  # weight kept float: nothing to refit
        why = _unsupported(n, dq, qinits, uses)
        fn = fnodes.get(n.name)
        if why is None and (fn is None or fn.op_type != n.op_type or fn.input[1] not in finits):
            why = "no float layer of this name with a constant weight"
        bias_dq = bias_init = None
        if why is None and len(n.input) > 2 and n.input[2]:
            b = producer.get(n.input[2])
            if (b is not None and b.op_type == "DequantizeLinear" and b.input[0] in qinits and b.input[1] in qinits
                    and uses[b.input[0]] == 1):
                bias_dq = b
            elif n.input[2] in qinits and uses[n.input[2]] == 1:
                bias_init = n.input[2]
            else:
                why = "bias is neither a constant nor a dequantized constant of its own"
            if why is None and len(fn.input) > 2 and fn.input[2] and fn.input[2] not in finits:
                why = "float layer's bias is not a constant"
        if why:
            skipped.append((n.name, f"refit_weights: {why}"))
        else:
            layers.append(_Layer(n, fn, dq, bias_dq, bias_init))
    return layers, skipped


def _unsupported(n: onnx.NodeProto, dq: onnx.NodeProto, qinits: dict, uses: dict) -> "str | None":
    if n.op_type == "ConvTranspose":
        return "ConvTranspose is not refitted (left with the tool's rounding)"
    weight = qinits[dq.input[0]]
    if dq.input[1] not in qinits:
        return "weight scale is not a constant"
    if weight.data_type != onnx.TensorProto.INT8:
        return "weight is not int8"
    if uses.get(dq.input[0], 0) != 1 or uses.get(dq.output[0], 0) != 1:
        return "weight shared with another node"
    if len(dq.input) > 2 and dq.input[2]:
        if dq.input[2] not in qinits:
            return "weight zero point is not a constant"
        if np.any(numpy_helper.to_array(qinits[dq.input[2]])):
            return "weight zero point is not 0"
    scale = numpy_helper.to_array(qinits[dq.input[1]])
    transposed = _transposed(n)
    outputs = weight.dims[1] if transposed and len(weight.dims) > 1 else weight.dims[0]
    if scale.size not in (1, outputs) or (scale.size > 1 and _attr(dq, "axis", 1) != (1 if transposed else 0)):
        return "weight scales are not per tensor or per output channel"
    if n.op_type == "Conv":
        if len(weight.dims) != 4:
            return "only 2-D convolutions are refitted"
        if _attr(n, "auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET"):
            return "auto_pad convolutions are not refitted"
    elif n.op_type == "Gemm":
        if _attr(n, "transA", 0) or _attr(n, "alpha", 1.0) != 1.0 or _attr(n, "beta", 1.0) != 1.0:
            return "Gemm with transA or alpha/beta != 1"
    elif len(weight.dims) != 2:
        return "MatMul weight is not 2-D"
    return None


def _capture(model: onnx.ModelProto, calib, names: "list[str]") -> "list[np.ndarray] | None":
    """The values of ``names`` for every calibration sample, from the part of ``model`` that
    computes them.

    Plain QDQ semantics (optimizations off), as in q8.mixed: ORT's fusions of a graph with an
    exposed intermediate are not those of the deployed graph."""
    producer = {o: n for n in model.graph.node for o in n.output}
    keep, stack = set(), list(names)
    while stack:
        node = producer.get(stack.pop())
        if node is None or id(node) in keep:
            continue
        keep.add(id(node))
        stack.extend(i for i in node.input if i)
        for a in node.attribute:  # a subgraph may read outer tensors we did not follow
            if a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS):
                return None
    part = onnx.ModelProto()
    part.CopyFrom(model)
    del part.graph.node[:]
    part.graph.node.extend(n for n in model.graph.node if id(n) in keep)
    del part.graph.output[:]
    for name in names:
        part.graph.output.add().name = name
    chunks = run_chunks(make_session(part, optimize=False), calib.inputs, calib.batch, output_names=list(names))
    values = []
    for i in range(len(names)):
        arrays = [c[i] for c in chunks]
        if any(a.shape[1:] != arrays[0].shape[1:] for a in arrays):
            return None
        values.append(np.concatenate(arrays).astype(np.float32, copy=False))
    return values


class _FloatInputs:
    """The float model's layer inputs, captured a group of layers per run instead of one each: the
    float model does not change, so only memory bounds the group (``budget`` bytes, sized from a
    one-sample run)."""

    def __init__(self, fmodel: onnx.ModelProto, calib, names: "list[str]", budget: int):
        self.fmodel, self.calib, self.budget = fmodel, calib, budget
        self.names = list(dict.fromkeys(names))
        self.cache: dict[str, "np.ndarray | None"] = {}
        self.sizes: "dict[str, int] | None" = None

    def get(self, name: str) -> "np.ndarray | None":
        if name not in self.cache:
            self._fill(self.names.index(name))
        return self.cache[name]

    def _fill(self, first: int) -> None:
        self.cache.clear()
        if self.sizes is None:
            first_sample = CalibrationData(inputs={k: v[:1] for k, v in self.calib.inputs.items()},
                                           source="first calibration sample", batch=1)
            one = _capture(self.fmodel, first_sample, self.names)
            samples = next(iter(self.calib.inputs.values())).shape[0]
            self.sizes = {n: (v.nbytes * samples if one is not None else self.budget + 1)
                          for n, v in zip(self.names, one or [None] * len(self.names))}
        group, total = [], 0
        for name in self.names[first:]:
            if group and total + self.sizes[name] > self.budget:
                break
            group.append(name)
            total += self.sizes[name]
        values = _capture(self.fmodel, self.calib, group)
        for i, name in enumerate(group):
            self.cache[name] = None if values is None else values[i]


def _geometry(node: onnx.NodeProto, wshape) -> ConvGeometry:
    return ConvGeometry.from_attrs(node_attrs(node), wshape[2:])


def conv_columns(node: onnx.NodeProto, x: np.ndarray, wshape, positions: np.ndarray) -> np.ndarray:
    """im2col of ``x`` at the sampled output ``positions``: (groups, C/g * kh * kw, P), rows in
    the weight's (channel, ky, kx) order."""
    _, cg, kh, kw = wshape
    cols = patches(x, _geometry(node, wshape), positions, np.float32)
    return cols.T.reshape(_attr(node, "group", 1), cg * kh * kw, len(positions))


def conv_output_positions(node: onnx.NodeProto, x_shape, wshape) -> int:
    return _geometry(node, wshape).positions(x_shape)


def refit_target(w: np.ndarray, xf: np.ndarray, xq: np.ndarray, damp: float):
    """The continuous refit ``W + W (Xf - Xq) Xq^T (Xq Xq^T + lambda I)^-1`` (shapes as in
    ``fit_rounding``), with the damped ``Xq Xq^T / P`` and its undamped diagonal."""
    r, cols = w.shape[2], xf.shape[2]
    h = xq @ xq.transpose(0, 2, 1) / cols
    cross = xf @ xq.transpose(0, 2, 1) / cols
    diag = np.diagonal(h, axis1=1, axis2=2).copy()
    eye = np.eye(r)
    # an input that is always 0 gets a unit diagonal: its weight is then left where it is
    damped = h + (damp * diag.mean(axis=1))[:, None, None] * eye + (diag == 0)[:, :, None] * eye
    target = w + np.linalg.solve(damped, (w @ (cross - h)).transpose(0, 2, 1)).transpose(0, 2, 1)
    return target, damped, diag


def fit_rounding(w: np.ndarray, xf: np.ndarray, xq: np.ndarray, scale: np.ndarray, damp: float,
                 bias: bool) -> np.ndarray:
    """Refitted, rounded weights for ``groups`` independent problems at once.

    ``w`` (G, M, R) float weights, the bias as last column when ``bias``; ``xf``/``xq`` (G, R, P)
    float / int8-model input columns (a row of ones last when ``bias``); ``scale`` (G, M) the
    tool's per-channel scales. Returns (G, M, R): weight columns on the grid ``k * scale`` with
    ``|k| <= 127``, the bias column continuous.
    """
    groups, m, r = w.shape
    target, damped, diag = refit_target(w, xf, xq, damp)
    nq = r - 1 if bias else r
    order = np.argsort(-diag[:, :nq], axis=1, kind="stable")
    if bias:
        order = np.concatenate([order, np.full((groups, 1), r - 1)], axis=1)
    wq = np.take_along_axis(target, order[:, None, :], axis=2)
    hp = np.take_along_axis(np.take_along_axis(damped, order[:, :, None], axis=1), order[:, None, :], axis=2)
    upper = np.linalg.cholesky(np.linalg.inv(hp)).transpose(0, 2, 1)
    for j in range(nq):
        col = wq[:, :, j]
        q = np.clip(np.round(col / scale), -127, 127) * scale
        err = (col - q) / upper[:, j, j][:, None]
        wq[:, :, j] = q
        wq[:, :, j + 1:] -= err[:, :, None] * upper[:, None, j, j + 1:]
    inverse = np.argsort(order, axis=1)
    return np.take_along_axis(wq, inverse[:, None, :], axis=2)


def _float64_rows(cols: np.ndarray, ones: bool) -> np.ndarray:
    """``cols`` (G, R, P) as float64, with a row of ones appended when ``ones``, in one allocation
    (a 512x3x3 conv at 32768 columns is 1.2 GB per float64 copy)."""
    g, r, p = cols.shape
    out = np.empty((g, r + ones, p))
    out[:, :r] = cols
    if ones:
        out[:, r] = 1.0
    return out


def refit(qmodel: onnx.ModelProto, fmodel: onnx.ModelProto, calib, damp: float = 0.3,
          max_columns: int = 32768, float_budget: int = 1 << 30,
          ) -> tuple[onnx.ModelProto, list[dict], list[tuple[str, str]]]:
    """A copy of ``qmodel`` (ORT's QDQ output for ``fmodel``) with refitted int8 weights and biases.

    Returns the model, one record per refitted layer (its relative output error on the
    calibration columns with the tool's rounding and refitted), and (layer, reason) for layers
    left with the tool's rounding."""
    out = onnx.ModelProto()
    out.CopyFrom(qmodel)
    layers, skipped = find_layers(out, fmodel)
    qinits = {t.name: t for t in out.graph.initializer}
    finits = {t.name: t for t in fmodel.graph.initializer}
    rng = np.random.default_rng(_SEED)
    float_inputs = _FloatInputs(fmodel, calib, [layer.float_node.input[0] for layer in layers], float_budget)
    records = []
    for layer in layers:
        n, fn = layer.node, layer.float_node
        xq = (_capture(out, calib, [n.input[0]]) or [None])[0]
        xf = float_inputs.get(fn.input[0])
        if xq is None or xf is None or xq.shape != xf.shape:
            skipped.append((n.name, "refit_weights: cannot capture the layer's input on the calibration data"))
            continue
        w = numpy_helper.to_array(finits[fn.input[1]]).astype(np.float64)
        scale = numpy_helper.to_array(qinits[layer.weight_dq.input[1]]).astype(np.float64)
        transposed = _transposed(n)
        outputs = w.shape[1] if transposed else w.shape[0]
        # what the tool wrote (with bias_correction its bias is not the float one): the guard's baseline
        written = dequantized_constant(qinits, layer.weight_dq).astype(np.float64)
        b = None
        if layer.bias_dq is not None or layer.bias_init is not None:
            # a bias only the int8 model has (bias_correction added it) is 0 in float
            b = (numpy_helper.to_array(finits[fn.input[2]]).astype(np.float64) if len(fn.input) > 2 and fn.input[2]
                 else np.zeros(outputs))
        if n.op_type == "Conv":
            m, groups = w.shape[0], _attr(n, "group", 1)
            if xq.ndim != 4:
                skipped.append((n.name, "refit_weights: input is not 4-D"))
                continue
            total = conv_output_positions(n, xq.shape, w.shape)
            positions = np.sort(rng.choice(total, size=min(total, max_columns), replace=False))
            cf = _float64_rows(conv_columns(n, xf, w.shape, positions), b is not None)
            cq = _float64_rows(conv_columns(n, xq, w.shape, positions), b is not None)
            wg = w.reshape(groups, m // groups, -1)
            tool = written.reshape(groups, m // groups, -1)
        else:
            wg = (w.T if transposed else w)[None]
            tool = (written.T if transposed else written)[None]
            k = wg.shape[2]
            cf, cq = xf.reshape(-1, k).T, xq.reshape(-1, k).T
            if cf.shape[1] > max_columns:  # sample before widening to float64
                pick = np.sort(rng.choice(cf.shape[1], size=max_columns, replace=False))
                cf, cq = cf[:, pick], cq[:, pick]
            cf, cq = _float64_rows(cf[None], b is not None), _float64_rows(cq[None], b is not None)
        groups, per = wg.shape[0], wg.shape[1]
        sg = np.broadcast_to(scale.reshape(-1), (groups * per,)).reshape(groups, per)
        if np.any(sg <= 0):
            skipped.append((n.name, "refit_weights: a weight scale is not positive"))
            continue
        if b is not None:
            wg = np.concatenate([wg, b.reshape(groups, per, 1)], axis=2)
            written_bias = (dequantized_constant(qinits, layer.bias_dq) if layer.bias_dq is not None
                            else numpy_helper.to_array(qinits[layer.bias_init]))
            tool = np.concatenate([tool, written_bias.astype(np.float64).reshape(groups, per, 1)], axis=2)
        nq = wg.shape[2] - (b is not None)
        try:
            fitted = fit_rounding(wg, cf, cq, sg, damp, b is not None)
        except np.linalg.LinAlgError:
            skipped.append((n.name, "refit_weights: input covariance is singular"))
            continue
        ref = wg @ cf
        before = float(np.sqrt(np.sum((ref - tool @ cq) ** 2) / max(np.sum(ref ** 2), 1e-30)))
        after = float(np.sqrt(np.sum((ref - fitted @ cq) ** 2) / max(np.sum(ref ** 2), 1e-30)))
        if not after < before:
            skipped.append((n.name, f"refit_weights: fit did not lower the layer's error ({before:.4f} -> {after:.4f})"))
            continue
        codes = np.clip(np.round(fitted[:, :, :nq] / sg[:, :, None]), -127, 127).astype(np.int8)
        codes = codes.reshape(w.shape) if n.op_type == "Conv" else (codes[0].T if transposed else codes[0])
        qinits[layer.weight_dq.input[0]].CopyFrom(numpy_helper.from_array(codes, layer.weight_dq.input[0]))
        if b is not None:
            nb = fitted[:, :, -1].reshape(-1)
            if layer.bias_dq is not None:
                bias_scale = numpy_helper.to_array(qinits[layer.bias_dq.input[1]]).astype(np.float64)
                info = np.iinfo(np.int32)
                nbq = np.clip(np.round(nb / bias_scale), info.min, info.max).astype(np.int32)
                qinits[layer.bias_dq.input[0]].CopyFrom(numpy_helper.from_array(nbq, layer.bias_dq.input[0]))
            else:
                qinits[layer.bias_init].CopyFrom(numpy_helper.from_array(nb.astype(np.float32), layer.bias_init))
        records.append({"layer": n.name, "error_tool": round(before, 6), "error_refit": round(after, 6),
                        "columns": int(cf.shape[2])})
    return out, records, skipped
