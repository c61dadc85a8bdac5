"""Built-in passes (installed as ``onnxslim_cnn.passes``); importing this registers them."""

from .slim import SlimPass

__all__ = ["SlimPass"]
