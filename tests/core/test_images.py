"""Calibration from image folders (analysis/images.py), the held-out split, the no-noise rule for
lossy passes and the refusals of bad calibration data (issue 15 items 1, 4, 5; issue 16 item 1).

Images are made here with Pillow; nothing binary is committed. Solid-colour images make the
expected values exact: resampling a constant image gives the same constant.
"""

from __future__ import annotations

import hashlib
import inspect
import io
import struct
import zipfile
import zlib

import numpy as np
import onnx
import pytest
from onnx import TensorProto
from onnx import helper as h

import onnxslim_cnn
from graphs import conv_bn_model, init, make_model, vi, user_error
from onnxslim_cnn.analysis import calibration as calib_mod
from onnxslim_cnn.analysis.images import (PRESETS, Target, list_images, load_folder, parse_preprocess,
                                          preset_names, to_array)
from onnxslim_cnn.cli import main
from onnxslim_cnn.models import digits

Image = pytest.importorskip("PIL.Image")

DIGITS_CALIB = str(digits.EXAMPLES_DIR / "digits_calib.npz")
IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)
COLOUR = (200, 100, 50)


def image_model(shape=("N", 3, 16, 16), layout="nchw"):
    """A 1x1 conv (channels -> 2) on an image input; NHWC inputs go through a Transpose first."""
    c = shape[1] if layout == "nchw" else shape[3]
    w = init("w", np.arange(2 * c, dtype=np.float32).reshape(2, c, 1, 1) / 10)
    if layout == "nchw":
        nodes = [h.make_node("Conv", ["x", "w"], ["y"])]
    else:
        nodes = [h.make_node("Transpose", ["x"], ["t"], perm=[0, 3, 1, 2]), h.make_node("Conv", ["t", "w"], ["y"])]
    return make_model(nodes, [vi("x", list(shape))], [vi("y", ["N", 2, "oh", "ow"])], [w])


def solid(path, size=(20, 10), colour=COLOUR, fmt=None):
    Image.new("RGB", size, colour).save(path, fmt)
    return path


def folder(tmp_path, n=4, size=(20, 10), name="imgs"):
    d = tmp_path / name
    d.mkdir()
    for i in range(n):
        solid(d / f"{i:02d}.png", size, (COLOUR[0] - i, COLOUR[1], COLOUR[2] + i))
    return d


def target(h=16, w=16, c=3, layout="nchw", dtype=np.float32):
    return Target("x", layout, c, h, w, np.dtype(dtype))


def rgb(i=0):
    return np.array([COLOUR[0] - i, COLOUR[1], COLOUR[2] + i], np.float32)


# --------------------------------------------------------------------------- presets, exact maths


def test_preset_table():
    assert preset_names() == "imagenet, unit, symmetric, paddleocr_rec, paddleocr_det"
    assert parse_preprocess("imagenet").text() == "imagenet"
    spec = parse_preprocess("imagenet,layout=nhwc,size=224x224,mean=0.5:0.5:0.5")
    assert spec.layout == "nhwc" and spec.size == (224, 224) and spec.mean == (0.5, 0.5, 0.5)
    assert spec.text() == "imagenet,size=224x224,mean=0.5:0.5:0.5,layout=nhwc"
    assert parse_preprocess({"preset": "unit", "size": 32}).size == (32, 32)  # a recipe mapping


@pytest.mark.parametrize("preset,expect", [
    ("imagenet", lambda c: (c / 255.0 - IMAGENET_MEAN) / IMAGENET_STD),
    ("unit", lambda c: c / 255.0),
    ("symmetric", lambda c: (c / 255.0 - 0.5) / 0.5),
    ("paddleocr_det", lambda c: (c[::-1] / 255.0 - IMAGENET_MEAN) / IMAGENET_STD),  # BGR, means in that order
])
def test_preset_values_on_a_solid_image(tmp_path, preset, expect):
    x = to_array(Image.new("RGB", (40, 30), COLOUR), PRESETS[preset], target())
    assert x.shape == (3, 16, 16) and x.dtype == np.float32
    want = expect(np.array(COLOUR, np.float32)).astype(np.float32)
    np.testing.assert_allclose(x, np.broadcast_to(want[:, None, None], x.shape), rtol=0, atol=1e-6)


