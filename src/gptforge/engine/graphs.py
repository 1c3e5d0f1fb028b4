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

Graphs are captured lazily, the first time a (batch, length) bucket is needed, after two warm-up runs (lazy
cuBLAS/attention initialisation must not happen inside a capture). All graphs share one memory pool: they never run
concurrently, and each keeps its output alive. At most |batch buckets| x |length buckets| graphs exist, each holding
only its intermediate activations.

Device and stream are explicit, never "current". `torch.cuda.graph` without `stream=` captures on a class-wide stream
created on whatever device is current the first time, and capture records only work on the current stream of the
current device. The engine captures on its own thread, whose current device is 0, so an engine on cuda:1 would record
an *empty* graph (torch only warns) and replay stale logits forever. So the decoder owns one stream on the cache's
device, warms up and captures on it inside `torch.cuda.device(...)`, and passes that same stream to every capture
sharing the pool (as torch's docs ask). An empty capture is treated as a failed one.

A failed capture (an op that cannot be captured, an attention backend that syncs...) must not fail every request:
the first failure is reported once (a RuntimeWarning, also kept in `capture_error`), no further capture is tried, and
buckets without a graph run the very same fixed-shape steps eagerly. Graphs captured before the failure stay in use:
each passed its own capture, and freeing one would need a device sync to be sure no replay is still in flight.

`capture=False` runs the very same fixed-shape steps eagerly: that is what the CPU tests check against the eager
engine, and what remains to be wrong on a GPU is only the capture itself.
"""

from __future__ import annotations

import warnings

import torch

from gptforge.engine.cache import SlotKVCache
from gptforge.model.gpt import GPT

MIN_LENGTH_BUCKET = 128
# torch's own check (CUDAGraph::capture_end warns and carries on): a graph that recorded no kernel replays nothing.
EMPTY_GRAPH_WARNING = "The CUDA Graph is empty"


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
        # Where the KV cache really lives (a tensor's device always has an index; cache.device may be bare "cuda").
        self.device = cache.k[0].device
        self.batch_buckets = buckets(cache.max_slots, 1)
        self.length_buckets = buckets(cache.max_len, min(MIN_LENGTH_BUCKET, cache.max_len))
        self.tokens = torch.zeros(cache.max_slots, 1, dtype=torch.long, device=self.device)
        self.positions = torch.zeros(cache.max_slots, dtype=torch.long, device=self.device)
        self._graphs: dict[tuple[int, int], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self._pool = None
        # One stream for every warm-up and capture: the pool is shared, and torch asks for the same stream then.
        self._stream = torch.cuda.Stream(self.device) if capture else None
        self.capture_error: str | None = None  # why capture was turned off, if it was

    @property
    def captured(self) -> list[tuple[int, int]]:
        """The (batch, length) buckets captured so far."""
        return sorted(self._graphs)

    def _step(self, B: int, S: int) -> torch.Tensor:
        view = self.cache.decode_static(self.positions[:B], S)
        return self.model(self.tokens[:B], cache=view)[0][:, -1]  # (B, V)

    def _capture(self, B: int, S: int) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        stream = self._stream
        if stream is None:  # capture was switched on after construction (tests do; nothing else should)
            raise RuntimeError("no capture stream: construct the decoder with capture=True")
        # The current device of this thread may be another GPU: every allocation, sync and capture below must
        # happen on the cache's device.
        with torch.cuda.device(self.device):
            current = torch.cuda.current_stream(self.device)
            # The warm-up runs write the same keys/values the replay will write (same inputs), so they change nothing.
            stream.wait_stream(current)  # the input buffers were filled on `current`
            with torch.cuda.stream(stream):
                for _ in range(2):
                    self._step(B, S)
            current.wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            caught: list[warnings.WarningMessage] = []
            try:
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always")
                    # thread_local: the engine captures on its own thread while HTTP threads go on (no CUDA there).
                    with torch.cuda.graph(graph, pool=self._pool, stream=stream, capture_error_mode="thread_local"):
                        out = self._step(B, S)
            finally:
                # torch.cuda.graph leaves the capture stream current if capture_end raises; put ours back.
                torch.cuda.set_stream(current)
                # catch_warnings is process-wide: hand back what it caught (from any thread) but torch's empty-graph
                # warning, which is turned into an error below.
                for w in caught:
                    if EMPTY_GRAPH_WARNING not in str(w.message):
                        warnings.warn_explicit(w.message, w.category, w.filename, w.lineno, source=w.source)
        empty = [str(w.message) for w in caught if EMPTY_GRAPH_WARNING in str(w.message)]
        if empty:
            raise RuntimeError(f"the captured graph recorded no work (torch: {empty[0]})")
        if self._pool is None:
            self._pool = graph.pool()
        self._graphs[(B, S)] = (graph, out)
        return graph, out

    def _capture_or_none(self, B: int, S: int) -> tuple[torch.cuda.CUDAGraph, torch.Tensor] | None:
        try:
            return self._capture(B, S)
        except Exception as e:  # any capture failure: serve on without graphs rather than fail every request
            err = f"{type(e).__name__}: {e}"
            if e.__context__ is not None:  # an op failing mid-capture surfaces as capture_end's error; name the op's
                err += f" (after {type(e.__context__).__name__}: {e.__context__})"
            self.capture, self.capture_error = False, err
            warnings.warn(
                f"CUDA graph capture of the decode step (batch {B}, {S} keys) on {self.device} failed: {err}. "
                "Decoding continues without new CUDA graphs (the same fixed-shape steps, run eagerly).",
                RuntimeWarning,
                stacklevel=3,
            )
            return None

    def __call__(self, tokens: list[int], positions: list[int]) -> torch.Tensor:
        """Logits (n, V) for row i's token tokens[i] at positions[i], rows 0..n-1 of the cache."""
        n = len(tokens)
        B = next(b for b in self.batch_buckets if b >= n)
        S = next(s for s in self.length_buckets if s > max(positions))
        pad = [0] * (B - n)  # padding rows: token 0 at position 0 of a slot nobody reads this step
        host = torch.tensor([tokens + pad, positions + pad], dtype=torch.long)
        self.tokens[:B, 0].copy_(host[0], non_blocking=True)
        self.positions[:B].copy_(host[1], non_blocking=True)
        entry = self._graphs.get((B, S))
        if entry is None and self.capture:
            entry = self._capture_or_none(B, S)
        if entry is None:
            return self._step(B, S)[:n]
        graph, out = entry
        graph.replay()  # launches on the current stream of the capture device (CUDAGraph::replay guards the device)
        return out[:n].clone()  # the next replay overwrites `out`
