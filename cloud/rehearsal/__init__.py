"""A rehearsal cloud: what the real gcloud, ssh and scp need to run a
submission on this machine, with no TPU and no Google account.

    python -m cloud.rehearsal serve --dir D      (in its own shell, until SIGTERM)
    python -m cloud.tpu submit --rehearse-cloud D ...

`serve` (cloud/rehearsal/__main__.py) runs a `Cloud` (cloud/rehearsal/
cloud.py): a loopback TPU API on a clock (api.py), a Cloud Storage stand-in
(storage.py), one metadata server (metadata.py) and one sshd per worker of a
READY slice (workers.py), gcloud's own configuration and an ssh-agent. It
writes D/env.sh (what gcloud and the tool need to talk to it) and appends
every request it serves to D/requests.jsonl. `submit --rehearse` starts one
for the run, in OUTPUT_DIR/rehearsal, and stops it at the end.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from cloud.rehearsal.cloud import FAULTS, PROJECT, Cloud, missing

__all__ = ["FAULTS", "PROJECT", "Cloud", "missing", "read_env", "inject", "Serve"]


def read_env(directory: str | Path) -> dict[str, str]:
    """The variables D/env.sh exports; ValueError when no rehearsal cloud
    runs there."""
    path = Path(directory) / "env.sh"
    try:
        text = path.read_text()
    except OSError:
        raise ValueError(
            f"no rehearsal cloud at {directory} (no env.sh): start one with "
            f"python -m cloud.rehearsal serve --dir {directory}"
        ) from None
    env = {}
    for line in text.splitlines():
        words = shlex.split(line, comments=True)
        if words[:1] == ["export"] and "=" in words[1]:
            key, _, value = words[1].partition("=")
            env[key] = value
    pid = env.get("REHEARSAL_PID", "")
    if not pid.isdigit() or not Path(f"/proc/{pid}").exists():
        raise ValueError(
            f"the rehearsal cloud at {directory} is not running (process {pid or '?'} "
            f"is gone): start one with python -m cloud.rehearsal serve --dir {directory}"
        )
    return env


def inject(directory: str | Path, name: str, *faults: str) -> None:
    """Register faults for the slice `name` with the cloud serving `directory`."""
    env = read_env(directory)
    url = env["CLOUDSDK_API_ENDPOINT_OVERRIDES_TPU"] + "rehearsal/v1/faults"
    body = json.dumps({"name": name, "faults": list(faults)}).encode()
    request = urllib.request.Request(
        url, data=body, headers={"Content-Type": "application/json"}, method="POST"
    )
    with urllib.request.urlopen(request, timeout=30):
        pass


class Serve:
    """`python -m cloud.rehearsal serve` as a child process (what `submit
    --rehearse` starts): `start()` waits for its env.sh, `stop()` sends
    SIGTERM and waits."""

    def __init__(self, directory: str | Path, args=()):
        self.dir, self.args = Path(directory), list(args)
        self.process: subprocess.Popen | None = None

    def start(self, timeout: float = 60.0) -> dict[str, str]:
        (self.dir / "env.sh").unlink(missing_ok=True)
        self.dir.mkdir(parents=True, exist_ok=True)
        argv = [
            sys.executable,
            "-m",
            "cloud.rehearsal",
            "serve",
            "--dir",
            str(self.dir),
        ]
        root = str(Path(__file__).resolve().parents[2])
        path = os.environ.get("PYTHONPATH", "")
        env = {**os.environ, "PYTHONPATH": root + (os.pathsep + path if path else "")}
        self.process = subprocess.Popen(
            [*argv, *self.args],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=open(self.dir / "serve.log", "ab"),  # noqa: SIM115
            start_new_session=True,  # a Ctrl-C meant for the client leaves it
        )
        give_up = time.monotonic() + timeout
        while time.monotonic() < give_up:
            if self.process.poll() is not None:
                said = (self.dir / "serve.log").read_text().strip().splitlines()
                raise ValueError(f"the rehearsal cloud did not start: {said[-1:]}")
            try:
                return read_env(self.dir)
            except ValueError:
                time.sleep(0.1)
        self.stop()
        raise ValueError(f"the rehearsal cloud did not start within {timeout:.0f}s")

    def stop(self, timeout: float = 60.0) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
