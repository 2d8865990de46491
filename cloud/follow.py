"""Following a run the client left: `wait` (re-attach and give the run's exit
status) and `sweep` (delete the tool's resources that outlived their
deadline or failed).

`wait` reads what the slice's agent copied to the output directory
(OUTPUT/logs/worker-N.json: its state and training's exit status, written
at start and end) with `gcloud storage cat`, and the slice's state with
`gcloud ... describe`, every --poll-interval, until worker 0's training
ended or the slice is gone. Its exit status is submit's: 0 when every
worker's training exited 0 and OUTPUT/output/metrics.json is there, 1
otherwise.
"""

from __future__ import annotations

import json
import time

from cloud import gcloud
from cloud.health import LOST_STATES, not_found
from cloud.runner import Runner, clock, hms, say

DESCRIBE_S = 120


def _cat(runner: Runner, uri: str) -> list[dict]:
    """The JSON lines of a Cloud Storage object (wildcards allowed); [] when
    there is none."""
    rc, out, _ = runner.run(
        gcloud.storage_cat(uri), capture=True, echo=False, timeout=DESCRIBE_S
    )
    records = []
    for line in out.splitlines() if rc == 0 else []:
        try:
            records.append(json.loads(line))
        except ValueError:
            pass
    return records


def slice_state(runner: Runner, t: gcloud.Target) -> str | None:
    """The queued resource's (or TPU VM's) state; None when it is gone."""
    fmt = gcloud.QR_STATE if t.queued else gcloud.VM_STATE
    argv = gcloud.describe(t, fmt)
    rc, out, err = runner.run(argv, capture=True, echo=False, timeout=DESCRIBE_S)
    if rc != 0:
        return None if not_found(err) else "unreadable"
    return out.strip() or "unknown"


def output_of(runner: Runner, t: gcloud.Target) -> str | None:
    """The run's output directory, from the node's metadata (synann-output)."""
    argv = gcloud.describe_vm(t, gcloud.NODE_JSON)
    rc, out, _ = runner.run(argv, capture=True, echo=False, timeout=DESCRIBE_S)
    try:
        return (
            json.loads(out).get("metadata", {}).get("synann-output")
            if rc == 0
            else None
        )
    except (ValueError, AttributeError):
        return None


def wait(runner: Runner, t: gcloud.Target, uri: str, poll_s: float) -> int:
    """Until worker 0's training ended or the slice is gone; the run's exit
    status."""
    start, last = clock(), None
    say(f"waiting for the run on {t.name} (results in {uri})")
    while True:
        state = slice_state(runner, t)
        first = _cat(runner, f"{uri}/logs/worker-0.json")
        record = first[0] if first else {}
        seen = (state, record.get("state"))
        if seen != last:
            say(
                f"{t.name}: {state or 'gone'}; worker 0's training: "
                f"{record.get('state', 'no record yet')} ({hms(clock() - start)})"
            )
            last = seen
        if record.get("state") == "ended" or state is None:
            break
        if state in LOST_STATES[t.queued] | {"PREEMPTED", "TERMINATED"}:
            break
        time.sleep(max(poll_s, 1.0))
    return verdict(runner, t, uri, state)


def verdict(runner: Runner, t: gcloud.Target, uri: str, state: str | None) -> int:
    records = {r.get("worker"): r for r in _cat(runner, f"{uri}/logs/worker-*.json")}
    workers = max([int(w) for w in records if isinstance(w, int)] + [0]) + 1
    failed = []
    for w in range(workers):
        r = records.get(w, {})
        if r.get("state") != "ended":
            failed.append(
                f"{w} (its training did not end: {r.get('state', 'no record')})"
            )
        elif r.get("exit") != 0:
            failed.append(f"{w} (exit {r.get('exit')})")
    metrics = _cat(runner, f"{uri}/output/metrics.json")
    where = f"logs in {uri}/logs"
    if failed:
        say(f"error: training failed on worker(s) {', '.join(failed)}; {where}")
        return 1
    if not metrics:
        say(
            f"error: training ended but {uri}/output/metrics.json is not there; {where}"
        )
        return 1
    say(f"done: results in {uri}/output ({t.name} is {state or 'deleted'})")
    return 0


def sweep(runner: Runner, zone: str, project: str | None, dry_run: bool) -> int:
    """Delete the tool's resources (label tool=keras-synann) whose deadline
    passed, or that are FAILED or SUSPENDED (nodes: PREEMPTED, TERMINATED)."""
    now, code, found = time.time(), 0, 0
    for queued in (True, False):
        argv = gcloud.list_resources(zone, project, queued)
        rc, out, err = runner.run(argv, capture=True, timeout=DESCRIBE_S)
        if rc != 0:
            say(f"error: could not list: {(err.strip().splitlines() or ['?'])[-1]}")
            return 1
        for item in json.loads(out or "[]"):
            name, labels, state = _describe(item, queued)
            if labels.get(gcloud.TOOL_LABEL) != gcloud.TOOL:
                continue
            if not queued and item.get("queuedResource"):
                continue  # deleted with its queued resource
            found += 1
            why = _why_sweep(labels, state, now, queued)
            if why is None:
                say(f"{name}: {state}, deadline not passed: left")
                continue
            delete = gcloud.delete_named(name, zone, project, queued)
            say(f"{name}: {why}: deleting")
            if dry_run:
                print(" ".join(delete))
                continue
            rc, _, err = runner.run(delete, capture=True, timeout=900)
            if rc != 0 and not not_found(err):
                code = 1
                say(
                    f"error: could not delete {name}: {(err.strip().splitlines() or ['?'])[-1]}"
                )
    say(f"{found} resource(s) of the tool in {zone}")
    return code


def _describe(item: dict, queued: bool) -> tuple[str, dict, str]:
    name = item.get("name", "").rsplit("/", 1)[-1]
    if queued:
        specs = item.get("tpu", {}).get("nodeSpec", [{}])
        labels = (specs[0] if specs else {}).get("node", {}).get("labels", {})
        return name, labels, item.get("state", {}).get("state", "")
    return name, item.get("labels", {}), item.get("state", "")


def _why_sweep(labels: dict, state: str, now: float, queued: bool) -> str | None:
    deadline = labels.get(gcloud.DEADLINE_LABEL, "")
    if deadline.isdigit() and int(deadline) <= now:
        return f"its deadline passed {hms(now - int(deadline))} ago"
    if state in (
        LOST_STATES[True] - {"SUSPENDING"} if queued else {"PREEMPTED", "TERMINATED"}
    ):
        return f"it is {state}"
    return None
