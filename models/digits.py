"""scikit-learn's bundled digits as a 32x32 image-classification task, and the trained fixtures.

The data needs no network: ``sklearn.datasets.load_digits()`` ships with scikit-learn.  Each
8x8 image (values 0..16) is scaled to [0, 1], upsampled to 32x32 with bilinear interpolation
(half-pixel centres, edge clamp: the same as ``torch.nn.functional.interpolate(...,
mode="bilinear", align_corners=False)``), then normalised with the fixed constants ``MEAN`` and
``STD``.  The split is a fixed stratified 75/25 train/test split.

Two CNNs trained on it (by ``models/train_digits.py``) are committed as ONNX fixtures under
``models/examples/``: ``digits_vgg`` and ``digits_resnet``.  ``evaluate_top1`` measures the
top-1 accuracy of any ONNX model with input ``N x 1 x 32 x 32`` and output ``N x 10``.

This module never imports torch.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Literal, Union

import numpy as np

__all__ = [
    "IMAGE_SIZE",
    "NUM_CLASSES",
    "MEAN",
    "STD",
    "TEST_SIZE",
    "SPLIT_SEED",
    "FIXTURES",
    "REFERENCE_TOP1",
    "load_split",
    "fixture_path",
    "evaluate_top1",
]

IMAGE_SIZE = 32
NUM_CLASSES = 10
# Mean / std of the upsampled, /16-scaled training images, rounded and fixed here.
MEAN = 0.3052
STD = 0.3235
TEST_SIZE = 0.25
SPLIT_SEED = 0

EXAMPLES_DIR = Path(__file__).resolve().parent / "examples"
FIXTURES = ("digits_vgg", "digits_resnet")
# Top-1 accuracy on the test split (450 images) measured with evaluate_top1 on the committed
# fixtures; models/train_digits.py prints these figures when it writes the fixtures.
REFERENCE_TOP1 = {
    "digits_vgg": 0.9978,  # 449 / 450
    "digits_resnet": 0.9956,  # 448 / 450
}


def _bilinear_matrix(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in) matrix of 1-D bilinear weights, half-pixel centres, edges clamped."""
    scale = n_in / n_out
    src = (np.arange(n_out, dtype=np.float64) + 0.5) * scale - 0.5
    src = np.clip(src, 0.0, n_in - 1)
    lo = np.floor(src).astype(np.int64)
    hi = np.minimum(lo + 1, n_in - 1)
    frac = src - lo
    m = np.zeros((n_out, n_in), dtype=np.float64)
    rows = np.arange(n_out)
    np.add.at(m, (rows, lo), 1.0 - frac)
    np.add.at(m, (rows, hi), frac)
    return m


def _upsample(images: np.ndarray, size: int = IMAGE_SIZE) -> np.ndarray:
    """Upsample (N, h, w) float64 images to (N, size, size) bilinearly."""
    mh = _bilinear_matrix(images.shape[1], size)
    mw = _bilinear_matrix(images.shape[2], size)
    return np.einsum("ih,nhw,jw->nij", mh, images, mw)


@functools.lru_cache(maxsize=1)
def _load_all() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = digits.images.astype(np.float64) / 16.0  # (1797, 8, 8) in [0, 1]
    y = digits.target.astype(np.int64)
    x = _upsample(images)
    x = ((x - MEAN) / STD).astype(np.float32)[:, None, :, :]
    x_tr, x_te, y_tr, y_te = train_test_split(
        x, y, test_size=TEST_SIZE, random_state=SPLIT_SEED, stratify=y
    )
    for a in (x_tr, x_te, y_tr, y_te):
        a.setflags(write=False)
    return x_tr, y_tr, x_te, y_te


def load_split(split: Literal["train", "test"] = "test") -> tuple[np.ndarray, np.ndarray]:
    """Return ``(x, y)``: x float32 ``(N, 1, 32, 32)`` normalised, y int64 ``(N,)`` in 0..9.

    train: 1347 images, test: 450 images.  The arrays are fresh writable copies.
    """
    x_tr, y_tr, x_te, y_te = _load_all()
    if split == "train":
        return x_tr.copy(), y_tr.copy()
    if split == "test":
        return x_te.copy(), y_te.copy()
    raise ValueError(f"split must be 'train' or 'test', got {split!r}")


def fixture_path(name: str) -> Path:
    """Path of a committed fixture, ``name`` in ``FIXTURES`` (with or without ``.onnx``)."""
    stem = name[:-5] if name.endswith(".onnx") else name
    if stem not in FIXTURES:
        raise KeyError(f"unknown digits fixture {name!r}; known: {', '.join(FIXTURES)}")
    return EXAMPLES_DIR / f"{stem}.onnx"


def _session(model):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    if isinstance(model, (str, Path)):
        src = str(model)
    else:  # onnx.ModelProto
        src = model.SerializeToString()
    return ort.InferenceSession(src, sess_options=opts, providers=["CPUExecutionProvider"])


def evaluate_top1(
    model: Union[str, Path, "onnx.ModelProto"],  # noqa: F821
    split: Literal["train", "test"] = "test",
    batch: int = 64,
) -> float:
    """Top-1 accuracy of an ONNX model (path or ModelProto) on a split; onnxruntime CPU, 1 thread.

    The model takes one float32 input ``(N, 1, 32, 32)`` and its first output is the logits
    ``(N, 10)``.
    """
    if batch < 1:
        raise ValueError("batch must be >= 1")
    sess = _session(model)
    in_name = sess.get_inputs()[0].name
    out_name = sess.get_outputs()[0].name
    x, y = load_split(split)
    correct = 0
    for i in range(0, len(x), batch):
        logits = sess.run([out_name], {in_name: x[i : i + batch]})[0]
        correct += int((np.argmax(logits, axis=1) == y[i : i + batch]).sum())
    return correct / len(x)
