"""fpga: lowering to the fixed-point IR (``onnxslim_cnn.fixed_point``), C++ emission and
resource estimates."""

from .fpga import OUTPUT_NAMES, FpgaLowering, FpgaPass, lower_model, output_files
from .resources import format_table

__all__ = ["OUTPUT_NAMES", "FpgaLowering", "FpgaPass", "format_table", "lower_model", "output_files"]
