"""Resumable random samplers: of dataset indices (fine-tuning) and of token windows (pretraining).

Order is a pure function of (seed, epoch): each epoch is a fresh permutation of all rows. The whole state is two
integers (epoch, cursor), saved in every checkpoint, so a resumed run continues with exactly the batch it would have
drawn next. With several ranks, one global micro-batch is `batch_size * world_size` consecutive entries of the
permutation and rank r takes its r-th slice: the same global batches as one process with gradient accumulation.

An optimizer step always takes the next `batch_size * world_size * accum` rows, and an epoch ends when fewer than
that many remain. So the state means the same thing for any split of a step into processes and micro-batches, and a
checkpoint resumes at another world size (2 GPUs -> 4, or -> 1 with more accumulation) on exactly the rows the
original run would have read, as long as the step's batch is the same.
"""

from __future__ import annotations

import numpy as np
import torch

from gptforge.data.readers import DataError
from gptforge.data.shards import TokenWindows

_SAMPLER_KEYS = ("seed", "step_batch", "n")  # what must match for a saved position to mean the same batches


class IndexSampler:
    """Resumable shuffled batches of indices into a dataset of n rows; see the module docstring."""

    def __init__(
        self,
        n: int,
        batch_size: int,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        accum: int = 1,
        what: str = "training examples",
    ) -> None:
        if batch_size <= 0 or world_size <= 0 or accum <= 0 or not 0 <= rank < world_size:
            raise ValueError(
                f"bad sampler shape: batch_size={batch_size} rank={rank} world_size={world_size} accum={accum}"
            )
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.global_batch = batch_size * world_size  # one micro-step over all ranks
        self.step_batch = self.global_batch * accum  # one optimizer step
        if n < self.step_batch:
            raise DataError(
                f"only {n} {what}, fewer than one optimizer step's {self.step_batch} ({batch_size} per micro-batch "
                f"x {world_size} processes x {accum} accumulation); lower train.micro_batch_size or train.grad_accum, "
                "or add data"
            )
        self._epoch, self.cursor = 0, 0
        self._perm_epoch, self._perm = -1, np.empty(0, dtype=np.int64)

    @property
    def epoch(self) -> float:
        """Completed epochs, fractional (for logging): 1.5 = halfway through the second pass."""
        usable = self.n // self.step_batch * self.step_batch
        return self._epoch + self.cursor / usable

    def _permutation(self, epoch: int) -> np.ndarray:
        if epoch != self._perm_epoch:
            self._perm = np.random.default_rng([self.seed, epoch]).permutation(self.n)
            self._perm_epoch = epoch
        return self._perm

    def next_indices(self) -> np.ndarray:
        """This rank's batch_size indices of the next global micro-batch."""
        if self.cursor % self.step_batch == 0 and self.cursor + self.step_batch > self.n:
            # At a step's start: an epoch tail shorter than a step is skipped, a step never spans two epochs.
            self._epoch, self.cursor = self._epoch + 1, 0
        start = self.cursor + self.rank * self.batch_size
        idx = self._permutation(self._epoch)[start : start + self.batch_size]
        self.cursor += self.global_batch
        return idx.copy()

    def state_dict(self) -> dict:
        return {"epoch": self._epoch, "cursor": self.cursor, **{k: getattr(self, k) for k in _SAMPLER_KEYS}}

    def load_state_dict(self, sd: dict) -> None:
        for key in _SAMPLER_KEYS:
            ours, theirs = getattr(self, key), sd.get(key)
            if theirs != ours:
                raise ValueError(f"data sampler mismatch: checkpoint has {key}={theirs}, this run has {key}={ours}")
        if int(sd["cursor"]) % self.global_batch:
            raise ValueError(f"data sampler cursor {sd['cursor']} is not at a micro-step of {self.global_batch}")
        self._epoch, self.cursor = int(sd["epoch"]), int(sd["cursor"])


class WindowSampler(IndexSampler):
    """Batches of token windows: (x, y) tensors, drawn in IndexSampler's order."""

    def __init__(
        self, windows: TokenWindows, batch_size: int, seed: int, rank: int = 0, world_size: int = 1, accum: int = 1
    ):
        self.windows = windows
        what = f"training windows of {windows.seq_len + 1} tokens (lower model.block_size or add text)"
        super().__init__(len(windows), batch_size, seed, rank, world_size, accum, what)

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(x, y) int64 tensors of shape (B, T): y is x shifted by one token."""
        data = torch.from_numpy(np.stack([self.windows.window(int(i)) for i in self.next_indices()]))
        return data[:, :-1], data[:, 1:]
