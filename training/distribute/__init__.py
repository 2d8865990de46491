"""Distribution strategies, one module per backend.

`resolve(name)` returns a `Strategy`; training/mnist.py builds and compiles the
model inside `strategy.scope()`, trains with `strategy.fit(...)` on in-memory
NumPy arrays with the GLOBAL batch size, then takes `strategy.restore_best(...)`
(the best epoch's weights, on every process) to `strategy.evaluate` and
`strategy.predict`, which give every process the same numbers.

Names: "auto", "default" (one device, no strategy), "data_parallel" (jax),
"mirrored" and "tpu" (tensorflow), "ddp" (torch). "auto" picks:

- jax: `keras.distribution.DataParallel` over all devices when there is more
  than one, else "default". Both feed `GlobalBatches`, so the batches do not
  depend on the device or process count. Multi-process runs (multi-host TPU
  slices, several GPU hosts) join first (`cluster.join`, with gloo collectives
  on CPU); they are detected from the environment only
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

Modules: `base` (the `Strategy` interface and what the backends share),
`batches` (`GlobalBatches`), and one per backend, `jax`, `tensorflow` and
`torch`, each with its strategies and its `resolve(name)`, as Keras keeps
`backend/*/distribution_lib.py`; `cluster` joins the processes of a
multi-process jax run. `set_seed` seeds every process alike; a process that
fails before it joined the others reports it with `join_to_report`.
"""

from __future__ import annotations

import sys

import keras

from training.distribute import jax, tensorflow, torch
from training.distribute.base import CHIEF_ONLY_CALLBACKS, Strategy, chief_only, trim
from training.distribute.batches import GlobalBatches
from training.distribute.jax import ENV_MULTIHOST, JaxDataParallel, JaxStrategy
from training.distribute.tensorflow import ENV_TF_LOGICAL_CPUS, TFStrategy
from training.distribute.torch import TorchDDP

__all__ = [
    "BACKEND_NAMES",
    "CHIEF_ONLY_CALLBACKS",
    "ENV_MULTIHOST",
    "ENV_TF_LOGICAL_CPUS",
    "NAMES",
    "GlobalBatches",
    "JaxDataParallel",
    "JaxStrategy",
    "Strategy",
    "TFStrategy",
    "TorchDDP",
    "chief_only",
    "join_to_report",
    "resolve",
    "set_seed",
    "trim",
]

NAMES = ("auto", "default", "data_parallel", "mirrored", "tpu", "ddp")
BACKEND_NAMES = {
    "jax": ("default", "data_parallel"),
    "tensorflow": ("default", "mirrored", "tpu"),
    "torch": ("default", "ddp"),
}

_RESOLVERS = {
    "jax": jax.resolve,
    "tensorflow": tensorflow.resolve,
    "torch": torch.resolve,
}


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


def set_seed(seed: int) -> None:
    """`keras.utils.set_random_seed` (Python, NumPy, Keras and the backend),
    the same on every process, without importing TensorFlow under jax or
    torch (that function also seeds TensorFlow whenever it can import it)."""
    hide = keras.backend.backend() != "tensorflow" and "tensorflow" not in sys.modules
    if hide:
        sys.modules["tensorflow"] = None  # makes `import tensorflow` fail
    try:
        keras.utils.set_random_seed(seed)
    finally:
        if hide:
            del sys.modules["tensorflow"]


def join_to_report():
    """Before joining: join the other processes only to report this one's
    failure (jax; see `jax.join_to_report`). (coordination client, process
    index, process count), or None."""
    if keras.backend.backend() != "jax":
        return None
    return jax.join_to_report()
