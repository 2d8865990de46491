"""A backend-native `value_and_grad` for tests and benchmarks."""

from __future__ import annotations

from collections.abc import Callable

import keras


def value_and_grad(fn: Callable, jit: bool = False, graph: bool = False) -> Callable:
    """Backend-native `value_and_grad` of a scalar function of keras tensors.

    Returns `step(*args) -> (value, grads)` differentiating with respect to
    every argument, with backend tensors out (use `keras.ops.convert_to_numpy`).
    `jit` compiles the step (jax.jit, tf.function(jit_compile=True)); `graph`
    (tensorflow) traces it into a tf.function without XLA, as Keras runs a
    tensorflow train step on a CPU-only machine; torch runs eagerly.
    """
    backend = keras.backend.backend()
    if backend == "jax":
        import jax

        def jax_step(*args):
            return jax.value_and_grad(fn, argnums=tuple(range(len(args))))(*args)

        return jax.jit(jax_step) if jit else jax_step
    if backend == "tensorflow":
        import tensorflow as tf

        def tf_step(*args):
            with tf.GradientTape() as tape:
                for a in args:
                    tape.watch(a)
                value = fn(*args)
            return value, tuple(tape.gradient(value, list(args)))

        if jit or graph:
            wrapped = tf.function(tf_step, jit_compile=bool(jit))
        else:
            wrapped = tf_step

        def run(*args):
            return wrapped(*[tf.convert_to_tensor(a) for a in args])

        return run
    if backend == "torch":
        import torch

        def torch_step(*args):
            leaves = [
                keras.ops.convert_to_tensor(a).detach().requires_grad_(True)
                for a in args
            ]
            value = fn(*leaves)
            grads = torch.autograd.grad(value, leaves)
            return value.detach(), tuple(g for g in grads)

        return torch_step
    raise ValueError(
        f"value_and_grad supports the jax, tensorflow and torch backends. Received: {backend}"
    )
