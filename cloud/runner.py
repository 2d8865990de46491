"""Run gcloud argv lists (never through a shell) and turn signals into exceptions.

SIGINT, SIGTERM and SIGHUP (the terminal or the ssh connection the tool runs
in closed) stop the running command and raise `Interrupted`, so the
caller's cleanup runs. Every command runs in a session of its own (out of reach
of a terminal's Ctrl-C, which this process forwards), so stopping one, on a
signal or when its time limit passes, stops what it started too (gcloud's ssh
and scp). During cleanup (`protect()`) the first signal only warns, a second
one abandons the cleanup.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import signal
import subprocess
import sys
import time

#: The longest wait between two readings of the clock.
WAKE_S = 30.0


def clock() -> float:
    """Seconds on a clock that counts suspend (CLOCK_BOOTTIME; the wall clock
    where there is none)."""
    boottime = getattr(time, "CLOCK_BOOTTIME", None)
    return time.clock_gettime(boottime) if boottime is not None else time.time()


def hms(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class Interrupted(Exception):
    """A signal asked the tool to stop."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


def say(message: str) -> None:
    print(f"[tpu] {message}", file=sys.stderr, flush=True)


class Runner:
    """Runs commands (one, or a batch in parallel); stops them on a signal."""

    def __init__(
        self,
        gcloud: list[str] | None = None,
        label: str = "",
        env: dict[str, str] | None = None,
    ):
        """`gcloud`: the program run in place of `gcloud`; `label` marks the
        commands it echoes; `env`: the commands' environment (default: ours)."""
        self.gcloud = gcloud
        self.label = label
        self.env = env
        self.children: list[subprocess.Popen] = []
        self.cleaning = False
        self.warned = False
        self.pending: int | None = None  # a signal that only warned

    # -- signals ---------------------------------------------------------------
    def _on_signal(self, signum, frame):
        if self.cleaning and not self.warned:
            self.warned, self.pending = True, signum
            say(
                "cleanup in progress, please wait; "
                "send the signal again to abandon it (the TPU may keep running)"
            )
            return
        # Cleanup starts now: from here on, one more signal only warns.
        self.cleaning = True
        self._terminate()
        raise Interrupted(signum)

    @contextlib.contextmanager
    def handle_signals(self):
        """Install the SIGINT/SIGTERM/SIGHUP handlers for the block."""
        old = {s: signal.signal(s, self._on_signal) for s in _SIGNALS}
        try:
            yield self
        finally:
            for s, handler in old.items():
                signal.signal(s, handler)

    @contextlib.contextmanager
    def protect(self):
        """Cleanup mode: commands run in their own session; one signal warns
        (`raise_pending` raises it afterwards)."""
        self.cleaning, self.pending = True, None
        try:
            yield self
        finally:
            self.cleaning, self.warned = False, False

    def raise_pending(self) -> None:
        """Raise Interrupted for a signal that arrived during `protect()`."""
        if self.pending is not None:
            signum, self.pending = self.pending, None
            raise Interrupted(signum)

    # -- processes -------------------------------------------------------------
    def _terminate(self):
        # Only sends signals: waiting here could deadlock inside Popen.wait.
        for child in self.children:
            if child.poll() is None:
                _signal_group(child, signal.SIGTERM)

    def _reap(self):
        children, self.children = self.children, []
        for child in children:
            if child.poll() is None:
                _signal_group(child, signal.SIGTERM)
                try:
                    child.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    pass
            _signal_group(child, signal.SIGKILL)  # what it left behind
            if child.poll() is None:
                child.wait()

    def _echo(self, argv) -> None:
        label = f"({self.label}) " if self.label else ""
        say(f"{label}$ {shlex.join(argv)}")

    def _start(self, argv, capture):
        pipe = subprocess.PIPE if capture else None
        if self.gcloud and argv[0] == "gcloud":
            argv = [*self.gcloud, *argv[1:]]
        try:
            child = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=pipe,
                stderr=pipe,
                text=True,
                env=self.env,
                start_new_session=True,
            )
        except OSError as error:
            say(f"cannot run {argv[0]}: {error.strerror}")
            return None
        self.children.append(child)
        return child

    def run(
        self,
        argv: list[str],
        *,
        capture: bool = False,
        echo: bool = True,
        timeout: float | None = None,
        watch=None,
        watch_s: float = 30.0,
    ) -> tuple[int, str, str]:
        """Run argv; returns (exit code, stdout, stderr), output captured or not.

        Without `capture` the command writes straight to this process's stdout
        and stderr (live streaming). A missing program gives 127, a timeout 124.
        `watch()`, called every `watch_s` seconds while the command runs, stops
        it when it returns something true (exit code WATCH_STOPPED).
        """
        if echo:
            self._echo(argv)
        try:
            child = self._start(argv, capture)
            if child is None:
                return 127, "", ""
            deadline = None if timeout is None else clock() + timeout
            next_watch = clock() + watch_s
            while True:
                now = clock()
                wakes = [now + WAKE_S]
                wakes += [] if deadline is None else [deadline]
                wakes += [] if watch is None else [next_watch]
                try:
                    wait = max(0.0, min(wakes) - now)
                    out, err = child.communicate(timeout=wait)
                    return child.returncode, out or "", err or ""
                except subprocess.TimeoutExpired:
                    if deadline is not None and clock() >= deadline:
                        raise
                if watch is None or clock() < next_watch:
                    continue
                next_watch = clock() + watch_s
                if watch is not None and watch():
                    _signal_group(child, signal.SIGTERM)
                    try:
                        out, err = child.communicate(timeout=10)
                    except subprocess.TimeoutExpired:
                        out, err = "", ""
                    return WATCH_STOPPED, out or "", err or ""
        except subprocess.TimeoutExpired:
            say(f"{argv[0]} did not finish within {timeout:.0f}s; stopped it")
            _signal_group(child, signal.SIGTERM)
            try:
                out, err = child.communicate(timeout=10)
            except subprocess.TimeoutExpired:
                out, err = "", ""
            return 124, out or "", err or ""
        finally:
            self._reap()

    def run_parallel(
        self, commands: list[list[str]], *, batch: int = 8, timeout: float = 300
    ) -> list[int]:
        """Run commands `batch` at a time (output not captured); their exit codes."""
        codes = []
        for first in range(0, len(commands), batch):
            group = commands[first : first + batch]
            try:
                children = []
                for argv in group:
                    self._echo(argv)
                    children.append(self._start(argv, capture=False))
                deadline = clock() + timeout
                for child in children:
                    if child is None:
                        codes.append(127)
                        continue
                    codes.append(_wait(child, deadline))
            finally:
                self._reap()
        return codes


def _wait(child: subprocess.Popen, deadline: float) -> int:
    """The child's exit code, or 124 once `deadline` (clock()) passed."""
    while True:
        left = deadline - clock()
        if left <= 0:
            return child.poll() if child.poll() is not None else 124
        try:
            return child.wait(timeout=min(left, WAKE_S))
        except subprocess.TimeoutExpired:
            continue


def _signal_group(child: subprocess.Popen, signum: int) -> None:
    """Signal the command's process group (it leads one: start_new_session)."""
    with contextlib.suppress(OSError):
        os.killpg(child.pid, signum)


_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
#: Runner.run's exit code for a command its `watch` stopped.
WATCH_STOPPED = 125
