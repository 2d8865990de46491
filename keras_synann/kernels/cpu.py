"""Fused CPU loops ("cpu"): the C loops of cpu_loops.c, compiled on first use.

One pass over the data forward and one backward, with the working set in
registers and L1/L2 (cpu_loops.c explains the loops); several times faster
than the keras.ops path on a CPU. Same values and gradients as the reference
to float32 rounding. The glue is per backend (`cpu_torch`, `cpu_jax`,
`cpu_tensorflow`); `cpu_build` compiles and caches the library.

Where it does not apply (`why_not`):

- float32 tensors on the CPU only, and a C compiler (`cpu_build`);
- torch: not under a tracer (torch.jit.trace, torch.compile, torch.export,
  torch.onnx): the loops are a call through ctypes, which a tracer would
  record as a constant;
- jax: one CPU device (the loops are XLA FFI calls that export as the
  reference, so every jax transformation and exporter is fine);
- tensorflow: not in an XLA-compiled graph nor a SavedModel (a numpy
  function cannot leave the process); "auto" takes the loops in eager calls
  and in graphs that a gradient tape records (training steps) only, and
  leaves inference graphs, which converters such as tf2onnx read, portable.
"""

from __future__ import annotations

import functools
import warnings
from types import ModuleType

from keras_synann.kernels import cpu_build, devices


def why_not(x, kernel, auto: bool = False) -> str | None:
    """Why the C loops do not apply to these tensors here, in words; None if they do.

    With `auto`, the preferences of "auto" are added (under tensorflow: not
    in inference graphs), and a missing compiler warns once.
    """
    if not devices.is_float32(x, kernel):
        return f"the C loops compute in float32 (received {devices.dtypes(x, kernel)})"
    backend = devices.backend()
    if backend == "torch":
        if not (x.device.type == kernel.device.type == "cpu"):
            return f"the C loops need CPU tensors (received tensors on {x.device})"
        tracer = devices.torch_tracer(x, kernel)
        if tracer is not None:
            return (
                f"{tracer} would record the C loops' result as a constant "
                "(they run outside torch)"
            )
    elif backend == "jax":
        count, platform = devices.jax_devices()
        if (count, platform) != (1, "cpu"):
            return (
                "the C loops need jax on a single CPU device "
                f"(jax has {count} {platform} device(s))"
            )
    else:
        if not devices.tensorflow_on_cpu():
            return "the C loops need tensorflow on the CPU (it sees a GPU or TPU)"
        context = devices.tensorflow_context(x, kernel)
        if context in (devices.TF_XLA, devices.TF_SAVING):
            return f"{context} cannot hold the C loops' call back into Python"
        if auto and context == devices.TF_INFERENCE:
            return (
                f"'auto' leaves {context} portable (converters such as tf2onnx "
                "read such graphs); it takes the C loops in eager calls and "
                "training steps"
            )
    reason = _glue(backend).unavailable()
    if auto and reason == cpu_build.NO_COMPILER:
        _warn_no_compiler()
    return reason


def log_inhibition(x, kernel, chunk: int):
    """s (batch, n_out) through the C loops (call `why_not` first)."""
    return _glue(devices.backend()).log_inhibition(x, kernel, chunk)


def _glue(backend: str) -> ModuleType:
    """The module that calls the loops from `backend`'s tensors."""
    # (import statements: torch's compiler follows them, unlike importlib)
    if backend == "torch":
        from keras_synann.kernels import cpu_torch

        return cpu_torch
    if backend == "jax":
        from keras_synann.kernels import cpu_jax

        return cpu_jax
    from keras_synann.kernels import cpu_tensorflow

    return cpu_tensorflow


@functools.cache
def _warn_no_compiler() -> None:
    warnings.warn(
        "keras_synann: no C compiler found ($CC, cc, gcc, clang), so Synapse "
        "runs without its compiled CPU loops, several times slower on a CPU. "
        "Set $CC to a C compiler or install gcc (or clang).",
        UserWarning,
        stacklevel=2,
    )
