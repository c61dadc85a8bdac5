"""Calibration inputs from a folder of images: decoding, a preprocessing spec and its presets.

``--calib DIR --preprocess PRESET[,key=value,...]`` (API: ``calib="DIR", preprocess="imagenet"``).
The exact maths of every preset is in docs/calibration.md; in short, per image:

1. decode with Pillow, apply the EXIF orientation (as ``cv2.imread`` does), convert to RGB
   (or to greyscale ``L`` when ``color=gray`` or the model input has 1 channel);
2. geometry to the model input's H x W (``resize``): ``stretch`` (resize to H x W), ``letterbox``
   (fit inside H x W keeping the aspect ratio, pad with ``pad``), ``crop`` (scale to cover
   (H, W) / ``crop_ratio`` keeping the aspect ratio, centre crop H x W: ImageNet's resize 256 /
   crop 224), ``pad_right`` (height H keeping the aspect ratio, width at most W, pad the right
   with ``pad``: PaddleOCR's recogniser/classifier input);
3. channel order ``rgb`` or ``bgr`` (what ``cv2`` gives; PaddleOCR models were trained on it);
4. ``y = (x / divide - mean) / std`` per channel, in float32;
5. ``layout`` NCHW or NHWC (``auto``: from which of axis 1 / axis 3 of the input has 1 or 3
   channels), cast to ``dtype`` (default: the model input's; integer types are rounded and
   clipped).

H and W come from ``size=HxW``, else ``--input-shape``, else the model's static dims, else the
preset's default (only ``paddleocr_rec`` has one: PaddleOCR's 48 x 320), and are rounded to a
multiple of ``multiple`` (``paddleocr_det``: 32).

The folder: every file ending ``.jpg``, ``.jpeg``, ``.png`` or ``.bmp`` (any case) in it and in
its subfolders (recursive, so ImageNet-style ``val/<class>/*.jpg`` trees work), names starting
with ``.`` skipped, symlinked folders not followed; sorted by the path relative to the folder
(``/``-separated, code-point order), so the same folder always gives the same bytes. Other
files are ignored.

Why Pillow and not OpenCV: Pillow is a small wheel (22 MB installed) with no GUI or video
libraries behind it (opencv-python's wheels are several times larger and bundle Qt and ffmpeg),
its resampling filters are exact, documented convolutions (antialiased when downscaling, like
torchvision's PIL backend), and it has a decompression-bomb guard. The corpus task metrics already render
and preprocess with it (``models/tasks.py``).

Limits: an image over Pillow's decompression-bomb limit (``Image.MAX_IMAGE_PIXELS``, 89.5 M
pixels by default) is refused, as are calibration arrays over ``MAX_CALIB_BYTES`` (2 GiB) in
total, before anything is decoded.
"""

from __future__ import annotations

import dataclasses
import math
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from ..errors import UserError
from .calibration import MAX_CALIB_BYTES, CalibrationData, InputSpec, format_bytes, from_arrays, graph_inputs

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp")
# Pillow's own default, used when a caller has switched the limit off (MAX_IMAGE_PIXELS = None).
DEFAULT_MAX_PIXELS = 89_478_485

RESIZE_MODES = ("stretch", "letterbox", "crop", "pad_right")
COLORS = ("rgb", "bgr", "gray")
LAYOUTS = ("auto", "nchw", "nhwc")
ALIGNS = ("center", "topleft")
RESAMPLE = ("nearest", "box", "bilinear", "hamming", "bicubic", "lanczos")
DTYPES = ("float32", "float16", "float64", "uint8", "int8")


