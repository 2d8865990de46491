"""Distribution strategies, one function per backend.

`resolve(name)` returns a `Strategy`; training/mnist.py builds and compiles the
model inside `strategy.scope()`, trains with `strategy.fit(...)` on in-memory
NumPy arrays with the GLOBAL batch size, then takes `strategy.restore_best(...)`
(the chief's best checkpoint, on every process) to `strategy.evaluate` and
`strategy.predict`, which give every process the same numbers.

Names: "auto", "default" (one device, no strategy), "data_parallel" (jax),
"mirrored" and "tpu" (tensorflow), "ddp" (torch). "auto" picks:

- jax: `keras.distribution.DataParallel` over all devices when there is more
  than one, else "default". Both feed `GlobalBatches`, so the batches do not
  depend on the device or process count. Multi-process runs (multi-host TPU
  slices, several GPU hosts) call `keras.distribution.initialize()` first
  (with gloo collectives on CPU); they are detected from the environment only
  (no network, no jax backend start-up): `SYNANN_MULTIHOST=1` (force; `0`
  forbids), `KERAS_DISTRIBUTION_NUM_PROCESSES` > 1,
  `KERAS_DISTRIBUTION_JOB_ADDRESSES` with several addresses,
  `MEGASCALE_NUM_SLICES` > 1, or `TPU_WORKER_HOSTNAMES` /
  `TPU_PROCESS_ADDRESSES` naming several hosts.
- tensorflow: `TPUStrategy` when a TPU is found (looked for only when
  `TPU_NAME` or `COLAB_TPU_ADDR` is set or /dev/accel* or /dev/vfio/<n> exist,
  so machines without one never wait on a metadata server), `MirroredStrategy`
  over several GPUs, else "default". `SYNANN_TF_LOGICAL_CPUS=N` (N >= 2) splits
  the CPU into N logical devices before TensorFlow initialises, so "mirrored"
  (and "auto" when there are not several GPUs) runs N replicas on a CPU.
- torch: DistributedDataParallel when started by torchrun (`WORLD_SIZE` > 1),
  else "default". Keras 3.15 has no torch support in `keras.distribution`, so
  `TorchDDP.fit` is a plain torch loop around the compiled model (see there).
"""

from __future__ import annotations

import atexit
import contextlib
import glob
import importlib.util
import math
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import keras
import numpy as np

ENV_TF_LOGICAL_CPUS = "SYNANN_TF_LOGICAL_CPUS"
ENV_MULTIHOST = "SYNANN_MULTIHOST"

NAMES = ("auto", "default", "data_parallel", "mirrored", "tpu", "ddp")
BACKEND_NAMES = {
    "jax": ("default", "data_parallel"),
    "tensorflow": ("default", "mirrored", "tpu"),
    "torch": ("default", "ddp"),
}

#: Callbacks that write files; under DDP only the chief (rank 0) runs them.
#: A custom callback opts in with a true `chief_only` attribute.
CHIEF_ONLY_CALLBACKS = (
    keras.callbacks.ModelCheckpoint,
    keras.callbacks.CSVLogger,
    keras.callbacks.BackupAndRestore,
    keras.callbacks.TensorBoard,
)


