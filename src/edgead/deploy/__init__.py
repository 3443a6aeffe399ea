"""Deployment: ONNX export, INT8 quantization, runtimes, device budgets, pruning, IMX500."""
