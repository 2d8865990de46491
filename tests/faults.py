"""Faults injected into training/mnist.py runs by the tests, as Keras callbacks
given with --callbacks (the flag users add their own callbacks with):

    --callbacks tests/faults.py:fail_after(1)     (see `spec`)

Each prints one line when it acts, so that a test can wait for it.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

import keras

PATH = Path(__file__).resolve()


def spec(call: str) -> list[str]:
    """The training arguments that add the callback `call`, e.g.
    spec("hang_after(1)")."""
    return ["--callbacks", f"{PATH}:{call}"]


class _AfterEpoch(keras.callbacks.Callback):
    """Acts at the end of epoch `epoch`, the last callback there: prints
    `faults: WHAT after epoch E; its validation ended at monotonic T` first,
    T the time.monotonic() (the same clock in every process) at which the
    epoch's validation ended, before the other callbacks' epoch-end work."""

    def __init__(self, epoch: int):
        super().__init__()
        self.epoch = epoch
        self._validated = None

    def on_test_end(self, logs=None):
        self._validated = time.monotonic()

    def on_epoch_end(self, epoch, logs=None):
        if epoch + 1 == self.epoch:
            ended = self._validated or time.monotonic()
            print(
                f"faults: {self.what} after epoch {epoch + 1}; its validation ended "
                f"at monotonic {ended:.3f}",
                flush=True,
            )
            self.act(epoch + 1)


class kill_after(_AfterEpoch):  # noqa: N801  (read as a function in specs)
    """SIGKILL once epoch `epoch` is complete (its checkpoint included: the
    callbacks of --callbacks come after training's own)."""

    what = "kill"

    def act(self, epoch):
        sys.stdout.flush()
        os.kill(os.getpid(), signal.SIGKILL)


class fail_after(_AfterEpoch):  # noqa: N801
    """Raise a RuntimeError after epoch `epoch`."""

    what = "fail"

    def act(self, epoch):
        raise RuntimeError(f"faults.fail_after raised after epoch {epoch}")


class hang_after(_AfterEpoch):  # noqa: N801
    """After epoch `epoch`, sleep forever on the training loop's thread: the
    process stays alive and never reaches the next collective step."""

    what = "hang"

    def act(self, epoch):
        while True:
            time.sleep(3600)


class slow_steps(keras.callbacks.Callback):  # noqa: N801
    """Each training step takes `seconds` longer (a sleep before it), and each
    completed step prints `faults: epoch E step K done`."""

    def __init__(self, seconds: float):
        super().__init__()
        self.seconds = seconds
        self._epoch = 0

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch = epoch + 1

    def on_train_batch_begin(self, batch, logs=None):
        time.sleep(self.seconds)

    def on_train_batch_end(self, batch, logs=None):
        print(f"faults: epoch {self._epoch} step {batch + 1} done", flush=True)
