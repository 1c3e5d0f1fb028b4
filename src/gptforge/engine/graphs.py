"""Decode steps at fixed shapes, captured once per shape as CUDA graphs and replayed.

A decode step of a small model is a few hundred tiny kernels; on a GPU the time goes to launching them from Python,
not to running them. A CUDA graph records the launches of one step once and replays them with a single call (the
gpt-fast / vLLM technique). A graph fixes every shape and address, so:

* rows are padded up to a batch bucket (1, 2, 4, ... max_batch_size) and the keys read per row up to a length
  bucket (128, 256, ... max_seq_len). Padding rows decode token 0 at position 0 of a slot no running request reads
  (free slots, or a request that finished in this step's prefill); padded keys are masked out. So a step computes
  what the eager step computes, over a few more keys;
* token ids and positions are copied into persistent input buffers before each replay, and the attention mask is
  built inside the step from the position buffer;
* the logits come out in the graph's own output tensor, copied before the next replay overwrites it.

Graphs are captured lazily, the first time a (batch, length) bucket is needed, after two warm-up runs on a side
stream (lazy cuBLAS/attention initialisation must not happen inside a capture). All graphs share one memory pool:
they never run concurrently, and each keeps its output alive. At most |batch buckets| x |length buckets| graphs exist,
each holding only its intermediate activations.

`capture=False` runs the very same fixed-shape steps eagerly: that is what the CPU tests check against the eager
engine, and what remains to be wrong on a GPU is only the capture itself.
"""

from __future__ import annotations

import torch

from gptforge.engine.cache import SlotKVCache
from gptforge.model.gpt import GPT

MIN_LENGTH_BUCKET = 128


def buckets(limit: int, start: int) -> list[int]:
    """start, 2*start, 4*start, ... below limit, then limit itself."""
    out, b = [], start
    while b < limit:
        out.append(b)
        b *= 2
    return out + [limit]


class GraphDecoder:
    def __init__(self, model: GPT, cache: SlotKVCache, capture: bool) -> None:
        if capture and cache.device.type != "cuda":
            raise ValueError(f"CUDA graphs need a CUDA device; the engine runs on {cache.device}")
        self.model, self.cache, self.capture = model, cache, capture
        self.batch_buckets = buckets(cache.max_slots, 1)
        self.length_buckets = buckets(cache.max_len, min(MIN_LENGTH_BUCKET, cache.max_len))
        self.tokens = torch.zeros(cache.max_slots, 1, dtype=torch.long, device=cache.device)
        self.positions = torch.zeros(cache.max_slots, dtype=torch.long, device=cache.device)
        self._graphs: dict[tuple[int, int], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self._pool = None

    @property
    def captured(self) -> list[tuple[int, int]]:
        """The (batch, length) buckets captured so far."""
        return sorted(self._graphs)

    def _step(self, B: int, S: int) -> torch.Tensor:
        view = self.cache.decode_static(self.positions[:B], S)
        return self.model(self.tokens[:B], cache=view)[0][:, -1]  # (B, V)

    def _capture(self, B: int, S: int) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        # The warm-up runs write the same keys/values the replay will write (same inputs), so they change nothing.
        side = torch.cuda.Stream(self.cache.device)
        side.wait_stream(torch.cuda.current_stream(self.cache.device))
        with torch.cuda.stream(side):
            for _ in range(2):
                self._step(B, S)
        torch.cuda.current_stream(self.cache.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        # thread_local: the engine captures on its own thread while the HTTP threads go on (they touch no CUDA).
        with torch.cuda.graph(graph, pool=self._pool, capture_error_mode="thread_local"):
            out = self._step(B, S)
        if self._pool is None:
            self._pool = graph.pool()
        self._graphs[(B, S)] = (graph, out)
        return graph, out

    def __call__(self, tokens: list[int], positions: list[int]) -> torch.Tensor:
        """Logits (n, V) for row i's token tokens[i] at positions[i], rows 0..n-1 of the cache."""
        n = len(tokens)
        B = next(b for b in self.batch_buckets if b >= n)
        S = next(s for s in self.length_buckets if s > max(positions))
        pad = [0] * (B - n)  # padding rows: token 0 at position 0 of a slot nobody reads this step
        host = torch.tensor([tokens + pad, positions + pad], dtype=torch.long)
        self.tokens[:B, 0].copy_(host[0], non_blocking=True)
        self.positions[:B].copy_(host[1], non_blocking=True)
        if not self.capture:
            return self._step(B, S)[:n]
        graph, out = self._graphs.get((B, S)) or self._capture(B, S)
        graph.replay()
        return out[:n].clone()  # the next replay overwrites `out`
