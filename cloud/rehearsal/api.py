"""The TPU API of a rehearsal cloud (v2 and v2alpha1), on a clock.

gcloud reaches it through CLOUDSDK_API_ENDPOINT_OVERRIDES_TPU; the slices'
agents through the same variable (gcloud on the worker) or over HTTP with
their metadata token. It serves what the tool's gcloud commands and the
agent touch:

    POST   /{v2,v2alpha1}/projects/P/locations/Z/queuedResources?queuedResourceId=N
    GET    .../queuedResources[/N]        DELETE .../queuedResources/N[?force=true]
    POST   .../nodes?nodeId=N             GET .../nodes[/N]     DELETE .../nodes/N
    PATCH  .../nodes/N?updateMask=metadata      POST .../nodes/N:getGuestAttributes
    GET    .../operations/OP

with the fields of the real API. A queued resource is ACCEPTED, then
WAITING_FOR_RESOURCES, PROVISIONING and ACTIVE (its node READY) as the
`Clock` says; it goes FAILED when its validUntil time passes before it was
ACTIVE, and SUSPENDED (its VMs deleted) when a flex-start request's
maxRunDuration has run out. A delete makes it DELETING, then gone; its
operation is done once it is gone (gcloud waits for that, unless --async). Nodes
carry `health`, `upcomingMaintenance` and `symptoms` (a maintenance event:
REPAIRING, UNHEALTHY_MAINTENANCE). The machines start and stop through
`Hooks`, outside the API's lock.
"""

from __future__ import annotations

import re
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime

from cloud.rehearsal.server import Answer, Request, json_answer

#: The message of a queued resource whose valid-until time passed before
#: capacity was found (this rehearsal's wording).
NO_CAPACITY_MESSAGE = (
    "There is no more capacity in the zone; the request expired at its "
    "valid-until time before it could be provisioned"
)


@dataclass(frozen=True)
class Clock:
    """Seconds each state lasts (a rehearsal's are short)."""

    accept_s: float = 1.0  # ACCEPTED
    capacity_s: float = 1.0  # WAITING_FOR_RESOURCES, when capacity comes
    provision_s: float = 1.0  # PROVISIONING (node CREATING)
    delete_s: float = 0.5  # DELETING
    repair_s: float = 8.0  # REPAIRING, in a maintenance event


@dataclass
class Hooks:
    """The machines: `ready(slice)` when a node becomes READY (also after a
    repair), `gone(slice)` when its VMs are deleted or stop, `keys(slice)`
    when its ssh-keys metadata changed; `host_key(slice, worker)`: the
    worker's ed25519 host key (the guest attribute gcloud reads), or ""."""

    ready: object = lambda s: None
    gone: object = lambda s: None
    keys: object = lambda s: None
    host_key: object = lambda s, w: ""


