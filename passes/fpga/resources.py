"""Per-layer figures of a fixed-point IR: resources (hls4ml-style), SQNR against float, hls4ml config.

Resource model (an estimate before synthesis, in hls4ml's terms): a layer with reuse factor R
uses ceil(weights / R) multipliers, each doing R multiplies per output pixel; DSP48 slices are
ceil(Wa/27) * ceil(Wb/18) per multiplier (a DSP48E2 multiplies 27x18 bits; narrow products
often go to LUTs instead, so this is an upper bound); weights held in block RAM take
ceil(bits / 18432) BRAM18 blocks (at R = 1 hls4ml partitions them into registers instead).
"""

from __future__ import annotations

import math

import numpy as np
import yaml

from onnxslim_cnn.fixed_point.ir import FixedFormat, FixedPointModel
from onnxslim_cnn.fixed_point.simulate import quantize_inputs, simulate

BRAM18_BITS = 18 * 1024
_WEIGHTED = ("conv2d", "dense")
_COMPUTE = _WEIGHTED + ("add", "avgpool", "global_avgpool")


def layer_resources(model: FixedPointModel, reuse_factor: int = 1) -> list[dict]:
    rows = []
    for layer in model.layers:
        if layer.op not in _COMPUTE:
            continue
        out = model.tensors[layer.output]
        x = model.tensors[layer.inputs[0]]
        row = {"layer": layer.name, "op": layer.op, "accumulator_bits": out.fmt.width, "macs": 0, "multipliers": 0,
               "dsp48": 0, "weight_bits": 0, "bram18": 0, "cycles": 0}
        if layer.op in _WEIGHTED:
            w, b = layer.weights["weight"], layer.weights["bias"]
            wf = FixedFormat(**layer.attrs["weight_format"])
            pixels = int(np.prod(out.shape[1:])) if layer.op == "conv2d" else 1
            mults = math.ceil(w.size / reuse_factor)
            bits = w.size * wf.width + b.size * out.fmt.width
            row.update(macs=int(w.size * pixels), multipliers=mults,
                       dsp48=mults * math.ceil(x.fmt.width / 27) * math.ceil(wf.width / 18),
                       weight_bits=int(bits), bram18=math.ceil(bits / BRAM18_BITS), cycles=pixels * reuse_factor,
                       weight_format=wf.hls())
        rows.append(row)
    return rows


def sqnr_db(reference: np.ndarray, approx: np.ndarray) -> float:
    """10 log10(signal power / error power); inf when equal."""
    ref = np.asarray(reference, np.float64).ravel()
    err = float(np.sum((ref - np.asarray(approx, np.float64).ravel()) ** 2))
    sig = float(np.sum(ref ** 2))
    if err == 0.0:
        return float("inf")
    return 10.0 * math.log10(sig / err) if sig > 0 else float("-inf")


def tensor_sqnr(model: FixedPointModel, float_values: dict[str, np.ndarray]) -> dict[str, float]:
    """SQNR of every IR tensor that stands for an ONNX tensor, on the same inputs as ``float_values``."""
    q = quantize_inputs(model, {n: float_values[model.tensors[n].source] for n in model.inputs})
    values = simulate(model, q, keep_all=True)
    out = {}
    for name, t in model.tensors.items():
        if t.source in float_values:
            out[name] = sqnr_db(float_values[t.source], t.fmt.dequantize(values[name]))
    return out


