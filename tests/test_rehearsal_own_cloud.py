"""Rehearsals that start a rehearsal cloud of their own (`submit
--rehearse`), as a user's first rehearsal does: the README's two-host run,
which trains for real as one jax cluster and checks the versions against
constraints.txt (marker `pinned`), and the faults a cloud must have from
its start (`--rehearse-fault`, `--rehearse-preempt-after-epoch`). The tests
on one shared cloud are in tests/test_rehearsal.py."""

from __future__ import annotations

import importlib.util
import json

import pytest
import rehearsing
from rehearsing import ZONE, assert_nothing_left, tool

from cloud.rehearsal.records import requests

pytestmark = rehearsing.MARKS


@pytest.fixture(scope="module")
def fake_source(tmp_path_factory):
    return rehearsing.stand_in_source(tmp_path_factory)


def train_args(mnist_dir, epochs: int = 1) -> list[str]:
    return [
        "--model", "mlp", "--epochs", str(epochs), "--steps-per-epoch", "2",
        "--batch-size", "16", "--val-size", "16", "--data-dir", str(mnist_dir),
    ]  # fmt: skip


@pytest.mark.pinned
@pytest.mark.skipif(importlib.util.find_spec("jax") is None, reason="needs jax")
def test_rehearsal_of_a_two_host_slice(tmp_path, mnist_dir):
    """The README's command, with a rehearsal cloud of its own: a v4-16 (2
    hosts) trains as one jax cluster; what gcloud sent is what a real API
    gets; nothing is left running."""
    out = tmp_path / "dir"
    result = tool(
        tmp_path, "submit", "--rehearse", "--name", "r", "--zone", ZONE,
        "--accelerator-type", "v4-16", "--output-dir", "dir", "--provisioning",
        "spot", "--service-account", "trainer@p.iam.gserviceaccount.com", "--",
        *train_args(mnist_dir), timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-4000:]
    metrics = json.loads((out / "output" / "metrics.json").read_text())
    assert metrics["process_count"] == 2
    assert len(metrics["devices"]) == 8  # v4-16: 2 hosts x 4 chips
    for w in (0, 1):
        log = (out / "logs" / f"worker-{w}.log").read_text()
        banner = next(ln for ln in log.splitlines() if ln.startswith("Environment:"))
        assert f"process {w} of 2" in banner and "devices (8)" in banner
        assert (out / "logs" / f"worker-{w}.exit").read_text() == "0\n"
    assert "Test accuracy" in result.stdout  # worker 0's log, through gcloud ssh
    sent = requests(out / "rehearsal")
    client = [r for r in sent if r["from"] == "client"]
    assert {r["authorization"] for r in client} == {"Bearer rehearsal-access-token"}
    create = next(r for r in client if r["query"].get("queuedResourceId") == "r")
    assert create["path"].endswith(
        "/projects/rehearsal-project/locations/us-central2-b/queuedResources"
    )
    body = create["body"]
    spec = body["tpu"]["nodeSpec"][0]
    assert spec["nodeId"] == "r"
    assert spec["node"]["acceleratorType"] == "v4-16"
    assert spec["node"]["runtimeVersion"] == "tpu-ubuntu2204-base"
    assert spec["node"]["serviceAccount"] == {
        "email": "trainer@p.iam.gserviceaccount.com"
    }
    assert body["spot"] == {}
    assert body["queueingPolicy"] == {"validUntilDuration": "3600s"}
    patches = [r for r in client if r["method"] == "PATCH"]
    assert len(patches) == 1 and patches[0]["query"]["updateMask"] == "metadata"
    assert ":ssh-rsa " in patches[0]["body"]["metadata"]["ssh-keys"]
    deletes = [r for r in sent if r["method"] == "DELETE" and "queued" in r["path"]]
    assert [d["from"] for d in deletes] == ["client"]
    assert deletes[0]["query"]["force"].lower() == "true"
    # Every worker's preflight asked whether it may delete its slice.
    asked = [r for r in sent if r["path"].endswith(":testIamPermissions")]
    assert sorted(r["from"] for r in asked) == ["worker-0", "worker-1"]
    assert asked[0]["body"] == {"permissions": ["tpu.queuedResources.delete"]}
    for w in (0, 1):  # real ssh and scp (sftp) at each worker's external IP
        seen = (out / "rehearsal" / "slice-1" / f"connections.{w}.log").read_text()
        assert f" 127.1.0.{10 + w} " in seen and "sftp-server" in seen
    calls = (out / "rehearsal" / "stub-calls.log").read_text().splitlines()
    venv = "uv venv --quiet --clear --managed-python --python 3.11 ../venv"
    assert calls.count(venv) == 2
    assert "deleted r" in result.stderr
    assert_nothing_left(out / "rehearsal")


