"""A stride-1, "valid", channels-last 2-D convolution for jax on a CPU.

    y[b, p, q, o] = sum_{i, j, c} x[b, p + i, q + j, c] k[i, j, c, o]

The same values and gradients as `lax.conv_general_dilated`, computed in the
forms XLA's CPU backend runs fastest at the lenet's shapes (docs/performance.md,
"Training speed", has the measurements):

- forward with one input channel: a sum over the kh x kw taps of a shifted
  slice of x times one row of k (an outer product), which XLA fuses into one
  elementwise loop; with several input channels, XLA's convolution;
- input gradient, as kh matmuls and shifted sums:

      dx = sum_i shift_i( sum_j shift_j( (dy @ k[i, j]^T) ) )

  instead of XLA's full convolution of the zero-padded dy (which multiplies
  the padding's zeros too);
- kernel gradient: XLA's own (the vjp of its convolution).

Private: `keras_synann.models.ValidConv2D` calls it under jax on a CPU. Plain
jax (a custom_vjp of jnp and lax ops): every jax transformation and
exporter follows it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

_DIMENSIONS = ("NHWC", "HWIO", "NHWC")


def _xla_conv(x, kernel):
    return lax.conv_general_dilated(
        x, kernel, (1, 1), "VALID", dimension_numbers=_DIMENSIONS
    )


def _tap_sum(x, kernel):
    """sum_{i, j} x[:, i:i+H, j:j+W, :] @ k[i, j]."""
    kh, kw = kernel.shape[:2]
    height, width = x.shape[1] - kh + 1, x.shape[2] - kw + 1
    y = None
    for i in range(kh):
        for j in range(kw):
            term = jnp.matmul(x[:, i : i + height, j : j + width, :], kernel[i, j])
            y = term if y is None else y + term
    return y


def _input_gradient(kernel, dy):
    """dx for y = conv(x, kernel): per kernel row, one matmul by k[i]^T and a
    sum of the kw column shifts, then that row's shift."""
    kh, kw, channels, filters = kernel.shape
    batch, height, width, _ = dy.shape
    dx = None
    for i in range(kh):
        rows = jnp.matmul(dy, kernel[i].reshape(kw * channels, filters).T)
        rows = rows.reshape(batch, height, width, kw, channels)
        row = None
        for j in range(kw):
            shifted = jnp.pad(
                rows[:, :, :, j, :], ((0, 0), (0, 0), (j, kw - 1 - j), (0, 0))
            )
            row = shifted if row is None else row + shifted
        row = jnp.pad(row, ((0, 0), (i, kh - 1 - i), (0, 0), (0, 0)))
        dx = row if dx is None else dx + row
    return dx


@jax.custom_vjp
def conv2d_valid(x, kernel):
    """y = conv(x, kernel), stride 1, "valid", NHWC x HWIO -> NHWC."""
    if kernel.shape[2] == 1:
        return _tap_sum(x, kernel)
    return _xla_conv(x, kernel)


def _forward(x, kernel):
    return conv2d_valid(x, kernel), (x, kernel)


def _backward(residuals, dy):
    x, kernel = residuals
    (dkernel,) = jax.vjp(lambda k: _xla_conv(x, k), kernel)[1](dy)
    return _input_gradient(kernel, dy).astype(x.dtype), dkernel.astype(kernel.dtype)


conv2d_valid.defvjp(_forward, _backward)
