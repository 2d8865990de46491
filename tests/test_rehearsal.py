"""Cloud TPU submissions that really run, against one shared rehearsal
cloud: the real gcloud, ssh and scp against `python -m cloud.rehearsal
serve` (the TPU API on a clock, a metadata server and an sshd per worker, a
Cloud Storage stand-in), and the slice's agent (cloud/agent.py) deleting its
own slice. Faults are injected per slice name; training is the rehearsal's
stand-in (cloud/rehearsal/standin.py, seconds). The tests that start a
rehearsal cloud of their own (`submit --rehearse`) are in
tests/test_rehearsal_own_cloud.py. Without gcloud, OpenSSH's sshd or curl
they are skipped, with one line saying what to install.

The time from each fault to the DELETE that requests.jsonl records is what
these tests bound and benchmarks/cloud_bounds.py measures.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest
import rehearsing
from rehearsing import (
    ZONE,
    agent_log,
    assert_nothing_left,
    slice_dir,
    submit,
    tool,
    wait_for_delete,
)

from cloud import rehearsal
from cloud.limits import REHEARSAL_LIMITS as LIMITS
from cloud.rehearsal import records, workers
from cloud.rehearsal.records import deletes as slice_deletes
from cloud.rehearsal.records import requests, training_started, wait_until

pytestmark = rehearsing.MARKS


@pytest.fixture(scope="module")
def fake_source(tmp_path_factory):
    return rehearsing.stand_in_source(tmp_path_factory)


@pytest.fixture(scope="module")
def cloud(tmp_path_factory):
    """One rehearsal cloud for the module, as `python -m cloud.rehearsal
    serve` runs it; on SIGTERM it must end everything it started."""
    directory = tmp_path_factory.mktemp("cloud")
    serve = rehearsal.Serve(directory)
    serve.start()
    yield directory
    serve.stop()
    assert serve.process.returncode == 0, (directory / "serve.log").read_text()
    assert_nothing_left(directory)


# -- the slice ends itself ----------------------------------------------------------------


def test_the_slice_ends_itself_without_the_client(tmp_path, cloud, fake_source):
    """Every way a run ends without its client, in one window: the runs
    that only their deadline ends start first and then mostly wait; while
    they wait, a detached run ends itself and an attached client gets
    SIGHUP; then their deadlines pass."""
    waiting = start_runs_for_the_deadline(tmp_path, cloud, fake_source)
    for part in ("a", "s"):
        (tmp_path / part).mkdir()
    a_detached_run_ends_itself(tmp_path / "a", cloud, fake_source)
    sighup_to_an_attached_client_deletes(tmp_path / "s", cloud, fake_source)
    the_deadline_deleted(cloud, waiting)


def start_runs_for_the_deadline(tmp_path, cloud, fake_source) -> list[str]:
    """Three runs at once that only their --max-run-duration ends: a
    detached run whose training hangs (it ignores SIGTERM), a detached run
    whose worker 0 dies (its agent with it) and an attached run whose client
    gets SIGKILL while training runs."""
    rehearsal.inject(cloud, "rd", "kill-worker-0")
    limit = ["--max-run-duration", "2m"]
    runs = {
        "rh": submit(
            tmp_path, cloud, "rh", fake_source, "--detach", *limit, "--output-dir",
            "gs://bucket/rh", "--", "--hang", popen=True,
        ),
        "rd": submit(
            tmp_path, cloud, "rd", fake_source, "--detach", *limit, "--output-dir",
            "gs://bucket/rd", "--", "--epochs", "3", popen=True, accelerator="v4-16",
        ),
        "rk": submit(
            tmp_path, cloud, "rk", fake_source, *limit, "--output-dir", "out-rk",
            "--", "--epochs", "300", popen=True,
        ),
    }  # fmt: skip
    training_started(cloud, "rk")
    for pid in [runs["rk"].pid, *workers.descendants(runs["rk"].pid)]:
        os.kill(pid, signal.SIGKILL)  # the client's machine dies: all of it
    for name in ("rh", "rd"):
        out, _ = runs[name].communicate(timeout=240)
        assert runs[name].returncode == 0, out[-4000:]
    runs["rk"].wait(timeout=30)
    return list(runs)


def a_detached_run_ends_itself(tmp_path, cloud, fake_source) -> None:
    """Detached: the client returns once training runs; worker 0 copies the
    results to the gs:// output directory and deletes the slice, with no
    gcloud on the workers (through the TPU API with the metadata token).
    The create request carries the network, subnetwork, tags, labels and
    internal IPs; `wait` re-attaches and gives the run's exit status."""
    rehearsal.inject(cloud, "ra", "no-gcloud")
    uri = "gs://bucket/ra"
    result = submit(
        tmp_path, cloud, "ra", fake_source, "--detach", "--max-run-duration", "3m",
        "--output-dir", uri, "--network", "my-vpc", "--subnetwork", "my-subnet",
        "--internal-ips", "--tags", "allow-ssh,tpu", "--labels", "team=ml",
        "--", "--epochs", "2",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-4000:]
    assert f"python -m cloud.tpu wait --name ra --zone {ZONE}" in result.stderr
    assert not slice_deletes(cloud, "ra")  # the client left it running
    delete = wait_for_delete(cloud, "ra", 60)
    assert delete["from"] == "worker-0" and delete["query"] == {"force": "true"}
    assert "Bearer rehearsal-token-" in delete["authorization"]  # the VM's token
    results = cloud / "gcs" / "bucket" / "ra"
    assert json.loads((results / "output" / "metrics.json").read_text()) == {
        "epochs": 2
    }
    record = json.loads((results / "logs" / "worker-0.json").read_text())
    assert record["state"] == "ended" and record["exit"] == 0
    assert delete["agent"] == "keras-synann-agent"  # no gcloud: the HTTPS API
    create = records.creation(cloud, "ra")
    node = create["body"]["tpu"]["nodeSpec"][0]["node"]
    assert node["networkConfig"] == {
        "network": "my-vpc",
        "subnetwork": "my-subnet",
        "enableExternalIps": False,
    }
    assert node["tags"] == ["allow-ssh", "tpu"]
    assert node["labels"]["team"] == "ml" and node["labels"]["tool"] == "keras-synann"
    deadline = int(node["labels"]["deadline"])
    assert node["metadata"]["synann-deadline"] == str(deadline)
    assert 170 <= deadline - create["time"] <= 181  # --max-run-duration 3m
    assert "startup-script" in node["metadata"]
    ssh = [r for r in requests(cloud) if r["method"] == "PATCH"]
    assert ssh  # gcloud's ssh reached the workers on their internal addresses
    seen = (slice_dir(cloud, "ra") / "connections.0.log").read_text()
    number = slice_dir(cloud, "ra").name.split("-")[1]
    assert f" 127.{number}.1.10 " in seen  # the internal address
    waited = tool(tmp_path, "wait", "--name", "ra", "--zone", ZONE,
                  "--rehearse-cloud", str(cloud), "--output-dir", uri)  # fmt: skip
    assert waited.returncode == 0, waited.stderr[-3000:]
    assert f"done: results in {uri}/output" in waited.stderr


