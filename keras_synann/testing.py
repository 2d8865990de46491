"""Helpers for tests and benchmarks: independent float64 NumPy references and a
backend-native `value_and_grad`.

The NumPy functions here never call keras: they restate the paper's formulas
directly, so they can check the keras.ops implementation on every backend.
"""

from __future__ import annotations

from collections.abc import Callable

import keras
import numpy as np


def numpy_log_inhibition(x, kernel) -> np.ndarray:
    """`s_i = sum_j log(1 - beta_ij x_j)` per sample of a 2-D x, in float64."""
    x = np.asarray(x, np.float64)
    kernel = np.asarray(kernel, np.float64)
    # One sample at a time: the straightforward statement of the formula.
    return np.stack([np.log1p(-row[:, None] * kernel).sum(axis=0) for row in x])


def numpy_synapse_graph(x, kernel, alpha=None) -> np.ndarray:
    """`y_i = alpha_i x_i prod_j (1 - beta_ij x_j)` per sample, in float64.

    `x` is (..., n), `kernel` is (n, n) with beta_ij = kernel[j, i]. No clipping:
    call it with x in [0, 1] and beta in [0, 1).
    """
    x = np.asarray(x, np.float64)
    flat = x.reshape(-1, x.shape[-1])
    y = flat * np.exp(numpy_log_inhibition(flat, kernel))
    if alpha is not None:
        y = y * np.asarray(alpha, np.float64)
    return y.reshape(x.shape)


def numpy_synapse_graph_grads(x, kernel, upstream):
    """Closed-form gradients of `sum(upstream * y)` for y = numpy_synapse_graph(x, W).

    dy_i/dbeta_ij = -x_j y_i / (1 - beta_ij x_j)
    dy_i/dx_j     = [i == j] y_i / x_i - beta_ij y_i / (1 - beta_ij x_j)

    Returns (d_x, d_kernel) in float64, for a 2-D x with entries in (0, 1].
    """
    x = np.asarray(x, np.float64)
    kernel = np.asarray(kernel, np.float64)
    g = np.asarray(upstream, np.float64)
    y = numpy_synapse_graph(x, kernel)
    gy = g * y  # (b, i)
    f = 1.0 - x[:, :, None] * kernel[None]  # (b, j, i)
    d_kernel = -np.einsum("bi,bj,bji->ji", gy, x, 1.0 / f)
    d_x = gy / x - np.einsum("bi,ji,bji->bj", gy, kernel, 1.0 / f)
    return d_x, d_kernel


def numpy_series_log_inhibition(x, kernel, order: int) -> np.ndarray:
    """The order-K Taylor series of `s_i = sum_j log(1 - a_ij)`, a_ij = beta_ij x_j:
    `-sum_j sum_{k=1..K} a_ij^k / k` per sample, in float64 (term by term, as
    written, not as the matmuls keras_synann uses)."""
    x = np.asarray(x, np.float64)
    kernel = np.asarray(kernel, np.float64)
    rows = []
    for row in x:
        a = row[:, None] * kernel  # (j, i)
        rows.append(-sum((a**k / k).sum(axis=0) for k in range(1, order + 1)))
    return np.stack(rows)


def numpy_series_log_inhibition_grads(x, kernel, upstream, order: int):
    """Gradients of `sum(upstream * s)` for the order-K series s, in float64:

    ds_i/dx_j     = -sum_k beta_ij^k x_j^(k-1)
    ds_i/dbeta_ij = -sum_k x_j^k beta_ij^(k-1)

    Returns (d_x, d_kernel).
    """
    x = np.asarray(x, np.float64)
    kernel = np.asarray(kernel, np.float64)
    g = np.asarray(upstream, np.float64)
    d_x = np.zeros_like(x)
    d_kernel = np.zeros_like(kernel)
    for k in range(1, order + 1):
        d_x -= np.einsum("bi,ji,bj->bj", g, kernel**k, x ** (k - 1))
        d_kernel -= np.einsum("bi,bj,ji->ji", g, x**k, kernel ** (k - 1))
    return d_x, d_kernel


