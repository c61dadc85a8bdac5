"""q8: int8 QDQ through ONNX Runtime's quantization tool, with equalization, bias correction,
mixed precision, MSE ranges and the int8 weight refit around it."""

from .q8 import Q8Pass, is_quantized

__all__ = ["Q8Pass", "is_quantized"]
