"""Cloud TPU submissions that really run: `submit --rehearse` through the real
gcloud, ssh and scp, against the loopback TPU API and one sshd per worker
(cloud/rehearsal/), and the gcloud behaviours the submitter relies on.

Each worker is a local jax process with simulated CPU devices, and the workers
form one jax cluster over loopback. They run the exact shell text a TPU worker
gets; only the package install is stubbed (cloud/rehearsal/workers.py says
how). The workers check their versions against constraints.txt, so these tests
need the pinned stack (marker `pinned`; tox's `min` env leaves them out).
Without gcloud or OpenSSH's sshd they are skipped, with one line saying what to
install.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import keras
import pytest

from cloud import rehearsal
from cloud.rehearsal import workers

REPO = Path(__file__).resolve().parent.parent
MISSING = rehearsal.missing()

pytestmark = [
    pytest.mark.pinned,
    pytest.mark.skipif(keras.backend.backend() != "jax", reason="jax workers"),
    pytest.mark.skipif(MISSING is not None, reason=MISSING or ""),
]


def train_args(mnist_dir, epochs: int = 1) -> list[str]:
    return [
        "--model", "mlp", "--epochs", str(epochs), "--steps-per-epoch", "2",
        "--batch-size", "16", "--val-size", "16", "--data-dir", str(mnist_dir),
    ]  # fmt: skip


def submit(tmp_path, *args, env=None, timeout=600):
    argv = [sys.executable, "-m", "cloud.tpu", "submit", "--name", "r"]
    argv += ["--zone", "us-central2-b", *args]
    full_env = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
    return subprocess.run(
        argv,
        cwd=tmp_path,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture(autouse=True)
def _nothing_survives(tmp_path):
    """Whatever a test leaves (a submit killed at its timeout leaves its sshds
    and agent), ends with it: each carries REHEARSAL_WORKER under tmp_path."""
    yield
    workers.kill_processes(tmp_path)


def requests(out: Path) -> list[dict]:
    path = out / "rehearsal" / "requests.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()]


def worker_log(out: Path, w: int) -> str:
    return (out / "logs" / f"worker-{w}.log").read_text()


def assert_nothing_left(out: Path) -> None:
    """No worker process, sshd or agent of this rehearsal runs; its port is free."""
    root = (out / "rehearsal").resolve()
    assert workers.kill_processes(root) == 0
    for pid in Path("/proc").glob("[0-9]*"):
        try:
            cmdline = (pid / "cmdline").read_bytes()
        except OSError:
            continue
        assert str(root).encode() not in cmdline, cmdline
    assert not list(root.glob("worker-*"))  # deleted, as a TPU's disks are


def test_rehearsal_of_a_two_host_slice(tmp_path, mnist_dir):
    """The README's command, through the real gcloud: a v4-16 (2 hosts)
    trains as one jax cluster; what gcloud sent is what a real API gets."""
    out = tmp_path / "dir"
    result = submit(
        tmp_path, "--rehearse", "--accelerator-type", "v4-16", "--output-dir",
        "dir", "--provisioning", "spot", "--service-account",
        "trainer@p.iam.gserviceaccount.com", "--", *train_args(mnist_dir),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-4000:]
    metrics = json.loads((out / "output" / "metrics.json").read_text())
    assert metrics["process_count"] == 2
    assert len(metrics["devices"]) == 8  # v4-16: 2 hosts x 4 chips
    for w in (0, 1):
        banner = next(
            ln
            for ln in worker_log(out, w).splitlines()
            if ln.startswith("Environment:")
        )
        assert f"process {w} of 2" in banner and "devices (8)" in banner
        assert (out / "logs" / f"worker-{w}.exit").read_text() == "0\n"
    assert "Test accuracy" in result.stdout  # worker 0's log, through gcloud ssh
    # What the real gcloud sent to the TPU API.
    sent = requests(out)
    assert {r["authorization"] for r in sent} == {"Bearer rehearsal-access-token"}
    create = next(
        r for r in sent if r["method"] == "POST" and "queuedResourceId" in r["query"]
    )
    assert create["path"].endswith(
        "/projects/rehearsal-project/locations/us-central2-b/queuedResources"
    )
    assert create["query"]["queuedResourceId"] == "r"
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
    # gcloud put its ssh key in the node's metadata once (worker 0's copy
    # first), and deleted the queued resource with its node (--force).
    patches = [r for r in sent if r["method"] == "PATCH"]
    assert len(patches) == 1 and patches[0]["query"]["updateMask"] == "metadata"
    assert (
        patches[0]["body"]["metadata"]["ssh-keys"]
        .strip()
        .startswith(f"{os.environ.get('USER', 'root')}:ssh-rsa ")
        or ":ssh-rsa " in patches[0]["body"]["metadata"]["ssh-keys"]
    )
    deletes = [r for r in sent if r["method"] == "DELETE"]
    assert len(deletes) == 1 and deletes[0]["query"]["force"].lower() == "true"
    # Real ssh and scp (sftp) reached each worker's own sshd, at its external IP.
    for w in (0, 1):
        seen = (out / "rehearsal" / f"connections.{w}.log").read_text()
        assert f" 127.0.0.{10 + w} " in seen and "sftp-server" in seen
    calls = (out / "rehearsal" / "stub-calls.log").read_text().splitlines()
    venv = "uv venv --quiet --clear --managed-python --python 3.11 ../venv"
    assert calls.count(venv) == 2
    assert "deleted r" in result.stderr
    assert_nothing_left(out)


def test_rehearsal_refuses_tensorflow(tmp_path):
    result = submit(
        tmp_path, "--rehearse", "--accelerator-type", "v5litepod-8",
        "--backend", "tensorflow", "--output-dir", str(tmp_path / "o"),
    )  # fmt: skip
    assert result.returncode == 2
    assert (
        result.stderr.strip().splitlines()[-1].endswith("Rehearse with --backend jax")
    )


# -- the retry path, with a stand-in training (fast) -----------------------------------

FAKE_MNIST = """\
# Stands in for training/mnist.py: epochs of 1 s; process 0 writes each epoch's
# checkpoint into --checkpoint-dir/EPOCH/ (complete once `done` exists);
# --resume continues after the last complete one; history.csv, metrics.json.
import argparse, json, os, sys, time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from training.checkpoints import completed_epochs

