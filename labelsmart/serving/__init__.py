"""Serving: exported ONNX models under ONNX Runtime, the UI's predictor (hot swap, cache) and active learning.

Nothing here imports torch.
"""
