"""Canonical Huffman coding of integer symbol streams, vectorised with numpy.

Our own small implementation because none of the allowed dependencies (numpy, scipy,
scikit-learn, onnx, ...) has an entropy coder, and the stdlib's zlib/lzma code bytes, not our
symbols (5-bit codes, relative indices), and cannot report the per-stream bit counts that the
Deep Compression table needs.

* Code lengths come from the classic Huffman merge (heapq), limited to ``MAX_LEN`` bits by
  lengthening the longest codes below the limit until the Kraft sum fits (a small loss only for
  extremely skewed streams); codes are canonical, so a stream is described by the code length
  of each symbol alone.
* Encoding is vectorised (one bit per array element, packed with ``np.packbits``).
* Decoding uses a ``2**max_len`` lookup table and *sync points*: the encoder records the bit
  offset of every ``chunk``-th symbol, so all chunks are decoded side by side, one numpy step
  per symbol position in a chunk (``chunk`` ~ 2 sqrt(n): AlexNet's 38M-symbol fc6 is about
  6000 steps over 6000 chunks). The offsets cost 32 bits per chunk.
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass

import numpy as np

MAX_LEN = 20  # decode table of 2**20 entries at most; 65536-symbol alphabets need >= 16


@dataclass
class Stream:
    """A Huffman-coded stream: what a container stores to decode ``count`` symbols."""

    data: bytes  # the code bits, MSB first, zero-padded to a byte
    nbits: int
    count: int
    lengths: np.ndarray  # uint8 code length per symbol 0..alphabet-1 (0 = symbol absent)
    sync: np.ndarray  # uint32 bit offset of symbol i * chunk
    chunk: int

    @property
    def stored_bytes(self) -> int:
        return len(self.data) + self.lengths.nbytes + self.sync.nbytes


def code_lengths(counts: np.ndarray, limit: int = MAX_LEN) -> np.ndarray:
    """Huffman code length of each symbol (0 for symbols that never occur), at most ``limit``."""
    counts = np.asarray(counts, dtype=np.int64)
    lengths = np.zeros(counts.size, dtype=np.int64)
    present = np.flatnonzero(counts)
    if present.size == 0:
        return lengths.astype(np.uint8)
    if present.size == 1:
        lengths[present[0]] = 1
        return lengths.astype(np.uint8)
    if present.size > 2 ** limit:
        raise ValueError(f"{present.size} symbols cannot have codes of at most {limit} bits")
    # merge: heap items (count, tie-break id, node); leaves are symbol ids, parents recorded
    parent = np.full(2 * present.size - 1, -1, dtype=np.int64)
    heap = [(int(counts[s]), i, i) for i, s in enumerate(present)]
    heapq.heapify(heap)
    nxt = present.size
    while len(heap) > 1:
        c1, _, a = heapq.heappop(heap)
        c2, _, b = heapq.heappop(heap)
        parent[a] = parent[b] = nxt
        heapq.heappush(heap, (c1 + c2, nxt, nxt))
        nxt += 1
    depth = np.zeros(parent.size, dtype=np.int64)
    for node in range(parent.size - 2, -1, -1):  # parents have larger ids: walk top-down
        depth[node] = depth[parent[node]] + 1
    lengths[present] = depth[:present.size]
    if lengths.max() > limit:
        lengths[present] = _limit(lengths[present], counts[present], limit)
    return lengths.astype(np.uint8)


def _limit(lengths: np.ndarray, counts: np.ndarray, limit: int) -> np.ndarray:
    """Clamp to ``limit`` bits, then lengthen the rarest codes until the Kraft sum is <= 1."""
    lengths = np.minimum(lengths, limit)
    kraft = int(np.sum(1 << (limit - lengths)))
    order = np.lexsort((-counts, -lengths))  # longest first, rarest first among equals
    while kraft > (1 << limit):
        for i in order:
            if lengths[i] < limit:
                kraft -= 1 << (limit - lengths[i] - 1)
                lengths[i] += 1
                break
        order = np.lexsort((-counts, -lengths))
    return lengths


def canonical_codes(lengths: np.ndarray) -> np.ndarray:
    """Canonical code of each symbol (by length, then symbol), as uint32."""
    lengths = np.asarray(lengths, dtype=np.int64)
    codes = np.zeros(lengths.size, dtype=np.uint32)
    present = np.flatnonzero(lengths)
    order = present[np.lexsort((present, lengths[present]))]
    code, prev = 0, 0
    for s in order:
        code <<= int(lengths[s]) - prev
        prev = int(lengths[s])
        codes[s] = code
        code += 1
    return codes


def cost_bits(counts: np.ndarray) -> int:
    """Bits of the coded stream (without its tables) for these symbol counts."""
    counts = np.asarray(counts, dtype=np.int64)
    return int(np.sum(counts * code_lengths(counts).astype(np.int64)))


def stored_bits(counts: np.ndarray) -> int:
    """Bits ``encode`` stores for these symbol counts: the code bits, the code length table (one
    byte per symbol up to the largest present) and the sync offsets."""
    counts = np.asarray(counts, dtype=np.int64)
    present = np.flatnonzero(counts)
    n = int(counts.sum())
    table = int(present[-1]) + 1 if present.size else 0
    return cost_bits(counts) + 8 * table + 32 * -(-n // default_chunk(n))


def default_chunk(count: int) -> int:
    return max(1024, 2 * math.isqrt(max(count, 1)))


def encode(symbols: np.ndarray, alphabet: "int | None" = None) -> Stream:
    """Huffman-code a 1-D array of non-negative integers."""
    symbols = np.asarray(symbols).ravel().astype(np.int64)
    alphabet = int(alphabet if alphabet is not None else (symbols.max() + 1 if symbols.size else 0))
    counts = np.bincount(symbols, minlength=alphabet) if symbols.size else np.zeros(alphabet, np.int64)
    lengths = code_lengths(counts)
    codes = canonical_codes(lengths)
    sym_len = lengths.astype(np.int64)[symbols]
    ends = np.cumsum(sym_len)
    nbits = int(ends[-1]) if symbols.size else 0
    chunk = default_chunk(symbols.size)
    starts = ends - sym_len
    if nbits >= 2 ** 32:
        raise ValueError("stream over 2**32 bits")
    sync = starts[::chunk].astype(np.uint32)
    parts = []
    step = 1 << 20  # symbols per encoding slice: bounds the per-bit temporaries
    for i in range(0, symbols.size, step):
        c = codes[symbols[i:i + step]].astype(np.int64)
        ln = sym_len[i:i + step]
        total = int(ln.sum())
        within = np.arange(total, dtype=np.int64) - np.repeat(np.cumsum(ln) - ln, ln)
        parts.append(((np.repeat(c, ln) >> (np.repeat(ln, ln) - 1 - within)) & 1).astype(np.uint8))
    bits = np.concatenate(parts) if parts else np.zeros(0, np.uint8)
    return Stream(np.packbits(bits).tobytes(), nbits, int(symbols.size), lengths, sync, chunk)


def decode(stream: Stream, dtype=np.int64) -> np.ndarray:
    """Inverse of ``encode``; raises ValueError when the stream does not decode consistently."""
    count, chunk = stream.count, stream.chunk
    out = np.zeros(count, dtype=dtype)
    if count == 0:
        return out
    lengths = np.asarray(stream.lengths, dtype=np.int64)
    if lengths.size == 0 or lengths.max() == 0 or lengths.max() > MAX_LEN:
        raise ValueError("bad code length table")
    width = int(lengths.max())
    codes = canonical_codes(lengths).astype(np.int64)
    present = np.flatnonzero(lengths)
    span = np.int64(1) << (width - lengths[present])  # table entries per code
    if int(span.sum()) > (1 << width):
        raise ValueError("code lengths violate the Kraft inequality")
    table_sym = np.zeros(1 << width, dtype=np.int64)
    table_len = np.zeros(1 << width, dtype=np.int64)  # 0 = no code: the stream is corrupt
    first = codes[present] << (width - lengths[present])
    idx = np.repeat(first, span) + (np.arange(int(span.sum())) - np.repeat(np.cumsum(span) - span, span))
    table_sym[idx] = np.repeat(present, span)
    table_len[idx] = np.repeat(lengths[present], span)

    buf = np.frombuffer(bytes(stream.data) + b"\0\0\0\0", dtype=np.uint8).astype(np.uint64)
    pos = np.asarray(stream.sync, dtype=np.int64).copy()
    n_chunks = -(-count // chunk)
    if pos.size != n_chunks or (pos.size and (pos.max() > stream.nbits or len(stream.data) * 8 < stream.nbits)):
        raise ValueError("sync table does not match the stream")
    last = count - (n_chunks - 1) * chunk  # symbols in the last chunk
    base = np.arange(n_chunks, dtype=np.int64) * chunk
    shift = np.uint64(64 - width)
    mask32 = np.uint64(0xFFFFFFFF)
    for k in range(chunk):
        live = n_chunks if k < last else n_chunks - 1
        if live == 0:
            break
        p = pos[:live]
        b = p >> 3
        word = (buf[b] << np.uint64(24)) | (buf[b + 1] << np.uint64(16)) | (buf[b + 2] << np.uint64(8)) | buf[b + 3]
        window = (((word << (p & 7).astype(np.uint64)) & mask32) << np.uint64(32)) >> shift
        w = window.astype(np.int64)
        ln = table_len[w]
        out[base[:live] + k] = table_sym[w]
        pos[:live] = p + ln
        if not ln.all():
            raise ValueError("invalid code in the stream")
    if pos.max() > stream.nbits:
        raise ValueError("stream ends early")
    return out
