"""Reading models saved by tf.keras (Keras 2) with the reference Synapse layer.

The reference layer was saved as class `Synapse` with config key `output_dim`
and an (n, n) kernel: `keras_synann.Synapse` accepts both, so a legacy `.h5`
file loads into Keras 3 on any backend:

    model = keras_synann.load_legacy_model("synann_mnist.h5")

or, for its weights only, into a Keras 3 model of the same architecture:

    keras_synann.load_legacy_weights(model, "synann_weights.h5")

Note: the reference code mixed the samples of a batch (see docs/layer.md); the
loaded model computes the paper's per-sample formula, so its predictions
equal the reference's at batch size 1.
"""

from __future__ import annotations

import os

import keras

from keras_synann.layers import Synapse


def _check_h5(path) -> str:
    path = os.fspath(path)
    if not path.endswith((".h5", ".hdf5")):
        raise ValueError(
            "Expected a legacy HDF5 file ending in .h5 or .hdf5 "
            f"(use keras.saving.load_model for .keras files). Received: {path}"
        )
    if not os.path.exists(path):
        raise FileNotFoundError(f"No such legacy model file: {path}")
    return path


def load_legacy_model(path, custom_objects: dict | None = None, compile: bool = False):
    """Load a tf.keras `.h5` model that uses the reference `Synapse` layer.

    Args:
        path: the `.h5` file.
        custom_objects: more custom classes the file needs, by name.
        compile: also restore the training configuration (optimizer, loss).

    Returns:
        A Keras 3 model whose Synapse layers are `keras_synann.Synapse`.
    """
    objects = {"Synapse": Synapse, **(custom_objects or {})}
    return keras.saving.load_model(
        _check_h5(path), custom_objects=objects, compile=compile
    )


def load_legacy_weights(model, path) -> None:
    """Load the weights of a tf.keras `.h5` file (model or weights file) into `model`.

    `model` must have the file's architecture, built with `keras_synann.Synapse`
    where the reference used its `Synapse` layer.
    """
    model.load_weights(_check_h5(path))
