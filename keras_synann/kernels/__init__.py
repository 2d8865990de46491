"""The ways to compute `log_inhibition`, and the one dispatch that picks one.

    s[b, i] = sum_j log(max(1 - W[j, i] x[b, j], FACTOR_FLOOR))   (one log per chunk)

`REGISTRY` is the one table of implementations: a row per implementation
and backend, each backend's rows in "auto"'s order, each declaring what it
supports (`base.Implementation`). A row's module gives its `base.Kernel`
(forward, adjoint, contract); the backend's autodiff wrapping makes it
differentiable to every order (`jax.primitives`, `torch.functions`,
`tensorflow.gradients`, all from `rules`). "auto" takes the first row of
its backend with no reason not to apply, cached per backend, shapes, dtypes
and context (`devices.Context`: device and tracer); an explicit request
that does not apply raises one ValueError with the reasons and the way out.
Where a row names a plain form for the tracing context (a tracer that
records plain operations only), that form is traced instead of the kernel.

Adding an implementation: its module (a `KERNEL`) and one row. Modules are
imported on first use with importlib, which torch's compiler cannot follow:
under torch only the reference (no module) may run while it traces, which
every other torch row's `refuses` ensures. Imports point one way:
`keras_synann.ops` imports this package, never the reverse.
"""

from __future__ import annotations

import functools
import warnings

import keras

from keras_synann.kernels import cpu_build, devices, reference
from keras_synann.kernels._numerics import (
    DEFAULT_CHUNK_SIZE,
    FACTOR_FLOOR,
    PRODUCT_FLOOR,
)
from keras_synann.kernels.base import EVERY_TRACER, Implementation

__all__ = [
    "DEFAULT_CHUNK_SIZE",
    "FACTOR_FLOOR",
    "NAMES",
    "PRODUCT_FLOOR",
    "REGISTRY",
    "Implementation",
    "find",
    "log_inhibition",
    "not_supported_reasons",
    "priority",
    "resolve",
]

_LOOPS = "the C loops"
_FLOAT32 = ("float32",)
_CPU = ("cpu",)
_NO_CALLBACK = "{context} cannot hold the C loops' call back into Python"


def _unrolled(x, kernel, chunk: int):
    return reference.forward(x, kernel, chunk, unroll=True)


#: Every implementation, one row per backend it runs on; a backend's rows in
#: "auto"'s order of preference.
REGISTRY = (
    Implementation("pallas", "jax", "jax.pallas", "the Pallas kernels", dtypes=_FLOAT32),
    Implementation("cpu", "jax", "jax.cpu", _LOOPS, dtypes=_FLOAT32, devices=_CPU),
    Implementation("ops", "jax"),
    Implementation(
        "cpu", "tensorflow", "tensorflow.cpu", _LOOPS, dtypes=_FLOAT32, devices=_CPU,
        refuses={
            devices.TF_XLA: _NO_CALLBACK,
            devices.TF_SAVING: _NO_CALLBACK,
            devices.TF_FORWARD: "{context} cannot differentiate the C loops (in "
            "graphs, forward mode sees a custom gradient's inner ops)",
        },
        auto_avoids={
            devices.TF_INFERENCE: "'auto' leaves {context} portable (converters "
            "such as tf2onnx read such graphs); it takes the C loops in eager "
            "calls, training steps and Keras's predict and evaluate steps",
        },
    ),
    Implementation(
        "ops", "tensorflow", "tensorflow.reference",
        plain={
            devices.TF_INFERENCE: reference.forward,
            devices.TF_SAVING: reference.forward,
            devices.TF_KERAS_STEP: reference.forward,
            devices.TF_FORWARD: _unrolled,
        },
    ),
    Implementation(
        "triton", "torch", "torch.triton", "the Triton kernels", dtypes=_FLOAT32,
        refuses={EVERY_TRACER: "{context} cannot record a Triton launch"},
    ),
    Implementation(
        "cpu", "torch", "torch.cpu", _LOOPS, dtypes=_FLOAT32, devices=_CPU,
        refuses={
            EVERY_TRACER: "{context} would record the C loops' result as a "
            "constant (they run outside torch)"
        },
    ),
    Implementation(
        "torch", "torch", "torch.eager",
        refuses={
            EVERY_TRACER: "{context} cannot record it (it reads the ranges of x "
            "and the kernel into Python to size its passes)"
        },
    ),
    Implementation("ops", "torch", plain={devices.TORCH_JIT_TRACE: reference.forward}),
)  # fmt: skip

