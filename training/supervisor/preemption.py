"""SIGTERM and SIGINT: a run asked to stop records it, saves what it can, and
exits with its own status (status.py: `preempted` or `terminated`, exit status
143; 130 for SIGINT), distinct from a failure.

Compute Engine sends a spot or preemptible VM SIGTERM about 30 s before it
stops it, and its metadata server's `instance/preempted` turns TRUE. On
either signal (`on_signal`):

1. with --checkpoint-dir, while training runs, the training loop is asked
   (`StopRequest`) to save the steps done since the last epoch's checkpoint at
   its next step boundary (training/callbacks.py's `SaveCheckpoint`,
   training/checkpoints.py's `partial/`), waited for at most SAVE_GRACE_S
   (20 s) from the signal: `--resume` then continues after those steps, so
   the run loses at most the step in flight;
2. meanwhile the metadata server is asked (at most about 1.5 s; off Compute
   Engine it does not answer and the status says `"preempted": null`);
3. the status file and one line on stderr are written, and the process
   exits at once (the training thread may be blocked in a collective).

`SignalWatcher` takes the signals on a thread of its own, so that a training
thread blocked in a collective cannot delay them; it starts once the process
has joined the others, replacing the handler of jax's preemption notifier,
which takes SIGTERM over and only logs it. With several processes,
every AGREE_EVERY (5) steps of an epoch they agree whether any of them was
asked to stop (a small collective step); if so, all save the partial epoch
at that step, the one asked ends with its status, and the others end with
the same status once their heartbeat reads it (heartbeat.py). The save then
comes at most AGREE_EVERY steps after the signal, still within SAVE_GRACE_S
when a step takes under about 3 s.
"""

from __future__ import annotations

import select
import signal
import socket
import threading
import time

from training.supervisor import status

SAVE_GRACE_S = 20.0
SIGNAL_EXIT = {signal.SIGTERM: status.EXIT_SIGTERM, signal.SIGINT: status.EXIT_SIGINT}


class StopRequest:
    """Between the thread that saw the signal and the training loop, which
    saves at its next step boundary (`SaveCheckpoint.on_train_batch_begin`)."""

    def __init__(self, agree=None, every: int = 1):
        self.active = False  # a training loop that can save is running
        # Several processes: agree(asked: bool) -> whether any process was
        # asked (a collective step every process takes), every `every` steps.
        self.agree, self.every = agree, every
        self.requested = threading.Event()
        self.answered = threading.Event()
        self.checkpoint: dict | None = None
        self.note: str | None = None

    def answer(self, checkpoint: dict | None, note: str | None = None) -> None:
        self.checkpoint, self.note = checkpoint, note
        self.answered.set()


#: Several processes agree whether to stop every this many steps.
AGREE_EVERY = 5


def on_signal(
    sig: int, request: StopRequest, report, grace: float = SAVE_GRACE_S
) -> tuple[str, int]:
    """What a process does when asked to stop (see the module docstring), up
    to writing its status with `report` (a status.Reporter's); returns (the
    one-line message, the exit status)."""
    code = SIGNAL_EXIT.get(sig, status.EXIT_SIGTERM)
    name = signal.Signals(sig).name
    start = time.monotonic()
    saving = request.active
    if saving:
        request.requested.set()  # first: the loop saves while we ask
    was_preempted = status.preempted()
    extra: dict = {"preempted": was_preempted}
    message = f"ended by {name}"
    if was_preempted:
        message += " (the metadata server says this VM was preempted)"
    if saving:
        if request.answered.wait(max(0.0, grace - (time.monotonic() - start))):
            extra["checkpoint"] = request.checkpoint
            if request.note:
                extra["checkpoint_note"] = request.note
        else:
            extra["checkpoint"] = None
            extra["checkpoint_note"] = (
                f"training reached no step boundary within {grace:.0f} s"
            )
        saved = extra["checkpoint"]
        if saved:
            message += (
                f"; saved epoch {saved['epoch']} up to step {saved['steps']}"
                " (--resume continues after it)"
            )
        elif request.note:
            message += f"; {request.note}"
    word = "preempted" if was_preempted else "terminated"
    report(word, code, message, **extra)
    return message, code


def report_end(message: str, code: int, request: StopRequest, report) -> None:
    """The status of a process that the heartbeat ends (another process
    failed, stalled or was asked to stop; the coordinator is gone)."""
    extra = {}
    if code in (status.EXIT_SIGTERM, status.EXIT_SIGINT):
        extra["preempted"] = status.preempted()
        if request.answered.is_set():  # saved with the others
            extra["checkpoint"] = request.checkpoint
            if request.note:
                extra["checkpoint_note"] = request.note
    word = "preempted" if extra.get("preempted") else status.word_for(code)
    report(word, code, message, **extra)


class SignalWatcher:
    """Takes SIGTERM and SIGINT: a thread reads them from a wakeup fd (so a
    blocked training thread cannot delay them) and calls `handle(sig)`, which
    ends the process. `stop()` restores what it replaced."""

    def __init__(self, handle):
        self.handle = handle
        self._old: dict = {}
        self._old_fd = None
        self._r = self._w = None
        self._thread = None
        self._closing = threading.Event()

    def start(self) -> SignalWatcher:
        if threading.current_thread() is not threading.main_thread():
            return self  # signals can be taken on the main thread only
        self._r, self._w = socket.socketpair()
        self._r.setblocking(False)
        self._w.setblocking(False)
        for sig in SIGNAL_EXIT:
            self._old[sig] = signal.signal(sig, lambda *_: None)
        self._old_fd = signal.set_wakeup_fd(self._w.fileno(), warn_on_full_buffer=False)
        self._thread = threading.Thread(
            target=self._loop, name="synann-signals", daemon=True
        )
        self._thread.start()
        return self

    def _loop(self) -> None:
        while not self._closing.is_set():
            ready, _, _ = select.select([self._r], [], [], 0.5)
            if not ready:
                continue
            try:
                data = self._r.recv(64)
            except (BlockingIOError, OSError):
                continue
            sigs = [b for b in data if b in SIGNAL_EXIT]
            if sigs and not self._closing.is_set():
                self.handle(sigs[0])
                return

    def stop(self) -> None:
        if self._thread is None:
            return
        self._closing.set()
        signal.set_wakeup_fd(self._old_fd if self._old_fd is not None else -1)
        for sig, handler in self._old.items():
            signal.signal(sig, handler)
        self._thread.join(2)
        self._r.close()
        self._w.close()
        self._thread = None