def test_paddleocr_rec_keeps_aspect_and_pads_right_with_zero():
    # 30x10 at height 48 is 144 wide; the rest of the 192 columns is 0 after (x/255-0.5)/0.5
    x = to_array(Image.new("RGB", (30, 10), COLOUR), PRESETS["paddleocr_rec"], target(48, 192))
    want = ((np.array(COLOUR[::-1], np.float32) / 255.0 - 0.5) / 0.5)[:, None, None]  # BGR
    np.testing.assert_allclose(x[:, :, :144], np.broadcast_to(want, (3, 48, 144)), atol=1e-6)
    assert not x[:, :, 144:].any()
    # wider than the input: squashed to the full width, nothing padded
    wide = to_array(Image.new("RGB", (300, 10), COLOUR), PRESETS["paddleocr_rec"], target(48, 192))
    np.testing.assert_allclose(wide, np.broadcast_to(want, (3, 48, 192)), atol=1e-6)


def test_imagenet_crop_keeps_the_centre():
    # 64x32: green centre (columns 16..47) between red sides; the centre crop sees only green
    a = np.zeros((32, 64, 3), np.uint8)
    a[:, :, 0] = 255
    a[:, 16:48] = (0, 255, 0)
    x = to_array(Image.fromarray(a), PRESETS["imagenet"], target())
    green = (np.array([0, 255, 0], np.float32) / 255.0 - IMAGENET_MEAN) / IMAGENET_STD
    np.testing.assert_allclose(x[:, :, 2:14], np.broadcast_to(green[:, None, None], (3, 16, 12)), atol=1e-5)


def test_letterbox_padding_values_and_alignment():
    spec = parse_preprocess("unit,resize=letterbox,pad=114")
    x = to_array(Image.new("RGB", (20, 10), COLOUR), spec, target())  # fits as 16x8, centred: rows 4..11
    pad = np.float32(114 / 255.0)
    assert (x[:, :4] == pad).all() and (x[:, 12:] == pad).all()
    np.testing.assert_allclose(x[:, 4:12], np.broadcast_to(rgb()[:, None, None] / 255.0, (3, 8, 16)), atol=1e-6)
    top = to_array(Image.new("RGB", (20, 10), COLOUR), parse_preprocess("unit,resize=letterbox,pad=114,align=topleft"),
                   target())
    assert (top[:, 8:] == pad).all() and not (top[:, :8] == pad).any()


def test_multiple_rounds_the_size():
    spec = parse_preprocess("paddleocr_det,size=100x70")
    model = image_model(("N", 3, "H", "W"))
    from onnxslim_cnn.analysis.images import target as resolve

    t = resolve(spec, calib_mod.graph_inputs(model)[0])
    assert (t.height, t.width) == (96, 64)


def test_grayscale_for_one_channel_inputs_and_nhwc(tmp_path):
    d = folder(tmp_path, n=2)
    gray = load_folder(d, image_model(("N", 1, 16, 16)), "unit").inputs["x"]
    # Pillow's L = (299 R + 587 G + 114 B) / 1000, rounded: 124 for (200, 100, 50)
    assert gray.shape == (2, 1, 16, 16) and (gray[0] == np.float32(124 / 255.0)).all()
    nchw = load_folder(d, image_model(), "imagenet").inputs["x"]
    nhwc = load_folder(d, image_model(("N", 16, 16, 3), "nhwc"), "imagenet").inputs["x"]  # layout=auto
    assert nhwc.shape == (2, 16, 16, 3)
    np.testing.assert_array_equal(nhwc, nchw.transpose(0, 2, 3, 1))
    forced = load_folder(d, image_model(("N", 16, 16, 3), "nhwc"), "imagenet,layout=nhwc").inputs["x"]
    np.testing.assert_array_equal(forced, nhwc)


