"""Several jax processes as one run: joining them, and a watchdog that stops
every process of the run when one of them fails, instead of leaving the others
waiting on a collective that will never complete.

`join()` replaces `keras.distribution.initialize()` (which calls
`jax.distributed.initialize` and then Keras's cross-process seed agreement
unless a seed was set) so that its timeouts can be set:

- the coordinator (process 0) listens on the port of the first address in
  `KERAS_DISTRIBUTION_JOB_ADDRESSES`, or on a Cloud TPU slice on 8482
  (`JAX_COORDINATOR_PORT` overrides it); jax's gRPC server binds that port
  with SO_REUSEPORT, so a second coordinator on a port still held by another
  run would bind too and the kernel would split the connecting processes
  between the two runs, each then waiting for processes that joined the
  other. `join()` refuses a coordinator port that is in use instead.
- `SYNANN_JOIN_TIMEOUT` (seconds, default 300): how long a process waits for
  the others to join.
- jax's heartbeat (a process not heard from is declared dead and every
  process aborts) is set to twice the watchdog's timeout, so that the
  watchdog, which names the process, speaks first.

`Watchdog` (one daemon thread per process) keeps a small record in the
coordination service's key-value store, under `synann/watchdog/`:

- `beat/<p>`: a counter process p increments every `interval` seconds;
- `failed/<p>`: why process p stopped before the end (set on an exception,
  a failed start-up check, SIGTERM or SIGINT, or an exit before the end);
- `done/<p>`: process p finished its part of the run (no more collectives).

Every `interval` seconds each watchdog reads the record and ends its own
process (one line on stderr naming the other process; exit status 1, or
the other's own when it stalled (75) or was ended by SIGTERM (143) or
SIGINT (130): training/status.py) when another process failed, or has not
beaten for `SYNANN_WATCHDOG_TIMEOUT` seconds (default 60) without being done (killed, crashed, frozen), or when
the coordination service on process 0 has been unreachable that long. On
SIGTERM (SIGINT) the watchdog records the failure (and, through `on_signal`,
the status file: training/preemption.py) and ends the process with status
143 (130) at once, even while the main thread waits inside a
collective: jax's own preemption notifier takes SIGTERM over and only logs
it, so without this a stuck process ignores SIGTERM. The checkpoint of the
last epoch, or of the partial epoch saved when the processes could
(training/preemption.py), is the point to resume from.

A process whose collective step fails because another process went away
(`lost_a_peer`) lets its watchdog name that process before it reports a
failure of its own. Process 0 runs jax's coordination service: when it
fails it waits a moment after recording why, so that the others read it
before its exit makes jax abort them; if it dies without a word (SIGKILL),
jax aborts the others at once with its own message ("Terminating process
because the JAX distributed service detected fatal errors").
"""

from __future__ import annotations

import atexit
import errno
import inspect
import os
import select
import signal
import socket
import sys
import threading
import time

from training import status
from training.cli import first_line

ENV_JOIN_TIMEOUT = "SYNANN_JOIN_TIMEOUT"
ENV_WATCHDOG_TIMEOUT = "SYNANN_WATCHDOG_TIMEOUT"
DEFAULT_JOIN_TIMEOUT = 300
DEFAULT_WATCHDOG_TIMEOUT = 60.0
PREFIX = "synann/watchdog/"
#: Exit status of a process that the watchdog stops because of another one.
EXIT_OTHER_FAILED = 1
_SIGNAL_EXIT = {signal.SIGTERM: status.EXIT_SIGTERM, signal.SIGINT: status.EXIT_SIGINT}


def exit_status_after(reason: str) -> int:
    """The exit status of a process that stops because another one failed
    with `reason`: the other's own when it stalled (75) or was asked to stop
    (143, 130), so that every process of the run reports the same kind of
    end; else EXIT_OTHER_FAILED."""
    if reason.startswith("stalled:"):
        return status.EXIT_STALLED
    for sig, code in _SIGNAL_EXIT.items():
        if reason.startswith(f"ended by {sig.name}"):
            return code
    return EXIT_OTHER_FAILED