def numpy_reference_code_synapse(x, kernel) -> np.ndarray:
    """What the reference SynaNN code computes (the batch-mixing defect).

    It sums the log factors over every sample of the batch, so each sample's
    output depends on the whole batch: y_bi = x_bi * prod_{b', j} (1 - beta_ij x_b'j).
    Equal to `numpy_synapse_graph` for a batch of one.
    """
    x = np.asarray(x, np.float64)
    kernel = np.asarray(kernel, np.float64)
    s = np.log1p(-x[:, :, None] * kernel[None]).sum(axis=(0, 1))
    return x * np.exp(s)[None, :]


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


def run_layer_test(
    layer_cls,
    init_kwargs: dict,
    input_shape: tuple,
    expected_output_shape: tuple,
    *,
    expected_num_trainable_weights: int,
    expected_num_non_trainable_weights: int,
    expected_num_losses: int,
    supports_masking: bool,
    input_data: np.ndarray | None = None,
    run_training: bool = True,
    run_serialization: bool = True,
    run_mixed_precision: bool = True,
    tmp_dir: str | None = None,
):
    """Exercise a layer the way users will, through public Keras APIs only.

    The contract (as in Keras's own `run_layer_test`): once built, the layer
    has `expected_num_trainable_weights` trainable and
    `expected_num_non_trainable_weights` non-trainable weights, and
    `get_config()` is what it was before `build`; a symbolic call on
    `keras.Input` and an eager call give `expected_output_shape` (the eager
    one in the compute dtype, finite) and `expected_num_losses` losses;
    `layer.supports_masking` is `supports_masking`, and a layer that supports
    masking passes a mask on the leading axes through. Then, each optional:
    one `fit` epoch (the backend's default jit setting) that changes every
    trainable weight; `get_config`/`from_config` and a `.keras` save/load round
    trip giving the same predictions (the round trip needs `tmp_dir`);
    float16/bfloat16 mixed precision (float32 variables, output in the compute
    dtype, close to the float32 output).

    Raises:
        AssertionError, with a message, on the first broken expectation
        (raised explicitly, so `python -O` keeps the checks).
    """
    rng = np.random.default_rng(0)
    if input_data is None:
        input_data = rng.uniform(0.05, 0.95, input_shape).astype("float32")

    layer = layer_cls(**init_kwargs)
    config = layer.get_config()
    layer.build(input_shape)
    _expect(layer.built, "the layer is not built after build()")
    _expect_equal(layer.get_config(), config, "get_config() after build()")
    _check_weight_counts(
        layer, expected_num_trainable_weights, expected_num_non_trainable_weights
    )

    symbolic = layer_cls(**init_kwargs)
    symbolic_out = symbolic(keras.Input(batch_shape=(None, *input_shape[1:])))
    _expect_equal(
        tuple(symbolic_out.shape),
        (None, *expected_output_shape[1:]),
        "symbolic output shape",
    )
    _check_weight_counts(
        symbolic, expected_num_trainable_weights, expected_num_non_trainable_weights
    )

    eager = layer(input_data)
    eager_np = keras.ops.convert_to_numpy(eager)
    _expect_equal(eager_np.shape, tuple(expected_output_shape), "eager output shape")
    _expect_equal(
        keras.backend.standardize_dtype(eager.dtype),
        layer.compute_dtype,
        "eager output dtype",
    )
    _expect(np.all(np.isfinite(eager_np)), "non-finite eager output")
    _expect_equal(len(layer.losses), expected_num_losses, "number of losses")
    _check_masking(layer, input_data, supports_masking, rng)

    def small_model(layer):
        inputs = keras.Input(shape=input_shape[1:])
        return keras.Model(inputs, keras.layers.Dense(1)(layer(inputs)))

    if run_training:
        model = small_model(layer_cls(**init_kwargs))
        model.compile(optimizer=keras.optimizers.Adam(0.05), loss="mse")
        before = [keras.ops.convert_to_numpy(w).copy() for w in model.trainable_weights]
        targets = rng.normal(size=(input_shape[0], *expected_output_shape[1:-1], 1))
        history = model.fit(
            input_data, targets, batch_size=len(input_data), epochs=1, verbose=0
        )
        loss = history.history["loss"][0]
        _expect(np.isfinite(loss), f"fit gave a non-finite loss: {loss}")
        after = [keras.ops.convert_to_numpy(w) for w in model.trainable_weights]
        unchanged = [
            w.path
            for w, b, a in zip(model.trainable_weights, before, after, strict=True)
            if np.array_equal(b, a)
        ]
        _expect(not unchanged, f"fit left these weights unchanged: {unchanged}")

    if run_serialization:
        config = layer.get_config()
        clone = layer_cls.from_config(config)
        _expect_equal(clone.get_config(), config, "get_config() of from_config()")
        revived = keras.saving.deserialize_keras_object(
            keras.saving.serialize_keras_object(layer)
        )
        _expect(
            isinstance(revived, layer_cls),
            f"deserialized a {type(revived).__name__}, not a {layer_cls.__name__}",
        )
        if tmp_dir is not None:
            import os

            model = small_model(layer_cls(**init_kwargs))
            expected = model.predict(input_data, verbose=0)
            path = os.path.join(tmp_dir, "layer_test.keras")
            model.save(path)
            loaded = keras.saving.load_model(path)
            np.testing.assert_allclose(
                loaded.predict(input_data, verbose=0),
                expected,
                rtol=1e-5,
                atol=1e-6,
                err_msg="predictions after a .keras save/load",
            )

    if run_mixed_precision:
        reference = keras.ops.convert_to_numpy(layer(input_data))
        for policy in ("mixed_float16", "mixed_bfloat16"):
            mixed = layer_cls(**init_kwargs, dtype=policy)
            mixed.build(input_shape)
            mixed.set_weights(layer.get_weights())
            out = mixed(input_data)
            _expect_equal(
                keras.backend.standardize_dtype(out.dtype),
                mixed.compute_dtype,
                f"output dtype under {policy}",
            )
            dtypes = {keras.backend.standardize_dtype(w.dtype) for w in mixed.weights}
            _expect_equal(dtypes, {"float32"}, f"variable dtypes under {policy}")
            tolerance = 2e-2 if policy == "mixed_bfloat16" else 2e-3
            np.testing.assert_allclose(
                keras.ops.convert_to_numpy(keras.ops.cast(out, "float32")),
                reference,
                rtol=tolerance,
                atol=tolerance,
                err_msg=f"{policy} output against float32",
            )