#: Every implementation's name, the reference first ("auto" is not one: it
#: picks one of these).
NAMES = ("ops", *sorted({row.name for row in REGISTRY} - {"ops"}))


def find(name: str, backend: str | None = None) -> Implementation | None:
    """The row of `name` under `backend` (default: Keras's); None if it has none."""
    backend = backend or devices.backend()
    for row in REGISTRY:
        if (row.name, row.backend) == (name, backend):
            return row
    return None


def priority(backend: str | None = None) -> tuple[str, ...]:
    """What "auto" tries, in order, under `backend` (default: Keras's)."""
    backend = backend or devices.backend()
    return tuple(row.name for row in REGISTRY if row.backend == backend)


def not_supported_reasons(name: str, x, kernel, auto: bool = False) -> list[str]:
    """Why implementation `name` does not apply to these tensors here, in words
    (empty: it does)."""
    return _reasons(name, x, kernel, devices.context(x, kernel), auto)


def _reasons(name, x, kernel, context, auto=False) -> list[str]:
    row = find(name)
    if row is None:
        homes = " or ".join(r.backend for r in REGISTRY if r.name == name)
        return [f"it needs the {homes} backend (Keras runs {devices.backend()})"]
    return row.not_supported_reasons(x, kernel, context, auto)


_AUTO: dict[tuple, Implementation] = {}


def resolve(implementation: str, x, kernel, context=None) -> Implementation:
    """The row that computes these tensors ("auto" resolved), in `context`
    (default: theirs, `devices.context`).

    Raises:
        ValueError: `implementation` is explicit and does not apply, with the
            reasons and the way out.
    """
    context = context or devices.context(x, kernel)
    if implementation == "auto":
        if not context.cacheable:
            return _choose(x, kernel, context)
        key = (
            devices.backend(),
            tuple(x.shape),
            tuple(kernel.shape),
            keras.backend.standardize_dtype(x.dtype),
            keras.backend.standardize_dtype(kernel.dtype),
            context,
        )
        choice = _AUTO.get(key)
        if choice is None:
            choice = _AUTO[key] = _choose(x, kernel, context)
        return choice
    reasons = _reasons(implementation, x, kernel, context)
    if reasons:
        raise ValueError(
            f"implementation={implementation!r} does not apply: "
            f"{'; '.join(reasons)}. Use implementation='auto' or 'ops'."
        )
    return find(implementation)


def _choose(x, kernel, context) -> Implementation:
    for name in priority():
        reasons = _reasons(name, x, kernel, context, auto=True)
        if not reasons:
            return find(name)
        if any(cpu_build.NO_COMPILER in reason for reason in reasons):
            _warn_no_compiler()
    raise AssertionError("the keras.ops implementation applies everywhere")


def log_inhibition(x, kernel, chunk_size: int, implementation: str):
    """`log_inhibition` of `keras_synann.ops` for tensors of the backend."""
    context = devices.context(x, kernel)
    row = resolve(implementation, x, kernel, context)
    n_in = int(kernel.shape[0])
    plain = row.plain.get(context.tracer)
    if plain is not None:
        return plain(x, kernel, min(chunk_size, n_in))
    own = row.kernel()
    chunk = min(own.chunk or chunk_size, n_in)
    return _differentiable(row.backend)(own, x, kernel, chunk)


def _differentiable(backend: str):
    """The backend's autodiff wrapping, f(kernel, x, W, chunk) -> s.

    (import statements, not importlib: torch's compiler follows them)
    """
    if backend == "jax":
        from keras_synann.kernels.jax import primitives as wrapping
    elif backend == "torch":
        from keras_synann.kernels.torch import functions as wrapping
    else:
        from keras_synann.kernels.tensorflow import gradients as wrapping
    return wrapping.log_inhibition


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