def _iso(when: float) -> str:
    return datetime.utcfromtimestamp(when).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _seconds(text) -> float | None:
    """A protobuf Duration as JSON ("3600s") in seconds."""
    match = re.fullmatch(r"([0-9.]+)s", str(text or ""))
    return float(match.group(1)) if match else None


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
    version: str = "v2"
    request: dict = field(default_factory=dict)  # the queued resource's body
    created: float = field(default_factory=time.time)
    qr_state: str = "ACCEPTED"
    node_state: str = "CREATING"
    since: float = field(default_factory=time.time)  # in the current state
    health: str = "HEALTH_UNSPECIFIED"
    maintenance: dict | None = None
    failed_message: str | None = None
    metadata: dict = field(default_factory=dict)
    preempted: bool = False
    no_capacity: bool = False
    valid_until: float | None = None
    max_run_s: float | None = None

    @property
    def where(self) -> str:
        return f"projects/{self.project}/locations/{self.zone}"

    @property
    def net(self) -> int:
        return (self.number - 1) % 250 + 1

    def endpoint(self, worker: int) -> tuple[str, str]:
        """(internal, external) loopback addresses of worker `worker`."""
        return f"127.{self.net}.1.{10 + worker}", f"127.{self.net}.0.{10 + worker}"

    @property
    def exists(self) -> bool:
        """Whether the node exists (not before provisioning, nor after its
        VMs were deleted)."""
        return self.node_state not in ("STATE_UNSPECIFIED", "GONE")

    def node(self) -> dict:
        spec = self.node_spec
        node = {
            "name": f"{self.where}/nodes/{self.name}",
            "id": str(7000000000 + self.number),
            "acceleratorType": spec.get("acceleratorType", ""),
            "runtimeVersion": spec.get("runtimeVersion", ""),
            "state": self.node_state,
            "health": self.health,
            "apiVersion": "V2_ALPHA1" if self.version == "v2alpha1" else "V2",
            "createTime": _iso(self.created),
            "schedulingConfig": spec.get("schedulingConfig", {}),
            "serviceAccount": spec.get("serviceAccount", {}),
            "networkConfig": spec.get("networkConfig", {}),
            "labels": spec.get("labels", {}),
            "tags": spec.get("tags", []),
            "metadata": dict(self.metadata),
            "networkEndpoints": [],
        }
        if self.queued:
            node["queuedResource"] = f"{self.where}/queuedResources/{self.name}"
        if self.maintenance:
            node["upcomingMaintenance"] = self.maintenance
            node["healthDescription"] = "The TPU is under maintenance."
        external = spec.get("networkConfig", {}).get("enableExternalIps", True)
        if self.node_state != "CREATING":
            for w in range(self.hosts):
                internal, outside = self.endpoint(w)
                entry = {"ipAddress": internal, "port": 8470}
                if external:
                    entry["accessConfig"] = {"externalIp": outside}
                node["networkEndpoints"].append(entry)
        return node

    def queued_resource(self) -> dict:
        qr = {
            **{k: v for k, v in self.request.items() if k != "tpu"},
            "name": f"{self.where}/queuedResources/{self.name}",
            "createTime": _iso(self.created),
            "state": {"state": self.qr_state},
            "tpu": {
                "nodeSpec": [
                    {"parent": self.where, "nodeId": self.name, "node": self.node_spec}
                ]
            },
        }
        if self.failed_message:
            qr["state"]["failedData"] = {
                "error": {"code": 8, "message": self.failed_message}
            }
        if self.max_run_s is not None and self.qr_state == "ACTIVE":
            end = self.since + self.max_run_s
            qr.setdefault("runDuration", {})["terminationTime"] = _iso(end)
        return qr


