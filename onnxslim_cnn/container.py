"""``onnxslim pack`` / ``unpack``: Deep Compression storage coding of an ONNX model (``.onnxz``).

Weights are stored the way Han et al. store them: sparse tensors as *relative indices* (the gap
to the previous kept entry in ``index_bits`` bits, with a filler entry when a gap is longer) and
shared weights as their codebook indices (the uint8/uint16 codes written by the ``share`` pass),
both Huffman-coded (``huffman.py``); sparse float weights keep their kept values as raw float32.
The rest of the file (graph, codebooks, biases, small tensors) is the original ONNX protobuf
with those weight payloads cut out, zlib-compressed. ``unpack`` splices the payloads back, so the
output is the input file byte for byte (checked against a SHA-256 of the input).

Format (version 1), all integers little-endian, documented in docs/container.md::

    magic "ONNXSLMZ" | u16 version | u32 header length | header (zlib of UTF-8 JSON) | data | sha256
"""

from __future__ import annotations

import hashlib
import json
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx

from . import huffman
from .errors import UserError

MAGIC = b"ONNXSLMZ"
VERSION = 1
PREFIX = struct.Struct("<8sHI")  # magic, version, header length
DIGEST = 32
LAYER_OPS = ("Conv", "Gemm", "MatMul", "ConvTranspose")
PASS_THROUGH = ("Cast", "Gather", "DequantizeLinear", "Reshape", "Transpose")
DTYPES = {onnx.TensorProto.FLOAT: np.dtype("<f4"), onnx.TensorProto.UINT8: np.dtype("u1"),
          onnx.TensorProto.UINT16: np.dtype("<u2")}
MAX_INDEX_BITS = 12


@dataclass
class TensorPlan:
    """One packed tensor: what the report table shows about it."""

    name: str
    layer: str
    kind: str  # "codes" or "float"
    size: int
    kept: int  # entries other than the background (zero / zero code)
    encoding: str  # "dense" or "sparse"
    entries: int  # stored entries (kept + filler entries)
    code_bits: int  # bits of a code before Huffman (32 for floats)
    index_bits: int  # 0 when dense
    value_bits: int  # coded bits of the values
    gap_bits: int  # coded bits of the relative indices
    stored_bytes: int
    codebook_bytes: int  # float codebook left in the protobuf, counted with its layer
    record: dict = field(default_factory=dict)


# --------------------------------------------------------------------------- packing


def pack_bytes(model_bytes: bytes, index_bits: int = 0, min_size: int = 256) -> tuple[bytes, list[TensorPlan]]:
    """Container bytes for a serialized model, and the per-tensor plans (for the report).

    ``index_bits`` 0 picks, per tensor, the relative-index width (1..12) that codes smallest,
    or dense coding when that is smaller still.
    """
    if model_bytes[:len(MAGIC)] == MAGIC:
        raise UserError("is an onnxslim container (written by 'onnxslim pack'); run 'onnxslim unpack' first")
    try:
        model = onnx.load_from_string(model_bytes)
    except Exception as exc:
        raise UserError(f"not a readable ONNX model ({str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__})") from None
    if not model.graph.node and not model.graph.output:  # protobuf parses many byte strings as an empty model
        raise UserError("not an ONNX model (no graph found; truncated or wrong file type?)")
    if any(t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer):
        raise UserError("pack needs a self-contained .onnx file (this model keeps its weights in external data)")
    context = _tensor_context(model)
    blobs: list[bytes] = []
    offset = 0

    def put(data: bytes) -> list[int]:
        nonlocal offset
        blobs.append(data)
        offset += len(data)
        return [offset - len(data), len(data)]

    plans: list[TensorPlan] = []
    cuts: list[tuple[int, int]] = []  # (position in the file, length) of each payload cut out
    search_from = 0
    for t in model.graph.initializer:
        dtype = DTYPES.get(t.data_type)
        size = int(np.prod(t.dims, dtype=np.int64))
        if dtype is None or size < min_size or len(t.raw_data) != size * dtype.itemsize:
            continue
        layer, background, codebook_bytes = context.get(t.name, (t.name, None, 0))
        kind = "float" if t.data_type == onnx.TensorProto.FLOAT else "codes"
        if kind == "float":
            background = 0  # the bit pattern of +0.0
        raw = bytes(t.raw_data)
        plan = _plan(raw, dtype, kind, background, index_bits, put)
        if plan is None:
            continue
        at = model_bytes.find(raw, search_from)
        if at < 0:  # cannot happen for a protobuf we parsed; keep the tensor in the protobuf then
            continue
        search_from = at + len(raw)
        cuts.append((at, len(raw)))
        plan.name, plan.layer, plan.size, plan.codebook_bytes = t.name, layer, size, codebook_bytes
        plan.record.update(name=t.name, dtype=dtype.str, size=size, at=at)
        plans.append(plan)
    skeleton, pos = [], 0
    for at, n in cuts:
        skeleton.append(model_bytes[pos:at])
        pos = at + n
    skeleton.append(model_bytes[pos:])
    model_blob = put(zlib.compress(b"".join(skeleton), 9))
    header = {"format": "onnxslim-cnn container", "model": model_blob, "model_bytes": len(model_bytes),
              "model_sha256": hashlib.sha256(model_bytes).hexdigest(), "data_length": offset,
              "tensors": [p.record for p in plans]}
    # ~300 bytes of JSON per tensor: zlib halves it, which matters on a 40 KB container
    head = zlib.compress(json.dumps(header, sort_keys=True, separators=(",", ":")).encode("utf-8"), 9)
    body = PREFIX.pack(MAGIC, VERSION, len(head)) + head + b"".join(blobs)
    return body + hashlib.sha256(body).digest(), plans