def _expect(condition, message: str) -> None:
    """`assert condition, message` that `python -O` does not remove."""
    if not condition:
        raise AssertionError(message)


def _expect_equal(actual, expected, what: str) -> None:
    _expect(actual == expected, f"Unexpected {what}: expected {expected}, got {actual}")


def _check_weight_counts(layer, trainable: int, non_trainable: int) -> None:
    _expect_equal(
        len(layer.trainable_weights), trainable, "number of trainable weights"
    )
    _expect_equal(
        len(layer.non_trainable_weights),
        non_trainable,
        "number of non-trainable weights",
    )


def _check_masking(layer, input_data, supports_masking: bool, rng) -> None:
    """`layer.supports_masking` is as expected; if it is, a mask on the leading
    axes comes out of `compute_mask` unchanged."""
    _expect_equal(layer.supports_masking, supports_masking, "supports_masking")
    if not supports_masking:
        return
    mask = rng.uniform(size=input_data.shape[:-1]) < 0.5
    out = layer.compute_mask(input_data, keras.ops.convert_to_tensor(mask))
    _expect(out is not None, "compute_mask() dropped the mask")
    _expect(
        np.array_equal(keras.ops.convert_to_numpy(out), mask),
        "compute_mask() changed the mask",
    )


# --- derivatives of every order ------------------------------------------------------

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
    `compiled` runs both inside jax.jit / tf.function / torch.compile.
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
    harness = {"jax": _jax_harness, "torch": _torch_harness}.get(
        backend, _tensorflow_harness
    )
    ours, reference = harness(config, names, compiled, x, kernel, vx, vw)
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
    harness = {"jax": _jax_harness, "torch": _torch_harness}.get(
        keras.backend.backend(), _tensorflow_harness
    )
    ours, _ = harness(config, transforms, False, x, kernel, vx, vw, False)
    return ours


