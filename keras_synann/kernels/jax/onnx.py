"""The jax primitives of `log_inhibition` for jax2onnx: each becomes the reference.

Keras exports a jax model to ONNX with jax2onnx, which converts a jaxpr
primitive by primitive and knows only the primitives it has a plugin for.
The four primitives of `primitives` would stop the conversion, so each
one gets a plugin here that lowers it as the jaxpr of the keras.ops
reference (`kernels.reference`), inlined where the primitive stood: the ONNX
graph holds the reference's standard operators, just as `jax.export` holds
the reference's StableHLO.

`register(primitive_name, reference)` is called by `primitives`
when jax2onnx is imported (so importing keras_synann never imports it); it
is idempotent.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import numpy as np

_REGISTERED: set[str] = set()


def register(primitive_name: str, reference: Callable) -> None:
    """Teach jax2onnx to lower `primitive_name` as `reference(*inputs, **params)`."""
    if primitive_name in _REGISTERED:
        return
    from jax2onnx.plugins.jax.lax._control_flow_utils import lower_jaxpr_eqns
    from jax2onnx.plugins.plugin_system import PrimitiveLeafPlugin, register_primitive

    class _AsReference(PrimitiveLeafPlugin):
        def lower(self, ctx, eqn) -> None:
            avals = [
                jax.ShapeDtypeStruct(v.aval.shape, v.aval.dtype) for v in eqn.invars
            ]
            closed = jax.make_jaxpr(functools.partial(reference, **eqn.params))(*avals)
            inner = closed.jaxpr
            for var, value in zip(inner.constvars, closed.consts, strict=True):
                ctx.bind_const_for_var(var, np.asarray(value))
            for outer, var in zip(eqn.invars, inner.invars, strict=True):
                ctx.bind_value_for_var(var, ctx.get_value_for_var(outer))
            lower_jaxpr_eqns(ctx, inner, source=primitive_name)
            for outer, var in zip(eqn.outvars, inner.outvars, strict=True):
                ctx.bind_value_for_var(outer, ctx.get_value_for_var(var))

    register_primitive(
        jaxpr_primitive=primitive_name,
        jax_doc=__name__,
        onnx=[],
        since="keras_synann",
        context="primitives.keras_synann",
        component=primitive_name,
        testcases=[],
    )(_AsReference)
    _REGISTERED.add(primitive_name)
