"""A rehearsal slice's workers: one OpenSSH sshd per worker on loopback, each
worker with its own home, temporary directory and metadata server, its
startup script run when the node becomes READY, and the stubbed package
install.

Worker N of slice S listens on its internal and external loopback addresses
(127.S.1.(10+N) and 127.S.0.(10+N), what the API lists in networkEndpoints)
on one unprivileged port shared by all slices of the rehearsal. Every
session is forced through a small shell script (`ForceCommand`) that makes
it look like a session on a TPU VM: HOME is SLICE/worker-N, TMPDIR
SLICE/tmp-N (kept after the slice is gone, with the watchdog's log),
GCE_METADATA_ROOT the worker's metadata server, gcloud pointed at the
rehearsal's API; the jax cluster is joined over loopback with the process
index read from the metadata server's agent-worker-number, as jax finds it
on a TPU VM (KERAS_DISTRIBUTION_*, JAX_PLATFORMS=cpu, XLA_FLAGS simulating
the host's TPU devices); then it runs the client's command with bash, or
sftp-server for scp. The authorized keys are what gcloud put in the node's
`ssh-keys` metadata (as the guest agent of a TPU VM installs them).

Stubbed, and only this: the package install. On a worker's PATH, `python3 -m
pip install ...` installs a stand-in `uv` into ~/.local/bin; that `uv` makes
`uv venv DIR` a DIR/bin/python that runs this machine's Python, and `uv pip
install` a no-op; both record what they were asked in ROOT/stub-calls.log.

Every process of a worker carries REHEARSAL_WORKER=SLICE/worker-N in its
environment; `kill_processes` finds them through /proc (Linux), as deleting a
TPU ends everything on it.
"""

from __future__ import annotations

import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

MARKER = "REHEARSAL_WORKER"
SSHD = "/usr/sbin/sshd"
SFTP_SERVER = ("/usr/lib/openssh/sftp-server", "/usr/libexec/openssh/sftp-server")
STUB_LOG = "stub-calls.log"

_PYTHON3_STUB = """#!/bin/sh
# rehearsal: a TPU VM's python3, except that `-m pip install` installs the
# stand-in uv (the package install is what a rehearsal stubs).
if [ "$1" = -m ] && [ "$2" = pip ] && [ "$3" = install ]; then
    echo "python3 $*" >> {log}
    mkdir -p "$HOME/.local/bin" && cp {uv} "$HOME/.local/bin/uv" && exit 0
fi
exec {python} "$@"
"""
_UV_STUB = """#!/bin/sh
# rehearsal: stand-in uv. `uv venv ... DIR`: DIR/bin/python runs this
# machine's Python; `uv pip install ...`: installs nothing.
echo "uv $*" >> {log}
case "$1" in
venv)
    for arg; do dir=$arg; done
    mkdir -p "$dir/bin"
    printf '#!/bin/sh\\nexec %s "$@"\\n' {python} > "$dir/bin/python"
    chmod +x "$dir/bin/python" ;;
pip) ;;
*) echo "rehearsal uv stub: unsupported: uv $*" >&2; exit 2 ;;
esac
"""
_SESSION = """#!/bin/sh
# rehearsal: every ssh session to worker {worker} runs here (ForceCommand).
{exports}
KERAS_DISTRIBUTION_PROCESS_ID="$(curl -sf --max-time 5 -H 'Metadata-Flavor: Google' \\
    "http://$GCE_METADATA_ROOT/computeMetadata/v1/instance/attributes/agent-worker-number")"
export KERAS_DISTRIBUTION_PROCESS_ID
cd "$HOME" || exit 1
echo "$SSH_CONNECTION $SSH_ORIGINAL_COMMAND" | cut -c1-200 >> {connections}
case "$SSH_ORIGINAL_COMMAND" in
"") echo "rehearsal: a command is needed" >&2; exit 1 ;;
internal-sftp|*sftp-server*) exec {sftp} -d "$HOME" ;;
*) exec /bin/bash -c "$SSH_ORIGINAL_COMMAND" ;;
esac
"""
_SSHD_CONFIG = """\
ListenAddress {internal}:{port}
ListenAddress {external}:{port}
HostKey {host_key}
PidFile none
AuthorizedKeysFile {authorized}
StrictModes no
UsePAM no
PermitRootLogin prohibit-password
PasswordAuthentication no
KbdInteractiveAuthentication no
PermitUserEnvironment no
X11Forwarding no
AllowTcpForwarding no
MaxStartups 64
LogLevel ERROR
Subsystem sftp {sftp}
ForceCommand {session}
"""


