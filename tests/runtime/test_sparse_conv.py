"""The direct sparse convolution (SparseConv, runtime/src/kernels_conv.cc) and the conv claim
cost model: numerics against ORT's dense Conv, which path each conv takes, what is declined."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
from graphs import run
from onnxslim_cnn.runtime import loader
from test_sparse_ep import conv_model, needs_ep, sparse_weight

from onnxslim_cnn import runtime

ROOT = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("bench_sparse_kernels", ROOT / "bench" / "sparse_kernels.py")
sk = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(sk)

SPARSITIES = [0.0, 0.5, 0.9, 0.99, 1.0]
# Stride-1 forms the direct path takes: odd widths (not multiples of 8), dilation, asymmetric
# pads, auto_pad, a 1-D conv, maps wider than one 64-position tile and ones that are not.
DIRECT_FORMS = {
    "3x3-pad1-odd": ((5, 13, 11), 7, (3, 3), dict(pads=[1, 1, 1, 1])),
    "3x3-dil2-asym": ((4, 12, 15), 9, (3, 3), dict(dilations=[2, 2], pads=[2, 0, 1, 3])),
    "3x2-dil21": ((3, 11, 10), 6, (3, 2), dict(dilations=[2, 1])),
    "same-upper": ((6, 9, 23), 5, (3, 3), dict(auto_pad="SAME_UPPER")),
    "same-lower-4x4": ((3, 10, 9), 4, (4, 4), dict(auto_pad="SAME_LOWER")),
    "valid-5x5": ((2, 12, 13), 3, (5, 5), dict(auto_pad="VALID")),
    "1x1-padded": ((4, 7, 9), 5, (1, 1), dict(pads=[1, 0, 0, 2])),
    "conv1d": ((4, 71), 6, (3,), dict(pads=[2, 1], dilations=[2])),
}


@pytest.fixture(scope="module")
def ep_kernels():
    """The kernels' C ABI of the very library ORT loaded (same handle: its counters and ISA)."""
    lib = loader.library_path()
    k = sk.Kernels(lib)
    if not hasattr(k.lib, "onnxslim_sparse_conv_path_runs"):
        pytest.skip(f"{lib} predates the direct conv: rebuild it (pip install -e .)")
    yield k
    k.set_isa("auto")


def _runs_delta(k, fn):
    before = k.conv_path_runs()
    out = fn()
    after = k.conv_path_runs()
    return out, {name: after[name] - before[name] for name in after}


def _check(model, feeds, claimed, **kw):
    sess = runtime.session(model, min_sparsity=0.0, **kw)
    assert sorted(n["op_type"] for n in runtime.claimed_nodes(sess)) == sorted(claimed)
    got = sess.run(None, feeds)[0]
    ref = run(model, feeds)[0]
    assert got.shape == ref.shape
    assert float(np.abs(got - ref).max()) <= 1e-5 * max(float(np.abs(ref).max()), 1e-30)


@needs_ep
@pytest.mark.parametrize("sparsity", SPARSITIES)
@pytest.mark.parametrize("batch", [1, 32])
@pytest.mark.parametrize("form", list(DIRECT_FORMS))
def test_direct_conv_matches_ort(ep_kernels, form, batch, sparsity):
    shape, oc, kernel, attrs = DIRECT_FORMS[form]
    relu = form != "valid-5x5"  # one form without bias and ReLU
    rng = np.random.default_rng(len(form) + batch + int(sparsity * 100))
    model, feeds = conv_model(rng, (batch, *shape), oc, kernel, sparsity, bias=relu, relu=relu, **attrs)
    # format=csr: every layer is claimed (auto would leave the dense ones to ORT)
    _, runs = _runs_delta(ep_kernels, lambda: _check(model, feeds, ["Conv", "Relu"] if relu else ["Conv"],
                                                     format="csr"))
    assert runs == {"direct": batch, "im2col": 0, "pointwise": 0}


@needs_ep
def test_direct_conv_portable_path_in_the_ep(ep_kernels):
    rng = np.random.default_rng(5)
    model, feeds = conv_model(rng, (2, 7, 19, 21), 10, (3, 3), 0.9, pads=[1, 2, 1, 0])
    ep_kernels.set_isa("portable")
    try:
        _, runs = _runs_delta(ep_kernels, lambda: _check(model, feeds, ["Conv", "Relu"], format="csr"))
    finally:
        ep_kernels.set_isa("auto")
    assert runs["direct"] == 2


