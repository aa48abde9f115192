"""Int8 quantization: the NumPy reference (the specification) and dispatch to the kernels."""
