"""Images from a personalized model: the torch generator and the ONNX Runtime engine."""
