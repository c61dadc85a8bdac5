"""Per-layer sensitivity search of ``sparsify`` (``mode=sensitivity``).

For each layer on its own, the largest ratio whose pruning (plus the refit when ``refit=true``)
keeps the model's outputs within ``budget`` of the dense model's on the calibration inputs:
relative L2 error ``||y - y_dense|| / ||y_dense||`` over all outputs. Binary search on the ratio
in ``[0, max_ratio]`` (``search_steps`` halvings), assuming the error grows with the ratio, as
magnitude pruning makes it do in practice. This is the sensitivity analysis of Han et al.
(prune each layer as far as it tolerates), measured instead of read off a plot.

Layers are searched one at a time against the dense model; pruning them all together adds
their errors, so the model's final error is larger than ``budget`` (the pipeline's fidelity
line reports it).
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import onnx
from onnx import numpy_helper

from onnxslim_cnn.analysis.compare import outputs


def search_ratios(base: onnx.ModelProto, calib, layers: list, budget: float, max_ratio: float, steps: int,
                  prune: Callable) -> dict[str, tuple[float, float]]:
    """``{node name: (ratio, error at that ratio)}``; ``prune(layer, ratio)`` returns the new weight.

    ``base`` is the model the pass works on, with every layer weight as an initializer named
    like ``layer.weight.name``.
    """
    index = {t.name: i for i, t in enumerate(base.graph.initializer)}
    work = onnx.ModelProto()
    work.CopyFrom(base)
    dense = _all_outputs(work, calib)
    norm = float(np.linalg.norm(dense)) or 1.0
    found = {}
    for layer in layers:
        i = index.get(layer.weight.name)
        if i is None:
            continue
        original = onnx.TensorProto()
        original.CopyFrom(work.graph.initializer[i])

        def error(ratio: float, layer=layer, i=i) -> float:
            new = prune(layer, ratio)
            work.graph.initializer[i].CopyFrom(numpy_helper.from_array(new, layer.weight.name))
            return float(np.linalg.norm(_all_outputs(work, calib) - dense)) / norm

        lo, lo_err = 0.0, 0.0
        hi_err = error(max_ratio)
        if hi_err <= budget:
            lo, lo_err = max_ratio, hi_err
        else:
            hi = max_ratio
            for _ in range(steps):
                mid = (lo + hi) / 2
                e = error(mid)
                if e <= budget:
                    lo, lo_err = mid, e
                else:
                    hi = mid
        work.graph.initializer[i].CopyFrom(original)
        found[layer.node.name] = (round(lo, 6), lo_err)
    return found


def _all_outputs(model: onnx.ModelProto, calib) -> np.ndarray:
    """Every output on ``calib``, one after the other, as one float64 vector."""
    return np.concatenate(outputs(model, calib))