def sighup_to_an_attached_client_deletes(tmp_path, cloud, fake_source) -> None:
    """The terminal the client runs in closes: SIGHUP is handled as SIGTERM
    (exit 129), the client copies the logs and deletes the slice."""
    run = submit(tmp_path, cloud, "rs", fake_source, "--", "--epochs", "30", popen=True)
    training_started(cloud, "rs")
    hung_up = time.time()
    run.send_signal(signal.SIGHUP)
    out, _ = run.communicate(timeout=120)
    assert run.returncode == 129, out[-3000:]
    delete = wait_for_delete(cloud, "rs", 5)
    assert delete["from"] == "client"
    assert delete["time"] - hung_up < LIMITS.logs_s + 10
    assert "interrupted (SIGHUP)" in out and "deleted rs" in out


def the_deadline_deleted(cloud, names: list[str]) -> None:
    """A worker's watchdog deleted each slice at its deadline, none before."""
    for name in names:
        create = records.creation(cloud, name)
        labels = create["body"]["tpu"]["nodeSpec"][0]["node"]["labels"]
        deadline = int(labels["deadline"])
        delete = wait_for_delete(cloud, name, deadline - time.time() + 30)
        assert 0 <= delete["time"] - deadline < 10, (name, delete["time"] - deadline)
        w = int(delete["from"].removeprefix("worker-"))
        assert w == 1 or name != "rd"  # worker 0 of rd is dead
        assert "passed: deleting" in agent_log(cloud, name, w, "watchdog")


