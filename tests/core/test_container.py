"""``onnxslim pack`` / ``unpack`` (Deep Compression container) and the Huffman coder under it."""

from __future__ import annotations

import struct

import numpy as np
import onnx
import pytest
from graphs import init, make_model, run, vi
from onnx import helper as h

import onnxslim_cnn
from onnxslim_cnn import cli, container, huffman
from onnxslim_cnn.models import digits
from onnxslim_cnn.pack_cli import layer_rows


def _calib():
    return {"input": digits.load_split("train")[0][:32]}  # real digits (sparsify and share are lossy)


@pytest.fixture(scope="module")
def shared_vgg(tmp_path_factory):
    """digits VGG after sparsify (0.9) + share: what Deep Compression stores."""
    out, _ = onnxslim_cnn.compress(str(digits.fixture_path("digits_vgg")), passes=["sparsify", "share"],
                                   sparsify__ratio=0.9, fidelity=False, calib=_calib(), budget="off")
    path = tmp_path_factory.mktemp("vgg") / "shared.onnx"
    onnxslim_cnn.save(out, str(path))
    return path


def _cli(*args):
    return cli.main([str(a) for a in args])


def _inits(model):
    return {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}


def test_pack_unpack_is_byte_identical_and_runs(shared_vgg, tmp_path, capsys):
    z, back = tmp_path / "m.onnxz", tmp_path / "back.onnx"
    assert _cli("pack", shared_vgg, z, "--report", tmp_path / "r.json") == 0
    table = capsys.readouterr().out
    assert "P+Q+H" in table and "classifier.0" in table and "total" in table
    assert _cli("unpack", z, back, "-q") == 0
    assert back.read_bytes() == shared_vgg.read_bytes()
    a, b = onnx.load(str(shared_vgg)), onnx.load(str(back))
    ia, ib = _inits(a), _inits(b)
    assert ia.keys() == ib.keys() and all(ia[k].dtype == ib[k].dtype and np.array_equal(ia[k], ib[k]) for k in ia)
    x = digits.load_split("test")[0][:16]
    np.testing.assert_array_equal(run(a, {"input": x})[0], run(b, {"input": x})[0])
    # every code tensor of the share pass went into the container, sparse with relative indices
    blob = z.read_bytes()
    _, plans = container.pack_bytes(shared_vgg.read_bytes())
    assert {p.name for p in plans} == {t.name for t in a.graph.initializer if t.name.endswith("_codes")}
    assert all(p.kind == "codes" for p in plans) and any(p.encoding == "sparse" for p in plans)
    # kept counts are the real nonzero codes; the container is much smaller than the model
    for p in plans:
        assert p.kept == int(np.count_nonzero(ia[p.name]))  # code 0 is 0.0 after sparsify
    assert len(blob) * 5 < shared_vgg.stat().st_size
    # deterministic
    assert container.pack_bytes(shared_vgg.read_bytes())[0] == blob


def test_sparse_float_weights_and_odd_bit_patterns_round_trip():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((64, 40)).astype(np.float32)
    w[rng.random(w.shape) < 0.95] = 0
    w[0, 0], w[1, 1], w[2, 2] = -0.0, np.nan, np.inf  # -0.0 is a kept value, not background
    w[5:60, :] = 0  # one long gap: filler entries at small index widths
    m = make_model([h.make_node("Gemm", ["x", "w"], ["y"], name="fc")], [vi("x", [1, 64])], [vi("y", [1, 40])],
                   [init("w", w)])
    data = m.SerializeToString(deterministic=True)
    for bits in (0, 2, 8):
        blob, plans = container.pack_bytes(data, index_bits=bits)
        assert container.unpack_bytes(blob) == data
        (p,) = plans
        assert p.kind == "float" and p.encoding == "sparse" and p.kept == int(np.count_nonzero(w.view(np.uint32)))
        if bits == 2:
            assert p.index_bits == 2 and p.entries > p.kept  # fillers bridge gaps over 4
    dense = make_model([h.make_node("Gemm", ["x", "w"], ["y"], name="fc")], [vi("x", [1, 64])], [vi("y", [1, 40])],
                       [init("w", rng.standard_normal((64, 40)))])
    blob, plans = container.pack_bytes(dense.SerializeToString())
    assert plans == [] and container.unpack_bytes(blob) == dense.SerializeToString()


