"""Fixed-point IR: a dataflow graph of integer layers whose every tensor has an ap_fixed-style format.

A value ``v`` of format ``FixedFormat(signed, width, integer)`` is stored as the integer
``q = v * 2**frac`` (``frac = width - integer``), with ``q`` in ``[-2**(width-1), 2**(width-1))``
when signed and ``[0, 2**width)`` when not: the meaning of ``ap_fixed<W,I>`` / ``ap_ufixed<W,I>``.

Layers (``Layer.op``; attributes in ``Layer.attrs``, integer arrays in ``Layer.weights``):

* ``conv2d``  in -> accumulator. attrs ``kernel [kh,kw]``, ``stride [sh,sw]``, ``pads [t,l,b,r]``,
  ``groups``; weights ``weight (O, C/groups, kh, kw)`` and ``bias (O,)`` (bias already at the
  accumulator's fraction). Output format: ``accumulator_format``, never overflows.
* ``dense``   in (n,) -> accumulator (m,). weights ``weight (m, n)``, ``bias (m,)``.
* ``add``     two inputs, aligned to the finer fraction by exact left shifts; wide enough for the sum.
* ``relu``, ``clip`` (attrs ``lo``, ``hi``: integers in the input's format; relu6 is a clip):
  format unchanged.
* ``maxpool`` attrs ``kernel``, ``stride``, ``pads``; padding never wins (format minimum).
* ``avgpool`` / ``global_avgpool``: the window *sum* (format widened by ceil(log2(count)) bits);
  the division by ``attrs['count']`` is the following ``requant``'s multiplier.
* ``concat``  along channels; inputs aligned exactly to a common format.
* ``flatten`` (C,H,W) -> (C*H*W,), C order; no data change.
* ``requant`` ``y = saturate(round(x * multiplier / 2**shift))`` with ``rounding`` one of
  ``trunc`` (floor, AP_TRN), ``round_half_up`` (AP_RND), ``round_half_even`` (AP_RND_CONV) and
  ``saturation`` ``sat`` (clamp, AP_SAT) or ``wrap`` (keep the low bits, AP_WRAP). A negative
  shift is an exact multiplication by ``2**-shift``.

Shapes exclude the batch axis. Serialised as ``model.json`` (everything but weights) plus
``weights.npz`` (one integer array per ``layer/weight``); ``load`` reads back an equal model.
"""

from __future__ import annotations

import io
import json
import math
import zipfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

IR_VERSION = 1
OPS = ("conv2d", "dense", "add", "relu", "clip", "maxpool", "avgpool", "global_avgpool", "concat",
       "flatten", "requant")
ROUNDING = ("trunc", "round_half_up", "round_half_even")
SATURATION = ("sat", "wrap")
# int64 arithmetic in the simulator and the emitted C++: every accumulator must fit.
MAX_ACCUMULATOR_BITS = 62


@dataclass(frozen=True)
class FixedFormat:
    signed: bool
    width: int
    integer: int

    def __post_init__(self):
        # ap_fixed allows up to 1024 bits; the 62-bit limit of int64 arithmetic is checked where
        # accumulators are made, with a message naming the layer
        if not 1 <= self.width <= 1024:
            raise ValueError(f"fixed-point width {self.width} outside 1..1024")

    @property
    def frac(self) -> int:
        return self.width - self.integer

    @property
    def min_int(self) -> int:
        return -(1 << (self.width - 1)) if self.signed else 0

    @property
    def max_int(self) -> int:
        return (1 << (self.width - 1)) - 1 if self.signed else (1 << self.width) - 1

    @property
    def max_abs_int(self) -> int:
        return max(-self.min_int, self.max_int)

    def hls(self) -> str:
        return f"ap_{'' if self.signed else 'u'}fixed<{self.width},{self.integer}>"

    def __str__(self) -> str:
        return f"{'s' if self.signed else 'u'}{self.width}.{self.frac}"

    def quantize(self, x: np.ndarray) -> np.ndarray:
        """Float -> integer code: round half to even, saturate (the simulator's input stage)."""
        q = np.rint(np.asarray(x, dtype=np.float64) * 2.0 ** self.frac)
        return np.clip(q, self.min_int, self.max_int).astype(np.int64)

    def dequantize(self, q: np.ndarray) -> np.ndarray:
        return np.asarray(q, dtype=np.float64) * 2.0 ** -self.frac


def format_for_bound(bound: int, frac: int, signed: bool = True) -> FixedFormat:
    """Narrowest format holding every integer code of magnitude <= ``bound`` at fraction ``frac``."""
    width = max(int(bound).bit_length(), 1) + (1 if signed else 0)
    return FixedFormat(signed, width, width - frac)


def accumulator_format(x: FixedFormat, w: FixedFormat, reduction: int, bias_bound: int = 0) -> FixedFormat:
    """Format of a sum of ``reduction`` products x*w plus a bias: wide enough that it never overflows.

    The bound uses only the operand formats and the reduction length (what hardware must
    guarantee for any input), not the trained weight values.
    """
    bound = reduction * x.max_abs_int * w.max_abs_int + bias_bound
    return format_for_bound(bound, x.frac + w.frac, signed=True)


