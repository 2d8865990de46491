"""Fused Pallas kernels ("pallas"): jax on a GPU.

The same three kernels as `triton.py`, written with Pallas (lowered
through Triton on NVIDIA GPUs): each program keeps a tile of its output in
registers and loops over the reduced axis, so no (batch, n_in, n_out) tensor
exists.

    forward  s[b, i]  = sum_j log(max(1 - W[j, i] x[b, j], floor))
    backward dx[b, j] = -sum_i g[b, i] W[j, i] / f[b, j, i]
             dW[j, i] = -sum_b g[b, i] x[b, j] / f[b, j, i]
                        (0 where the factor f = 1 - W[j, i] x[b, j] is floored)

Inputs are zero-padded to whole tiles (a padded factor is exactly 1 and a
padded upstream gradient 0), so the kernels need no masks. float32 only. On
a CPU the kernels run in Pallas's interpreter (slow; for tests); TPUs use the
keras.ops path. The keras.ops path is the reference the tests compare with.

The kernels are the forward and adjoint of a `base.Kernel` (its contract is
the reference's), lowered per platform with `lax.platform_dependent`
(Pallas's interpreter on a CPU); a module lowered for export holds the
keras.ops reference instead (with `config.chunk` factors per log, the same
numbers), since XLA gives Triton calls no compatibility guarantee.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from keras_synann.kernels import devices, reference
from keras_synann.kernels._numerics import FACTOR_FLOOR, PRODUCT_FLOOR
from keras_synann.kernels.rules import Kernel
from keras_synann.kernels.tiles import TileConfig

#: The default tiling (measured on an H100: benchmarks/results/gpu/README.md).
CONFIG = TileConfig(block_rows=32, block_cols=64, chunk=16, num_warps=4)
#: The weight gradient sums the batch in slices of this many rows, one set of
#: programs per slice (more parallel work), then adds the slices.
GRAD_W_ROWS = 256


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def _pad_to(a, rows: int, cols: int):
    return jnp.pad(a, ((0, rows - a.shape[0]), (0, cols - a.shape[1])))


def _forward_kernel(xt_ref, w_ref, s_ref, *, floor, product_floor, block, chunk):
    # xt: (n_in, batch); each program reads its rows of x and columns of W.
    rows, cols = block
    b0 = pl.multiple_of(pl.program_id(0) * rows, rows)
    i0 = pl.multiple_of(pl.program_id(1) * cols, cols)

    def body(c, total):
        product = jnp.ones((rows, cols), jnp.float32)
        for k in range(chunk):
            j = c * chunk + k
            xj = xt_ref[j, pl.ds(b0, rows)]
            wj = w_ref[j, pl.ds(i0, cols)]
            product = product * jnp.maximum(1.0 - xj[:, None] * wj[None, :], floor)
        return total + jnp.log(jnp.maximum(product, product_floor))

    n_chunks = xt_ref.shape[0] // chunk
    total = jax.lax.fori_loop(0, n_chunks, body, jnp.zeros((rows, cols), jnp.float32))
    s_ref[...] = total


def _grad_x_kernel(x_ref, wt_ref, gt_ref, dx_ref, *, floor, block, chunk):
    # x: (batch, n_in) tile in x_ref; wt: (n_out, n_in); gt: (n_out, batch).
    rows, cols = block
    b0 = pl.multiple_of(pl.program_id(0) * rows, rows)
    j0 = pl.multiple_of(pl.program_id(1) * cols, cols)
    x = x_ref[...]

    def body(c, acc):
        for k in range(chunk):
            i = c * chunk + k
            gi = gt_ref[i, pl.ds(b0, rows)]
            wi = wt_ref[i, pl.ds(j0, cols)]
            factor = 1.0 - x * wi[None, :]
            q = jnp.where(factor > floor, gi[:, None] / factor, 0.0)
            acc = acc + q * wi[None, :]
        return acc

    n_chunks = wt_ref.shape[0] // chunk
    acc = jax.lax.fori_loop(0, n_chunks, body, jnp.zeros((rows, cols), jnp.float32))
    dx_ref[...] = -acc


def _grad_w_kernel(x_ref, w_ref, g_ref, dw_ref, *, floor, block, chunk, slice_rows):
    # Program (j, i, slice) sums batch rows [slice * slice_rows, ...) of its tile.
    rows, cols = block
    j0 = pl.multiple_of(pl.program_id(0) * rows, rows)
    i0 = pl.multiple_of(pl.program_id(1) * cols, cols)
    first = pl.program_id(2) * slice_rows
    w = w_ref[...]

    def body(c, acc):
        for k in range(chunk):
            b = first + c * chunk + k
            xb = x_ref[b, pl.ds(j0, rows)]
            gb = g_ref[b, pl.ds(i0, cols)]
            factor = 1.0 - xb[:, None] * w
            q = jnp.where(factor > floor, gb[None, :] / factor, 0.0)
            acc = acc + q * xb[:, None]
        return acc

    acc = jax.lax.fori_loop(
        0, slice_rows // chunk, body, jnp.zeros((rows, cols), jnp.float32)
    )
    dw_ref[...] = -acc[None]


def _whole(shape):
    """A BlockSpec handing every program the whole (padded) array."""
    return pl.BlockSpec(shape, lambda *_: (0,) * len(shape))


def _tile(rows: int, cols: int):
    """A BlockSpec handing program (r, c, ...) its (rows, cols) tile."""
    return pl.BlockSpec((rows, cols), lambda r, c, *_: (r, c))


def _call(kernel, config, out_shape, grid, in_specs, out_spec, interpret, **kw):
    """`kernel` as a pallas_call with the tiling of `config` (block, chunk, floor)."""
    params = {}
    if not interpret:
        from jax.experimental.pallas import triton as pl_triton

        params["compiler_params"] = pl_triton.CompilerParams(
            num_warps=config.num_warps, num_stages=1
        )
    return pl.pallas_call(
        functools.partial(
            kernel,
            block=(config.block_rows, config.block_cols),
            chunk=config.chunk,
            floor=FACTOR_FLOOR,
            **kw,
        ),
        out_shape=jax.ShapeDtypeStruct(out_shape, jnp.float32),
        grid=grid,
        in_specs=in_specs,
        out_specs=out_spec,
        interpret=interpret,
        **params,
    )


def _forward(x, kernel, config: TileConfig, interpret: bool):
    rows, cols, chunk = config.block_rows, config.block_cols, config.chunk
    batch, n_in = x.shape
    n_out = kernel.shape[1]
    b_pad, n_pad = _round_up(batch, rows), _round_up(n_in, chunk)
    o_pad = _round_up(n_out, cols)
    xt = _pad_to(x.T, n_pad, b_pad)
    w = _pad_to(kernel, n_pad, o_pad)
    s = _call(
        _forward_kernel, config, (b_pad, o_pad), (b_pad // rows, o_pad // cols),
        [_whole(xt.shape), _whole(w.shape)], _tile(rows, cols), interpret,
        product_floor=PRODUCT_FLOOR,
    )(xt, w)  # fmt: skip
    return s[:batch, :n_out]


def _backward(x, kernel, g, config: TileConfig, interpret: bool):
    rows, cols, chunk = config.block_rows, config.block_cols, config.chunk
    batch, n_in = x.shape
    n_out = kernel.shape[1]
    # d x: tiles of (batch, n_in), looping over the output units.
    b_pad, j_pad = _round_up(batch, rows), _round_up(n_in, cols)
    o_pad = _round_up(n_out, chunk)
    xp = _pad_to(x, b_pad, j_pad)
    wt = _pad_to(kernel.T, o_pad, j_pad)
    gt = _pad_to(g.T, o_pad, b_pad)
    dx = _call(
        _grad_x_kernel, config, (b_pad, j_pad), (b_pad // rows, j_pad // cols),
        [_tile(rows, cols), _whole(wt.shape), _whole(gt.shape)], _tile(rows, cols),
        interpret,
    )(xp, wt, gt)[:batch, :n_in]  # fmt: skip
    # d W: tiles of (n_in, n_out), one partial sum per slice of the batch.
    parts = -(-batch // GRAD_W_ROWS)
    slice_rows = _round_up(-(-batch // parts), chunk)
    jw_pad, ow_pad = _round_up(n_in, rows), _round_up(n_out, cols)
    xw = _pad_to(x, parts * slice_rows, jw_pad)
    gw = _pad_to(g, parts * slice_rows, ow_pad)
    w = _pad_to(kernel, jw_pad, ow_pad)
    dw = _call(
        _grad_w_kernel, config, (parts, jw_pad, ow_pad),
        (jw_pad // rows, ow_pad // cols, parts),
        [_whole(xw.shape), _tile(rows, cols), _whole(gw.shape)],
        pl.BlockSpec((1, rows, cols), lambda j, i, p: (p, j, i)), interpret,
        slice_rows=slice_rows,
    )(xw, w, gw)  # fmt: skip
    return dx, jnp.sum(dw, axis=0)[:n_in, :n_out]


def _on_platform(fn, config: TileConfig):
    """fn compiled for the GPU, in Pallas's interpreter on a CPU."""

    def per_platform(*args):
        return jax.lax.platform_dependent(
            *args,
            cpu=functools.partial(fn, config=config, interpret=True),
            default=functools.partial(fn, config=config, interpret=False),
        )

    return per_platform


