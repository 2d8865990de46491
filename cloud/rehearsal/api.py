"""A loopback Cloud TPU v2 API (and the one Compute Engine call gcloud's ssh
makes) that the real gcloud talks to in a rehearsal.

gcloud reaches it through CLOUDSDK_API_ENDPOINT_OVERRIDES_TPU and
CLOUDSDK_API_ENDPOINT_OVERRIDES_COMPUTE (cloud/rehearsal/__init__.py sets
them). It serves what the submitter's gcloud commands touch:

    POST   /v2/projects/P/locations/Z/queuedResources?queuedResourceId=N
    GET    /v2/projects/P/locations/Z/queuedResources[/N]
    DELETE /v2/projects/P/locations/Z/queuedResources/N?force=true
    POST   /v2/projects/P/locations/Z/nodes?nodeId=N        (tpu-vm create)
    GET    /v2/projects/P/locations/Z/nodes[/N]
    PATCH  /v2/projects/P/locations/Z/nodes/N?updateMask=metadata  (ssh keys)
    POST   /v2/projects/P/locations/Z/nodes/N:getGuestAttributes   (host keys)
    DELETE /v2/projects/P/locations/Z/nodes/N
    GET    /v2/projects/P/locations/Z/operations/OP
    GET    /compute/v1/projects/P                             (OS Login check)

with the fields of the real API: QueuedResource `state.state` and
`failedData.error`, Node `state`, `health`, `apiVersion`, `metadata` and
`networkEndpoints[].ipAddress` / `.accessConfig.externalIp`. Long-running
operations finish at once. A queued resource waits for resources for
`provision_s`, then is ACTIVE with a READY node; a node's workers (the sshds,
cloud/rehearsal/workers.py) start when it is READY and stop when it is deleted
or preempted, through the `Hooks` given. Every request is recorded, in order,
in `requests` and in the file `log_path` (one JSON object a line), for tests to
assert on what gcloud sent.

Errors are answered as Google APIs answer them ({"error": {"code", "message",
"status"}}), so gcloud prints them as it would.
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

#: The message a queued resource's failedData carries when its valid-until
#: time passed before capacity was found (the wording is this rehearsal's).
NO_CAPACITY_MESSAGE = (
    "There is no more capacity in the zone; the request expired at its "
    "valid-until time before it could be provisioned"
)


@dataclass
class Hooks:
    """What happens to a node's machines: `ready(slice)` when it becomes
    READY, `gone(slice)` when it is deleted or stops, `keys(slice)` when its
    ssh-keys metadata changed; `host_key(slice, worker)`: the worker's
    ed25519 host key (the guest attribute gcloud reads), or ""."""

    ready: object = lambda s: None
    gone: object = lambda s: None
    keys: object = lambda s: None
    host_key: object = lambda s, w: ""


@dataclass
class Slice:
    """One node, and the queued resource that asked for it (if any)."""

    name: str
    project: str
    zone: str
    node_spec: dict
    queued: bool
    number: int
    hosts: int
    created: float = field(default_factory=time.monotonic)
    qr_state: str = "WAITING_FOR_RESOURCES"
    node_state: str = "CREATING"
    failed_message: str | None = None
    metadata: dict = field(default_factory=dict)
    ever_active: bool = False

    @property
    def where(self) -> str:
        return f"projects/{self.project}/locations/{self.zone}"

    def endpoint(self, worker: int) -> tuple[str, str]:
        """(internal, external) loopback addresses of worker `worker`."""
        return f"127.0.1.{10 + worker}", f"127.0.0.{10 + worker}"

    def node(self) -> dict:
        spec = self.node_spec
        return {
            "name": f"{self.where}/nodes/{self.name}",
            "id": str(7000000000 + self.number),
            "acceleratorType": spec.get("acceleratorType", ""),
            "runtimeVersion": spec.get("runtimeVersion", ""),
            "state": self.node_state,
            "health": "HEALTHY" if self.node_state == "READY" else "HEALTH_UNSPECIFIED",
            "apiVersion": "V2",
            "schedulingConfig": spec.get("schedulingConfig", {}),
            "serviceAccount": spec.get("serviceAccount", {}),
            "metadata": dict(self.metadata),
            "networkEndpoints": [
                {
                    "ipAddress": internal,
                    "port": 8470,
                    "accessConfig": {"externalIp": external},
                }
                for internal, external in map(self.endpoint, range(self.hosts))
            ]
            if self.node_state not in ("CREATING",)
            else [],
        }

    def queued_resource(self) -> dict:
        qr = {
            "name": f"{self.where}/queuedResources/{self.name}",
            "state": {"state": self.qr_state},
            "tpu": {
                "nodeSpec": [
                    {
                        "parent": self.where,
                        "nodeId": self.name,
                        "node": self.node_spec,
                    }
                ]
            },
        }
        if self.failed_message:
            qr["state"]["failedData"] = {
                "error": {"code": 8, "message": self.failed_message}
            }
        return qr


class _ApiError(Exception):
    def __init__(self, code: int, status: str, message: str):
        super().__init__(message)
        self.code, self.status = code, status


class LoopbackTPU(ThreadingHTTPServer):
    """The server; `serve()` runs it on a thread, `close()` stops it."""

    daemon_threads = True

    def __init__(
        self,
        log_path: Path,
        hosts_of: object,
        hooks: Hooks | None = None,
        provision_s: float = 0.5,
        no_capacity_after_s: float | None = None,
    ):
        """`hosts_of(accelerator_type)`: the workers of a slice of that type.
        `no_capacity_after_s`: queued resources never get capacity and FAIL
        after this long (the no-capacity fault)."""
        super().__init__(("127.0.0.1", 0), _Handler)
        self.log_path = Path(log_path)
        self.hosts_of = hosts_of
        self.hooks = hooks or Hooks()
        self.provision_s = provision_s
        self.no_capacity_after_s = no_capacity_after_s
        self.requests: list[dict] = []
        self.slices: dict[str, Slice] = {}
        self.lock = threading.RLock()
        self.operations = 0
        self.done_operations: dict[str, dict] = {}
        self.created = 0
        self.thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        return self.server_address[1]

    def serve(self) -> None:
        self.thread = threading.Thread(
            target=self.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True
        )
        self.thread.start()

    def close(self) -> None:
        """Stop serving; every slice still there is deleted (its machines stop)."""
        self.shutdown()
        self.server_close()
        with self.lock:
            for s in list(self.slices.values()):
                self._delete(s)

    # -- the state machine -------------------------------------------------------
    def tick(self) -> None:
        """Advance every slice's state by the time passed."""
        with self.lock:
            for s in self.slices.values():
                age = time.monotonic() - s.created
                if s.qr_state != "WAITING_FOR_RESOURCES":
                    continue
                limit = self.no_capacity_after_s
                if limit is not None and s.queued:
                    if age >= limit:
                        s.qr_state, s.node_state = "FAILED", "STATE_UNSPECIFIED"
                        s.failed_message = NO_CAPACITY_MESSAGE
                    continue
                if age >= self.provision_s:
                    s.qr_state, s.node_state = "ACTIVE", "READY"
                    s.ever_active = True
                    self.hooks.ready(s)

    def preempt(self, name: str) -> None:
        """The node stops as a preempted spot VM does: PREEMPTED, its queued
        resource SUSPENDED, its machines gone."""
        with self.lock:
            s = self.slices.get(name)
            if s is None:
                return
            s.node_state, s.qr_state = "PREEMPTED", "SUSPENDED"
            self.hooks.gone(s)

    def _delete(self, s: Slice) -> None:
        self.slices.pop(s.name, None)
        self.hooks.gone(s)

    def _operation(self, s_where: str, response: dict | None) -> dict:
        self.operations += 1
        op = {
            "name": f"{s_where}/operations/operation-{self.operations}",
            "done": True,
            "metadata": {
                "@type": "type.googleapis.com/google.cloud.tpu.v2.OperationMetadata"
            },
        }
        if response is not None:
            op["response"] = (
                {"@type": "type.googleapis.com/google.cloud.tpu.v2.Node", **response}
                if "nodes/" in response.get("name", "")
                else response
            )
        self.done_operations[op["name"]] = op
        return op

    def _slice(self, name: str) -> Slice:
        s = self.slices.get(name)
        if s is None:
            raise _ApiError(404, "NOT_FOUND", f"Resource '{name}' was not found")
        return s

    def _create(self, where: str, name: str, node: dict, queued: bool) -> Slice:
        if name in self.slices:
            raise _ApiError(409, "ALREADY_EXISTS", f"Resource '{name}' already exists")
        project, zone = where.split("/")[1], where.split("/")[3]
        hosts = self.hosts_of(node.get("acceleratorType", ""))
        self.created += 1
        s = Slice(name, project, zone, node, queued, self.created, hosts)
        s.metadata = dict(node.get("metadata", {}))
        self.slices[name] = s
        return s

    def handle_api(self, method: str, path: str, query: dict, body) -> dict:
        """The answer to one request (raises _ApiError)."""
        self.tick()
        parts = path.strip("/").split("/")
        if parts[:2] == ["compute", "v1"] and parts[2:3] == ["projects"]:
            return {
                "name": parts[3],
                "commonInstanceMetadata": {"kind": "compute#metadata", "items": []},
            }
        if parts[0] != "v2" or len(parts) < 6 or parts[1] != "projects":
            raise _ApiError(404, "NOT_FOUND", f"no such API: {method} {path}")
        where = "/".join(parts[1:5])
        kind, rest = parts[5], parts[6:]
        with self.lock:
            if kind == "operations" and method == "GET" and rest:
                name = f"{where}/operations/{rest[0]}"
                return self.done_operations.get(name, {"name": name, "done": True})
            if kind == "queuedResources":
                return self._queued(method, where, rest, query, body)
            if kind == "nodes":
                return self._nodes(method, where, rest, query, body)
        raise _ApiError(404, "NOT_FOUND", f"no such API: {method} {path}")

    def _queued(self, method, where, rest, query, body) -> dict:
        if method == "POST" and not rest:
            name = query.get("queuedResourceId", [""])[0]
            specs = (body or {}).get("tpu", {}).get("nodeSpec", [])
            if len(specs) != 1:
                raise _ApiError(400, "INVALID_ARGUMENT", "one nodeSpec expected")
            s = self._create(where, name, specs[0].get("node", {}), queued=True)
            s.qr_state = "WAITING_FOR_RESOURCES"
            return self._operation(where, s.queued_resource())
        if method == "GET" and not rest:
            return {
                "queuedResources": [
                    s.queued_resource() for s in self.slices.values() if s.queued
                ]
            }
        s = self._slice(rest[0])
        if not s.queued:
            raise _ApiError(404, "NOT_FOUND", f"Resource '{rest[0]}' was not found")
        if method == "GET":
            return s.queued_resource()
        if method == "DELETE":
            force = query.get("force", ["false"])[0].lower() == "true"
            if s.node_state not in ("STATE_UNSPECIFIED",) and not force:
                raise _ApiError(
                    400,
                    "FAILED_PRECONDITION",
                    "the queued resource still has a node; delete with --force",
                )
            self._delete(s)
            return self._operation(where, None)
        raise _ApiError(405, "UNIMPLEMENTED", f"{method} on a queued resource")

    def _nodes(self, method, where, rest, query, body) -> dict:
        if method == "POST" and not rest:
            name = query.get("nodeId", [""])[0]
            s = self._create(where, name, body or {}, queued=False)
            s.qr_state = "WAITING_FOR_RESOURCES"
            return self._operation(where, s.node())
        if method == "GET" and not rest:
            return {"nodes": [s.node() for s in self.slices.values()]}
        name, _, verb = rest[0].partition(":")
        s = self._slice(name)
        if s.node_state == "STATE_UNSPECIFIED":  # a queued resource never filled
            raise _ApiError(404, "NOT_FOUND", f"Resource '{name}' was not found")
        if method == "GET" and not verb:
            return s.node()
        if method == "POST" and verb == "getGuestAttributes":
            return {"guestAttributes": [self._guest(s, w) for w in range(s.hosts)]}
        if method == "PATCH" and not verb:
            mask = query.get("updateMask", [""])[0]
            if mask != "metadata":
                raise _ApiError(400, "INVALID_ARGUMENT", f"updateMask {mask!r}")
            s.metadata = dict((body or {}).get("metadata", {}))
            self.hooks.keys(s)
            return self._operation(where, s.node())
        if method == "DELETE" and not verb:
            if s.queued:
                raise _ApiError(
                    400,
                    "FAILED_PRECONDITION",
                    "this node belongs to a queued resource; delete that",
                )
            self._delete(s)
            return self._operation(where, None)
        raise _ApiError(405, "UNIMPLEMENTED", f"{method} {verb or 'node'}")

    def _guest(self, s: Slice, worker: int) -> dict:
        key = self.hooks.host_key(s, worker)
        items = [{"namespace": "hostkeys", "key": "ssh-ed25519", "value": key}]
        return {
            "queryPath": "",
            "queryValue": {"items": items if key else []},
        }

    def record(self, entry: dict) -> None:
        with self.lock:
            self.requests.append(entry)
            with self.log_path.open("a") as f:
                f.write(json.dumps(entry) + "\n")


class _Handler(BaseHTTPRequestHandler):
    server: LoopbackTPU
    protocol_version = "HTTP/1.1"

    def log_message(self, *args) -> None:  # the record is the log
        pass

    def _serve(self, method: str) -> None:
        url = urlsplit(self.path)
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        try:
            body = json.loads(raw) if raw else None
        except ValueError:
            body = None
        query = parse_qs(url.query)
        self.server.record(
            {
                "method": method,
                "path": url.path,
                "query": {k: v[0] for k, v in query.items()},
                "body": body,
                "authorization": self.headers.get("Authorization", ""),
            }
        )
        try:
            code, answer = 200, self.server.handle_api(method, url.path, query, body)
        except _ApiError as error:
            code = error.code
            answer = {
                "error": {"code": code, "message": str(error), "status": error.status}
            }
        data = json.dumps(answer).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json; charset=UTF-8")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):  # noqa: N802 (http.server's names)
        self._serve("GET")

    def do_POST(self):  # noqa: N802
        self._serve("POST")

    def do_PATCH(self):  # noqa: N802
        self._serve("PATCH")

    def do_DELETE(self):  # noqa: N802
        self._serve("DELETE")