def _plan(raw: bytes, dtype: np.dtype, kind: str, background, index_bits: int, put) -> "TensorPlan | None":
    """Choose dense or sparse coding of one tensor and store its blobs; None = leave it as is."""
    if kind == "float":
        sym = np.frombuffer(raw, dtype="<u4")  # bit patterns: -0.0 and NaNs survive exactly
        code_bits = 32
    else:
        sym = np.frombuffer(raw, dtype=dtype).astype(np.int64)
        code_bits = max(1, int(sym.max()).bit_length()) if sym.size else 1
    kept_mask = sym != background if background is not None else np.ones(sym.size, bool)
    kept = int(np.count_nonzero(kept_mask))
    positions = np.flatnonzero(kept_mask)
    candidates = []  # (bits, encoding, index bits)
    if kind == "codes":
        candidates.append((huffman.stored_bits(np.bincount(sym)), "dense", 0))
    if background is not None:
        gaps = np.diff(np.concatenate([[-1], positions]))
        widths = [index_bits] if index_bits else range(1, MAX_INDEX_BITS + 1)
        for b in widths:
            gap_sym, fill = _gap_symbols(gaps, b)
            entries = positions.size + int(fill.sum())
            if kind == "float":
                values = entries * 32  # raw float32 values
            else:  # filler entries carry the background code
                counts = np.bincount(sym[positions], minlength=background + 1)
                counts[background] += int(fill.sum())
                values = huffman.stored_bits(counts)
            candidates.append((huffman.stored_bits(np.bincount(gap_sym)) + values, "sparse", b))
    if not candidates:
        return None
    bits, encoding, b = min(candidates, key=lambda c: (c[0], c[2]))
    if kind == "float" and bits >= sym.size * 32:
        return None  # not sparse enough to gain anything: stays in the protobuf
    rec: dict = {"kind": kind, "encoding": encoding}
    if encoding == "dense":
        vs = huffman.encode(sym, int(sym.max()) + 1)
        rec["values"] = _put_stream(vs, put)
        return TensorPlan("", "", kind, sym.size, kept, "dense", sym.size, code_bits, 0, vs.nbits, 0,
                          vs.stored_bytes, 0, rec)
    gap_sym, fill = _gap_symbols(np.diff(np.concatenate([[-1], positions])), b)
    last = np.cumsum(fill + 1) - 1  # entry of each kept value; the others are fillers
    gs_ = huffman.encode(gap_sym, 1 << b)
    rec.update(background=int(background), index_bits=b, gaps=_put_stream(gs_, put))
    if kind == "float":
        values = np.zeros(gap_sym.size, dtype="<u4")
        values[last] = sym[positions]
        rec["values_raw"] = put(values.tobytes())
        value_bits, stored = values.nbytes * 8, gs_.stored_bytes + values.nbytes
    else:
        values = np.full(gap_sym.size, background, dtype=np.int64)
        values[last] = sym[positions]
        vs = huffman.encode(values, max(int(values.max()), background) + 1)
        rec["values"] = _put_stream(vs, put)
        value_bits, stored = vs.nbits, gs_.stored_bytes + vs.stored_bytes
    return TensorPlan("", "", kind, sym.size, kept, "sparse", int(gap_sym.size), code_bits, b, value_bits,
                      gs_.nbits, stored, 0, rec)