def test_integer_inputs_are_rounded_and_clipped(tmp_path):
    d = folder(tmp_path, n=1)
    nodes = [h.make_node("Cast", ["x"], ["y"], to=TensorProto.FLOAT)]
    m = make_model(nodes, [vi("x", ["N", 3, 8, 8], TensorProto.UINT8)], [vi("y", ["N", 3, 8, 8])])
    x = load_folder(d, m, "unit,divide=1").inputs["x"]
    assert x.dtype == np.uint8 and (x[0, :, 0, 0] == [200, 100, 50]).all()


def test_same_folder_same_bytes_and_sorted_recursive_listing(tmp_path):
    d = tmp_path / "tree"
    (d / "b").mkdir(parents=True)
    (d / ".hidden").mkdir()
    for rel in ("c.BMP", "b/d.png", "a.jpg", "b/c.jpeg", ".x.png", ".hidden/e.png"):
        solid(d / rel, fmt={"BMP": "BMP", "png": "PNG", "jpg": "JPEG", "jpeg": "JPEG"}[rel.rsplit(".", 1)[1]])
    (d / "labels.txt").write_text("not an image")
    assert [p.relative_to(d).as_posix() for p in list_images(d)] == ["a.jpg", "b/c.jpeg", "b/d.png", "c.BMP"]
    m = image_model()
    a, b = (load_folder(d, m, "imagenet") for _ in range(2))
    assert a.inputs["x"].tobytes() == b.inputs["x"].tobytes() and a.samples == 4
    assert a.source == f"folder:{d}" and a.label == f"folder {d}" and a.detail == "4 images, --preprocess imagenet"


# --------------------------------------------------------------------------- held-out split


def data(n, batch=None):
    x = np.arange(n, dtype=np.float32).reshape(n, 1)
    return calib_mod.CalibrationData({"x": x}, "arrays", batch or min(8, n), fixed_batch=batch is not None)


@pytest.mark.parametrize("n,fraction,held", [(8, 0.25, 0), (15, 0.25, 0), (16, 0.25, 8), (20, 0.25, 8),
                                             (32, 0.25, 8), (40, 0.25, 10), (100, 0.25, 25), (20, 0.5, 10),
                                             (100, 0.0, 0), (16, 0.05, 8)])
def test_split_sizes(n, fraction, held):
    s = calib_mod.split(data(n), fraction)
    got = 0 if s.heldout is None else s.heldout.samples
    assert got == held and s.fit.samples == n - held
    if held:
        assert s.note == f"held-out: {held} of {n} samples of arrays"
        seen = np.concatenate([s.fit.inputs["x"][:, 0], s.heldout.inputs["x"][:, 0]])
        assert sorted(seen) == list(range(n))  # a partition
    else:
        assert s.fit is not None and s.note.startswith(f"fidelity is measured on the data the passes fit on ({n} samples")


def test_split_is_a_seeded_draw_deterministic_and_keeps_fixed_batches():
    s = calib_mod.split(data(32))
    held = s.heldout.inputs["x"][:, 0].tolist()
    expected = np.sort(np.random.default_rng(calib_mod.SPLIT_SEED).permutation(32)[:8]).tolist()
    assert held == expected and held == sorted(held)
    assert calib_mod.split(data(32)).heldout.inputs["x"].tobytes() == s.heldout.inputs["x"].tobytes()
    # periodic data (every 4th sample alike) does not put one phase in the held-out set
    assert len({i % 4 for i in calib_mod.split(data(64)).heldout.inputs["x"][:, 0].tolist()}) > 1
    runs = calib_mod.split(data(32, batch=4))  # 8 runs of 4: 2 runs held out (8 samples)
    first = runs.heldout.inputs["x"][:, 0].tolist()
    assert len(first) == 8 and all(first[j] % 4 == j % 4 and first[j] - first[j - j % 4] == j % 4 for j in range(8))
    assert runs.fit.batch == runs.heldout.batch == 4