@dataclass(frozen=True)
class Preprocess:
    """How one image becomes one calibration sample (see the module docstring for each field)."""

    preset: str = "custom"
    resize: str = "stretch"
    size: "tuple[int, int] | None" = None  # (H, W); None: from --input-shape / the model
    color: str = "rgb"
    divide: float = 255.0
    mean: "tuple[float, ...]" = (0.0,)
    std: "tuple[float, ...]" = (1.0,)
    layout: str = "auto"
    dtype: "str | None" = None  # None: the model input's element type
    pad: float = 0.0  # pixel value (before divide/mean/std) of letterbox and pad_right padding
    align: str = "center"  # letterbox: image centred or at the top-left of the canvas
    crop_ratio: float = 0.875
    multiple: int = 1
    resample: str = "bilinear"
    default_size: "tuple[int, int] | None" = None  # the preset's H, W when nothing else gives them

    def text(self) -> str:
        """The spec as ``--preprocess`` text: the preset and every field that differs from it."""
        base = PRESETS.get(self.preset, Preprocess())
        parts = [self.preset]
        for f in dataclasses.fields(self):
            if f.name in ("preset", "default_size"):
                continue
            value = getattr(self, f.name)
            if value != getattr(base, f.name):
                parts.append(f"{f.name}={_format_value(value)}")
        return ",".join(parts)