class JoinError(Exception):
    """The processes could not form a cluster (one-line message)."""


def lost_a_peer(error: BaseException) -> bool:
    """Whether `error` is a collective step failing because another process
    went away (gloo reports the closed connection)."""
    text = str(error)
    return "Gloo" in text or "Connection reset by peer" in text


def _seconds(name: str, default: float) -> float:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if value <= 0:
        raise JoinError(f"{name}={raw!r} is not valid; expected a positive number")
    return value


def coordinator_from_env() -> tuple[str | None, int | None, int | None]:
    """(coordinator address, process count, process id) from the
    KERAS_DISTRIBUTION_* variables; None where unset (jax then detects them,
    e.g. from the Cloud TPU metadata)."""
    env = os.environ
    addresses = [a for a in env.get("KERAS_DISTRIBUTION_JOB_ADDRESSES", "").split(",")]
    addresses = [a.strip() for a in addresses if a.strip()]
    count = env.get("KERAS_DISTRIBUTION_NUM_PROCESSES", "").strip()
    index = env.get("KERAS_DISTRIBUTION_PROCESS_ID", "").strip()
    try:
        count_value = int(count) if count else None
        index_value = int(index) if index else None
    except ValueError:
        raise JoinError(
            "KERAS_DISTRIBUTION_NUM_PROCESSES and KERAS_DISTRIBUTION_PROCESS_ID "
            f"must be integers; got {count!r} and {index!r}"
        ) from None
    if len(addresses) > 1 and count_value not in (None, len(addresses)):
        raise JoinError(
            f"KERAS_DISTRIBUTION_JOB_ADDRESSES names {len(addresses)} processes "
            f"but KERAS_DISTRIBUTION_NUM_PROCESSES={count_value}"
        )
    return (addresses[0] if addresses else None), count_value, index_value


def check_port_free(address: str) -> None:
    """Raise JoinError if something listens on `address`'s port (host:port):
    a socket without SO_REUSEPORT cannot bind a port that a gRPC server holds."""
    port = int(address.rsplit(":", 1)[1])
    for family, host in ((socket.AF_INET6, "::"), (socket.AF_INET, "0.0.0.0")):
        try:
            probe = socket.socket(family, socket.SOCK_STREAM)
        except OSError:
            continue  # no IPv6 here
        try:
            probe.bind((host, port))
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                raise JoinError(
                    f"the coordinator port {port} is in use on this machine (a "
                    "run still going, or another program); end it or choose "
                    "another port in KERAS_DISTRIBUTION_JOB_ADDRESSES"
                ) from None
            if e.errno == errno.EADDRNOTAVAIL:
                continue
            raise
        finally:
            probe.close()
        return


def join(agree_on_seed: bool = True) -> None:
    """Join this process to the others of the run (see the module docstring).
    Seed Keras first (keras.utils.set_random_seed): otherwise the processes
    agree on a seed with a collective step here (unless `agree_on_seed` is
    False: a process that joins only to report its failure)."""
    import jax

    if distributed_client() is not None:
        return
    address, count, index = coordinator_from_env()
    timeout = int(_seconds(ENV_JOIN_TIMEOUT, DEFAULT_JOIN_TIMEOUT))
    heartbeat = int(2 * watchdog_timeout()) + 1
    if address is not None and index == 0:
        check_port_free(address)
    options = {"initialization_timeout": timeout}
    # jax releases since mid-2025 take the heartbeat timeout; older ones keep 100 s.
    if (
        "heartbeat_timeout_seconds"
        in inspect.signature(jax.distributed.initialize).parameters
    ):
        options["heartbeat_timeout_seconds"] = max(heartbeat, 10)
    try:
        jax.distributed.initialize(
            coordinator_address=address,
            num_processes=count,
            process_id=index,
            **options,
        )
    except Exception as e:  # jax raises several kinds; all mean: no cluster
        raise JoinError(
            f"process {index if index is not None else '?'} could not join "
            f"the others within {timeout} s ({ENV_JOIN_TIMEOUT}): {first_line(e)}"
        ) from None
    if agree_on_seed:
        _agree_on_seed()