def test_heldout_bounds():
    assert "within [0, 0.5]" in user_error(calib_mod.check_heldout, 0.7)
    assert "within [0, 0.5]" in user_error(calib_mod.check_heldout, float("nan"))


class _Spy(onnxslim_cnn.GraphPass):
    """Records every calibration array a pass can reach through the context."""

    name = "spy"
    lossy = True
    seen: list = []

    def run(self, graph, ctx):
        inputs = ctx.calibration.inputs["input"]
        acts = ctx.activations(graph.source, ["input", graph.source.graph.node[0].output[0]])
        _, ref = ctx.reference()
        _Spy.seen.append({"inputs": inputs, "activation_input": acts["input"],
                          "reference_samples": sum(len(chunk[0]) for chunk in ref)})
        return onnxslim_cnn.PassResult()


def _rows(a):
    return {hashlib.sha256(r.tobytes()).hexdigest() for r in a}


def test_heldout_never_reaches_a_pass(monkeypatch):
    """prune (reconstruct), data-aware svd, q8 and a spy pass on digits: no pass touches the held-out
    samples, neither through the context nor through any ONNX Runtime run while passes work."""
    import onnxruntime as ort

    from onnxslim_cnn import pipeline
    from onnxslim_cnn.context import PassContext

    calib = dict(np.load(DIGITS_CALIB))
    s = calib_mod.split(calib_mod.from_arrays(calib, onnx.load(str(digits.fixture_path("digits_vgg")))))
    held, fit = _rows(s.heldout.inputs["input"]), _rows(s.fit.inputs["input"])
    assert len(held) == 16 and not held & fit
    state = {"in_pass": False, "heldout_reads": [], "leaks": 0, "runs": 0}

    real_transform = pipeline.checked_transform

    def transform(p, model, ctx):
        state["in_pass"] = True
        try:
            return real_transform(p, model, ctx)
        finally:
            state["in_pass"] = False

    real_heldout = PassContext.heldout.fget

    def heldout(self):
        if state["in_pass"]:
            state["heldout_reads"].append([f.filename for f in inspect.stack()[1:4]])
        return real_heldout(self)

    real_run = ort.InferenceSession.run

    def run(self, output_names, feeds, *args, **kw):
        if state["in_pass"]:
            state["runs"] += 1
            for v in feeds.values():
                if isinstance(v, np.ndarray) and v.shape[1:] == (1, 32, 32):
                    state["leaks"] += len(_rows(v) & held)
        return real_run(self, output_names, feeds, *args, **kw)

    monkeypatch.setattr(pipeline, "checked_transform", transform)
    monkeypatch.setattr(PassContext, "heldout", property(heldout))
    monkeypatch.setattr(ort.InferenceSession, "run", run)
    _Spy.seen = []
    _, report = onnxslim_cnn.compress(str(digits.fixture_path("digits_vgg")),
                                      ["slim", _Spy(), "prune", "svd", "q8"], calib=DIGITS_CALIB,
                                      prune__reconstruct=True, svd__data_aware=True, budget="off")
    assert [p.status for p in report.passes] == ["ok"] * 5
    assert state["runs"] > 10 and state["leaks"] == 0 and state["heldout_reads"] == []
    [seen] = _Spy.seen
    assert _rows(seen["inputs"]) == fit and _rows(seen["activation_input"]) == fit
    assert seen["reference_samples"] == 48
    assert report.fidelity_data == {"set": "held-out", "samples": 16, "source": f"file:{DIGITS_CALIB}",
                                    "text": f"held-out: 16 of 64 samples of file {DIGITS_CALIB}"}
    assert f"Fidelity vs original (ONNX Runtime, held-out: 16 of 64 samples of file {DIGITS_CALIB})" \
        in report.format_table()


