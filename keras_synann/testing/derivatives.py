"""`check_derivatives`: every derivative transform of the backend through
Synapse, against the same transform of the plain formula in float64."""

from __future__ import annotations

import keras
import numpy as np
from keras import ops

from keras_synann.testing import transforms as transforms_module

#: The transforms `check_derivatives` runs, per backend.
TRANSFORMS = {
    "jax": (
        "grad", "gradient_penalty", "hvp", "third_order", "jvp", "linearize",
        "forward_over_reverse_hvp", "jacrev", "jacfwd", "hessian", "vmap",
        "per_sample_grads",
    ),
    "torch": (
        "grad", "gradient_penalty", "hvp", "third_order", "jvp", "forward_ad",
        "forward_over_reverse_hvp", "jacrev", "jacfwd", "vmap", "func_grad",
        "per_sample_grads",
    ),
    "tensorflow": (
        "grad", "gradient_penalty", "hvp", "third_order", "jvp",
        "forward_over_reverse_hvp", "batch_jacobian", "jacobian", "vmap",
        "per_sample_grads",
    ),
}  # fmt: skip

#: The factor floor of the plain formula (keras_synann.ops.FACTOR_FLOOR).
_FLOOR = 1e-6


def derivative_inputs(batch: int = 3, n: int = 6, floored: bool = False, seed: int = 0):
    """float64 NumPy (x, kernel, alpha, vx, vkernel) for `check_derivatives`:
    x uniform in [0.05, 0.95], beta in [0, 0.6), alpha in [1, 2), directions
    standard normal. `floored` sets some factors to 1 - 1 * (1 - 5e-7) < 1e-6
    (floored; x stays inside the layer's clip to [0, 1])."""
    rng = np.random.default_rng(seed)
    x = rng.uniform(0.05, 0.95, (batch, n))
    kernel = rng.uniform(0.0, 0.6, (n, n))
    alpha = rng.uniform(1.0, 2.0, (n,))
    if floored:
        x[0, :2] = 1.0 - 5e-7
        kernel[:2, 1:3] = 1.0
    return x, kernel, alpha, rng.normal(size=x.shape), rng.normal(size=kernel.shape)


def check_derivatives(
    implementation: str = "auto",
    *,
    use_alpha: bool = False,
    zero_diagonal: bool = False,
    series_order: int | None = None,
    floored: bool = False,
    compiled: bool = False,
    transforms: tuple[str, ...] | None = None,
    input_dtype: str = "float32",
    batch: int = 3,
    n: int = 6,
    rtol: float = 1e-5,
) -> dict[str, float]:
    """Checks the derivatives of a Synapse configuration on the running backend.

    For y = synapse_graph(x, W) (float32, the given implementation and
    variant) and L = sum(y ** 2), each transform of `TRANSFORMS[backend]`
    (first order; gradient penalty d/dW sum((dL/dx) ** 2); Hessian-vector
    product by reverse over reverse and forward over reverse; a third order;
    forward mode; Jacobians; vectorising maps and per-sample gradients) is
    compared with the same transform of the plain formula

        y_i = alpha_i x_i prod_j max(1 - W[j, i] x_j, 1e-6)

    written with the backend's own ops in float64 (no keras_synann code).
    `compiled` runs ours inside jax.jit / tf.function / torch.compile (the
    reference, whose numbers do not depend on it, as it is).
    `input_dtype="float16"` casts x and W to float16 before the layer (mixed
    precision: the layer accumulates in float32); the reference then starts
    from the same rounded inputs.

    Returns:
        {transform: max |ours - reference| / max |reference|}.

    Raises:
        AssertionError: naming every transform whose error exceeds `rtol`.
    """
    backend = keras.backend.backend()
    names = transforms or TRANSFORMS[backend]
    x, kernel, alpha, vx, vw = derivative_inputs(batch, n, floored)
    if input_dtype != "float32":
        x = x.astype(input_dtype).astype(np.float64)
        kernel = kernel.astype(input_dtype).astype(np.float64)
    config = {
        "input_dtype": input_dtype,
        "implementation": implementation,
        "alpha": alpha if use_alpha else None,
        "zero_diagonal": zero_diagonal,
        "series_order": series_order,
    }
    ours, reference = _evaluate(config, names, compiled, (x, kernel, vx, vw))
    errors = {}
    for name in names:
        got = [np.asarray(a, np.float64) for a in ours[name]]
        want = [np.asarray(a, np.float64) for a in reference[name]]
        scale = max(float(np.max(np.abs(w))) for w in want) or 1.0
        errors[name] = (
            max(float(np.max(np.abs(g - w))) for g, w in zip(got, want, strict=True))
            / scale
        )
    bad = {k: v for k, v in errors.items() if not v <= rtol}
    if bad:
        raise AssertionError(
            f"derivatives of Synapse ({backend}, {config['implementation']}) off by "
            f"more than {rtol:g} (relative): {bad}"
        )
    return errors


