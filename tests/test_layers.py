"""The Synapse layer through public Keras APIs, on the active backend."""

import ast
import doctest
import inspect
from pathlib import Path

import keras
import numpy as np
import pytest

import keras_synann
from keras_synann import Synapse, ValueRange
from keras_synann.layers import SynapseUniform
from keras_synann.testing import numpy_synapse_graph, run_layer_test


@pytest.mark.parametrize(
    "init_kwargs, trainable, non_trainable, losses",
    [
        ({}, 1, 0, 0),
        ({"units": 12}, 1, 0, 0),
        ({"use_alpha": True, "zero_diagonal": True, "chunk_size": 5}, 2, 0, 0),
        ({"kernel_regularizer": "l2", "kernel_constraint": None}, 1, 0, 1),
        ({"series_order": 3, "use_alpha": True}, 2, 0, 0),
        ({"use_alpha": True, "trainable": False}, 0, 2, 0),
    ],
)
def test_layer_basics(init_kwargs, trainable, non_trainable, losses, tmp_path):
    run_layer_test(
        Synapse,
        init_kwargs,
        input_shape=(4, 12),
        expected_output_shape=(4, 12),
        expected_num_trainable_weights=trainable,
        expected_num_non_trainable_weights=non_trainable,
        expected_num_losses=losses,
        supports_masking=True,
        run_training=trainable > 0,
        tmp_dir=str(tmp_path),
    )


def test_layer_with_leading_axes(tmp_path):
    run_layer_test(
        Synapse,
        {"units": 6},
        input_shape=(3, 5, 6),
        expected_output_shape=(3, 5, 6),
        expected_num_trainable_weights=1,
        expected_num_non_trainable_weights=0,
        expected_num_losses=0,
        supports_masking=True,
        run_mixed_precision=False,
        tmp_dir=str(tmp_path),
    )


@pytest.mark.parametrize(
    "contract, message",
    [
        ({"expected_num_trainable_weights": 1}, "number of trainable weights"),
        ({"expected_num_non_trainable_weights": 1}, "number of non-trainable weights"),
        ({"expected_num_losses": 0}, "number of losses: expected 0, got 1"),
        ({"supports_masking": False}, "supports_masking"),
    ],
)
def test_run_layer_test_fails_on_a_broken_contract(contract, message):
    """A layer with alpha and an l2 regularizer has 2 trainable weights and one
    loss: each wrong expectation fails, naming what it expected."""
    kwargs = {
        "expected_num_trainable_weights": 2,
        "expected_num_non_trainable_weights": 0,
        "expected_num_losses": 1,
        "supports_masking": True,
        **contract,
    }
    with pytest.raises(AssertionError, match=message):
        run_layer_test(
            Synapse,
            {"use_alpha": True, "kernel_regularizer": "l2"},
            input_shape=(2, 4),
            expected_output_shape=(2, 4),
            run_training=False,
            run_serialization=False,
            run_mixed_precision=False,
            **kwargs,
        )


def test_library_code_has_no_assert_statements():
    """`python -O` strips `assert`: library checks must raise explicitly."""
    package = Path(keras_synann.__file__).parent
    found = [
        f"{path.name}:{node.lineno}"
        for path in sorted(package.rglob("*.py"))
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.Assert)
    ]
    assert not found, found


def test_build_leaves_the_config_as_given():
    layer = Synapse()
    before = layer.get_config()
    layer.build((2, 6))
    assert layer.get_config() == before
    assert layer.units is None
    assert Synapse.from_config(before).get_config() == before


def test_docstring_example_runs():
    example = doctest.DocTestParser().get_doctest(
        Synapse.__doc__, {}, "Synapse", None, 0
    )
    runner = doctest.DocTestRunner(optionflags=doctest.NORMALIZE_WHITESPACE)
    results = runner.run(example)
    assert results.attempted >= 5 and results.failed == 0, results


def test_defaults_show_in_the_signature_and_behave_as_documented():
    parameters = inspect.signature(Synapse).parameters
    assert parameters["kernel_initializer"].default == "keras_synann>SynapseUniform"
    assert repr(parameters["kernel_constraint"].default) == (
        "ValueRange(min_value=0.0, max_value=0.999999)"
    )
    layer = Synapse()
    assert isinstance(layer.kernel_initializer, SynapseUniform)
    assert (layer.alpha_constraint.min_value, layer.alpha_constraint.max_value) == (
        1e-6,
        1e6,
    )
    # Every layer gets its own initializer, hence its own kernel.
    first, second = Synapse(), Synapse()
    first.build((2, 5))
    second.build((2, 5))
    assert not np.array_equal(
        keras.ops.convert_to_numpy(first.kernel),
        keras.ops.convert_to_numpy(second.kernel),
    )


