# %% [markdown]
# # A Synapse layer on MNIST
#
# **Author:** keras_synann authors<br>
# **Date created:** 2026-12-01<br>
# **Accelerator:** none needed (it trains on a CPU)<br>
# **Description:** build a small model around `keras_synann.Synapse`, train it on
# MNIST, look at the learned inhibition matrix beta, then save and reload the model.
#
# This script runs on TensorFlow, JAX and PyTorch: set `KERAS_BACKEND` before you
# start it (default here: jax). From the repository root:
#
# ```
# KERAS_BACKEND=jax python examples/mnist_synapse.py
# ```
#
# It also reads as a notebook: `jupytext --to notebook examples/mnist_synapse.py`.
# `SYNANN_EXAMPLE_STEPS=N` trains on only N batches per epoch (a quick check).

# %% [markdown]
# ## Setup
#
# The MNIST files come with the repository (`training/data/mnist`), so nothing is
# downloaded. `training/data.py` reads them, checks their checksums and carves a
# validation split out of the training set.

# %%
import os
import sys
from pathlib import Path

os.environ.setdefault("KERAS_BACKEND", "jax")

import keras
import matplotlib.pyplot as plt
import numpy as np

# The repository root holds `keras_synann` and `training` (the data loader).
ROOT = (
    Path(__file__).resolve().parents[1]
    if "__file__" in globals()
    else Path.cwd().parent
)
sys.path.insert(0, str(ROOT))

import keras_synann
from training.data import load_mnist

EPOCHS = 3
BATCH_SIZE = 128
STEPS = int(os.environ.get("SYNANN_EXAMPLE_STEPS", 0)) or None  # None: whole epochs

keras.utils.set_random_seed(0)
splits = load_mnist(val_size=5000, seed=0)
x_train, y_train = splits.x_train, splits.y_train
if STEPS:
    x_train, y_train = x_train[: STEPS * BATCH_SIZE], y_train[: STEPS * BATCH_SIZE]
print(
    "train",
    x_train.shape,
    "validation",
    splits.x_val.shape,
    "test",
    splits.x_test.shape,
)

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
    validation_data=(splits.x_val, splits.y_val),
    verbose=2,
)
test_loss, test_accuracy = model.evaluate(splits.x_test, splits.y_test, verbose=0)
print(f"test accuracy: {test_accuracy:.2%}")

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
sample = splits.x_test[:8]
np.testing.assert_allclose(
    reloaded.predict(sample, verbose=0), model.predict(sample, verbose=0), atol=1e-5
)
print("reloaded mnist_synapse.keras: same predictions")
