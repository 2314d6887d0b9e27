"""The model repository: the shipped templates and the exported models (layout), a repository per
deployment target (build), its validation (check), TensorRT plans (plans)."""