def test_maintenance_is_retried_on_a_new_slice(tmp_path, cloud, fake_source):
    """A maintenance event while training runs (REPAIRING, the VMs restart):
    lost, not failed; with --retries 1 a new slice resumes from the
    checkpoints."""
    rehearsal.inject(cloud, "rm", "maintenance")
    ckpt = tmp_path / "ckpt"
    result = submit(
        tmp_path, cloud, "rm", fake_source, "--retries", "1", "--checkpoint-dir",
        str(ckpt), "--output-dir", "out", "--", "--epochs", "3",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-4000:]
    assert "TPU VM rm is under maintenance (state REPAIRING" in result.stderr
    assert "attempt 2 of 2 succeeded" in result.stderr
    deletes = slice_deletes(cloud, "rm")
    assert [d["from"] for d in deletes] == ["client", "client"]
    log = (tmp_path / "out" / "logs" / "worker-0.log").read_text()
    assert "'--resume'" in log


# -- the README's rehearsal, and faults through --rehearse -------------------------------


# -- through the shared cloud: failures before training -----------------------------------


def test_no_capacity_stops_at_once_with_the_api_message(tmp_path, cloud, fake_source):
    rehearsal.inject(cloud, "rn", "no-capacity")
    result = submit(
        tmp_path, cloud, "rn", fake_source, "--retries", "2", "--checkpoint-dir",
        str(tmp_path / "ckpt"), "--wait-timeout", "4s", "--output-dir", "out",
    )  # fmt: skip
    assert result.returncode == 1, result.stderr[-4000:]
    assert (
        "queued resource rn FAILED before it was ever ACTIVE: There is no more "
        "capacity in the zone" in result.stderr
    )
    assert "attempt 2" not in result.stderr
    creates = [r for r in requests(cloud) if r["query"].get("queuedResourceId") == "rn"]
    assert len(creates) == 1  # not retried
    assert [d["from"] for d in slice_deletes(cloud, "rn")] == ["client"]


def test_hang_worker_ends_within_the_bound(tmp_path, cloud, fake_source):
    """Worker 1's network goes silent once training started: the keepalive
    ends its ssh, gcloud retries it, and the run step's time limit
    (--run-timeout + margin) ends the wait; logs, then delete."""
    rehearsal.inject(cloud, "rw", "hang-worker")
    start = time.monotonic()
    result = submit(
        tmp_path, cloud, "rw", fake_source, "--run-timeout", "5s",
        "--output-dir", "out", "--", "--epochs", "2", accelerator="v4-16",
    )  # fmt: skip
    elapsed = time.monotonic() - start
    assert result.returncode == 1, result.stderr[-4000:]
    limit = 5 + LIMITS.run_margin_s
    assert f"step run did not end within 0:00:{limit:02d}" in result.stderr
    assert "deleted rw" in result.stderr
    # create..preflight (< 60 s here), run 10 + 20, logs, delete.
    bound = 60 + limit + LIMITS.logs_s + LIMITS.describe_s
    assert elapsed < bound + LIMITS.delete_s, elapsed


def test_an_unwritable_checkpoint_dir_stops_at_preflight(tmp_path, cloud, fake_source):
    (tmp_path / "ckpt").write_text("a file, not a directory")
    result = submit(
        tmp_path, cloud, "rc", fake_source, "--checkpoint-dir", str(tmp_path / "ckpt/run"),
        "--service-account", "trainer@p.iam.gserviceaccount.com", "--output-dir", "out",
    )  # fmt: skip
    assert result.returncode == 1, result.stderr[-4000:]
    assert "preflight failed on worker 0: cannot write" in result.stderr
    assert "trainer@p.iam.gserviceaccount.com needs roles/storage.objectAdmin" in (
        result.stderr
    )
    assert not (tmp_path / "out" / "logs").exists()  # no training started
    assert "deleted rc" in result.stderr


def test_a_slice_that_may_not_delete_itself_stops_at_preflight(
    tmp_path, cloud, fake_source
):
    rehearsal.inject(cloud, "rp", "no-permission")
    result = submit(tmp_path, cloud, "rp", fake_source, "--output-dir", "out")
    assert result.returncode == 1, result.stderr[-4000:]
    assert (
        "preflight failed on worker 0: the VM's service account lacks "
        "tpu.queuedResources.delete" in result.stderr
    )
    assert "deleted rp" in result.stderr


