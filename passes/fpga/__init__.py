"""fpga: lowering to the fixed-point IR (``onnxslim_cnn.fixed_point``), C++ emission and
resource estimates."""

from .fpga import FpgaLowering, FpgaPass, lower_model, output_files

__all__ = ["FpgaLowering", "FpgaPass", "lower_model", "output_files"]