# Convs the direct path splits into input-channel blocks (kernels_conv.cc: kL1Budget /
# (kh * (64 + kw - 1) * 4) channels per block, 33 for 3x3, 13 for 7x7; here 3 blocks each): the
# partial sums must carry over from block to block. Maps of 2-3 64-position tiles.
BLOCKED_FORMS = {
    "3x3-70ch": ((70, 12, 13), 8, (3, 3), dict(pads=[1, 1, 1, 1])),
    "7x7-30ch": ((30, 11, 10), 6, (7, 7), dict(pads=[3, 2, 3, 4])),
}


@needs_ep
@pytest.mark.parametrize("isa", ["auto", "portable"])
@pytest.mark.parametrize("sparsity", [0.5, 0.9])
@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("form", list(BLOCKED_FORMS))
def test_direct_conv_channel_blocks_match_ort(ep_kernels, form, batch, sparsity, isa):
    shape, oc, kernel, attrs = BLOCKED_FORMS[form]
    rng = np.random.default_rng(batch + int(sparsity * 100) + shape[0])
    model, feeds = conv_model(rng, (batch, *shape), oc, kernel, sparsity, **attrs)
    ep_kernels.set_isa(isa)
    try:
        _, runs = _runs_delta(ep_kernels, lambda: _check(model, feeds, ["Conv", "Relu"], format="csr"))
    finally:
        ep_kernels.set_isa("auto")
    assert runs == {"direct": batch, "im2col": 0, "pointwise": 0}


@needs_ep
@pytest.mark.parametrize("form, path", [(dict(strides=[2, 2], pads=[1, 1, 1, 1]), "im2col"),
                                        (dict(strides=[1, 2]), "im2col"),
                                        (dict(kernel=(1, 1)), "pointwise")])
def test_other_convs_keep_their_paths(ep_kernels, form, path):
    form = dict(form)
    kernel = form.pop("kernel", (3, 3))
    rng = np.random.default_rng(3)
    model, feeds = conv_model(rng, (3, 8, 14, 13), 12, kernel, 0.9, **form)
    _, runs = _runs_delta(ep_kernels, lambda: _check(model, feeds, ["Conv", "Relu"], format="csr"))
    assert runs == {"direct": 0, "im2col": 0, "pointwise": 0, path: 3}


@needs_ep
def test_forced_block_format_runs_im2col(ep_kernels):
    rng = np.random.default_rng(4)
    model, feeds = conv_model(rng, (2, 8, 10, 10), 12, (3, 3), 0.9, pads=[1, 1, 1, 1])
    _, runs = _runs_delta(ep_kernels, lambda: _check(model, feeds, ["Conv", "Relu"], format="block4x1"))
    assert runs == {"direct": 0, "im2col": 2, "pointwise": 0}