def test_fidelity_is_measured_on_the_heldout_samples():
    src = str(digits.fixture_path("digits_vgg"))
    calib = dict(np.load(DIGITS_CALIB))
    _, report = onnxslim_cnn.compress(src, ["prune"], calib=calib, prune__ratio=0.5)
    from onnxslim_cnn.analysis.fidelity import fidelity

    s = calib_mod.split(calib_mod.from_arrays(calib, onnx.load(src)))
    again, _ = onnxslim_cnn.compress(src, ["prune"], calib=calib, prune__ratio=0.5)
    assert report.fidelity == fidelity(onnx.load(src), again, s.heldout)
    _, all_fit = onnxslim_cnn.compress(src, ["prune"], calib=calib, prune__ratio=0.5, heldout=0)
    assert all_fit.fidelity_data["set"] == "fit" and all_fit.fidelity_data["samples"] == 64
    assert any(w.startswith("fidelity is measured on the data the passes fit on (64 samples of arrays; --heldout 0)")
               for w in all_fit.warnings)


def test_few_samples_warn_that_fidelity_uses_the_fit_data():
    x = np.random.default_rng(0).standard_normal((6, 4, 8, 8)).astype(np.float32)
    _, report = onnxslim_cnn.compress(conv_bn_model(), ["prune"], calib={"x": x})
    assert report.fidelity_data["set"] == "fit"
    assert ("fidelity is measured on the data the passes fit on (6 samples of arrays; 16 or more samples are "
            "needed to hold some out)") in report.warnings


# --------------------------------------------------------------------------- no lossy pass on noise


@pytest.mark.parametrize("passes", ["prune", "svd", "lowrank", "sparsify", "q8", "share", "fp16", "fpga",
                                    "slim,sparsify,share"])
def test_lossy_passes_refuse_to_run_without_calibration(passes):
    msg = user_error(onnxslim_cnn.compress, conv_bn_model(), passes.split(","))
    lossy = [p for p in passes.split(",") if p != "slim"]
    assert msg == (f"{', '.join(lossy)} {'is' if len(lossy) == 1 else 'are'} lossy: give --calib FILE.npz or "
                   "--calib DIR --preprocess PRESET with real samples to fit and check on, or --calib random to "
                   "accept unverified output from random inputs")


def test_exact_passes_need_no_calibration():
    assert {n for n, c in onnxslim_cnn.available_passes().items() if not c.lossy} == {"slim", "sparse"}
    _, report = onnxslim_cnn.compress(conv_bn_model(), ["slim", "sparse"])
    assert report.calibration == "random(seed=0, samples=8)"


def test_calib_random_accepts_noise_and_says_so():
    _, report = onnxslim_cnn.compress(conv_bn_model(), ["prune"], calib="random")
    assert report.calibration == "random(seed=0, samples=8)" and report.passes[0].status == "ok"
    assert report.warnings[0] == ("--calib random: random(seed=0, samples=8) inputs (standard normal); lossy passes "
                                  "were fitted and measured on noise, so the output is unverified")


# --------------------------------------------------------------------------- the command line


def refused(args, capsys, tmp_path):
    """Through the CLI entry point: exit 2, exactly one line on stderr, no output written."""
    code = main([str(a) for a in args])
    err = capsys.readouterr().err
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("onnxslim: error: "), err
    assert not (tmp_path / "out.onnx").exists()
    return lines[0][len("onnxslim: error: "):]


@pytest.fixture
def model_path(tmp_path):
    p = tmp_path / "in.onnx"
    onnx.save(image_model(), p)
    return p


