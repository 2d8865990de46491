"""A local stand-in for the gcloud commands cloud/ runs: a TPU slice made of
directories and processes on this machine.

    python cloud/local_gcloud.py --root DIR [OPTIONS] compute tpus ... (gcloud's arguments)

It understands exactly the argv lists cloud/gcloud.py builds. A "TPU" is
DIR/tpu.json plus one home directory per worker, DIR/worker-N/. `describe`
prints the node or queued resource as gcloud's JSON (`networkEndpoints` one
per worker) or a `value(...)` projection of it. `scp` copies files in and out
of those homes; `ssh --command=TEXT` runs TEXT with bash in each worker's home
at once (as gcloud runs it on every worker), the workers joined into one jax
cluster over loopback the way the TPU metadata joins real ones: each gets
KERAS_DISTRIBUTION_JOB_ADDRESSES / _NUM_PROCESSES / _PROCESS_ID,
SYNANN_WORKER_ID, JAX_PLATFORMS=cpu and XLA_FLAGS simulating the host's TPU
devices on its CPU. Its exit status is non-zero when any worker's is (current
gcloud's behaviour). `delete` ends every process a worker started (found by
the LOCAL_GCLOUD_WORKER variable each inherits; Linux /proc), as deleting a
TPU does.

OPTIONS model what real gcloud and TPUs do besides the happy path:

    --agent-holds-other-keys   an ssh-agent runs without gcloud's key: `scp`
                               to several workers at once fails with gcloud's
                               SSHKeyNotInAgent error (one worker at a time works)
    --ssh-twice                every ssh command's connection drops after
                               DROP_AFTER_S (exit 255; what ran on the workers
                               goes on) and gcloud runs the command again
    --preempt-after-epoch K    once epoch K's checkpoint in --checkpoint-dir is
    --checkpoint-dir DIR       complete (training/checkpoints.py of the workers'
                               tree decides), kill every worker and report the
                               TPU PREEMPTED (its queued resource SUSPENDED);
                               once per DIR (the root), so a new TPU runs on

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
import time
from dataclasses import dataclass
from pathlib import Path

if __package__ in (None, ""):  # run as a script: python cloud/local_gcloud.py
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cloud import checks  # noqa: E402
from cloud.gcloud import REMOTE_DIR  # noqa: E402
from cloud.runner import Runner  # noqa: E402

STATE = "tpu.json"
STUB_LOG = "stub-calls.log"
PREEMPTED_ONCE = "preempted-once"  # in the root: the preemption happened
MARKER = "LOCAL_GCLOUD_WORKER"  # inherited by every process of a worker
DROP_AFTER_S = 2.0  # --ssh-twice: when the first connection drops
RETRY_AFTER_S = 1.0  # gcloud waits 5 s before it runs the command again
POLL_S = 0.3  # --preempt-after-epoch: checkpoint checks

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


@dataclass
class Options:
    """What this stand-in models besides the happy path (see the module doc)."""

    agent_holds_other_keys: bool = False
    ssh_twice: bool = False
    preempt_after_epoch: int | None = None
    checkpoint_dir: str | None = None

    def argv(self) -> list[str]:
        """These options as command-line flags."""
        flags = ["--agent-holds-other-keys"] if self.agent_holds_other_keys else []
        flags += ["--ssh-twice"] if self.ssh_twice else []
        if self.preempt_after_epoch is not None:
            flags += ["--preempt-after-epoch", str(self.preempt_after_epoch)]
        if self.checkpoint_dir is not None:
            flags += ["--checkpoint-dir", self.checkpoint_dir]
        return flags


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

    def _save(self, state: dict) -> None:
        partial = self.state_path.with_suffix(".partial")
        partial.write_text(json.dumps(state) + "\n")
        partial.replace(self.state_path)

    def home(self, worker: int) -> Path:
        return self.root / f"worker-{worker}"

    def workers(self, spec: str) -> list[int]:
        hosts = self.state()["hosts"]
        if spec == "all":
            return list(range(hosts))
        if not spec.isdigit() or int(spec) >= hosts:
            raise _Error(f"INVALID_ARGUMENT: worker {spec} not in 0..{hosts - 1}")
        return [int(spec)]

    def create(self, name: str, accelerator: str, zone: str, runtime: str) -> None:
        if self.state() is not None:
            raise _Error(f"ALREADY_EXISTS: {self.state()['name']} exists")
        acc = checks.accelerator(accelerator)
        for w in range(acc.hosts):
            self.home(w).mkdir(parents=True)
        self._write_stubs()
        self._save(
            {
                "name": name,
                "zone": zone,
                "runtime": runtime,
                "accelerator": acc.name,
                "hosts": acc.hosts,
                "devices_per_host": acc.devices_per_host,
                "state": "READY",
            }
        )

    def preempt(self) -> None:
        """What a spot preemption does: every worker stops at once."""
        state = self.state()
        state["state"] = "PREEMPTED"
        self._save(state)
        kill_processes(self.root)
        (self.root / PREEMPTED_ONCE).touch()

    def delete(self) -> None:
        state = self.state()
        kill_processes(self.root)
        for w in range(state["hosts"] if state else 0):
            shutil.rmtree(self.home(w), ignore_errors=True)
        self.state_path.unlink(missing_ok=True)

    def node(self) -> dict:
        """The TPU VM node as `gcloud ... tpu-vm describe --format=json` shows it."""
        state = self.state()
        where = f"projects/local/locations/{state['zone']}"
        return {
            "name": f"{where}/nodes/{state['name']}",
            "acceleratorType": state["accelerator"],
            "runtimeVersion": state["runtime"],
            "state": state["state"],
            "networkEndpoints": [
                {"ipAddress": "127.0.0.1", "port": 8470} for _ in range(state["hosts"])
            ],
        }

    def queued_resource(self) -> dict:
        """The queued resource as `... queued-resources describe --format=json`
        shows it: a preempted spot node leaves it SUSPENDED."""
        state = self.state()
        where = f"projects/local/locations/{state['zone']}"
        qr_state = "SUSPENDED" if state["state"] == "PREEMPTED" else "ACTIVE"
        return {
            "name": f"{where}/queuedResources/{state['name']}",
            "state": {"state": qr_state},
            "tpu": {"nodeSpec": [{"nodeId": state["name"]}]},
        }

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
        env[MARKER] = str(self.home(worker))
        return env


class _Error(Exception):
    """A gcloud-style error: printed as `ERROR: ...`, exit status 1."""


def kill_processes(root: str | Path) -> int:
    """SIGKILL every process a worker of the TPUs under `root` started (they
    carry MARKER=ROOT/worker-N in their environment, whatever session or
    process group they moved to); returns how many. Linux only (/proc)."""
    prefix = f"{MARKER}={Path(root).resolve()}{os.sep}".encode()
    proc, killed = Path("/proc"), 0
    for _ in range(10):  # until no process is left (they may fork meanwhile)
        found = 0
        for entry in proc.glob("[0-9]*") if proc.is_dir() else []:
            try:
                environ = (entry / "environ").read_bytes()
            except OSError:
                continue
            if int(entry.name) != os.getpid() and any(
                item.startswith(prefix) for item in environ.split(b"\0")
            ):
                try:
                    os.kill(int(entry.name), signal.SIGKILL)
                    found += 1
                except OSError:
                    pass
        killed += found
        if not found:
            break
        time.sleep(0.05)
    return killed


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


def _project(resource: dict, fmt: str) -> str:
    """gcloud's --format: json, or value(a.b) of one field."""
    if fmt == "json":
        return json.dumps(resource, indent=2)
    if fmt.startswith("value(") and fmt.endswith(")"):
        value = resource
        for key in fmt[len("value(") : -1].split("."):
            value = value.get(key, "") if isinstance(value, dict) else ""
        return str(value)
    raise _Error(f"local_gcloud does not know --format={fmt}")


