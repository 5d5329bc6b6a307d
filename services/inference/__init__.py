"""inference: serves recommendations from the live ONNX model and hot-swaps new versions.

Nothing in this package imports PyTorch: its image carries onnxruntime and numpy only.
"""
