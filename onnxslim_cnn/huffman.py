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
  6000 steps over 6000 chunks), or, for short streams, by pointer doubling over the bit
  positions (log2(chunk) numpy rounds). The offsets cost 32 bits per chunk. Nothing in a stream
  is trusted: ``check`` bounds its sizes by the bytes stored, and every chunk must end where the
  next one starts.
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


def check(stream: Stream, alphabet: "int | None" = None) -> None:
    """The checks ``decode`` makes before it allocates anything, for a container to run on every
    stream first: the sizes must be consistent with each other and with the code bits stored.

    A code is 1..MAX_LEN bits, so ``count <= nbits <= min(8 * len(data), MAX_LEN * count)``: the
    output of a decode is bounded by the stored bytes, and the work by the symbols. ``chunk`` may not exceed ``default_chunk(count)`` (what
    ``encode`` writes), which bounds the decode steps by ``max(1024, 2 sqrt(count))``; a stream
    claiming one chunk of all its symbols would otherwise be decoded one symbol per step.
    ``alphabet``: symbols must be below it (the code length table no longer than that)."""
    count, nbits, chunk = stream.count, stream.nbits, stream.chunk
    if not (0 <= count <= nbits <= min(8 * len(stream.data), MAX_LEN * count)) or nbits >= 2 ** 32:
        raise ValueError(f"stream sizes are inconsistent ({count} symbols, {nbits} bits, {len(stream.data)} bytes)")
    if not 1 <= chunk <= default_chunk(count):
        raise ValueError(f"stream chunk {chunk} outside 1..{default_chunk(count)} for {count} symbols")
    if len(stream.sync) != -(-count // chunk):
        raise ValueError("sync table does not match the stream")
    if count and not 1 <= len(stream.lengths) <= (alphabet if alphabet is not None else 1 << 32):
        raise ValueError(f"code length table of {len(stream.lengths)} symbols (at most {alphabet})")


def decode(stream: Stream, dtype=np.int64, out: "np.ndarray | None" = None, method: str = "auto") -> np.ndarray:
    """Inverse of ``encode``; raises ValueError when the stream does not decode consistently.

    ``out``: a 1-D array of ``stream.count`` entries to decode into (else a new one of ``dtype``).
    Every chunk must end exactly where the next one starts (its sync offset) and the last one at
    ``nbits``, so a corrupt code stalls or drifts a chunk and is caught. Two vectorised schemes,
    the cheaper one by an estimate (both cost no Python step per symbol):

    * *steps*: all chunks side by side, one numpy step per symbol position in a chunk
      (``chunk`` steps over ``count / chunk`` chunks): best for long streams;
    * *doubling*: the code length at every bit position gives each bit its successor; pointer
      doubling (``ceil(log2(chunk + 1))`` rounds over all bit positions) lists every chunk's
      symbol starts: best for short streams, which ``encode``'s minimum chunk of 1024 symbols
      would otherwise decode in 1024 steps of a few chunks each.

    ``method``: "auto", "steps" or "doubling" (tests run both).
    """
    check(stream)
    count, chunk, nbits = stream.count, stream.chunk, stream.nbits
    if out is None:
        out = np.empty(count, dtype=dtype)
    elif out.shape != (count,):
        raise ValueError("output array has the wrong size")
    if count == 0:
        return out
    lengths = np.asarray(stream.lengths, dtype=np.int64)
    if lengths.max() == 0 or lengths.max() > MAX_LEN:
        raise ValueError("bad code length table")
    width = int(lengths.max())
    present = np.flatnonzero(lengths)
    span = np.int64(1) << (width - lengths[present])  # table entries per code
    if int(span.sum()) > (1 << width):
        raise ValueError("code lengths violate the Kraft inequality")
    codes = canonical_codes(lengths).astype(np.int64)
    if out.dtype.kind not in "iu" or int(present[-1]) > np.iinfo(out.dtype).max:
        raise ValueError(f"symbol {int(present[-1])} does not fit {out.dtype}")
    table_sym = np.zeros(1 << width, dtype=out.dtype)
    table_len = np.zeros(1 << width, dtype=np.uint32)  # 0 = no code: that chunk stalls and is caught
    first = codes[present] << (width - lengths[present])
    idx = np.repeat(first, span) + (np.arange(int(span.sum())) - np.repeat(np.cumsum(span) - span, span))
    table_sym[idx] = np.repeat(present, span)
    table_len[idx] = np.repeat(lengths[present], span).astype(np.uint32)

    sync = np.asarray(stream.sync, dtype=np.int64)
    n_chunks = sync.size
    ends = np.append(sync[1:], nbits)
    if sync[0] != 0 or np.any(ends - sync < np.minimum(chunk, count - np.arange(n_chunks) * chunk)):
        raise ValueError("sync table does not match the stream")  # a symbol takes at least one bit
    # big-endian 32-bit word at every byte offset; padding covers a corrupt chunk running on
    pad = (chunk * width) // 8 + 8
    buf = np.zeros(len(stream.data) + pad, dtype=np.uint8)
    buf[:len(stream.data)] = np.frombuffer(stream.data, dtype=np.uint8)
    words = np.ndarray((buf.size - 3,), dtype=">u4", buffer=buf, strides=(1,)).astype(np.uint32)
    del buf
    shift = np.uint32(32 - width)
    last = count - (n_chunks - 1) * chunk  # symbols in the last chunk
    steps = min(chunk, count)
    # measured on the 2-core dev machine: a step ~4.5 us plus ~10 ns per chunk; doubling ~2.5 ns
    # per bit and round (1000 symbols: 0.1 ms against 4.8 ms; 20M symbols: steps 0.23 s)
    rounds = max(1, steps.bit_length())  # 2**rounds > steps: each chunk's end is listed too
    if method not in ("auto", "steps", "doubling"):
        raise ValueError(f"unknown decode method {method!r}")
    if method == "auto":
        method = "steps" if steps * (4.5e-6 + 10e-9 * n_chunks) <= rounds * 2.5e-9 * nbits else "doubling"
    if method == "steps":
        end = _steps(words, table_sym, table_len, sync, chunk, last, steps, shift, out)
    else:
        end = _doubling(words, table_sym, table_len, sync, ends, chunk, last, rounds, shift, out)
    if not np.array_equal(end, ends):
        raise ValueError("invalid code in the stream (a chunk does not end at the next sync offset)")
    return out


def _steps(words, table_sym, table_len, sync, chunk, last, steps, shift, out):
    """All chunks side by side, one step per symbol position in a chunk; returns each chunk's end."""
    n_chunks = sync.size
    pos = sync.astype(np.uint32)
    scratch = np.zeros((n_chunks, steps), dtype=out.dtype)  # chunk-major: row i is chunk i
    for k in range(steps):
        p = pos if k < last else pos[:n_chunks - 1]
        w = (words[p >> np.uint32(3)] << (p & np.uint32(7))) >> shift
        scratch[:p.size, k] = table_sym[w]
        p += table_len[w]
    out[:] = scratch.reshape(-1)[:out.size]
    return pos.astype(np.int64)


def _doubling(words, table_sym, table_len, sync, ends, chunk, last, rounds, shift, out, block_bits=1 << 21):
    """Pointer doubling over the bit positions, a block of chunks at a time; returns each chunk's end."""
    n_chunks = sync.size
    got_end = np.zeros(n_chunks, dtype=np.int64)
    c0 = 0
    while c0 < n_chunks:
        # chunks c0..c1-1: at least one, at most ~block_bits bits
        c1 = max(c0 + 1, int(np.searchsorted(ends, sync[c0] + block_bits, side="right")))
        c1 = min(c1, n_chunks)
        s0, e0 = int(sync[c0]), int(ends[c1 - 1])
        n_bits = e0 - s0
        q = np.arange(s0, e0, dtype=np.uint32)
        w = (words[q >> np.uint32(3)] << (q & np.uint32(7))) >> shift
        del q
        sink = n_bits + 1  # position n_bits is the block end; beyond it, or after a bad code, the sink
        nxt = np.arange(n_bits + 2, dtype=np.int32)
        ln = table_len[w].astype(np.int32)
        nxt[:n_bits] += ln
        nxt[:n_bits][(ln == 0) | (nxt[:n_bits] > n_bits)] = sink
        nxt[n_bits] = sink
        starts = sync[c0:c1] - s0
        # pos[:, i] = start of symbol i of each chunk, i < 2**rounds (> chunk: the end is included)
        pos = np.empty((c1 - c0, 1 << rounds), dtype=np.int32)
        pos[:, 0] = starts
        jump = nxt
        for r in range(rounds):
            half = 1 << r
            pos[:, half:2 * half] = jump[pos[:, :half]]
            if r + 1 < rounds:
                jump = jump[jump]
        del jump, nxt
        m = np.full(c1 - c0, chunk, dtype=np.int64)
        if c1 == n_chunks:
            m[-1] = last
        rows = np.arange(c1 - c0)
        got_end[c0:c1] = pos[rows, m] + s0
        if c1 == n_chunks and last < chunk:
            flat = np.concatenate([pos[:-1, :chunk].reshape(-1), pos[-1, :last]])
        else:
            flat = pos[:, :chunk].reshape(-1)
        np.minimum(flat, n_bits - 1, out=flat)  # the sink (bad code) only where the end check fails
        out[c0 * chunk:c0 * chunk + flat.size] = table_sym[w[flat]]
        c0 = c1
    return got_end
