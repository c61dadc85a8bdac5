"""Pass ``lowrank``: split KxK convs into two thin convs (Jaderberg et al. 2014, or Tucker-2).

``method=jaderberg`` (default): a (Kh,Kw) conv with C->N channels becomes a (Kh,1) conv with D
filters followed by a (1,Kw) conv with N filters, from the SVD of the kernel reshaped to
(C·Kh) x (Kw·N). ``method=tucker2`` (Kim et al. 2016): 1x1 reduce C->R1, KxK core R1->R2 with the
original stride/pads/dilations, 1x1 expand R2->N; for channel-heavy layers. The formulas, their
derivation from the seed "CNN的压缩和加速" and the factor maths are in ``lowrank_maths``.

The last conv of the replacement is the original node (same name, same output tensor), so the
model's interface and downstream consumers are untouched. A layer is only replaced when it
saves storage, or compute when ``speedup`` is given; every other layer is reported with why.
"""

from __future__ import annotations

import dataclasses
import zlib
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import onnx_graphsurgeon as gs

from onnxslim_cnn.errors import UserError
from onnxslim_cnn.graph import Graph
from onnxslim_cnn.model_io import inferred, skeleton, with_static_inputs
from onnxslim_cnn.options import option
from onnxslim_cnn.context import PassContext
from onnxslim_cnn.pass_infra import GraphPass, Knob, PassResult, register_pass

from . import lowrank_maths as lm
from .factorize import rank_for_energy


@dataclasses.dataclass(frozen=True)
class LowrankOptions:
    method: Literal["jaderberg", "tucker2"] = option(
        "jaderberg", "jaderberg: (Kh,1) conv with D filters then (1,Kw) conv; tucker2: 1x1 reduce, "
                     "KxK core, 1x1 expand")
    rank: "int | None" = option(None, "D (jaderberg) or R1 = R2 (tucker2), capped at full rank", min=1)
    energy: "float | None" = option(None, "smallest rank keeping this share of the squared singular values "
                                          "(per channel mode for tucker2); the default, 0.9, when no "
                                          "rank, energy or speedup is given", min=0.0, max=1.0)
    speedup: "float | None" = option(None, "compute ratio r = T/(T1+T2) to reach per layer; layers are then "
                                           "split when compute falls, even if storage grows", min=1.0)
    speedup_rounding: Literal["floor", "nearest"] = option(
        "nearest", "integer D from the real one: nearest is the seed's rounding (3.79 -> 4, r = 1.89 "
                   "for r = 2 asked); floor always reaches at least r")
    min_energy: float = option(0.0, "leave a layer alone when the rank keeps less than this energy",
                               min=0.0, max=1.0)
    allow_growth: bool = option(False, "split even when neither storage nor compute falls (full-rank checks)")
    data_aware: bool = option(False, "refit the last conv by least squares on calibration activations",
                              calibration_when=bool)
    max_positions: int = option(8192, "calibration output positions sampled per layer (memory bound)", min=16)
    sequential: bool = option(True, "data_aware: fit each layer on the input it gets from the model as "
                                    "rewritten so far, absorbing earlier layers' error (one ORT run per layer)")
    ridge: float = option(1e-3, "data_aware: ridge towards the SVD solution, relative to the mean "
                                "feature energy", min=0.0)
    tucker_refine: int = option(1, "tucker2: HOOI refinement sweeps after the HOSVD", min=0)
    report_error: bool = option(True, "measure each layer's output error on calibration data")
    include: list[str] = option([], "only these conv node names (empty: all)")
    exclude: list[str] = option([], "never these conv node names")

    def __post_init__(self):
        given = [k for k in ("rank", "energy", "speedup") if getattr(self, k) is not None]
        if len(given) > 1:
            raise UserError(f"lowrank: give one of rank, energy, speedup (got {', '.join(given)})")


