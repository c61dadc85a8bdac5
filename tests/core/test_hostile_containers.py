"""Hostile ``.onnxz`` containers (issue 16, item 2): every one is built here, by code, with a
valid outer checksum, so that only the bounds in ``container.unpack_bytes`` stand between it and
the allocation or the decode loop it asks for.

The three from the issue run as ``onnxslim unpack`` subprocesses, timed and with their peak RSS
from ``os.wait4``: a 1 MB zlib bomb (1 GiB of zeros), a 2.8 KB file whose tensor asks for 11.2 GiB,
an 8 MB stream crafted to decode one symbol per numpy step. Each must exit 2 with one line within
10 s and 500 MB, and write nothing. The smaller forgeries run in-process.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import subprocess
import sys
import time
import zlib

import numpy as np
import onnx
import pytest
from graphs import init, make_model, vi
from onnx import helper as h

from onnxslim_cnn import container, huffman
from onnxslim_cnn.errors import UserError

LIMIT_S, LIMIT_MB = 10.0, 500


def forge(header: dict, data: bytes) -> bytes:
    """A container with this header and data section and a correct outer SHA-256."""
    header = {"format": "onnxslim-cnn container", "model_sha256": "0" * 64, **header, "data_length": len(data)}
    head = zlib.compress(json.dumps(header, sort_keys=True).encode(), 9)
    body = container.PREFIX.pack(container.MAGIC, container.VERSION, len(head)) + head + data
    return body + hashlib.sha256(body).digest()


def zlib_bomb(gib: int = 1) -> bytes:
    """A complete zlib stream of ``gib`` GiB of zeros, ~1 MB: 16 MiB full-flush segments repeat."""
    c = zlib.compressobj(9)
    zeros = bytes(1 << 24)
    c.compress(zeros)
    c.flush(zlib.Z_FULL_FLUSH)
    seg = c.compress(zeros) + c.flush(zlib.Z_FULL_FLUSH)  # identical for every further 16 MiB
    n = gib << 30
    return b"\x78\xda" + seg * (n >> 24) + b"\x03\x00" + struct.pack(">I", ((n % 65521) << 16) | 1)


def stream_ref(data_at: int, nbytes: int, nbits: int, count: int, chunk: int, lengths: bytes, sync: np.ndarray,
               blobs: list) -> dict:
    """A stream record whose code bits are ``nbytes`` at ``data_at``; its tables are appended to ``blobs``."""
    end = sum(len(b) for b in blobs)
    blobs.append(lengths)
    blobs.append(sync.astype("<u4").tobytes())
    return {"data": [data_at, nbytes], "nbits": nbits, "count": count, "chunk": chunk,
            "lengths": [end, len(lengths)], "sync": [end + len(lengths), 4 * sync.size]}


def crafted_8mb(chunked: bool) -> bytes:
    """8 MB of 1-bit codes (two symbols) for a 64M-entry uint8 tensor. ``chunked`` False: one chunk
    of all 64M symbols (what took 160 s); True: the sync table ``encode`` would write, so it
    decodes in full and only the model checksum refuses it."""
    n = 64 << 20
    bits = np.random.default_rng(0).integers(0, 256, n // 8, dtype=np.uint8).tobytes()
    chunk = huffman.default_chunk(n) if chunked else n
    sync = np.arange(0, n, chunk, dtype=np.int64)  # 1 bit per symbol: symbol i starts at bit i
    blobs = [bits]
    rec = {"name": "w", "dtype": "|u1", "size": n, "at": 16, "kind": "codes", "encoding": "dense",
           "values": stream_ref(0, len(bits), n, n, chunk, b"\x01\x01", sync, blobs)}
    skeleton = zlib.compress(bytes(32), 9)
    at = sum(len(b) for b in blobs)
    blobs.append(skeleton)
    return forge({"model": [at, len(skeleton)], "model_bytes": n + 32, "tensors": [rec]}, b"".join(blobs))


def np_full_2k8() -> bytes:
    """~2.8 KB: a sparse tensor of 12e9 uint8 entries, nothing kept (the old np.full of 11.2 GiB)."""
    blobs = [bytes(2600)]  # filler, so the file is the size
    size = 12_000_000_000
    rec = {"name": "w", "dtype": "|u1", "size": size, "at": 0, "kind": "codes", "encoding": "sparse",
           "background": 0, "index_bits": 12,
           "gaps": stream_ref(0, 0, 0, 0, 1024, b"", np.zeros(0), blobs),
           "values": stream_ref(0, 0, 0, 0, 1024, b"", np.zeros(0), blobs)}
    skeleton = zlib.compress(b"", 9)
    at = sum(len(b) for b in blobs)
    blobs.append(skeleton)
    return forge({"model": [at, len(skeleton)], "model_bytes": size, "tensors": [rec]}, b"".join(blobs))


def bomb_container(claim: "int | None") -> bytes:
    """The zlib bomb as the model blob; ``claim`` the header's model_bytes (None: 1 GiB, the truth)."""
    bomb = zlib_bomb()
    if claim is None:
        claim = 1 << 30
    return forge({"model": [0, len(bomb)], "model_bytes": claim, "tensors": []}, bomb)


