"""The keras.ops reference under tensorflow ("ops"): every device and graph.

The chunked forward and the closed-form adjoint of `kernels.reference`,
made differentiable to every order by `gradients`. Where no gradient tape
records the graph (inference graphs, which tf2onnx and TFLite convert, and
SavedModels), the plain forward is built instead: no custom gradient, no
nested compiled function. So it is in graphs that a forward accumulator
records, where `tf.custom_gradient` would hand forward mode the derivative
of its inner ops: there every derivative is tensorflow's autodiff of the
chunked ops, unrolled (right, but reverse mode through them keeps every
chunk's factors: batch x n_in x n_out values).

Keras leaves a tensorflow train step uncompiled on CPU-only machines and
under tf.distribute, where the chunk loops would run op by op, so the
forward and adjoint are compiled with XLA on their own (inlined where the
whole step is compiled).
"""

from __future__ import annotations

import functools

import tensorflow as tf

from keras_synann.kernels import devices, reference


def not_supported_reasons(x, kernel, auto: bool = False) -> list[str]:
    """None: keras.ops runs everywhere."""
    del x, kernel, auto
    return []


@functools.cache
def _compiled(n_in: int, n_out: int, chunk: int, dtype: str):
    """The forward and adjoint for one layer shape, any batch, XLA-compiled."""
    x = tf.TensorSpec((None, n_in), dtype)
    w = tf.TensorSpec((n_in, n_out), dtype)
    g = tf.TensorSpec((None, n_out), dtype)
    forward = tf.function(
        functools.partial(reference.forward, chunk=chunk),
        input_signature=[x, w],
        jit_compile=True,
    )
    adjoint = tf.function(
        functools.partial(reference.backward, chunk=chunk),
        input_signature=[x, w, g],
        jit_compile=True,
    )
    return forward, adjoint


class _Compiled:
    """`reference`'s forward and adjoint, through `_compiled`."""

    @staticmethod
    def forward(x, kernel, chunk):
        n_in, n_out = kernel.shape
        return _compiled(n_in, n_out, chunk, x.dtype.name)[0](x, kernel)

    @staticmethod
    def adjoint(x, kernel, u, chunk):
        n_in, n_out = kernel.shape
        return _compiled(n_in, n_out, chunk, x.dtype.name)[1](x, kernel, u)


def log_inhibition(x, kernel, chunk: int):
    """s, differentiable to every order (portable where no tape records it)."""
    context = devices.tensorflow_context(x, kernel)
    if context == devices.TF_FORWARD:
        return reference.forward(x, kernel, chunk, unroll=True)
    if context in (devices.TF_INFERENCE, devices.TF_SAVING, devices.TF_KERAS_STEP):
        return reference.forward(x, kernel, chunk)
    from keras_synann.kernels.tensorflow import gradients

    return gradients.log_inhibition(x, kernel, _Compiled, chunk)