def _gap_symbols(gaps: np.ndarray, bits: int) -> tuple[np.ndarray, np.ndarray]:
    """Relative indices in ``bits`` bits: symbol = gap - 1; a gap over 2**bits becomes filler
    entries of gap 2**bits (value = background) first. Returns (symbols, fillers per gap)."""
    span = 1 << bits
    fill = (gaps - 1) // span
    out = np.full(int(gaps.size + fill.sum()), span - 1, dtype=np.int64)
    last = np.cumsum(fill + 1) - 1
    out[last] = gaps - fill * span - 1
    return out, fill


def _put_stream(s: huffman.Stream, put) -> dict:
    return {"data": put(s.data), "nbits": s.nbits, "count": s.count, "chunk": s.chunk,
            "lengths": put(s.lengths.astype(np.uint8).tobytes()), "sync": put(s.sync.astype("<u4").tobytes())}


def _tensor_context(model: onnx.ModelProto) -> dict[str, tuple[str, "int | None", int]]:
    """Initializer -> (layer it feeds, background code or None, codebook bytes).

    The background of a code tensor is the code of 0.0: the codebook entry equal to 0.0 when it
    feeds Cast -> Gather(codebook), or the zero point of a DequantizeLinear."""
    inits = {t.name: t for t in model.graph.initializer}
    users: dict[str, list[onnx.NodeProto]] = {}
    for n in model.graph.node:
        for i in n.input:
            users.setdefault(i, []).append(n)
    out = {}
    for name, t in inits.items():
        if t.data_type not in DTYPES:
            continue
        layer, background, book_bytes, tensor = name, None, 0, name
        for _ in range(4):  # follow the chain codes -> Cast -> Gather -> Conv
            nodes = users.get(tensor, [])
            if len(nodes) != 1:
                break
            n = nodes[0]
            if n.op_type in LAYER_OPS:
                layer = n.name or name
                break
            if n.op_type not in PASS_THROUGH:
                break
            if n.op_type == "Gather" and n.input[1] == tensor and n.input[0] in inits:
                book = onnx.numpy_helper.to_array(inits[n.input[0]])
                zero = np.flatnonzero(book.ravel() == 0)
                background = int(zero[0]) if zero.size and book.ndim == 1 else None
                book_bytes = book.nbytes
            if n.op_type == "DequantizeLinear" and n.input[0] == tensor and len(n.input) > 2 and n.input[2] in inits:
                zp = onnx.numpy_helper.to_array(inits[n.input[2]])
                background = int(zp.ravel()[0]) if zp.size == 1 else None
            tensor = n.output[0]
        out[name] = (layer, background, book_bytes)
    return out


# --------------------------------------------------------------------------- unpacking


def unpack_bytes(blob: bytes, label: str = "container") -> bytes:
    """The model bytes stored in a container; ``UserError`` for anything that is not a valid one."""
    if len(blob) < PREFIX.size or blob[:8] != MAGIC:
        raise UserError(f"{label}: not an onnxslim container (bad magic; expected a file written by 'onnxslim pack')")
    _, version, head_len = PREFIX.unpack_from(blob)
    if version != VERSION:
        raise UserError(f"{label}: container version {version} is not supported (this onnxslim-cnn reads version {VERSION})")
    if len(blob) < PREFIX.size + head_len:
        raise UserError(f"{label}: truncated container ({len(blob)} bytes, header alone needs {PREFIX.size + head_len})")
    try:
        header = json.loads(zlib.decompress(blob[PREFIX.size:PREFIX.size + head_len]).decode("utf-8"))
        data_length = int(header["data_length"])
    except Exception:
        header, data_length = None, None
    if header is not None:
        expected = PREFIX.size + head_len + data_length + DIGEST
        if len(blob) < expected:
            raise UserError(f"{label}: truncated container ({len(blob)} bytes, expected {expected})")
        if len(blob) > expected:
            raise UserError(f"{label}: corrupt container ({len(blob) - expected} unexpected trailing bytes)")
    if hashlib.sha256(blob[:-DIGEST]).digest() != blob[-DIGEST:]:
        raise UserError(f"{label}: corrupt container (checksum mismatch)")
    if header is None:
        raise UserError(f"{label}: corrupt container (unreadable header)")
    data = memoryview(blob)[PREFIX.size + head_len:PREFIX.size + head_len + data_length]
    try:
        model = _restore(header, data)
    except UserError:
        raise
    except Exception as exc:  # a checksummed but inconsistent file: written by a broken packer
        raise UserError(f"{label}: corrupt container ({type(exc).__name__}: {exc})") from None
    if hashlib.sha256(model).hexdigest() != header["model_sha256"]:
        raise UserError(f"{label}: corrupt container (restored model does not match its checksum)")
    return model