def _synapse_fn(config, ops_module):
    """y(x, W) through keras_synann for the configuration."""
    from keras_synann import ops as synann_ops

    def fn(x, w):
        if config["input_dtype"] != "float32":
            x = ops_module.cast(x, config["input_dtype"])
            w = ops_module.cast(w, config["input_dtype"])
        if config["zero_diagonal"]:
            w = w * (1.0 - ops_module.eye(w.shape[0], dtype=w.dtype))
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


def _jax_harness(config, names, compiled, x, w, vx, vw, with_reference=True):
    import jax
    import jax.numpy as jnp

    def transforms(fn):
        def loss(x, w):
            return jnp.sum(fn(x, w) ** 2)

        def gx(x, w):
            return jax.grad(loss, 0)(x, w)

        def hvp(x, w, vx):
            return jax.grad(lambda x: jnp.vdot(gx(x, w), vx))(x)

        return {
            "grad": lambda x, w, vx, vw: jax.grad(loss, (0, 1))(x, w),
            "gradient_penalty": lambda x, w, vx, vw: [
                jax.grad(lambda w: jnp.sum(gx(x, w) ** 2))(w)
            ],
            "hvp": lambda x, w, vx, vw: [hvp(x, w, vx)],
            "third_order": lambda x, w, vx, vw: [
                jax.grad(lambda w: jnp.sum(hvp(x, w, vx) ** 2))(w)
            ],
            "jvp": lambda x, w, vx, vw: [jax.jvp(fn, (x, w), (vx, vw))[1]],
            "linearize": lambda x, w, vx, vw: [jax.linearize(fn, x, w)[1](vx, vw)],
            "forward_over_reverse_hvp": lambda x, w, vx, vw: [
                jax.jvp(lambda x: gx(x, w), (x,), (vx,))[1]
            ],
            "jacrev": lambda x, w, vx, vw: list(jax.jacrev(fn, (0, 1))(x, w)),
            "jacfwd": lambda x, w, vx, vw: list(jax.jacfwd(fn, (0, 1))(x, w)),
            "hessian": lambda x, w, vx, vw: [jax.hessian(loss, 0)(x, w)],
            "vmap": lambda x, w, vx, vw: [jax.vmap(lambda xi: fn(xi[None], w)[0])(x)],
            "per_sample_grads": lambda x, w, vx, vw: [
                jax.vmap(lambda xi: jax.grad(lambda w: loss(xi[None], w))(w))(x)
            ],
        }

    def run(fn, dtype, alpha):
        cfg = {
            **config,
            "alpha_tensor": None if alpha is None else jnp.asarray(alpha, dtype),
        }
        table = transforms(fn(cfg))
        args = [jnp.asarray(a, dtype) for a in (x, w, vx, vw)]
        out = {}
        for name in names:
            t = jax.jit(table[name]) if compiled else table[name]
            out[name] = [np.asarray(a) for a in jax.tree_util.tree_leaves(t(*args))]
        return out

    import keras

    ours = run(lambda cfg: _synapse_fn(cfg, keras.ops), "float32", config["alpha"])
    if not with_reference:
        return ours, None
    with _jax_x64():
        reference = run(lambda cfg: _plain_fn(cfg, jnp), "float64", config["alpha"])
    return ours, reference


