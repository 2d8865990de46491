"""What every backend's strategy shares: the `Strategy` interface (its base
class is the "default" strategy: one device, plain `model.fit`), the callbacks
that only the chief runs, and trimming arrays to split evenly."""

from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import keras
import numpy as np

CHIEF_ONLY_CALLBACKS = (
    keras.callbacks.ModelCheckpoint,
    keras.callbacks.CSVLogger,
    keras.callbacks.BackupAndRestore,
    keras.callbacks.TensorBoard,
)


@dataclass
class Strategy:
    """What training needs from a backend's distribution strategy.

    The base class is the "default" strategy: one device, plain `model.fit`.
    """

    name: str  # "default", "data_parallel", "mirrored", "tpu", "ddp"
    backend: str
    devices: list[str] = field(default_factory=list)  # every device, all processes
    is_chief: bool = True  # the process that writes artifacts
    process_index: int = 0
    process_count: int = 1

    @property
    def num_replicas(self) -> int:
        return max(1, len(self.devices))

    def scope(self):
        """Context in which to build and compile the model."""
        return contextlib.nullcontext()

    def fit(self, model, x, y, *, batch_size, **fit_kwargs):
        """Train like `model.fit(x, y, batch_size=..., **fit_kwargs)` on in-memory
        arrays with the GLOBAL batch size; returns a History."""
        return model.fit(x, y, batch_size=batch_size, **fit_kwargs)

    def restore_best(self, model, path=None, weights=None):
        """The model to report, on every process: `model` with `weights` (the
        best epoch's, the same on every process) if given, else the checkpoint
        at `path` if the chief saved one, else `model` as training left it."""
        if weights is not None:
            model.set_weights(weights)
            return model
        if self.is_chief and path is not None and Path(path).is_file():
            with self.scope():
                return keras.saving.load_model(path)
        return model

    def save(self, model, path) -> None:
        """Write `model` (from `restore_best`) as a .keras file."""
        model.save(path)

    def agree(self, value: int) -> int:
        """Process 0's `value`, on every process."""
        return value

    def any_process(self, flag: bool) -> bool:
        """Whether `flag` is set on any process (every process calls it at
        the same step)."""
        return flag

    def coordination(self):
        """A key-value store the processes share (jax's coordination-service
        client) for the supervisor's heartbeat; None with one process."""
        return None

    def evaluate(self, model, x, y, *, batch_size, verbose=0) -> dict[str, float]:
        """Metrics of `model` on all of (x, y), the same on every process."""
        return model.evaluate(
            x, y, batch_size=batch_size, verbose=verbose, return_dict=True
        )

    def predict(self, model, x, *, batch_size, verbose=0) -> np.ndarray:
        """`model.predict` on all of x, the same on every process."""
        return model.predict(x, batch_size=batch_size, verbose=verbose)

    def close(self) -> None:
        """Release what the strategy holds (the torch process group)."""

    def check_batch(self, batch_size: int) -> None:
        """The global batch must split evenly over the replicas."""
        if batch_size % self.num_replicas:
            raise ValueError(
                f"batch size {batch_size} must be a multiple of the "
                f"{self.num_replicas} replicas of {self.name!r}"
            )


def trim(arrays, multiple: int, what: str):
    """Drop the last `len % multiple` samples (with a warning) so shards are even."""
    arrays = tuple(arrays)
    n = len(arrays[0])
    extra = n % multiple
    if not extra:
        return arrays
    warnings.warn(
        f"Dropping the last {extra} of {n} {what} samples so that they split "
        f"evenly over {multiple} replicas.",
        stacklevel=3,
    )
    return tuple(a[: n - extra] for a in arrays)


def chief_only(callback) -> bool:
    """Whether `callback` writes files (only the chief runs those)."""
    return isinstance(callback, CHIEF_ONLY_CALLBACKS) or bool(
        getattr(callback, "chief_only", False)
    )