def layer_table(model: FixedPointModel, float_values: "dict[str, np.ndarray] | None", reuse_factor: int = 1) -> list[dict]:
    """One row per compute layer: formats in/weight/accumulator/out, SQNR of its output, resources."""
    sq = tensor_sqnr(model, float_values) if float_values is not None else {}
    rows = {r["layer"]: r for r in layer_resources(model, reuse_factor)}
    # the requant that follows a compute layer (through relu/clip on the accumulator) gives its output format
    result_of: dict[str, str] = {}
    feeds = {l.inputs[0]: l for l in model.layers if len(l.inputs) == 1}
    for layer in model.layers:
        if layer.name not in rows:
            continue
        t = layer.output
        while t in feeds and feeds[t].op in ("relu", "clip", "requant"):
            op, t = feeds[t].op, feeds[t].output
            if op == "requant":
                break
        result_of[layer.name] = t
    table = []
    for layer in model.layers:
        if layer.name not in rows:
            continue
        res = result_of[layer.name]
        row = {"layer": layer.name, "op": layer.op,
               "input": " + ".join(str(model.tensors[i].fmt) for i in layer.inputs),
               "weight": rows[layer.name].get("weight_format", ""),
               "output": model.tensors[res].fmt.hls(), "sqnr_db": round(sq[res], 2) if res in sq else None,
               **{k: v for k, v in rows[layer.name].items() if k not in ("layer", "op", "weight_format")}}
        table.append(row)
    return table


def format_table(table: list[dict]) -> str:
    cols = ("layer", "op", "input", "weight", "accumulator_bits", "output", "sqnr_db", "macs", "multipliers",
            "weight_bits", "bram18")
    heads = ("layer", "op", "input", "weight", "acc", "output", "SQNR dB", "MACs", "mults", "weight bits", "BRAM18")
    cells = [heads] + [tuple("-" if r.get(c) is None else str(r.get(c, "")) for c in cols) for r in table]
    widths = [max(len(row[i]) for row in cells) for i in range(len(cols))]
    lines = ["  ".join(v.ljust(w) for v, w in zip(row, widths)) for row in cells]
    total = {k: sum(r[k] for r in table) for k in ("macs", "multipliers", "weight_bits", "bram18")}
    lines.append(f"total: MACs {total['macs']}, multipliers {total['multipliers']}, weight bits {total['weight_bits']}, "
                 f"BRAM18 {total['bram18']}")
    return "\n".join(lines)


def hls4ml_config(model: FixedPointModel, reuse_factor: int = 1) -> str:
    """hls4ml ``granularity='name'`` precision config (Model + LayerName) with our formats."""
    layers: dict[str, dict] = {}
    producer = {l.output: l for l in model.layers}
    for layer in model.layers:
        out = model.tensors[layer.output]
        key = layer.source or layer.name
        entry = layers.setdefault(key, {"Precision": {}, "ReuseFactor": reuse_factor})
        prec = entry["Precision"]
        if layer.op in _WEIGHTED:
            prec["weight"] = FixedFormat(**layer.attrs["weight_format"]).hls()
            prec["bias"] = out.fmt.hls()
            prec["accum"] = out.fmt.hls()
        elif layer.op in _COMPUTE:
            prec["accum"] = out.fmt.hls()
        if layer.op == "requant":
            # quantization and overflow modes in the type, as ap_fixed<W,I,Q,O> (hls4ml passes it through)
            q = {"trunc": "AP_TRN", "round_half_up": "AP_RND", "round_half_even": "AP_RND_CONV"}[layer.attrs["rounding"]]
            ov = {"sat": "AP_SAT", "wrap": "AP_WRAP"}[layer.attrs["saturation"]]
            prec["result"] = f"{out.fmt.hls()[:-1]},{q},{ov}>"
            # a relu/clip applied on the accumulator: in hls4ml it is its own layer, and rounding
            # commutes with it, so it gets the same result format
            act = producer.get(layer.inputs[0])
            while act is not None and act.op in ("relu", "clip"):
                layers[act.source or act.name]["Precision"]["result"] = prec["result"]
                act = producer.get(act.inputs[0])
        elif layer.op not in _COMPUTE:
            prec["result"] = out.fmt.hls()
    for name in model.inputs:
        layers[name] = {"Precision": {"result": model.tensors[name].fmt.hls()}}
    bits = model.metadata.get("bits", 16)
    doc = {"Model": {"Precision": f"ap_fixed<{bits},{max(bits // 2, 1)}>", "ReuseFactor": reuse_factor,
                     "Strategy": "Latency"},
           "LayerName": layers}
    return yaml.safe_dump(doc, sort_keys=False)
