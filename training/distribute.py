"""Distribution strategies, one function per backend (contract stub; see issue 3).

`resolve(name)` returns a `Strategy`; training/mnist.py builds and compiles the
model inside `strategy.scope()` and trains with `strategy.fit(...)`.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import keras


@dataclass
class Strategy:
    """What training needs from a backend's distribution strategy."""

    name: str  # "default", "data_parallel", "mirrored", "tpu", "ddp"
    backend: str
    devices: list[str] = field(default_factory=list)
    is_chief: bool = True  # the process that writes artifacts

    @property
    def num_replicas(self) -> int:
        return max(1, len(self.devices))

    def scope(self):
        """Context in which to build and compile the model."""
        return contextlib.nullcontext()

    def fit(self, model, x, y, *, batch_size, epochs, validation_data, callbacks,
            initial_epoch=0, verbose="auto"):
        """Train like `model.fit` on in-memory arrays; returns a History."""
        return model.fit(
            x, y, batch_size=batch_size, epochs=epochs, initial_epoch=initial_epoch,
            validation_data=validation_data, callbacks=callbacks, verbose=verbose,
        )


def resolve(name: str = "auto") -> Strategy:
    """The strategy called `name` ("auto" picks the best one available)."""
    if name not in ("auto", "default"):
        raise ValueError(
            f"Unknown distribution {name!r}; this build supports 'auto' and 'default'."
        )
    return Strategy("default", keras.backend.backend(), ["cpu:0"])