# A small launcher forks the command and reports its rusage from wait4. Forking the CLI straight
# from pytest would not do: Linux carries the pre-exec high-water mark of the forked copy of the
# (large) test process into the child's ru_maxrss.
LAUNCHER = """
import os, subprocess, sys
with open(sys.argv[1], "wb") as err:
    p = subprocess.Popen(sys.argv[2:], stdout=subprocess.DEVNULL, stderr=err)
    _, status, usage = os.wait4(p.pid, 0)
print(os.waitstatus_to_exitcode(status), usage.ru_maxrss)
"""


def run_unpack(path, out) -> tuple[int, float, float, str]:
    """``onnxslim unpack`` as a subprocess: exit status, seconds, peak RSS in MB, stderr."""
    err_path = str(out) + ".stderr"
    t = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", LAUNCHER, err_path, sys.executable, "-m", "onnxslim_cnn", "unpack",
                           str(path), str(out)], capture_output=True, text=True, check=True)
    seconds = time.perf_counter() - t
    rc, rss_kb = (int(v) for v in done.stdout.split())
    with open(err_path) as f:
        stderr = f.read()
    os.unlink(err_path)
    return rc, seconds, rss_kb / 1024, stderr


@pytest.mark.parametrize("name,build,expect", [
    ("bomb_1mb_true_claim", lambda: bomb_container(None), "over the 128:1"),
    ("bomb_1mb_claims_120x", lambda: None, "inflates beyond its recorded size"),
    ("np_full_2k8", np_full_2k8, "12,000,000,000-byte model"),
    ("crafted_8mb_one_chunk", lambda: crafted_8mb(False), "chunk"),
    ("crafted_8mb_consistent", lambda: crafted_8mb(True), "does not match its checksum"),
])
def test_hostile_container_refused_fast_and_small(tmp_path, name, build, expect):
    if name == "bomb_1mb_claims_120x":  # a claim unpack accepts: the inflate must stop at it
        blob = bomb_container(120 * len(zlib_bomb()))
    else:
        blob = build()
    bad = tmp_path / f"{name}.onnxz"
    bad.write_bytes(blob)
    out = tmp_path / "out.onnx"
    rc, seconds, rss_mb, stderr = run_unpack(bad, out)
    print(f"{name}: {len(blob):,} bytes, exit {rc}, {seconds:.2f} s, peak RSS {rss_mb:.0f} MB: {stderr.strip()}")
    assert rc == 2, stderr
    assert stderr.strip().count("\n") == 0 and expect in stderr and "Traceback" not in stderr
    assert seconds < LIMIT_S and rss_mb < LIMIT_MB
    assert sorted(p.name for p in tmp_path.iterdir()) == [bad.name]  # nothing written, no temp file


