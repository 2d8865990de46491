"""jax: one device ("default") or `keras.distribution.DataParallel`
("data_parallel"), over one process or several (multi-host TPU slices, GPU
hosts, or processes over loopback on a CPU)."""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import keras
import numpy as np

from training import jax_platform
from training.distribute import cluster
from training.distribute.base import Strategy, chief_only
from training.distribute.batches import GlobalBatches

ENV_MULTIHOST = "SYNANN_MULTIHOST"


@dataclass
class JaxStrategy(Strategy):
    """jax on one device ("default"): `fit` feeds `GlobalBatches`, so its
    batches are those of "data_parallel" on any number of devices and
    processes with the same seed and global batch size."""

    def _batches(self, x, y, batch_size, validation_data):
        shards = {
            "replicas": self.num_replicas,
            "process_index": self.process_index,
            "process_count": self.process_count,
        }
        train = GlobalBatches(x, y, batch_size, shuffle=True, **shards)
        if validation_data is not None:
            validation_data = GlobalBatches(
                *validation_data[:2], batch_size, what="validation", **shards
            )
        return train, validation_data

    def fit(self, model, x, y, *, batch_size, validation_data=None, **fit_kwargs):
        self.check_batch(batch_size)
        train, validation_data = self._batches(x, y, batch_size, validation_data)
        # GlobalBatches draws each epoch's order itself. Keras's shuffle would
        # reorder its batches with Python's global `random`, which every
        # process would then have to consume identically to feed its part of
        # the same global batch at each step.
        return model.fit(
            train, validation_data=validation_data, shuffle=False, **fit_kwargs
        )