def _describe(tpu: LocalTPU, argv: list[str]) -> None:
    state = tpu.state()
    name = _positional(argv)[4]
    if state is None or state["name"] != name:
        raise _Error(f"NOT_FOUND: Resource '{name}' was not found")
    fmt = _flag(argv, "format") or "json"
    if fmt == "value(name)":
        print(name)
        return
    queued = "queued-resources" in argv
    print(_project(tpu.queued_resource() if queued else tpu.node(), fmt))


def _usable(tpu: LocalTPU, command: str) -> None:
    """gcloud checks the node's state before it connects."""
    state = tpu.state()["state"]
    if state != "READY":
        raise _Error(
            f"(gcloud.compute.tpus.tpu-vm.{command}) This TPU has terminal state "
            f'"{state}", so it cannot be used anymore.'
        )


def _scp(tpu: LocalTPU, argv: list[str], options: Options) -> None:
    _usable(tpu, "scp")
    source, dest = _positional(argv)[4:6]
    workers = tpu.workers(_flag(argv, "worker") or "0")
    if len(workers) > 1 and options.agent_holds_other_keys:
        raise _Error(
            "(gcloud.compute.tpus.tpu-vm.scp) SSH Key is not present in the SSH "
            'agent. Please run "ssh-add ~/.ssh/google_compute_engine" to add it, '
            "and try again."
        )
    for _ in range(2 if options.ssh_twice else 1):
        if ":" in dest:  # local file -> every worker
            remote = dest.split(":", 1)[1]
            for w in workers:
                shutil.copy2(source, tpu.home(w) / remote)
            continue
        remote = source.split(":", 1)[1]
        for w in workers:  # remote directory -> into the local directory
            path = tpu.home(w) / remote
            if not path.exists():
                raise _Error(f"scp: {remote}: No such file or directory (worker {w})")
            shutil.copytree(path, Path(dest) / path.name, dirs_exist_ok=True)