def _jax_x64():
    import jax

    if hasattr(jax, "enable_x64"):
        return jax.enable_x64(True)
    from jax.experimental import enable_x64

    return enable_x64()


def _torch_harness(config, names, compiled, x, w, vx, vw, with_reference=True):
    import torch
    import torch.autograd.forward_ad as fwad
    from torch import func

    def transforms(fn):
        def loss(x, w):
            return (fn(x, w) ** 2).sum()

        def leaves(*ts):
            return [t.detach().clone().requires_grad_(True) for t in ts]

        def grad(x, w, vx, vw):
            x, w = leaves(x, w)
            return list(torch.autograd.grad(loss(x, w), (x, w)))

        def gx(x, w):
            return torch.autograd.grad(loss(x, w), x, create_graph=True)[0]

        def penalty(x, w, vx, vw):
            x, w = leaves(x, w)
            return list(torch.autograd.grad((gx(x, w) ** 2).sum(), w))

        def hvp(x, w, vx, vw):
            x, w = leaves(x, w)
            return list(torch.autograd.grad((gx(x, w) * vx).sum(), x))

        def third(x, w, vx, vw):
            x, w = leaves(x, w)
            h = torch.autograd.grad((gx(x, w) * vx).sum(), x, create_graph=True)[0]
            return list(torch.autograd.grad((h**2).sum(), w))

        def forward_ad(x, w, vx, vw):
            with fwad.dual_level():
                y = fn(fwad.make_dual(x, vx), fwad.make_dual(w, vw))
                return [fwad.unpack_dual(y).tangent]

        return {
            "grad": grad,
            "gradient_penalty": penalty,
            "hvp": hvp,
            "third_order": third,
            "jvp": lambda x, w, vx, vw: [func.jvp(fn, (x, w), (vx, vw))[1]],
            "forward_ad": forward_ad,
            "forward_over_reverse_hvp": lambda x, w, vx, vw: [
                func.jvp(lambda x: func.grad(loss, 0)(x, w), (x,), (vx,))[1]
            ],
            "jacrev": lambda x, w, vx, vw: list(func.jacrev(fn, (0, 1))(x, w)),
            "jacfwd": lambda x, w, vx, vw: list(func.jacfwd(fn, (0, 1))(x, w)),
            "vmap": lambda x, w, vx, vw: [func.vmap(lambda xi: fn(xi[None], w)[0])(x)],
            "func_grad": lambda x, w, vx, vw: list(func.grad(loss, (0, 1))(x, w)),
            "per_sample_grads": lambda x, w, vx, vw: [
                func.vmap(func.grad(lambda w, xi: loss(xi[None], w)), (None, 0))(w, x)
            ],
        }

    def run(fn, dtype, alpha):
        cfg = {
            **config,
            "alpha_tensor": None if alpha is None else torch.tensor(alpha, dtype=dtype),
        }
        table = transforms(fn(cfg))
        args = [torch.tensor(a, dtype=dtype) for a in (x, w, vx, vw)]
        out = {}
        for name in names:
            t = torch.compile(table[name]) if compiled else table[name]
            out[name] = [a.detach().numpy() for a in t(*args)]
        return out

    import keras

    ours = run(lambda cfg: _synapse_fn(cfg, keras.ops), torch.float32, config["alpha"])
    if not with_reference:
        return ours, None
    reference = run(
        lambda cfg: _plain_fn(cfg, _TorchNamespace()), torch.float64, config["alpha"]
    )
    return ours, reference


class _TorchNamespace:
    """The few array functions `_plain_fn` needs, from torch."""

    def __init__(self):
        import torch

        self.maximum, self.log, self.exp = torch.clamp_min, torch.log, torch.exp
        self.eye = lambda n, dtype: torch.eye(n, dtype=dtype)
        self.sum = lambda t, axis: t.sum(axis)


