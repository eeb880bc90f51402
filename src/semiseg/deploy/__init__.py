"""Deployment side: what runs where the model is used (ONNX Runtime, no torch) and the files predict writes."""
