"""Native sparse runtime (installed as ``onnxslim_cnn.runtime``).

An ONNX Runtime plugin execution provider (``OnnxSlimSparseEP``, built from runtime/src at
install time) that runs Gemm / MatMul / Conv nodes whose constant weight is mostly zeros with
sparse kernels, and leaves every other node to the CPU EP::

    from onnxslim_cnn import runtime
    sess = runtime.session("model.onnx", min_sparsity=0.6)
    runtime.claimed_nodes(sess)        # [{'name': 'fc6', 'op_type': 'Gemm'}, ...]

The model stays standard ONNX; without this package it runs (densely) in any ORT.
"""

from __future__ import annotations

import os

from onnxslim_cnn.errors import UserError

from .loader import (
    EP_NAME,
    SparseRuntimeUnavailable,
    check_onnxruntime,
    ensure_registered,
    library_path,
)

# Default claim threshold, from the bench (bench/results/sparse.json, one thread): FC layers beat
# ORT's dense MLAS from 50-60 % zeros at batch 1 but only from 70-80 % at batch 8/32, the
# ResNet-50 convs from 70-90 %. From 80 % every FC shape wins at every batch and most convs do;
# FC-heavy models run at batch 1 gain from min_sparsity=0.6 (docs/sparse_runtime.md).
DEFAULT_MIN_SPARSITY = 0.8
FORMATS = ("auto", "csr", "block1x4", "block4x1", "dense")
DENSE_FALLBACKS = ("auto", "off", "always")
# Gemm/MatMul weights may be held in up to this many formats, one per product width regime
# (1, 2..8, > 8 columns; docs/sparse_runtime.md "Options"). 1 by default: on random sparsity the
# picks differ only at 2..8 columns and 50-60 % zeros (4x1 strips instead of CSR), and measured
# through ORT (bench/results/sparse_formats.json) that second copy was faster on fc6 but slower
# on fc7 and the ddddocr Gemm, so it does not earn its memory by default.
DEFAULT_MAX_FORMATS = 1

__all__ = ["EP_NAME", "DEFAULT_MIN_SPARSITY", "DEFAULT_MAX_FORMATS", "FORMATS", "DENSE_FALLBACKS", "SparseRuntimeUnavailable", "available",
           "unavailable_reason", "library_path", "session", "claimed_nodes"]


def unavailable_reason() -> "str | None":
    """None when the EP can be used in this process, else the one-line reason."""
    try:
        ensure_registered()
    except SparseRuntimeUnavailable as exc:
        return str(exc)
    return None


def available() -> bool:
    return unavailable_reason() is None


def _model_input(model):
    """Path string or serialized bytes for InferenceSession (a ModelProto is serialized)."""
    if isinstance(model, (str, os.PathLike)):
        path = os.fspath(model)
        if not os.path.isfile(path):
            raise UserError(f"model not found: {path}")
        return path
    if isinstance(model, (bytes, bytearray)):
        return bytes(model)
    if hasattr(model, "SerializeToString"):
        return model.SerializeToString()
    raise UserError(f"model must be a path, bytes or onnx.ModelProto, not {type(model).__name__}")


def session(model, providers: "list[str] | None" = None, min_sparsity: "float | None" = None,
            sess_options=None, format: str = "auto", max_formats: int = DEFAULT_MAX_FORMATS,
            dense_fallback: str = "auto"):
    """An ``onnxruntime.InferenceSession`` with the sparse EP ahead of ``providers``.

    ``providers`` are execution-provider names that take the nodes the sparse EP leaves
    (default ``["CPUExecutionProvider"]``; each must be offered by ``ort.get_ep_devices()``).
    ``min_sparsity``: claim a Gemm/MatMul/Conv whose weight has at least this share of zeros
    (default DEFAULT_MIN_SPARSITY). ``format``: kernel storage, "auto" lets the kernels choose
    per layer. ``max_formats`` (1-3): with format "auto", how many formats a Gemm/MatMul weight
    may be held in so that products of 1, 2..8 and > 8 columns each run the cost model's pick
    (each extra format is another copy of the weight in that format; 1 = only the declared
    batch's). ``dense_fallback``: "auto" runs an x * W layer through ORT's own dense kernel (a
    private one-node session holding a dense copy of the weight) for the batch sizes where the
    cost model expects that to be faster than the layer's sparse format, "off" never, "always"
    for every batch size (tests). ``sess_options`` is copied into, never modified.
    """
    ort = check_onnxruntime()
    try:
        min_sparsity = DEFAULT_MIN_SPARSITY if min_sparsity is None else float(min_sparsity)
    except (TypeError, ValueError):
        raise UserError(f"min_sparsity must be a number in [0, 1], got {min_sparsity!r}") from None
    if isinstance(providers, str):  # a bare name would be read letter by letter
        raise UserError(f"providers must be a list of execution-provider names, got the string {providers!r}")
    if not 0.0 <= min_sparsity <= 1.0:
        raise SparseRuntimeUnavailable(f"min_sparsity must be in [0, 1], got {min_sparsity}")
    if isinstance(max_formats, bool) or max_formats not in (1, 2, 3):
        raise SparseRuntimeUnavailable(f"max_formats must be 1, 2 or 3, got {max_formats!r}")
    if dense_fallback not in DENSE_FALLBACKS:
        raise SparseRuntimeUnavailable(f"dense_fallback must be one of {', '.join(DENSE_FALLBACKS)}, "
                                       f"got {dense_fallback!r}")
    if format not in FORMATS:
        raise SparseRuntimeUnavailable(f"format must be one of {', '.join(FORMATS)}, got {format!r}")
    ours = ensure_registered()
    options = ort.SessionOptions()
    if sess_options is not None:  # the fields users set; add_provider_for_devices needs our own object
        for field in ("graph_optimization_level", "intra_op_num_threads", "inter_op_num_threads",
                      "execution_mode", "log_severity_level", "enable_cpu_mem_arena", "enable_mem_pattern",
                      "optimized_model_filepath", "enable_profiling", "profile_file_prefix"):
            setattr(options, field, getattr(sess_options, field))
    options.add_session_config_entry("session.record_ep_graph_assignment_info", "1")
    options.add_provider_for_devices(ours[:1], {"min_sparsity": repr(min_sparsity), "format": format,
                                                "max_formats": str(int(max_formats)),
                                                "dense_fallback": dense_fallback,
                                                "intra_op_threads": str(max(0, options.intra_op_num_threads))})
    devices = ort.get_ep_devices()
    for name in providers or ["CPUExecutionProvider"]:
        found = [d for d in devices if d.ep_name == name]
        if not found:
            offered = sorted({d.ep_name for d in devices})
            raise SparseRuntimeUnavailable(f"provider {name} is not offered by this onnxruntime ({', '.join(offered)})")
        options.add_provider_for_devices(found[:1], {})
    source = _model_input(model)
    try:
        return ort.InferenceSession(source, sess_options=options)
    except Exception as exc:  # ORT's own exception types (InvalidProtobuf, Fail, ...): a bad model
        label = source if isinstance(source, str) else "the model"
        raise UserError(f"onnxruntime cannot load {label}: {exc}") from exc


def claimed_nodes(sess) -> "list[dict]":
    """The nodes of ``sess`` that the sparse EP runs: [{'name', 'op_type'}] in graph order."""
    nodes = []
    for subgraph in sess.get_provider_graph_assignment_info():
        if subgraph.ep_name == EP_NAME:
            nodes.extend({"name": n.name, "op_type": n.op_type} for n in subgraph.get_nodes())
    return nodes
