"""Reading what a rehearsal cloud recorded in its directory D: the requests
it served (D/requests.jsonl), what happened to each slice (D/events.jsonl)
and each slice's machines (D/slice-N/). For tests, benchmarks and people
looking at a rehearsal."""

from __future__ import annotations

import json
import time
from pathlib import Path


def requests(directory: Path) -> list[dict]:
    return _lines(Path(directory) / "requests.jsonl")


def events(directory: Path, name: str) -> list[dict]:
    return [e for e in _lines(Path(directory) / "events.jsonl") if e["slice"] == name]


def _lines(path: Path) -> list[dict]:
    text = path.read_text() if path.is_file() else ""
    return [json.loads(line) for line in text.splitlines()]


def creation(directory: Path, name: str) -> dict:
    """The request that created the queued resource (or TPU VM) `name`."""
    return next(
        r
        for r in requests(directory)
        if r["method"] == "POST"
        and name in (r["query"].get("queuedResourceId"), r["query"].get("nodeId"))
    )


def deletes(directory: Path, name: str) -> list[dict]:
    """The DELETEs of the queued resource or node `name`."""
    ends = (["queuedResources", name], ["nodes", name])
    return [
        r
        for r in requests(directory)
        if r["method"] == "DELETE" and r["path"].split("/")[-2:] in ends
    ]


def wait_until(check, timeout: float, what: str):
    """check()'s first true answer, asked every 0.2 s for `timeout` seconds."""
    give_up = time.time() + timeout
    while time.time() < give_up:
        found = check()
        if found:
            return found
        time.sleep(0.2)
    raise TimeoutError(f"{what} did not happen within {timeout:.0f}s")


def first_delete(directory: Path, name: str, timeout: float) -> dict:
    found = wait_until(lambda: deletes(directory, name), timeout, f"a DELETE of {name}")
    return found[0]


def slice_dirs(directory: Path, name: str) -> list[Path]:
    """D/slice-N of every slice called `name` that became READY, in order."""
    found = [
        p.parent for p in Path(directory).glob("slice-*/name") if p.read_text() == name
    ]
    return sorted(found, key=lambda p: int(p.name.split("-")[1]))


def training_started(directory: Path, name: str, timeout: float = 240) -> float:
    """When worker 0 of a slice called `name` started training (its log)."""

    def started():
        for d in slice_dirs(directory, name):
            log = d / "worker-0" / "synann_run" / "logs" / "worker-0.log"
            if log.is_file():
                return log.stat().st_mtime
        return None

    return wait_until(started, timeout, f"training on {name}")