@dataclass
class Conv2d:
    """One 2-D Conv with its weights and resolved geometry (pads explicit, auto_pad applied)."""

    node: gs.Node
    label: str
    weight: np.ndarray          # [N, C, Kh, Kw]
    bias: "np.ndarray | None"
    strides: tuple[int, int]
    pads: tuple[int, int, int, int]  # top, left, bottom, right
    dilations: tuple[int, int]
    hw: "tuple[int, int] | None"     # input H, W when known

    @property
    def dims(self) -> tuple[int, int, int, int]:
        N, C, Kh, Kw = self.weight.shape
        return C, N, Kh, Kw

    @property
    def out_hw(self) -> "tuple[int, int] | None":
        if self.hw is None:
            return None
        (H, W), (_, _, Kh, Kw) = self.hw, self.weight.shape
        pt, pl, pb, pr = self.pads
        return ((H + pt + pb - (Kh - 1) * self.dilations[0] - 1) // self.strides[0] + 1,
                (W + pl + pr - (Kw - 1) * self.dilations[1] - 1) // self.strides[1] + 1)


@register_pass
class LowrankPass(GraphPass):
    name = "lowrank"
    summary = ("Low-rank conv splitting: a KxK conv becomes a Kx1 conv with D filters then a 1xK conv "
               "(Jaderberg, SVD of the (C·Kh)x(Kw·N) kernel matrix), or 1x1 reduce -> KxK core -> 1x1 "
               "expand (Tucker-2); D by rank, energy or target compute speedup; only where storage "
               "(or, with speedup, compute) falls; optional least-squares refit on calibration data.")
    Options = LowrankOptions
    modifies = frozenset({"graph"})
    lossy = True
    budget_knob = Knob(option="energy", ladder=(0.8, 0.9, 0.95, 0.98, 0.99), recovery={"data_aware": True},
                       fixed_by=("rank", "speedup"), must_be_faster=True)

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        o = self.options
        result = PassResult()
        convs = [n for n in graph.nodes if n.op == "Conv" and n.domain in ("", "ai.onnx", None)]
        hw = _input_sizes(graph, ctx, convs)
        plans = []
        for node in convs:
            label = node.name or node.outputs[0].name
            if o.include and label not in o.include:
                continue
            if label in o.exclude:
                result.skip(label, "excluded by option")
                continue
            conv = _conv2d(node, label, hw)
            if isinstance(conv, str):
                result.skip(label, conv)
                continue
            plan = _plan(conv, o, ctx.seed)
            if isinstance(plan, str):
                result.skip(label, plan)
            else:
                plans.append(plan)
        acts = _activations(graph, ctx, plans, result) if plans and (o.data_aware or o.report_error) else {}
        shared: dict[tuple, list] = {}
        for i, plan in enumerate(plans):
            x_name = plan["conv"].node.inputs[0].name
            current = None
            if o.data_aware and o.sequential and i > 0 and x_name in acts:
                current = _current_input(graph, ctx, x_name, len(acts[x_name]))
            _measure_and_refit(plan, acts.get(x_name), o, ctx.seed, current)
            _rewrite(graph, plan, shared)
            _record(result, plan)
        if plans:
            graph.remove_unused()
        return result


# --------------------------------------------------------------------------- geometry


def _conv2d(node: gs.Node, label: str, hw: dict) -> "Conv2d | str":
    """The conv's weights and resolved geometry, or why it cannot be split."""
    w = node.inputs[1] if len(node.inputs) > 1 else None
    if isinstance(node.inputs[0], gs.Constant):
        return "input is a constant (slim folds it)"
    if not isinstance(w, gs.Constant):
        return "weight is not a constant"
    weight = np.asarray(w.values)
    if weight.ndim != 4:
        return f"not a 2-D conv (weight rank {weight.ndim})"
    if weight.dtype.kind != "f":
        return f"weight dtype {weight.dtype} is not floating point"
    group = int(node.attrs.get("group", 1))
    if group != 1:
        return f"groups={group}: only groups=1 convs are split"
    b = node.inputs[2] if len(node.inputs) > 2 else None
    if b is not None and not isinstance(b, gs.Constant):
        return "bias is not a constant"
    N, C, Kh, Kw = weight.shape
    if Kh == 1 and Kw == 1:
        return "1x1 conv: a channel matrix, nothing to split spatially (the svd pass handles it)"
    strides = tuple(int(v) for v in node.attrs.get("strides", [1, 1]))
    dilations = tuple(int(v) for v in node.attrs.get("dilations", [1, 1]))
    size = hw.get(node.inputs[0].name)
    auto_pad = node.attrs.get("auto_pad", "NOTSET")
    auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else str(auto_pad)
    if auto_pad in ("NOTSET", ""):
        pads = tuple(int(v) for v in node.attrs.get("pads", [0, 0, 0, 0]))
    elif auto_pad == "VALID":
        pads = (0, 0, 0, 0)
    elif size is None:
        return f"auto_pad={auto_pad} with unknown input size: pads cannot be made explicit"
    else:
        pads = same_pads(auto_pad, size, (Kh, Kw), strides, dilations)
    bias = np.asarray(b.values) if b is not None else None
    return Conv2d(node, label, weight, bias, strides, pads, dilations, size)


def same_pads(auto_pad: str, size: tuple[int, int], kernel: tuple[int, int], strides: tuple[int, int],
              dilations: tuple[int, int]) -> tuple[int, int, int, int]:
    """Explicit (top, left, bottom, right) pads of SAME_UPPER / SAME_LOWER (ONNX Conv spec):
    output = ceil(in / stride); the odd pixel goes to the end (UPPER) or the beginning (LOWER)."""
    begin, end = [], []
    for n, k, s, d in zip(size, kernel, strides, dilations):
        total = max(0, (-(-n // s) - 1) * s + (k - 1) * d + 1 - n)
        small, big = total // 2, total - total // 2
        begin.append(small if auto_pad == "SAME_UPPER" else big)
        end.append(big if auto_pad == "SAME_UPPER" else small)
    return begin[0], begin[1], end[0], end[1]


def _input_sizes(graph: Graph, ctx: PassContext, convs: list) -> dict[str, tuple[int, int]]:
    """Spatial size of each conv input: from the graph's shapes, else from shape inference with
    the calibration inputs' concrete shapes (symbolic spatial dims)."""
    out, missing = {}, []
    for node in convs:
        x = node.inputs[0]
        shape = x.shape
        if shape is not None and len(shape) == 4 and all(isinstance(d, (int, np.integer)) and d > 0
                                                         for d in shape[2:]):
            out[x.name] = (int(shape[2]), int(shape[3]))
        else:
            missing.append(x.name)
    if missing and graph.source is not None:
        try:
            static = inferred(with_static_inputs(skeleton(graph.source), ctx.calibration.cost_shapes()))
        except Exception:  # no usable calibration shapes: those layers are judged without sizes
            return out
        for vi in list(static.graph.value_info) + list(static.graph.input):
            dims = vi.type.tensor_type.shape.dim
            if vi.name in missing and len(dims) == 4 and all(d.HasField("dim_value") for d in dims[2:]):
                out[vi.name] = (dims[2].dim_value, dims[3].dim_value)
    return out


# --------------------------------------------------------------------------- planning


def _plan(conv: Conv2d, o: LowrankOptions, seed: int) -> "dict | str":
    """Choose the rank, check the storage/compute condition and compute the factors."""
    C, N, Kh, Kw = conv.dims
    params0 = lm.conv_params(C, N, Kh, Kw)
    out_hw = conv.out_hw
    macs0 = lm.conv_macs(C, N, Kh, Kw, *out_hw) if out_hw else None
    energy = o.energy if o.energy is not None else 0.9
    plan: dict[str, Any] = {"conv": conv, "params0": params0, "macs0": macs0}
    if o.method == "jaderberg":
        if Kh == 1 or Kw == 1:
            return f"kernel {Kh}x{Kw} is already one-dimensional"
        U, s, Vt, total = lm.jaderberg_svd(conv.weight, seed)
        full = len(s)
        if o.rank is not None:
            D, how = min(o.rank, full), f"rank {o.rank}"
        elif o.speedup is not None:
            if out_hw is None:
                return "speedup needs the input size, unknown here"
            W, Wo = conv.hw[1], out_hw[1]
            real = lm.rank_for_speedup(C, N, Kh, Kw, W, Wo, o.speedup)
            D = min(lm.integer_rank_for_speedup(C, N, Kh, Kw, W, Wo, o.speedup, o.speedup_rounding), full)
            how = f"speedup {o.speedup:g}: D = {real:.3f} -> {D} ({o.speedup_rounding})"
            if D < 1:
                return f"speedup {o.speedup:g} needs D = {real:.3f} < 1 filter"
        else:
            D, how = rank_for_energy(s, total, energy), f"energy {energy:g}"
        p1, p2 = lm.split_params(C, N, Kh, Kw, D)
        parts = [p1, p2]
        macs = list(lm.split_macs(C, N, Kh, Kw, D, out_hw[0], conv.hw[1], out_hw[1])) if out_hw else None
        kept = float(np.sum(s[:D] ** 2) / total) if total > 0 else 1.0
        plan.update(method="jaderberg", D=D, how=how, U=U, s=s, Vt=Vt)
        bound = (f"needs D <= {lm.compute_max_rank(C, N, Kh, Kw, conv.hw[1], out_hw[1])}" if out_hw else "")
        storage_bound = f"needs D <= {lm.storage_max_rank(C, N, Kh, Kw)}"
    else:
        s_in, s_out, total = lm.mode_spectra(conv.weight, seed)
        if o.rank is not None:
            R1, R2, how = min(o.rank, C), min(o.rank, N), f"rank {o.rank}"
        elif o.speedup is not None:
            if out_hw is None:
                return "speedup needs the input size, unknown here"
            ranks = lm.tucker2_ranks_for_speedup(C, N, Kh, Kw, *conv.hw, *out_hw, o.speedup)
            if ranks is None:
                return f"speedup {o.speedup:g} is out of reach even at R1 = R2 = 1"
            (R1, R2), how = ranks, f"speedup {o.speedup:g}"
        else:
            R1, R2 = rank_for_energy(s_in, total, energy), rank_for_energy(s_out, total, energy)
            how = f"energy {energy:g} per mode"
        U_in, G, U_out = lm.tucker2_factors(conv.weight, R1, R2, o.tucker_refine, seed)
        parts = list(lm.tucker2_params(C, N, Kh, Kw, R1, R2))
        macs = list(lm.tucker2_macs(C, N, Kh, Kw, R1, R2, *conv.hw, *out_hw)) if out_hw else None
        kept = float(np.sum(G * G) / total) if total > 0 else 1.0
        plan.update(method="tucker2", R1=R1, R2=R2, how=how, U_in=U_in, G=G, U_out=U_out)
        bound = storage_bound = ""
    plan.update(parts=parts, macs=macs, kept_energy=kept)
    rank_text = f"D={plan['D']}" if o.method == "jaderberg" else f"R1={plan['R1']}, R2={plan['R2']}"
    if not o.allow_growth:
        if o.speedup is not None and macs is not None and sum(macs) >= macs0:
            return (f"{rank_text} ({how}) would not reduce compute: {sum(macs)} >= {macs0} MACs"
                    f"{'; ' + bound if bound else ''}")
        if o.speedup is None and sum(parts) >= params0:
            return (f"{rank_text} ({how}) would not save storage: {sum(parts)} >= {params0} weights"
                    f"{'; ' + storage_bound if storage_bound else ''}")
    if kept < o.min_energy:
        return f"{rank_text} ({how}) keeps energy {kept:.3f} < min_energy {o.min_energy:g}"
    return plan


def _activations(graph: Graph, ctx: PassContext, plans: list, result: PassResult) -> dict:
    """Inputs of every planned conv on the calibration data, in one ORT run (shared cache)."""
    names = sorted({p["conv"].node.inputs[0].name for p in plans})
    try:
        return ctx.activations(graph.source, names)
    except Exception as exc:
        why = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        result.skip("calibration", f"no activations ({why}): output error not measured, no data-aware refit")
        return {}


def _current_input(graph: Graph, ctx: PassContext, name: str, samples: int) -> "np.ndarray | None":
    """Tensor ``name`` in the model as rewritten so far, on the first ``samples`` calibration
    samples (those the original activations came from, ``ctx.activation_data``)."""
    from onnxslim_cnn.analysis.activations import capture

    calib = ctx.calibration
    data = calib if samples >= calib.samples else calib.subset(np.arange(samples))
    try:
        return capture(graph.to_model(), [name], data)[name]
    except Exception:  # the original input still gives a valid (plain data-aware) fit
        return None


# --------------------------------------------------------------------------- data and rewrite


def _measure_and_refit(plan: dict, X: "np.ndarray | None", o: LowrankOptions, seed: int,
                       X_now: "np.ndarray | None" = None) -> None:
    """Last-layer factors (plain SVD/HOSVD), then on calibration patches: the output error and,
    with data_aware, the least-squares refit of the last conv. ``X`` is the conv's input in the
    original model, ``X_now`` (sequential) the same tensor in the model rewritten so far."""
    conv = plan["conv"]
    C, N, Kh, Kw = conv.dims
    if plan["method"] == "jaderberg":
        V, H = lm.jaderberg_kernels(plan["U"], plan["s"], plan["Vt"], plan["D"], conv.weight.shape)
        plan["first"], plan["last"], plan["last_bias"] = V, H, conv.bias
    else:
        plan["first"] = plan["U_in"].T[:, :, None, None]
        plan["last"], plan["last_bias"] = plan["U_out"][:, :, None, None], conv.bias
    plan["data"] = None
    if X is None or X.ndim != 4 or X.shape[1] != C:
        return
    rng_seed = [seed, zlib.crc32(conv.label.encode())]
    geometry = ((Kh, Kw), conv.strides, conv.pads, conv.dilations, o.max_positions)
    rng = np.random.default_rng(rng_seed)
    P = lm.sample_patches(X, *geometry, rng)
    # the same positions in the rewritten model's activation (same seed, same shapes)
    P_now = (lm.sample_patches(X_now, *geometry, np.random.default_rng(rng_seed))
             if X_now is not None and X_now.shape == X.shape else None)
    if plan["method"] == "jaderberg":
        F, B0 = lm.jaderberg_features(plan["first"], Kw), lm.jaderberg_last_matrix(plan["last"])
    else:
        F, B0 = lm.tucker2_features(plan["U_in"], plan["G"]), plan["U_out"].T
    plan["data"] = {"positions": int(len(P)), "output_error": lm.plain_error(P, conv.weight, conv.bias, F, B0)}
    if not o.data_aware:
        return
    fit = lm.refit_last(P, conv.weight, conv.bias, F, B0, o.ridge, rng, P_now)
    plan["data"].update(output_error_plain=fit["error_plain"], output_error=fit["error"], refit_kept=fit["kept"],
                        ridge=fit["ridge"], sequential=P_now is not None)
    if fit["kept"]:
        if plan["method"] == "jaderberg":
            plan["last"] = lm.jaderberg_last_kernel(fit["B"], N, plan["D"], Kw)
        else:
            plan["last"] = fit["B"].T[:, :, None, None]
        plan["last_bias"] = fit["bias"]


def _rewrite(graph: Graph, plan: dict, shared: dict) -> None:
    """Insert the new convs in front of the original node, which becomes the last conv."""
    conv = plan["conv"]
    node, x, dtype = conv.node, conv.node.inputs[0], conv.weight.dtype
    C, N, Kh, Kw = conv.dims
    (sh, sw), (dh, dw), (pt, pl, pb, pr) = conv.strides, conv.dilations, conv.pads
    old_w = node.inputs[1]
    refit = plan["last_bias"] is not conv.bias
    # Convs sharing one weight get the same factor constants (unless refit on their own input).
    key = (id(old_w), plan["method"], plan.get("D"), plan.get("R1"), plan.get("R2"))
    consts = None if refit else shared.get(key)
    if consts is None:
        consts = [graph.add_constant(f"{conv.label}.lowrank.{tag}", np.asarray(a, dtype))
                  for tag, a in zip(("first", "core", "last"),
                                    (plan["first"], plan.get("G"), plan["last"])) if a is not None]
        if not refit:
            shared[key] = consts
    new_nodes = []

    def add(tag: str, inp: gs.Tensor, weight: gs.Constant, attrs: dict) -> gs.Variable:
        out = gs.Variable(graph.unique_name(f"{conv.label}.lowrank_{tag}.out"), dtype=x.dtype)
        n = gs.Node("Conv", graph.unique_name(f"{conv.label}.lowrank_{tag}"), attrs=attrs,
                    inputs=[inp, weight], outputs=[out])
        graph.gs.nodes.append(n)
        new_nodes.append(n.name)
        return out

    if plan["method"] == "jaderberg":
        mid = add("v", x, consts[0], {"kernel_shape": [Kh, 1], "strides": [sh, 1], "pads": [pt, 0, pb, 0],
                                      "dilations": [dh, 1], "group": 1})
        node.attrs = {"kernel_shape": [1, Kw], "strides": [1, sw], "pads": [0, pl, 0, pr],
                      "dilations": [1, dw], "group": 1}
    else:
        one = {"kernel_shape": [1, 1], "strides": [1, 1], "pads": [0, 0, 0, 0], "dilations": [1, 1], "group": 1}
        reduced = add("reduce", x, consts[0], dict(one))
        core_attrs = {k: v for k, v in node.attrs.items() if k != "kernel_shape"}
        mid = add("core", reduced, consts[1], {**core_attrs, "kernel_shape": [Kh, Kw]})
        node.attrs = dict(one)
    node.inputs[0], node.inputs[1] = mid, consts[-1]
    if refit:
        b = graph.add_constant(f"{conv.label}.lowrank.bias", np.asarray(plan["last_bias"], dtype))
        if len(node.inputs) > 2:
            node.inputs[2] = b
        else:
            node.inputs.append(b)
    plan["nodes"] = new_nodes + [node.name or node.outputs[0].name]


def _record(result: PassResult, plan: dict) -> None:
    conv = plan["conv"]
    C, N, Kh, Kw = conv.dims
    bias0 = N if conv.bias is not None else 0
    bias1 = N if plan["last_bias"] is not None else 0
    details: dict[str, Any] = {"method": plan["method"], "C": C, "N": N, "Kh": Kh, "Kw": Kw}
    if plan["method"] == "jaderberg":
        details["D"] = plan["D"]
    else:
        details.update(R1=plan["R1"], R2=plan["R2"])
    params_after = sum(plan["parts"]) + bias1
    details.update(rank_choice=plan["how"], params_before=plan["params0"] + bias0, params_after=params_after,
                   macs_before=plan["macs0"], macs_after=sum(plan["macs"]) if plan["macs"] else None,
                   node_macs=dict(zip(plan["nodes"], plan["macs"])) if plan["macs"] else None,
                   kept_energy=round(plan["kept_energy"], 6), nodes=plan["nodes"])
    if plan["data"] is not None:
        details.update({k: (round(v, 6) if isinstance(v, float) else v) for k, v in plan["data"].items()})
    result.change(conv.label, f"split_{plan['method']}", **details)
    result.count("params_removed", details["params_before"] - params_after)
    if plan["macs"]:
        result.count("macs_removed", plan["macs0"] - sum(plan["macs"]))