def test_cli_folder_with_preset_and_recipe(model_path, tmp_path, capsys):
    d = folder(tmp_path, n=20)
    out = tmp_path / "out.onnx"
    assert main([str(model_path), str(out), "--passes", "q8", "--calib", str(d), "--preprocess", "imagenet",
                 "--report", str(tmp_path / "r.json"), "-q"]) == 0
    import json

    rep = json.loads((tmp_path / "r.json").read_text())
    assert rep["calibration"] == f"folder:{d}"
    assert rep["fidelity_data"]["text"] == f"held-out: 8 of 20 samples of folder {d}"
    recipe = tmp_path / "r.yaml"
    recipe.write_text("passes: [q8]\ncalibration: {preprocess: {preset: unit, size: 16x16}, heldout: 0.5}\n")
    assert main([str(model_path), str(out), "--recipe", str(recipe), "--calib", str(d), "--report",
                 str(tmp_path / "r.json"), "-q"]) == 0
    rep = json.loads((tmp_path / "r.json").read_text())
    assert rep["fidelity_data"]["text"] == f"held-out: 10 of 20 samples of folder {d}"
    # the command line wins over the recipe
    assert main([str(model_path), str(out), "--recipe", str(recipe), "--calib", str(d), "--heldout", "0",
                 "--report", str(tmp_path / "r.json"), "-q"]) == 0
    assert json.loads((tmp_path / "r.json").read_text())["fidelity_data"]["set"] == "fit"


def test_cli_lossy_without_calib_and_random(model_path, tmp_path, capsys):
    msg = refused([model_path, tmp_path / "out.onnx", "--passes", "slim,q8"], capsys, tmp_path)
    assert msg.startswith("q8 is lossy: give --calib FILE.npz") and "--calib random" in msg
    assert main([str(model_path), str(tmp_path / "out.onnx"), "--passes", "q8", "--calib", "random"]) == 0
    assert "warning: --calib random: random(seed=0, samples=8) inputs" in capsys.readouterr().out


def test_cli_refuses_bad_folders(model_path, tmp_path, capsys):
    out = tmp_path / "out.onnx"
    d = folder(tmp_path, n=3)
    args = [model_path, out, "--passes", "q8", "--calib", d]
    assert refused(args, capsys, tmp_path) == (
        f"--calib {d} is a folder of images: give --preprocess PRESET[,key=value,...] (presets: imagenet, unit, "
        "symmetric, paddleocr_rec, paddleocr_det; see docs/calibration.md)")
    assert refused(args + ["--preprocess", "imagenett"], capsys, tmp_path) == (
        "--preprocess needs a preset first, one of: imagenet, unit, symmetric, paddleocr_rec, paddleocr_det "
        "(got 'imagenett'; then key=value items, e.g. imagenet,layout=nhwc,size=224x224)")
    assert refused(args + ["--preprocess", "imagenet,colour=rgb"], capsys, tmp_path).startswith(
        "unknown --preprocess key 'colour' (keys: resize, size, color, ")
    assert refused(args + ["--preprocess", "imagenet,size=0x3"], capsys, tmp_path) == (
        "bad --preprocess value size='0x3' (expected HxW with positive H and W)")
    assert refused(args + ["--preprocess", "imagenet,size=32x32"], capsys, tmp_path) == (
        "--preprocess gives height 32, but input 'x' is fixed at 16 (['N', 3, 16, 16])")
    assert refused(args + ["--heldout", "0.7", "--preprocess", "unit"], capsys, tmp_path).startswith(
        "bad --heldout 0.7 (the share of calibration samples kept out of fitting")
    empty = tmp_path / "empty"
    (empty / "sub").mkdir(parents=True)
    (empty / "notes.txt").write_text("x")
    assert refused([model_path, out, "--passes", "q8", "--calib", empty, "--preprocess", "unit"], capsys,
                   tmp_path) == f"{empty}: no images (.jpg, .jpeg, .png, .bmp) in it or its subfolders"
    npz = tmp_path / "c.npz"
    np.savez(npz, x=np.zeros((2, 3, 16, 16), np.float32))
    assert refused([model_path, out, "--passes", "q8", "--calib", npz, "--preprocess", "unit"], capsys,
                   tmp_path) == f"--preprocess applies to a folder of images (--calib DIR), not to --calib {npz}"


