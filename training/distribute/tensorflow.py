"""tensorflow: `MirroredStrategy` ("mirrored"), `TPUStrategy` ("tpu") or one
device ("default")."""

from __future__ import annotations

import glob
import os
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np

from training.cli import first_line
from training.distribute.base import Strategy, trim

ENV_TF_LOGICAL_CPUS = "SYNANN_TF_LOGICAL_CPUS"


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
            x, y = trim((x, y), self.num_replicas, "training")
        if validation_data is not None and len(validation_data[0]) < batch_size:
            validation_data = trim(validation_data, self.num_replicas, "validation")
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
            x, y = trim((x, y), self.num_replicas, "evaluation")
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


def tpu_hint() -> bool:
    """A TPU may be here: an env var names one or TPU device files exist."""
    return bool(
        os.environ.get("TPU_NAME")
        or os.environ.get("COLAB_TPU_ADDR")
        or glob.glob("/dev/accel*")
        or glob.glob("/dev/vfio/[0-9]*")
    )


def _tf_tpu_strategy(tf):
    """A connected TPUStrategy, or None (with the reason) when there is no TPU."""
    if not tpu_hint():
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
        return None, first_line(err)


def resolve(name: str) -> Strategy:
    import tensorflow as tf

    n_logical = _tf_logical_cpus(tf)
    if name in ("auto", "tpu"):
        tpu_strategy, why = _tf_tpu_strategy(tf)
        if tpu_strategy is not None:
            devices = [d.name for d in tf.config.list_logical_devices("TPU")]
            return TFStrategy("tpu", "tensorflow", devices, tf_strategy=tpu_strategy)
        if name == "tpu":
            raise ValueError(f"'tpu' needs a TPU and none is usable here ({why}).")
        if tpu_hint():
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
