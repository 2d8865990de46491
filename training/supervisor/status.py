"""How a run of training/mnist.py ended, for whoever started it (a job
scheduler, a script that retries, a person reading the logs): the exit status,
and one line in a status file.

Exit statuses:

    0    ok          training and evaluation finished
    1    failed      an error (data, versions, checkpoint, a crash), or another
                     process of the run failed and this one stopped with it
    2    usage       a bad command-line argument
    75   stalled     no training step completed within the stall bound
                     (--stall-timeout; stall.py here): the run hangs although
                     its processes are alive; also a process stopped because
                     another one stalled
    130  terminated  SIGINT
    143  terminated  SIGTERM, or `preempted` when the Compute Engine metadata
         preempted   server said instance/preempted is TRUE; also a process that
                     stopped because another one was asked to stop

A status file (--status-file PATH, written by every process; `{process}` in
PATH becomes the process index; without it the chief alone writes
OUTPUT_DIR/status.json) holds one line of JSON, written once (the first
outcome wins) and atomically (a temporary file renamed). A usage error that
argparse itself reports (an unknown flag, a value of the wrong type or not
among the choices) comes before the file's path is known: it writes none.

    {"status": "preempted", "exit": 143, "message": "...", "process": 0,
     "processes": 2, "time": "2026-12-05T08:40:00Z", ...}

`status` is one of the words above; `message` is one line for people. Extra
keys: `preempted` (true, false, or null when the metadata server did not
answer) after SIGTERM/SIGINT; `checkpoint` after SIGTERM/SIGINT with
--checkpoint-dir: `{"epoch": E, "steps": K}` when the K steps done in epoch E
(after epochs 1..E-1) were saved, else `null` with `checkpoint_note` saying
why; `epoch`, `step`, `phase`, `waited_s`, `bound_s` when stalled.

SIGTERM (a spot or preemptible VM gets it about 30 s before it stops) is an
outcome distinct from a failure: a run asked to stop may be resumed from its
checkpoints (`--resume`), a failed one would fail again.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
import urllib.request
from pathlib import Path

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_STALLED = 75
EXIT_SIGINT = 130
EXIT_SIGTERM = 143
STATUSES = ("ok", "failed", "usage", "stalled", "terminated", "preempted")

#: The Compute Engine metadata server's answer to "was this VM preempted?"
#: ("TRUE" or "FALSE"); its link-local address, so no DNS lookup can stall.
METADATA_PREEMPTED_URL = "http://169.254.169.254/computeMetadata/v1/instance/preempted"
METADATA_TIMEOUT_S = 1.0
DEFAULT_NAME = "status.json"  # in OUTPUT_DIR, the chief's


def preempted(url: str | None = None, timeout: float = METADATA_TIMEOUT_S):
    """Whether the metadata server says this VM was preempted: True, False, or
    None when it does not answer within `timeout` seconds (not on Compute
    Engine, no network). Never raises; returns within about `timeout` s."""
    url = url or METADATA_PREEMPTED_URL
    answer: list = [None]

    def ask():
        request = urllib.request.Request(url, headers={"Metadata-Flavor": "Google"})
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                text = response.read(64).decode("ascii", "replace").strip().upper()
        except Exception:
            return
        if text in ("TRUE", "FALSE"):
            answer[0] = text == "TRUE"

    thread = threading.Thread(target=ask, name="synann-metadata", daemon=True)
    thread.start()
    thread.join(timeout + 0.5)  # a connect plus a read, each bounded by urllib
    return answer[0]


def word_for(code: int) -> str:
    """The status word of an exit status (see the module docstring)."""
    return {
        EXIT_OK: "ok",
        EXIT_USAGE: "usage",
        EXIT_STALLED: "stalled",
        EXIT_SIGINT: "terminated",
        EXIT_SIGTERM: "terminated",
    }.get(code, "failed")


class Reporter:
    """Writes this process's status file once (thread-safe: the first report
    wins, later ones are ignored)."""

    def __init__(self, template: str | None, process_index: int = 0, count: int = 1):
        self.template = template
        self.process_index, self.process_count = process_index, count
        self._lock = threading.Lock()
        self.written: dict | None = None

    def retarget(self, template: str | None, process_index: int, count: int) -> None:
        """Write to `template` as process `process_index` of `count` from now on
        (an outcome already reported stays reported)."""
        with self._lock:
            self.template = template
            self.process_index, self.process_count = process_index, count

    @property
    def path(self) -> Path | None:
        if not self.template:
            return None
        return Path(self.template.replace("{process}", str(self.process_index)))

    def report(self, status: str, code: int, message: str, **extra) -> bool:
        """Record the outcome; whether this call wrote it."""
        with self._lock:
            if self.written is not None:
                return False
            record = {
                "status": status,
                "exit": int(code),
                "message": " ".join(str(message).split()),
                "process": self.process_index,
                "processes": self.process_count,
                "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                **extra,
            }
            self.written = record
            path = self.path
            if path is None:
                return True
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
                tmp.write_text(json.dumps(record) + "\n")
                os.replace(tmp, path)
            except OSError as e:  # never let the report hide the outcome
                print(
                    f"mnist.py: warning: could not write the status file {path}: {e}",
                    file=sys.stderr,
                    flush=True,
                )
            return True


def read(path) -> dict:
    """A status file's record (for tools and tests)."""
    return json.loads(Path(path).read_text())