class _Connections:
    """One ssh command running on some workers: their shells, and threads that
    copy the shells' output to this process's stdout until `drop()`."""

    def __init__(self, tpu: LocalTPU, workers: list[int], command: str):
        ports = free_ports(tpu.state()["hosts"])
        shell = shutil.which("bash") or "sh"
        self.dropped = False
        self.children = [
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
        self.copiers = [
            threading.Thread(target=self._copy_out, args=(c,), daemon=True)
            for c in self.children
        ]
        for thread in self.copiers:
            thread.start()

    def _copy_out(self, child: subprocess.Popen) -> None:
        for line in iter(child.stdout.readline, b""):
            if not self.dropped:
                sys.stdout.buffer.write(line)
                sys.stdout.flush()

    def running(self) -> bool:
        return any(child.poll() is None for child in self.children)

    def drop(self) -> None:
        """The connection is gone: output is no longer shown; what runs on the
        workers goes on (ssh runs commands without a terminal)."""
        self.dropped = True

    def hang_up(self) -> None:
        """This command's shells end (the connection was closed)."""
        for child in self.children:
            if child.poll() is None:
                try:
                    os.killpg(child.pid, signal.SIGTERM)
                except OSError:
                    pass

    def exit_code(self) -> int:
        codes = [child.wait() for child in self.children]
        for thread in self.copiers:
            thread.join()
        return next((rc for rc in codes if rc != 0), 0)


def _completed_epochs(tpu: LocalTPU):
    """training/checkpoints.py's completed_epochs from the workers' own tree
    (the code that writes the checkpoints decides when one is complete)."""
    src = tpu.home(0) / REMOTE_DIR / "src"
    if not (src / "training").is_dir():
        return None
    sys.path.insert(0, str(src))
    try:
        from training.checkpoints import completed_epochs
    except ImportError as error:
        raise _Error(
            "--preempt-after-epoch needs completed_epochs(directory) in the "
            f"workers' training/checkpoints.py: {error}"
        ) from None
    return completed_epochs


def _watch_for_preemption(tpu: LocalTPU, run: _Connections, options: Options) -> bool:
    """Wait for `run`; preempt the TPU once epoch K's checkpoint is complete.
    True if it preempted."""
    epoch, directory = options.preempt_after_epoch, options.checkpoint_dir
    armed = epoch is not None and not (tpu.root / PREEMPTED_ONCE).exists()
    completed = None
    while run.running():
        if armed:
            completed = completed or _completed_epochs(tpu)
            # >=: older checkpoints may be deleted (training keeps the newest).
            if completed and max(completed(directory), default=0) >= epoch:
                tpu.preempt()
                return True
        time.sleep(POLL_S)
    return False


def _ssh(tpu: LocalTPU, argv: list[str], options: Options) -> int:
    _usable(tpu, "ssh")
    command = _flag(argv, "command")
    workers = tpu.workers(_flag(argv, "worker") or "0")
    connections: list[_Connections] = []

    def stop(signum, frame):
        for conn in connections:
            conn.hang_up()
        sys.exit(128 + signum)

    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, stop)
    if options.ssh_twice:
        first = _Connections(tpu, workers, command)
        connections.append(first)
        deadline = time.monotonic() + DROP_AFTER_S
        while first.running() and time.monotonic() < deadline:
            time.sleep(0.05)
        first.drop()
        print(
            "Retrying: SSH command error: [/usr/bin/ssh] exited with return code "
            "[255]. (local_gcloud --ssh-twice: the command runs again)",
            file=sys.stderr,
            flush=True,
        )
        time.sleep(RETRY_AFTER_S)
    run = _Connections(tpu, workers, command)
    connections.append(run)
    if _watch_for_preemption(tpu, run, options):
        run.drop()
        print(
            f"ERROR: (local_gcloud) {tpu.state()['name']} was preempted once epoch "
            f"{options.preempt_after_epoch}'s checkpoint was complete; the "
            "connection to every worker was lost ([/usr/bin/ssh] exited with "
            "return code [255])",
            file=sys.stderr,
            flush=True,
        )
        return 255
    return run.exit_code()