_IMAGENET = dict(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
PRESETS: "dict[str, Preprocess]" = {
    # torchvision/timm ImageNet evaluation: resize the short side to size/0.875 (256 for 224),
    # centre crop, RGB in [0, 1], ImageNet mean/std.
    "imagenet": Preprocess("imagenet", resize="crop", **_IMAGENET),
    "unit": Preprocess("unit"),  # stretch to H x W, RGB, x / 255 in [0, 1]
    "symmetric": Preprocess("symmetric", mean=(0.5,), std=(0.5,)),  # [-1, 1]
    # PaddleOCR rec / cls (resize_norm_img): height 48, width ceil(48 w / h) capped at W, padded
    # right with 0 after normalisation (pixel 127.5), BGR as cv2 decodes, (x / 255 - 0.5) / 0.5.
    "paddleocr_rec": Preprocess("paddleocr_rec", resize="pad_right", color="bgr", mean=(0.5,), std=(0.5,),
                                pad=127.5, default_size=(48, 320)),
    # PaddleOCR det (DetResizeForTest + NormalizeImage): resize to H x W rounded to multiples of
    # 32, BGR as cv2 decodes with the ImageNet mean/std applied in that channel order.
    "paddleocr_det": Preprocess("paddleocr_det", color="bgr", multiple=32, **_IMAGENET),
}

_KEYS = tuple(f.name for f in dataclasses.fields(Preprocess) if f.name not in ("preset", "default_size"))


def preset_names() -> str:
    return ", ".join(PRESETS)


def _format_value(value: Any) -> str:
    if isinstance(value, tuple) and len(value) == 2 and all(isinstance(v, int) for v in value):
        return f"{value[0]}x{value[1]}"
    if isinstance(value, tuple):
        return ":".join(f"{v:g}" for v in value)
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def parse_preprocess(spec: "str | dict | Preprocess") -> Preprocess:
    """``"imagenet,layout=nhwc,size=224x224"`` (or ``{"preset": "imagenet", "layout": "nhwc"}``,
    or a :class:`Preprocess`) -> :class:`Preprocess`; every bad key or value is one line."""
    if isinstance(spec, Preprocess):
        return spec
    if isinstance(spec, dict):
        items = dict(spec)
        name = items.pop("preset", None)
        pairs = list(items.items())
    elif isinstance(spec, str):
        tokens = [t.strip() for t in spec.split(",") if t.strip()]
        name = tokens[0] if tokens and "=" not in tokens[0] else None
        pairs = []
        for token in tokens[1 if name else 0:]:
            if "=" not in token:
                raise UserError(f"bad --preprocess item {token!r} (expected key=value after the preset, "
                                f"e.g. imagenet,layout=nhwc)")
            key, _, value = token.partition("=")
            pairs.append((key.strip(), value.strip()))
    else:
        raise UserError(f"bad --preprocess {spec!r} (expected PRESET[,key=value,...])")
    if name not in PRESETS:
        raise UserError(f"--preprocess needs a preset first, one of: {preset_names()} "
                        f"(got {name!r}; then key=value items, e.g. imagenet,layout=nhwc,size=224x224)")
    values: dict[str, Any] = {}
    for key, value in pairs:
        if key not in _KEYS:
            raise UserError(f"unknown --preprocess key '{key}' (keys: {', '.join(_KEYS)})")
        values[key] = _coerce(key, value)
    return dataclasses.replace(PRESETS[name], **values)


def _coerce(key: str, raw: Any) -> Any:
    text = str(raw).strip().lower() if not isinstance(raw, (list, tuple)) else raw

    def bad(expect: str) -> UserError:
        return UserError(f"bad --preprocess value {key}={raw!r} (expected {expect})")

    choices = {"resize": RESIZE_MODES, "color": COLORS, "layout": LAYOUTS, "align": ALIGNS,
               "resample": RESAMPLE, "dtype": DTYPES}
    if key in choices:
        if text not in choices[key]:
            raise bad(f"one of {', '.join(choices[key])}")
        return text
    if key == "size":
        parts = text.split("x") if isinstance(text, str) else list(text)
        try:
            dims = tuple(int(p) for p in parts)
        except (TypeError, ValueError):
            raise bad("HxW, e.g. 224x224, or one number for a square") from None
        if len(dims) == 1:
            dims = dims * 2
        if len(dims) != 2 or min(dims) <= 0:
            raise bad("HxW with positive H and W")
        return dims
    if key in ("mean", "std"):
        parts = text.split(":") if isinstance(text, str) else list(text)
        try:
            vals = tuple(float(p) for p in parts)
        except (TypeError, ValueError):
            raise bad("numbers separated by ':', e.g. 0.485:0.456:0.406") from None
        if not vals or not all(math.isfinite(v) for v in vals) or key == "std" and min(vals) <= 0:
            raise bad("finite numbers" + (", all > 0" if key == "std" else ""))
        return vals
    if key == "multiple":
        try:
            n = int(text)
        except (TypeError, ValueError):
            raise bad("a positive integer") from None
        if n < 1:
            raise bad("a positive integer")
        return n
    try:
        v = float(text)
    except (TypeError, ValueError):
        raise bad("a number") from None
    if not math.isfinite(v) or key == "divide" and v <= 0 or key == "crop_ratio" and not 0 < v <= 1:
        raise bad({"divide": "a number > 0", "crop_ratio": "a number in (0, 1]"}.get(key, "a finite number"))
    return v


# --------------------------------------------------------------------------- geometry


@dataclass(frozen=True)
class Target:
    """What the model input wants: layout, channels, height, width, element type."""

    name: str
    layout: str  # nchw | nhwc
    channels: int
    height: int
    width: int
    dtype: np.dtype


def target(spec: Preprocess, inp: InputSpec, given: "tuple[int, ...] | None" = None) -> Target:
    """Resolve layout, channels and H x W for model input ``inp`` (``given``: its --input-shape)."""
    dims = list(given) if given else list(inp.dims)
    if len(dims) != 4:
        raise UserError(f"image calibration needs a rank-4 image input (N,C,H,W or N,H,W,C); input "
                        f"'{inp.name}' has shape {inp.dims}")

    def static(d: Any) -> "int | None":
        return d if isinstance(d, int) and d > 0 else None

    layout = spec.layout
    if layout == "auto":
        c1, c3 = static(dims[1]), static(dims[3])
        if c1 in (1, 3) or c1 is None and c3 not in (1, 3):
            layout = "nchw"
        elif c3 in (1, 3):
            layout = "nhwc"
        else:
            raise UserError(f"input '{inp.name}' has shape {inp.dims}: neither axis 1 nor axis 3 has 1 or 3 "
                            "channels; give layout=nchw or layout=nhwc in --preprocess")
    c_axis, h_axis, w_axis = (1, 2, 3) if layout == "nchw" else (3, 1, 2)
    channels = static(dims[c_axis]) or (1 if spec.color == "gray" else 3)
    if channels not in (1, 3):
        raise UserError(f"input '{inp.name}' ({layout.upper()}, shape {inp.dims}) has {channels} channels; "
                        "images give 1 (color=gray) or 3")
    if channels == 3 and spec.color == "gray":
        raise UserError(f"--preprocess color=gray, but input '{inp.name}' has 3 channels")
    for label, values in (("mean", spec.mean), ("std", spec.std)):
        if len(values) not in (1, channels):
            raise UserError(f"--preprocess {label} has {len(values)} values, input '{inp.name}' has {channels} "
                            f"channel(s); give {label}=v (one value) or one per channel")
    hw = []
    for i, axis in enumerate((h_axis, w_axis)):
        v = spec.size[i] if spec.size else static(dims[axis])
        if v is None and spec.default_size:
            v = spec.default_size[i]
        if v is None:
            shape = "1,3,H,W" if layout == "nchw" else "1,H,W,3"
            raise UserError(f"input '{inp.name}' has dynamic height/width ({inp.dims}): give --input-shape "
                            f"{inp.name}={shape} or size=HxW in --preprocess")
        hw.append(max(spec.multiple, int(round(v / spec.multiple)) * spec.multiple) if spec.multiple > 1 else v)
    h, w = hw
    for label, v, axis in (("height", h, h_axis), ("width", w, w_axis)):
        d = static(inp.dims[axis])
        if d is not None and d != v:
            raise UserError(f"--preprocess gives {label} {v}, but input '{inp.name}' is fixed at {d} ({inp.dims})")
    dtype = np.dtype(spec.dtype) if spec.dtype else inp.dtype
    if not (np.issubdtype(dtype, np.floating) or np.issubdtype(dtype, np.integer)):
        raise UserError(f"input '{inp.name}' is {dtype}; images give float or integer tensors")
    return Target(inp.name, layout, channels, h, w, dtype)


def _resample(name: str) -> int:
    from PIL import Image

    return getattr(Image.Resampling, name.upper())


def to_array(img: "Any", spec: Preprocess, t: Target) -> np.ndarray:
    """One decoded PIL image -> one sample (C,H,W or H,W,C) of ``t.dtype``."""
    img = img.convert("L" if t.channels == 1 else "RGB")
    h, w, rs = t.height, t.width, _resample(spec.resample)
    bands = 1 if t.channels == 1 else 3
    canvas = None
    if spec.resize == "stretch":
        img = img.resize((w, h), rs)
    elif spec.resize == "crop":
        s = max(h / img.height, w / img.width) / spec.crop_ratio
        nw, nh = max(w, round(img.width * s)), max(h, round(img.height * s))
        img = img.resize((nw, nh), rs)
        left, top = int(round((nw - w) / 2.0)), int(round((nh - h) / 2.0))
        img = img.crop((left, top, left + w, top + h))
    elif spec.resize == "letterbox":
        r = min(h / img.height, w / img.width)
        nw, nh = max(1, min(w, round(img.width * r))), max(1, min(h, round(img.height * r)))
        left, top = ((w - nw) // 2, (h - nh) // 2) if spec.align == "center" else (0, 0)
        canvas = (img.resize((nw, nh), rs), left, top)
    elif spec.resize == "pad_right":
        rw = min(w, math.ceil(h * img.width / img.height))
        canvas = (img.resize((rw, h), rs), 0, 0)
    else:  # pragma: no cover - parse_preprocess checks the choice
        raise ValueError(spec.resize)
    if canvas is None:
        x = np.asarray(img, np.float32)
    else:
        part, left, top = canvas
        x = np.full((h, w, bands) if bands == 3 else (h, w), spec.pad, np.float32)
        x[top:top + part.height, left:left + part.width] = np.asarray(part, np.float32)
    if x.ndim == 2:
        x = x[:, :, None]
    elif spec.color == "bgr":
        x = x[:, :, ::-1]
    mean = np.asarray(spec.mean, np.float32)
    std = np.asarray(spec.std, np.float32)
    x = (x / np.float32(spec.divide) - mean) / std
    if t.layout == "nchw":
        x = x.transpose(2, 0, 1)
    if np.issubdtype(t.dtype, np.integer):
        info = np.iinfo(t.dtype)
        return np.clip(np.rint(x), info.min, info.max).astype(t.dtype)
    return np.ascontiguousarray(x, dtype=t.dtype)


# --------------------------------------------------------------------------- the folder


def list_images(folder: "str | Path") -> list[Path]:
    """Image files under ``folder`` (recursive), sorted by their ``/``-separated relative path."""
    folder = Path(folder)
    found = []
    for root, dirs, files in os.walk(folder):  # followlinks=False: symlinked folders are not entered
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        rel = Path(root).relative_to(folder)
        for f in files:
            if not f.startswith(".") and f.lower().endswith(IMAGE_SUFFIXES):
                found.append((rel / f).as_posix())
    return [folder / p for p in sorted(found)]


def load_folder(folder: "str | Path", model: onnx.ModelProto, spec: "Preprocess | str | dict | None",
                input_shapes: "dict[str, tuple] | None" = None) -> CalibrationData:
    """Decode and preprocess every image of ``folder`` into the model's single image input."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    folder = Path(folder)
    if spec is None:
        raise UserError(f"--calib {folder} is a folder of images: give --preprocess PRESET[,key=value,...] "
                        f"(presets: {preset_names()}; see docs/calibration.md)")
    spec = parse_preprocess(spec)
    inputs = graph_inputs(model)
    if len(inputs) != 1:
        raise UserError(f"image calibration feeds one image input; the model has {len(inputs)} inputs "
                        f"({', '.join(i.name for i in inputs)}): give an .npz with one array per input")
    inp = inputs[0]
    t = target(spec, inp, (input_shapes or {}).get(inp.name))
    files = list_images(folder)
    if not files:
        raise UserError(f"{folder}: no images ({', '.join(IMAGE_SUFFIXES)}) in it or its subfolders")
    shape = (t.channels, t.height, t.width) if t.layout == "nchw" else (t.height, t.width, t.channels)
    total = len(files) * int(np.prod(shape)) * t.dtype.itemsize
    if total > MAX_CALIB_BYTES:
        raise UserError(f"{folder}: {len(files)} images at {'x'.join(map(str, shape))} {t.dtype} make "
                        f"{format_bytes(total)} of calibration data, over the {format_bytes(MAX_CALIB_BYTES)} cap; "
                        "use fewer images (a few hundred are plenty)")
    limit = Image.MAX_IMAGE_PIXELS or DEFAULT_MAX_PIXELS
    out = np.empty((len(files),) + shape, t.dtype)
    with warnings.catch_warnings():
        # Pillow only warns between its limit and twice it; here the limit is a refusal.
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        for i, path in enumerate(files):
            try:
                with Image.open(path) as im:
                    if im.width * im.height > limit:
                        raise UserError(f"{path}: {im.width}x{im.height} pixels is over the decompression-bomb "
                                        f"limit of {limit} pixels; refusing to decode it")
                    im.load()
                    out[i] = to_array(ImageOps.exif_transpose(im), spec, t)
            except UserError:
                raise
            except (Image.DecompressionBombError, Image.DecompressionBombWarning):
                raise UserError(f"{path}: over the decompression-bomb limit of {limit} pixels; refusing to decode "
                                "it") from None
            except UnidentifiedImageError:
                raise UserError(f"{path}: not a readable image (not a format Pillow decodes)") from None
            except (OSError, SyntaxError, ValueError, EOFError) as exc:
                first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
                raise UserError(f"{path}: not a readable image ({first})") from None
    data = from_arrays({inp.name: out}, model, str(folder), f"folder:{folder}")
    data.detail = f"{len(files)} images, --preprocess {spec.text()}"
    return data
