"""A heartbeat between the processes of a multi-process jax run, which stops
every process when one of them fails, instead of leaving the others waiting
on a collective step that will never complete.

`Heartbeat` (one daemon thread per process) keeps a small record in jax's
coordination-service key-value store (training/distribute/cluster.py joins
the processes), under `synann/watchdog/`:

- `beat/<p>`: a counter process p increments every `interval` seconds;
- `failed/<p>`: why process p stopped before the end (set on an exception,
  a failed start-up check, a stall, SIGTERM or SIGINT, or an exit before the
  end);
- `done/<p>`: process p finished its part of the run (no more collectives).

Every `interval` seconds each process reads the record and ends itself (one
line on stderr naming the other process; exit status 1, or the other's own
when it stalled (75) or was ended by SIGTERM (143) or SIGINT (130):
status.py) when another process failed, or has not beaten for
`SYNANN_WATCHDOG_TIMEOUT` seconds (default 60) without being done (killed,
crashed, frozen), or when the coordination service on process 0 has been
unreachable that long. jax's own heartbeat is set to twice that timeout
(cluster.join), so that this one, which names the process, speaks first.

A process whose collective step fails because another process went away
(`lost_a_peer`) lets its heartbeat name that process before it reports a
failure of its own (`await_verdict`). Process 0 runs jax's coordination
service: when it fails it waits a moment after recording why, so that the
others read it before its exit makes jax abort them; if it dies without a
word (SIGKILL), jax aborts the others at once with its own message
("Terminating process because the JAX distributed service detected fatal
errors").
"""

from __future__ import annotations

import atexit
import os
import sys
import threading
import time

from training.cli import first_line
from training.distribute.cluster import ENV_WATCHDOG_TIMEOUT, watchdog_timeout
from training.supervisor import status
from training.supervisor.preemption import SIGNAL_EXIT

PREFIX = "synann/watchdog/"
#: Exit status of a process that stops because another one failed.
EXIT_OTHER_FAILED = 1


def exit_status_after(reason: str) -> int:
    """The exit status of a process that stops because another one failed
    with `reason`: the other's own when it stalled (75) or was asked to stop
    (143, 130), so that every process of the run reports the same kind of
    end; else EXIT_OTHER_FAILED."""
    if reason.startswith("stalled:"):
        return status.EXIT_STALLED
    for sig, code in SIGNAL_EXIT.items():
        if reason.startswith(f"ended by {sig.name}"):
            return code
    return EXIT_OTHER_FAILED


def lost_a_peer(error: BaseException) -> bool:
    """Whether `error` is a collective step failing because another process
    went away (gloo reports the closed connection)."""
    text = str(error)
    return "Gloo" in text or "Connection reset by peer" in text


class Heartbeat:
    """See the module docstring. `client` is jax's coordination-service client
    (anything with key_value_set and key_value_dir_get); `on_end(message,
    exit status)` is called before the heartbeat ends the process."""

    def __init__(
        self,
        client,
        process_index: int,
        process_count: int,
        *,
        timeout: float | None = None,
        interval: float | None = None,
        on_end=None,
        prog: str = "mnist.py",
        exit=os._exit,
    ):
        self.client = client
        self.index, self.count = process_index, process_count
        self.timeout = watchdog_timeout() if timeout is None else timeout
        self.interval = interval or max(0.2, min(2.0, self.timeout / 10))
        self.on_end, self.prog, self._exit = on_end, prog, exit
        self._code = EXIT_OTHER_FAILED
        self._stop = threading.Event()
        self._finished = False  # done or failed: recorded, nothing more to say
        self._lock = threading.Lock()
        start = time.monotonic()
        self._last_beat: dict[int, str | None] = {}
        self._heard = dict.fromkeys(range(process_count), start)
        self._thread = threading.Thread(
            target=self._loop, name="synann-heartbeat", daemon=True
        )

    # -- what this process reports ------------------------------------------

    def start(self) -> Heartbeat:
        self._beat(0)  # first: an unusable client fails before anything is set
        atexit.register(self._at_exit)
        self._thread.start()
        return self

    def done(self) -> None:
        """This process has finished its collective work: others may exit."""
        self._record("done", "")

    def failed(self, reason: str) -> None:
        """Tell the other processes why this one stops before the end. Process
        0 then waits a moment before it may exit: it runs jax's coordination
        service, and its exit makes jax abort the others at once (with jax's
        message, not the one naming this process)."""
        if self._record("failed", " ".join(str(reason).split())[:500]):
            if self.index == 0 and self.count > 1:
                time.sleep(2 * self.interval + 0.5)

    def stop(self) -> None:
        self._stop.set()

    def await_verdict(self) -> None:
        """Give the heartbeat's thread the time to name another process that
        failed or vanished (it then ends this process): called when a
        collective step failed here, which is what another process's exit
        looks like from this side. Returns if it finds none."""
        if self._thread.is_alive():
            time.sleep(self.timeout + 3 * self.interval)

    def _record(self, kind: str, value: str) -> bool:
        """Record this process's end (once); whether it was recorded now."""
        with self._lock:
            if self._finished:
                return False
            self._finished = True
        try:
            self.client.key_value_set(f"{PREFIX}{kind}/{self.index}", value)
        except Exception:  # the service is gone: the others learn it anyway
            return False
        return True

    def _at_exit(self) -> None:
        self.failed("exited before the end of the run")
        self._stop.set()

    # -- the loop ------------------------------------------------------------

    def _beat(self, n: int) -> None:
        self.client.key_value_set(
            f"{PREFIX}beat/{self.index}", str(n), allow_overwrite=True
        )

    def _end(self, message: str, code: int) -> None:
        if self.on_end is not None:
            try:
                self.on_end(message, code)
            except Exception:
                pass
        print(
            f"{self.prog}: error: process {self.index} of {self.count}: {message}",
            file=sys.stderr,
            flush=True,
        )
        try:
            sys.stdout.flush()
        except Exception:
            pass
        self._exit(code)

    def check(self, entries: dict[str, str], now: float) -> str | None:
        """Why this process must stop, given the record (None: carry on)."""
        for p in range(self.count):
            if p == self.index:
                continue
            reason = entries.get(f"{PREFIX}failed/{p}")
            if reason is not None:
                self._code = exit_status_after(reason)
                return f"stopping because process {p} failed: {reason}"
            if f"{PREFIX}done/{p}" in entries:
                continue
            beat = entries.get(f"{PREFIX}beat/{p}")
            if beat != self._last_beat.get(p):
                self._last_beat[p], self._heard[p] = beat, now
            elif now - self._heard[p] > self.timeout:
                self._code = EXIT_OTHER_FAILED
                return (
                    f"stopping because process {p} has not been heard from for "
                    f"{self.timeout:.0f} s (killed, crashed or frozen; "
                    f"{ENV_WATCHDOG_TIMEOUT})"
                )
        return None

    def _loop(self) -> None:
        reached = time.monotonic()
        n = 0
        while not self._stop.wait(self.interval):
            if self._finished:
                continue  # done or failed: nothing more to watch
            now = time.monotonic()
            try:
                n += 1
                self._beat(n)
                entries = dict(self.client.key_value_dir_get(PREFIX))
                reached = now
            except Exception as e:
                if now - reached > self.timeout:
                    self._end(
                        "stopping because the coordination service on process 0 "
                        f"has been unreachable for {self.timeout:.0f} s: "
                        + first_line(e),
                        EXIT_OTHER_FAILED,
                    )
                    return
                continue
            why = self.check(entries, now)
            if why is not None and not self._stop.is_set():
                self._end(why, self._code)
                return
