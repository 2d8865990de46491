"""The ways to compute `log_inhibition`, and the one dispatch that picks one.

    s[b, i] = sum_j log(max(1 - W[j, i] x[b, j], FACTOR_FLOOR))   (one log per chunk)

Every implementation is a module of this package with `why_not(x, kernel,
auto)` (why it does not apply to these tensors here, in words, or None) and
`log_inhibition(x, kernel, chunk)`; `IMPLEMENTATIONS` records its name and
the backend it needs:

    name     module          backend   what
    ops      reference.py    any       keras.ops: every device and tracer
    cpu      cpu.py          any       fused C loops (float32, CPU)
    torch    torch_eager.py  torch     eager torch with reused buffers
    triton   triton.py       torch     fused Triton kernels (CUDA)
    pallas   pallas.py       jax       fused Pallas kernels (GPU)

"auto" takes the first implementation of its backend's `PRIORITY` list whose
`why_not(..., auto=True)` is None. An explicit request that does not apply
raises one ValueError with the reason and the way out. Imports point one
way: `keras_synann.ops` imports this package, never the reverse, and the
implementation modules are imported on first use (each imports its own
backend).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from types import ModuleType

from keras_synann.kernels import devices
from keras_synann.kernels._numerics import (
    DEFAULT_CHUNK_SIZE,
    FACTOR_FLOOR,
    PRODUCT_FLOOR,
)

__all__ = [
    "DEFAULT_CHUNK_SIZE",
    "FACTOR_FLOOR",
    "IMPLEMENTATIONS",
    "PRIORITY",
    "PRODUCT_FLOOR",
    "Implementation",
    "log_inhibition",
    "resolve",
]


@dataclasses.dataclass(frozen=True)
class Implementation:
    """One way to compute `log_inhibition`: its name, backend and module."""

    name: str
    #: The Keras backend it needs; None for any.
    backend: str | None
    #: Imports and returns the module of this package that implements it.
    load: Callable[[], ModuleType]

    def why_not(self, x, kernel, auto: bool = False) -> str | None:
        """Why it does not apply to these tensors here, in words; None if it does."""
        current = devices.backend()
        if self.backend is not None and self.backend != current:
            return f"it needs the {self.backend} backend (Keras runs {current})"
        try:
            module = self.load()
        except ImportError as e:
            return f"{e.name or 'a package it needs'} is not installed"
        return module.why_not(x, kernel, auto)

    def log_inhibition(self, x, kernel, chunk: int):
        """s (batch, n_out) for x (batch, n_in), kernel (n_in, n_out), chunk <= n_in."""
        return self.load().log_inhibition(x, kernel, chunk)


# Each module is imported on first use, with an import statement (which
# torch's compiler follows, unlike importlib).


def _reference() -> ModuleType:
    from keras_synann.kernels import reference

    return reference


def _torch_eager() -> ModuleType:
    from keras_synann.kernels import torch_eager

    return torch_eager


def _triton() -> ModuleType:
    from keras_synann.kernels import triton

    return triton


def _pallas() -> ModuleType:
    from keras_synann.kernels import pallas

    return pallas


def _cpu() -> ModuleType:
    from keras_synann.kernels import cpu

    return cpu


#: Every implementation by name ("auto" is not one: it picks one of these).
IMPLEMENTATIONS = {
    impl.name: impl
    for impl in (
        Implementation("ops", None, _reference),
        Implementation("torch", "torch", _torch_eager),
        Implementation("triton", "torch", _triton),
        Implementation("pallas", "jax", _pallas),
        Implementation("cpu", None, _cpu),
    )
}
#: What "auto" tries, in order, per backend. The last applies everywhere.
PRIORITY = {
    "jax": ("pallas", "cpu", "ops"),
    "torch": ("triton", "cpu", "torch", "ops"),
    "tensorflow": ("cpu", "ops"),
}


def resolve(implementation: str, x, kernel) -> Implementation:
    """The implementation that computes these tensors ("auto" resolved).

    Raises:
        ValueError: `implementation` is explicit and does not apply, with the
            reason and the way out.
    """
    if implementation == "auto":
        for name in PRIORITY[devices.backend()]:
            impl = IMPLEMENTATIONS[name]
            if impl.why_not(x, kernel, auto=True) is None:
                return impl
        raise AssertionError("the keras.ops implementation applies everywhere")
    impl = IMPLEMENTATIONS[implementation]
    reason = impl.why_not(x, kernel)
    if reason is not None:
        raise ValueError(
            f"implementation={implementation!r} does not apply: {reason}. "
            "Use implementation='auto' or 'ops'."
        )
    return impl


def log_inhibition(x, kernel, chunk_size: int, implementation: str):
    """`log_inhibition` of `keras_synann.ops` for tensors of the backend."""
    chunk = min(chunk_size, int(kernel.shape[0]))
    return resolve(implementation, x, kernel).log_inhibition(x, kernel, chunk)