def test_sweep_deletes_what_outlived_its_deadline(tmp_path, cloud):
    """Resources labelled by the tool whose deadline passed, or FAILED, go;
    others stay."""
    env = {**os.environ, **rehearsal.read_env(cloud)}

    def create(name, deadline, *extra):
        argv = ["gcloud", "compute", "tpus", "queued-resources", "create", name,
                f"--node-id={name}", f"--zone={ZONE}", "--accelerator-type=v5litepod-8",
                "--runtime-version=v2-alpha-tpuv5-lite", "--quiet",
                f"--labels=tool=keras-synann,deadline={deadline}", *extra]  # fmt: skip
        subprocess.run(argv, env=env, check=True, capture_output=True, timeout=120)

    now = int(time.time())
    create("sw-old", now - 60)
    create("sw-new", now + 3600)
    rehearsal.inject(cloud, "sw-failed", "no-capacity")
    create("sw-failed", now + 3600, "--valid-until-duration=1s")
    wait_until(lambda: _state(env, "sw-failed") == "FAILED", 30, "FAILED")
    dry = tool(tmp_path, "sweep", "--zone", ZONE, "--rehearse-cloud", str(cloud),
               "--dry-run")  # fmt: skip
    assert dry.returncode == 0, dry.stderr
    assert not slice_deletes(cloud, "sw-old")
    result = tool(tmp_path, "sweep", "--zone", ZONE, "--rehearse-cloud", str(cloud))
    assert result.returncode == 0, result.stderr
    assert "sw-old: its deadline passed" in result.stderr
    assert "sw-failed: it is FAILED" in result.stderr
    assert slice_deletes(cloud, "sw-old") and slice_deletes(cloud, "sw-failed")
    assert not slice_deletes(cloud, "sw-new")
    subprocess.run(
        ["gcloud", "compute", "tpus", "queued-resources", "delete", "sw-new",
         f"--zone={ZONE}", "--force", "--quiet"],
        env=env, check=True, capture_output=True, timeout=120,
    )  # fmt: skip


def _state(env, name: str) -> str:
    argv = ["gcloud", "compute", "tpus", "queued-resources", "describe", name,
            f"--zone={ZONE}", "--format=value(state.state)"]  # fmt: skip
    return subprocess.run(argv, env=env, capture_output=True, text=True).stdout.strip()


# -- gcloud's own behaviours, executed --------------------------------------------


@pytest.fixture(scope="module")
def stage(cloud):
    """One READY v4-16 in the shared cloud, made by the real gcloud."""
    env = {**os.environ, **rehearsal.read_env(cloud)}
    gcloud(env, "queued-resources", "create", "stage", "--node-id=stage",
           "--accelerator-type=v4-16", "--runtime-version=tpu-ubuntu2204-base")  # fmt: skip
    wait_until(lambda: _state(env, "stage") == "ACTIVE", 60, "ACTIVE")
    yield env
    gcloud(env, "queued-resources", "delete", "stage", "--force", check=False)


def gcloud(env, *args, ssh=False, scp=False, check=True):
    group = "tpu-vm" if ssh or scp or args[0] in ("ssh", "scp", "describe") else ""
    argv = ["gcloud", "compute", "tpus", *([group] if group else []), *args]
    argv += [f"--zone={ZONE}", "--quiet"]
    flag = "--ssh-flag" if ssh else "--scp-flag" if scp else None
    if flag:
        port = env["REHEARSAL_SSH_PORT"]
        argv += [f"{flag}=-o{o}" for o in ("ConnectTimeout=3", f"Port={port}")]
    result = subprocess.run(
        argv, env=env, capture_output=True, text=True, timeout=120,
        stdin=subprocess.DEVNULL,
    )  # fmt: skip
    if check and result.returncode != 0 and not (ssh or scp):
        raise AssertionError(result.stderr)
    return result


def test_gcloud_retries_an_ssh_that_exits_255(stage):
    once = "if [ -f tried ]; then echo second; else touch tried; exit 255; fi"
    result = gcloud(stage, "ssh", "stage", "--worker=1", f"--command={once}", ssh=True)
    assert result.returncode == 0, result.stderr
    assert (
        "Retrying: SSH command error: [/usr/bin/ssh] exited with return code [255]"
        in result.stderr
    )
    assert result.stdout.strip() == "second"