def to_hls_name(name: str) -> str:
    """A C identifier for a layer or tensor name (ONNX names may hold '.', '/', ':')."""
    out = "".join(c if c.isalnum() else "_" for c in name)
    return out if out and not out[0].isdigit() else "l_" + out


@dataclass(frozen=True)
class Tensor:
    name: str
    shape: tuple[int, ...]
    fmt: FixedFormat
    source: "str | None" = None  # the ONNX tensor this one represents (for SQNR against float)

    @property
    def size(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))


@dataclass
class Layer:
    op: str
    name: str
    inputs: list[str]
    output: str
    attrs: dict[str, Any] = field(default_factory=dict)
    weights: dict[str, np.ndarray] = field(default_factory=dict)
    source: "str | None" = None  # ONNX node name it came from


@dataclass
class FixedPointModel:
    name: str
    inputs: list[str]
    outputs: list[str]
    tensors: dict[str, Tensor]
    layers: list[Layer]
    metadata: dict[str, Any] = field(default_factory=dict)

    def tensor(self, name: str) -> Tensor:
        return self.tensors[name]

    def layer(self, name: str) -> Layer:
        for layer in self.layers:
            if layer.name == name:
                return layer
        raise KeyError(name)

    # ------------------------------------------------------------------ serialisation

    def to_json(self) -> str:
        doc = {
            "ir_version": IR_VERSION,
            "name": self.name,
            "inputs": self.inputs,
            "outputs": self.outputs,
            "tensors": [{"name": t.name, "shape": list(t.shape), "format": asdict(t.fmt), "source": t.source}
                        for t in self.tensors.values()],
            "layers": [{"op": l.op, "name": l.name, "inputs": l.inputs, "output": l.output, "attrs": l.attrs,
                        "weights": {k: {"shape": list(v.shape), "key": f"{l.name}/{k}"}
                                    for k, v in sorted(l.weights.items())},
                        "source": l.source}
                       for l in self.layers],
            "metadata": self.metadata,
        }
        return json.dumps(doc, indent=1, sort_keys=True)

    def weights_npz(self) -> bytes:
        """The weight blob: an .npz (numpy's zip of .npy files) with fixed timestamps, so the
        same model always gives the same bytes (np.savez stamps the current time)."""
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as zf:
            for layer in self.layers:
                for key, arr in sorted(layer.weights.items()):
                    npy = io.BytesIO()
                    np.lib.format.write_array(npy, _narrowest(arr), allow_pickle=False)
                    info = zipfile.ZipInfo(f"{layer.name}/{key}.npy", date_time=(1980, 1, 1, 0, 0, 0))
                    info.compress_type = zipfile.ZIP_DEFLATED
                    zf.writestr(info, npy.getvalue())
        return buf.getvalue()

    @classmethod
    def from_files(cls, model_json: "str | bytes", weights_npz: bytes) -> "FixedPointModel":
        doc = json.loads(model_json)
        if doc.get("ir_version") != IR_VERSION:
            raise ValueError(f"fixed-point IR version {doc.get('ir_version')} (this reader: {IR_VERSION})")
        blobs = np.load(io.BytesIO(weights_npz), allow_pickle=False)
        tensors = {t["name"]: Tensor(t["name"], tuple(t["shape"]), FixedFormat(**t["format"]), t["source"])
                   for t in doc["tensors"]}
        layers = []
        for d in doc["layers"]:
            weights = {k: blobs[v["key"]].astype(np.int64).reshape(v["shape"]) for k, v in d["weights"].items()}
            layers.append(Layer(d["op"], d["name"], list(d["inputs"]), d["output"], d["attrs"], weights, d["source"]))
        return cls(doc["name"], list(doc["inputs"]), list(doc["outputs"]), tensors, layers, doc["metadata"])


def save(model: FixedPointModel, folder: "str | Path") -> None:
    from ..files import write_atomic

    write_atomic(Path(folder) / "model.json", model.to_json().encode("utf-8"))
    write_atomic(Path(folder) / "weights.npz", model.weights_npz())


def load(folder: "str | Path") -> FixedPointModel:
    folder = Path(folder)
    return FixedPointModel.from_files((folder / "model.json").read_text(), (folder / "weights.npz").read_bytes())


def _narrowest(arr: np.ndarray) -> np.ndarray:
    a = np.asarray(arr, dtype=np.int64)
    lo, hi = (int(a.min()), int(a.max())) if a.size else (0, 0)
    for dt in (np.int8, np.int16, np.int32):
        if np.iinfo(dt).min <= lo and hi <= np.iinfo(dt).max:
            return a.astype(dt)
    return a


def ceil_log2(n: int) -> int:
    return max(int(n) - 1, 0).bit_length()


def integer_bits(max_abs: float, signed: bool) -> int:
    """Integer bits I so that max_abs fits (just) in ap_[u]fixed<W,I>; may be negative."""
    if max_abs <= 0:
        return 1 if signed else 0
    return math.ceil(math.log2(max_abs)) + (1 if signed else 0)
