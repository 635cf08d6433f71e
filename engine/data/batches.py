"""Deterministic order of training blocks, with a position that a checkpoint can store and restore."""
from __future__ import annotations

import torch


class BlockSampler:
    """Yields micro-batches of block indices: a fresh permutation per epoch from (seed, epoch).

    The position (epoch, batch) is all a checkpoint needs: the permutation is recomputed on resume.
    A trailing partial micro-batch is dropped so every micro-batch has the same shape.
    """

    def __init__(self, n_blocks: int, batch_size: int, seed: int):
        if n_blocks < 1:
            raise ValueError("no training blocks")
        self.n_blocks = n_blocks
        self.batch_size = min(batch_size, n_blocks)
        self.seed = seed
        self.epoch = 0
        self.batch = 0
        self._order = None

    @property
    def batches_per_epoch(self) -> int:
        return self.n_blocks // self.batch_size

    def _permutation(self) -> torch.Tensor:
        if self._order is None or self._order[0] != self.epoch:
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
            self._order = (self.epoch, torch.randperm(self.n_blocks, generator=gen))
        return self._order[1]

    def next_indices(self) -> torch.Tensor:
        if self.batch >= self.batches_per_epoch:
            self.epoch += 1
            self.batch = 0
        start = self.batch * self.batch_size
        indices = self._permutation()[start:start + self.batch_size]
        self.batch += 1
        return indices

    @property
    def epoch_progress(self) -> float:
        """Epochs completed as a fraction (e.g. 1.25)."""
        return self.epoch + self.batch / self.batches_per_epoch

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "batch": self.batch, "seed": self.seed,
                "n_blocks": self.n_blocks, "batch_size": self.batch_size}

    def load_state_dict(self, state: dict) -> None:
        if state.get("n_blocks") != self.n_blocks or state.get("batch_size") != self.batch_size:
            # The corpus or batch size changed (continue with more data): start a fresh epoch.
            self.epoch, self.batch = int(state.get("epoch", 0)) + 1, 0
        else:
            self.epoch, self.batch = int(state["epoch"]), int(state["batch"])