def missing_programs() -> str | None:
    """One line naming what to install, or None when sshd, ssh, scp,
    ssh-keygen, ssh-agent and curl are all there."""
    missing = [
        p
        for p in ("ssh", "scp", "ssh-keygen", "ssh-agent", "curl")
        if not shutil.which(p)
    ]
    if not Path(SSHD).is_file() or not _sftp_server():
        missing.append("sshd")
    if not missing:
        return None
    return (
        f"the rehearsal needs {', '.join(missing)}: install them (Debian/Ubuntu: "
        "apt-get install openssh-client openssh-server curl)"
    )


def _sftp_server() -> str | None:
    return next((p for p in SFTP_SERVER if Path(p).is_file()), None)


def free_ports(n: int, hosts: tuple[str, ...] = ("127.0.0.1",)) -> list[int]:
    """n TCP ports free right now on every address in `hosts`."""
    ports: list[int] = []
    for _ in range(200):
        if len(ports) == n:
            return ports
        with socket.socket() as s:
            s.bind((hosts[0], 0))
            port = s.getsockname()[1]
        if port in ports:
            continue
        try:
            for host in hosts[1:]:
                with socket.socket() as t:
                    t.bind((host, port))
        except OSError:
            continue
        ports.append(port)
    raise OSError(f"could not find {n} free ports on {', '.join(hosts)}")


def cluster_env(
    ports: list[int], devices: int, process: int | None = None
) -> dict[str, str]:
    """The environment that makes each of len(ports) processes a member of a
    jax cluster on loopback, with `devices` simulated CPU devices. The process
    index is `process` where given; on a rehearsal worker it comes from the
    metadata server instead."""
    env = {
        "KERAS_DISTRIBUTION_JOB_ADDRESSES": ",".join(f"127.0.0.1:{p}" for p in ports),
        "KERAS_DISTRIBUTION_NUM_PROCESSES": str(len(ports)),
        "JAX_PLATFORMS": "cpu",
        "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}",
    }
    if process is not None:
        env["KERAS_DISTRIBUTION_PROCESS_ID"] = str(process)
    return env


def kill_processes(prefix_dir: str | Path, sig: int = signal.SIGKILL) -> int:
    """Send `sig` to every process whose REHEARSAL_WORKER lies under
    `prefix_dir`; with SIGKILL, until none is left. Returns how many."""
    prefix = f"{MARKER}={Path(prefix_dir).resolve()}".encode()
    proc, signalled = Path("/proc"), 0
    for _ in range(10 if sig == signal.SIGKILL else 1):
        found = 0
        for entry in proc.glob("[0-9]*") if proc.is_dir() else []:
            try:
                environ = (entry / "environ").read_bytes()
            except OSError:
                continue
            if int(entry.name) != os.getpid() and any(
                item == prefix or item.startswith(prefix + b"/")
                for item in environ.split(b"\0")
            ):
                try:
                    os.kill(int(entry.name), sig)
                    found += 1
                except OSError:
                    pass
        signalled += found
        if not found:
            break
        time.sleep(0.05)
    return signalled


