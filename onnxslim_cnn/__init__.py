"""onnxslim-cnn: an ONNX graph-rewriting compiler that makes trained CNNs smaller and faster.

Python API for converters::

    import onnxslim_cnn
    model, report = onnxslim_cnn.compress("resnet.onnx", passes=["slim"], calib="calib.npz")
    onnxslim_cnn.save(model, "resnet.slim.onnx")
    print(report.format_table())

Options go per pass, either as ``options={"slim": {"fuse_pad": False}}`` or flattened as
keyword arguments ``slim__fuse_pad=False`` (pass name, two underscores, option name).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .errors import UserError

if TYPE_CHECKING:
    import onnx

    from .context import PassContext
    from .graph import Graph
    from .pass_infra import GraphPass, ModelPass, Pass, PassResult, available_passes, get_pass, register_pass
    from .report import Report

# The public names, imported on first use (PEP 562): `import onnxslim_cnn` and the command line
# start without onnx, ONNX Runtime and onnx-graphsurgeon (~0.7 s), so the CLI can take Ctrl-C
# cleanly from its first moments (see cli._interrupt_promptly).
_LAZY = {
    "Graph": "graph", "PassContext": "context", "Report": "report", "run_pipeline": "pipeline",
    **{name: "pass_infra" for name in ("GraphPass", "ModelPass", "Pass", "PassResult", "available_passes",
                                       "get_pass", "register_pass")},
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

__version__ = "0.1.0"

__all__ = [
    "compress", "load", "save", "Graph", "GraphPass", "ModelPass", "Pass", "PassContext", "PassResult", "Report", "UserError",
    "available_passes", "get_pass", "register_pass",
]


def load(source: "str | onnx.ModelProto") -> onnx.ModelProto:
    """Read and check a model (path or ModelProto). Raises ``UserError`` on bad input."""
    from .model_io import load_model

    return load_model(source)


def save(model: onnx.ModelProto, path: str) -> None:
    """Write atomically (temp file + rename); external data for models over ~1.8 GB."""
    from .model_io import save_model

    save_model(model, path)


def compress(model: "str | onnx.ModelProto", passes: "list[str | Pass] | None" = None, *,
             calib: Any = None, input_shapes: "dict[str, tuple[int, ...]] | None" = None,
             options: "dict[str, dict[str, Any]] | None" = None, seed: int = 0,
             fidelity: bool = True, bench: bool = False, preprocess: Any = None, heldout: "float | None" = None,
             budget: Any = "default", progress: Any = None, **flat_options: Any) -> tuple[onnx.ModelProto, Report]:
    """Run ``passes`` (default ``["slim"]``) on ``model``; returns ``(new ModelProto, Report)``.

    ``calib`` is a ``.npz`` path, a dict of arrays named after the model inputs, a folder of
    images with ``preprocess`` (a preset name with overrides, ``"imagenet,size=224x224"``; see
    ``analysis.images``), or ``"random"`` (the documented generator of ``analysis.calibration``).
    Lossy passes (prune, svd, lowrank, sparsify, q8, share, fp16, fpga) refuse to run with
    ``calib=None``; exact ones then use the generator. ``heldout`` (default 0.25) is the share of
    the samples kept out of fitting, on which the report's fidelity is measured. ``budget``: the
    accuracy budget the lossy passes share (default cosine >= 0.99 and top-1 agreement >= 0.99;
    ``"cosine=0.995,top1=0.98"``, a dict, a ``budget.Budget`` or ``"off"``); a miss is listed in
    ``report.problems``. ``progress``: called as ``progress(done, total, label)`` before each
    pass and at the end (``onnxslim_cnn.progress`` prints such lines). The input model is never
    modified.
    """
    merged: dict[str, dict[str, Any]] = {k: dict(v) for k, v in (options or {}).items()}
    for key, value in flat_options.items():
        if "__" not in key:
            raise UserError(f"unknown argument '{key}' (pass options are written PASS__OPTION, e.g. slim__cse=False)")
        pass_name, opt = key.split("__", 1)
        merged.setdefault(pass_name, {})[opt] = value
    from .pipeline import run_pipeline

    result = run_pipeline(model, passes, options=merged, calib=calib, input_shapes=input_shapes,
                          seed=seed, fidelity=fidelity, bench=bench, preprocess=preprocess, heldout=heldout,
                          budget=budget, progress=progress)
    return result.model, result.report