# --------------------------------------------------------------------------- in-process forgeries


def _valid_parts():
    """A real container of a small sparse uint8-code model, as (header, data) to tamper with."""
    rng = np.random.default_rng(1)
    codes = rng.integers(1, 16, (64, 64)).astype(np.uint8)
    codes[rng.random(codes.shape) < 0.8] = 0
    book = np.linspace(0, 1, 16).astype(np.float32)
    m = make_model([h.make_node("Cast", ["c"], ["ci"], to=onnx.TensorProto.INT32),
                    h.make_node("Gather", ["book", "ci"], ["w"]),
                    h.make_node("MatMul", ["x", "w"], ["y"], name="fc")],
                   [vi("x", [1, 64])], [vi("y", [1, 64])], [init("c", codes), init("book", book)])
    data = m.SerializeToString()
    blob, plans = container.pack_bytes(data)
    assert plans and plans[0].encoding == "sparse" and container.unpack_bytes(blob) == data
    _, _, head_len = container.PREFIX.unpack_from(blob)
    header = json.loads(zlib.decompress(blob[container.PREFIX.size:container.PREFIX.size + head_len]))
    return header, blob[container.PREFIX.size + head_len:-container.DIGEST], data


def _tamper(fn):
    header, data, _ = _valid_parts()
    header, data = json.loads(json.dumps(header)), bytearray(data)
    fn(header, data)
    return forge(header, bytes(data))


def _t(path: str, value):
    def edit(header, data):
        obj = header
        keys = path.split(".")
        for k in keys[:-1]:
            obj = obj[int(k)] if isinstance(obj, list) else obj[k]
        obj[keys[-1]] = value
    return edit


def _flip_code_bits(header, data):
    ref = header["tensors"][0]["gaps"]["data"]
    for i in range(ref[0], ref[0] + ref[1]):
        data[i] ^= 0xFF


def _values_on_gap_blob(header, data):
    t = header["tensors"][0]  # one blob decoded as two streams (or as many as a forger likes): refused
    t["gaps"]["data"] = t["values"]["data"]


TAMPERED = {
    "model_bytes_huge": (_t("model_bytes", 2 ** 40), "over the 2 GiB"),
    "model_bytes_ratio": (_t("model_bytes", 10 ** 9), "over the 128:1"),
    "model_bytes_bool": (_t("model_bytes", True), "bad model_bytes"),
    "model_ref_outside": (_t("model", [0, 10 ** 9]), "bad model length"),
    "tensor_size_beyond_model": (_t("tensors.0.size", 10 ** 8), "size"),
    "tensor_at_negative": (_t("tensors.0.at", -1), "offset"),
    "tensor_dtype": (_t("tensors.0.dtype", "<f8"), "unknown form"),
    "dense_float": (_t("tensors.0.kind", "float"), "unknown form"),
    "index_bits_13": (_t("tensors.0.index_bits", 13), "index_bits"),
    "background_256": (_t("tensors.0.background", 256), "background"),
    "nbits_over_data": (_t("tensors.0.gaps.nbits", 10 ** 7), "inconsistent"),
    "count_over_nbits": (_t("tensors.0.gaps.count", 10 ** 6), "inconsistent"),
    "chunk_zero": (_t("tensors.0.gaps.chunk", 0), "chunk"),
    "chunk_too_big": (_t("tensors.0.gaps.chunk", 10 ** 6), "chunk"),
    "gap_alphabet": (_t("tensors.0.gaps.lengths", [0, 5000]), "bad"),
    "streams_differ": (lambda hd, d: hd["tensors"][0]["values"].update(count=hd["tensors"][0]["values"]["count"] - 1),
                       "differ in length"),
    "bad_codes": (_flip_code_bits, "corrupt container"),
    "blobs_shared": (_values_on_gap_blob, "overlap"),
    "tensors_list": (_t("tensors", {"a": 1}), "bad tensor list"),
    "format": (_t("format", "zip"), "not an onnxslim-cnn container header"),
}