def descendants(pid: int) -> list[int]:
    """Process ids below `pid` (Linux /proc)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def path_without(program: str, directory: Path) -> str:
    """A PATH like ours in which `program` is not found: `directory` filled
    with links to every other program on PATH (a TPU image without it)."""
    directory.mkdir(parents=True, exist_ok=True)
    for folder in os.environ.get("PATH", "/usr/bin:/bin").split(os.pathsep):
        for entry in sorted(Path(folder).glob("*")) if Path(folder).is_dir() else []:
            link = directory / entry.name
            if (
                entry.name != program
                and not link.exists()
                and os.access(entry, os.X_OK)
            ):
                link.symlink_to(entry)
    return str(directory)


class Workers:
    """The machines of one READY slice: a home, a temporary directory and an
    sshd per worker, the startup scripts; `env_of(worker)` adds to each
    worker's environment (its metadata server, gcloud's endpoints)."""

    def __init__(self, root: Path, s, devices_per_host: int, port: int, env_of):
        self.root = Path(root).resolve()
        self.number, self.hosts, self.port = s.number, s.hosts, port
        self.slice = s
        self.dir = self.root / f"slice-{s.number}"
        self.sshds: list[subprocess.Popen] = []
        self.scripts: list[subprocess.Popen] = []
        self.cluster_ports = free_ports(s.hosts)
        self.devices_per_host = devices_per_host
        self.env_of = env_of
        self.path = os.environ.get("PATH", "/usr/bin:/bin")

    def home(self, worker: int) -> Path:
        return self.dir / f"worker-{worker}"

    def tmp(self, worker: int) -> Path:
        return self.dir / f"tmp-{worker}"

    @property
    def authorized_keys(self) -> Path:
        return self.dir / "authorized_keys"

    @property
    def host_key(self) -> Path:
        return self.dir / "host_ed25519"

    def public_host_key(self) -> str:
        try:
            return self.host_key.with_suffix(".pub").read_text().split()[1]
        except (OSError, IndexError):
            return ""

    def write_keys(self, ssh_keys: str) -> None:
        """The node's `ssh-keys` metadata ("user:KEY" lines) as authorized_keys."""
        lines = [ln.split(":", 1)[1] for ln in ssh_keys.splitlines() if ":" in ln]
        partial = self.authorized_keys.with_suffix(".partial")
        partial.write_text("".join(f"{ln}\n" for ln in lines))
        partial.replace(self.authorized_keys)

    def environment(self, worker: int, stubs: Path) -> dict[str, str]:
        return {
            "HOME": str(self.home(worker)),
            "TMPDIR": str(self.tmp(worker)),
            "PATH": f"{stubs}:{self.path}",
            "LANG": "C.UTF-8",
            MARKER: str(self.home(worker)),
            **cluster_env(self.cluster_ports, self.devices_per_host),
            **self.env_of(worker),
        }

    def start(self, connections_log: Path) -> None:
        """Start the sshds (once: a restart after a repair reuses the keys)."""
        self.dir.mkdir(parents=True, exist_ok=True)
        self.authorized_keys.touch()
        if not self.host_key.exists():
            subprocess.run(
                [
                    "ssh-keygen",
                    "-q",
                    "-t",
                    "ed25519",
                    "-N",
                    "",
                    "-f",
                    str(self.host_key),
                ],
                check=True,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                timeout=30,
            )
        stubs = self._write_stubs()
        if os.geteuid() == 0:
            Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # privilege separation
        for w in range(self.hosts):
            for folder in (self.home(w), self.tmp(w)):
                folder.mkdir(parents=True, exist_ok=True)
            env = self.environment(w, stubs)
            exports = "\n".join(f"export {k}={shlex.quote(v)}" for k, v in env.items())
            session = self.dir / f"session-{w}.sh"
            session.write_text(
                _SESSION.format(
                    worker=w,
                    exports=exports,
                    connections=shlex.quote(
                        str(connections_log.with_suffix(f".{w}.log"))
                    ),
                    sftp=_sftp_server(),
                )
            )
            session.chmod(0o755)
            internal, external = self.slice.endpoint(w)
            config = self.dir / f"sshd-{w}.conf"
            config.write_text(
                _SSHD_CONFIG.format(
                    internal=internal,
                    external=external,
                    port=self.port,
                    host_key=self.host_key,
                    authorized=self.authorized_keys,
                    session=session,
                    sftp=_sftp_server(),
                )
            )
            self.sshds.append(
                subprocess.Popen(
                    [SSHD, "-D", "-e", "-f", str(config)],
                    env={
                        **os.environ,
                        MARKER: str(self.dir),
                    },  # kill_processes finds it
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.DEVNULL,
                    stderr=open(self.dir / f"sshd-{w}.log", "ab"),  # noqa: SIM115
                    start_new_session=True,
                )
            )
        self._wait_listening()

    def run_startup_scripts(self, script: str) -> None:
        """Run the node's startup script on every worker, as a TPU VM's guest
        agent does at boot (output in SLICE/startup-N.log)."""
        stubs = self.dir / "stubs"
        for w in range(self.hosts):
            path = self.dir / f"startup-{w}.sh"
            path.write_text(script)
            self.scripts.append(
                subprocess.Popen(
                    ["/bin/sh", str(path)],
                    cwd=self.home(w),
                    env=self.environment(w, stubs),
                    stdin=subprocess.DEVNULL,
                    stdout=open(self.dir / f"startup-{w}.log", "ab"),  # noqa: SIM115
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            )

    def _wait_listening(self, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        for w in range(self.hosts):
            while True:
                if self.sshds[w].poll() is not None:
                    log = (self.dir / f"sshd-{w}.log").read_text()[-500:]
                    raise OSError(f"sshd for worker {w} exited: {log}")
                try:
                    address = (self.slice.endpoint(w)[1], self.port)
                    with socket.create_connection(address, 0.5):
                        break
                except OSError:
                    if time.monotonic() > deadline:
                        raise OSError(f"sshd for worker {w} did not listen") from None
                    time.sleep(0.05)

    def _write_stubs(self) -> Path:
        stubs = self.dir / "stubs"
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
        return stubs

    def without_gcloud(self) -> None:
        """The workers' image has no gcloud."""
        self.path = path_without("gcloud", self.dir / "bin-without-gcloud")

    def freeze(self, worker: int) -> None:
        """Worker `worker`'s network goes silent: its sshd and every session of
        it stop (SIGSTOP); connections stay open, nothing answers."""
        sshd = self.sshds[worker]
        for pid in [sshd.pid, *descendants(sshd.pid)]:
            try:
                if Path(f"/proc/{pid}/comm").read_text().strip().startswith("sshd"):
                    os.kill(pid, signal.SIGSTOP)
            except OSError:
                pass

    def connected(self, worker: int) -> bool:
        """Whether an ssh session to worker `worker` is open (sshd -D forks
        one process per connection)."""
        sshd = self.sshds[worker] if worker < len(self.sshds) else None
        return bool(sshd and descendants(sshd.pid))

    def signal_all(self, sig: int) -> int:
        """Send `sig` to every process on every worker (not the sshds)."""
        return sum(kill_processes(self.home(w), sig) for w in range(self.hosts))

    def kill_worker(self, worker: int) -> None:
        """Worker `worker`'s VM dies: its sshd and every process on it."""
        self._stop_sshd(self.sshds[worker])
        kill_processes(self.home(worker))

    def _stop_sshd(self, sshd: subprocess.Popen) -> None:
        for pid in [*descendants(sshd.pid), sshd.pid]:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        try:
            sshd.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass

    def stop(self, remove_homes: bool = True) -> None:
        """The machines stop (deleted, or restarting: `remove_homes` False
        keeps their disks): sshds and every worker process end."""
        for sshd in self.sshds:
            self._stop_sshd(sshd)
        self.sshds = []
        for w in range(self.hosts):
            kill_processes(self.home(w))
            if remove_homes:
                shutil.rmtree(self.home(w), ignore_errors=True)
        for script in self.scripts:
            if script.poll() is None:
                script.kill()
            script.wait()
        self.scripts = []