@needs_ep
def test_cost_model_declines_convs_that_lose(ep_kernels):
    """format=auto: a VGG-like 3x3 conv is left to ORT where the sparse run would be slower
    (little sparsity) and claimed where it wins; the same holds for the model's own figures."""
    rng = np.random.default_rng(6)
    claimed = {}
    for sparsity in (0.2, 0.95):
        model, _ = conv_model(rng, (1, 64, 56, 56), 64, (3, 3), sparsity, pads=[1, 1, 1, 1])
        claimed[sparsity] = [n["op_type"] for n in runtime.claimed_nodes(runtime.session(model, min_sparsity=0.0))]
    assert claimed == {0.2: [], 0.95: ["Conv", "Relu"]}
    cost = lambda nnz, direct: ep_kernels.lib.onnxslim_sparse_conv_relative_cost(  # noqa: E731
        nnz, 64, 64, 3, 3, 56, 56, 56, 56, direct)
    full = 64 * 64 * 9
    assert cost(full, 1) > 1.0 > cost(full // 10, 1)
    assert cost(full // 10, 1) < cost(full // 10, 0)  # the direct path beats im2col on this map
    assert cost(0, 1) > 0.0  # the padded copy and the output store are never free


@pytest.fixture(scope="module")
def standalone_build():
    """The kernels built standalone from the current sources (skips without a compiler)."""
    try:
        return sk.Kernels(sk.build_standalone())
    except FileNotFoundError as e:
        pytest.skip(str(e))


@pytest.fixture
def standalone(standalone_build):
    yield standalone_build
    standalone_build.set_isa("auto")  # a test that switched ISA (and maybe failed) leaves auto behind


def _isas(k) -> list:
    """Every ISA path of the standalone kernels this CPU can run."""
    k.set_isa("auto")
    return ["portable"] if k.isa() == "portable" else ["avx2+fma", "portable"]


def _reference(w, x, pads, dilations, bias, relu):
    """float64 direct definition of a stride-1 conv; pads = (top, left, bottom, right)."""
    oc, _, kh, kw = w.shape
    xp = np.pad(x.astype(np.float64), ((0, 0), (0, 0), (pads[0], pads[2]), (pads[1], pads[3])))
    oh = xp.shape[2] - (kh - 1) * dilations[0]
    ow = xp.shape[3] - (kw - 1) * dilations[1]
    y = np.zeros((x.shape[0], oc, oh, ow))
    for ky in range(kh):
        for kx in range(kw):
            patch = xp[:, :, ky * dilations[0]:ky * dilations[0] + oh, kx * dilations[1]:kx * dilations[1] + ow]
            y += np.einsum("oc,nchw->nohw", w[:, :, ky, kx].astype(np.float64), patch)
    if bias is not None:
        y += bias[None, :, None, None]
    return np.maximum(y, 0.0) if relu else y


def test_direct_kernel_threads_and_isas_against_float64(standalone):
    """Standalone build of the current sources: every thread count gives the same bits, both ISA
    paths match float64 within 1e-5 relative, incl. all-zero filters and a 100 % sparse bank."""
    k = standalone
    rng = np.random.default_rng(8)
    for isa in _isas(k):
        k.set_isa(isa)
        for sparsity in (0.0, 0.9, 1.0):
            w = sparse_weight(rng, (37, 5, 3, 3), sparsity, 0)
            x = rng.standard_normal((2, 5, 17, 29)).astype(np.float32)
            bias = rng.standard_normal(37).astype(np.float32)
            pads, dil = (1, 2, 0, 1), (2, 1)
            ys = [k.direct_conv(w, x, pads=pads, dilations=dil, bias=bias, relu=True, threads=t)
                  for t in (1, 2, 3, 8)]
            for y in ys[1:]:
                assert np.array_equal(y, ys[0])
            ref = _reference(w, x, pads, dil, bias, True)
            assert ys[0].shape == ref.shape
            assert np.abs(ys[0] - ref).max() <= 1e-5 * max(np.abs(ref).max(), 1e-30), (isa, sparsity)


def test_direct_kernel_channel_blocks_against_float64(standalone):
    """Standalone build: 70 input channels (3 blocks of a 3x3 conv) and 30 (3 blocks of a 7x7),
    both ISA paths, 1 and 3 threads, against float64 within 1e-5 relative."""
    k = standalone
    rng = np.random.default_rng(9)
    for isa in _isas(k):
        k.set_isa(isa)
        for c, kernel, pads in ((70, 3, (1, 1, 1, 1)), (30, 7, (3, 2, 3, 4))):
            for sparsity in (0.5, 0.9):
                w = sparse_weight(rng, (9, c, kernel, kernel), sparsity, 0)
                x = rng.standard_normal((2, c, 12, 11)).astype(np.float32)
                bias = rng.standard_normal(9).astype(np.float32)
                ref = _reference(w, x, pads, (1, 1), bias, True)
                for threads in (1, 3):
                    y = k.direct_conv(w, x, pads=pads, bias=bias, relu=True, threads=threads)
                    assert y.shape == ref.shape
                    err = np.abs(y - ref).max()
                    assert err <= 1e-5 * max(np.abs(ref).max(), 1e-30), (isa, c, kernel, sparsity, threads, err)


def test_direct_kernel_errors(standalone):
    k = standalone
    assert not k.lib.onnxslim_sparse_conv_create(None, 4, 0, 3, 3)
    assert "positive in_channels" in k.error()
    with pytest.raises(sk.KernelError, match="positive sizes"):
        k.direct_conv(np.ones((2, 1, 3, 3), np.float32), np.ones((1, 1, 2, 2), np.float32))  # output 0x0