p = argparse.ArgumentParser()
p.add_argument("--epochs", type=int, default=4)
p.add_argument("--checkpoint-dir")
p.add_argument("--resume", action="store_true")
p.add_argument("--output-dir")
a = p.parse_args()
process = int(os.environ["KERAS_DISTRIBUTION_PROCESS_ID"])
ckpt = Path(a.checkpoint_dir)
first = max(completed_epochs(ckpt), default=0) + 1 if a.resume else 1
print(f"process {process}: epochs {first}..{a.epochs}, args {sys.argv[1:]}", flush=True)
for epoch in range(first, a.epochs + 1):
    time.sleep(1)
    if process == 0:
        (ckpt / str(epoch)).mkdir(parents=True, exist_ok=True)
        (ckpt / str(epoch) / "done").touch()
    print(f"epoch {epoch}", flush=True)
code, _, on = os.environ.get("FAKE_EXIT", "0@-").partition("@")
if str(process) == on:
    sys.exit(int(code))
if process == 0:
    out = Path(a.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows = "".join(f"{e}\\n" for e in completed_epochs(ckpt))
    (out / "history.csv").write_text("epoch\\n" + rows)
    (out / "metrics.json").write_text(json.dumps({"epochs": len(rows.split())}))
"""
FAKE_CHECKPOINTS = """\
from pathlib import Path


def completed_epochs(directory):
    return sorted(int(p.parent.name) for p in Path(directory).glob("*/done"))
"""
FAKE_ENVIRONMENT = """\
import os


def pin_mismatches(path):
    return []
"""


@pytest.fixture
def fake_source(tmp_path):
    """A tree like the repository's whose training is FAKE_MNIST."""
    src = tmp_path / "fake"
    (src / "training").mkdir(parents=True)
    (src / "pyproject.toml").write_text((REPO / "pyproject.toml").read_text())
    (src / "constraints.txt").write_text("")
    files = {
        "__init__.py": "",
        "mnist.py": FAKE_MNIST,
        "checkpoints.py": FAKE_CHECKPOINTS,
        "environment.py": FAKE_ENVIRONMENT,
    }
    for name, text in files.items():
        (src / "training" / name).write_text(text)
    yield src
    workers.kill_processes(tmp_path)


def fake_submit(tmp_path, fake_source, *args, env=None):
    return submit(
        tmp_path, "--rehearse", "--accelerator-type", "v4-16", "--output-dir",
        "out", "--source", str(fake_source), "--poll-interval", "0.5", *args,
        env=env,
    )  # fmt: skip


def test_a_failed_worker_fails_the_run_without_retry(tmp_path, fake_source):
    result = fake_submit(
        tmp_path, fake_source, "--retries", "1", "--checkpoint-dir", "ckpt",
        "--env", "FAKE_EXIT=3@1", "--", "--epochs", "2",
    )  # fmt: skip
    assert result.returncode == 1, result.stderr[-4000:]
    assert "training failed on worker(s) 1 (exit 3)" in result.stderr
    assert "attempt 2" not in result.stderr  # a real failure is not retried
    assert "deleted r" in result.stderr
    assert_nothing_left(tmp_path / "out")


def test_preempt_sigterm_is_retried_and_resumes(tmp_path, fake_source):
    """SIGTERM to every worker during training, the node PREEMPTED seconds
    later: the worker-side record and the watched state make it a
    preemption; a new slice resumes from the checkpoints."""
    ckpt = tmp_path / "ckpt"
    result = fake_submit(
        tmp_path, fake_source, "--provisioning", "spot", "--retries", "1",
        "--checkpoint-dir", "ckpt", "--rehearse-fault", "preempt-sigterm",
        "--", "--epochs", "4",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-4000:]
    out = tmp_path / "out"
    assert "(preempted: worker(s) 0, 1 got SIGTERM first)" in result.stderr or (
        "the slice was lost during step run" in result.stderr
    )
    assert "attempt 2 of 2 succeeded" in result.stderr
    assert (out / "output" / "history.csv").read_text() == "epoch\n1\n2\n3\n4\n"
    log = worker_log(out, 0)  # attempt 2's: it resumed after the checkpoint
    assert f"'--checkpoint-dir', '{ckpt}', '--resume'" in log
    assert "epoch 1\n" not in log
    assert result.stderr.count("deleted r") == 1
    assert_nothing_left(out)


def test_preempt_sigterm_without_retries_names_the_way_out(tmp_path, fake_source):
    result = fake_submit(
        tmp_path, fake_source, "--checkpoint-dir", "ckpt",
        "--rehearse-fault", "preempt-sigterm", "--", "--epochs", "4",
    )  # fmt: skip
    assert result.returncode == 1, result.stderr[-4000:]
    last = result.stderr.strip().splitlines()
    assert any(
        "the slice was lost during step run" in ln and "--retries N" in ln
        for ln in last
    ), result.stderr[-3000:]
    assert "deleted r" in result.stderr
    assert_nothing_left(tmp_path / "out")


def test_no_capacity_stops_at_once_with_the_api_message(tmp_path, fake_source):
    result = fake_submit(
        tmp_path, fake_source, "--retries", "2", "--checkpoint-dir", "ckpt",
        "--rehearse-fault", "no-capacity",
    )  # fmt: skip
    assert result.returncode == 1, result.stderr[-4000:]
    assert (
        "queued resource r FAILED before it was ever ACTIVE: There is no more "
        "capacity in the zone" in result.stderr
    )
    assert "attempt 2" not in result.stderr
    sent = requests(tmp_path / "out")
    assert sum(r["method"] == "POST" for r in sent) == 1  # created once
    assert any(r["method"] == "DELETE" for r in sent)
    assert "deleted r" in result.stderr
    assert_nothing_left(tmp_path / "out")


def test_hang_worker_ends_within_the_bound(tmp_path, fake_source):
    """Worker 1's network goes silent once training started: the keepalive
    ends its ssh, gcloud retries it, and the run step's time limit
    (--run-timeout + margin) ends the wait; logs, then delete."""
    start = time.monotonic()
    result = fake_submit(
        tmp_path, fake_source, "--run-timeout", "10s",
        "--rehearse-fault", "hang-worker", "--", "--epochs", "2",
    )  # fmt: skip
    elapsed = time.monotonic() - start
    assert result.returncode == 1, result.stderr[-4000:]
    assert "step run did not end within 0:00:30" in result.stderr
    assert "deleted r" in result.stderr
    from cloud.plan import REHEARSAL_LIMITS as L

    # create..preflight (< 60 s here), run 10 + 20, logs, delete.
    bound = 60 + 10 + L.run_margin_s + L.logs_s + L.describe_s + L.delete_s
    assert elapsed < bound, elapsed
    assert_nothing_left(tmp_path / "out")


def test_key_race_makes_one_key_before_parallel_steps(tmp_path, fake_source):
    result = fake_submit(
        tmp_path, fake_source, "--checkpoint-dir", "ckpt", "--rehearse-fault",
        "key-race", "--", "--epochs", "1",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-4000:]
    # gcloud made the key once: in worker 0's copy, before the parallel ones.
    assert result.stderr.count("You do not have an SSH key for gcloud") == 1
    home = tmp_path / "out" / "rehearsal" / "gcloud-home" / ".ssh"
    assert (home / "google_compute_engine.pub").is_file()
    assert_nothing_left(tmp_path / "out")


# -- gcloud's own behaviours, executed --------------------------------------------


@pytest.fixture(scope="module")
def stage(tmp_path_factory):
    """A rehearsal with one READY v4-16 made by the real gcloud."""
    root = tmp_path_factory.mktemp("stage")
    with rehearsal.Rehearsal(root / "rehearsal") as r:
        gcloud(r, "queued-resources", "create", "s", "--node-id=s",
               "--accelerator-type=v4-16", "--runtime-version=tpu-ubuntu2204-base")  # fmt: skip
        deadline = time.monotonic() + 30
        while gcloud(r, "queued-resources", "describe", "s",
                     "--format=value(state.state)").stdout.strip() != "ACTIVE":  # fmt: skip
            assert time.monotonic() < deadline
            time.sleep(0.3)
        yield r


def gcloud(r, *args, ssh=False, scp=False, check=True):
    group = "tpu-vm" if ssh or scp or args[0] in ("ssh", "scp", "describe") else ""
    argv = ["gcloud", "compute", "tpus", *([group] if group else []), *args]
    argv += ["--zone=us-central2-b", "--quiet"]
    flag = "--ssh-flag" if ssh else "--scp-flag" if scp else None
    if flag:
        argv += [f"{flag}=-o{o}" for o in ("ConnectTimeout=3", *r.ssh_options())]
    result = subprocess.run(
        argv, env=r.env(), capture_output=True, text=True, timeout=120,
        stdin=subprocess.DEVNULL,
    )  # fmt: skip
    if check and result.returncode not in (0,) and not (ssh or scp):
        raise AssertionError(result.stderr)
    return result


def test_gcloud_retries_an_ssh_that_exits_255(stage):
    once = "if [ -f tried ]; then echo second; else touch tried; exit 255; fi"
    result = gcloud(stage, "ssh", "s", "--worker=1", f"--command={once}", ssh=True)
    assert result.returncode == 0, result.stderr
    assert (
        "Retrying: SSH command error: [/usr/bin/ssh] exited with return code [255]"
        in result.stderr
    )
    assert result.stdout.strip() == "second"


def test_scp_to_several_workers_needs_the_key_in_the_agent(stage, tmp_path):
    f = tmp_path / "f.txt"
    f.write_text("x\n")
    many = gcloud(stage, "scp", str(f), "s:f.txt", "--worker=all", scp=True)
    assert many.returncode != 0
    assert "SSH Key is not present in the SSH agent" in many.stderr
    one = gcloud(stage, "scp", str(f), "s:f.txt", "--worker=1", scp=True)
    assert one.returncode == 0, one.stderr
    # ssh to every worker does not check the agent.
    every = gcloud(
        stage,
        "ssh",
        "s",
        "--worker=all",
        "--command=cat f.txt 2>/dev/null; echo $SYNANN_WORKER_ID",
        ssh=True,
    )
    assert every.returncode == 0, every.stderr
    assert sorted(every.stdout.split()) == ["0", "1", "x"]


def test_internal_ip_connects_to_the_internal_address(stage):
    result = gcloud(
        stage,
        "ssh",
        "s",
        "--worker=0",
        "--internal-ip",
        "--command=echo $SSH_CONNECTION",
        ssh=True,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split()[2] == "127.0.1.10"


def test_a_preempted_node_refuses_ssh(stage):
    stage.api.preempt("s")
    assert (
        gcloud(stage, "describe", "s", "--format=value(state)").stdout.strip()
        == "PREEMPTED"
    )
    qr = gcloud(
        stage, "queued-resources", "describe", "s", "--format=value(state.state)"
    )
    assert qr.stdout.strip() == "SUSPENDED"
    result = gcloud(stage, "ssh", "s", "--worker=0", "--command=true", ssh=True)
    assert result.returncode == 1
    assert "PREEMPTED" in result.stderr
    with socket.socket() as s:  # its machines are gone
        assert s.connect_ex(("127.0.0.10", stage.port)) != 0


def test_an_unwritable_checkpoint_dir_stops_at_preflight(tmp_path, fake_source):
    (tmp_path / "ckpt").write_text("a file, not a directory")
    result = fake_submit(
        tmp_path, fake_source, "--checkpoint-dir", "ckpt/run", "--service-account",
        "trainer@p.iam.gserviceaccount.com",
    )  # fmt: skip
    assert result.returncode == 1, result.stderr[-4000:]
    assert "preflight failed on worker 0: cannot write" in result.stderr
    assert "trainer@p.iam.gserviceaccount.com needs roles/storage.objectAdmin" in (
        result.stderr
    )
    assert not (tmp_path / "out" / "logs").exists()  # no training started
    assert "deleted r" in result.stderr
    assert_nothing_left(tmp_path / "out")
