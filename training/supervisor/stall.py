"""A stall watchdog: ends the process when no training step completes within
a bound, also when every process of the run is alive (a step that waits
forever in a collective, a callback that blocks, a device that stopped
answering). The heartbeat (heartbeat.py here) cannot see that: its beats come
from a thread, which carries on.

`StallWatchdog` is a Keras callback with a thread of its own. Progress is
every completed training or validation step (batch-end hooks; Keras may run
them on its worker threads, after the step's results are ready: the callback
is `async_safe`, so it does not make Keras wait for each step) and every epoch
boundary. The time since the last progress is the current wait; the bound it
is held to depends on the phase it waits in: "start" (before the first
epoch), "train" (training steps), "validation" (validation steps) or
"epoch-end" (epoch-end callbacks such as checkpoint saving, and the next
epoch's start; the watchdog goes first among the callbacks):

- a phase with no completed wait yet (the first step compiles; the first
  checkpoint): FIRST_ALLOWANCE_S (600 s);
- afterwards: max(FLOOR_S (60 s), FACTOR (5) x the slowest wait seen in that
  phase so far).

`--stall-timeout SECONDS` replaces both with one fixed bound for every wait,
compilation included; 0 disables the watchdog. The watchdog runs from the
start of training to its end (not during the final evaluation).

When the bound is passed the process prints one line on stderr
(`mnist.py: error: process P of N: stalled: ...`), writes its status file
(status.py: `stalled`, exit status 75), tells the other processes through
the heartbeat (they then stop with status 75 too, naming it), and exits with
status 75 at once (the training thread may be stuck).
"""

from __future__ import annotations

import os
import sys
import threading
import time

import keras

from training.supervisor import status

FIRST_ALLOWANCE_S = 600.0
FLOOR_S = 60.0
FACTOR = 5.0
PHASES = ("start", "train", "validation", "epoch-end")


class Bounds:
    """The stall bound of each phase, from the waits seen (see the module
    docstring). `fixed` (seconds) replaces the derived bound."""

    def __init__(
        self,
        fixed: float | None = None,
        floor: float = FLOOR_S,
        factor: float = FACTOR,
        first: float = FIRST_ALLOWANCE_S,
    ):
        self.fixed, self.floor, self.factor, self.first = fixed, floor, factor, first
        self.slowest: dict[str, float] = {}

    def seen(self, phase: str, wait: float) -> None:
        self.slowest[phase] = max(wait, self.slowest.get(phase, 0.0))

    def bound(self, phase: str) -> float:
        if self.fixed is not None:
            return self.fixed
        if phase not in self.slowest:
            return max(self.floor, self.first)
        return max(self.floor, self.factor * self.slowest[phase])

    def explain(self, phase: str) -> str:
        if self.fixed is not None:
            return "--stall-timeout"
        if phase not in self.slowest:
            return "first-pass allowance"
        return (
            f"max({self.floor:.0f} s, {self.factor:g} x the slowest {phase} wait "
            f"so far, {self.slowest[phase]:.2f} s)"
        )


class StallWatchdog(keras.callbacks.Callback):
    """See the module docstring. `report` (a status.Reporter's) records the
    stall; `on_stall(message)` is called (from the watchdog's thread) before
    the process exits; `exit` ends the process."""

    async_safe = True  # its batch-end hooks only take the time

    def __init__(
        self,
        bounds: Bounds,
        *,
        process_index: int = 0,
        process_count: int = 1,
        report=None,
        on_stall=None,
        prog: str = "mnist.py",
        exit=os._exit,
        clock=time.monotonic,
    ):
        super().__init__()
        self.bounds = bounds
        self.index, self.count = process_index, process_count
        self.report = report or status.Reporter(None).report
        self.on_stall, self.prog, self._exit, self._clock = on_stall, prog, exit, clock
        self._lock = threading.Lock()
        self._armed = False
        self._phase = "train"
        self._last = 0.0
        self._epoch = 0
        self._step = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- progress (Keras hooks) ----------------------------------------------

    def _progress(self, phase: str | None = None, of: str | None = None) -> None:
        """A step or a boundary completed now: the wait since the last one is
        recorded in the current phase (a step of another phase, which Keras's
        worker threads may report late, only counts as progress), then the
        phase becomes `phase` if given."""
        with self._lock:
            now = self._clock()
            if self._armed and of in (None, self._phase):
                self.bounds.seen(self._phase, now - self._last)
            self._last = now
            if phase is not None:
                self._phase = phase

    def on_train_begin(self, logs=None):
        with self._lock:
            self._armed, self._phase, self._last = True, "start", self._clock()
        self._stop.clear()
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(
                target=self._loop, name="synann-stall", daemon=True
            )
            self._thread.start()

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch, self._step = epoch + 1, 0
        self._progress("train")

    def on_train_batch_end(self, batch, logs=None):
        self._step = max(self._step, batch + 1)
        self._progress(of="train")

    def on_test_begin(self, logs=None):
        self._progress("validation")

    def on_test_batch_end(self, batch, logs=None):
        self._progress(of="validation")

    def on_epoch_end(self, epoch, logs=None):
        self._progress("epoch-end")

    def on_train_end(self, logs=None):
        with self._lock:
            self._armed = False
        self._stop.set()

    # -- the watchdog's thread -------------------------------------------------

    def check(self, now: float) -> str | None:
        """Why this process must stop (None: carry on)."""
        with self._lock:
            if not self._armed:
                return None
            phase, waited = self._phase, now - self._last
            bound = self.bounds.bound(phase)
            if waited <= bound:
                return None
            where = f"epoch {self._epoch}" if self._epoch else "before epoch 1"
            if phase == "train":
                where += f", after step {self._step}"
            self.details = {
                "phase": phase,
                "epoch": self._epoch,
                "step": self._step,
                "waited_s": round(waited, 1),
                "bound_s": round(bound, 1),
            }
            return (
                f"stalled: no training progress for {waited:.0f} s in {phase} "
                f"({where}); the bound is {bound:.0f} s "
                f"({self.bounds.explain(phase)})"
            )

    def _loop(self) -> None:
        while not self._stop.is_set():
            bound = self.bounds.bound(self._phase)
            self._stop.wait(max(0.1, min(1.0, bound / 20)))
            why = self.check(self._clock())
            if why is None or self._stop.is_set():
                continue
            self._end(why)
            return

    def _end(self, why: str) -> None:
        print(
            f"{self.prog}: error: process {self.index} of {self.count}: {why}",
            file=sys.stderr,
            flush=True,
        )
        self.report("stalled", status.EXIT_STALLED, why, **self.details)
        if self.on_stall is not None:
            try:
                self.on_stall(why)
            except Exception:
                pass
        try:
            sys.stdout.flush()
        except Exception:
            pass
        self._exit(status.EXIT_STALLED)
