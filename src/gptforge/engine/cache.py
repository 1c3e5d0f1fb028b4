"""The engine's KV cache: one preallocated slot per running request, compacted so running requests fill slots 0..n-1.

Layout per layer: (max_slots, K, max_len, D) keys and values, allocated once at start-up, so serving never
allocates cache memory per request and memory use is known up front (`nbytes`). Requests of different lengths share
a decode step through per-row positions and a mask (key j is visible to row i when j <= position_i): that is what lets
requests join and leave the batch at every step (continuous batching) instead of waiting for the longest one.

Keeping the running rows contiguous means a step reads `k[:B, :, :S]`, a view, never a gather. When a request leaves,
the last row moves into its slot (one copy of that row's filled prefix), which is cheaper than gathering every step.

The model uses a cache only through prepare / update / advance (see `gptforge.model.gpt.KVCache`), so the two
views below are all the model ever sees of this class.
"""

from __future__ import annotations

import torch

from gptforge.model.gpt import GPTConfig


class SlotKVCache:
    def __init__(self, config: GPTConfig, max_slots: int, max_len: int, device, dtype) -> None:
        shape = (max_slots, config.kv_heads, max_len, config.head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layer)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layer)]
        self.max_slots, self.max_len, self.device = max_slots, max_len, device

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)

    def prefill(self, row0: int, n_rows: int, T: int) -> _PrefillView:
        """A view writing positions 0..T-1 of rows row0..row0+n_rows-1 (prompts right-padded to T)."""
        if row0 + n_rows > self.max_slots or T > self.max_len:
            raise ValueError(f"prefill of rows {row0}+{n_rows}, {T} tokens exceeds the cache")
        return _PrefillView(self, row0, n_rows)

    def decode(self, positions: list[int]) -> _DecodeView:
        """A view for one new token per row 0..B-1, row i at absolute position positions[i]."""
        if len(positions) > self.max_slots or max(positions) >= self.max_len:
            raise ValueError(f"decode at positions up to {max(positions)} exceeds the cache")
        return _DecodeView(self, torch.tensor(positions, device=self.device), max(positions) + 1)

    def decode_static(self, positions: torch.Tensor, S: int) -> _DecodeView:
        """The same step with shapes fixed up front: positions is a (B,) device tensor whose *values* may change
        between calls (a CUDA graph replays with new ones), and keys 0..S-1 are read whatever the positions are,
        S >= every position + 1. Nothing here reads a value on the host, so the step can be captured."""
        if positions.numel() > self.max_slots or S > self.max_len:
            raise ValueError(f"static decode of {positions.numel()} rows x {S} keys exceeds the cache")
        return _DecodeView(self, positions, S)

    def move(self, src: int, dst: int, length: int) -> None:
        """Copy the first `length` positions of slot src into slot dst (compaction after a request leaves)."""
        for t in self.k + self.v:
            t[dst, :, :length] = t[src, :, :length]


class _PrefillView:
    """Right-padded prompts from position 0: a plain causal mask is right for every real token (a token never sees
    the padding after it); padded positions get junk keys that decode masks out and later overwrites."""

    def __init__(self, cache: SlotKVCache, row0: int, n_rows: int) -> None:
        self.cache, self.rows = cache, slice(row0, row0 + n_rows)
        self.T = 0

    def prepare(self, T: int, device):
        self.T = T
        return torch.arange(T, device=device), None, T

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        self.cache.k[layer][self.rows, :, : self.T] = k
        self.cache.v[layer][self.rows, :, : self.T] = v
        return k, v

    def advance(self, T: int) -> None:
        pass


class _DecodeView:
    def __init__(self, cache: SlotKVCache, pos: torch.Tensor, S: int) -> None:
        self.cache, self.pos, self.S = cache, pos, S  # pos (B,) absolute position of each row's new token
        self.B = pos.numel()
        self.rows = torch.arange(self.B, device=cache.device)

    def prepare(self, T: int, device):
        if T != 1:
            raise ValueError(f"a decode step feeds one token per row, got {T}")
        # (B, 1, 1, S): row i sees keys 0..pos_i; longer rows' extra keys (and a static step's padding up to S)
        # are masked. Built here from the position tensor, so a captured step rebuilds it from new values.
        mask = (torch.arange(self.S, device=self.pos.device)[None] <= self.pos[:, None])[:, None, None]
        return self.pos[:, None], mask, self.S  # positions (B, 1)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        # k, v (B, K, 1, D) -> written at (row i, position pos_i); returns the (B, K, S, D) views.
        self.cache.k[layer][self.rows, :, self.pos] = k[:, :, 0]
        self.cache.v[layer][self.rows, :, self.pos] = v[:, :, 0]
        return self.cache.k[layer][: self.B, :, : self.S], self.cache.v[layer][: self.B, :, : self.S]

    def advance(self, T: int) -> None:
        pass
