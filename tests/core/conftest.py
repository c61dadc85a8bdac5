"""Fixtures the core tests share."""

import onnx
import pytest

from graphs import conv_bn_model


@pytest.fixture
def model_path(tmp_path):
    """The small Conv+BN+Relu model of tests/graphs.py, saved as in.onnx."""
    p = tmp_path / "in.onnx"
    onnx.save(conv_bn_model(), p)
    return p
