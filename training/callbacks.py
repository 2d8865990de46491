"""The Keras callbacks training/mnist.py trains with, besides Keras's own,
and the user's (--callbacks, `load`).

Every process of a multi-process run runs `EpochLog`, `BestWeights` and
`SaveCheckpoint` alike (only the chief writes files), so that they take the
same collective steps: none of them computes on the distributed model except
through values every process already holds (its replicated weights).
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import os
import sys
import time
from pathlib import Path

import keras
import numpy as np

from training import checkpoints, cli, outputs


class EpochLog(keras.callbacks.Callback):
    """Appends one row per epoch (metrics, learning rate, seconds) to `rows`
    and, if `write`, writes history.csv and history.json after each epoch."""

    def __init__(self, output_dir: Path, rows: list[dict], write: bool = True):
        super().__init__()
        self.output_dir = output_dir
        self.rows = rows
        self.write = write

    def on_epoch_begin(self, epoch, logs=None):
        self._start = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        row = {"epoch": epoch + 1}
        row.update({k: float(v) for k, v in (logs or {}).items()})
        lr = self.model.optimizer.learning_rate
        row["learning_rate"] = float(keras.ops.convert_to_numpy(lr))
        row["seconds"] = time.perf_counter() - self._start
        self.rows.append(row)
        if self.write:
            outputs.write_history(self.output_dir, self.rows)


class BestWeights(keras.callbacks.Callback):
    """Keeps a host copy of the model's weights after the epoch with the
    highest `monitor` (strictly higher than every earlier one, as Keras's
    ModelCheckpoint with save_best_only), on every process.

    `epoch` (1-based, 0 before any) and `value` describe that epoch; a resumed
    run passes in what the checkpoint held."""

    def __init__(
        self,
        monitor: str = "val_accuracy",
        epoch: int = 0,
        value: float | None = None,
        weights: list | None = None,
    ):
        super().__init__()
        self.monitor = monitor
        self.epoch, self.value, self.weights = epoch, value, weights

    def on_epoch_end(self, epoch, logs=None):
        current = (logs or {}).get(self.monitor)
        if current is None or not math.isfinite(float(current)):
            return
        if self.value is None or float(current) > self.value:
            self.epoch, self.value = epoch + 1, float(current)
            # Replicated weights: every process copies its own devices' values.
            self.weights = [np.array(w) for w in self.model.get_weights()]


def plateau_state(callback) -> dict | None:
    """ReduceLROnPlateau's counters (JSON; None without one)."""
    if callback is None:
        return None
    best = None if callback.best is None else float(callback.best)
    return {
        "wait": int(callback.wait),
        "cooldown_counter": int(callback.cooldown_counter),
        "best": best if best is not None and math.isfinite(best) else None,
    }


def restore_plateau(callback, state: dict | None) -> None:
    if callback is None or not state:
        return
    callback.wait = state["wait"]
    callback.cooldown_counter = state["cooldown_counter"]
    if state["best"] is not None:
        callback.best = state["best"]


class SaveCheckpoint(keras.callbacks.Callback):
    """At each epoch's end, on every process together: the epoch's training
    state into a checkpoint directory (training/checkpoints.py). Goes after
    EpochLog, BestWeights and ReduceLROnPlateau in the callback list: it saves
    what they hold after the epoch. Restores ReduceLROnPlateau's counters at
    the start of training (after that callback has reset them)."""

    def __init__(
        self,
        checkpointer: checkpoints.Checkpointer,
        rows: list[dict],
        best: BestWeights,
        plateau=None,
        plateau_start: dict | None = None,
        settings: dict | None = None,
        processes: int = 1,
        stop_request=None,
    ):
        super().__init__()
        self.checkpointer = checkpointer
        self.rows, self.best, self.plateau = rows, best, plateau
        self.plateau_start = plateau_start
        self.settings = settings or {}
        self.processes = processes
        # training/supervisor/preemption.py's StopRequest: asked to stop,
        # save the steps done so far at the next step boundary.
        self.stop_request = stop_request
        self._epoch = 0
        # Steps of the current epoch done before this fit (a resumed partial
        # epoch): Keras counts its batches from 0.
        self.step_offset = 0

    def on_train_begin(self, logs=None):
        restore_plateau(self.plateau, self.plateau_start)
        if self.stop_request is not None:
            self.stop_request.active = True

    def on_train_end(self, logs=None):
        if self.stop_request is not None:
            self.stop_request.active = False

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch = epoch + 1

    def _saved(self, epoch: int, steps: int = 0) -> checkpoints.Saved:
        return checkpoints.Saved(
            epoch=epoch,
            history=list(self.rows),
            best_epoch=self.best.epoch,
            best_value=self.best.value,
            plateau=plateau_state(self.plateau),
            settings=self.settings,
            processes=self.processes,
            steps=steps,
        )

    def _weights(self) -> list:
        weights = self.best.weights
        if weights is None:  # no validation metric yet: the current weights
            weights = [np.array(w) for w in self.model.get_weights()]
        return weights

    def on_epoch_end(self, epoch, logs=None):
        self.checkpointer.save(self.model, self._weights(), self._saved(epoch + 1))
        self.step_offset = 0
        # A second fit (after a resumed partial epoch) restores these.
        self.plateau_start = plateau_state(self.plateau)

    def on_train_batch_begin(self, batch, logs=None):
        request = self.stop_request
        if request is None or request.answered.is_set():
            return
        steps = self.step_offset + batch
        if request.agree is None:  # one process
            if not request.requested.is_set():
                return
        else:
            # Several processes save together, at the same step: every
            # `every` steps of the epoch they agree whether any was asked
            # to stop (a small collective step).
            if steps % request.every:
                return
            if not request.agree(request.requested.is_set()):
                return
        if steps == 0:
            request.answer(
                None,
                "stopped at an epoch boundary: the last epoch's checkpoint "
                "holds every completed step",
            )
        else:
            try:
                sync = getattr(self.model, "jax_state_sync", None)
                if sync is not None:
                    sync()  # the steps' results into the model's variables
                saved = self._saved(self._epoch, steps=steps)
                self.checkpointer.save(self.model, self._weights(), saved)
                request.answer({"epoch": self._epoch, "steps": steps})
            except Exception as e:  # report it; the process ends anyway
                request.answer(None, f"saving the partial epoch failed: {e}")
        # The thread that took the signal ends the process; in the other
        # processes, the heartbeat, once it reads that process's end.
        while True:
            time.sleep(3600)


