"""The ways to compute `log_inhibition`, and the one dispatch that picks one.

    s[b, i] = sum_j log(max(1 - W[j, i] x[b, j], FACTOR_FLOOR))   (one log per chunk)

The implementations live per backend, the way Keras lays out its backends:

    name     jax                 torch               tensorflow
    ops      jax/reference.py    torch/reference.py  tensorflow/reference.py
    cpu      jax/cpu.py          torch/cpu.py        tensorflow/cpu.py
    torch                        torch/eager.py
    triton                       torch/triton.py
    pallas   jax/pallas.py

Each backend package lists its modules and "auto"'s `PRIORITY`; each module
says why it does not apply (`not_supported_reasons(x, kernel, auto)`, a list,
no side effects) and computes s, differentiable to every order through its
backend's rules (jax primitives, torch autograd Functions, tensorflow custom
gradients, all from `rules`). "auto" takes the first of its backend's
`PRIORITY` with no reason; the choice is cached per backend, shapes, dtypes
and context (device, tracer or graph). An explicit request that does not
apply raises one ValueError with the reasons and the way out. Imports point
one way: `keras_synann.ops` imports this package, never the reverse, and
each backend package is imported on first use.
"""

from __future__ import annotations

import dataclasses
import functools
import warnings
from types import ModuleType

import keras

from keras_synann.kernels import cpu_build, devices
from keras_synann.kernels._numerics import (
    DEFAULT_CHUNK_SIZE,
    FACTOR_FLOOR,
    PRODUCT_FLOOR,
)

__all__ = [
    "DEFAULT_CHUNK_SIZE",
    "FACTOR_FLOOR",
    "IMPLEMENTATIONS",
    "PRODUCT_FLOOR",
    "Implementation",
    "log_inhibition",
    "priority",
    "resolve",
]

#: The backends each implementation runs on.
_HOMES = {
    "ops": ("jax", "torch", "tensorflow"),
    "cpu": ("jax", "torch", "tensorflow"),
    "torch": ("torch",),
    "triton": ("torch",),
    "pallas": ("jax",),
}


def _backend_package(backend: str) -> ModuleType:
    # (import statements, not importlib: torch's compiler follows them)
    if backend == "torch":
        from keras_synann.kernels import torch as package
    elif backend == "jax":
        from keras_synann.kernels import jax as package
    else:
        from keras_synann.kernels import tensorflow as package
    return package


#: (backend, name) -> why its module cannot be imported (a failed import is
#: not retried).
_MISSING: dict[tuple[str, str], str] = {}


def _load(backend: str, name: str) -> tuple[ModuleType | None, str | None]:
    """(module, None), or (None, why it cannot be imported)."""
    missing = _MISSING.get((backend, name))
    if missing is not None:
        return None, missing
    try:
        return _backend_package(backend).load(name), None
    except ImportError as e:
        reason = f"{e.name or 'a package it needs'} is not installed"
        _MISSING[(backend, name)] = reason
        return None, reason


@dataclasses.dataclass(frozen=True)
class Implementation:
    """One way to compute `log_inhibition`: its name and the backends it runs on."""

    name: str
    backends: tuple[str, ...]

    def module(self) -> ModuleType:
        """Its module for the running backend (call `not_supported_reasons` first)."""
        module, error = _load(devices.backend(), self.name)
        if module is None:
            raise ImportError(error)
        return module

    def not_supported_reasons(self, x, kernel, auto: bool = False) -> list[str]:
        """Why it does not apply to these tensors here, in words (empty: it does)."""
        current = devices.backend()
        if current not in self.backends:
            homes = " or ".join(self.backends)
            return [f"it needs the {homes} backend (Keras runs {current})"]
        module, error = _load(current, self.name)
        if module is None:
            return [error]
        return module.not_supported_reasons(x, kernel, auto)

    def why_not(self, x, kernel, auto: bool = False) -> str | None:
        """The reasons joined into one sentence, or None where it applies."""
        reasons = self.not_supported_reasons(x, kernel, auto)
        return "; ".join(reasons) if reasons else None

    def log_inhibition(self, x, kernel, chunk: int):
        """s (batch, n_out) for x (batch, n_in), kernel (n_in, n_out), chunk <= n_in."""
        return self.module().log_inhibition(x, kernel, chunk)


#: Every implementation by name ("auto" is not one: it picks one of these).
IMPLEMENTATIONS = {name: Implementation(name, homes) for name, homes in _HOMES.items()}


def priority(backend: str | None = None) -> tuple[str, ...]:
    """What "auto" tries, in order, under `backend` (default: Keras's)."""
    return _backend_package(backend or devices.backend()).PRIORITY


def _key(backend: str, x, kernel) -> tuple:
    return (
        backend,
        tuple(x.shape),
        tuple(kernel.shape),
        keras.backend.standardize_dtype(x.dtype),
        keras.backend.standardize_dtype(kernel.dtype),
        _backend_package(backend).context(x, kernel),
    )


_AUTO: dict[tuple, Implementation] = {}


def resolve(implementation: str, x, kernel) -> Implementation:
    """The implementation that computes these tensors ("auto" resolved).

    Raises:
        ValueError: `implementation` is explicit and does not apply, with the
            reasons and the way out.
    """
    backend = devices.backend()
    if implementation == "auto":
        if _backend_package(backend).compiling():
            # (torch's compiler traces this function: no cache in its graph)
            return _choose(backend, x, kernel)
        key = _key(backend, x, kernel)
        choice = _AUTO.get(key)
        if choice is None:
            choice = _choose(backend, x, kernel)
            _AUTO[key] = choice
        return choice
    impl = IMPLEMENTATIONS[implementation]
    reasons = impl.not_supported_reasons(x, kernel)
    if reasons:
        raise ValueError(
            f"implementation={implementation!r} does not apply: "
            f"{'; '.join(reasons)}. Use implementation='auto' or 'ops'."
        )
    return impl


def _choose(backend: str, x, kernel) -> Implementation:
    for name in priority(backend):
        impl = IMPLEMENTATIONS[name]
        reasons = impl.not_supported_reasons(x, kernel, auto=True)
        if not reasons:
            return impl
        if name == "cpu" and any(cpu_build.NO_COMPILER in r for r in reasons):
            _warn_no_compiler()
    raise AssertionError("the keras.ops implementation applies everywhere")


def log_inhibition(x, kernel, chunk_size: int, implementation: str):
    """`log_inhibition` of `keras_synann.ops` for tensors of the backend."""
    chunk = min(chunk_size, int(kernel.shape[0]))
    return resolve(implementation, x, kernel).log_inhibition(x, kernel, chunk)


@functools.cache
def _warn_no_compiler() -> None:
    warnings.warn(
        "keras_synann: this installation carries no compiled CPU loops for this "
        "CPU and no C compiler was found ($CC, cc, gcc, clang), so Synapse runs "
        "without them, several times slower on a CPU. Install a binary wheel "
        "(Linux, macOS) or a C compiler (gcc or clang).",
        UserWarning,
        stacklevel=4,
    )
