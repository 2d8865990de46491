"""Helpers of the rehearsal tests (tests/test_rehearsal*.py): running the
tool against a rehearsal cloud and reading what the cloud recorded."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from cloud import rehearsal
from cloud.rehearsal import records, standin, workers

REPO = Path(__file__).resolve().parent.parent
ZONE = "us-central2-b"
MISSING = rehearsal.missing()

#: The rehearsal test modules' marks: any backend; skipped (with what to
#: install) without gcloud, OpenSSH's sshd or curl.
MARKS = [
    pytest.mark.any_backend,
    pytest.mark.skipif(MISSING is not None, reason=MISSING or ""),
]


def stand_in_source(tmp_path_factory) -> Path:
    """A tree whose training is the rehearsal's stand-in (seconds)."""
    return standin.write(tmp_path_factory.mktemp("fake"))


def tool(cwd, *args, popen=False, timeout=300):
    argv = [sys.executable, "-m", "cloud.tpu", *args]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    if popen:
        return subprocess.Popen(
            argv,
            cwd=cwd,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
    return subprocess.run(
        argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )


def submit(cwd, cloud, name, source, *args, popen=False, accelerator="v5litepod-8"):
    argv = ["submit", "--rehearse-cloud", str(cloud), "--name", name, "--zone", ZONE]
    argv += ["--accelerator-type", accelerator, "--source", str(source)]
    argv += ["--poll-interval", "0.5", *args]
    return tool(cwd, *argv, popen=popen)


def wait_for_delete(directory: Path, name: str, timeout: float) -> dict:
    return records.first_delete(directory, name, timeout)


def slice_dir(directory: Path, name: str) -> Path:
    """SLICE: the machines' files of the latest slice called `name`."""
    found = records.slice_dirs(directory, name)
    assert found, f"no slice {name} became READY"
    return found[-1]


def assert_nothing_left(directory: Path) -> None:
    """No worker process, sshd or agent of this rehearsal runs."""
    root = directory.resolve()
    assert workers.kill_processes(root) == 0
    for pid in Path("/proc").glob("[0-9]*"):
        try:
            cmdline = (pid / "cmdline").read_bytes()
        except OSError:
            continue
        assert str(root).encode() not in cmdline, cmdline


def agent_log(directory: Path, name: str, worker: int, what: str) -> str:
    """A log of worker `worker`'s agent in SLICE/tmp-N/synann (the
    watchdog's: kept after the slice is gone)."""
    return (slice_dir(directory, name) / f"tmp-{worker}/synann/{what}.log").read_text()
