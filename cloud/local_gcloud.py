"""A local stand-in for the gcloud commands cloud/ runs: a TPU slice made of
directories and processes on this machine.

    python cloud/local_gcloud.py --root DIR compute tpus ... (gcloud's arguments)

It understands exactly the argv lists cloud/gcloud.py builds. A "TPU" is
DIR/tpu.json plus one home directory per worker, DIR/worker-N/. `scp` copies
files in and out of those homes; `ssh --command=TEXT` runs TEXT with bash in
each worker's home at once (as gcloud runs it on every worker), the workers
joined into one jax cluster over loopback the way the TPU metadata joins real
ones: each gets KERAS_DISTRIBUTION_JOB_ADDRESSES / _NUM_PROCESSES / _PROCESS_ID,
SYNANN_WORKER_ID, JAX_PLATFORMS=cpu and XLA_FLAGS simulating the host's TPU
devices on its CPU. Its exit status is non-zero when any worker's is (current
gcloud's behaviour).

Stubbed, and only this: the package install. On a worker's PATH, `python3 -m
pip install ...` installs a stand-in `uv` into ~/.local/bin instead; that `uv`
makes `uv venv DIR` a DIR/bin/python that runs this machine's Python, and
`uv pip install` a no-op; both record what they were asked in DIR/stub-calls.log.
So a rehearsal runs every other command exactly as a TPU worker would, with
this machine's Python and packages standing in for the workers' venv.

`submit --rehearse` (cloud/tpu.py) runs a whole submission through it; tests
put it on PATH as `gcloud`.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path

if __package__ in (None, ""):  # run as a script: python cloud/local_gcloud.py
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cloud import checks  # noqa: E402
from cloud.runner import Runner  # noqa: E402

STATE = "tpu.json"
STUB_LOG = "stub-calls.log"

_PYTHON3_STUB = """#!/bin/sh
# local_gcloud: a TPU VM's python3, except that `-m pip install` installs the
# stand-in uv (the package install is what a rehearsal stubs).
if [ "$1" = -m ] && [ "$2" = pip ] && [ "$3" = install ]; then
    echo "python3 $*" >> {log}
    mkdir -p "$HOME/.local/bin" && cp {uv} "$HOME/.local/bin/uv" && exit 0
fi
exec {python} "$@"
"""
_UV_STUB = """#!/bin/sh
# local_gcloud: stand-in uv. `uv venv ... DIR`: DIR/bin/python runs this
# machine's Python; `uv pip install ...`: installs nothing.
echo "uv $*" >> {log}
case "$1" in
venv)
    for arg; do dir=$arg; done
    mkdir -p "$dir/bin"
    printf '#!/bin/sh\\nexec %s "$@"\\n' {python} > "$dir/bin/python"
    chmod +x "$dir/bin/python"
    ;;
pip) ;;
*) echo "local_gcloud uv stub: unsupported: uv $*" >&2; exit 2 ;;
esac
"""


class LocalTPU:
    """The directories that make up one local "TPU"."""

    def __init__(self, root: str | Path):
        # Absolute: the workers' shells run in their homes, and PATH holds the stubs.
        self.root = Path(root).resolve()

    @property
    def state_path(self) -> Path:
        return self.root / STATE

    def state(self) -> dict | None:
        try:
            return json.loads(self.state_path.read_text())
        except (OSError, ValueError):
            return None

    def home(self, worker: int) -> Path:
        return self.root / f"worker-{worker}"

    def workers(self, spec: str) -> list[int]:
        hosts = self.state()["hosts"]
        if spec == "all":
            return list(range(hosts))
        if not spec.isdigit() or int(spec) >= hosts:
            raise _Error(f"INVALID_ARGUMENT: worker {spec} not in 0..{hosts - 1}")
        return [int(spec)]

    def create(self, name: str, accelerator: str) -> None:
        if self.state() is not None:
            raise _Error(f"ALREADY_EXISTS: {self.state()['name']} exists")
        acc = checks.accelerator(accelerator)
        for w in range(acc.hosts):
            self.home(w).mkdir(parents=True)
        self._write_stubs()
        state = {
            "name": name,
            "accelerator": acc.name,
            "hosts": acc.hosts,
            "devices_per_host": acc.devices_per_host,
        }
        self.state_path.write_text(json.dumps(state) + "\n")

    def delete(self) -> None:
        state = self.state()
        for w in range(state["hosts"] if state else 0):
            shutil.rmtree(self.home(w), ignore_errors=True)
        self.state_path.unlink(missing_ok=True)

    def _write_stubs(self) -> None:
        stubs = self.root / "stubs"
        stubs.mkdir(parents=True, exist_ok=True)
        log = shlex.quote(str(self.root / STUB_LOG))
        python = shlex.quote(sys.executable)
        uv = stubs / "uv"
        uv.write_text(_UV_STUB.format(log=log, python=python))
        py3 = stubs / "python3"
        py3.write_text(
            _PYTHON3_STUB.format(log=log, uv=shlex.quote(str(uv)), python=python)
        )
        for path in (uv, py3):
            path.chmod(0o755)

    def worker_env(self, worker: int, ports: list[int]) -> dict[str, str]:
        """What a worker's shell sees: its home, the stubbed install, and the
        cluster a TPU slice's metadata would give jax."""
        state = self.state()
        env = {k: v for k, v in os.environ.items() if not k.startswith("KERAS_DIST")}
        env.update(
            cluster_env(worker, ports, state["devices_per_host"]),
            HOME=str(self.home(worker)),
            PATH=f"{self.root / 'stubs'}{os.pathsep}{env.get('PATH', '')}",
            SYNANN_WORKER_ID=str(worker),
        )
        return env