def test_rehearsal_refuses_tensorflow(tmp_path):
    result = tool(
        tmp_path, "submit", "--rehearse", "--name", "r", "--zone", ZONE,
        "--accelerator-type", "v5litepod-8", "--backend", "tensorflow",
        "--output-dir", str(tmp_path / "o"),
    )  # fmt: skip
    assert result.returncode == 2
    assert (
        result.stderr.strip().splitlines()[-1].endswith("Rehearse with --backend jax")
    )


def rehearse(tmp_path, source, *args):
    return tool(
        tmp_path, "submit", "--rehearse", "--name", "r", "--zone", ZONE,
        "--accelerator-type", "v5litepod-8", "--output-dir", "out", "--source",
        str(source), "--poll-interval", "0.5", *args,
    )  # fmt: skip


def test_preempt_sigterm_is_retried_and_resumes(tmp_path, fake_source):
    """SIGTERM to every worker during training, the node PREEMPTED seconds
    later: the agent's record and the watched state make it a preemption; a
    new slice resumes from the checkpoints."""
    ckpt = tmp_path / "ckpt"
    result = rehearse(
        tmp_path, fake_source, "--provisioning", "spot", "--retries", "1",
        "--checkpoint-dir", "ckpt", "--rehearse-preempt-after-epoch", "1",
        "--", "--epochs", "3",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-4000:]
    out = tmp_path / "out"
    assert "attempt 2 of 2 succeeded" in result.stderr
    assert (out / "output" / "history.csv").read_text() == "epoch\n1\n2\n3\n"
    log = (out / "logs" / "worker-0.log").read_text()  # attempt 2's: it resumed
    assert f"'--checkpoint-dir', '{ckpt}', '--resume'" in log
    assert "epoch 1\n" not in log
    kept = out / "logs-attempt-1"
    assert not kept.exists() or "SIGTERM preempted=TRUE" in "".join(
        p.read_text() for p in kept.glob("*.sigterm")
    )
    assert result.stderr.count("deleted r") == 1
    assert_nothing_left(out / "rehearsal")


def test_key_race_makes_one_key_before_parallel_steps(tmp_path, fake_source):
    """gcloud has no ssh key yet; a failed worker's training on a healthy
    slice fails the run, and is not retried."""
    result = rehearse(
        tmp_path, fake_source, "--rehearse-fault", "key-race", "--accelerator-type",
        "v4-16", "--retries", "1", "--checkpoint-dir", "ckpt", "--", "--epochs", "1",
        "--exit", "3@1",
    )  # fmt: skip
    assert result.returncode == 1, result.stderr[-4000:]
    # gcloud made the key once: in worker 0's copy, before the parallel ones.
    assert result.stderr.count("You do not have an SSH key for gcloud") == 1
    assert "training failed on worker(s) 1 (exit 3)" in result.stderr
    assert "attempt 2" not in result.stderr  # a real failure is not retried
    assert "deleted r" in result.stderr
    assert_nothing_left(tmp_path / "out" / "rehearsal")
