"""Running the decode step: eagerly, compiled with torch.compile, and/or replayed from CUDA graphs.

Eager PyTorch spends most of a small-batch decode step launching kernels: the host's time per step
is many times the GPU's. A CUDA graph launches the whole step at once. A graph
replays fixed shapes at fixed addresses, hence:
- one graph per (batch bucket B, cache span L, sampled or all-greedy, with logprobs or not): the
  step runs over slots 0..B-1 (inactive ones padded in) and attends over cache positions 0..L-1;
  the logprob variants are captured when first needed, as are the graphs of the step's two halves
  (forward pass; sampling) that the engine runs apart while grammar rows decode;
- the step reads and writes only the slot state and cache tensors, allocated once (slots.py);
- graphs share one memory pool: they never run at the same time, and their outputs are copied into
  the slot state inside the graph, so nothing of one graph is read after another replays.

Compilation (optional, before capture) fuses the small elementwise kernels of the model's forward
(norms, rotary, residuals: thousands of launches a step otherwise); its mode must not use
CUDA graphs of its own ("max-autotune-no-cudagraphs" or "default"), since capture is done here.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager

import torch

from engine.models.glm4v.decoder import Glm4vDecoder
from serve_app.settings import ContinuousEngineSettings

logger = logging.getLogger("ray.serve")

GraphKey = tuple[int, int, bool, bool]  # (rows B, span L, any row sampled, any row wants logprobs)


class StepRunner:
    """Runs `decoder.step` at a (B, L, sampled, logprobs) key, choosing eager, compiled or graph replay;
    or its two halves apart (`run_forward`, then `run_sample`), each with graphs of its own."""

    def __init__(self, decoder: Glm4vDecoder, settings: ContinuousEngineSettings, device: torch.device) -> None:
        self.decoder = decoder
        self.state = decoder.state
        on_cuda = device.type == "cuda"
        self.use_graphs = settings.cuda_graphs and on_cuda
        self.compiled = settings.compile  # on a CPU too (slow to build; the tests use it to check the step)
        if settings.cuda_graphs and not on_cuda:
            logger.info("cuda_graphs applies to CUDA devices only; the decode step runs without on %s", device)
        if self.compiled:
            if self.use_graphs and "reduce-overhead" in settings.compile_mode:
                raise ValueError("compile_mode must not capture CUDA graphs itself when cuda_graphs is on")
            decoder.compile_forward(settings.compile_mode)
        # Graphs by ("step", B, L, sampled, logprobs), ("forward", B, L) or ("sample", B, sampled, logprobs).
        self._graphs: dict[tuple, torch.cuda.CUDAGraph] = {}
        self._pool = torch.cuda.graph_pool_handle() if self.use_graphs else None

    def run(self, key: GraphKey) -> None:
        """The whole decode step."""
        self._run(("step", *key))

    def run_forward(self, rows: int, span: int) -> None:
        """The step's forward pass alone (its logits left for `run_sample`)."""
        self._run(("forward", rows, span))

    def run_sample(self, rows: int, sampled: bool, logprobs: bool) -> None:
        """The step's sampling and state updates, from the logits `run_forward` left."""
        self._run(("sample", rows, sampled, logprobs))

    def _call(self, key: tuple):
        """The function a key runs (with its arguments bound)."""
        kind, rows, *rest = key
        active, decoder = self.state.active[:rows], self.decoder
        if kind == "step":
            span, sampled, logprobs = rest
            return lambda: decoder.step(active, decoder.span_ids[:span], sampled, logprobs)
        if kind == "forward":
            return lambda: decoder.step_forward(active, decoder.span_ids[:rest[0]])
        return lambda: decoder.step_sample(active, *rest)

    def _run(self, key: tuple) -> None:
        if self.use_graphs and key not in self._graphs:
            self._capture_or_disable(key)
        if self.use_graphs:
            self._graphs[key].replay()
        else:
            self._call(key)()

    def _capture_or_disable(self, key: tuple) -> None:
        try:
            self._graphs[key] = self.capture(key)
        except Exception:
            # Serving on without graphs beats failing every step from now on; loud, since it is slow.
            logger.exception("Capturing the decode step at %s failed: CUDA graphs are off from now on", key)
            self.use_graphs = False

    def capture(self, key: tuple) -> torch.cuda.CUDAGraph:
        """Warm `key`'s function up (compiling it if asked) and capture it in a CUDA graph.

        May be called while sequences are decoding: the warm-up steps really run, so they run
        with every row marked inactive (see `Glm4vDecoder.step`: then no live state changes).
        """
        rows = key[1]
        started = time.monotonic()
        call = self._call(key)
        with self._rows_paused(rows):
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(2):  # lazy init of cuBLAS workspaces, compilation, autotuning
                    call()
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            # thread_local: other threads of the replica (request preparation) may touch CUDA meanwhile.
            with torch.cuda.graph(graph, pool=self._pool, capture_error_mode="thread_local"):
                call()
        logger.info("Captured the decode step graph %s in %.1fs", key, time.monotonic() - started)
        return graph

    @contextmanager
    def _rows_paused(self, rows: int) -> Iterator[None]:
        """Mark slots 0..rows-1 inactive for the duration, on the stream, and restore them after."""
        saved = self.state.active[:rows].clone()
        self.state.active[:rows] = False
        try:
            yield
        finally:
            self.state.active[:rows].copy_(saved)

    def warmup(self, buckets: list[int], spans: list[int]) -> None:
        """Capture the graphs for every bucket and span given (both sampling variants), largest
        batch first: later captures reuse the shared pool's memory rather than growing it."""
        for span in spans:
            for rows in sorted(buckets, reverse=True):
                for sampled in (False, True):
                    if self.use_graphs and ("step", rows, span, sampled, False) not in self._graphs:
                        self._capture_or_disable(("step", rows, span, sampled, False))

    @property
    def captured(self) -> int:
        return len(self._graphs)
