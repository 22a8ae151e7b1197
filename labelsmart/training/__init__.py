"""Training: data and augmentation, losses, the network, one round, ONNX export and the background trainer.

Nothing here is imported by the UI or the predictor at start-up: torch loads only where a round or an export runs.
"""