class _TFNamespace:
    """The few array functions `_plain_fn` needs, from tensorflow."""

    def __init__(self):
        import tensorflow as tf

        self.maximum, self.log, self.exp = tf.maximum, tf.math.log, tf.exp
        self.eye = lambda n, dtype: tf.eye(n, dtype=dtype)
        self.sum = lambda t, axis: tf.reduce_sum(t, axis)


def _tensorflow_harness(config, names, compiled, x, w, vx, vw, with_reference=True):
    import tensorflow as tf

    def transforms(fn):
        def loss(x, w):
            return tf.reduce_sum(fn(x, w) ** 2)

        def gx(x, w):
            with tf.GradientTape() as tape:
                tape.watch(x)
                value = loss(x, w)
            return tape.gradient(value, x)

        def hvp(x, w, vx):
            with tf.GradientTape() as tape:
                tape.watch(x)
                inner = tf.reduce_sum(gx(x, w) * vx)
            return tape.gradient(inner, x)

        def grad(x, w, vx, vw):
            with tf.GradientTape() as tape:
                tape.watch([x, w])
                value = loss(x, w)
            return tape.gradient(value, [x, w])

        def penalty(x, w, vx, vw):
            with tf.GradientTape() as tape:
                tape.watch(w)
                p = tf.reduce_sum(gx(x, w) ** 2)
            return [tape.gradient(p, w)]

        def third(x, w, vx, vw):
            with tf.GradientTape() as tape:
                tape.watch(w)
                p = tf.reduce_sum(hvp(x, w, vx) ** 2)
            return [tape.gradient(p, w)]

        def jvp(x, w, vx, vw):
            with tf.autodiff.ForwardAccumulator([x, w], [vx, vw]) as acc:
                y = fn(x, w)
            return [acc.jvp(y)]

        def fwd_over_rev(x, w, vx, vw):
            with tf.autodiff.ForwardAccumulator(x, vx) as acc:
                g = gx(x, w)
            return [acc.jvp(g)]

        def batch_jacobian(x, w, vx, vw):
            with tf.GradientTape() as tape:
                tape.watch(x)
                y = fn(x, w)
            return [tape.batch_jacobian(y, x)]

        def jacobian(x, w, vx, vw):
            with tf.GradientTape() as tape:
                tape.watch(w)
                y = fn(x, w)
            return [tape.jacobian(y, w)]

        def vmap(x, w, vx, vw):
            return [tf.vectorized_map(lambda xi: fn(xi[None], w)[0], x)]

        def per_sample(x, w, vx, vw):
            def one(xi):
                with tf.GradientTape() as tape:
                    tape.watch(w)
                    value = loss(xi[None], w)
                return tape.gradient(value, w)

            return [tf.vectorized_map(one, x)]

        return {
            "grad": grad,
            "gradient_penalty": penalty,
            "hvp": lambda x, w, vx, vw: [hvp(x, w, vx)],
            "third_order": third,
            "jvp": jvp,
            "forward_over_reverse_hvp": fwd_over_rev,
            "batch_jacobian": batch_jacobian,
            "jacobian": jacobian,
            "vmap": vmap,
            "per_sample_grads": per_sample,
        }

    def run(fn, dtype, alpha):
        cfg = {
            **config,
            "alpha_tensor": None if alpha is None else tf.constant(alpha, dtype),
        }
        table = transforms(fn(cfg))
        args = [tf.constant(a, dtype) for a in (x, w, vx, vw)]
        out = {}
        for name in names:
            t = tf.function(table[name]) if compiled else table[name]
            out[name] = [np.asarray(a) for a in t(*args)]
        return out

    import keras

    ours = run(lambda cfg: _synapse_fn(cfg, keras.ops), tf.float32, config["alpha"])
    if not with_reference:
        return ours, None
    reference = run(
        lambda cfg: _plain_fn(cfg, _TFNamespace()), tf.float64, config["alpha"]
    )
    return ours, reference
