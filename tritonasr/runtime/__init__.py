"""How the models run: the Triton Python-backend adapters, ONNX Runtime sessions, the in-process
pipeline, API-key access and memory release inside the model processes."""
