"""Our own restatement of the reference SynaNN layer, written on tf_keras (Keras 2).

It reproduces the reference's *formula*, including its defect: the log factors
are summed with a (batch, batch * n) ones matrix, i.e. over the whole batch.
Used to pin down the divergence (tests/test_reference_and_legacy.py) and to write
legacy .h5 files like the reference's (config key `output_dim`, (n, n) kernel).

Run as a script, `python tests/legacy_reference.py OUT_DIR`, it writes
OUT_DIR/legacy.h5, OUT_DIR/legacy_weights.h5 and OUT_DIR/expected.npz.
"""

import sys
from pathlib import Path

import numpy as np
import tensorflow as tf
import tf_keras


class Synapse(tf_keras.layers.Layer):
    """y_bi = x_bi * exp(sum_{b', j} log(1 - W[j, i] x_b'j)) (the reference formula)."""

    def __init__(self, output_dim, **kwargs):
        super().__init__(**kwargs)
        self.output_dim = output_dim

    def build(self, input_shape):
        self.kernel = self.add_weight(
            name="kernel",
            shape=(int(input_shape[-1]), self.output_dim),
            initializer=tf_keras.initializers.RandomUniform(0.0, 0.01),
            trainable=True,
        )
        super().build(input_shape)

    def call(self, x):
        batch = tf.shape(x)[0]
        n = self.output_dim
        xx = tf.linalg.diag(x)  # (batch, n, n)
        xw = tf.matmul(xx, self.kernel)  # xw[b, j, i] = x_bj W_ji
        logs = tf.reshape(tf.math.log(1.0 - xw), (batch * n, n))
        ones = tf.ones((batch, batch * n))
        return x * tf.exp(tf.matmul(ones, logs))

    def get_config(self):
        return {**super().get_config(), "output_dim": self.output_dim}


def build_model(n=12, seed=0):
    tf_keras.utils.set_random_seed(seed)
    model = tf_keras.Sequential(
        [
            tf_keras.Input((n,)),
            tf_keras.layers.Dense(n, activation="sigmoid"),
            Synapse(n),
            tf_keras.layers.Dense(3),
        ]
    )
    # Larger betas than the initializer gives, so the synapse matters.
    kernel = np.random.default_rng(seed).uniform(0, 0.9, (n, n)).astype("float32")
    model.layers[1].set_weights([kernel])
    return model


def write_legacy_files(out_dir, n=12):
    """Write a legacy model, its weights and the per-sample predictions."""
    out_dir = Path(out_dir)
    model = build_model(n)
    model.save(out_dir / "legacy.h5", save_format="h5")
    model.save_weights(out_dir / "legacy_weights.h5")
    x = np.random.default_rng(1).normal(size=(5, n)).astype("float32")
    # One sample at a time: the only batch size at which the reference is right.
    expected = np.concatenate(
        [model.predict(x[i : i + 1], verbose=0) for i in range(len(x))]
    )
    np.savez(out_dir / "expected.npz", x=x, y=expected)
    return x, expected


if __name__ == "__main__":
    write_legacy_files(sys.argv[1])
