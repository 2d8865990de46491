"""A rehearsal slice's workers: one OpenSSH sshd per worker on loopback, each
worker with its own home tree, and the stubbed package install.

Worker N of the slice numbered S listens on its internal and external
loopback addresses (127.0.1.(10+N) and 127.0.0.(10+N), what the loopback API
lists in networkEndpoints) on one unprivileged port shared by all workers.
Every session is forced through a small shell script (`ForceCommand`) that
makes it look like a session on a TPU VM: HOME is ROOT/worker-N, the jax
cluster is joined over loopback as the TPU metadata would join it
(KERAS_DISTRIBUTION_*, JAX_PLATFORMS=cpu, XLA_FLAGS simulating the host's TPU
devices), SYNANN_WORKER_ID=N; then it runs the client's command with bash, or
sftp-server for scp. The authorized keys are what gcloud put in the node's
`ssh-keys` metadata (as the guest agent of a TPU VM installs them).

Stubbed, and only this: the package install. On a worker's PATH, `python3 -m
pip install ...` installs a stand-in `uv` into ~/.local/bin; that `uv` makes
`uv venv DIR` a DIR/bin/python that runs this machine's Python, and `uv pip
install` a no-op; both record what they were asked in ROOT/stub-calls.log.

Every process of a worker carries REHEARSAL_WORKER=ROOT/worker-N in its
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
    """One line naming what to install, or None when sshd, ssh, scp and
    ssh-keygen are all there."""
    missing = [
        p for p in ("ssh", "scp", "ssh-keygen", "ssh-agent") if not shutil.which(p)
    ]
    if not Path(SSHD).is_file() or not _sftp_server():
        missing.append("sshd")
    if not missing:
        return None
    return (
        f"the rehearsal needs {', '.join(missing)}: install OpenSSH (Debian/Ubuntu: "
        "apt-get install openssh-client openssh-server)"
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


class Workers:
    """The machines of one READY slice: a home tree and an sshd per worker."""

    def __init__(
        self, root: Path, number: int, hosts: int, devices_per_host: int, port: int
    ):
        self.root = Path(root).resolve()
        self.number, self.hosts, self.port = number, hosts, port
        self.dir = self.root / f"slice-{number}"
        self.sshds: list[subprocess.Popen] = []
        self.cluster_ports = free_ports(hosts)
        self.devices_per_host = devices_per_host

    def home(self, worker: int) -> Path:
        return self.root / f"worker-{worker}"

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

    def start(self, connections_log: Path) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        self.authorized_keys.touch()
        subprocess.run(
            ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(self.host_key)],
            check=True,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            timeout=30,
        )
        stubs = self._write_stubs()
        if os.geteuid() == 0:
            Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # privilege separation
        for w in range(self.hosts):
            self.home(w).mkdir(parents=True, exist_ok=True)
            env = {
                "HOME": str(self.home(w)),
                "PATH": f"{stubs}:{os.environ.get('PATH', '/usr/bin:/bin')}",
                "SYNANN_WORKER_ID": str(w),
                "LANG": "C.UTF-8",
                MARKER: str(self.home(w)),
                **cluster_env(w, self.cluster_ports, self.devices_per_host),
            }
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
            internal = f"127.0.1.{10 + w}"
            external = f"127.0.0.{10 + w}"
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

    def _wait_listening(self, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        for w in range(self.hosts):
            while True:
                if self.sshds[w].poll() is not None:
                    log = (self.dir / f"sshd-{w}.log").read_text()[-500:]
                    raise OSError(f"sshd for worker {w} exited: {log}")
                try:
                    with socket.create_connection(
                        (f"127.0.0.{10 + w}", self.port), 0.5
                    ):
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

    def signal_all(self, sig: int) -> int:
        """Send `sig` to every process on every worker (not the sshds)."""
        return sum(kill_processes(self.home(w), sig) for w in range(self.hosts))

    def stop(self, remove_homes: bool = True) -> None:
        """The machines are gone: sshds and every worker process end."""
        for sshd in self.sshds:
            for pid in [*descendants(sshd.pid), sshd.pid]:
                try:
                    os.kill(pid, signal.SIGKILL)
                except OSError:
                    pass
            try:
                sshd.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
        self.sshds = []
        for w in range(self.hosts):
            kill_processes(self.home(w))
            if remove_homes:
                shutil.rmtree(self.home(w), ignore_errors=True)
