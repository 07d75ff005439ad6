"""Model stage: weights (real or stand-in), ONNX export, INT8 quantization, the precise-norm rewrite."""
