"""Export concerns: building the ONNX graph (graph), loading it with onnxruntime (runtime), the parity
gate (parity) and latency measurement (latency). Nothing here re-expresses the model's math."""
