"""Cloud TPU submissions that really run: `submit --rehearse`, and a whole
`submit` against cloud/local_gcloud.py put on PATH as `gcloud`.

Each worker is a local jax process with simulated CPU devices, and the workers
form one jax cluster over loopback. They run the exact shell text a TPU worker
gets; only the package install is stubbed (this interpreter and its packages
stand in for the workers' venv; cloud/local_gcloud.py says how). The workers
check their versions against constraints.txt, so these tests need the pinned
stack (marker `pinned`; tox's `min` env leaves them out).
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import keras
import pytest

from cloud import local_gcloud

REPO = Path(__file__).resolve().parent.parent

pytestmark = [
    pytest.mark.pinned,
    pytest.mark.skipif(keras.backend.backend() != "jax", reason="jax workers"),
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


def submit_v4_16(tmp_path, mnist_dir, *options, output_dir="dir", env=None):
    """Submit a tiny training run to a v4-16 (2 hosts) with these options."""
    args = ["--accelerator-type", "v4-16", "--output-dir", output_dir, *options]
    return submit(tmp_path, *args, "--", *train_args(mnist_dir), env=env)


def worker_log(out: Path, w: int) -> str:
    return (out / "logs" / f"worker-{w}.log").read_text()


def test_rehearsal_of_a_two_host_slice(tmp_path, mnist_dir, monkeypatch):
    # No gcloud anywhere: a rehearsal must not need one.
    monkeypatch.setenv("PATH", os.pathsep.join(["/usr/bin", "/bin"]))
    out = tmp_path / "dir"
    result = submit_v4_16(tmp_path, mnist_dir, "--rehearse")  # a relative output dir
    assert result.returncode == 0, result.stderr[-4000:]
    metrics = json.loads((out / "output" / "metrics.json").read_text())
    assert metrics["process_count"] == 2
    assert len(metrics["devices"]) == 8  # v4-16: 2 hosts x 4 chips
    assert metrics["distribution"] == "data_parallel"
    for w in (0, 1):
        log = worker_log(out, w)
        banner = next(ln for ln in log.splitlines() if ln.startswith("Environment:"))
        assert f"process {w} of 2" in banner and "devices (8)" in banner
        assert (out / "logs" / f"worker-{w}.exit").read_text() == "0\n"
    accuracy = [
        next(ln for ln in worker_log(out, w).splitlines() if "Test accuracy" in ln)
        for w in (0, 1)
    ]
    assert accuracy[0] == accuracy[1]
    assert "Test accuracy" in result.stdout  # worker 0's log was streamed
    assert (out / "source.tar.gz").is_file()
    # The workers asked for Python 3.11 and the pinned packages (stubbed here).
    calls = (out / "rehearsal" / "stub-calls.log").read_text().splitlines()
    venv = "uv venv --quiet --clear --managed-python --python 3.11 ../venv"
    assert calls.count(venv) == 2
    install = [c for c in calls if c.startswith("uv pip install")]
    assert (
        len(install) == 2
        and "-c constraints.txt .[jax,training] jax[tpu]" in install[0]
    )
    # "Deleted": the worker homes are gone, as a deleted TPU's disks are.
    assert not list((out / "rehearsal").glob("worker-*"))
    assert "deleted r" in result.stderr


def test_rehearsal_resumes_a_preempted_training(tmp_path, mnist_dir):
    """A spot slice preempted once epoch 1's checkpoint is complete: with
    --retries 1 a new slice resumes from --checkpoint-dir and the run finishes
    with one history row per epoch."""
    out = tmp_path / "dir"
    result = submit(
        tmp_path, "--rehearse", "--accelerator-type", "v4-16", "--output-dir", "dir",
        "--provisioning", "spot", "--retries", "1", "--checkpoint-dir", "ckpt",
        "--rehearse-preempt-after-epoch", "1", "--", *train_args(mnist_dir, 3),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-4000:]
    assert "the slice was lost during step run (queued resource r is SUSPENDED)" in (
        result.stderr
    )
    assert "attempt 2 of 2 succeeded" in result.stderr
    metrics = json.loads((out / "output" / "metrics.json").read_text())
    assert metrics["process_count"] == 2 and metrics["epochs"] == 3
    with open(out / "output" / "history.csv") as f:
        epochs = [int(row["epoch"]) for row in csv.DictReader(f)]
    assert epochs == [1, 2, 3]
    for w in (0, 1):  # attempt 2's logs: both processes resumed
        assert f"Resuming {tmp_path / 'ckpt'} after epoch" in worker_log(out, w)
    assert "deleted r" in result.stderr
    assert not list((out / "rehearsal").glob("worker-*"))


def test_rehearsal_fails_when_one_worker_fails(tmp_path, mnist_dir):
    out = tmp_path / "dir"
    result = submit_v4_16(
        tmp_path, mnist_dir, "--rehearse", "--env", "SYNANN_TEST_EXIT=3@1"
    )
    assert result.returncode == 1, result.stderr[-4000:]
    assert "training failed on worker(s) 1 (exit 3)" in result.stderr
    assert "SYNANN_TEST_EXIT: exiting with 3" in worker_log(out, 1)
    assert (out / "logs" / "worker-1.exit").read_text() == "3\n"
    assert (out / "logs" / "worker-0.exit").read_text() == "0\n"
    assert (out / "output" / "metrics.json").is_file()  # worker 0 finished
    assert "deleted r" in result.stderr


def test_rehearsal_refuses_tensorflow(tmp_path):
    result = submit(
        tmp_path, "--rehearse", "--accelerator-type", "v5litepod-8",
        "--backend", "tensorflow", "--output-dir", str(tmp_path / "o"),
    )  # fmt: skip
    assert result.returncode == 2
    assert (
        result.stderr.strip().splitlines()[-1].endswith("Rehearse with --backend jax")
    )


def test_whole_submit_through_a_stand_in_gcloud(tmp_path, mnist_dir):
    """A real `submit` (no --rehearse) finds `gcloud` on PATH and drives every
    step through it: create, wait, workers, copy, install (stubbed),
    preflight, run, logs, copy-back, verify, delete. That gcloud behaves as
    the real one does on a desktop with other keys in its ssh-agent and a
    flaky connection: copying to several workers at once fails, and every
    ssh command's connection drops once, so gcloud runs it a second time."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    gcloud = bin_dir / "gcloud"
    root = tmp_path / "cloud"
    script = REPO / "cloud" / "local_gcloud.py"
    gcloud.write_text(
        f"#!/bin/sh\nprintf '%s\\n' \"$*\" >> {root}.calls\n"
        f"exec {sys.executable} {script} --root {root} "
        '--agent-holds-other-keys --ssh-twice "$@"\n'
    )
    gcloud.chmod(0o755)
    out = tmp_path / "dir"
    path = f"{bin_dir}{os.pathsep}{os.environ['PATH']}"
    result = submit_v4_16(tmp_path, mnist_dir, "--tpu-vm", env={"PATH": path})
    assert result.returncode == 0, result.stderr[-4000:]
    verbs = [line.split()[3] for line in Path(f"{root}.calls").read_text().splitlines()]
    assert verbs == ["describe", "create", "describe", "describe", "scp", "scp"] + [
        "ssh"
    ] * 3 + ["scp"] * 3 + ["delete"]
    assert result.stderr.count("Retrying: SSH command error") == 3
    # What the workers print comes through gcloud's stdout.
    assert result.stdout.count("install: already done on this worker") == 2
    # The run step's second connection followed the trainings the first started.
    assert result.stdout.count("was started already; following it") == 2
    for w in (0, 1):
        assert worker_log(out, w).count("Environment:") == 1  # one training each
    metrics = json.loads((out / "output" / "metrics.json").read_text())
    assert metrics["process_count"] == 2
    assert sorted(p.name for p in (out / "logs").iterdir()) == [
        "worker-0.exit", "worker-0.log", "worker-1.exit", "worker-1.log",
    ]  # fmt: skip
    assert not root.joinpath("tpu.json").exists()  # deleted


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
    bad = os.environ.get("FAKE_PIN_MISMATCH_ON") == os.environ["SYNANN_WORKER_ID"]
    return ["numpy 1.0 (pinned 2.0)"] if bad else []
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
    local_gcloud.kill_processes(tmp_path)