def test_cli_refuses_bad_images(model_path, tmp_path, capsys):
    out = tmp_path / "out.onnx"
    d = folder(tmp_path, n=2)
    fake = d / "03.png"
    fake.write_text("not an image")
    args = [model_path, out, "--passes", "q8", "--calib", d, "--preprocess", "unit"]
    assert refused(args, capsys, tmp_path) == f"{fake}: not a readable image (not a format Pillow decodes)"
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(buf, "JPEG")
    fake.unlink()
    cut = d / "04.jpg"
    cut.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    msg = refused(args, capsys, tmp_path)
    assert msg.startswith(f"{cut}: not a readable image (") and "truncated" in msg
    cut.unlink()
    bomb = d / "05.png"
    bomb.write_bytes(_png_claiming(20000, 20000))  # 400 M pixels, a 70-byte file
    assert refused(args, capsys, tmp_path) == (
        f"{bomb}: over the decompression-bomb limit of {Image.MAX_IMAGE_PIXELS} pixels; refusing to decode it")
    bomb.unlink()
    dynamic = tmp_path / "dyn.onnx"
    onnx.save(image_model(("N", 3, "H", "W")), dynamic)
    assert refused([dynamic] + args[1:-1] + ["unit,size=20000x20000"], capsys, tmp_path) == (
        f"{d}: 2 images at 3x20000x20000 float32 make 8.9 GiB of calibration data, over the 2.0 GiB cap; use fewer "
        "images (a few hundred are plenty)")


def _png_claiming(width, height):
    buf = io.BytesIO()
    Image.new("L", (1, 1)).save(buf, "PNG")
    data = bytearray(buf.getvalue())
    struct.pack_into(">II", data, 16, width, height)  # IHDR's width and height
    struct.pack_into(">I", data, 29, zlib.crc32(bytes(data[12:29])))
    return bytes(data)


def _npz(tmp_path, name, **arrays):
    p = tmp_path / name
    np.savez(p, **arrays)
    return p


def test_cli_refuses_bad_npz(tmp_path, capsys):
    model = tmp_path / "in.onnx"
    onnx.save(conv_bn_model(), model)  # x: [N, 4, 8, 8]
    out = tmp_path / "out.onnx"
    x = np.zeros((4, 4, 8, 8), np.float32)
    inf = x.copy()
    inf[1, 2, 3, 4] = np.inf
    nan = np.full_like(x, np.nan)
    cases = {
        _npz(tmp_path, "inf.npz", x=inf): "array 'x' has 1 non-finite value(s) (Inf or NaN) of 1024; calibration "
                                          "data must be finite",
        _npz(tmp_path, "nan.npz", x=nan): "array 'x' has 1024 non-finite value(s) (Inf or NaN) of 1024; calibration "
                                          "data must be finite",
        _npz(tmp_path, "empty.npz", x=x[:0]): "array 'x' has 0 samples (shape (0, 4, 8, 8)); calibration needs at "
                                              "least one",
    }
    for path, why in cases.items():
        assert refused([model, out, "--passes", "q8", "--calib", path], capsys, tmp_path) == f"{path}: {why}"
    text = tmp_path / "not_a_zip.npz"
    text.write_text("x = 1\n")
    assert refused([model, out, "--calib", text], capsys, tmp_path) == (
        f"{text}: not an .npz (zip) file; write one with numpy.savez(path, input_name=array)")
    huge = tmp_path / "huge.npz"
    header = io.BytesIO()
    n = 286 * (1 << 30) // (4 * 8 * 8 * 4)  # 286 GiB of float32 [n, 4, 8, 8]
    np.lib.format.write_array_header_1_0(header, {"descr": "<f4", "fortran_order": False, "shape": (n, 4, 8, 8)})
    with zipfile.ZipFile(huge, "w") as zf:
        zf.writestr("x.npy", header.getvalue() + b"\0" * 64)
    assert refused([model, out, "--calib", huge], capsys, tmp_path) == (
        f"{huge}: array 'x' claims 286.0 GiB ({n}x4x8x8 float32) but its member holds 64 B (a truncated or forged "
        "header)")