@dataclass
class JaxDataParallel(JaxStrategy):
    """`keras.distribution.DataParallel`: the batch is split over the devices.

    `scope()` sets the distribution (it must be set before the model is built
    and stays set for `fit`; Keras keeps it per thread, and `fit` runs on the
    caller's thread). `fit` feeds `GlobalBatches`: the global batch must be a
    multiple of the device count; training and validation arrays are trimmed
    to a multiple of it. `evaluate` and `predict` run with the distribution
    lifted, on a copy of the model on one device of this process
    (`restore_best` returns one), so they see every sample.

    Several processes (a multi-host TPU slice, GPU hosts, processes on one
    CPU): every process holds all the data and feeds its part of each global
    batch (`auto_shard_dataset=False`); Keras assembles the global batch.
    `restore_best` gives every process the same weights (replicated, or the
    chief's file broadcast from process 0), so every process evaluates and
    predicts on its own and reports the same numbers. `coordination()` is
    jax's coordination-service client, in which the supervisor's heartbeat
    (training/supervisor/heartbeat.py) keeps its record.

    On CPU with several processes, `fit` runs one step at a time (see
    `OneStepAtATime`).
    """

    distribution: Any = None

    def scope(self):
        keras.distribution.set_distribution(self.distribution)
        return contextlib.nullcontext()

    def fit(self, model, x, y, *, batch_size, **fit_kwargs):
        keras.distribution.set_distribution(self.distribution)
        if not self.is_chief:
            fit_kwargs["verbose"] = 0
        if self.process_count > 1:
            callbacks = [
                _Undistributed(c) if chief_only(c) else c
                for c in fit_kwargs.get("callbacks") or []
            ]
            if self.devices and self.devices[0].startswith("cpu"):
                callbacks.append(OneStepAtATime())
            fit_kwargs["callbacks"] = callbacks
        return super().fit(model, x, y, batch_size=batch_size, **fit_kwargs)

    def restore_best(self, model, path=None, weights=None):
        """A copy of the model on one device of this process, with `weights`
        (the same on every process) if given, else the chief's checkpoint at
        `path` if it saved one (broadcast from process 0 when there are
        several), else `model`'s weights: what `evaluate` and `predict` run."""
        from jax.experimental import multihost_utils

        with self._undistributed():
            if weights is not None:
                return _local_copy(model, [np.asarray(w) for w in weights])
            if self.is_chief and path is not None and Path(path).is_file():
                weights = keras.saving.load_model(path).get_weights()
            else:
                weights = model.get_weights()  # replicated: every process has them
            if self.process_count > 1:
                weights = multihost_utils.broadcast_one_to_all(weights)
            return _local_copy(model, [np.asarray(w) for w in weights])

    def save(self, model, path) -> None:
        """Save `model` (a copy from `restore_best`) with the distribution
        lifted: saving creates variables, which under a multi-process
        distribution every process would have to create together."""
        with self._undistributed():
            model.save(path)

    def agree(self, value: int) -> int:
        """Process 0's `value`, on every process."""
        if self.process_count == 1:
            return value
        from jax.experimental import multihost_utils

        return int(multihost_utils.broadcast_one_to_all(np.int32(value)))

    def any_process(self, flag: bool) -> bool:
        """Whether `flag` is set on any process (a small all-gather)."""
        if self.process_count == 1:
            return flag
        from jax.experimental import multihost_utils

        flags = multihost_utils.process_allgather(np.int32(bool(flag)))
        return bool(np.asarray(flags).any())

    def coordination(self):
        if self.process_count == 1:
            return None
        return cluster.distributed_client()

    @contextlib.contextmanager
    def _undistributed(self):
        """Lift the distribution: batches of any size, on one device."""
        keras.distribution.set_distribution(None)
        try:
            yield
        finally:
            keras.distribution.set_distribution(self.distribution)

    def _on_one_device(self, model):
        """`model`, or a copy on one device of this process if its weights are
        spread over several (a jitted step without the distribution cannot
        take them, and weights on other processes' devices mix with no local
        data)."""
        if len(model.weights[0].value.sharding.device_set) == 1:
            return model
        return _local_copy(model, model.get_weights())

    def evaluate(self, model, x, y, *, batch_size, verbose=0):
        with self._undistributed():
            local = self._on_one_device(model)
            return super().evaluate(local, x, y, batch_size=batch_size, verbose=verbose)

    def predict(self, model, x, *, batch_size, verbose=0):
        with self._undistributed():
            local = self._on_one_device(model)
            return super().predict(local, x, batch_size=batch_size, verbose=verbose)


class OneStepAtATime(keras.callbacks.Callback):
    """Makes `fit` wait for each step's results before it starts the next.

    jaxlib's CPU client lets each device hold 32 computations in flight. When
    one process of a multi-process CPU run (gloo collectives) has more than
    that many multi-device steps queued, its launches deadlock with the other
    processes' (jaxlib 0.10.2; 2 processes x 2 CPU devices, steps with an
    all-reduce dispatched without waiting: 100 queued hang every time, 40
    sometimes, 31 or fewer never, nor with one device per process). Keras
    dispatches steps without waiting when no callback has batch-end hooks, so
    a validation pass of more than 32 batches right after the training steps
    hangs. A callback with batch-end hooks makes Keras run callbacks on the
    training loop's thread with each step's logs converted to floats, that is,
    after the step has finished: one step in flight. On CPU that costs little
    (Keras itself skips look-ahead there).
    """

    def on_train_batch_end(self, batch, logs=None):
        pass

    def on_test_batch_end(self, batch, logs=None):
        pass

    def on_predict_batch_end(self, batch, logs=None):
        pass


