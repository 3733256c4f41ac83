"""inference: ONNX models over gRPC (Open Inference Protocol v2 + feature-aware Predict)."""