class TpuApi:
    """The queued resources and nodes, their clock, and the API's answers."""

    def __init__(self, hosts_of, hooks: Hooks | None = None, clock: Clock = Clock()):
        """`hosts_of(accelerator_type)`: the workers of a slice of that type."""
        self.hosts_of, self.hooks, self.clock = hosts_of, hooks or Hooks(), clock
        self.slices: dict[str, Slice] = {}
        self.lock = threading.RLock()
        self.operations: dict[str, dict] = {}
        self.deleting: dict[str, Slice] = {}  # a delete's operation: its slice
        self.created = 0
        self.no_capacity: set[str] = set()  # names (or "*") never given capacity

    # -- the clock -------------------------------------------------------------------
    def tick(self) -> None:
        """Advance every slice by the time passed; run the hooks after."""
        actions = []
        with self.lock:
            now = time.time()
            for s in list(self.slices.values()):
                actions += self._advance(s, now)
        for hook, s in actions:
            hook(s)

    def _move(self, s: Slice, qr: str | None, node: str | None, now: float) -> None:
        s.qr_state, s.node_state = qr or s.qr_state, node or s.node_state
        s.since = now

    def _advance(self, s: Slice, now: float) -> list:
        c, age = self.clock, now - s.since
        if s.qr_state == "DELETING" or s.node_state == "DELETING":
            if age >= c.delete_s:
                del self.slices[s.name]
                s.node_state = "GONE"
                return [(self.hooks.gone, s)]
            return []
        if s.qr_state == "ACCEPTED" and age >= c.accept_s:
            self._move(s, "WAITING_FOR_RESOURCES", None, now)
        elif s.qr_state == "WAITING_FOR_RESOURCES":
            if s.valid_until is not None and now >= s.valid_until:
                self._move(s, "FAILED", "STATE_UNSPECIFIED", now)
                s.failed_message = NO_CAPACITY_MESSAGE
            elif not s.no_capacity and age >= c.capacity_s:
                self._move(s, "PROVISIONING", "CREATING", now)
        elif s.node_state == "CREATING" and age >= c.provision_s:
            self._move(s, "ACTIVE" if s.queued else None, "READY", now)
            s.health = "HEALTHY"
            return [(self.hooks.ready, s)]
        elif s.node_state == "REPAIRING" and age >= c.repair_s:
            self._move(s, None, "READY", now)
            s.health, s.maintenance = "HEALTHY", None
            return [(self.hooks.ready, s)]
        elif s.qr_state == "ACTIVE" and s.max_run_s is not None:
            if age >= s.max_run_s:  # flex-start's run duration ran out
                self._move(s, "SUSPENDED", "GONE", now)
                return [(self.hooks.gone, s)]
        return []

    # -- what happens to a slice ---------------------------------------------------------
    def preempt(self, name: str) -> None:
        """The node stops as a preempted spot VM does: PREEMPTED, its queued
        resource SUSPENDED, its machines gone."""
        with self.lock:
            s = self.slices.get(name)
            if s is None or not s.exists:
                return
            self._move(s, "SUSPENDED" if s.queued else None, "PREEMPTED", time.time())
            s.preempted = True
        self.hooks.gone(s)

    def repair(self, name: str) -> None:
        """A maintenance event: the node is REPAIRING (UNHEALTHY_MAINTENANCE,
        an ONGOING unscheduled maintenance), its VMs restart; READY again
        after Clock.repair_s."""
        with self.lock:
            s = self.slices.get(name)
            if s is None or s.node_state != "READY":
                return
            self._move(s, None, "REPAIRING", time.time())
            s.health = "UNHEALTHY_MAINTENANCE"
            s.maintenance = {
                "type": "UNSCHEDULED",
                "maintenanceStatus": "ONGOING",
                "canReschedule": False,
                "windowStartTime": _iso(s.since),
                "windowEndTime": _iso(s.since + self.clock.repair_s),
            }
        self.hooks.gone(s)

    def delete_all(self) -> None:
        with self.lock:
            gone = list(self.slices.values())
            self.slices.clear()
        for s in gone:
            self.hooks.gone(s)

    # -- requests --------------------------------------------------------------------------
    def answer(self, request: Request):
        self.tick()
        parts = request.path.strip("/").split("/")
        if len(parts) < 6 or parts[1] != "projects" or parts[3] != "locations":
            raise Answer(404, "NOT_FOUND", f"no such API: {request.path}")
        version, where = parts[0], "/".join(parts[1:5])
        kind, rest = parts[5], parts[6:]
        with self.lock:
            if kind == "operations" and request.method == "GET" and rest:
                name = f"{where}/operations/{rest[0]}"
                op = self.operations.get(name, {"name": name, "done": True})
                deleting = self.deleting.get(name)
                if deleting is not None and self.slices.get(deleting.name) is deleting:
                    return json_answer({**op, "done": False})
                return json_answer(op)
            if kind == "queuedResources":
                answer = self._queued(request, version, where, rest)
            elif kind == "nodes":
                answer = self._nodes(request, version, where, rest)
            else:
                raise Answer(404, "NOT_FOUND", f"no such API: {request.path}")
        self.tick()  # a delete or create may already move on
        return json_answer(answer)

    def _operation(self, version, where, response, deleting=None) -> dict:
        """A long-running operation; a delete's is done once the slice is gone."""
        name = f"{where}/operations/operation-{len(self.operations) + 1}"
        op = {
            "name": name,
            "done": True,
            "metadata": {
                "@type": f"type.googleapis.com/google.cloud.tpu.{version}.OperationMetadata"
            },
        }
        if response is not None:
            kind = "Node" if "/nodes/" in response.get("name", "") else "QueuedResource"
            op["response"] = {
                "@type": f"type.googleapis.com/google.cloud.tpu.{version}.{kind}",
                **response,
            }
        self.operations[name] = op
        if deleting is not None:
            self.deleting[name] = deleting
            return {**op, "done": False}
        return op

    def _slice(self, name: str) -> Slice:
        s = self.slices.get(name)
        if s is None:
            raise Answer(404, "NOT_FOUND", f"Resource '{name}' was not found")
        return s

    def _create(self, where, name, node, queued, version, request) -> Slice:
        if not re.fullmatch(r"[a-z](?:[a-z0-9-]{0,61}[a-z0-9])?", name or ""):
            raise Answer(400, "INVALID_ARGUMENT", f"invalid resource id {name!r}")
        if name in self.slices:
            raise Answer(409, "ALREADY_EXISTS", f"Resource '{name}' already exists")
        project, zone = where.split("/")[1], where.split("/")[3]
        self.created += 1
        hosts = self.hosts_of(node.get("acceleratorType", ""))
        s = Slice(name, project, zone, node, queued, self.created, hosts, version)
        s.request, s.metadata = request, dict(node.get("metadata", {}))
        s.no_capacity = bool({name, "*"} & self.no_capacity)
        policy = request.get("queueingPolicy", {})
        until = _seconds(policy.get("validUntilDuration"))
        s.valid_until = s.created + until if until is not None else None
        if policy.get("validUntilTime"):
            s.valid_until = datetime.fromisoformat(
                policy["validUntilTime"].replace("Z", "+00:00")
            ).timestamp()
        s.max_run_s = _seconds(request.get("runDuration", {}).get("maxRunDuration"))
        if not queued:
            s.qr_state, s.node_state = "NONE", "CREATING"
        self.slices[name] = s
        return s

    def _queued(self, request, version, where, rest) -> dict:
        method, body = request.method, request.json() or {}
        if method == "POST" and not rest:
            specs = body.get("tpu", {}).get("nodeSpec", [])
            if len(specs) != 1:
                raise Answer(400, "INVALID_ARGUMENT", "one nodeSpec expected")
            name = request.arg("queuedResourceId")
            s = self._create(where, name, specs[0].get("node", {}), True, version, body)
            return self._operation(version, where, s.queued_resource())
        if method == "GET" and not rest:
            found = [s.queued_resource() for s in self.slices.values() if s.queued]
            return {"queuedResources": found}
        s = self._slice(rest[0])
        if not s.queued:
            raise Answer(404, "NOT_FOUND", f"Resource '{rest[0]}' was not found")
        if method == "GET":
            return s.queued_resource()
        if method == "DELETE":
            force = request.arg("force", "false").lower() == "true"
            if s.exists and s.qr_state != "DELETING" and not force:
                raise Answer(
                    400,
                    "FAILED_PRECONDITION",
                    "the queued resource still has a node; delete with --force",
                )
            self._move(s, "DELETING", "DELETING" if s.exists else None, time.time())
            return self._operation(version, where, None, deleting=s)
        raise Answer(405, "UNIMPLEMENTED", f"{method} on a queued resource")

    def _nodes(self, request, version, where, rest) -> dict:
        method, body = request.method, request.json() or {}
        if method == "POST" and not rest:
            s = self._create(where, request.arg("nodeId"), body, False, version, {})
            return self._operation(version, where, s.node())
        if method == "GET" and not rest:
            return {"nodes": [s.node() for s in self.slices.values() if s.exists]}
        name, _, verb = rest[0].partition(":")
        s = self._slice(name)
        if not s.exists:
            raise Answer(404, "NOT_FOUND", f"Resource '{name}' was not found")
        if method == "GET" and not verb:
            return s.node()
        if method == "POST" and verb == "getGuestAttributes":
            return {"guestAttributes": [self._guest(s, w) for w in range(s.hosts)]}
        if method == "PATCH" and not verb:
            mask = request.arg("updateMask")
            if mask != "metadata":
                raise Answer(400, "INVALID_ARGUMENT", f"updateMask {mask!r}")
            s.metadata = dict(body.get("metadata", {}))
            self.hooks.keys(s)
            return self._operation(version, where, s.node())
        if method == "DELETE" and not verb:
            if s.queued:
                raise Answer(
                    400,
                    "FAILED_PRECONDITION",
                    "this node belongs to a queued resource; delete that",
                )
            self._move(s, None, "DELETING", time.time())
            return self._operation(version, where, None, deleting=s)
        raise Answer(405, "UNIMPLEMENTED", f"{method} {verb or 'node'}")

    def _guest(self, s: Slice, worker: int) -> dict:
        key = self.hooks.host_key(s, worker)
        items = [{"namespace": "hostkeys", "key": "ssh-ed25519", "value": key}]
        return {"queryPath": "", "queryValue": {"items": items if key else []}}
