"""Host-side export: ONNX graphs with ORT-friendly op twins, an on-device training backend, the bundle build."""
