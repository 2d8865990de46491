"""The keras.ops reference under jax ("ops"): every device and transformation.

The chunked forward and closed-form adjoint of `kernels.reference` as jax
primitives with no platform kernel (`primitives.define`): every platform
lowers them to the reference, and their JVP, transpose and batching rules
give every derivative and `vmap`.
"""

from __future__ import annotations

from keras_synann.kernels.jax import primitives

_log_inhibition = primitives.define("keras_synann_ops", {})


def not_supported_reasons(x, kernel, auto: bool = False) -> list[str]:
    """None: keras.ops runs everywhere."""
    del x, kernel, auto
    return []


def log_inhibition(x, kernel, chunk: int):
    """s, differentiable to every order."""
    return _log_inhibition(x, kernel, chunk=int(chunk))
