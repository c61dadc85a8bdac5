"""``PassContext``: the shared, cached analysis every pass is handed.

Calibration inputs (loaded or generated once, split into what passes fit on and what the
report's fidelity is measured on), intermediate activations on them (one ORT run
per model for all the tensors passes ask for) and the original model's reference outputs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnx

from .analysis import calibration as calib_mod
from .analysis.calibration import CalibrationData
from .analysis.fidelity import reference_outputs
from .errors import UserError

RANDOM = "random"  # --calib random: the documented generator, asked for explicitly
# What the activations one data-aware request holds may take (``PassContext.activation_data``):
# with the models, sessions and design matrices beside it, peak RSS stays under 2.5 GB.
ACTIVATION_BYTES = 512 << 20


class PassContext:
    """Shared, cached analysis handed to every pass: calibration inputs, reference outputs, seed.

    ``calibration`` is what passes fit on. With ``heldout`` > 0 the samples are split first
    (``calibration.split``) and the held-out part is kept for the pipeline's fidelity only:
    no pass reads ``heldout`` (tests/core/test_images.py checks it).
    """

    def __init__(self, original: onnx.ModelProto, *, calib: Any = None,
                 input_shapes: "dict[str, tuple] | None" = None, seed: int = 0, samples: int = 8,
                 preprocess: Any = None, heldout: float = 0.0, tuning: float = 0.0):
        self.original = original
        self.seed = seed
        self.input_shapes = input_shapes or {}
        self.samples = samples
        self.warnings: list[str] = []
        self._calib_arg = calib
        self._preprocess = preprocess
        self._heldout_fraction = calib_mod.check_heldout(heldout)
        self._tuning_fraction = calib_mod.check_heldout(tuning)
        self._calib: CalibrationData | None = None
        self._split: "calib_mod.Split | None" = None
        self._tuning: "calib_mod.Split | None" = None
        self._reference = None
        self._tuning_reference = None
        self.cache: dict[str, Any] = {}
        self.original_session = None  # set by the pipeline, which has loaded the model already

    @property
    def calibration_given(self) -> bool:
        """Whether calibration data was asked for (a file, a folder, arrays, or ``random``
        explicitly), rather than left to the generator by default."""
        return self._calib_arg is not None

    def _load(self) -> "calib_mod.Split":
        if self._split is None:
            c = self._calib_arg
            path_like = isinstance(c, (str, Path)) and c != RANDOM
            if self._preprocess is not None and not (path_like and not Path(c).is_file()):
                what = "no --calib" if c is None else f"--calib {c}" if isinstance(c, (str, Path)) else "calib arrays"
                raise UserError(f"--preprocess applies to a folder of images (--calib DIR), not to {what}")
            if isinstance(c, CalibrationData):
                data = c
            elif c is None or isinstance(c, str) and c == RANDOM:
                data = calib_mod.random_inputs(self.original, samples=self.samples, seed=self.seed,
                                               input_shapes=self.input_shapes)
                if c == RANDOM:
                    data.warnings = [f"--calib random: {data.source} inputs (standard normal); lossy passes were "
                                     "fitted and measured on noise, so the output is unverified"]
            elif isinstance(c, dict):
                # same validation as a file, without a temp file whose name would show in errors
                data = calib_mod.from_arrays(c, self.original, "calib arrays", "arrays")
            elif Path(c).is_dir():
                from .analysis.images import load_folder

                data = load_folder(c, self.original, self._preprocess, self.input_shapes)
            else:
                data = calib_mod.load_npz(c, self.original)
            self.warnings.extend(data.warnings)
            self._split = calib_mod.split(data, self._heldout_fraction)
            # The accuracy budget's choices are measured on samples no pass fits on either: a
            # refit (prune's reconstruct) matches the data it was fitted on almost exactly, so
            # on the fit samples every cut looks free (digits VGG, prune 0.5 with reconstruct:
            # cosine 1.0000 on its 48 fit samples, 0.93 on the 16 held out).
            self._tuning = (calib_mod.split(self._split.fit, self._tuning_fraction)
                            if self._tuning_fraction and self._split.heldout is not None else None)
            if self._tuning is not None and self._tuning.heldout is not None:
                self._split = calib_mod.Split(self._tuning.fit, self._split.heldout, self._split.note)
            self._calib = self._split.fit
        return self._split

    @property
    def calibration(self) -> CalibrationData:
        """The samples passes fit on: the ``--calib`` file or folder, a dict of arrays, or the
        seeded generator, without the held-out samples."""
        return self._load().fit

    @property
    def heldout(self) -> "CalibrationData | None":
        """Held-out samples for the pipeline's fidelity (None when nothing is held out).
        Passes never read this."""
        return self._load().heldout

    @property
    def tuning(self) -> "CalibrationData":
        """Samples the accuracy budget measures its choices on: split off the fit samples when
        the pipeline asked for it (``tuning`` > 0) and there were enough, else the fit samples.
        Passes never read this either."""
        split = self._load()
        t = self._tuning
        return t.heldout if t is not None and t.heldout is not None else split.fit

    @property
    def tuning_note(self) -> str:
        self._load()
        t = self._tuning
        if t is not None and t.heldout is not None:
            return f"{t.heldout.samples} samples split off the fit samples"
        return "the fit samples (too few to split off a tuning set)"

    def tuning_reference(self):
        """Original model's outputs on the tuning samples (computed once)."""
        if self._tuning_reference is None:
            self._tuning_reference = reference_outputs(self.original, self.tuning, session=self.original_session)
        return self._tuning_reference

    @property
    def heldout_note(self) -> str:
        """``"held-out: 8 of 32 samples of folder X"``, or why fidelity uses the fit data."""
        return self._load().note

    def activation_data(self, model: onnx.ModelProto, names: "list[str]",
                        max_bytes: "int | None" = None) -> CalibrationData:
        """The calibration samples whose activations ``names`` fit in ``max_bytes`` (default
        ``ACTIVATION_BYTES``): the first whole runs of the fit samples, at least one run.

        A data-aware pass holds the activations it asks for all at once; on ppocrv4_det at
        640x640 the consumer inputs of prune's refit take about 230 MB per sample, so the 36
        fit samples of a 64-image folder would need 8 GB (the reconstruct runs that were
        OOM-killed at 5.6-6.1 GB RSS). The refits sample output positions anyway
        (``analysis.conv_patches.MAX_POSITIONS``), so a few large maps give them enough rows.
        """
        from .analysis.activations import bytes_per_sample

        calib = self.calibration
        budget = ACTIVATION_BYTES if max_bytes is None else max_bytes
        key = ("activation_data", id(model), tuple(sorted(names)), budget)
        if key not in self.cache:
            per = bytes_per_sample(model, names, calib)
            unit = calib.batch if calib.fixed_batch else 1
            n = calib.samples if per <= 0 else max(unit, int(budget // per) // unit * unit)
            self.cache[key] = calib if n >= calib.samples else calib.subset(np.arange(n))
        return self.cache[key]

    def activations(self, model: onnx.ModelProto, names: "list[str]",
                    data: "CalibrationData | None" = None) -> dict[str, np.ndarray]:
        """Values of intermediate tensors ``names`` of ``model`` on calibration inputs.

        On ``data`` (default: ``activation_data(model, names)``, the fit samples within the
        memory bound), one ORT run with the tensors exposed as extra outputs; chunks are
        concatenated along axis 0 (the batch axis of CNN activations). Cached per model, data
        and tensor, so passes asking for the same activations share one run.
        """
        from .analysis.activations import capture

        data = self.activation_data(model, names) if data is None else data
        key = id(model)
        cached = self.cache.setdefault(("activations", key, data.samples), {"model": model, "values": {}})
        missing = [n for n in names if n not in cached["values"]]
        if missing:
            cached["values"].update(capture(model, missing, data))
        return {n: cached["values"][n] for n in names}

    def reference(self):
        """Original model's outputs on the calibration inputs (computed once)."""
        if self._reference is None:
            self._reference = reference_outputs(self.original, self.calibration, session=self.original_session)
        return self._reference
