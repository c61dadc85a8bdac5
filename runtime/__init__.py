"""Native runtime support (installed as ``onnxslim_cnn.runtime``).

Reserved for the sparse-GEMM ONNX Runtime execution provider and its loader (a separate issue);
nothing here yet, and nothing in the rest of the package depends on it.
"""
