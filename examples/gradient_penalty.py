# %% [markdown]
# # A gradient penalty through a Synapse layer
#
# **Author:** keras_synann authors<br>
# **Date created:** 2026-12-05<br>
# **Last modified:** 2026-12-05<br>
# **Accelerator:** none needed (a few seconds on a CPU)<br>
# **Description:** train a small critic with a WGAN-GP style gradient penalty,
# which differentiates the gradient of the critic with respect to its input:
# a second derivative through `keras_synann.Synapse`, on JAX, PyTorch or
# TensorFlow.
#
# ```
# KERAS_BACKEND=jax python examples/gradient_penalty.py
# ```
#
# Keras has no backend-independent API for a gradient of a gradient, so the
# penalty step is written once per backend, the way keras.io's WGAN-GP
# example does it for TensorFlow. The layer gives the true second derivative
# on every backend and with every implementation (docs/layer.md, "Derivatives
# and transforms").

# %%
import os

os.environ.setdefault("KERAS_BACKEND", "jax")

import keras
import numpy as np

from keras_synann import Synapse

keras.utils.set_random_seed(0)
rng = np.random.default_rng(0)
STEPS = 40

# %% [markdown]
# ## A critic
#
# Dense layers with sigmoids feed the Synapse probabilities; one output is
# the critic's score. The data: "real" and "fake" points in 16 dimensions.

# %%
critic = keras.Sequential(
    [
        keras.Input((16,)),
        keras.layers.Dense(32, activation="sigmoid"),
        Synapse(),
        keras.layers.Dense(1),
    ]
)
real = rng.normal(1.0, 0.5, (64, 16)).astype("float32")
fake = rng.normal(-1.0, 0.5, (64, 16)).astype("float32")
optimizer = keras.optimizers.Adam(1e-3)
PENALTY_WEIGHT = 10.0


def mixed(batch):
    """Points on lines between real and fake samples, where WGAN-GP penalises."""
    t = rng.uniform(size=(batch, 1)).astype("float32")
    return t * real + (1.0 - t) * fake


# %% [markdown]
# ## The penalty step, per backend
#
# loss = mean(critic(fake)) - mean(critic(real)) + 10 * mean((|d critic / dx| - 1) ** 2)

# %%
backend = keras.backend.backend()

if backend == "jax":
    import jax
    import jax.numpy as jnp

    def critic_fn(weights, x):
        out, _ = critic.stateless_call(weights, non_trainable, x)
        return out

    def loss_fn(weights, x_mix):
        score_grad = jax.grad(lambda x: jnp.sum(critic_fn(weights, x)))(x_mix)
        norm = jnp.sqrt(jnp.sum(score_grad**2, axis=1) + 1e-12)
        penalty = jnp.mean((norm - 1.0) ** 2)
        wasserstein = jnp.mean(critic_fn(weights, fake)) - jnp.mean(
            critic_fn(weights, real)
        )
        return wasserstein + PENALTY_WEIGHT * penalty, penalty

    grad_fn = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))
    non_trainable = [v.value for v in critic.non_trainable_variables]

    def train_step(x_mix):
        weights = [v.value for v in critic.trainable_variables]
        (_, penalty), grads = grad_fn(weights, x_mix)
        optimizer.apply(grads, critic.trainable_variables)
        return float(penalty)

elif backend == "torch":
    import torch

    def train_step(x_mix):
        x = torch.tensor(x_mix, requires_grad=True)
        (score_grad,) = torch.autograd.grad(critic(x).sum(), x, create_graph=True)
        norm = torch.sqrt((score_grad**2).sum(1) + 1e-12)
        penalty = ((norm - 1.0) ** 2).mean()
        wasserstein = critic(fake).mean() - critic(real).mean()
        loss = wasserstein + PENALTY_WEIGHT * penalty
        weights = [v.value for v in critic.trainable_variables]
        grads = torch.autograd.grad(loss, weights)
        optimizer.apply(list(grads), critic.trainable_variables)
        return float(penalty.detach())

else:
    import tensorflow as tf

    def train_step(x_mix):
        x = tf.constant(x_mix)
        with tf.GradientTape() as outer:
            with tf.GradientTape() as inner:
                inner.watch(x)
                score = tf.reduce_sum(critic(x))
            score_grad = inner.gradient(score, x)
            norm = tf.sqrt(tf.reduce_sum(score_grad**2, axis=1) + 1e-12)
            penalty = tf.reduce_mean((norm - 1.0) ** 2)
            wasserstein = tf.reduce_mean(critic(fake)) - tf.reduce_mean(critic(real))
            loss = wasserstein + PENALTY_WEIGHT * penalty
        grads = outer.gradient(loss, critic.trainable_variables)
        optimizer.apply(grads, critic.trainable_variables)
        return float(penalty)


# %% [markdown]
# ## Train
#
# The penalty pulls the critic's input-gradient norm towards 1.

# %%
penalties = [train_step(mixed(64)) for _ in range(STEPS)]
print(f"{backend}: gradient penalty {penalties[0]:.4f} -> {penalties[-1]:.4f}")
