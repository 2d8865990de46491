"""The keras.ops reference under torch ("ops"): every device and tracer.

The chunked forward and the closed-form adjoint of `kernels.reference`,
made differentiable to every order by `functions`. Under torch.jit.trace,
which would keep an autograd Function as a Python op, the plain forward is
traced instead (its gradient, where one is taken, is autodiff of the same
ops: equal to the closed form except through a floored product).
"""

from __future__ import annotations

import torch

from keras_synann.kernels import reference

forward = reference.forward
adjoint = reference.backward


def not_supported_reasons(x, kernel, auto: bool = False) -> list[str]:
    """None: keras.ops runs everywhere."""
    del x, kernel, auto
    return []


def log_inhibition(x, kernel, chunk: int):
    """s, differentiable to every order."""
    if torch.jit.is_tracing():
        return reference.forward(x, kernel, chunk)
    from keras_synann.kernels.torch import functions
    from keras_synann.kernels.torch import reference as impl

    return functions.log_inhibition(x, kernel, impl, chunk)