def test_rehearsal_replaces_a_preempted_slice(tmp_path, fake_source):
    ckpt = tmp_path / "ckpt"
    result = submit(
        tmp_path, "--rehearse", "--accelerator-type", "v4-16", "--output-dir", "out",
        "--source", str(fake_source), "--retries", "1", "--checkpoint-dir", "ckpt",
        "--rehearse-preempt-after-epoch", "1", "--", "--epochs", "4",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-4000:]
    out = tmp_path / "out"
    assert (out / "output" / "history.csv").read_text() == "epoch\n1\n2\n3\n4\n"
    assert "the slice was lost during step run (queued resource r is SUSPENDED)" in (
        result.stderr
    )
    assert "attempt 2 of 2 succeeded" in result.stderr
    log = worker_log(out, 0)  # attempt 2's: it resumed after the checkpoint
    assert f"'--checkpoint-dir', '{ckpt}', '--resume'" in log
    assert "epoch 1\n" not in log
    assert "deleted r" in result.stderr
    assert not list((out / "rehearsal").glob("worker-*"))


def test_rehearsal_preflight_stops_every_worker_before_training(tmp_path, fake_source):
    result = submit(
        tmp_path, "--rehearse", "--accelerator-type", "v4-16", "--output-dir", "out",
        "--source", str(fake_source), env={"FAKE_PIN_MISMATCH_ON": "1"},
    )  # fmt: skip
    assert result.returncode == 1
    last = result.stderr.strip().splitlines()
    assert "[tpu] error: preflight failed on worker 1: numpy 1.0 (pinned 2.0)" in last
    assert "preflight: worker 0 ok" in result.stderr
    assert not (tmp_path / "out" / "logs").exists()  # no training started
    assert "deleted r" in result.stderr
