"""`GlobalBatches`: batches whose global makeup does not depend on the number
of processes feeding them."""

from __future__ import annotations

import math

import keras
import numpy as np

from training.distribute.base import trim


class GlobalBatches(keras.utils.PyDataset):
    """(x, y) batches whose global makeup does not depend on the process count.

    Step k's global batch is the rows `order[k * B : (k + 1) * B]` (B the
    global batch size; `order` a new seeded permutation each epoch when
    shuffling, else 0..n-1). Process p of P yields the p-th contiguous 1/P
    of those rows, so the processes' parts together hold the global batch's
    rows: 1 process x 4 devices and 2 processes x 2 devices train on the same
    rows at each step. Keras places each part with
    `jax.make_array_from_process_local_data`: a process's rows go to the
    batch positions that its own devices hold in the DataParallel mesh (the
    device list's order), which is process order only where that list keeps
    each process's devices together and the processes in order. The position
    does not change a step: its loss and gradients are means over the whole
    global batch (up to the order of floating-point sums). n is trimmed to a multiple of `replicas` (at most
    replicas - 1 samples, with a warning) so that every batch, the last one
    included, splits evenly over the devices.
    """

    def __init__(
        self,
        x,
        y,
        batch_size: int,
        replicas: int,
        *,
        process_index: int = 0,
        process_count: int = 1,
        shuffle: bool = False,
        what: str = "training",
    ):
        super().__init__()
        self.x, self.y = trim((x, y), replicas, what)
        self.batch_size = batch_size
        self.process_index, self.process_count = process_index, process_count
        # NumPy's global generator, which keras.utils.set_random_seed seeds:
        # the same seed on every process.
        self._seed = np.random.randint(2**31 - 1) if shuffle else None  # noqa: NPY002
        self._epoch = 0
        self._order = self._new_order()

    def _new_order(self) -> np.ndarray:
        n = len(self.y)
        if self._seed is None:
            return np.arange(n)
        return np.random.default_rng([self._seed, self._epoch]).permutation(n)

    def __len__(self) -> int:
        return math.ceil(len(self.y) / self.batch_size)

    def __getitem__(self, k: int):
        rows = self._order[k * self.batch_size : (k + 1) * self.batch_size]
        part = len(rows) // self.process_count
        rows = rows[self.process_index * part : (self.process_index + 1) * part]
        return self.x[rows], self.y[rows]

    def on_epoch_end(self) -> None:
        self._epoch += 1
        self._order = self._new_order()