class _Error(Exception):
    """A gcloud-style error: printed as `ERROR: ...`, exit status 1."""


def free_ports(n: int) -> list[int]:
    """n TCP ports free on loopback right now."""
    sockets = [socket.socket() for _ in range(n)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def cluster_env(process: int, ports: list[int], devices: int) -> dict[str, str]:
    """The environment that makes process `process` of len(ports) one member of
    a jax cluster on loopback, with `devices` simulated CPU devices."""
    return {
        "KERAS_DISTRIBUTION_JOB_ADDRESSES": ",".join(f"127.0.0.1:{p}" for p in ports),
        "KERAS_DISTRIBUTION_NUM_PROCESSES": str(len(ports)),
        "KERAS_DISTRIBUTION_PROCESS_ID": str(process),
        "JAX_PLATFORMS": "cpu",
        "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}",
    }


def _flag(argv: list[str], name: str) -> str | None:
    for arg in argv:
        if arg.startswith(f"--{name}="):
            return arg.split("=", 1)[1]
    return None


def _positional(argv: list[str]) -> list[str]:
    return [a for a in argv if not a.startswith("--")]


def _describe(tpu: LocalTPU, argv: list[str]) -> None:
    state = tpu.state()
    name = _positional(argv)[4]
    if state is None or state["name"] != name:
        raise _Error(f"NOT_FOUND: Resource '{name}' was not found")
    fmt = _flag(argv, "format") or ""
    if fmt == "value(name)":
        print(name)
    elif fmt.startswith("value(state"):
        print("ACTIVE" if "queued-resources" in argv else "READY")
    else:
        print(json.dumps(state))


def _scp(tpu: LocalTPU, argv: list[str]) -> None:
    source, dest = _positional(argv)[4:6]
    workers = tpu.workers(_flag(argv, "worker") or "0")
    if ":" in dest:  # local file -> every worker
        remote = dest.split(":", 1)[1]
        for w in workers:
            shutil.copy2(source, tpu.home(w) / remote)
        return
    remote = source.split(":", 1)[1]
    for w in workers:  # remote directory -> into the local directory
        path = tpu.home(w) / remote
        if not path.exists():
            raise _Error(f"scp: {remote}: No such file or directory (worker {w})")
        shutil.copytree(path, Path(dest) / path.name, dirs_exist_ok=True)


def _ssh(tpu: LocalTPU, argv: list[str]) -> int:
    command = _flag(argv, "command")
    workers = tpu.workers(_flag(argv, "worker") or "0")
    ports = free_ports(tpu.state()["hosts"])
    shell = shutil.which("bash") or "sh"
    children = [
        subprocess.Popen(
            [shell, "-c", command],
            cwd=tpu.home(w),
            env=tpu.worker_env(w, ports),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        for w in workers
    ]

    def stop(signum, frame):
        for child in children:
            if child.poll() is None:
                os.killpg(child.pid, signal.SIGTERM)
        sys.exit(128 + signum)

    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, stop)
    copiers = [threading.Thread(target=_copy_out, args=(c,)) for c in children]
    for thread in copiers:
        thread.start()
    codes = [child.wait() for child in children]
    for thread in copiers:
        thread.join()
    return next((rc for rc in codes if rc != 0), 0)


def _copy_out(child: subprocess.Popen) -> None:
    for line in iter(child.stdout.readline, b""):
        sys.stdout.buffer.write(line)
        sys.stdout.flush()


def run(root: str | Path, argv: list[str]) -> int:
    """Act on `argv` (gcloud's arguments, without "gcloud") like gcloud would."""
    tpu = LocalTPU(root)
    words = _positional(argv)
    verb = words[3] if len(words) > 3 else ""
    try:
        if verb == "describe":
            _describe(tpu, argv)
        elif verb == "create":
            tpu.create(words[4], _flag(argv, "accelerator-type"))
        elif verb == "delete":
            if tpu.state() is None:
                raise _Error(f"NOT_FOUND: Resource '{words[4]}' was not found")
            tpu.delete()
        elif tpu.state() is None:
            raise _Error(f"NOT_FOUND: Resource '{words[4]}' was not found")
        elif verb == "scp":
            _scp(tpu, argv)
        elif verb == "ssh":
            return _ssh(tpu, argv)
        else:
            raise _Error(f"local_gcloud does not know: gcloud {shlex.join(argv)}")
    except _Error as error:
        print(f"ERROR: (local_gcloud) {error}", file=sys.stderr)
        return 1
    return 0


def rehearsal_runner(backend: str, output_dir: str) -> Runner:
    """A Runner whose gcloud is this stand-in, acting under OUTPUT_DIR/rehearsal."""
    if backend != "jax":
        raise ValueError(
            f"--rehearse runs the jax workers' commands; {backend}'s need a TPU build "
            "(tensorflow-tpu) that does not run here. Rehearse with --backend jax"
        )
    root = Path(output_dir).resolve() / "rehearsal"
    program = [sys.executable, str(Path(__file__).resolve()), "--root", str(root)]
    return Runner(gcloud=program, label="rehearsal")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if len(argv) < 2 or argv[0] != "--root":
        print("usage: local_gcloud.py --root DIR GCLOUD_ARGS...", file=sys.stderr)
        return 2
    return run(argv[1], argv[2:])


if __name__ == "__main__":
    sys.exit(main())