@dataclass
class Strategy:
    """What training needs from a backend's distribution strategy.

    The base class is the "default" strategy: one device, plain `model.fit`.
    """

    name: str  # "default", "data_parallel", "mirrored", "tpu", "ddp"
    backend: str
    devices: list[str] = field(default_factory=list)  # every device, all processes
    is_chief: bool = True  # the process that writes artifacts
    process_index: int = 0
    process_count: int = 1

    @property
    def num_replicas(self) -> int:
        return max(1, len(self.devices))

    @property
    def can_resume(self) -> bool:
        """Whether a run can continue from a backup the chief wrote."""
        return True

    def scope(self):
        """Context in which to build and compile the model."""
        return contextlib.nullcontext()

    def fit(self, model, x, y, *, batch_size, **fit_kwargs):
        """Train like `model.fit(x, y, batch_size=..., **fit_kwargs)` on in-memory
        arrays with the GLOBAL batch size; returns a History."""
        return model.fit(x, y, batch_size=batch_size, **fit_kwargs)

    def restore_best(self, model, path):
        """The model to report: the checkpoint at `path` if the chief saved one
        (on every process), else `model` as training left it."""
        if self.is_chief and Path(path).is_file():
            with self.scope():
                return keras.saving.load_model(path)
        return model

    def evaluate(self, model, x, y, *, batch_size, verbose=0) -> dict[str, float]:
        """Metrics of `model` on all of (x, y), the same on every process."""
        return model.evaluate(
            x, y, batch_size=batch_size, verbose=verbose, return_dict=True
        )

    def predict(self, model, x, *, batch_size, verbose=0) -> np.ndarray:
        """`model.predict` on all of x, the same on every process."""
        return model.predict(x, batch_size=batch_size, verbose=verbose)

    def close(self) -> None:
        """Release what the strategy holds (the torch process group)."""

    def check_batch(self, batch_size: int) -> None:
        """The global batch must split evenly over the replicas."""
        if batch_size % self.num_replicas:
            raise ValueError(
                f"batch size {batch_size} must be a multiple of the "
                f"{self.num_replicas} replicas of {self.name!r}"
            )


def _trim(arrays, multiple: int, what: str):
    """Drop the last `len % multiple` samples (with a warning) so shards are even."""
    arrays = tuple(arrays)
    n = len(arrays[0])
    extra = n % multiple
    if not extra:
        return arrays
    warnings.warn(
        f"Dropping the last {extra} of {n} {what} samples so that they split "
        f"evenly over {multiple} replicas.",
        stacklevel=3,
    )
    return tuple(a[: n - extra] for a in arrays)


# ----------------------------------------------------------------------------
# jax


class GlobalBatches(keras.utils.PyDataset):
    """(x, y) batches whose global makeup does not depend on the process count.

    Step k's global batch is the rows `order[k * B : (k + 1) * B]` (B the
    global batch size; `order` a new seeded permutation each epoch when
    shuffling, else 0..n-1). Process p of P yields the p-th contiguous 1/P
    of those rows, so the processes' parts, stacked in process order, are the
    global batch: 1 process x 4 devices and 2 processes x 2 devices train on
    the same batches. n is trimmed to a multiple of `replicas` (at most
    replicas - 1 samples, with a warning) so that every batch, the last one
    included, splits evenly over the devices.
    """

    def __init__(
        self,
        x,
        y,
        batch_size: int,
        replicas: int,
        *,
        process_index: int = 0,
        process_count: int = 1,
        shuffle: bool = False,
        what: str = "training",
    ):
        super().__init__()
        self.x, self.y = _trim((x, y), replicas, what)
        self.batch_size = batch_size
        self.process_index, self.process_count = process_index, process_count
        # NumPy's global generator, which keras.utils.set_random_seed seeds:
        # the same seed on every process.
        self._seed = np.random.randint(2**31 - 1) if shuffle else None  # noqa: NPY002
        self._epoch = 0
        self._order = self._new_order()

    def _new_order(self) -> np.ndarray:
        n = len(self.y)
        if self._seed is None:
            return np.arange(n)
        return np.random.default_rng([self._seed, self._epoch]).permutation(n)

    def __len__(self) -> int:
        return math.ceil(len(self.y) / self.batch_size)

    def __getitem__(self, k: int):
        rows = self._order[k * self.batch_size : (k + 1) * self.batch_size]
        part = len(rows) // self.process_count
        rows = rows[self.process_index * part : (self.process_index + 1) * part]
        return self.x[rows], self.y[rows]

    def on_epoch_end(self) -> None:
        self._epoch += 1
        self._order = self._new_order()


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
        return model.fit(train, validation_data=validation_data, **fit_kwargs)


