"""A .keras file saved under one backend loads and predicts the same under the
other two, and a legacy tf.keras .h5 loads under jax and torch too.

Needs every backend (and tf_keras) in one environment: the `cross` tox env.
Each backend runs in its own subprocess, since Keras picks its backend once.
"""

import importlib.util
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

BACKENDS = ("jax", "tensorflow", "torch")
_missing = [m for m in (*BACKENDS, "tf_keras") if importlib.util.find_spec(m) is None]
pytestmark = pytest.mark.skipif(
    bool(_missing), reason=f"needs all backends; missing {', '.join(_missing)}"
)
TESTS = Path(__file__).parent

SAVE = textwrap.dedent(
    """
    import sys, keras, numpy as np
    import keras_synann
    out = sys.argv[1]
    keras.utils.set_random_seed(0)
    model = keras.Sequential([
        keras.Input((10,)),
        keras.layers.Dense(10, activation="sigmoid"),
        keras_synann.Synapse(use_alpha=True, zero_diagonal=True, chunk_size=3),
        keras.layers.Dense(4),
    ])
    # Weights from NumPy, so the three backends save the same model.
    rng = np.random.default_rng(0)
    model.set_weights([
        rng.normal(size=(10, 10)).astype("float32"), rng.normal(size=10).astype("float32"),
        rng.uniform(0, 0.9, (10, 10)).astype("float32"), np.linspace(1, 2, 10).astype("float32"),
        rng.normal(size=(10, 4)).astype("float32"), rng.normal(size=4).astype("float32"),
    ])
    x = np.random.default_rng(1).normal(size=(6, 10)).astype("float32")
    model.save(f"{out}/{keras.backend.backend()}.keras")
    np.savez(f"{out}/{keras.backend.backend()}.npz", x=x, y=model.predict(x, verbose=0))
    """
)

LOAD = textwrap.dedent(
    """
    import sys, json, keras, numpy as np
    import keras_synann
    out = sys.argv[1]
    errors = {}
    for source in ("jax", "tensorflow", "torch"):
        data = np.load(f"{out}/{source}.npz")
        model = keras.saving.load_model(f"{out}/{source}.keras")
        errors[source] = float(np.max(np.abs(model.predict(data["x"], verbose=0) - data["y"])))
    legacy = np.load(f"{out}/expected.npz")
    model = keras_synann.load_legacy_model(f"{out}/legacy.h5")
    errors["legacy.h5"] = float(np.max(np.abs(model.predict(legacy["x"], verbose=0) - legacy["y"])))
    print(json.dumps(errors))
    """
)


def _run(backend, code, *args):
    env = {**os.environ, "KERAS_BACKEND": backend}
    result = subprocess.run(
        [sys.executable, *code, *args], env=env, capture_output=True, text=True
    )
    assert result.returncode == 0, f"{backend}: {result.stderr[-2000:]}"
    return result.stdout


def test_keras_files_and_legacy_h5_load_on_every_backend(tmp_path):
    for backend in BACKENDS:
        _run(backend, ["-c", SAVE], str(tmp_path))
    _run("tensorflow", [str(TESTS / "legacy_reference.py")], str(tmp_path))
    import json

    for backend in BACKENDS:
        errors = json.loads(_run(backend, ["-c", LOAD], str(tmp_path)).splitlines()[-1])
        assert set(errors) == {*BACKENDS, "legacy.h5"}
        for source, error in errors.items():
            assert error < 1e-5, f"{source} loaded under {backend}: max error {error}"
    # The three saved models are the same model.
    predictions = [np.load(tmp_path / f"{b}.npz")["y"] for b in BACKENDS]
    for other in predictions[1:]:
        np.testing.assert_allclose(other, predictions[0], rtol=1e-5, atol=1e-6)
