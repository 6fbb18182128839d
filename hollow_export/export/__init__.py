"""Host-side export: ONNX graphs with ORT-friendly op twins, an on-device training backend, the training
graph's memory levers (query-chunked attention, softmax recompute, the frozen-weights file), the bundle build."""