@dataclass
class JaxDataParallel(JaxStrategy):
    """`keras.distribution.DataParallel`: the batch is split over the devices.

    `scope()` sets the distribution globally (it must be set before the model
    is built and stays set for `fit`). `fit` feeds `GlobalBatches`: the global
    batch must be a multiple of the device count; training and validation
    arrays are trimmed to a multiple of it. `evaluate` and `predict` run with
    the distribution lifted, on a copy of the model on one device of this
    process (`restore_best` returns one), so they see every sample.

    Several processes (a multi-host TPU slice, GPU hosts): every process
    holds all the data and feeds its part of each global batch
    (`auto_shard_dataset=False`); Keras assembles the global batch. After
    training, `restore_best` gives every process the chief's best checkpoint
    (broadcast from process 0), so every process evaluates and predicts on
    its own and reports the same numbers.
    """

    distribution: Any = None

    @property
    def can_resume(self) -> bool:
        # BackupAndRestore runs on the chief only: other processes could not
        # see its backup and would start from another epoch.
        return self.process_count == 1

    def scope(self):
        keras.distribution.set_distribution(self.distribution)
        return contextlib.nullcontext()

    def fit(self, model, x, y, *, batch_size, **fit_kwargs):
        keras.distribution.set_distribution(self.distribution)
        if not self.is_chief:
            fit_kwargs["verbose"] = 0
        if self.process_count > 1:
            fit_kwargs["callbacks"] = [
                _Undistributed(c) if _chief_only(c) else c
                for c in fit_kwargs.get("callbacks") or []
            ]
        return super().fit(model, x, y, batch_size=batch_size, **fit_kwargs)

    def restore_best(self, model, path):
        """The chief's best checkpoint (or `model`'s weights), broadcast from
        process 0 when there are several, in a copy of the model on one device
        of this process: what `evaluate` and `predict` run."""
        from jax.experimental import multihost_utils

        with self._undistributed():
            if self.is_chief and Path(path).is_file():
                weights = keras.saving.load_model(path).get_weights()
            else:
                weights = model.get_weights()  # replicated: every process has them
            if self.process_count > 1:
                weights = multihost_utils.broadcast_one_to_all(weights)
            return _local_copy(model, [np.asarray(w) for w in weights])

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


