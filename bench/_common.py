"""What every bench script shares: the machine description and the JSON output."""

from __future__ import annotations

import json
import os
import platform

import onnx
import onnxruntime as ort

import onnxslim_cnn


def machine(**extra) -> dict:
    """The facts a reader needs to compare runs: CPU, cores, library versions, ORT threads."""
    return {"platform": platform.platform(), "cpu": platform.processor() or platform.machine(),
            "cores": os.cpu_count(), "python": platform.python_version(), "onnx": onnx.__version__,
            "onnxruntime": ort.__version__, "onnxslim_cnn": onnxslim_cnn.__version__, "ort_threads": 1, **extra}


def emit(doc: dict, out: "str | None") -> None:
    """Print ``doc`` as JSON (numpy scalars as numbers) and also write it to ``out`` when given."""
    text = json.dumps(doc, indent=2, default=lambda o: o.item() if hasattr(o, "item") else str(o))
    print(text)
    if out:
        os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
        with open(out, "w") as f:
            f.write(text)