def run(root: str | Path, argv: list[str], options: Options | None = None) -> int:
    """Act on `argv` (gcloud's arguments, without "gcloud") like gcloud would."""
    options = options or Options()
    tpu = LocalTPU(root)
    words = _positional(argv)
    verb = words[3] if len(words) > 3 else ""
    try:
        if verb == "describe":
            _describe(tpu, argv)
        elif verb == "create":
            runtime = _flag(argv, "runtime-version") or _flag(argv, "version")
            zone = _flag(argv, "zone")
            tpu.create(words[4], _flag(argv, "accelerator-type"), zone, runtime)
        elif verb == "delete":
            if tpu.state() is None:
                raise _Error(f"NOT_FOUND: Resource '{words[4]}' was not found")
            tpu.delete()
        elif tpu.state() is None:
            raise _Error(f"NOT_FOUND: Resource '{words[4]}' was not found")
        elif verb == "scp":
            _scp(tpu, argv, options)
        elif verb == "ssh":
            return _ssh(tpu, argv, options)
        else:
            raise _Error(f"local_gcloud does not know: gcloud {shlex.join(argv)}")
    except _Error as error:
        print(f"ERROR: (local_gcloud) {error}", file=sys.stderr)
        return 1
    return 0


def rehearsal_runner(
    backend: str, output_dir: str, options: Options | None = None
) -> Runner:
    """A Runner whose gcloud is this stand-in, acting under OUTPUT_DIR/rehearsal.
    By default its ssh-agent holds other keys, as on many desktops."""
    if backend != "jax":
        raise ValueError(
            f"--rehearse runs the jax workers' commands; {backend}'s need a TPU build "
            "(tensorflow-tpu) that does not run here. Rehearse with --backend jax"
        )
    options = options or Options(agent_holds_other_keys=True)
    root = Path(output_dir).resolve() / "rehearsal"
    program = [sys.executable, str(Path(__file__).resolve()), "--root", str(root)]
    return Runner(gcloud=program + options.argv(), label="rehearsal")


def parse_options(argv: list[str]) -> tuple[Options, list[str]]:
    """This stand-in's own options (before gcloud's arguments); the rest."""
    options, rest = Options(), list(argv)
    while rest and rest[0].startswith("--"):
        flag = rest.pop(0)
        if flag == "--agent-holds-other-keys":
            options.agent_holds_other_keys = True
        elif flag == "--ssh-twice":
            options.ssh_twice = True
        elif flag == "--preempt-after-epoch" and rest:
            options.preempt_after_epoch = checks.count(rest.pop(0), flag, 1)
        elif flag == "--checkpoint-dir" and rest:
            options.checkpoint_dir = rest.pop(0)
        else:
            raise ValueError(f"local_gcloud: unknown option {flag}")
    if options.preempt_after_epoch is not None and not options.checkpoint_dir:
        raise ValueError("local_gcloud: --preempt-after-epoch needs --checkpoint-dir")
    return options, rest


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    usage = "usage: local_gcloud.py --root DIR [OPTIONS] GCLOUD_ARGS..."
    if len(argv) < 2 or argv[0] != "--root":
        print(usage, file=sys.stderr)
        return 2
    try:
        options, rest = parse_options(argv[2:])
    except ValueError as error:
        print(f"{error}\n{usage}", file=sys.stderr)
        return 2
    return run(argv[1], rest, options)


if __name__ == "__main__":
    sys.exit(main())