def test_scp_to_several_workers_needs_the_key_in_the_agent(stage, tmp_path):
    f = tmp_path / "f.txt"
    f.write_text("x\n")
    many = gcloud(stage, "scp", str(f), "stage:f.txt", "--worker=all", scp=True)
    assert many.returncode != 0
    assert "SSH Key is not present in the SSH agent" in many.stderr
    one = gcloud(stage, "scp", str(f), "stage:f.txt", "--worker=1", scp=True)
    assert one.returncode == 0, one.stderr
    # ssh to every worker does not check the agent; each worker knows its
    # number from its own metadata server.
    number = (
        "curl -sf -H 'Metadata-Flavor: Google' http://$GCE_METADATA_ROOT/"
        "computeMetadata/v1/instance/attributes/agent-worker-number"
    )
    every = gcloud(
        stage, "ssh", "stage", "--worker=all",
        f"--command=cat f.txt 2>/dev/null; echo w$({number})", ssh=True,
    )  # fmt: skip
    assert every.returncode == 0, every.stderr
    assert sorted(every.stdout.split()) == ["w0", "w1", "x"]


def test_internal_ip_connects_to_the_internal_address(stage):
    result = gcloud(
        stage, "ssh", "stage", "--worker=0", "--internal-ip",
        "--command=echo $SSH_CONNECTION", ssh=True,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout.split()[2].endswith(".1.10")


def test_flex_start_runs_out_at_its_run_duration(stage):
    """gcloud's alpha track sends a flex-start request (v2alpha1:
    provisioningModel FLEX_START, runDuration.maxRunDuration); the rehearsal's
    API then suspends the queued resource and deletes its VMs at that
    duration, as the TPU API documents it."""
    stage_dir = Path(stage["CLOUDSDK_CONFIG"]).parent
    argv = ["gcloud", "alpha", "compute", "tpus", "queued-resources", "create", "fx",
            "--node-id=fx", f"--zone={ZONE}", "--accelerator-type=v5litepod-8",
            "--runtime-version=v2-alpha-tpuv5-lite", "--provisioning-model=flex-start",
            "--max-run-duration=4s", "--quiet"]  # fmt: skip
    subprocess.run(argv, env=stage, check=True, capture_output=True, timeout=120)
    create = records.creation(stage_dir, "fx")
    assert create["path"].startswith("/v2alpha1/")
    assert create["body"]["provisioningModel"] == "FLEX_START"
    assert create["body"]["runDuration"] == {"maxRunDuration": "4s"}
    wait_until(lambda: _state(stage, "fx") == "SUSPENDED", 60, "SUSPENDED")
    lines = (stage_dir / "events.jsonl").read_text().splitlines()
    events = {
        e["event"]: e["time"] for e in map(json.loads, lines) if e["slice"] == "fx"
    }
    assert 3 <= events["GONE"] - events["READY"] < 8  # its VMs ran 4 s
    gone = gcloud(stage, "describe", "fx", "--format=value(state)", check=False)
    assert gone.returncode != 0 and "NOT_FOUND" in gone.stderr
    gcloud(stage, "queued-resources", "delete", "fx", "--force")


def test_a_preempted_node_refuses_ssh(stage):
    """The stage's last test: a preemption notice once its workers' training
    runs (here: the run step's lock, made by hand), then PREEMPTED."""
    stage_dir = Path(stage["CLOUDSDK_CONFIG"]).parent
    rehearsal.inject(stage_dir, "stage", "preempt-sigterm")
    made = gcloud(
        stage, "ssh", "stage", "--worker=all",
        "--command=mkdir -p synann_run/run && echo 1 > synann_run/run/pid", ssh=True,
    )  # fmt: skip
    assert made.returncode == 0, made.stderr
    wait_until(lambda: _state(stage, "stage") == "SUSPENDED", 30, "SUSPENDED")
    node = gcloud(stage, "describe", "stage", "--format=value(state)")
    assert node.stdout.strip() == "PREEMPTED"
    result = gcloud(stage, "ssh", "stage", "--worker=0", "--command=true", ssh=True)
    assert result.returncode == 1
    assert "PREEMPTED" in result.stderr
    number = int(slice_dir(stage_dir, "stage").name.split("-")[1])
    with socket.socket() as s:  # its machines are gone
        assert (
            s.connect_ex((f"127.{number}.0.10", int(stage["REHEARSAL_SSH_PORT"]))) != 0
        )
