"""Data order of a run: ``BatchStream``, endless batches of indices whose whole state is (epoch, position), saved in
every checkpoint so that a resumed run sees the same batches."""

from __future__ import annotations

import torch

from .checkpoint import CheckpointError


# --- data order ---------------------------------------------------------------------------------------------
class BatchStream:
    """Endless batches of indices into ``n`` items: a fresh permutation per epoch (from ``seed`` and the epoch, not
    from a global RNG), so its whole state is (epoch, position) and a resumed run sees the same batches."""

    def __init__(self, n: int, batch_size: int, seed: int = 0, shuffle: bool = True):
        if n < 1 or batch_size < 1:
            raise ValueError(f"BatchStream: n and batch_size must be >= 1, got n={n}, batch_size={batch_size}")
        self.n, self.batch_size, self.seed, self.shuffle = n, min(batch_size, n), seed, shuffle
        self.epoch, self.position = 0, 0
        self._order = None

    def _permutation(self) -> list[int]:
        if not self.shuffle:
            return list(range(self.n))
        generator = torch.Generator().manual_seed((self.seed * 1_000_003 + self.epoch) % 2**63)
        return torch.randperm(self.n, generator=generator).tolist()

    def next(self) -> list[int]:
        """The next batch of indices; an epoch's last batch is completed from the next epoch (equal batch sizes)."""
        batch = []
        while len(batch) < self.batch_size:
            if self._order is None:
                self._order = self._permutation()
            take = self._order[self.position:self.position + self.batch_size - len(batch)]
            batch += take
            self.position += len(take)
            if self.position >= self.n:
                self.epoch, self.position, self._order = self.epoch + 1, 0, None
        return batch

    def state_dict(self) -> dict:
        return {"n": self.n, "batch_size": self.batch_size, "seed": self.seed, "shuffle": self.shuffle,
                "epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict) -> None:
        mine = self.state_dict()
        differ = [k for k in ("n", "batch_size", "seed", "shuffle") if state.get(k) != mine[k]]
        if differ:
            raise CheckpointError(f"BatchStream: the checkpoint's data stream differs in {differ} "
                                  f"({ {k: state.get(k) for k in differ} } vs { {k: mine[k] for k in differ} })")
        self.epoch, self.position, self._order = int(state["epoch"]), int(state["position"]), None