def _agree_on_seed() -> None:
    """What keras.distribution.initialize does after joining: agree on a seed
    across processes when none was set (a collective; none when seeded)."""
    try:
        from keras.src.backend.jax.distribution_lib import initialize_rng
    except ImportError:  # older Keras: it has no such step
        return
    initialize_rng()


def watchdog_timeout() -> float:
    return _seconds(ENV_WATCHDOG_TIMEOUT, DEFAULT_WATCHDOG_TIMEOUT)


def distributed_client():
    """jax's coordination-service client (None before joining)."""
    from jax._src import distributed

    return distributed.global_state.client


class Watchdog:
    """See the module docstring. `client` is jax's coordination-service client
    (anything with key_value_set and key_value_dir_get)."""

    def __init__(
        self,
        client,
        process_index: int,
        process_count: int,
        *,
        timeout: float | None = None,
        interval: float | None = None,
        prog: str = "mnist.py",
        exit=os._exit,
    ):
        self.client = client
        self.index, self.count = process_index, process_count
        self.timeout = watchdog_timeout() if timeout is None else timeout
        self.interval = interval or max(0.2, min(2.0, self.timeout / 10))
        self.prog = prog
        self._exit = exit
        # Set by training/mnist.py (training/preemption.py): on_signal(sig)
        # -> (message, exit status), on_end(message, exit status) before exit.
        self.on_signal = None
        self.on_end = None
        self._code = EXIT_OTHER_FAILED
        self._stop = threading.Event()
        self._finished = False  # done or failed: recorded, nothing more to say
        self._lock = threading.Lock()
        self._wakeup_r = self._wakeup_w = None
        start = time.monotonic()
        self._last_beat: dict[int, str | None] = {}
        self._heard = dict.fromkeys(range(process_count), start)
        self._thread = threading.Thread(
            target=self._loop, name="synann-watchdog", daemon=True
        )

    # -- what this process reports ------------------------------------------

    def start(self, handle_signals: bool = True) -> Watchdog:
        self._beat(0)  # first: an unusable client fails before anything is set
        if handle_signals and threading.current_thread() is threading.main_thread():
            self._take_signals()
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
        """Give the watchdog thread the time to name another process that
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
        self.stop()

    # -- signals ------------------------------------------------------------

    def _take_signals(self) -> None:
        """SIGTERM and SIGINT end this process from the watchdog thread, even
        while the main thread is blocked in a collective (Python runs signal
        handlers on the main thread only, between bytecodes; the wakeup fd is
        written by the C-level handler at once)."""
        r, w = socket.socketpair()
        r.setblocking(False)
        w.setblocking(False)
        for sig in _SIGNAL_EXIT:
            signal.signal(sig, lambda *_: None)
        signal.set_wakeup_fd(w.fileno(), warn_on_full_buffer=False)
        self._wakeup_r, self._wakeup_w = r, w

    def _signals_received(self) -> list[int]:
        if self._wakeup_r is None:
            return []
        try:
            data = self._wakeup_r.recv(64)
        except BlockingIOError:
            return []
        return [b for b in data if b in _SIGNAL_EXIT]

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

    def _wait(self, seconds: float) -> list[int]:
        if self._wakeup_r is None:
            self._stop.wait(seconds)
            return []
        select.select([self._wakeup_r], [], [], seconds)
        return self._signals_received()

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
        while not self._stop.is_set():
            for sig in self._wait(self.interval):
                message, code = f"ended by {signal.Signals(sig).name}", None
                if self.on_signal is not None:
                    try:
                        message, code = self.on_signal(sig)
                    except Exception:
                        pass
                self.failed(message)
                self._end(message, code or _SIGNAL_EXIT[sig])
                return
            if self._stop.is_set():
                return
            if self._finished:
                continue  # done or failed: only signals matter now
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