def synapse_derivatives(
    implementation: str = "auto",
    transforms: tuple[str, ...] = ("grad", "hvp"),
    inputs: tuple | None = None,
) -> dict[str, list[np.ndarray]]:
    """The transforms of `check_derivatives` through Synapse alone, as NumPy.

    `inputs` is (x, kernel, vx, vkernel) in float64 NumPy (default: those of
    `derivative_inputs`), computed in float32; L = sum(y ** 2).
    """
    if inputs is None:
        x, kernel, _, vx, vw = derivative_inputs()
    else:
        x, kernel, vx, vw = inputs
    config = {
        "implementation": implementation,
        "alpha": None,
        "zero_diagonal": False,
        "series_order": None,
        "input_dtype": "float32",
    }
    ours, _ = _evaluate(config, transforms, False, (x, kernel, vx, vw), False)
    return ours


def _synapse_fn(config):
    """y(x, W) through keras_synann for the configuration."""
    from keras_synann import ops as synann_ops

    def fn(x, w):
        if config["input_dtype"] != "float32":
            x = ops.cast(x, config["input_dtype"])
            w = ops.cast(w, config["input_dtype"])
        if config["zero_diagonal"]:
            w = w * (1.0 - ops.eye(w.shape[0], dtype=w.dtype))
        return synann_ops.synapse_graph(
            x,
            w,
            alpha=config["alpha_tensor"],
            implementation=config["implementation"],
            series_order=config["series_order"],
        )

    return fn


def _plain_fn(config, xp):
    """y(x, W) as the plain float64 formula, in the backend namespace `xp`."""

    def fn(x, w):
        if config["zero_diagonal"]:
            w = w * (1.0 - xp.eye(w.shape[0], dtype=w.dtype))
        if config["series_order"] is None:
            f = xp.maximum(1.0 - x[..., :, None] * w, _FLOOR)
            s = xp.sum(xp.log(f), -2)
        else:
            s = 0.0
            for k in range(1, config["series_order"] + 1):
                s = s - (x**k) @ (w**k) / k
        y = x * xp.exp(s)
        if config["alpha_tensor"] is not None:
            y = y * config["alpha_tensor"]
        return y

    return fn


def _evaluate(config, names, compiled, inputs, with_reference=True):
    """({transform: NumPy arrays} through Synapse in float32, the same of the
    plain formula in float64 or None) for `inputs` (x, W, vx, vW)."""
    backend = transforms_module.backend()

    def run(fn, dtype, compiled):
        alpha = config["alpha"]
        if alpha is not None:
            alpha = backend.tensor(alpha, dtype)
        table = backend.table(fn({**config, "alpha_tensor": alpha}))
        args = [backend.tensor(a, dtype) for a in inputs]
        out = {}
        for name in names:
            transform = backend.compile(table[name]) if compiled else table[name]
            out[name] = backend.numpy(transform(*args))
        return out

    ours = run(_synapse_fn, "float32", compiled)
    if not with_reference:
        return ours, None
    with backend.float64():
        reference = run(
            lambda cfg: _plain_fn(cfg, backend.namespace), "float64", compiled=False
        )
    return ours, reference