@pytest.mark.parametrize("kind", sorted(TAMPERED))
def test_tampered_headers_one_line_user_error(kind):
    edit, expect = TAMPERED[kind]
    blob = _tamper(edit)
    with pytest.raises(UserError) as exc:
        container.unpack_bytes(blob, "bad.onnxz")
    msg = str(exc.value)
    assert "\n" not in msg and msg.startswith("bad.onnxz: ") and expect in msg, msg


@pytest.mark.parametrize("text,expect", [
    (b" " * (container.MAX_HEADER_BYTES + 10), "inflates beyond"),  # a header bomb
    (b"[" * 200_000 + b"]" * 200_000, "not JSON"),  # recursion
    (b"[1, 2]", "not a JSON object"),
    (b"\xff\xfe", "not JSON"),
])
def test_header_bombs_and_junk(text, expect):
    head = zlib.compress(text, 9)
    body = container.PREFIX.pack(container.MAGIC, container.VERSION, len(head)) + head
    blob = body + hashlib.sha256(body).digest()
    with pytest.raises(UserError, match=expect):
        container.unpack_bytes(blob)


def test_model_blob_must_inflate_to_exactly_its_size():
    header, data, _ = _valid_parts()
    for extra, expect in ((b"x", "beyond its recorded size"), (None, "less than its recorded size")):
        h2 = json.loads(json.dumps(header))
        skeleton = zlib.decompress(bytes(data[h2["model"][0]:h2["model"][0] + h2["model"][1]]))
        skeleton = skeleton + extra if extra else skeleton[:-1]
        z = zlib.compress(skeleton, 9)
        h2["model"] = [len(data), len(z)]
        with pytest.raises(UserError, match=expect):
            container.unpack_bytes(forge(h2, bytes(data) + z))


def test_extreme_ratio_model_is_padded_and_round_trips():
    """An all-zero weight codes to nothing: pack pads so that unpack's ratio bound holds."""
    m = make_model([h.make_node("Gemm", ["x", "w"], ["y"], name="fc")], [vi("x", [1, 1024])], [vi("y", [1, 1024])],
                   [init("w", np.zeros((1024, 1024), np.float32))])
    data = m.SerializeToString()
    blob, plans = container.pack_bytes(data)
    assert plans and len(data) <= container.MAX_RATIO * len(blob) <= len(data) + container.MAX_RATIO * 1024
    assert container.unpack_bytes(blob) == data


@pytest.mark.parametrize("method", ["steps", "doubling"])
@pytest.mark.parametrize("n,alphabet", [(1, 1), (7, 2), (1000, 3), (5000, 300), (70_000, 32), (300_000, 4096)])
def test_both_decode_schemes_round_trip(method, n, alphabet):
    rng = np.random.default_rng(n)
    s = np.minimum(rng.geometric(0.2, n) - 1, alphabet - 1)
    stream = huffman.encode(s, alphabet)
    np.testing.assert_array_equal(huffman.decode(stream, method=method), s)
    out = np.zeros(n, np.uint16)
    huffman.decode(stream, out=out, method=method)
    np.testing.assert_array_equal(out, s)
    # a corrupt code bit is caught by the chunk-end check in both schemes (or decodes other symbols)
    if n >= 1000:
        bad = bytearray(stream.data)
        bad[len(bad) // 3] ^= 0x5A
        try:
            got = huffman.decode(huffman.Stream(bytes(bad), stream.nbits, stream.count, stream.lengths,
                                                stream.sync, stream.chunk), method=method)
        except ValueError:
            pass
        else:
            assert not np.array_equal(got, s)
