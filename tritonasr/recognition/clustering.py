"""Anonymous speaker labels within one file or stream: online clustering of segment embeddings.

Online (each segment labelled when it arrives, never relabelled) because a live stream has
already sent its earlier segments; files use the same algorithm, so a recording gets the same
labels whether it is uploaded whole or streamed.
"""
from __future__ import annotations

import string

import numpy as np


def label_name(index: int) -> str:
    """0 -> "A", 25 -> "Z", 26 -> "AA", … (spreadsheet-column style)."""
    name = ""
    index += 1
    while index:
        index, rest = divmod(index - 1, 26)
        name = string.ascii_uppercase[rest] + name
    return name


class OnlineClusters:
    """Leader clustering on cosine similarity: a segment joins the most similar cluster when
    the similarity to its centroid reaches `threshold`, else it starts a new one. Centroids
    are the normalised sums of their members, so a cluster follows its speaker's average."""

    def __init__(self, threshold: float):
        self.threshold = threshold
        self._sums: list[np.ndarray] = []

    def __len__(self) -> int:
        return len(self._sums)

    def assign(self, embedding: np.ndarray) -> tuple[str, float]:
        """The label of `embedding` (unit length) and its similarity to that cluster before it
        joined (1.0 for a new cluster's first member)."""
        if self._sums:
            centroids = np.stack(self._sums)
            centroids /= np.linalg.norm(centroids, axis=1, keepdims=True)
            scores = centroids @ embedding
            best = int(np.argmax(scores))
            if scores[best] >= self.threshold:
                self._sums[best] = self._sums[best] + embedding
                return label_name(best), float(scores[best])
        self._sums.append(np.array(embedding, dtype=np.float64))
        return label_name(len(self._sums) - 1), 1.0
