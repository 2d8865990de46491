"""Whether a slice is still usable: its queued resource's state, and its
node's state, health, symptoms and maintenance, read through gcloud.

A slice is lost (with --retries, a new one replaces it) when its queued
resource is FAILED, SUSPENDING or SUSPENDED; when its node is PREEMPTED,
TERMINATED, REPAIRING or gone; when the node's health is
UNHEALTHY_MAINTENANCE or a maintenance is ONGOING (the VMs restart: what ran
on them is gone); or when none of its workers answers ssh.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from cloud import gcloud
from cloud.runner import Runner, say

#: States in which a slice will not become usable again: the queued resource
#: (True) or the TPU VM node (False).
LOST_STATES = {
    True: {"FAILED", "SUSPENDING", "SUSPENDED"},
    False: {"PREEMPTED", "TERMINATED", "REPAIRING"},
}
BAD_STATES = {
    True: LOST_STATES[True] | {"DELETING"},
    False: LOST_STATES[False] | {"STOPPING", "STOPPED", "DELETING", "HIDDEN"},
}


class Lost(Exception):
    """The slice was lost (preempted, failed, in maintenance, unreachable); the
    message says how. `gone`: its state says its VMs cannot be reached (no
    logs to copy)."""

    def __init__(self, message: str, gone: bool = False):
        super().__init__(message)
        self.gone = gone


@dataclass(frozen=True)
class Node:
    """What `describe --format=json` says of a TPU VM node."""

    state: str = ""
    health: str = ""
    maintenance: str = ""  # upcomingMaintenance.maintenanceStatus
    maintenance_at: str = ""  # its windowStartTime
    symptoms: tuple[str, ...] = ()
    workers: int = 0  # networkEndpoints

    @classmethod
    def parse(cls, text: str) -> Node | None:
        try:
            node = json.loads(text)
        except ValueError:
            return None
        if not isinstance(node, dict):
            return None
        upcoming = node.get("upcomingMaintenance") or {}
        return cls(
            state=node.get("state", ""),
            health=node.get("health", ""),
            maintenance=upcoming.get("maintenanceStatus", ""),
            maintenance_at=upcoming.get("windowStartTime", ""),
            symptoms=tuple(
                f"{s.get('symptomType', '?')}: {s.get('details', '')}".strip(": ")
                for s in node.get("symptoms", []) or []
            ),
            workers=len(node.get("networkEndpoints", []) or []),
        )

    def lost(self) -> str | None:
        """How this node is lost, or None."""
        if self.health == "UNHEALTHY_MAINTENANCE" or self.maintenance == "ONGOING":
            return f"is under maintenance (state {self.state}, health {self.health})"
        if self.state in LOST_STATES[False]:
            return f"is {self.state}"
        return None


def not_found(err: str) -> bool:
    return "not_found" in err.lower() or "not found" in err.lower()


def describe_node(runner: Runner, t: gcloud.Target, limit: float, echo=True):
    """(Node or None, gcloud's exit code, its stderr)."""
    argv = gcloud.describe_vm(t, gcloud.NODE_JSON)
    rc, out, err = runner.run(argv, capture=True, timeout=limit, echo=echo)
    return (Node.parse(out) if rc == 0 else None), rc, err


def slice_lost(
    runner: Runner, sub, probe: bool = True, echo: bool = True
) -> Lost | None:
    """How the slice was lost (its state, health, maintenance, or no worker
    answering ssh), or None when it is usable."""
    t, limit = sub.target, sub.limits.describe_s
    if t.queued:
        argv = gcloud.describe(t, gcloud.QR_STATE)
        rc, out, err = runner.run(argv, capture=True, timeout=limit, echo=echo)
        if rc == 0 and out.strip() in LOST_STATES[True]:
            return Lost(f"queued resource {t.name} is {out.strip()}", gone=True)
        if rc != 0 and not_found(err):
            return Lost(f"queued resource {t.name} no longer exists", gone=True)
    node, rc, err = describe_node(runner, t, limit, echo)
    if node is not None:
        how = node.lost()
        if how:
            return Lost(f"TPU VM {t.name} {how}", gone=True)
        if node.maintenance == "PENDING":
            say(f"note: a maintenance of {t.name} is scheduled ({node.maintenance_at})")
        for symptom in node.symptoms:
            say(f"note: {t.name} reports {symptom}")
    elif rc != 0 and not_found(err):
        return Lost(f"TPU VM {t.name} no longer exists", gone=True)
    if not probe:
        return None
    step = sub.probe_step()
    say(f"{step.name}: {step.about}")
    codes = runner.run_parallel(step.parallel, timeout=sub.limits.probe_s)
    if all(rc != 0 for rc in codes):
        return Lost(f"none of its {sub.workers} workers answers ssh")
    return None