def _reasons(x, kernel, auto: bool) -> list[str]:
    """Explicit requests may run in Pallas's interpreter on a CPU (for tests);
    "auto" takes the kernels on a single GPU only (XLA can partition the
    keras.ops path across several devices, not a Pallas call)."""
    del x, kernel
    count, platform = devices.jax_devices()
    if platform == "tpu":
        return ["the Pallas kernels target GPUs (Pallas's Triton lowering), not TPUs"]
    if auto and (count, platform) != (1, "gpu"):
        return [
            "'auto' takes the Pallas kernels on a single GPU "
            f"(jax has {count} {platform} device(s))"
        ]
    return []


@functools.cache
def kernel_for(config: TileConfig) -> Kernel:
    """The kernels with one tiling: `config.chunk` factors per log (and so does
    the reference they export as), whatever the caller's `chunk_size`."""
    forward = _on_platform(_forward, config)
    backward = _on_platform(_backward, config)
    return Kernel(
        lambda x, kernel, chunk: forward(x, kernel),
        lambda x, kernel, u, chunk: backward(x, kernel, u),
        reference.contract,
        chunk=config.chunk,
        reasons=_reasons,
    )


KERNEL = kernel_for(CONFIG)


def log_inhibition(x, kernel, chunk: int, config: TileConfig = CONFIG):
    """`s = sum_j log(max(1 - W[j, i] x[b, j], floor))` for float32 jax arrays,
    differentiable to every order (`chunk` does not apply: see `kernel_for`)."""
    from keras_synann.kernels.jax import primitives

    del chunk
    return primitives.log_inhibition(
        kernel_for(config), x, kernel, min(config.chunk, int(kernel.shape[0]))
    )
