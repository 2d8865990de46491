"""Rehearse a submission with the real gcloud, ssh and scp, on this machine.

`submit --rehearse` (cloud/tpu.py) runs the submission's own plan with the
Google Cloud CLI installed here (`gcloud`), pointed at a loopback TPU API
(cloud/rehearsal/api.py) and, once a node is READY, one OpenSSH sshd per worker
on loopback (cloud/rehearsal/workers.py). gcloud runs with its own empty
configuration (CLOUDSDK_CONFIG), HOME and ssh key, an access token read from a
file, and an ssh-agent that holds another key (as on many desktops); every
ssh and scp it starts gets `-o Port=...` for the workers' sshd port.

Faults (`--rehearse-fault NAME`, see FAULTS) are injected through the API and
the sshds, never by changing gcloud. Everything started here stops in
`close()`: the API, the sshds, every worker process and the agent.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from pathlib import Path

from cloud import checks
from cloud.gcloud import REMOTE_DIR
from cloud.rehearsal import workers as machines
from cloud.rehearsal.api import Hooks, LoopbackTPU

PROJECT = "rehearsal-project"
#: What each fault does (docs/cloud-tpu.md tells what the submitter then does).
FAULTS = {
    "hang-worker": "once training started, the last worker's network goes "
    "silent: its sshd stops answering, connections stay open",
    "preempt-sigterm": "once epoch K's checkpoint is complete (K from "
    "--rehearse-preempt-after-epoch, default 1), every worker process gets "
    "SIGTERM; PREEMPT_NOTICE_S later the node is PREEMPTED, its queued resource "
    "SUSPENDED and its machines gone (once per rehearsal)",
    "no-capacity": "the queued resource waits for resources, then goes FAILED "
    "(its valid-until time passed) without ever being ACTIVE",
    "key-race": "gcloud has no ssh key yet: the first gcloud ssh/scp calls create it",
}
PREEMPT_NOTICE_S = 5.0  # SIGTERM to PREEMPTED (tens of seconds on Compute Engine)
NO_CAPACITY_AFTER_S = 3.0
WATCH_S = 0.3


def missing() -> str | None:
    """One line naming what to install for a rehearsal, or None."""
    if shutil.which("gcloud") is None:
        return (
            "the rehearsal runs the real gcloud: install the Google Cloud CLI "
            "(Debian/Ubuntu: apt-get install google-cloud-cli)"
        )
    return machines.missing_programs()


class Rehearsal:
    """The loopback API, the workers' sshds and gcloud's environment."""

    def __init__(
        self,
        root: str | Path,
        faults: tuple[str, ...] = (),
        preempt_after_epoch: int | None = None,
        checkpoint_dir: str | None = None,
    ):
        self.root = Path(root).resolve()
        self.faults = set(faults)
        if preempt_after_epoch is not None:
            self.faults.add("preempt-sigterm")
        self.preempt_after_epoch = preempt_after_epoch or 1
        self.checkpoint_dir = checkpoint_dir
        self.slices: dict[int, machines.Workers] = {}
        self.api: LoopbackTPU | None = None
        self.agent: subprocess.Popen | None = None
        self.agent_dir: Path | None = None
        self.watcher: threading.Thread | None = None
        self.stopping = threading.Event()
        self.preempted = False
        self.events: list[str] = []
        self.home = self.root / "gcloud-home"
        self.port = 0

    # -- start and stop ------------------------------------------------------------
    def start(self) -> Rehearsal:
        why = missing()
        if why:
            raise ValueError(why)
        unknown = self.faults - set(FAULTS)
        if unknown:
            raise ValueError(
                f"--rehearse-fault {sorted(unknown)[0]!r} is not known; use one of "
                + ", ".join(FAULTS)
            )
        self.root.mkdir(parents=True, exist_ok=True)
        (self.home / ".ssh").mkdir(parents=True, exist_ok=True, mode=0o700)
        (self.root / "cloudsdk").mkdir(exist_ok=True)
        (self.root / "token").write_text("rehearsal-access-token\n")
        if "key-race" not in self.faults:  # a user who has run gcloud before
            self._keygen(self.home / ".ssh" / "google_compute_engine")
        self._start_agent()
        hosts = [f"127.0.{net}.{10 + w}" for net in (0, 1) for w in range(8)]
        self.port = machines.free_ports(1, tuple(hosts))[0]
        hooks = Hooks(self._ready, self._gone, self._keys, self._host_key)
        self.api = LoopbackTPU(
            self.root / "requests.jsonl",
            lambda t: checks.accelerator(t).hosts,
            hooks,
            no_capacity_after_s=NO_CAPACITY_AFTER_S
            if "no-capacity" in self.faults
            else None,
        )
        self.api.serve()
        self.watcher = threading.Thread(target=self._watch, daemon=True)
        self.watcher.start()
        return self

    def close(self) -> None:
        self.stopping.set()
        if self.watcher:
            self.watcher.join(timeout=5)
        if self.api:
            self.api.close()  # deletes what is left: sshds and processes end
        for w in list(self.slices.values()):
            w.stop()
        self.slices.clear()
        if self.agent and self.agent.poll() is None:
            self.agent.kill()
            self.agent.wait(timeout=10)
        if self.agent_dir:
            shutil.rmtree(self.agent_dir, ignore_errors=True)

    def __enter__(self) -> Rehearsal:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    def _keygen(self, path: Path) -> None:
        subprocess.run(
            [
                "ssh-keygen",
                "-q",
                "-t",
                "rsa",
                "-N",
                "",
                "-f",
                str(path),
                "-C",
                "rehearsal",
            ],
            check=True,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            timeout=60,
        )

    def _start_agent(self) -> None:
        """An ssh-agent holding one other key, not gcloud's."""
        # A short path: a unix socket's path is limited to 107 bytes.
        self.agent_dir = Path(tempfile.mkdtemp(prefix="synann-agent-"))
        sock = self.agent_dir / "agent.sock"
        self.agent = subprocess.Popen(
            ["ssh-agent", "-D", "-a", str(sock)],
            env={**os.environ, machines.MARKER: str(self.root / "agent")},
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        deadline = time.monotonic() + 10
        while not sock.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        other = self.root / "other_key"
        if not other.exists():
            self._keygen(other)
        subprocess.run(
            ["ssh-add", "-q", str(other)],
            env={**os.environ, "SSH_AUTH_SOCK": str(sock)},
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            timeout=30,
        )

    # -- what gcloud sees ------------------------------------------------------------
    def env(self) -> dict[str, str]:
        """gcloud's environment: its own config, project, token and endpoints."""
        base = f"http://127.0.0.1:{self.api.port}/"
        keep = {k: v for k, v in os.environ.items() if not k.startswith("CLOUDSDK_")}
        # gcloud runs on the system's Python, not a virtual environment first
        # on PATH (tox's), unless CLOUDSDK_PYTHON says otherwise.
        python = os.environ.get("CLOUDSDK_PYTHON") or (
            "/usr/bin/python3" if Path("/usr/bin/python3").is_file() else ""
        )
        keep.update({"CLOUDSDK_PYTHON": python} if python else {})
        return {
            **keep,
            "HOME": str(self.home),
            "CLOUDSDK_CONFIG": str(self.root / "cloudsdk"),
            "CLOUDSDK_CORE_PROJECT": PROJECT,
            "CLOUDSDK_AUTH_ACCESS_TOKEN_FILE": str(self.root / "token"),
            "CLOUDSDK_API_ENDPOINT_OVERRIDES_TPU": base,
            "CLOUDSDK_API_ENDPOINT_OVERRIDES_COMPUTE": f"{base}compute/v1/",
            "CLOUDSDK_CORE_DISABLE_PROMPTS": "1",
            "CLOUDSDK_COMPONENT_MANAGER_DISABLE_UPDATE_CHECK": "1",
            "SSH_AUTH_SOCK": str(self.agent_dir / "agent.sock"),
        }

    def ssh_options(self) -> tuple[str, ...]:
        """The options every rehearsal ssh/scp adds: the workers' port."""
        return (f"Port={self.port}",)

    # -- the API's hooks ---------------------------------------------------------------
    def _ready(self, s) -> None:
        acc = checks.accelerator(s.node_spec.get("acceleratorType", ""))
        w = machines.Workers(
            self.root, s.number, s.hosts, acc.devices_per_host, self.port
        )
        self.slices[s.number] = w
        w.start(self.root / "connections.log")
        w.write_keys(s.metadata.get("ssh-keys", ""))
        self.events.append(f"slice {s.number} READY")

    def _gone(self, s) -> None:
        w = self.slices.pop(s.number, None)
        if w:
            w.stop()
            self.events.append(f"slice {s.number} gone")

    def _keys(self, s) -> None:
        w = self.slices.get(s.number)
        if w:
            w.write_keys(s.metadata.get("ssh-keys", ""))

    def _host_key(self, s, worker: int) -> str:
        w = self.slices.get(s.number)
        return w.public_host_key() if w else ""

    # -- faults ----------------------------------------------------------------------
    def _watch(self) -> None:
        frozen: set[int] = set()
        completed = None
        while not self.stopping.wait(WATCH_S):
            with self.api.lock:
                current = list(self.slices.items())
            for number, w in current:
                last = w.hosts - 1
                started = (w.home(last) / REMOTE_DIR / "run" / "pid").is_file()
                if "hang-worker" in self.faults and started and number not in frozen:
                    frozen.add(number)
                    w.freeze(last)
                    self.events.append(f"worker {last} frozen")
                if "preempt-sigterm" in self.faults and not self.preempted:
                    completed = completed or _completed_epochs(w.home(0))
                    directory = self.checkpoint_dir
                    if completed and directory:
                        done = max(completed(directory), default=0)
                    else:
                        done = 0 if directory else None
                    if done is None and started:
                        done = self.preempt_after_epoch  # no checkpoints: at start
                    if done is not None and done >= self.preempt_after_epoch:
                        self._preempt(number, w)

    def _preempt(self, number: int, w: machines.Workers) -> None:
        self.preempted = True
        w.signal_all(signal.SIGTERM)
        self.events.append(f"slice {number}: SIGTERM to every worker")
        if self.stopping.wait(PREEMPT_NOTICE_S):
            return
        name = next(
            (s.name for s in self.api.slices.values() if s.number == number), None
        )
        if name:
            self.api.preempt(name)
            self.events.append(f"slice {number} PREEMPTED")


def _completed_epochs(home: Path):
    """completed_epochs from the workers' own training/checkpoints.py (the code
    that writes the checkpoints decides when one is complete), or None."""
    path = home / REMOTE_DIR / "src" / "training" / "checkpoints.py"
    if not path.is_file():
        return None
    spec = importlib.util.spec_from_file_location("_rehearsal_checkpoints", path)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except Exception:  # noqa: BLE001 (a broken tree: no preemption)
        return None
    return getattr(module, "completed_epochs", None)
