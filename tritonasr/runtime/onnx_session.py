"""Run an ONNX graph over a list of requests as few batched ONNX Runtime calls as is sensible."""
from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import onnxruntime as ort

# A batch of ragged requests is split where padding would cost more than this share of the
# real frames: on a CPU, padded frames are paid for in full.
MAX_PADDING_WASTE = 0.25


def instance_providers(args: dict) -> list:
    """ONNX Runtime providers for a Triton Python-backend instance: its config's instance kind
    decides (a KIND_GPU instance runs on its own device), not what happens to be installed."""
    providers: list = ["CPUExecutionProvider"]
    if args.get("model_instance_kind") == "GPU":
        # No TF32: it moves the front ends' DFT matmuls by up to 0.9 (log-mel), and the leaf
        # models are checked in float32.
        device = {"device_id": int(args["model_instance_device_id"]), "use_tf32": 0}
        providers.insert(0, ("CUDAExecutionProvider", device))
    return providers


class OnnxModel:
    def __init__(self, path: Path, intra_op_threads: int = 0, ragged_inputs: list[str] = (),
                 providers: list[str] | None = None):
        options = ort.SessionOptions()
        options.intra_op_num_threads = intra_op_threads
        options.inter_op_num_threads = 1
        available = ort.get_available_providers()
        providers = providers or [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]
        self.session = ort.InferenceSession(str(path), options, providers=providers)
        self.input_names = [i.name for i in self.session.get_inputs()]
        self._input_ranks = {i.name: len(i.shape) for i in self.session.get_inputs()}
        self.ragged_inputs = list(ragged_inputs)

    def run(self, feeds: dict[str, np.ndarray], outputs: list[str]) -> dict[str, np.ndarray]:
        return dict(zip(outputs, self.session.run(outputs, feeds)))

    def run_batch(self, requests: list[dict[str, np.ndarray]], outputs: list[str]) -> list[dict[str, np.ndarray]]:
        """Each request's tensors have a leading batch dimension. Requests whose tensors agree in
        shape (ragged inputs: after padding their axis 1) run together; results come back per
        request, in order. Outputs of padded requests keep the padded length: the graph's own
        length outputs say how much of them is valid."""
        results: list[dict[str, np.ndarray] | None] = [None] * len(requests)
        for group in self._groups(requests):
            feeds = {}
            for name in self.input_names:
                parts = [requests[i][name] for i in group]
                if name in self.ragged_inputs:
                    parts = _pad_axis1(parts)
                feeds[name] = self._graph_rank(name, np.concatenate(parts, axis=0))
            out = self.run(feeds, outputs)
            offset = 0
            for i in group:
                n = requests[i][self.input_names[0]].shape[0]
                results[i] = {k: v[offset: offset + n] for k, v in out.items()}
                offset += n
        return results

    def _graph_rank(self, name: str, value: np.ndarray) -> np.ndarray:
        """Per-request scalars arrive as [B, 1] (Triton dims [1]); the graph takes [B]."""
        if value.ndim == self._input_ranks[name] + 1 and value.shape[1] == 1:
            return value.reshape(value.shape[0], *value.shape[2:])
        return value

    def _groups(self, requests: list[dict[str, np.ndarray]]) -> list[list[int]]:
        def fixed_shapes(r):
            return tuple((n, r[n].shape[2:] if n in self.ragged_inputs else r[n].shape[1:]) for n in self.input_names)

        by_shape: dict[tuple, list[int]] = {}
        for i, r in enumerate(requests):
            by_shape.setdefault(fixed_shapes(r), []).append(i)
        if not self.ragged_inputs:
            return list(by_shape.values())
        key = self.ragged_inputs[0]
        groups = []
        for members in by_shape.values():
            members.sort(key=lambda i: -requests[i][key].shape[1])
            group, frames = [], 0
            for i in members:
                length = requests[i][key].shape[1]
                longest = requests[group[0]][key].shape[1] if group else length
                if group and longest * (len(group) + 1) > (1 + MAX_PADDING_WASTE) * (frames + length):
                    groups.append(group)
                    group, frames = [], 0
                group.append(i)
                frames += length
            groups.append(group)
        return groups


def _pad_axis1(parts: list[np.ndarray]) -> list[np.ndarray]:
    longest = max(p.shape[1] for p in parts)
    return [p if p.shape[1] == longest else
            np.pad(p, [(0, 0), (0, longest - p.shape[1])] + [(0, 0)] * (p.ndim - 2)) for p in parts]


class LoopBatcher:
    """An `OnnxModel` awaited by many tasks of one event loop: the calls made in one turn of the
    loop run as one `run_batch`, as Triton's dynamic batcher would batch them, but without a
    request through the server. For small graphs called per chunk (the streams' VAD steps),
    where that request costs more CPU than the graph."""

    def __init__(self, model: OnnxModel):
        self.model = model
        self._pending: list[tuple[dict[str, np.ndarray], list[str], asyncio.Future]] = []

    async def infer(self, inputs: dict[str, np.ndarray], outputs: list[str]) -> list[np.ndarray]:
        future = asyncio.get_running_loop().create_future()
        self._pending.append((inputs, outputs, future))
        if len(self._pending) == 1:  # the first call of this turn: run them all once it is over
            asyncio.get_running_loop().call_soon(self._run)
        return await future

    def _run(self) -> None:
        pending, self._pending = self._pending, []
        outputs = pending[0][1]
        try:
            if any(names != outputs for _, names, _ in pending):
                raise ValueError("calls batched together must ask for the same outputs")
            results = self.model.run_batch([inputs for inputs, _, _ in pending], outputs)
        except Exception as exc:  # every call of the batch is told
            for _, _, future in pending:
                if not future.done():
                    future.set_exception(exc)
            return
        for (_, _, future), result in zip(pending, results):
            if not future.done():  # (a caller that was cancelled meanwhile)
                future.set_result([result[name] for name in outputs])
