"""The supervisor of one training process: how it ends, and that it ends.

`Supervisor.run(body)` runs the training and turns its outcome into an exit
status and a status file (status.py):

    0    ok          1    failed      2    usage      75   stalled
    130  SIGINT      143  SIGTERM (terminated, or preempted)

Between the start and the end it owns the threads that watch the process,
each started once the process knows its place in the run (`joined`):

- signals (preemption.py): SIGTERM and SIGINT are taken on a thread of their
  own; with --checkpoint-dir the training loop saves its partial epoch first;
- the stall watchdog (stall.py), a callback of `fit`: no training step within
  the bound ends the process with status 75;
- the heartbeat (heartbeat.py), with several jax processes: when one process
  fails, stalls or is stopped, every other one stops too, with the same kind
  of status, naming it.

One process: errors other than the one-line ones propagate (a traceback) after
the status is written. Several processes: a failing process tells the others
and ends at once (`os._exit`: jax's shutdown would wait for them).
"""

from __future__ import annotations

import os
import sys
import traceback
import warnings
from pathlib import Path

from training import cli, distribute
from training.distribute.cluster import JoinError, coordinator_from_env
from training.supervisor import preemption, stall, status
from training.supervisor.heartbeat import Heartbeat, lost_a_peer


class Supervisor:
    """See the module docstring. `one_line` are the error types that end the
    run with their message alone (cli.UsageError with status 2, the others 1);
    `exit` ends the process (at once: other threads may be stuck)."""

    def __init__(self, prog: str = cli.PROG, one_line=(), exit=os._exit):
        self.prog = prog
        self.one_line = (cli.UsageError, JoinError, *one_line)
        self._exit = exit
        self.status = status.Reporter(None)
        self.stop = preemption.StopRequest()
        self.strategy = None
        self.heartbeat = None
        self.stall = None
        self._signals = None

    # -- the run -------------------------------------------------------------

    def run(self, body, *args) -> int:
        """Call `body(*args)`; the process's exit status (see the module doc).
        Threads the supervisor started are stopped when it returns."""
        try:
            body(*args)
            if self.heartbeat is not None:
                self.heartbeat.done()
            self.status.report("ok", status.EXIT_OK, "finished")
            return status.EXIT_OK
        except self.one_line as e:
            code = status.EXIT_USAGE if isinstance(e, cli.UsageError) else 1
            self._await_verdict(e)
            self.status.report(status.word_for(code), code, e)  # before the line
            cli.error(self.prog, e)
            self._failed(e, code, joined=not isinstance(e, JoinError))
            return code
        except SystemExit as e:  # argparse's usage errors
            if e.code not in (0, None):
                self._failed(f"exited with status {e.code}", e.code)
            raise
        except BaseException as e:
            self._failed(e, status.EXIT_FAILED)
            raise
        finally:
            self.close()

    def report_to(self, args, process_index: int | None = None, count=None) -> None:
        """Where the status goes: --status-file, else OUTPUT_DIR/status.json for
        the chief (process 0) alone, which alone writes into the output
        directory. Before joining, the process index and count come from the
        KERAS_DISTRIBUTION_* variables."""
        if process_index is None:
            _, count, process_index = coordinator_from_env()
        index, count = process_index or 0, count or 1
        template = args.status_file
        if not template and index == 0:
            template = str(Path(args.output_dir) / status.DEFAULT_NAME)
        self.status.retarget(template, index, count)

    def joined(self, strategy, args) -> None:
        """The process has its place in the run: its status file, the stop
        request (agreed between processes), the heartbeat (several jax
        processes) and the signal thread."""
        self.strategy = strategy
        index, count = strategy.process_index, strategy.process_count
        self.report_to(args, index, count)
        if count > 1:
            self.stop = preemption.StopRequest(
                agree=strategy.any_process, every=preemption.AGREE_EVERY
            )
        client = strategy.coordination()
        if client is not None:
            try:
                self.heartbeat = Heartbeat(
                    client, index, count, on_end=self._ended, prog=self.prog
                ).start()
            except (AttributeError, TypeError) as e:  # an older jaxlib's client
                warnings.warn(f"No heartbeat for this run: {e}", stacklevel=2)
        self._signals = preemption.SignalWatcher(self._on_signal).start()

    def stall_watchdog(self, bound: float | None):
        """The stall watchdog callback (None when --stall-timeout is 0)."""
        if bound == -1.0:
            return None
        strategy = self.strategy
        self.stall = stall.StallWatchdog(
            stall.Bounds(fixed=bound),
            process_index=strategy.process_index,
            process_count=strategy.process_count,
            report=self.status.report,
            on_stall=self.heartbeat.failed if self.heartbeat is not None else None,
            prog=self.prog,
            exit=self._exit,
        )
        return self.stall

    def training_ended(self) -> None:
        """After `fit`, also when it raised (Keras then skips on_train_end): the
        stall watchdog stops, a signal no longer waits for a save."""
        if self.stall is not None:
            self.stall.on_train_end()
        self.stop.active = False

    def close(self) -> None:
        if self._signals is not None:
            self._signals.stop()
            self._signals = None
        self.training_ended()
        if self.heartbeat is not None:
            self.heartbeat.stop()
        if self.strategy is not None:
            self.strategy.close()

    # -- ends ------------------------------------------------------------------

    def _on_signal(self, sig: int) -> None:
        """On the signal thread: save, record, tell the others, end."""
        message, code = preemption.on_signal(sig, self.stop, self.status.report)
        if self.heartbeat is not None:
            self.heartbeat.failed(message)
        print(
            f"{self.prog}: error: process {self.status.process_index} of "
            f"{self.status.process_count}: {message}",
            file=sys.stderr,
            flush=True,
        )
        self._exit_now(code)

    def _ended(self, message: str, code: int) -> None:
        """The heartbeat ends this process because of another one."""
        preemption.report_end(message, code, self.stop, self.status.report)

    def _failed(self, error, code, joined: bool = True) -> None:
        """Record why this process stops; with several jax processes, tell the
        others, then end at once (they stop too, so there is no one to wait
        for at jax's shutdown). One process: nothing more to do."""
        reason = " ".join(str(error).split()) or type(error).__name__
        crashed = isinstance(error, BaseException) and not isinstance(
            error, self.one_line
        )
        if crashed:
            reason = f"{type(error).__name__}: {reason}"
        self._await_verdict(error)
        if isinstance(code, int):
            self.status.report(status.word_for(code), code, reason)
        if self.strategy is None:
            if joined and self._report_before_joining(reason):
                self._exit_now(code)
            return
        if self.strategy.coordination() is None:
            return
        if self.heartbeat is not None:
            self.heartbeat.failed(reason)
        if crashed:
            traceback.print_exc()
        self._exit_now(code)

    def _await_verdict(self, error) -> None:
        """A collective step that failed because another process went away:
        the heartbeat names that process and ends this one with the other's
        status (a stall, a signal) before this one reports a failure of its
        own. Returns when it finds nothing."""
        if (
            self.heartbeat is not None
            and isinstance(error, BaseException)
            and lost_a_peer(error)
        ):
            self.heartbeat.await_verdict()

    def _report_before_joining(self, reason: str) -> bool:
        """A process that fails before joining (bad arguments, a failed
        check) joins only to tell the others, so that they stop at once
        instead of waiting for it until the join timeout; whether it did
        (best effort: the others' join timeout still bounds them)."""
        found = distribute.join_to_report()
        if found is None:
            return False
        try:
            Heartbeat(*found, prog=self.prog).failed(reason)
        except Exception:
            return False
        return True

    def _exit_now(self, code) -> None:
        """End the process without jax's shutdown, which waits for every
        process to shut down too."""
        sys.stdout.flush()
        sys.stderr.flush()
        self._exit(code if isinstance(code, int) else 1)
