"""Recognition: one recording or live stream -> segments. The offline and streaming pipelines, the
ASR engines, the speaker stage, stream admission, and the leaf-model calls they make; model
execution is injected, so the same logic runs in Triton and in-process."""
