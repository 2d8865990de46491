"""`run_layer_test`: a layer exercised the way users will, through public
Keras APIs only (the contract of Keras's own `run_layer_test`)."""

from __future__ import annotations

import os

import keras
import numpy as np


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