class _Undistributed(keras.callbacks.Callback):
    """Runs a chief-only callback's epoch hooks with the distribution lifted.

    Keras's saving creates variables (a reference optimizer), and under a
    multi-process distribution creating one is a step that every process must
    take; only the chief saves. Lifted, they are local. Keras keeps the
    distribution per thread and calls epoch hooks on the training loop's
    thread, so lifting it here changes nothing for other threads.
    """

    def __init__(self, callback):
        super().__init__()
        self.callback = callback

    def set_model(self, model):
        super().set_model(model)
        self.callback.set_model(model)

    def set_params(self, params):
        super().set_params(params)
        self.callback.set_params(params)

    def _lifted(self, hook, *args, **kwargs):
        distribution = keras.distribution.distribution()
        keras.distribution.set_distribution(None)
        try:
            return getattr(self.callback, hook)(*args, **kwargs)
        finally:
            keras.distribution.set_distribution(distribution)

    def on_train_begin(self, logs=None):
        self._lifted("on_train_begin", logs)

    def on_train_end(self, logs=None):
        self._lifted("on_train_end", logs)

    def on_epoch_begin(self, epoch, logs=None):
        self._lifted("on_epoch_begin", epoch, logs)

    def on_epoch_end(self, epoch, logs=None):
        self._lifted("on_epoch_end", epoch, logs)


def _local_copy(model, weights):
    """A compiled copy of `model` on this process's default device with `weights`
    (call with the distribution lifted)."""
    copy = keras.models.clone_model(model)
    copy.set_weights(weights)
    if model.compiled:
        copy.compile_from_config(model.get_compile_config())
    return copy


def multihost_requested() -> bool:
    """Whether the environment asks for a multi-process jax run (see module doc)."""
    forced = os.environ.get(ENV_MULTIHOST, "").strip().lower()
    if forced:
        return forced in ("1", "true", "yes")
    env = os.environ
    if int(env.get("KERAS_DISTRIBUTION_NUM_PROCESSES", "1") or 1) > 1:
        return True
    if int(env.get("MEGASCALE_NUM_SLICES", "1") or 1) > 1:
        return True
    for key in (
        "KERAS_DISTRIBUTION_JOB_ADDRESSES",
        "TPU_WORKER_HOSTNAMES",
        "TPU_PROCESS_ADDRESSES",
    ):
        if "," in env.get(key, ""):
            return True
    return False


def _join(jax, agree_on_seed: bool = True) -> None:
    """Join the other processes (cluster.join); on CPU with gloo collectives,
    which multi-process CPU runs need."""
    if jax_platform.accelerator() is None and not os.environ.get(
        "JAX_CPU_COLLECTIVES_IMPLEMENTATION"
    ):
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    cluster.join(agree_on_seed=agree_on_seed)


def join_to_report():
    """Join the other processes of a multi-process run only to report a
    failure that came first (bad arguments, a failed check), so that they stop
    at once instead of waiting for this one until the join timeout: (jax's
    coordination-service client, process index, process count), or None for
    one process or when joining fails (the others' join timeout then bounds
    their wait)."""
    import jax

    if not multihost_requested() or cluster.distributed_client() is not None:
        return None
    try:
        _join(jax, agree_on_seed=False)
    except Exception:
        return None
    return cluster.distributed_client(), jax.process_index(), jax.process_count()


def resolve(name: str) -> Strategy:
    import jax

    if name != "default" and multihost_requested():
        _join(jax)
    devices = keras.distribution.list_devices()
    is_chief = jax.process_index() == 0
    if name == "auto":
        name = "data_parallel" if len(devices) > 1 else "default"
    if name == "default":
        return JaxStrategy("default", "jax", devices[:1], is_chief=is_chief)
    if len(devices) < 2:
        raise ValueError(
            f"'data_parallel' needs more than one jax device, found {len(devices)}; "
            "use 'default' (on CPU, XLA_FLAGS=--xla_force_host_platform_device_count=N "
            "simulates N)."
        )
    processes = jax.process_count()
    return JaxDataParallel(
        "data_parallel",
        "jax",
        list(devices),
        is_chief=is_chief,
        process_count=processes,
        # With several processes each feeds its own part (GlobalBatches).
        distribution=keras.distribution.DataParallel(
            devices=devices, auto_shard_dataset=processes == 1
        ),
        process_index=jax.process_index(),
    )
