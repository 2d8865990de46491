"""Parity with the reference formula (on tf_keras) and legacy .h5 loading.

Runs where tensorflow and tf_keras are installed (the tensorflow tox env);
tests/test_cross_backend.py covers legacy loading under jax and torch.
"""

import keras
import numpy as np
import pytest

pytest.importorskip("tf_keras")
if keras.backend.backend() != "tensorflow":
    pytest.skip("tf_keras parity runs in the tensorflow env", allow_module_level=True)

import legacy_reference  # noqa: E402

import keras_synann  # noqa: E402
from keras_synann.testing import numpy_reference_code_synapse, numpy_synapse_graph  # noqa: E402


def _reference_layer(kernel):
    layer = legacy_reference.Synapse(kernel.shape[0])
    layer.build((None, kernel.shape[0]))
    layer.set_weights([kernel])
    return layer


def test_equal_to_reference_at_batch_size_one():
    rng = np.random.default_rng(0)
    kernel = rng.uniform(0, 0.9, (16, 16)).astype("float32")
    reference = _reference_layer(kernel)
    ours = keras_synann.Synapse()
    ours.build((None, 16))
    ours.set_weights([kernel])
    for _ in range(5):
        x = rng.uniform(0, 1, (1, 16)).astype("float32")
        np.testing.assert_allclose(
            keras.ops.convert_to_numpy(ours(x)),
            reference(x).numpy(),
            rtol=1e-6,
            atol=1e-7,
        )


def test_differs_from_reference_at_larger_batches_as_the_defect_predicts():
    rng = np.random.default_rng(1)
    kernel = rng.uniform(0, 0.5, (8, 8)).astype("float32")
    x = rng.uniform(0, 1, (4, 8)).astype("float32")
    reference_out = _reference_layer(kernel)(x).numpy()
    ours = keras_synann.Synapse()
    ours.build((None, 8))
    ours.set_weights([kernel])
    our_out = keras.ops.convert_to_numpy(ours(x))
    # The reference sums the factors over the whole batch ...
    np.testing.assert_allclose(
        reference_out, numpy_reference_code_synapse(x, kernel), rtol=1e-4
    )
    # ... we compute each sample on its own, as the paper's formula says.
    np.testing.assert_allclose(our_out, numpy_synapse_graph(x, kernel), rtol=1e-5)
    assert np.all(reference_out < our_out), "the extra factors only shrink the output"
    assert np.max(np.abs(reference_out - our_out) / our_out) > 0.5


def test_load_legacy_h5_model_and_weights(tmp_path):
    x, expected = legacy_reference.write_legacy_files(tmp_path)
    model = keras_synann.load_legacy_model(tmp_path / "legacy.h5")
    assert any(isinstance(layer, keras_synann.Synapse) for layer in model.layers)
    np.testing.assert_allclose(
        model.predict(x, verbose=0), expected, rtol=1e-5, atol=1e-6
    )

    fresh = keras.Sequential(
        [
            keras.Input((12,)),
            keras.layers.Dense(12, activation="sigmoid"),
            keras_synann.Synapse(),
            keras.layers.Dense(3),
        ]
    )
    keras_synann.load_legacy_weights(fresh, tmp_path / "legacy_weights.h5")
    np.testing.assert_allclose(
        fresh.predict(x, verbose=0), expected, rtol=1e-5, atol=1e-6
    )


def test_legacy_loader_rejects_other_files(tmp_path):
    with pytest.raises(ValueError, match="Received: .*model.keras"):
        keras_synann.load_legacy_model(tmp_path / "model.keras")
    with pytest.raises(FileNotFoundError, match="missing.h5"):
        keras_synann.load_legacy_model(tmp_path / "missing.h5")