class EventFileTensorBoard(keras.callbacks.Callback):
    """--tensorboard under jax and torch: each epoch's metrics as TensorBoard
    scalars, written with the `tensorboard` package's own event-file writer
    (as torch.utils.tensorboard does), so TensorFlow need not be installed.

    The layout and tags are those of Keras's TensorBoard callback, which
    tensorflow runs keep: LOGDIR/train and LOGDIR/validation (the `val_`
    metrics), tags `epoch_<metric>` and `epoch_learning_rate`, step = the
    0-based epoch. Without TensorFlow, tensorboard's writer handles local
    paths (and s3://); gs:// needs TensorFlow's file system."""

    def __init__(self, logdir: str):
        super().__init__()
        self.logdir = str(logdir)
        self._writers: dict = {}

    def _writer(self, split: str):
        from tensorboard.summary.writer.event_file_writer import EventFileWriter

        if split not in self._writers:
            self._writers[split] = EventFileWriter(
                os.path.join(self.logdir, split), flush_secs=10
            )
        return self._writers[split]

    def _scalar(self, split: str, tag: str, value: float, step: int) -> None:
        from tensorboard.compat.proto import event_pb2, summary_pb2

        summary = summary_pb2.Summary(
            value=[summary_pb2.Summary.Value(tag=tag, simple_value=value)]
        )
        event = event_pb2.Event(wall_time=time.time(), step=step, summary=summary)
        self._writer(split).add_event(event)

    def on_epoch_end(self, epoch, logs=None):
        for key, value in (logs or {}).items():
            split, name = (
                ("validation", key[4:]) if key.startswith("val_") else ("train", key)
            )
            self._scalar(split, f"epoch_{name}", float(value), epoch)
        lr = self.model.optimizer.learning_rate
        rate = float(keras.ops.convert_to_numpy(lr))
        self._scalar("train", "epoch_learning_rate", rate, epoch)
        for writer in self._writers.values():
            writer.flush()

    def on_train_end(self, logs=None):
        for writer in self._writers.values():
            writer.close()
        self._writers.clear()


def load(spec: str) -> list[keras.callbacks.Callback]:
    """The callbacks --callbacks SPEC names (training/cli.py's `callback_spec`):
    MODULE:NAME is a callback, a callback class (made with no arguments) or a
    function returning callbacks; MODULE:NAME(ARGS) calls NAME with ARGS.
    cli.UsageError (one line) when SPEC names nothing of the kind."""
    module_name, name, args, kwargs = cli.callback_spec(spec)
    module = _import(module_name, spec)
    if not hasattr(module, name):
        raise cli.UsageError(f"--callbacks {spec!r}: {module_name} has no {name!r}")
    found = getattr(module, name)
    if kwargs is not None or isinstance(found, type):
        try:
            found = found(*args, **(kwargs or {}))
        except TypeError as e:
            raise cli.UsageError(f"--callbacks {spec!r}: {e}") from None
    found = list(found) if isinstance(found, list | tuple) else [found]
    for callback in found:
        if not isinstance(callback, keras.callbacks.Callback):
            raise cli.UsageError(
                f"--callbacks {spec!r} gave a {type(callback).__name__}, not a "
                "keras.callbacks.Callback"
            )
    return found


def _import(module_name: str, spec: str):
    """A module by dotted name, or by the path of a .py file."""
    try:
        if not module_name.endswith(".py"):
            return importlib.import_module(module_name)
        path = Path(module_name).resolve()
        name = f"synann_callbacks_{path.stem}"
        found = importlib.util.spec_from_file_location(name, path)
        if found is None or not path.is_file():
            raise ImportError(f"no such file: {path}")
        module = importlib.util.module_from_spec(found)
        sys.modules[name] = module  # as an import does (dataclasses look it up)
        found.loader.exec_module(module)
        return module
    except ImportError as e:
        raise cli.UsageError(f"--callbacks {spec!r}: {cli.first_line(e)}") from None
