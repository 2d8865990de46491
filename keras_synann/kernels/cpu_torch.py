"""The C loops under torch: an autograd.Function calling them through ctypes
on the tensors' own memory (float32 CPU tensors, made contiguous).

The library is built with OpenMP ("openmp" variant): in a torch process the
loader gives it torch's libgomp, so the loops and torch share one pool of
`torch.get_num_threads()` threads.
"""

from __future__ import annotations

import torch

from keras_synann.kernels import cpu_build
from keras_synann.kernels._numerics import FACTOR_FLOOR, PRODUCT_FLOOR

VARIANT = "openmp"


def unavailable() -> str | None:
    """Why the loops cannot run here (None: they are built and loaded)."""
    return cpu_build.unavailable(VARIANT)


class _LogInhibition(torch.autograd.Function):
    """One pass of the loops forward, one pass backward."""

    @staticmethod
    def forward(ctx, x, kernel, chunk):
        lib = cpu_build.load(VARIANT)
        x_c, w_c = x.detach().contiguous(), kernel.detach().contiguous()
        batch, (n_in, n_out) = x.shape[0], kernel.shape
        s = x.new_empty((batch, n_out))
        lib.synann_forward(
            x_c.data_ptr(), w_c.data_ptr(), s.data_ptr(), batch, n_in, n_out,
            chunk, FACTOR_FLOOR, PRODUCT_FLOOR, torch.get_num_threads(),
        )  # fmt: skip
        ctx.save_for_backward(x_c, w_c)
        return s

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, upstream):
        x, kernel = ctx.saved_tensors
        u = upstream.contiguous()
        d_x, d_w = torch.empty_like(x), torch.empty_like(kernel)
        batch, (n_in, n_out) = x.shape[0], kernel.shape
        cpu_build.load(VARIANT).synann_backward(
            x.data_ptr(), kernel.data_ptr(), u.data_ptr(), d_x.data_ptr(),
            d_w.data_ptr(), batch, n_in, n_out, FACTOR_FLOOR, torch.get_num_threads(),
        )  # fmt: skip
        return d_x, d_w, None


def log_inhibition(x, kernel, chunk: int):
    """s for float32 CPU tensors x (batch, n_in) and kernel (n_in, n_out)."""
    return _LogInhibition.apply(x, kernel, chunk)