def test_npz_headers_are_checked_before_allocating(tmp_path, monkeypatch):
    m = conv_bn_model()
    # a consistent file over the cap: refused from the headers alone
    monkeypatch.setattr(calib_mod, "MAX_CALIB_BYTES", 1 << 20)
    big = _npz(tmp_path, "big.npz", x=np.zeros((1200, 4, 8, 8), np.float32))  # 1.2 MiB
    assert user_error(calib_mod.load_npz, big, m) == (
        f"{big}: arrays of 1.2 MiB or more, over the 1.0 MiB cap on calibration data; use fewer samples (a few "
        "hundred are plenty)")
    # a deflated member that claims more than deflate can give
    forged = tmp_path / "forged.npz"
    with zipfile.ZipFile(forged, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("x.npy", b"\0" * 4096)
    raw = bytearray(forged.read_bytes())
    for sig, off in ((b"PK\x03\x04", 22), (b"PK\x01\x02", 24)):  # uncompressed size in both headers
        i = raw.index(sig)
        struct.pack_into("<I", raw, i + off, 0xFFFF0000)
    forged.write_bytes(bytes(raw))
    assert "more than compression can give" in user_error(calib_mod.load_npz, forged, m)


# --------------------------------------------------------------------------- a real model


@pytest.mark.corpus
def test_ppocr_cls_from_an_image_folder(corpus_paths, tmp_path):
    """ppocr_cls_v2 q8-calibrated from a folder of the rendered lines (PNG) with the PaddleOCR preset
    reaches the task result of the same samples as an .npz (measured: 30/32 both, float 31/32);
    in RGB order the folder gives tasks.sample_inputs' exact bytes."""
    from onnxslim_cnn.models import tasks

    path = str(corpus_paths["ppocr_cls_v2"])
    d = tmp_path / "lines"
    d.mkdir()
    for i, im in enumerate(tasks.sample_images("ppocr_cls_v2", 16)):
        im.save(d / f"{i:03d}.png")
    npz = tasks.sample_inputs("ppocr_cls_v2", 16)
    same = load_folder(d, onnx.load(path), "paddleocr_rec,color=rgb,size=48x192").inputs["x"]
    assert same.tobytes() == npz["x"].tobytes()
    from_folder, report = onnxslim_cnn.compress(path, ["q8"], calib=str(d), preprocess="paddleocr_rec",
                                                input_shapes={"x": (1, 3, 48, 192)})
    assert report.fidelity_data["text"] == f"held-out: 8 of 16 samples of folder {d}"
    from_npz, _ = onnxslim_cnn.compress(path, ["q8"], calib=npz)
    float_correct = tasks.evaluate("ppocr_cls_v2", path)["correct"]
    got = tasks.evaluate("ppocr_cls_v2", from_folder)["correct"]
    assert got == tasks.evaluate("ppocr_cls_v2", from_npz)["correct"] and got >= float_correct - 1


def test_recipe_calibration_block(tmp_path):
    from onnxslim_cnn.options import load_recipe, recipe_calibration

    r = tmp_path / "r.yaml"
    r.write_text("passes: [q8]\ncalibration: {preprocess: imagenet, heldout: 0.1}\n")
    assert load_recipe(r) == (["q8"], {}) and recipe_calibration(r) == {"preprocess": "imagenet", "heldout": 0.1}
    r.write_text("calibration: {preset: imagenet}\n")
    assert user_error(recipe_calibration, r) == f"{r}: 'calibration' is a mapping with keys 'preprocess', 'heldout' and 'budget'"