def test_dequantize_form_uses_zero_point_as_background(tmp_path):
    sparse, _ = onnxslim_cnn.compress(str(digits.fixture_path("digits_vgg")), passes=["sparsify", "share"],
                                      sparsify__ratio=0.9, share__codebook="uniform", share__form="dequantize",
                                      fidelity=False, calib=_calib(), budget="off")
    data = sparse.SerializeToString(deterministic=True)
    blob, plans = container.pack_bytes(data)
    assert container.unpack_bytes(blob) == data
    inits = _inits(sparse)
    zp = {n.input[0]: int(inits[n.input[2]]) for n in sparse.graph.node if n.op_type == "DequantizeLinear"}
    assert {p.name for p in plans} == set(zp)
    for p in plans:
        assert p.kept == int(np.count_nonzero(inits[p.name] != zp[p.name]))
    rows = layer_rows(plans)
    assert rows[-1]["layer"] == "total" and rows[-1]["weights"] == sum(p.size for p in plans)


def _corrupt_variants(blob: bytes) -> dict:
    body = bytearray(blob)
    flipped = bytearray(blob)
    flipped[len(blob) // 2] ^= 0xFF
    newer = bytearray(blob)
    struct.pack_into("<H", newer, 8, 2)
    return {"magic": b"PK\x03\x04" + blob[4:], "truncated": blob[: len(blob) - 100], "checksum": bytes(flipped),
            "version": bytes(newer), "empty": b"", "trailing": bytes(body) + b"x"}


@pytest.mark.parametrize("kind,expect", [("magic", "not an onnxslim container"), ("truncated", "truncated"),
                                         ("checksum", "checksum mismatch"), ("version", "version 2 is not supported"),
                                         ("empty", "not an onnxslim container"), ("trailing", "trailing bytes")])
def test_bad_containers_one_line_exit_2(shared_vgg, tmp_path, capsys, kind, expect):
    blob, _ = container.pack_bytes(shared_vgg.read_bytes())
    bad = tmp_path / "bad.onnxz"
    bad.write_bytes(_corrupt_variants(blob)[kind])
    out = tmp_path / "out.onnx"
    assert _cli("unpack", bad, out) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and expect in err and str(bad) in err
    assert not out.exists()


def test_pack_bad_inputs(tmp_path, capsys):
    (tmp_path / "junk.onnx").write_bytes(b"\x01\x02 not a model")
    (tmp_path / "text.onnx").write_bytes(b"")  # parses as an empty ModelProto
    with pytest.raises(onnxslim_cnn.UserError, match="not an ONNX model"):
        container.pack_bytes((tmp_path / "text.onnx").read_bytes())
    assert _cli("pack", tmp_path / "junk.onnx", tmp_path / "o.onnxz") == 2
    assert _cli("pack", tmp_path / "missing.onnx", tmp_path / "o.onnxz") == 2
    assert _cli("pack", digits.fixture_path("digits_vgg"), tmp_path / "o.onnxz", "--index-bits", "13") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 3 and "not a readable ONNX model" in err[0] and "not found" in err[1] and "[0, 12]" in err[2]
    assert not (tmp_path / "o.onnxz").exists()


# --------------------------------------------------------------------------- huffman


@pytest.mark.parametrize("n,alphabet", [(0, 4), (1, 1), (7, 1), (1000, 3), (50_000, 32), (20_000, 4096)])
def test_huffman_round_trip(n, alphabet):
    rng = np.random.default_rng(n)
    s = np.minimum(rng.geometric(0.3, n) - 1, alphabet - 1)
    stream = huffman.encode(s, alphabet)
    np.testing.assert_array_equal(huffman.decode(stream), s)
    if n:
        counts = np.bincount(s, minlength=alphabet)
        assert stream.nbits == huffman.cost_bits(counts)
        p = counts[counts > 0] / n
        entropy = float(-(p * np.log2(p)).sum())
        assert entropy <= stream.nbits / n <= entropy + 1 + 1e-9  # Huffman is within 1 bit of entropy


def test_huffman_length_limit_and_corruption():
    counts = np.array([2 ** i for i in range(40)], dtype=np.int64)  # Fibonacci-like skew: depth 39 unlimited
    lengths = huffman.code_lengths(counts)
    assert lengths.max() == huffman.MAX_LEN and np.sum(2.0 ** -lengths.astype(float)) <= 1.0
    s = np.repeat(np.arange(40), np.minimum(counts, 5000))
    stream = huffman.encode(s)
    np.testing.assert_array_equal(huffman.decode(stream), s)
    bad = huffman.Stream(stream.data, stream.nbits, stream.count, np.zeros_like(stream.lengths), stream.sync,
                         stream.chunk)
    with pytest.raises(ValueError):
        huffman.decode(bad)
