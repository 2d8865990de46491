"""The rehearsal cloud as one object: the API server (TPU, Cloud Storage,
Resource Manager's permission check, the Compute Engine call gcloud's ssh
makes, and the rehearsal's own fault endpoint), a metadata server and an
sshd per worker of each READY slice, gcloud's configuration and an
ssh-agent, and the faults. Besides requests.jsonl, events.jsonl records
what happened to each slice and when (READY, a fault, gone). `python -m cloud.rehearsal serve` runs one until
SIGTERM; `close()` ends everything it started.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from pathlib import Path

from cloud import checks
from cloud.gcloud import REMOTE_DIR
from cloud.rehearsal import workers as machines
from cloud.rehearsal.api import Clock, Hooks, TpuApi
from cloud.rehearsal.metadata import MetadataServer, worker_token
from cloud.rehearsal.server import Answer, Journal, Request, Server, json_answer
from cloud.rehearsal.storage import Storage

PROJECT = "rehearsal-project"
CLIENT_TOKEN = "rehearsal-access-token"
#: Faults, each for every slice (`serve --fault`) or for one slice by name
#: (POST /rehearsal/v1/faults {"name": N, "faults": [...]}).
FAULTS = {
    "hang-worker": "once training started, the last worker's network goes "
    "silent: its sshd stops answering, connections stay open",
    "preempt-sigterm": "once epoch K's checkpoint is complete (K from "
    "--preempt-after-epoch, default 1), every worker process gets SIGTERM and "
    "the metadata says instance/preempted TRUE; PREEMPT_NOTICE_S later the "
    "node is PREEMPTED, its queued resource SUSPENDED and its machines gone",
    "no-capacity": "the queued resource waits for resources and goes FAILED "
    "when its valid-until time passes, never ACTIVE",
    "maintenance": "once training started, a maintenance event: the node is "
    "REPAIRING (health UNHEALTHY_MAINTENANCE, an ONGOING upcomingMaintenance) "
    "and its VMs restart; READY again after Clock.repair_s",
    "kill-worker-0": "once training started and no ssh session to worker 0 is "
    "open (a detached run), worker 0's VM dies: its sshd and every process on "
    "it end; the node stays READY",
    "no-gcloud": "the workers' image has no gcloud",
    "no-permission": "the workers' service account may not delete its slice",
    "key-race": "gcloud has no ssh key yet (serve only): its first ssh/scp "
    "calls create it",
}
#: Faults of every slice (serve --fault) that strike once per rehearsal (so
#: that --retries can succeed); a fault injected for a name strikes once.
ONCE = {"preempt-sigterm", "maintenance", "kill-worker-0"}
PREEMPT_NOTICE_S = 5.0  # SIGTERM to PREEMPTED (tens of seconds on Compute Engine)
WATCH_S = 0.2


def missing() -> str | None:
    """One line naming what to install for a rehearsal, or None."""
    if shutil.which("gcloud") is None:
        return (
            "the rehearsal runs the real gcloud: install the Google Cloud CLI "
            "(Debian/Ubuntu: apt-get install google-cloud-cli)"
        )
    return machines.missing_programs()


class _ApiServer(Server):
    def __init__(self, journal: Journal, cloud: Cloud):
        super().__init__(journal)
        self.cloud = cloud

    def who(self, request: Request) -> dict:
        if request.path.startswith("/rehearsal/"):
            return {"from": "control"}
        token = request.token
        if token.startswith("rehearsal-token-"):
            number, worker = token.removeprefix("rehearsal-token-").split("-")
            name = self.cloud.names.get(int(number), "?")
            return {"from": f"worker-{worker}", "slice": name}
        return {"from": "client" if token == CLIENT_TOKEN else "unknown"}

    def answer(self, request: Request):
        return self.cloud.answer(request)


class Cloud:
    """Everything a rehearsal runs, rooted at the directory `root`."""

    def __init__(
        self,
        root: str | Path,
        faults=(),
        preempt_after_epoch: int | None = None,
        checkpoint_dir: str | None = None,
        clock: Clock | None = None,
    ):
        self.root = Path(root).resolve()
        self.faults: dict[str, set[str]] = {"*": set(faults)}
        self.preempt_after_epoch = preempt_after_epoch or 1
        self.checkpoint_dir = checkpoint_dir
        self.clock = clock or Clock()
        self.journal = Journal(self.root / "requests.jsonl")
        self.api = TpuApi(
            lambda t: checks.accelerator(t).hosts,
            Hooks(self._ready, self._gone, self._keys, self._host_key),
            self.clock,
        )
        if "no-capacity" in self.faults["*"]:
            self.api.no_capacity.add("*")
        self.storage = Storage(self.root / "gcs")
        self.server: _ApiServer | None = None
        self.machines: dict[int, machines.Workers] = {}
        self.metadata: dict[int, list[MetadataServer]] = {}
        self.names: dict[int, str] = {}
        self.done: dict[int, set[str]] = {}  # faults applied, per slice
        self.spent: set[tuple[str, str]] = set()  # (name or "*", fault): once
        self.agent: subprocess.Popen | None = None
        self.agent_dir: Path | None = None
        self.stopping = threading.Event()
        self.thread: threading.Thread | None = None
        self.home = self.root / "gcloud-home"
        self.reserved: socket.socket | None = None
        self.ssh_port = 0
        self.events = self.root / "events.jsonl"

    # -- start and stop ----------------------------------------------------------------
    def start(self) -> Cloud:
        why = missing()
        if why:
            raise ValueError(why)
        unknown = set().union(*self.faults.values()) - set(FAULTS)
        if unknown:
            raise ValueError(
                f"fault {sorted(unknown)[0]!r} is not known; use one of "
                + ", ".join(FAULTS)
            )
        self.root.mkdir(parents=True, exist_ok=True)
        # A cloud starts empty: what an earlier one here left goes.
        left = [*self.root.glob("slice-*"), self.storage.root, self.root / "env.sh"]
        for old in [*left, self.journal.path, self.events]:
            shutil.rmtree(old) if old.is_dir() else old.unlink(missing_ok=True)
        (self.home / ".ssh").mkdir(parents=True, exist_ok=True, mode=0o700)
        (self.root / "cloudsdk").mkdir(exist_ok=True)
        (self.root / "token").write_text(CLIENT_TOKEN + "\n")
        key = self.home / ".ssh" / "google_compute_engine"
        if "key-race" not in self.faults["*"] and not key.exists():
            _keygen(key)  # a user who has run gcloud before
        self._start_agent()
        # Held for the rehearsal's life: no other process gets this port on
        # 127.0.0.1 (so no other rehearsal's sshds use it); the sshds listen
        # on the slices' own addresses.
        self.reserved = socket.socket()
        self.reserved.bind(("127.0.0.1", 0))
        self.ssh_port = self.reserved.getsockname()[1]
        self.server = _ApiServer(self.journal, self).start()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        self.write_env()
        return self

    def close(self) -> None:
        (self.root / "env.sh").unlink(missing_ok=True)  # nothing answers there now
        self.stopping.set()
        if self.thread:
            self.thread.join(timeout=10)
        self.api.delete_all()  # every slice's machines stop
        for number in list(self.machines):
            self._stop_machines(number, remove=True)
        if self.server:
            self.server.close()
        if self.agent and self.agent.poll() is None:
            self.agent.kill()
            self.agent.wait(timeout=10)
        if self.agent_dir:
            shutil.rmtree(self.agent_dir, ignore_errors=True)
        if self.reserved:
            self.reserved.close()

    def __enter__(self) -> Cloud:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

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
            _keygen(other, "ed25519")
        subprocess.run(
            ["ssh-add", "-q", str(other)],
            env={**os.environ, "SSH_AUTH_SOCK": str(sock)},
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            timeout=30,
        )

    # -- what gcloud sees ----------------------------------------------------------------
    @property
    def base(self) -> str:
        return f"http://{self.server.address}/"

    def endpoints(self) -> dict[str, str]:
        """gcloud's endpoint variables, for the client and for the workers."""
        return {
            "CLOUDSDK_API_ENDPOINT_OVERRIDES_TPU": self.base,
            "CLOUDSDK_API_ENDPOINT_OVERRIDES_COMPUTE": f"{self.base}compute/v1/",
            "CLOUDSDK_API_ENDPOINT_OVERRIDES_STORAGE": self.base,
            "CLOUDSDK_API_ENDPOINT_OVERRIDES_CLOUDRESOURCEMANAGER": self.base,
            "CLOUDSDK_CORE_DISABLE_PROMPTS": "1",
            "CLOUDSDK_COMPONENT_MANAGER_DISABLE_UPDATE_CHECK": "1",
            **_gcloud_python(),
        }

    def env(self) -> dict[str, str]:
        """gcloud's environment: its own config, project, token and endpoints
        (what env.sh exports)."""
        return {
            "HOME": str(self.home),
            "CLOUDSDK_CONFIG": str(self.root / "cloudsdk"),
            "CLOUDSDK_CORE_PROJECT": PROJECT,
            "CLOUDSDK_AUTH_ACCESS_TOKEN_FILE": str(self.root / "token"),
            **self.endpoints(),
            "SSH_AUTH_SOCK": str(self.agent_dir / "agent.sock"),
            "REHEARSAL_SSH_PORT": str(self.ssh_port),
            "REHEARSAL_PID": str(os.getpid()),
        }

    def write_env(self) -> None:
        lines = [
            "# the rehearsal cloud's gcloud environment (python -m cloud.rehearsal)"
        ]
        lines += [f"export {k}={shlex.quote(v)}" for k, v in self.env().items()]
        partial = self.root / "env.sh.partial"
        partial.write_text("\n".join(lines) + "\n")
        partial.replace(self.root / "env.sh")

    # -- requests ---------------------------------------------------------------------------
    def answer(self, request: Request):
        parts = request.path.strip("/").split("/")
        if self.storage.handles(request.path):
            return self.storage.answer(request, self.base)
        if parts[:2] == ["compute", "v1"] and parts[2:3] == ["projects"]:
            return json_answer(
                {
                    "name": parts[3],
                    "commonInstanceMetadata": {"kind": "compute#metadata", "items": []},
                }
            )
        if parts[:2] == ["v1", "projects"] and request.path.endswith(
            ":testIamPermissions"
        ):
            asked = (request.json() or {}).get("permissions", [])
            who = self.server.who(request)
            denied = "no-permission" in self._faults_of(who.get("slice", ""))
            return json_answer({"permissions": [] if denied else asked})
        if parts[:3] == ["rehearsal", "v1", "faults"] and request.method == "POST":
            body = request.json() or {}
            faults = set(body.get("faults", []))
            if not faults <= set(FAULTS) - {"key-race"} or not body.get("name"):
                raise Answer(400, "INVALID_ARGUMENT", f"faults: {sorted(FAULTS)}")
            with self.api.lock:
                self.faults.setdefault(body["name"], set()).update(faults)
                if "no-capacity" in faults:
                    self.api.no_capacity.add(body["name"])
            return json_answer({"name": body["name"], "faults": sorted(faults)})
        if parts[0] in ("v2", "v2alpha1"):
            return self.api.answer(request)
        raise Answer(404, "NOT_FOUND", f"no such API: {request.method} {request.path}")

    def _faults_of(self, name: str) -> set[str]:
        return self.faults["*"] | self.faults.get(name, set())

    # -- the machines ---------------------------------------------------------------------------
    def _ready(self, s) -> None:
        self.names[s.number] = s.name
        faults = self._faults_of(s.name)
        w = self.machines.get(s.number)
        if w is None:
            acc = checks.accelerator(s.node_spec.get("acceleratorType", ""))
            w = machines.Workers(
                self.root,
                s,
                acc.devices_per_host,
                self.ssh_port,
                lambda worker, s=s: self._worker_env(s, worker),
            )
            if "no-gcloud" in faults:
                w.without_gcloud()
            self.machines[s.number] = w
            self.metadata[s.number] = [
                MetadataServer(self.journal, s, i).start() for i in range(s.hosts)
            ]
        w.start(w.dir / "connections.log")
        (w.dir / "name").write_text(s.name)
        w.write_keys(s.metadata.get("ssh-keys", ""))
        self._event(s, "READY")
        if s.metadata.get("startup-script"):
            w.run_startup_scripts(s.metadata["startup-script"])

    def _event(self, s, what: str) -> None:
        """events.jsonl: what happened to which slice, when (the faults too)."""
        entry = {
            "time": time.time(),
            "slice": s.name,
            "number": s.number,
            "event": what,
        }
        with self.journal.lock, self.events.open("a") as f:
            f.write(json.dumps(entry) + "\n")

    def _worker_env(self, s, worker: int) -> dict[str, str]:
        servers = self.metadata.get(s.number, [])
        root = servers[worker].address if worker < len(servers) else ""
        return {"GCE_METADATA_ROOT": root, **self.endpoints()}

    def _gone(self, s) -> None:
        restarting = s.node_state == "REPAIRING"
        self._stop_machines(s.number, remove=not restarting)
        self._event(s, s.node_state)

    def _stop_machines(self, number: int, remove: bool) -> None:
        w = self.machines.get(number)
        if w is None:
            return
        w.stop(remove_homes=remove)
        if remove:
            del self.machines[number]
            for server in self.metadata.pop(number, []):
                server.close()

    def _keys(self, s) -> None:
        w = self.machines.get(s.number)
        if w:
            w.write_keys(s.metadata.get("ssh-keys", ""))

    def _host_key(self, s, worker: int) -> str:
        w = self.machines.get(s.number)
        return w.public_host_key() if w else ""

    # -- the clock and the faults ------------------------------------------------------------------
    def _run(self) -> None:
        while not self.stopping.wait(WATCH_S):
            self.api.tick()
            with self.api.lock:
                current = [
                    (s, self.machines.get(s.number)) for s in self.api.slices.values()
                ]
            for s, w in current:
                if w is not None and s.node_state == "READY":
                    self._apply_faults(s, w)

    def _apply_faults(self, s, w: machines.Workers) -> None:
        faults = self._faults_of(s.name) - self.done.setdefault(s.number, set())
        faults -= {f for key, f in self.spent if key in (s.name, "*")}
        started = [
            (w.home(i) / REMOTE_DIR / "run" / "pid").is_file() for i in range(w.hosts)
        ]
        if not all(started):
            return
        for fault in sorted(faults):
            if fault == "hang-worker":
                w.freeze(w.hosts - 1)
            elif fault == "kill-worker-0":
                if w.connected(0):
                    continue
                w.kill_worker(0)
            elif fault == "maintenance":
                self.api.repair(s.name)
            elif fault == "preempt-sigterm":
                if not self._epoch_done(w):
                    continue
                threading.Thread(target=self._preempt, args=(s, w), daemon=True).start()
            else:
                continue  # not a fault of a running slice
            self.done[s.number].add(fault)
            # Once: a slice that replaces this one (--retries) is spared.
            if fault in self.faults.get(s.name, set()):
                self.spent.add((s.name, fault))
            elif fault in ONCE:
                self.spent.add(("*", fault))
            self._event(s, fault)

    def _epoch_done(self, w: machines.Workers) -> bool:
        """Whether the checkpoint of epoch K is complete (no --checkpoint-dir:
        at once), read with the workers' own training/checkpoints.py."""
        if not self.checkpoint_dir:
            return True
        completed = _completed_epochs(w.home(0))
        if completed is None:
            return False
        return (
            max(completed(self.checkpoint_dir), default=0) >= self.preempt_after_epoch
        )

    def _preempt(self, s, w: machines.Workers) -> None:
        s.preempted = True
        w.signal_all(signal.SIGTERM)
        if not self.stopping.wait(PREEMPT_NOTICE_S):
            self.api.preempt(s.name)


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


def _gcloud_python() -> dict[str, str]:
    """gcloud runs on the system's Python, not a virtual environment first on
    PATH (tox's), unless CLOUDSDK_PYTHON says otherwise."""
    python = os.environ.get("CLOUDSDK_PYTHON") or (
        "/usr/bin/python3" if Path("/usr/bin/python3").is_file() else ""
    )
    return {"CLOUDSDK_PYTHON": python} if python else {}


def _keygen(path: Path, kind: str = "rsa") -> None:
    subprocess.run(
        [
            "ssh-keygen",
            "-q",
            "-t",
            kind,
            *(["-b", "2048"] if kind == "rsa" else []),
            "-N",
            "",
            "-f",
            str(path),
            "-C",
            "rehearsal",
        ],  # fmt: skip
        check=True,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        timeout=60,
    )


__all__ = ["Cloud", "FAULTS", "missing", "worker_token"]