def _restore(header: dict, data: memoryview) -> bytes:
    def get(ref) -> bytes:
        start, length = int(ref[0]), int(ref[1])
        if start < 0 or length < 0 or start + length > len(data):
            raise ValueError("blob outside the data section")
        return bytes(data[start:start + length])

    skeleton = zlib.decompress(get(header["model"]))
    parts, pos = [], 0
    for rec in sorted(header["tensors"], key=lambda r: r["at"]):
        at = int(rec["at"]) - sum(len(p) for p in parts[1::2])  # position in the skeleton
        parts.append(skeleton[pos:at])
        parts.append(decode_tensor(rec, get))
        pos = at
    parts.append(skeleton[pos:])
    return b"".join(parts)


def _get_stream(ref: dict, get) -> huffman.Stream:
    return huffman.Stream(get(ref["data"]), int(ref["nbits"]), int(ref["count"]),
                          np.frombuffer(get(ref["lengths"]), dtype=np.uint8),
                          np.frombuffer(get(ref["sync"]), dtype="<u4"), int(ref["chunk"]))


def decode_tensor(rec: dict, get) -> bytes:
    """Raw little-endian payload of one packed tensor."""
    dtype, size = np.dtype(rec["dtype"]), int(rec["size"])
    sym_dtype = np.dtype("<u4") if rec["kind"] == "float" else dtype
    if rec["encoding"] == "dense":
        values = huffman.decode(_get_stream(rec["values"], get), sym_dtype)
        if values.size != size:
            raise ValueError("dense stream has the wrong length")
        return values.astype(sym_dtype).tobytes()
    gaps = huffman.decode(_get_stream(rec["gaps"], get))
    if rec["kind"] == "float":
        values = np.frombuffer(get(rec["values_raw"]), dtype="<u4")
    else:
        values = huffman.decode(_get_stream(rec["values"], get), np.int64)
    if values.size != gaps.size:
        raise ValueError("index and value streams differ in length")
    out = np.full(size, int(rec["background"]), dtype=sym_dtype)
    positions = np.cumsum(gaps + 1) - 1
    if positions.size and positions[-1] >= size:
        raise ValueError("relative index beyond the tensor")
    out[positions] = values.astype(sym_dtype)
    return out.tobytes()


# --------------------------------------------------------------------------- files


def pack_file(src: "str | Path", dst: "str | Path", index_bits: int = 0) -> tuple[int, int, list[TensorPlan]]:
    """Pack ``src`` into ``dst`` (atomic); returns (input bytes, container bytes, plans)."""
    from .files import write_atomic

    data = _read(src, "input model")
    try:
        blob, plans = pack_bytes(data, index_bits=index_bits)
    except UserError as exc:
        raise UserError(f"{src}: {exc}") from None
    if unpack_bytes(blob, str(dst)) != data:  # never write a container that does not round-trip
        raise RuntimeError("packed container does not restore the input")
    write_atomic(dst, blob)
    return len(data), len(blob), plans


def unpack_file(src: "str | Path", dst: "str | Path") -> int:
    from .files import write_atomic

    model = unpack_bytes(_read(src, "container"), str(src))
    write_atomic(dst, model)
    return len(model)


def _read(path: "str | Path", what: str) -> bytes:
    p = Path(path)
    if not p.exists():
        raise UserError(f"{what} not found: {p}")
    if not p.is_file():
        raise UserError(f"{what} is not a file: {p}")
    return p.read_bytes()