class _Undistributed(keras.callbacks.Callback):
    """Runs a file-writing callback's epoch hooks with the distribution lifted.

    Saving creates variables (Keras builds a reference optimizer), and under
    a multi-process distribution creating one is a collective step that every
    process must take; only the chief saves. Lifted, they are local.
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


def _chief_only(callback) -> bool:
    return isinstance(callback, CHIEF_ONLY_CALLBACKS) or bool(
        getattr(callback, "chief_only", False)
    )


def _local_copy(model, weights):
    """A compiled copy of `model` on this process's default device with `weights`
    (call with the distribution lifted)."""
    copy = keras.models.clone_model(model)
    copy.set_weights(weights)
    if model.compiled:
        copy.compile_from_config(model.get_compile_config())
    return copy


def _jax_multihost_requested() -> bool:
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


def _jax_cpu_only() -> bool:
    """Whether jax will run on the CPU: JAX_PLATFORMS says so, or no TPU or GPU
    plugin is installed (checked without starting a jax backend)."""
    platforms = os.environ.get("JAX_PLATFORMS", "").strip().lower()
    if platforms:
        return platforms.split(",")[0] == "cpu"
    plugins = ("libtpu", "jax_cuda12_plugin", "jax_cuda13_plugin", "jax_rocm7_plugin")
    return not any(importlib.util.find_spec(name) for name in plugins)


def _jax_initialize(jax) -> None:
    """Join the other processes (keras.distribution.initialize); on CPU, with
    gloo collectives, which multi-process CPU runs need."""
    is_initialized = getattr(jax.distributed, "is_initialized", lambda: False)
    if is_initialized():
        return
    if _jax_cpu_only() and not os.environ.get("JAX_CPU_COLLECTIVES_IMPLEMENTATION"):
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    keras.distribution.initialize()


def _jax(name: str) -> Strategy:
    import jax

    if name != "default" and _jax_multihost_requested():
        _jax_initialize(jax)
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


# ----------------------------------------------------------------------------
# tensorflow


@dataclass
class TFStrategy(Strategy):
    """A `tf.distribute` strategy ("mirrored" or "tpu"); fit is `model.fit`.

    Keras 3.15 fails when the first batch does not split evenly over the
    replicas, so arrays smaller than one batch are trimmed to a multiple of the
    replica count (with a warning; `predict` pads instead and drops the extra
    predictions); larger ones are left whole.
    """

    tf_strategy: Any = None

    def scope(self):
        return self.tf_strategy.scope()

    def fit(self, model, x, y, *, batch_size, validation_data=None, **fit_kwargs):
        self.check_batch(batch_size)
        if len(x) < batch_size:
            x, y = _trim((x, y), self.num_replicas, "training")
        if validation_data is not None and len(validation_data[0]) < batch_size:
            validation_data = _trim(validation_data, self.num_replicas, "validation")
        return super().fit(
            model,
            x,
            y,
            batch_size=batch_size,
            validation_data=validation_data,
            **fit_kwargs,
        )

    def evaluate(self, model, x, y, *, batch_size, verbose=0):
        if len(x) < batch_size:
            x, y = _trim((x, y), self.num_replicas, "evaluation")
        return super().evaluate(model, x, y, batch_size=batch_size, verbose=verbose)

    def predict(self, model, x, *, batch_size, verbose=0):
        n = len(x)
        pad = (-n) % self.num_replicas if n < batch_size else 0
        if pad:  # repeat the first samples, then drop their predictions
            x = np.concatenate([x, x[:pad]])
        return super().predict(model, x, batch_size=batch_size, verbose=verbose)[:n]


def _tf_logical_cpus(tf) -> int:
    """Apply SYNANN_TF_LOGICAL_CPUS; returns the number of logical CPUs asked for."""
    raw = os.environ.get(ENV_TF_LOGICAL_CPUS, "").strip()
    if not raw:
        return 0
    if not raw.isdigit() or int(raw) < 1:
        raise ValueError(
            f"{ENV_TF_LOGICAL_CPUS}={raw!r} is not valid; expected a positive integer."
        )
    n = int(raw)
    cpu = tf.config.list_physical_devices("CPU")[0]
    current = tf.config.get_logical_device_configuration(cpu) or [None]
    if len(current) != n:
        try:
            tf.config.set_logical_device_configuration(
                cpu, [tf.config.LogicalDeviceConfiguration()] * n
            )
        except RuntimeError:
            raise ValueError(
                f"{ENV_TF_LOGICAL_CPUS}={n} came after TensorFlow initialised; "
                "call resolve() before running any TensorFlow op."
            ) from None
    return n


def _tpu_hint() -> bool:
    """A TPU may be here: an env var names one or TPU device files exist."""
    return bool(
        os.environ.get("TPU_NAME")
        or os.environ.get("COLAB_TPU_ADDR")
        or glob.glob("/dev/accel*")
        or glob.glob("/dev/vfio/[0-9]*")
    )


def _tf_tpu_strategy(tf):
    """A connected TPUStrategy, or None (with the reason) when there is no TPU."""
    if not _tpu_hint():
        return None, "no TPU_NAME/COLAB_TPU_ADDR and no /dev/accel* or /dev/vfio device"
    tpu = os.environ.get("TPU_NAME") or (
        None if os.environ.get("COLAB_TPU_ADDR") else "local"
    )
    try:
        resolver = tf.distribute.cluster_resolver.TPUClusterResolver(tpu=tpu)
        tf.config.experimental_connect_to_cluster(resolver)
        tf.tpu.experimental.initialize_tpu_system(resolver)
        return tf.distribute.TPUStrategy(resolver), ""
    except Exception as err:  # any failure means: no usable TPU
        first_line = (str(err).strip().splitlines() or [type(err).__name__])[0]
        return None, first_line


def _tensorflow(name: str) -> Strategy:
    import tensorflow as tf

    n_logical = _tf_logical_cpus(tf)
    if name in ("auto", "tpu"):
        tpu_strategy, why = _tf_tpu_strategy(tf)
        if tpu_strategy is not None:
            devices = [d.name for d in tf.config.list_logical_devices("TPU")]
            return TFStrategy("tpu", "tensorflow", devices, tf_strategy=tpu_strategy)
        if name == "tpu":
            raise ValueError(f"'tpu' needs a TPU and none is usable here ({why}).")
        if _tpu_hint():
            warnings.warn(
                f"No TPU after all ({why}); not using TPUStrategy.", stacklevel=3
            )
    gpus = [d.name for d in tf.config.list_logical_devices("GPU")]
    cpus = [d.name for d in tf.config.list_logical_devices("CPU")]
    if name == "auto":
        name = "mirrored" if len(gpus) > 1 or n_logical > 1 else "default"
    if name == "mirrored":
        devices = gpus if len(gpus) > 1 else cpus if n_logical > 1 else gpus
        if len(devices) < 2:
            raise ValueError(
                f"'mirrored' needs several GPUs (found {len(gpus)}) or "
                f"{ENV_TF_LOGICAL_CPUS}=N >= 2 logical CPUs; use 'default'."
            )
        strategy = tf.distribute.MirroredStrategy(devices)
        return TFStrategy("mirrored", "tensorflow", devices, tf_strategy=strategy)
    return Strategy("default", "tensorflow", (gpus or cpus)[:1])


# ----------------------------------------------------------------------------
# torch


@dataclass
class TorchDDP(Strategy):
    """DistributedDataParallel, one process per device, started by torchrun.

    `fit` is a plain torch loop around the compiled Keras model, the way the
    Keras guide "distributed_training_with_torch" runs a Keras model under DDP,
    but with the model's own loss, optimizer (its constraints included, e.g.
    the Synapse kernel clip) and metrics:

    - every step takes the same global batch on all ranks (one permutation per
      epoch, seeded from rank 0); rank r trains on its strided share
      (batch_size / process_count samples); an epoch's sample order is padded by
      wrapping around, like `DistributedSampler`, so every share is equal;
    - DDP averages the gradients during `backward()`, then each rank applies
      them with `model.optimizer`, so the weights stay identical;
    - metric states (totals and counts) are summed over ranks at the end of
      each epoch, and validation (each rank a strided share, summed the same
      way) gives the `val_` logs, so every rank sees the same epoch logs;
    - callbacks run through `keras.callbacks.CallbackList`; on non-chief ranks
      the file-writing ones (`CHIEF_ONLY_CALLBACKS`, or `chief_only = True`)
      are left out and there is no progress bar. After `on_train_begin` (where
      BackupAndRestore may restore) rank 0's weights, optimizer state and
      initial epoch are broadcast; after each epoch rank 0's `stop_training`
      (so a stop asked for mid-epoch takes effect at the epoch's end).

    Like Keras's own torch trainer it uses `model._symbolic_build` and
    `model._loss_tracker`. `devices` has one entry per process.
    """

    local_rank: int = 0
    device: str = "cpu"

    def fit(
        self,
        model,
        x,
        y,
        *,
        batch_size,
        epochs=1,
        validation_data=None,
        callbacks=None,
        initial_epoch=0,
        verbose="auto",
    ):
        from torch.nn.parallel import DistributedDataParallel

        self.check_batch(batch_size)
        local_batch = batch_size // self.process_count
        n = len(x)
        steps = math.ceil(n / batch_size)
        model.to(self.device)
        model._symbolic_build(data_batch=(x[:local_batch], y[:local_batch]))
        if model.optimizer is not None and not model.optimizer.built:
            model.optimizer.build(model.trainable_variables)

        kept = [c for c in callbacks or [] if self.is_chief or not _chief_only(c)]
        verbose = verbose if self.is_chief else 0
        callback_list = keras.callbacks.CallbackList(
            kept,
            add_history=True,
            add_progbar=verbose != 0,
            verbose=verbose,
            epochs=epochs,
            steps=steps,
            model=model,
        )
        model.stop_training = False
        callback_list.on_train_begin()
        initial_epoch = getattr(model, "_initial_epoch", None) or initial_epoch
        initial_epoch = int(self._broadcast_scalar(initial_epoch))
        self._broadcast_variables(model)
        # NumPy's global generator: keras.utils.set_random_seed seeds it.
        seed = np.random.randint(2**31 - 1)  # noqa: NPY002
        seed = int(self._broadcast_scalar(seed))
        ddp = DistributedDataParallel(
            model, device_ids=[self.local_rank] if self.device != "cpu" else None
        )

        epoch_logs: dict[str, float] = {}
        for epoch in range(initial_epoch, epochs):
            model.reset_metrics()
            callback_list.on_epoch_begin(epoch)
            model.train()
            order = np.random.default_rng([seed, epoch]).permutation(n)
            order = np.concatenate([order, order[: (-n) % self.process_count]])
            for step in range(steps):
                callback_list.on_train_batch_begin(step)
                part = order[step * batch_size : (step + 1) * batch_size]
                part = part[self.process_index :: self.process_count]
                logs = self._train_step(ddp, model, x[part], y[part])
                callback_list.on_train_batch_end(step, logs)
            epoch_logs = self._reduced_metrics(model)
            model.eval()
            if validation_data is not None:
                val_logs = self._validate(model, validation_data, local_batch)
                epoch_logs.update({f"val_{k}": v for k, v in val_logs.items()})
            callback_list.on_epoch_end(epoch, epoch_logs)
            model.stop_training = bool(self._broadcast_scalar(model.stop_training))
            if model.stop_training:
                break
        if isinstance(model.optimizer, keras.optimizers.Optimizer) and epochs > 0:
            model.optimizer.finalize_variable_values(model.trainable_weights)
        callback_list.on_train_end(logs=epoch_logs)
        del ddp
        return model.history

    def _tensor(self, array):
        import torch

        return torch.as_tensor(np.asarray(array), device=self.device)

    def _train_step(self, ddp, model, x, y) -> dict:
        """One step on this rank's share; DDP averages gradients in backward()."""
        import torch

        x, y = self._tensor(x), self._tensor(y)
        y_pred = ddp(x, training=True)
        model.zero_grad()
        loss = model.compute_loss(x=x, y=y, y_pred=y_pred, training=True)
        model._loss_tracker.update_state(loss, sample_weight=x.shape[0])
        loss = model.optimizer.scale_loss(loss)
        loss.backward()
        variables = model.trainable_variables
        with torch.no_grad():
            model.optimizer.apply([v.value.grad for v in variables], variables)
        return model.compute_metrics(x, y, y_pred, sample_weight=None)

    def _validate(self, model, data, local_batch: int) -> dict[str, float]:
        import torch

        model.reset_metrics()
        xv, yv = (a[self.process_index :: self.process_count] for a in data[:2])
        with torch.no_grad():
            for start in range(0, len(xv), local_batch):
                x = self._tensor(xv[start : start + local_batch])
                y = self._tensor(yv[start : start + local_batch])
                y_pred = model(x, training=False)
                loss = model.compute_loss(x=x, y=y, y_pred=y_pred, training=False)
                model._loss_tracker.update_state(loss, sample_weight=x.shape[0])
                model.compute_metrics(x, y, y_pred, sample_weight=None)
        return self._reduced_metrics(model)

    def _reduced_metrics(self, model) -> dict[str, float]:
        """Sum every metric state over ranks (all Keras built-ins are sums)."""
        import torch
        import torch.distributed as dist

        with torch.no_grad():
            for metric in model.metrics:
                for variable in metric.variables:
                    value = variable.value.detach().clone()
                    dist.all_reduce(value, op=dist.ReduceOp.SUM)
                    variable.assign(value)
        return {
            k: float(keras.ops.convert_to_numpy(v))
            for k, v in model.get_metrics_result().items()
        }

    def _broadcast_scalar(self, value) -> float:
        import torch
        import torch.distributed as dist

        tensor = torch.tensor([float(value)], dtype=torch.float64, device=self.device)
        dist.broadcast(tensor, src=0)
        return tensor.item()

    def _broadcast_variables(self, model) -> None:
        """Copy rank 0's model and optimizer variables to every rank."""
        import torch
        import torch.distributed as dist

        variables = list(model.variables)
        if model.optimizer is not None:
            variables += list(model.optimizer.variables)
        with torch.no_grad():
            for variable in variables:
                value = variable.value.detach().clone()
                dist.broadcast(value, src=0)
                variable.assign(value)

    def restore_best(self, model, path):
        """The chief's best checkpoint, its weights broadcast to every rank
        (ranks on other machines cannot read the chief's file)."""
        found = self.is_chief and Path(path).is_file()
        if self._broadcast_scalar(found):
            if self.is_chief:
                model.set_weights(keras.saving.load_model(path).get_weights())
            self._broadcast_variables(model)
        return model

    def evaluate(self, model, x, y, *, batch_size, verbose=0):
        """Every rank evaluates all of (x, y) (the weights are the same)."""
        return super().evaluate(
            model, x, y, batch_size=batch_size, verbose=verbose if self.is_chief else 0
        )

    def predict(self, model, x, *, batch_size, verbose=0):
        """Every rank predicts all of x (the weights are the same)."""
        verbose = verbose if self.is_chief else 0
        return super().predict(model, x, batch_size=batch_size, verbose=verbose)

    def close(self) -> None:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


def _torch_device_name(torch) -> str:
    return "cuda:0" if torch.cuda.is_available() else "cpu:0"


def _torch(name: str) -> Strategy:
    import torch

    env = os.environ
    world_size = int(env.get("WORLD_SIZE", "1") or 1)
    if name == "auto":
        name = "ddp" if world_size > 1 else "default"
    if name == "default":
        return Strategy("default", "torch", [_torch_device_name(torch)])
    missing = [
        k for k in ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT") if k not in env
    ]
    if world_size < 2 or missing:
        raise ValueError(
            "'ddp' needs several processes started by torchrun "
            f"(WORLD_SIZE={world_size}, missing {missing or 'nothing'}); run "
            "torchrun --nproc_per_node=N training/mnist.py ..., or use 'default'."
        )
    import torch.distributed as dist

    rank, local_rank = int(env["RANK"]), int(env["LOCAL_RANK"])
    if torch.cuda.is_available():
        if local_rank >= torch.cuda.device_count():
            raise ValueError(
                f"'ddp' LOCAL_RANK {local_rank} has no GPU "
                f"({torch.cuda.device_count()} visible); use --nproc_per_node <= that."
            )
        torch.cuda.set_device(local_rank)  # Keras's "cuda" device follows this
        backend, device, kind = "nccl", f"cuda:{local_rank}", "cuda"
    else:
        backend, device, kind = "gloo", "cpu", "cpu"
    if not dist.is_initialized():
        dist.init_process_group(backend=backend)
    strategy = TorchDDP(
        "ddp",
        "torch",
        [f"{kind}:{r}" for r in range(world_size)],
        is_chief=rank == 0,
        process_index=rank,
        local_rank=local_rank,
        process_count=world_size,
        device=device,
    )
    atexit.register(strategy.close)  # the CLI may also call close() itself
    return strategy


# ----------------------------------------------------------------------------


_RESOLVERS = {"jax": _jax, "tensorflow": _tensorflow, "torch": _torch}


def resolve(name: str = "auto") -> Strategy:
    """The strategy called `name` ("auto" picks the best one available)."""
    backend = keras.backend.backend()
    if name not in NAMES:
        raise ValueError(
            f"Unknown distribution {name!r}; accepted: auto, default, data_parallel "
            "(jax), mirrored, tpu (tensorflow), ddp (torch)."
        )
    allowed = BACKEND_NAMES.get(backend, ("default",))
    if name != "auto" and name not in allowed:
        raise ValueError(
            f"Distribution {name!r} does not run on the {backend} backend; "
            f"accepted there: auto, {', '.join(allowed)}."
        )
    if backend not in _RESOLVERS:
        return Strategy("default", backend, ["cpu:0"])
    return _RESOLVERS[backend](name)
