"""The keras.ops reference under tensorflow ("ops"), its forward and adjoint
compiled with XLA.

Keras leaves a tensorflow train step uncompiled on CPU-only machines and
under tf.distribute, where the chunk loops would run op by op, so the
forward and adjoint are compiled with XLA on their own, per layer shape and
any batch (inlined where the whole step is compiled); the contractions of
the higher derivatives are the reference's. Where no tape records the graph
(inference graphs, SavedModels, Keras's predict and evaluate steps) or a
forward accumulator does, the registry (`kernels.REGISTRY`) has the plain
chunked ops traced instead.
"""

from __future__ import annotations

import functools

import tensorflow as tf

from keras_synann.kernels import reference
from keras_synann.kernels.rules import Kernel


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
        functools.partial(reference.adjoint, chunk=chunk),
        input_signature=[x, w, g],
        jit_compile=True,
    )
    return forward, adjoint


def forward(x, kernel, chunk: int):
    n_in, n_out = kernel.shape
    return _compiled(n_in, n_out, chunk, x.dtype.name)[0](x, kernel)


def adjoint(x, kernel, u, chunk: int):
    n_in, n_out = kernel.shape
    return _compiled(n_in, n_out, chunk, x.dtype.name)[1](x, kernel, u)


KERNEL = Kernel(forward, adjoint, reference.contract)
