"""A fused kernel as jax primitives that lower to the reference for export.

    s = forward(x, kernel)                  (batch, n_in), (n_in, n_out) -> (batch, n_out)
    (dx, dkernel) = backward(x, kernel, u)  the vjp of sum(u * s)

`define` makes the two primitives of one kernel and joins them with
`jax.custom_vjp`. Each lowers, per platform, to the kernel registered for
that platform (the C loops as an XLA FFI call on a CPU, Pallas on a GPU),
and to the keras.ops reference (`kernels.reference`) on every other
platform and whenever the lowering is for export (`jax.export`, jax2tf,
Keras's `model.export(format="tf_saved_model")` under jax). So `jax.jit`
runs the kernel while a serialized module holds only standard ops, which
any XLA runtime can load. Eager calls run a jitted bind; `jax.vmap` folds a
mapped batch into the forward's batch and maps the backward one slice at a
time. When jax2onnx is imported, both primitives get a jax2onnx plugin that
converts them as the reference too (`kernels.jax_onnx`).
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable, Mapping

import jax
import jax.numpy as jnp
from jax.core import ShapedArray
from jax.extend.core import Primitive
from jax.interpreters import batching, mlir

from keras_synann.kernels import reference

#: A kernel's forward f(x, kernel, **params) -> s and backward
#: b(x, kernel, u, **params) -> (dx, dkernel), both traceable by jax.
Pair = tuple[Callable, Callable]


def define(name: str, kernels: Mapping[str, Pair]) -> Callable:
    """`f(x, kernel, **params) -> s`, differentiable, for the kernels of `kernels`.

    Args:
        name: the primitives are `{name}_forward` and `{name}_backward`.
        kernels: platform ("cpu", "cuda", "rocm") -> (forward, backward).
            Each is called with the primitive's params as keywords; `chunk`
            (input units per log, <= n_in) is always among them, since the
            reference needs it.

    Returns:
        f(x, kernel, **params); params must be hashable.
    """
    forward = Primitive(f"{name}_forward")
    backward = Primitive(f"{name}_backward")
    backward.multiple_results = True
    for primitive in (forward, backward):
        primitive.def_impl(functools.partial(_jitted_bind, primitive))
    forward.def_abstract_eval(
        lambda x, kernel, **_: ShapedArray((x.shape[0], kernel.shape[1]), x.dtype)
    )
    backward.def_abstract_eval(
        lambda x, kernel, u, **_: (
            ShapedArray(x.shape, x.dtype),
            ShapedArray(kernel.shape, kernel.dtype),
        )
    )
    reference_forward = mlir.lower_fun(_reference_forward, multiple_results=False)
    reference_backward = mlir.lower_fun(_reference_backward, multiple_results=True)
    mlir.register_lowering(forward, reference_forward)
    mlir.register_lowering(backward, reference_backward)
    for platform, (fast_forward, fast_backward) in kernels.items():
        mlir.register_lowering(
            forward,
            _unless_exporting(mlir.lower_fun(fast_forward, False), reference_forward),
            platform=platform,
        )
        mlir.register_lowering(
            backward,
            _unless_exporting(mlir.lower_fun(fast_backward, True), reference_backward),
            platform=platform,
        )
    batching.primitive_batchers[forward] = functools.partial(_batch_forward, forward)
    batching.primitive_batchers[backward] = functools.partial(_batch_map, backward)

    @functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
    def apply(x, kernel, params):
        return forward.bind(x, kernel, **dict(params))

    def apply_forward(x, kernel, params):
        return apply(x, kernel, params), (x, kernel)

    def apply_backward(params, residuals, u):
        x, kernel = (jnp.asarray(a) for a in residuals)
        d_x, d_kernel = backward.bind(x, kernel, u.astype(x.dtype), **dict(params))
        return d_x, d_kernel

    apply.defvjp(apply_forward, apply_backward)

    def log_inhibition(x, kernel, **params):
        if "jax2onnx" in sys.modules:  # Keras's model.export(format="onnx")
            from keras_synann.kernels import jax_onnx

            jax_onnx.register(forward.name, _reference_forward)
            jax_onnx.register(backward.name, _reference_backward)
        return apply(x, kernel, tuple(sorted(params.items())))

    return log_inhibition


def _reference_forward(x, kernel, *, chunk, **_):
    return reference.forward(x, kernel, chunk)


def _reference_backward(x, kernel, u, *, chunk, **_):
    return list(reference.backward(x, kernel, u, chunk))


def _unless_exporting(rule, reference_rule):
    """`rule`, except where the module is lowered for export: `reference_rule`."""

    def lowering(ctx, *args, **params):
        if ctx.module_context.lowering_parameters.for_export:
            return reference_rule(ctx, *args, **params)
        return rule(ctx, *args, **params)

    return lowering


@functools.cache
def _jitted(primitive: Primitive, params: tuple):
    return jax.jit(lambda *args: primitive.bind(*args, **dict(params)))


def _jitted_bind(primitive: Primitive, *args, **params):
    """An eager call: the primitive alone, compiled (its lowering is per platform)."""
    return _jitted(primitive, tuple(sorted(params.items())))(*args)


def _batch_forward(forward: Primitive, args, dims, **params):
    """vmap of the forward: a mapped x with a shared kernel is one larger batch."""
    x, kernel = args
    x_dim, kernel_dim = dims
    if kernel_dim is not None:
        return _batch_map(forward, args, dims, **params)
    x = jnp.moveaxis(x, x_dim, 0)
    mapped, batch, n_in = x.shape
    s = forward.bind(x.reshape(mapped * batch, n_in), kernel, **params)
    return s.reshape(mapped, batch, s.shape[-1]), 0


def _batch_map(primitive: Primitive, args, dims, **params):
    """vmap by `lax.map`: one call of the primitive per mapped slice."""
    mapped = [
        jnp.moveaxis(a, d, 0) for a, d in zip(args, dims, strict=True) if d is not None
    ]

    def one(slices):
        it = iter(slices)
        call_args = [
            a if d is None else next(it) for a, d in zip(args, dims, strict=True)
        ]
        return primitive.bind(*call_args, **params)

    out = jax.lax.map(one, mapped)
    if primitive.multiple_results:
        return out, [0] * len(out)
    return out, 0
