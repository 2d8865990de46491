# %% [markdown]
# # A Synapse layer on MNIST
#
# **Author:** keras_synann authors<br>
# **Date created:** 2026-12-01<br>
# **Last modified:** 2026-12-05<br>
# **Accelerator:** none needed (it trains on a CPU)<br>
# **Description:** build a small model around `keras_synann.Synapse`, train it on
# MNIST, look at the learned inhibition matrix beta, then save and reload the model.
#
# This script runs on TensorFlow, JAX and PyTorch: set `KERAS_BACKEND` before you
# start it (default here: jax). After `pip install ".[jax,training]"` (keras_synann,
# a backend, matplotlib), from the repository root:
#
# ```
# KERAS_BACKEND=jax python examples/mnist_synapse.py
# ```
#
# It also reads as a notebook: `jupytext --to notebook examples/mnist_synapse.py`.

# %% [markdown]
# ## Setup
#
# MNIST comes from `keras.datasets.mnist`, which downloads it once into
# `~/.keras/datasets`. Without a network the script reads the copy carried in this
# repository (`training/data/mnist`, the same IDX files). The last 5,000 training
# images, after a seeded shuffle, are the validation split.

# %%
import gzip
import os
from pathlib import Path

os.environ.setdefault("KERAS_BACKEND", "jax")

import keras
import matplotlib.pyplot as plt
import numpy as np

import keras_synann

EPOCHS = 3
BATCH_SIZE = 128


def read_idx(path):
    """An IDX file (gzipped) as a NumPy array."""
    with gzip.open(path, "rb") as f:
        data = f.read()
    dims = data[3]
    shape = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(dims)]
    return np.frombuffer(data, np.uint8, offset=4 + 4 * dims).reshape(shape)


def load_mnist():
    try:
        return keras.datasets.mnist.load_data()
    except Exception as error:  # no network: the repository's copy
        here = Path(__file__).resolve().parent if "__file__" in globals() else Path()
        carried = here.parent / "training" / "data" / "mnist"
        print(f"keras.datasets.mnist: {error}; reading {carried}")
        return tuple(
            (read_idx(carried / f"{kind}-images-idx3-ubyte.gz"),
             read_idx(carried / f"{kind}-labels-idx1-ubyte.gz"))
            for kind in ("train", "t10k")
        )  # fmt: skip


keras.utils.set_random_seed(0)
(x_train, y_train), (x_test, y_test) = load_mnist()
x_train = (x_train[..., None] / 255.0).astype("float32")  # (60000, 28, 28, 1) in [0, 1]
x_test = (x_test[..., None] / 255.0).astype("float32")
order = np.random.default_rng(0).permutation(len(x_train))
x_train, y_train = x_train[order], y_train[order]
x_val, y_val = x_train[-5000:], y_train[-5000:]
x_train, y_train = x_train[:-5000], y_train[:-5000]
print("train", x_train.shape, "validation", x_val.shape, "test", x_test.shape)


# %% [markdown]
# ## The model
#
# A synapse joins an excitatory input x and an inhibitory input y, both
# probabilities in (0, 1): `S(x, y) = alpha * x * (1 - beta * y)`. The `Synapse`
# layer connects every input to every output of a vector of size n:
#
# ```
# y_i = alpha_i * x_i * prod_j (1 - beta_ij * x_j)
# ```
#
# with alpha_i = 1 here (the layer's default; `use_alpha=True` learns it), and
# beta_ii, an output's inhibition by its own input, learned too unless
# `zero_diagonal=True`.
#
# Its inputs must be probabilities, so the Dense layer before it ends in a sigmoid.
# Its output has the size of its input; a Dense layer maps it to the 10 logits.

# %%
hidden = 128
model = keras.Sequential(
    [
        keras.Input((28, 28, 1)),
        keras.layers.Flatten(),
        keras.layers.Dense(hidden, activation="sigmoid"),
        keras_synann.Synapse(name="synapse"),
        keras.layers.Dropout(0.25),
        keras.layers.Dense(10),
    ]
)
model.compile(
    optimizer=keras.optimizers.Adam(3e-3),
    loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    metrics=["accuracy"],
)
model.summary()

# %% [markdown]
# ## Training

# %%
history = model.fit(
    x_train,
    y_train,
    batch_size=BATCH_SIZE,
    epochs=EPOCHS,
    validation_data=(x_val, y_val),
    verbose=2,
)
test_loss, test_accuracy = model.evaluate(x_test, y_test, verbose=0)
print(f"test accuracy: {test_accuracy:.2%}")

# %% [markdown]
# On jax, with seed 0, it reached 96.22% test accuracy (the machine, versions,
# command and commit are in `benchmarks/results/example_mnist_synapse.json`).

# %% [markdown]
# ## The learned beta matrix
#
# `layer.beta[i, j]` is how strongly input j inhibits output i. The default
# initializer draws beta uniformly in [0, 0.01) and the default constraint keeps it
# in [0, 1); training moves the entries that matter.

# %%
beta = keras.ops.convert_to_numpy(model.get_layer("synapse").beta)
fig, ax = plt.subplots(figsize=(6, 5))
image = ax.imshow(beta, cmap="viridis", interpolation="nearest")
ax.set_xlabel("inhibitory input j")
ax.set_ylabel("output i")
ax.set_title(f"learned beta ({keras.backend.backend()}), max {beta.max():.3f}")
fig.colorbar(image, ax=ax)
fig.savefig("beta.png", dpi=100)
print(f"beta in [{beta.min():.4f}, {beta.max():.4f}]; plot written to beta.png")

# %% [markdown]
# ## Saving and reloading
#
# `Synapse` is registered with Keras, so a `.keras` file loads with
# `keras.saving.load_model` once `keras_synann` is imported, under any backend.

# %%
model.save("mnist_synapse.keras")
reloaded = keras.saving.load_model("mnist_synapse.keras")
sample = x_test[:8]
np.testing.assert_allclose(
    reloaded.predict(sample, verbose=0), model.predict(sample, verbose=0), atol=1e-5
)
print("reloaded mnist_synapse.keras: same predictions")
