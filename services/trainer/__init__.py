"""trainer: learns a two-tower model from the event stream as it arrives and publishes ONNX versions."""
