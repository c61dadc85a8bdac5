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
import itertools
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
# unpack's bounds on what a header may claim (docs/container.md, "Costs and limits")
MAX_RATIO = 128  # model bytes per container byte; pack pads the data section to stay within it
MAX_MODEL_BYTES = 2 ** 31  # a single-file ONNX model (protobuf limit)
MAX_HEADER_BYTES = 4 << 20  # inflated header JSON (~300 bytes per tensor: ~14,000 tensors)
MAX_CONTAINER_BYTES = 3 << 30  # a container of the largest model, dense, is ~2 GiB
INFLATE_IN, INFLATE_OUT = 1 << 16, 1 << 24  # zlib input and output pieces
_DTYPE_NAMES = {d.str: d for d in DTYPES.values()}
_FORMS = {("codes", "dense", "u"), ("codes", "sparse", "u"), ("float", "sparse", "f")}


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
    if len(model_bytes) > MAX_MODEL_BYTES:
        raise UserError(f"model of {len(model_bytes):,} bytes: pack takes single-file models under 2 GiB")
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
    short = -(-len(model_bytes) // MAX_RATIO) - (PREFIX.size + offset + DIGEST)
    if short > 0:  # compresses beyond what unpack accepts (an all-zero model): zeros, never read
        header["padding"] = put(bytes(short))
        header["data_length"] = offset
    # ~300 bytes of JSON per tensor: zlib halves it, which matters on a 40 KB container
    text = json.dumps(header, sort_keys=True, separators=(",", ":")).encode("utf-8")
    if len(text) > MAX_HEADER_BYTES:
        raise UserError(f"too many coded tensors ({len(plans):,}: a {len(text):,}-byte header, over the "
                        f"{MAX_HEADER_BYTES:,} that unpack reads); pack with fewer initializers over 256 entries")
    head = zlib.compress(text, 9)
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
#
# Nothing in a container is trusted before it is checked against something smaller: the header
# against the file size (MAX_HEADER_BYTES, MAX_RATIO), every blob reference against the data
# section (and no two overlap), every tensor against the model size, every stream against the
# bytes of its own blob (huffman.check). Only then is the one big buffer, the model, allocated;
# the zlib streams are inflated into it piece by piece with a cap, so a bomb stops at the size
# its header claims. Peak memory is the model plus the largest tensor's decode scratch.


def unpack_bytes(blob: bytes, label: str = "container") -> "bytes | bytearray":
    """The model bytes stored in a container; ``UserError`` for anything that is not a valid one."""
    if len(blob) < PREFIX.size or blob[:8] != MAGIC:
        raise UserError(f"{label}: not an onnxslim container (bad magic; expected a file written by 'onnxslim pack')")
    _, version, head_len = PREFIX.unpack_from(blob)
    if version != VERSION:
        raise UserError(f"{label}: container version {version} is not supported (this onnxslim-cnn reads version {VERSION})")
    if len(blob) < PREFIX.size + head_len:
        raise UserError(f"{label}: truncated container ({len(blob)} bytes, header alone needs {PREFIX.size + head_len})")
    try:
        header = _read_header(blob[PREFIX.size:PREFIX.size + head_len])
        data_length = _int(header.get("data_length"), "data_length")
        header_error = ""
    except (ValueError, zlib.error) as exc:
        header, data_length, header_error = None, None, str(exc)
    if header is not None:
        expected = PREFIX.size + head_len + data_length + DIGEST
        if len(blob) < expected:
            raise UserError(f"{label}: truncated container ({len(blob)} bytes, expected {expected})")
        if len(blob) > expected:
            raise UserError(f"{label}: corrupt container ({len(blob) - expected} unexpected trailing bytes)")
    if hashlib.sha256(memoryview(blob)[:-DIGEST]).digest() != blob[-DIGEST:]:
        raise UserError(f"{label}: corrupt container (checksum mismatch)")
    if header is None:
        raise UserError(f"{label}: corrupt container (unreadable header: {header_error})")
    data = memoryview(blob)[PREFIX.size + head_len:PREFIX.size + head_len + data_length]
    try:
        layout = _layout(header, data, len(blob))
        model = _restore(layout, data)
    except UserError:
        raise
    except (ValueError, KeyError, TypeError, IndexError, OverflowError, zlib.error) as exc:
        # a checksummed but inconsistent file: crafted, or written by a broken packer
        raise UserError(f"{label}: corrupt container ({exc})") from None
    except MemoryError:
        raise UserError(f"{label}: not enough memory to restore the {header.get('model_bytes'):,}-byte model") from None
    except Exception as exc:  # noqa: BLE001 - whatever else a forged file provokes is still bad input
        raise UserError(f"{label}: corrupt container ({type(exc).__name__}: {exc})") from None
    if hashlib.sha256(model).hexdigest() != header.get("model_sha256"):
        raise UserError(f"{label}: corrupt container (restored model does not match its checksum)")
    return model


def _read_header(head: bytes) -> dict:
    """The header JSON, inflated with a cap of MAX_HEADER_BYTES."""
    d = zlib.decompressobj()
    text = d.decompress(head, MAX_HEADER_BYTES + 1)
    if len(text) > MAX_HEADER_BYTES:
        raise ValueError(f"header inflates beyond {MAX_HEADER_BYTES:,} bytes")
    if not d.eof or d.unused_data:
        raise ValueError("header is not one complete zlib stream")
    try:
        header = json.loads(text.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise ValueError(f"header is not JSON ({type(exc).__name__})") from None
    if not isinstance(header, dict):
        raise ValueError("header is not a JSON object")
    return header


def _int(v, what: str, lo: int = 0, hi: "int | None" = None) -> int:
    if type(v) is not int or v < lo or (hi is not None and v > hi):
        raise ValueError(f"bad {what}: {str(v)[:40]}")
    return v


@dataclass
class _Tensor:
    at: int
    nbytes: int
    dtype: np.dtype  # of the symbols: <u4 for float bit patterns
    size: int
    encoding: str
    background: int = 0
    values: "huffman.Stream | None" = None
    gaps: "huffman.Stream | None" = None
    values_raw: "memoryview | None" = None


@dataclass
class _Layout:
    model_bytes: int
    model_blob: memoryview
    tensors: list


def _layout(header: dict, data: memoryview, file_bytes: int) -> _Layout:
    """Check every size in the header against the file before anything is allocated."""
    if header.get("format") != "onnxslim-cnn container":
        raise ValueError("not an onnxslim-cnn container header")
    model_bytes = _int(header.get("model_bytes"), "model_bytes")
    if model_bytes > MAX_MODEL_BYTES:
        raise ValueError(f"header claims a {model_bytes:,}-byte model, over the 2 GiB of a single-file ONNX model")
    if model_bytes > MAX_RATIO * file_bytes:
        raise ValueError(f"header claims a {model_bytes:,}-byte model from a {file_bytes:,}-byte file, over the "
                         f"{MAX_RATIO}:1 that unpack accepts ('onnxslim pack' pads to stay within it)")
    if not isinstance(header.get("model_sha256"), str):
        raise ValueError("bad model_sha256")
    spans: list[tuple[int, int]] = []  # every blob referenced: none may overlap

    def ref(v, what: str) -> memoryview:
        if not (isinstance(v, list) and len(v) == 2):
            raise ValueError(f"bad {what} reference")
        start = _int(v[0], f"{what} offset", 0, len(data))
        length = _int(v[1], f"{what} length", 0, len(data) - start)
        spans.append((start, length))
        return data[start:start + length]

    def stream(v, what: str, alphabet: int) -> huffman.Stream:
        if not isinstance(v, dict):
            raise ValueError(f"bad {what} stream")
        s = huffman.Stream(ref(v.get("data"), what), _int(v.get("nbits"), f"{what} nbits"),
                           _int(v.get("count"), f"{what} count"), np.frombuffer(ref(v.get("lengths"), what), np.uint8),
                           ref(v.get("sync"), what), _int(v.get("chunk"), f"{what} chunk", 1))
        if len(s.sync) % 4:
            raise ValueError(f"{what}: sync table of {len(s.sync)} bytes")
        s.sync = np.frombuffer(s.sync, dtype="<u4")
        huffman.check(s, alphabet)
        return s

    model_blob = ref(header.get("model"), "model")
    records = header.get("tensors")
    if not isinstance(records, list):
        raise ValueError("bad tensor list")
    tensors = []
    for i, rec in enumerate(records):
        if not isinstance(rec, dict):
            raise ValueError(f"bad tensor record {i}")
        what = f"tensor {str(rec.get('name', i))[:60]}"
        dtype = _DTYPE_NAMES.get(rec.get("dtype"))
        kind, encoding = rec.get("kind"), rec.get("encoding")
        if dtype is None or (kind, encoding, dtype.kind) not in _FORMS:
            raise ValueError(f"{what}: unknown form {rec.get('kind')}/{rec.get('encoding')}/{rec.get('dtype')}")
        size = _int(rec.get("size"), f"{what} size", 0, model_bytes // dtype.itemsize)
        at = _int(rec.get("at"), f"{what} offset", 0, model_bytes - size * dtype.itemsize)
        sym = np.dtype("<u4") if kind == "float" else dtype
        code_alphabet = 1 << (8 * dtype.itemsize)
        t = _Tensor(at, size * dtype.itemsize, sym, size, encoding)
        if encoding == "dense":
            t.values = stream(rec.get("values"), what, code_alphabet)
            if t.values.count != size:
                raise ValueError(f"{what}: dense stream of {t.values.count} symbols for {size} entries")
        else:
            bits = _int(rec.get("index_bits"), f"{what} index_bits", 1, MAX_INDEX_BITS)
            t.background = _int(rec.get("background"), f"{what} background", 0, (1 << (8 * sym.itemsize)) - 1)
            t.gaps = stream(rec.get("gaps"), what, 1 << bits)
            if t.gaps.count > size:
                raise ValueError(f"{what}: {t.gaps.count} entries for {size} weights")
            if kind == "float":
                t.values_raw = ref(rec.get("values_raw"), what)
                if len(t.values_raw) != 4 * t.gaps.count:
                    raise ValueError(f"{what}: index and value streams differ in length")
            else:
                t.values = stream(rec.get("values"), what, code_alphabet)
                if t.values.count != t.gaps.count:
                    raise ValueError(f"{what}: index and value streams differ in length")
        tensors.append(t)
    tensors.sort(key=lambda t: t.at)
    for a, b in itertools.pairwise(tensors):
        if b.at < a.at + a.nbytes:
            raise ValueError("tensors overlap in the model")
    spans.sort()
    for (s0, n0), (s1, _) in itertools.pairwise(spans):
        if s1 < s0 + n0:
            raise ValueError("blobs overlap in the data section")
    return _Layout(model_bytes, model_blob, tensors)


class _Inflater:
    """zlib stream inflated into given buffers, never more than asked for."""

    def __init__(self, blob: memoryview):
        self.d, self.src, self.off, self.tail = zlib.decompressobj(), blob, 0, b""

    def _feed(self) -> bytes:
        if not self.tail and self.off < len(self.src):
            self.tail = bytes(self.src[self.off:self.off + INFLATE_IN])
            self.off += len(self.tail)
        return self.tail

    def read_into(self, view: memoryview) -> None:
        filled = 0
        while filled < len(view):
            if self.d.eof or not self._feed():
                raise ValueError("model blob inflates to less than its recorded size")
            piece = self.d.decompress(self.tail, min(len(view) - filled, INFLATE_OUT))
            self.tail = self.d.unconsumed_tail
            view[filled:filled + len(piece)] = piece
            filled += len(piece)

    def finish(self) -> None:
        while not self.d.eof and self._feed():
            if self.d.decompress(self.tail, 1):
                raise ValueError("model blob inflates beyond its recorded size")
            self.tail = self.d.unconsumed_tail
        if not self.d.eof or self.d.unused_data or self.tail or self.off < len(self.src):
            raise ValueError("model blob is not one complete zlib stream")


def _restore(layout: _Layout, data: memoryview) -> bytearray:
    model = bytearray(layout.model_bytes)  # zeros: a sparse tensor of background 0 is only scattered
    view = memoryview(model)
    inflater = _Inflater(layout.model_blob)
    pos = 0
    for t in layout.tensors:
        inflater.read_into(view[pos:t.at])
        decode_tensor(t, np.frombuffer(model, dtype=t.dtype, count=t.size, offset=t.at))
        pos = t.at + t.nbytes
    inflater.read_into(view[pos:])
    inflater.finish()
    return model


def decode_tensor(t: _Tensor, out: np.ndarray) -> None:
    """Decode one checked tensor into ``out`` (its place in the model buffer, all zeros)."""
    if t.encoding == "dense":
        huffman.decode(t.values, out=out)
        return
    gaps = huffman.decode(t.gaps, np.uint16)  # index_bits <= 12
    if t.values_raw is not None:
        values = np.frombuffer(t.values_raw, dtype="<u4")
    else:
        values = huffman.decode(t.values, t.dtype)
    if t.background:
        out[:] = t.background
    last = -1
    step = 1 << 20  # entries per scatter: bounds the int64 positions
    for i in range(0, gaps.size, step):
        positions = np.cumsum(gaps[i:i + step], dtype=np.int64)
        positions += np.arange(1, positions.size + 1, dtype=np.int64) + last
        if positions[-1] >= out.size:
            raise ValueError("relative index beyond the tensor")
        out[positions] = values[i:i + step]
        last = int(positions[-1])


# --------------------------------------------------------------------------- files


def pack_file(src: "str | Path", dst: "str | Path", index_bits: int = 0) -> tuple[int, int, list[TensorPlan]]:
    """Pack ``src`` into ``dst`` (atomic); returns (input bytes, container bytes, plans)."""
    from .files import write_atomic

    data = _read(src, "input model", MAX_MODEL_BYTES)
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

    model = unpack_bytes(_read(src, "container", MAX_CONTAINER_BYTES), str(src))
    write_atomic(dst, model)
    return len(model)


def _read(path: "str | Path", what: str, limit: int) -> bytes:
    p = Path(path)
    if not p.exists():
        raise UserError(f"{what} not found: {p}")
    if not p.is_file():
        raise UserError(f"{what} is not a file: {p}")
    if p.stat().st_size > limit:
        raise UserError(f"{p}: {what} of {p.stat().st_size:,} bytes is over the {limit:,} this command reads")
    try:
        return p.read_bytes()
    except OSError as exc:
        raise UserError(f"cannot read {p}: {exc.strerror or exc}") from None
