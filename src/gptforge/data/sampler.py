"""A resumable random sampler of training windows.

Order is a pure function of (seed, epoch): each epoch is a fresh permutation of all windows. The whole state is two
integers (epoch, cursor), saved in every checkpoint, so a resumed run continues with exactly the batch it would have
drawn next. With several ranks, one global micro-batch is `batch_size * world_size` consecutive entries of the
permutation and rank r takes its r-th slice: the same global batches as one process with gradient accumulation.
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
    def __init__(self, windows: TokenWindows, batch_size: int, seed: int, rank: int = 0, world_size: int = 1):
        self.windows, self.batch_size, self.seed = windows, batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.global_batch = batch_size * world_size
        if len(windows) < self.global_batch:
            raise DataError(
                f"only {len(windows)} training windows of {windows.seq_len + 1} tokens, fewer than one micro-batch "
                f"of {self.global_batch}; lower train.micro_batch_size or model.block_size, or add text"
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
        if self.state.cursor + self.global_batch > len(self.windows):
            # The epoch tail shorter than a global batch is skipped, never split across epochs.
            self.state = SamplerState(self.state.epoch + 1, 0)
        perm = self._permutation(self.state.epoch)
        start = self.state.cursor + self.rank * self.batch_size
        idx = perm[start : start + self.batch_size]
        self.state.cursor += self.global_batch
        data = torch.from_numpy(np.stack([self.windows.window(int(i)) for i in idx]))
        return data[:, :-1], data[:, 1:]

    def state_dict(self) -> dict:
        return {**asdict(self.state), "seed": self.seed, "global_batch": self.global_batch}

    def load_state_dict(self, sd: dict) -> None:
        if sd["seed"] != self.seed or sd["global_batch"] != self.global_batch:
            raise ValueError(
                f"data sampler mismatch: checkpoint has seed={sd['seed']} global micro-batch={sd['global_batch']}, "
                f"this run has seed={self.seed} global micro-batch={self.global_batch}"
            )
        self.state = SamplerState(int(sd["epoch"]), int(sd["cursor"]))
