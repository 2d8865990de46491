"""Start training/mnist.py as users do, as one process or as a jax cluster of
several processes over loopback, and collect what they printed."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import keras

from cloud.rehearsal.workers import cluster_env, free_ports

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "training" / "mnist.py"


def mlp_args(data_dir, out, epochs: int = 3, *extra) -> list[str]:
    """training/mnist.py's arguments for a small mlp run on the IDX files in
    `data_dir` (16 validation samples, batch 16, seed 3), writing to `out`."""
    return [
        "--model", "mlp", "--epochs", str(epochs), "--batch-size", "16",
        "--val-size", "16", "--data-dir", str(data_dir), "--seed", "3",
        "--verbose", "2", "--output-dir", str(out), *extra,
    ]  # fmt: skip


def script_env(extra: dict[str, str]) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("XLA_FLAGS", "WORLD_SIZE") and not k.startswith("KERAS_DIST")
    }
    env.update(KERAS_BACKEND=keras.backend.backend(), TF_CPP_MIN_LOG_LEVEL="3")
    env.update(extra)
    return env


def start_script(args: list[str], env: dict[str, str], launcher=()):
    """Start training/mnist.py (optionally under a launcher) as users do."""
    return subprocess.Popen(
        [sys.executable, *launcher, str(SCRIPT), *args],
        env=script_env(env),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


@dataclass
class Finished:
    returncode: int
    output: str
    seconds: float  # when it had exited (at most), from the call of finish()


def start_cluster(
    args, processes: int = 2, devices: int = 2, env=None, per_process=None
) -> list[subprocess.Popen]:
    """`processes` copies of training/mnist.py ARGS joined into one jax cluster
    over loopback, each with `devices` simulated CPU devices; `per_process`
    maps a process index to extra environment variables or arguments
    ({"env": {...}, "args": [...]})."""
    ports = free_ports(processes)
    procs = []
    for i in range(processes):
        own = (per_process or {}).get(i, {})
        process_env = {
            **cluster_env(ports, devices, process=i),
            **(env or {}),
            **own.get("env", {}),
        }
        procs.append(start_script([*args, *own.get("args", [])], process_env))
    return procs


def finish(procs, timeout: float = 300) -> list[Finished]:
    """Wait for every process (killing all at the timeout)."""
    start = time.monotonic()
    results = []
    try:
        for proc in procs:
            left = max(1.0, timeout - (time.monotonic() - start))
            output = proc.communicate(timeout=left)[0]
            results.append(Finished(proc.returncode, output, time.monotonic() - start))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
    return results


def wait_for_line(proc, text: str, timeout: float = 300) -> list[str]:
    """Read `proc`'s output until a line containing `text`; the lines read."""
    lines = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        lines.append(line)
        if text in line:
            return lines
    raise AssertionError(f"no line with {text!r}:\n" + "".join(lines[-40:]))


@contextlib.contextmanager
def port_held_like_grpc():
    """A loopback port listened on with SO_REUSEPORT, as jax's coordinator
    (a gRPC server) holds its port; yields the port number."""
    holder = socket.socket()
    holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    holder.bind(("127.0.0.1", 0))
    holder.listen()
    try:
        yield holder.getsockname()[1]
    finally:
        holder.close()
