"""Resumable random samplers: of token windows (pretraining) and of dataset indices (fine-tuning).

Order is a pure function of (seed, epoch): each epoch is a fresh permutation of all windows. The whole state is two
integers (epoch, cursor), saved in every checkpoint, so a resumed run continues with exactly the batch it would have
drawn next. With several ranks, one global micro-batch is `batch_size * world_size` consecutive entries of the
permutation and rank r takes its r-th slice: the same global batches as one process with gradient accumulation.

WindowSampler goes one step further: an optimizer step always takes the next `batch_size * world_size * accum`
windows, and an epoch ends when fewer than that many remain. So its state means the same thing for any split of a
step into processes and micro-batches, and a checkpoint resumes at another world size (2 GPUs -> 4, or -> 1 with
more accumulation) on exactly the windows the original run would have read, as long as the step's batch is the same.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch

from gptforge.data.readers import DataError
from gptforge.data.shards import TokenWindows


@dataclass
class SamplerState:
    epoch: int = 0
    cursor: int = 0


class WindowSampler:
    def __init__(
        self, windows: TokenWindows, batch_size: int, seed: int, rank: int = 0, world_size: int = 1, accum: int = 1
    ):
        self.windows, self.batch_size, self.seed = windows, batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.global_batch = batch_size * world_size  # one micro-step over all ranks
        self.step_batch = self.global_batch * accum  # one optimizer step
        if len(windows) < self.step_batch:
            raise DataError(
                f"only {len(windows)} training windows of {windows.seq_len + 1} tokens, fewer than one optimizer "
                f"step's {self.step_batch} ({batch_size} per micro-batch x {world_size} processes x {accum} "
                "accumulation); lower train.micro_batch_size, train.grad_accum or model.block_size, or add text"
            )
        self.state = SamplerState()
        self._perm_epoch = -1
        self._perm: np.ndarray | None = None

    def _permutation(self, epoch: int) -> np.ndarray:
        if epoch != self._perm_epoch:
            self._perm = np.random.default_rng([self.seed, epoch]).permutation(len(self.windows))
            self._perm_epoch = epoch
        return self._perm

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(x, y) int64 tensors of shape (B, T): y is x shifted by one token."""
        cursor = self.state.cursor
        if cursor % self.step_batch == 0 and cursor + self.step_batch > len(self.windows):
            # At a step's start: an epoch tail shorter than a step is skipped, a step never spans two epochs.
            self.state = SamplerState(self.state.epoch + 1, 0)
        perm = self._permutation(self.state.epoch)
        start = self.state.cursor + self.rank * self.batch_size
        idx = perm[start : start + self.batch_size]
        self.state.cursor += self.global_batch
        data = torch.from_numpy(np.stack([self.windows.window(int(i)) for i in idx]))
        return data[:, :-1], data[:, 1:]

    def state_dict(self) -> dict:
        return {**asdict(self.state), "seed": self.seed, "step_batch": self.step_batch}

    def load_state_dict(self, sd: dict) -> None:
        if sd["seed"] != self.seed or sd["step_batch"] != self.step_batch:
            raise ValueError(
                f"data sampler mismatch: checkpoint has seed={sd['seed']} windows per step={sd['step_batch']}, "
                f"this run has seed={self.seed} windows per step={self.step_batch}"
            )
        if int(sd["cursor"]) % self.global_batch:
            raise ValueError(f"data sampler cursor {sd['cursor']} is not at a micro-step of {self.global_batch}")
        self.state = SamplerState(int(sd["epoch"]), int(sd["cursor"]))


_SAMPLER_KEYS = ("seed", "global_batch", "n")  # what must match for a saved position to mean the same batches


class IndexSampler:
    """Resumable shuffled batches of indices into a dataset of n rows; see the module docstring. Each epoch is a
    fresh permutation; the epoch tail shorter than one global batch is skipped, never split across epochs."""

    def __init__(self, n: int, batch_size: int, seed: int, rank: int = 0, world_size: int = 1) -> None:
        if batch_size <= 0 or world_size <= 0 or not 0 <= rank < world_size:
            raise ValueError(f"bad sampler shape: batch_size={batch_size} rank={rank} world_size={world_size}")
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.global_batch = batch_size * world_size
        if n < self.global_batch:
            raise DataError(
                f"only {n} training examples, fewer than one global micro-batch of {self.global_batch} "
                f"({batch_size} x {world_size} ranks); lower train.micro_batch_size or add data"
            )
        self._epoch, self.cursor = 0, 0
        self._perm_epoch, self._perm = -1, np.empty(0, dtype=np.int64)

    @property
    def epoch(self) -> float:
        """Completed epochs, fractional (for logging): 1.5 = halfway through the second pass."""
        usable = self.n // self.global_batch * self.global_batch
        return self._epoch + self.cursor / usable

    def _permutation(self, epoch: int) -> np.ndarray:
        if epoch != self._perm_epoch:
            self._perm = np.random.default_rng([self.seed, epoch]).permutation(self.n)
            self._perm_epoch = epoch
        return self._perm

    def next_indices(self) -> np.ndarray:
        """This rank's batch_size indices of the next global batch."""
        if self.cursor + self.global_batch > self.n:
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
        self._epoch, self.cursor = int(sd["epoch"]), int(sd["cursor"])
