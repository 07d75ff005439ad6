"""Runtime stage: the inference backends (torch, ONNX Runtime, OpenVINO) and the native float16 kernels."""
