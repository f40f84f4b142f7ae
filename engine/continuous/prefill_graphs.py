"""CUDA graphs of continued prompt chunks: a chat turn's new tokens after its cached prefix, or a
chunked prefill's later chunk.

Such a chunk is small next to the prompt behind it (a few hundred new tokens after thousands
cached), and its pass through the compiled layers is bound by the host: each layer's call costs
guards, the inductor wrapper and about fifteen launches, more host time than GPU time. A graph
replays the whole pass at once. Graphs replay fixed shapes at fixed addresses, hence:
- one graph per (width bucket, context bucket): the chunk's columns are padded to the width bucket
  (pad columns write to the scratch block; the attention kernel takes the true width and end from
  `bounds` on the device, and zeroes pad rows), and its context blocks to the context bucket with
  the scratch block (read by nothing: keys past the end do not count);
- inputs are copied into buffers allocated once at the largest sizes, and the logits out of the
  graph right after its replay (graphs share one memory pool);
- a key is captured the first time it is needed (a fraction of a second, once); chunks wider than
  the largest bucket, or with more context than the largest, run as before.
"""

from __future__ import annotations

import bisect
import logging
import time

import torch

from engine.continuous.blocks import SCRATCH_BLOCK
from engine.models.glm4v.decoder import Glm4vDecoder, PromptChunk, PromptInputs

logger = logging.getLogger("ray.serve")

# Widths in steps of about 1.5x: padding costs at most a third more GEMM work on a chunk's tokens.
WIDTH_BUCKETS = (16, 32, 64, 128, 192, 256, 384, 512, 768, 1024, 1536, 2048, 3072, 4096)


def context_buckets(max_blocks: int) -> list[int]:
    """Powers of two from 2 (a size of 1 is a case torch.compile specialises) up to `max_blocks`, which
    ends the list."""
    buckets, size = [], 2
    while size < max_blocks:
        buckets.append(size)
        size *= 2
    return [*buckets, max(max_blocks, 2)]


def bucket_for(size: int, buckets: list[int] | tuple[int, ...]) -> int | None:
    """The smallest bucket that holds `size`; None: none does."""
    index = bisect.bisect_left(buckets, size)
    return buckets[index] if index < len(buckets) else None


class ContinuedChunkGraphs:
    """Runs `decoder.run_columns` for one-row continued chunks from CUDA graphs (see the module docstring)."""

    def __init__(self, decoder: Glm4vDecoder, max_width: int, max_blocks: int, device: torch.device) -> None:
        self.decoder = decoder
        self.widths = [w for w in WIDTH_BUCKETS if w < max_width] + [max_width]
        self.contexts = context_buckets(max_blocks)
        width, blocks = self.widths[-1], self.contexts[-1]
        hidden_size = decoder.model.config.get_text_config(decoder=True).hidden_size
        # The compiled layers guard on what their inputs are: inference tensors, as the engine thread
        # makes every other input; and for one row, kept without its row dimension, so that the graphs'
        # [1, ...] views of their first columns have the strides of contiguous tensors of their sizes.
        with torch.inference_mode():
            self.hidden = torch.zeros((width, hidden_size), dtype=decoder.model.dtype, device=device)
            self.positions = torch.zeros((3, width), dtype=torch.long, device=device)
            self.write_blocks = torch.full((width,), SCRATCH_BLOCK, dtype=torch.long, device=device)
            self.write_offsets = torch.zeros((width,), dtype=torch.long, device=device)
            self.context = torch.full((blocks,), SCRATCH_BLOCK, dtype=torch.long, device=device)
            self.bounds = torch.zeros((2, 2), dtype=torch.int32, device=device)
            self.last = torch.zeros((1,), dtype=torch.long, device=device)
        self._graphs: dict[tuple[int, int], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self._pool = None  # the graphs' shared memory pool, made with the first
        self.enabled = True

    def key(self, chunk: PromptChunk) -> tuple[int, int] | None:
        """The (width, context blocks) bucket `chunk` runs at; None: it runs without a graph."""
        if not self.enabled or chunk.context_blocks is None or chunk.write_blocks.shape[0] != 1:
            return None
        width, blocks = bucket_for(chunk.width, self.widths), bucket_for(chunk.context_blocks.shape[1], self.contexts)
        return None if width is None or blocks is None else (width, blocks)

    def run(self, key: tuple[int, int], prompts: PromptInputs, chunk: PromptChunk, last: torch.Tensor) -> torch.Tensor:
        """`decoder.prefill(prompts, chunk, last)` for a chunk `key(chunk)` gave `key`: its logits [1, vocab]."""
        self.stage(key, prompts, chunk, last)
        if key not in self._graphs:
            self._capture(key)
        graph, logits = self._graphs[key]
        graph.replay()
        return logits.clone()

    def stage(self, key: tuple[int, int], prompts: PromptInputs, chunk: PromptChunk, last: torch.Tensor) -> None:
        """Copy the chunk into the buffers, padded to `key`."""
        width, blocks = chunk.width, chunk.context_blocks.shape[1]
        columns = slice(chunk.start, chunk.start + width)
        self.hidden[:width].copy_(prompts.hidden[0, columns])
        self.positions[:, :width].copy_(prompts.positions[:, 0, columns])
        self.write_blocks[:width].copy_(chunk.write_blocks[0])
        self.write_blocks[width:key[0]].fill_(SCRATCH_BLOCK)
        self.write_offsets[:width].copy_(chunk.write_offsets[0])
        self.context[:blocks].copy_(chunk.context_blocks[0])
        self.context[blocks:key[1]].fill_(SCRATCH_BLOCK)
        self.bounds.copy_(chunk.context_bounds)
        self.last.copy_(last)

    def padded_pass(self, key: tuple[int, int]) -> torch.Tensor:
        """The pass a graph of `key` holds, on what `stage` put in the buffers: their first columns and
        blocks, through the decoder."""
        width, blocks = key
        chunk = PromptChunk(0, width, self.write_blocks[:width].view(1, width),
                            self.write_offsets[:width].view(1, width), self.context[:blocks].view(1, blocks), self.bounds)
        return self.decoder.run_columns(self.hidden[:width].view(1, width, -1),
                                        self.positions[:, :width].view(3, 1, width), chunk, self.last)

    def _capture(self, key: tuple[int, int]) -> None:
        """Warm the pass up on a side stream (it really runs: on the chunk now in the buffers, whose keys
        and values it writes, as the replay will again) and capture it."""
        started = time.monotonic()
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):  # lazy initialisation of cuBLAS workspaces and kernel choices
                self.padded_pass(key)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        # thread_local: other threads of the replica (request preparation) may touch CUDA meanwhile.
        with torch.cuda.graph(graph, pool=self._pool, capture_error_mode="thread_local"):
            logits = self.padded_pass(key)
        self._graphs[key] = (graph, logits)
        logger.info("Captured the continued-prompt graph %s in %.2fs", key, time.monotonic() - started)

    @property
    def captured(self) -> int:
        return len(self._graphs)
