"""How soon a slice is deleted after each fault, in a rehearsal cloud.

    python -m benchmarks.cloud_bounds [--output benchmarks/results/cloud_bounds.json]

Runs `python -m cloud.rehearsal serve` and, through the real gcloud, ssh and
scp, the faults of tests/test_rehearsal.py with the training stand-in
(cloud/rehearsal/standin.py): for each, the seconds from the fault (or from
what the bound counts from: the deadline, the end of training) to the DELETE
of the slice that requests.jsonl records, and who sent it. The rehearsal's
limits are short (cloud/limits.py, REHEARSAL_LIMITS); the same mechanisms
with the defaults are what docs/cloud-tpu.md computes. Prints a Markdown
table and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

from benchmarks import _machine
from cloud import rehearsal
from cloud.rehearsal import records, standin, workers

ROOT = Path(__file__).resolve().parents[1]
ZONE = "us-central2-b"


class Run:
    """One submission against the rehearsal cloud `cloud`."""

    def __init__(self, cloud: Path, work: Path, name: str, *args, hosts=1):
        accelerator = "v4-16" if hosts == 2 else "v5litepod-8"
        argv = [sys.executable, "-m", "cloud.tpu", "submit", "--rehearse-cloud"]
        argv += [str(cloud), "--name", name, "--zone", ZONE, "--accelerator-type"]
        argv += [accelerator, "--source", str(work / "src"), "--poll-interval", "0.5"]
        self.cloud, self.name = cloud, name
        self.process = subprocess.Popen(
            [*argv, *args],
            cwd=work,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
            stdout=subprocess.DEVNULL,
            stderr=open(work / f"{name}.log", "w"),  # noqa: SIM115
            start_new_session=True,
        )

    def delete(self, timeout: float = 400) -> dict:
        return records.first_delete(self.cloud, self.name, timeout)

    def deadline(self) -> int:
        node = records.creation(self.cloud, self.name)["body"]["tpu"]["nodeSpec"][0]
        return int(node["node"]["labels"]["deadline"])

    def event(self, what: str) -> float:
        def seen():
            found = [
                e for e in records.events(self.cloud, self.name) if e["event"] == what
            ]
            return found[0]["time"] if found else None

        return records.wait_until(seen, 300, f"{what} on {self.name}")

    def training_started(self) -> float:
        return records.training_started(self.cloud, self.name, 300)

    def ended(self, uri_dir: str) -> float:
        """When worker 0's training ended (its agent's record)."""
        path = self.cloud / "gcs" / uri_dir / "logs" / "worker-0.json"
        return json.loads(path.read_text())["ended_at"]


def row(fault, trigger, since, delete, bound):
    return {
        "fault": fault,
        "from": trigger,
        "deleted_by": delete["from"]
        + (" (HTTPS)" if delete.get("agent") == "keras-synann-agent" else ""),
        "seconds": round(delete["time"] - since, 1),
        "bound": bound,
    }


def measure(cloud: Path, work: Path) -> list[dict]:
    rows = []
    limit = ["--max-run-duration", "2m"]
    rehearsal.inject(cloud, "bd", "kill-worker-0")
    rehearsal.inject(cloud, "bn", "no-gcloud")
    rehearsal.inject(cloud, "bm", "maintenance")
    runs = {
        "bn": Run(cloud, work, "bn", "--detach", "--output-dir", "gs://bench/bn", "--",
                  "--epochs", "2"),
        "bg": Run(cloud, work, "bg", "--detach", "--output-dir", "gs://bench/bg", "--",
                  "--epochs", "2"),
        "bh": Run(cloud, work, "bh", "--detach", *limit, "--output-dir", "gs://bench/bh",
                  "--", "--hang"),
        "bd": Run(cloud, work, "bd", "--detach", *limit, "--output-dir", "gs://bench/bd",
                  "--", "--epochs", "3", hosts=2),
        "bk": Run(cloud, work, "bk", *limit, "--output-dir", "out-bk", "--",
                  "--epochs", "300"),
    }  # fmt: skip
    runs["bk"].training_started()
    killed = time.time()
    client = runs["bk"].process.pid
    for pid in [client, *workers.descendants(client)]:
        os.kill(pid, signal.SIGKILL)  # the client's machine dies: all of it
    for name in ("bn", "bg"):
        runs[name].process.wait(timeout=400)
        delete = runs[name].delete()
        end = runs[name].ended(f"bench/{name}")
        how = "HTTPS, no gcloud" if name == "bn" else "gcloud"
        rows.append(
            row(f"detached run ends ({how} on the workers)", "end of training",
                end, delete, "worker 0: end_grace_s after training")
        )  # fmt: skip
    kill0 = runs["bd"].event("kill-worker-0")
    for name, fault, since, trigger in (
        ("bh", "detached run hangs (ignores SIGTERM)", None, "deadline"),
        ("bd", "worker 0's VM dies (detached)", kill0, "the fault"),
        ("bk", "client SIGKILL while attached training runs", killed, "the fault"),
    ):
        delete = runs[name].delete()
        deadline = runs[name].deadline()
        rows.append(row(fault, "deadline", deadline, delete, "every worker's watchdog"))
        if since is not None:
            rows.append(row(fault, trigger, since, delete, "--max-run-duration"))
    hup = Run(cloud, work, "bs", "--", "--epochs", "300")
    hup.training_started()
    hung_up = time.time()
    hup.process.send_signal(signal.SIGHUP)
    hup.process.wait(timeout=120)
    rows.append(row("SIGHUP to an attached client", "the fault", hung_up, hup.delete(),
                    "the client's cleanup"))  # fmt: skip
    bm = Run(cloud, work, "bm", "--retries", "1", "--checkpoint-dir",
             str(work / "ckpt"), "--output-dir", "out-bm", "--", "--epochs", "4",
             "--sleep", "1.5")  # fmt: skip
    event = bm.event("maintenance")
    rows.append(row("maintenance event, --retries 1", "the fault", event, bm.delete(),
                    "the client: lost, so replaced"))  # fmt: skip
    bm.process.wait(timeout=400)
    for run in runs.values():
        run.process.wait(timeout=60)
    return rows


def versions() -> dict:
    def first_line(argv):
        try:
            done = subprocess.run(argv, capture_output=True, text=True, timeout=120)
        except OSError:
            return "missing"
        return (done.stdout or done.stderr).strip().splitlines()[0]

    return {
        "python": platform.python_version(),
        "gcloud": first_line(["gcloud", "version"]),
        "openssh": first_line(["ssh", "-V"]),
    }


def commit() -> str:
    done = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    return done.stdout.strip() or "unknown"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--output", type=Path, help="write the JSON here")
    args = parser.parse_args(argv)
    why = rehearsal.missing()
    if why:
        print(f"cloud_bounds: {why}", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # stop serve too
    load_before = _machine.load()
    with tempfile.TemporaryDirectory(prefix="cloud-bounds-") as tmp:
        work = Path(tmp)
        standin.write(work / "src")
        serve = rehearsal.Serve(work / "cloud")
        serve.start()
        try:
            rows = measure(work / "cloud", work)
        finally:
            serve.stop()
    result = {
        "machine": {
            **_machine.describe(),
            "load": f"{load_before}; after: {_machine.load()}",
        },
        "versions": versions(),
        "command": "python -m benchmarks.cloud_bounds",
        "commit": commit(),
        "date": date.today().isoformat(),
        "note": "rehearsal limits (cloud/limits.py REHEARSAL_LIMITS); "
        "--max-run-duration 2m for the deadline rows",
        "rows": rows,
    }
    print("| fault | counted from | deleted by | seconds |")
    print("|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['fault']} | {r['from']} | {r['deleted_by']} | {r['seconds']:.1f} |"
        )
    if args.output:
        args.output.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
