"""``PassContext``: the shared, cached analysis every pass is handed.

Calibration inputs (loaded or generated once), intermediate activations on them (one ORT run
per model for all the tensors passes ask for) and the original model's reference outputs.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx

from .analysis import calibration as calib_mod
from .analysis.calibration import CalibrationData
from .analysis.fidelity import reference_outputs


class PassContext:
    """Shared, cached analysis handed to every pass: calibration inputs, reference outputs, seed."""

    def __init__(self, original: onnx.ModelProto, *, calib: Any = None,
                 input_shapes: "dict[str, tuple] | None" = None, seed: int = 0, samples: int = 8):
        self.original = original
        self.seed = seed
        self.input_shapes = input_shapes or {}
        self.samples = samples
        self.warnings: list[str] = []
        self._calib_arg = calib
        self._calib: CalibrationData | None = None
        self._reference = None
        self.cache: dict[str, Any] = {}
        self.original_session = None  # set by the pipeline, which has loaded the model already

    @property
    def calibration(self) -> CalibrationData:
        """Calibration inputs: the ``--calib`` file, a dict of arrays, or the seeded generator."""
        if self._calib is None:
            c = self._calib_arg
            if isinstance(c, CalibrationData):
                self._calib = c
            elif c is None:
                self._calib = calib_mod.random_inputs(self.original, samples=self.samples, seed=self.seed,
                                                      input_shapes=self.input_shapes)
            elif isinstance(c, dict):
                # same validation as a file, without a temp file whose name would show in errors
                self._calib = calib_mod.from_arrays(c, self.original, "calib arrays", "arrays")
            else:
                self._calib = calib_mod.load_npz(c, self.original)
            self.warnings.extend(self._calib.warnings)
        return self._calib

    def activations(self, model: onnx.ModelProto, names: "list[str]") -> dict[str, np.ndarray]:
        """Values of intermediate tensors ``names`` of ``model`` on the calibration inputs.

        One ORT run over all calibration samples with the tensors exposed as extra outputs;
        chunks are concatenated along axis 0 (the batch axis of CNN activations). Cached per
        model and tensor, so passes asking for the same activations share one run.
        """
        from .analysis.activations import capture

        key = id(model)
        cached = self.cache.setdefault(("activations", key), {"model": model, "values": {}})
        missing = [n for n in names if n not in cached["values"]]
        if missing:
            cached["values"].update(capture(model, missing, self.calibration))
        return {n: cached["values"][n] for n in names}

    def reference(self):
        """Original model's outputs on the calibration inputs (computed once)."""
        if self._reference is None:
            self._reference = reference_outputs(self.original, self.calibration, session=self.original_session)
        return self._reference
