"""Fused Triton kernels ("triton"): torch on a CUDA GPU.

Each kernel computes a tile of its output in registers and loops over the
reduced axis, so no (batch, n_in, n_out) tensor and no chunk buffer exists:

    forward  s[b, i]  = sum_j log(max(1 - W[j, i] x[b, j], floor))
                        (one log per CHUNK factors; products floored at
                        float32's smallest normal number, as in the ops path)
    backward dx[b, j] = -sum_i g[b, i] W[j, i] / f[b, j, i]
             dW[j, i] = -sum_b g[b, i] x[b, j] / f[b, j, i]
                        (0 where the factor f = 1 - W[j, i] x[b, j] is floored)

float32 only. The keras.ops path is the reference: tests run these kernels in
Triton's interpreter (TRITON_INTERPRET=1, CPU tensors) against it. Like the
C loops, a launch is invisible to torch's tracers; "auto" takes the keras.ops
path under them. The contractions of the higher derivatives are the
reference's.
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

from keras_synann.kernels import reference
from keras_synann.kernels._numerics import FACTOR_FLOOR, PRODUCT_FLOOR
from keras_synann.kernels.rules import Kernel
from keras_synann.kernels.tiles import TileConfig

#: The default tiling (measured on an H100: benchmarks/results/gpu/README.md).
CONFIG = TileConfig(block_rows=16, block_cols=64, chunk=16, num_warps=4)
#: The weight gradient splits the batch into slices of this many rows, each
#: summed by its own programs (more parallel work), then adds the slices.
GRAD_W_ROWS = 256


@triton.jit
def _block(n_rows, n_cols, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """This program's (BLOCK_R, BLOCK_C) block of an (n_rows, n_cols) array
    (grid axes 0 and 1): its row and column indices and their masks."""
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    return r, c, r < n_rows, c < n_cols


@triton.jit
def _forward(
    xt_ptr, w_ptr, s_ptr, batch, n_pad, n_out, floor, product_floor,
    BLOCK_B: tl.constexpr, BLOCK_I: tl.constexpr, CHUNK: tl.constexpr,
):  # fmt: skip
    """s[b, i] = sum over chunks of log(prod_j max(1 - W[j, i] x[b, j], floor))
    for one (batch, n_out) block. xt is x transposed, (n_pad, batch), so each
    j's column loads contiguously; xt and w are zero-padded to n_pad, a
    multiple of CHUNK input units (a padded factor is exactly 1)."""
    rb, ri, in_b, in_i = _block(batch, n_out, BLOCK_B, BLOCK_I)
    total = tl.zeros((BLOCK_B, BLOCK_I), dtype=tl.float32)
    for start in range(0, n_pad, CHUNK):
        product = tl.full((BLOCK_B, BLOCK_I), 1.0, dtype=tl.float32)
        for k in tl.static_range(CHUNK):
            j = start + k
            xj = tl.load(xt_ptr + j * batch + rb, mask=in_b, other=0.0)
            wj = tl.load(w_ptr + j * n_out + ri, mask=in_i, other=0.0)
            factor = 1.0 - xj[:, None] * wj[None, :]
            product = product * tl.maximum(factor, floor)
        total += tl.log(tl.maximum(product, product_floor))
    tl.store(
        s_ptr + rb[:, None] * n_out + ri[None, :],
        total,
        mask=in_b[:, None] & in_i[None, :],
    )


@triton.jit
def _quotient(g, factor, floor):
    """g / factor, 0 where the factor is floored (it passes no gradient)."""
    return tl.where(factor > floor, g / factor, 0.0)


@triton.jit
def _grad_x(
    x_ptr, wt_ptr, gt_ptr, dx_ptr, batch, n_in, n_pad, floor,
    BLOCK_B: tl.constexpr, BLOCK_J: tl.constexpr, CHUNK: tl.constexpr,
):  # fmt: skip
    """dx[b, j] = -sum_i g[b, i] W[j, i] / f[b, j, i] for one (batch, n_in)
    block. gt and wt are g and W transposed, (n_pad, batch) and (n_pad, n_in),
    zero-padded to n_pad, a multiple of CHUNK output units (g = 0 there)."""
    rb, rj, in_b, in_j = _block(batch, n_in, BLOCK_B, BLOCK_J)
    x = tl.load(
        x_ptr + rb[:, None] * n_in + rj[None, :],
        mask=in_b[:, None] & in_j[None, :],
        other=0.0,
    )
    acc = tl.zeros((BLOCK_B, BLOCK_J), dtype=tl.float32)
    for start in range(0, n_pad, CHUNK):
        for k in tl.static_range(CHUNK):
            i = start + k
            gi = tl.load(gt_ptr + i * batch + rb, mask=in_b, other=0.0)
            wi = tl.load(wt_ptr + i * n_in + rj, mask=in_j, other=0.0)
            q = _quotient(gi[:, None], 1.0 - x * wi[None, :], floor)
            acc += q * wi[None, :]
    tl.store(
        dx_ptr + rb[:, None] * n_in + rj[None, :],
        -acc,
        mask=in_b[:, None] & in_j[None, :],
    )


@triton.jit
def _grad_w(
    x_ptr, w_ptr, g_ptr, dw_ptr, n_in, n_out, floor, rows,
    BLOCK_J: tl.constexpr, BLOCK_I: tl.constexpr, CHUNK: tl.constexpr,
):  # fmt: skip
    """dW[j, i] = -sum_b g[b, i] x[b, j] / f[b, j, i] for one (n_in, n_out)
    block, over batch rows [slice * rows, (slice + 1) * rows) of program
    (j, i, slice), into dw[slice] (the caller adds the slices). x and g are
    zero-padded to whole slices, `rows` a multiple of CHUNK (g = 0 there)."""
    rj, ri, in_j, in_i = _block(n_in, n_out, BLOCK_J, BLOCK_I)
    part = tl.program_id(2)
    w = tl.load(
        w_ptr + rj[:, None] * n_out + ri[None, :],
        mask=in_j[:, None] & in_i[None, :],
        other=0.0,
    )
    acc = tl.zeros((BLOCK_J, BLOCK_I), dtype=tl.float32)
    for start in range(part * rows, part * rows + rows, CHUNK):
        for k in tl.static_range(CHUNK):
            b = start + k
            xb = tl.load(x_ptr + b * n_in + rj, mask=in_j, other=0.0)
            gb = tl.load(g_ptr + b * n_out + ri, mask=in_i, other=0.0)
            q = _quotient(gb[None, :], 1.0 - xb[:, None] * w, floor)
            acc += q * xb[:, None]
    tl.store(
        dw_ptr + part * n_in * n_out + rj[:, None] * n_out + ri[None, :],
        -acc,
        mask=in_j[:, None] & in_i[None, :],
    )


def _grid(*sizes_and_blocks):
    return tuple(triton.cdiv(size, block) for size, block in sizes_and_blocks)


def _padded(t, rows: int):
    """`t` (2-D) made contiguous with zero rows appended up to `rows` rows."""
    if t.shape[0] == rows:
        return t.contiguous()
    out = t.new_zeros((rows, t.shape[1]))
    out[: t.shape[0]] = t
    return out


def _reasons(x, kernel, auto: bool) -> list[str]:
    """Explicit requests may run in Triton's interpreter on CPU tensors
    (TRITON_INTERPRET=1, for tests); "auto" takes compiled kernels only."""
    interpreted = os.environ.get("TRITON_INTERPRET") == "1"
    if (x.is_cuda and kernel.is_cuda) or (interpreted and not auto):
        return []
    return [
        "the Triton kernels need CUDA tensors (or Triton's interpreter: "
        f"TRITON_INTERPRET=1 before import; received tensors on {x.device})"
    ]


def forward(x, kernel, chunk: int, config: TileConfig = CONFIG):
    """s (batch, n_out) for float32 tensors (no autograd). `chunk` is the
    keras.ops path's and does not apply: the kernels multiply `config.chunk`
    factors per log (see `TileConfig`)."""
    del chunk
    rows, cols, chunk = config.block_rows, config.block_cols, config.chunk
    x, kernel = x.contiguous(), kernel.contiguous()
    batch, n_in = x.shape
    n_out = kernel.shape[1]
    s = x.new_empty((batch, n_out))
    n_pad = triton.cdiv(n_in, chunk) * chunk
    _forward[_grid((batch, rows), (n_out, cols))](
        _padded(x.t(), n_pad), _padded(kernel, n_pad), s,
        batch, n_pad, n_out, FACTOR_FLOOR, PRODUCT_FLOOR,
        BLOCK_B=rows, BLOCK_I=cols, CHUNK=chunk, num_warps=config.num_warps,
    )  # fmt: skip
    return s


def adjoint(x, kernel, upstream, chunk: int, config: TileConfig = CONFIG):
    """(dx, dW) of sum(upstream * s) by the two gradient kernels."""
    del chunk
    rows, cols, chunk = config.block_rows, config.block_cols, config.chunk
    x, kernel, g = x.contiguous(), kernel.contiguous(), upstream.contiguous()
    batch, n_in = x.shape
    n_out = kernel.shape[1]
    dx = torch.empty_like(x)
    n_pad = triton.cdiv(n_out, chunk) * chunk
    _grad_x[_grid((batch, rows), (n_in, cols))](
        x, _padded(kernel.t(), n_pad), _padded(g.t(), n_pad), dx,
        batch, n_in, n_pad, FACTOR_FLOOR,
        BLOCK_B=rows, BLOCK_J=cols, CHUNK=chunk, num_warps=config.num_warps,
    )  # fmt: skip
    parts = triton.cdiv(batch, GRAD_W_ROWS)
    slice_rows = triton.cdiv(triton.cdiv(batch, parts), chunk) * chunk
    dw = x.new_empty((parts, n_in, n_out))
    _grad_w[_grid((n_in, rows), (n_out, cols)) + (parts,)](
        _padded(x, parts * slice_rows), kernel, _padded(g, parts * slice_rows), dw,
        n_in, n_out, FACTOR_FLOOR, slice_rows,
        BLOCK_J=rows, BLOCK_I=cols, CHUNK=chunk, num_warps=config.num_warps,
    )  # fmt: skip
    return dx, dw.sum(0) if parts > 1 else dw[0]


@functools.cache
def kernel_for(config: TileConfig) -> Kernel:
    """The kernels with one tiling: `config.chunk` factors per log, whatever
    the caller's `chunk_size`; the contractions are the reference's."""
    return Kernel(
        functools.partial(forward, config=config),
        functools.partial(adjoint, config=config),
        reference.contract,
        chunk=config.chunk,
        reasons=_reasons,
    )


KERNEL = kernel_for(CONFIG)


def log_inhibition(x, kernel, chunk: int, config: TileConfig = CONFIG):
    """`s = sum_j log(max(1 - W[j, i] x[b, j], floor))`, differentiable to every
    order (`functions`), for float32 torch tensors (`chunk` does not apply)."""
    from keras_synann.kernels.torch import functions

    return functions.log_inhibition(kernel_for(config), x, kernel, chunk)