def test_values_match_numpy():
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 1, (7, 20)).astype("float32")
    layer = Synapse(use_alpha=True)
    layer.build(x.shape)
    kernel = rng.uniform(0, 0.9, (20, 20)).astype("float32")
    alpha = rng.uniform(1, 2, (20,)).astype("float32")
    layer.set_weights([kernel, alpha])
    out = keras.ops.convert_to_numpy(layer(x))
    np.testing.assert_allclose(out, numpy_synapse_graph(x, kernel, alpha), rtol=1e-5)
    # beta[i, j] = kernel[j, i]
    np.testing.assert_allclose(keras.ops.convert_to_numpy(layer.beta), kernel.T)


def test_zero_diagonal_ignores_the_diagonal():
    rng = np.random.default_rng(1)
    x = rng.uniform(0, 1, (3, 8)).astype("float32")
    kernel = rng.uniform(0, 0.9, (8, 8)).astype("float32")
    layer = Synapse(zero_diagonal=True)
    layer.build(x.shape)
    layer.set_weights([kernel])
    no_diag = kernel * (1 - np.eye(8, dtype="float32"))
    out = keras.ops.convert_to_numpy(layer(x))
    np.testing.assert_allclose(out, numpy_synapse_graph(x, no_diag), rtol=1e-5)


def test_default_initializer_and_constraint():
    layer = Synapse()
    layer.build((2, 50))
    kernel = keras.ops.convert_to_numpy(layer.kernel)
    assert kernel.min() >= 0.0 and kernel.max() < 0.01
    clipped = keras.ops.convert_to_numpy(
        layer.kernel.constraint(np.array([-1.0, 0.5, 3.0]))
    )
    np.testing.assert_allclose(clipped, [0.0, 0.5, 1.0 - 1e-6])


def test_training_keeps_beta_in_domain():
    rng = np.random.default_rng(2)
    x = rng.uniform(0, 1, (64, 10)).astype("float32")
    y = rng.uniform(-5, 5, (64, 10)).astype("float32")
    model = keras.Sequential([keras.Input((10,)), Synapse()])
    model.compile(keras.optimizers.SGD(50.0), "mse")
    model.fit(x, y, epochs=3, verbose=0)
    kernel = keras.ops.convert_to_numpy(model.layers[0].kernel)
    assert kernel.min() >= 0.0 and kernel.max() < 1.0


def test_output_dim_alias():
    layer = Synapse(output_dim=5)
    assert layer.units == 5
    assert Synapse.from_config({"output_dim": 5, "name": "s"}).units == 5
    with pytest.raises(ValueError, match="units=4, output_dim=5"):
        Synapse(units=4, output_dim=5)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"units": 0}, "Received: units=0"),
        ({"units": 2.5}, "Received: units=2.5"),
        ({"chunk_size": 0}, "Received: chunk_size=0"),
    ],
)
def test_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Synapse(**kwargs)


def test_units_must_equal_input_size():
    with pytest.raises(ValueError, match="units=8, input last dimension=6"):
        Synapse(units=8)(np.zeros((2, 6), "float32"))


def test_wrong_rank_and_wrong_last_dimension():
    with pytest.raises(ValueError, match="min_ndim=2"):
        Synapse()(np.zeros((6,), "float32"))
    layer = Synapse()
    layer(np.zeros((2, 6), "float32"))
    with pytest.raises(
        ValueError, match="expected axis -1 of input shape to have value 6"
    ):
        layer(np.zeros((2, 7), "float32"))


def test_value_range_validation_and_config():
    with pytest.raises(ValueError, match="min_value=2.0, max_value=1.0"):
        ValueRange(2.0, 1.0)
    assert ValueRange.from_config(ValueRange(0.1, 0.2).get_config()).max_value == 0.2


def test_registered_for_serialization():
    assert keras.saving.get_registered_object("keras_synann>Synapse") is Synapse
    assert "Synapse" in keras_synann.__all__


def test_masking_passes_through():
    x = np.array([[[0.2, 0.4], [0.0, 0.0]]], "float32")
    mask = np.array([[True, False]])
    layer = Synapse()
    np.testing.assert_array_equal(
        keras.ops.convert_to_numpy(layer.compute_mask(x, mask)), mask
    )
