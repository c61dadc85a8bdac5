"""Calibration inputs: from a ``.npz`` file (arrays named after the model inputs) or generated.

The generator, used when no ``--calib`` file is given (with a warning, since random data says
little about a trained model's real activations):

* float inputs: independent standard-normal samples N(0, 1), float32 (or the input's float type);
* integer inputs: zeros; bool inputs: False;
* ``samples`` samples (default 8) drawn from ``numpy.random.default_rng(seed)`` (default seed 0),
  inputs in graph order, so the same model and seed always give the same arrays;
* a symbolic first dimension takes the sample count; any other symbolic dimension must come from
  ``input_shapes`` (``--input-shape name=1,3,640,640``), otherwise the generator refuses.
"""

from __future__ import annotations

import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import helper

from ..errors import UserError


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

    @property
    def samples(self) -> int:
        return next(iter(self.inputs.values())).shape[0] if self.inputs else 0

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


def random_inputs(model: onnx.ModelProto, *, samples: int = 8, seed: int = 0,
                  input_shapes: "dict[str, tuple[int, ...]] | None" = None) -> CalibrationData:
    specs = graph_inputs(model)
    input_shapes = input_shapes or {}
    _check_shape_names(specs, input_shapes)
    rng = np.random.default_rng(seed)
    arrays = {}
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
        arrays[spec.name] = _draw(rng, spec.dtype, tuple(shape))
    src = f"random(seed={seed}, samples={samples})"
    warn = (f"no --calib given: using {src} inputs; fidelity and data-driven passes are more "
            "meaningful with real samples")
    return CalibrationData(arrays, src, _run_batch(specs, samples), [warn],
                           fixed_batch=any(_fixed_batch(s) for s in specs))


def _draw(rng: np.random.Generator, dtype: np.dtype, shape: tuple) -> np.ndarray:
    if np.issubdtype(dtype, np.floating):
        return rng.standard_normal(shape).astype(dtype)
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
    try:
        data = np.load(path, allow_pickle=False)
        if not isinstance(data, np.lib.npyio.NpzFile):  # a .npy file holds one unnamed array
            raise ValueError("one array, not named arrays; write the file with numpy.savez")
        with data:
            arrays = {k: data[k] for k in data.files}
    except (OSError, ValueError, zipfile.BadZipFile) as exc:
        raise UserError(f"{path}: not a readable .npz file ({str(exc).splitlines()[0]})") from None
    return from_arrays(arrays, model, str(path), f"file:{path}")


def from_arrays(arrays: "dict[str, np.ndarray]", model: onnx.ModelProto, label: str = "calib",
                source: str = "arrays") -> CalibrationData:
    """Validate arrays named after the model inputs (samples on axis 0); errors start with ``label``.

    A dict from the Python API comes here directly: through a temporary .npz its errors would name
    a temp file, and ``np.savez(path, **arrays)`` fails on an input named ``file``.
    """
    arrays = {k: np.asarray(v) for k, v in arrays.items()}
    specs = graph_inputs(model)
    names = [s.name for s in specs]
    missing = [n for n in names if n not in arrays]
    if missing:
        raise UserError(f"{label}: no array for model input(s) {', '.join(missing)} (arrays: {', '.join(sorted(arrays)) or 'none'})")
    extra = sorted(set(arrays) - set(names))
    inputs, counts = {}, set()
    for spec in specs:
        a = arrays[spec.name]
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
    return CalibrationData(inputs, source, _run_batch(specs, counts.pop() if counts else 1), warnings,
                           fixed_batch=any(_fixed_batch(s) for s in specs))
