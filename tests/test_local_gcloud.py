"""cloud/local_gcloud.py: the stand-in models what real gcloud and TPUs do
besides the happy path (an ssh-agent without gcloud's key, an ssh command run
twice, a preempted slice), and the workers' install survives being run twice.

These drive the stand-in and the exact install text directly, without jax
(whole submissions through it are in test_rehearsal.py).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

from cloud import gcloud, local_gcloud, remote

T = gcloud.Target("slice", "us-central2-b")


def stand_in(root, argv, *options):
    """Run the stand-in as gcloud would be run: `argv` starts with "gcloud"."""
    command = [sys.executable, local_gcloud.__file__, "--root", str(root)]
    return subprocess.run(
        [*command, *options, *argv[1:]], capture_output=True, text=True, timeout=120
    )


@pytest.fixture
def tpu(tmp_path):
    """A created 2-worker stand-in TPU (v4-16); its processes killed at the end."""
    root = tmp_path / "cloud"
    created = stand_in(root, gcloud.create(T, "v4-16", "tpu-ubuntu2204-base"))
    assert created.returncode == 0, created.stderr
    yield root
    local_gcloud.kill_processes(root)


def dead(pid: int) -> bool:
    """The process is gone, or a zombie waiting for init to reap it."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def tarball(tmp_path) -> Path:
    src = tmp_path / "tree"
    (src / "training").mkdir(parents=True)
    (src / "training" / "mnist.py").write_text("print('train')\n")
    path = tmp_path / "source.tar.gz"
    with tarfile.open(path, "w:gz") as tar:
        tar.add(src / "training", arcname="training")
    return path


def test_describe_shows_the_workers_and_the_state(tpu):
    node = json.loads(stand_in(tpu, gcloud.describe_vm(T, gcloud.NODE_JSON)).stdout)
    assert node["state"] == "READY" and len(node["networkEndpoints"]) == 2
    state = stand_in(tpu, gcloud.describe(T, gcloud.QR_STATE))
    assert state.stdout == "ACTIVE\n"


def test_agent_rule_refuses_copies_to_several_workers(tpu, tmp_path):
    source = str(tarball(tmp_path))
    all_workers = gcloud.scp_to(T, source, gcloud.REMOTE_TARBALL, "all")
    refused = stand_in(tpu, all_workers, "--agent-holds-other-keys")
    assert refused.returncode == 1
    assert "SSH Key is not present in the SSH agent" in refused.stderr
    assert "ssh-add" in refused.stderr
    for w in ("0", "1"):  # one worker at a time: no agent needed
        one = gcloud.scp_to(T, source, gcloud.REMOTE_TARBALL, w)
        assert stand_in(tpu, one, "--agent-holds-other-keys").returncode == 0
    assert stand_in(tpu, all_workers).returncode == 0  # an agent with the key


def test_install_survives_running_twice(tpu, tmp_path):
    source = str(tarball(tmp_path))
    for w in ("0", "1"):
        stand_in(tpu, gcloud.scp_to(T, source, gcloud.REMOTE_TARBALL, w))
    install = gcloud.ssh(T, remote.install_command("jax"))
    result = stand_in(tpu, install, "--ssh-twice")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Retrying: SSH command error" in result.stderr
    assert result.stdout.count("install: already done on this worker") == 2
    calls = (tpu / local_gcloud.STUB_LOG).read_text().splitlines()
    assert sum(c.startswith("uv venv") for c in calls) == 2  # once per worker
    for w in (0, 1):
        home = tpu / f"worker-{w}"
        assert (home / "synann_run/src/training/mnist.py").is_file()
        assert not (home / gcloud.REMOTE_TARBALL).exists()  # removed once installed


CHECKPOINTS_PY = """\
from pathlib import Path


def completed_epochs(directory):
    return sorted(int(p.parent.name) for p in Path(directory).glob("*/done"))
"""

# What each worker runs: a training in its own session (as the run step starts
# it); then, once both have started, worker 0 completes epoch 1's checkpoint.
TRAIN = (
    "setsid sleep 60 < /dev/null > /dev/null 2>&1 & echo $! > trainer.pid; "
    'if [ "$SYNANN_WORKER_ID" = 0 ]; then '
    "while [ ! -s ../worker-1/trainer.pid ]; do sleep 0.05; done; "
    'mkdir -p "$CKPT/1" && touch "$CKPT/1/done"; fi; wait'
)


def test_preemption_after_an_epoch(tpu, tmp_path):
    ckpt = tmp_path / "ckpt"
    src = tpu / "worker-0" / gcloud.REMOTE_DIR / "src" / "training"
    src.mkdir(parents=True)
    (src / "__init__.py").write_text("")
    (src / "checkpoints.py").write_text(CHECKPOINTS_PY)
    options = ["--preempt-after-epoch", "1", "--checkpoint-dir", str(ckpt)]
    ssh = gcloud.ssh(T, f"CKPT={ckpt}; {TRAIN}")
    start = time.monotonic()
    result = stand_in(tpu, ssh, *options)
    assert time.monotonic() - start < 30
    assert result.returncode == 255
    assert "was preempted once epoch 1's checkpoint was complete" in result.stderr
    for w in (0, 1):  # every worker's processes are gone, its own session too
        assert dead(int((tpu / f"worker-{w}" / "trainer.pid").read_text()))
    assert stand_in(tpu, gcloud.describe_vm(T, "value(state)")).stdout == (
        "PREEMPTED\n"
    )
    assert stand_in(tpu, gcloud.describe(T, gcloud.QR_STATE)).stdout == "SUSPENDED\n"
    refused = stand_in(tpu, gcloud.ssh(T, "true"), *options)
    assert refused.returncode == 1
    assert 'This TPU has terminal state "PREEMPTED"' in refused.stderr
    # Once: a new TPU in the same root runs on.
    assert stand_in(tpu, gcloud.delete(T)).returncode == 0
    stand_in(tpu, gcloud.create(T, "v4-16", "tpu-ubuntu2204-base"))
    again = stand_in(tpu, gcloud.ssh(T, "echo fine"), *options)
    assert again.returncode == 0 and again.stdout == "fine\nfine\n"


def test_delete_ends_every_process_of_the_workers(tpu):
    ssh = gcloud.ssh(T, "setsid sleep 60 < /dev/null > /dev/null 2>&1 & echo $!")
    pids = [int(p) for p in stand_in(tpu, ssh).stdout.split()]
    assert len(pids) == 2
    assert stand_in(tpu, gcloud.delete(T)).returncode == 0
    assert all(dead(pid) for pid in pids)


# -- the install text, run twice ----------------------------------------------------

FAKE_PYTHON3 = """\
#!/bin/sh
# a TPU VM's python3: `-m pip install --user uv==...` installs the fake uv
mkdir -p "$HOME/.local/bin" && cp "{uv}" "$HOME/.local/bin/uv"
"""
FAKE_UV = """\
#!/bin/sh
echo "uv $1" >> "$HOME/calls"
case "$1" in
venv) for arg; do dir=$arg; done; sleep 1; mkdir -p "$dir/bin" ;;
pip) [ -f "$HOME/fail-pip" ] && exit 1; sleep 0.5 ;;
esac
"""


def install_home(tmp_path) -> tuple[Path, dict]:
    home = tmp_path / "home"
    home.mkdir()
    tarball(tmp_path).rename(home / gcloud.REMOTE_TARBALL)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    uv = bin_dir / "fake-uv"
    uv.write_text(FAKE_UV)
    (bin_dir / "python3").write_text(FAKE_PYTHON3.format(uv=uv))
    for exe in (uv, bin_dir / "python3"):
        exe.chmod(0o755)
    env = {"HOME": str(home), "PATH": f"{bin_dir}{os.pathsep}/usr/bin:/bin"}
    return home, env


def start_install(home, env) -> subprocess.Popen:
    return subprocess.Popen(
        ["sh", "-c", remote.install_command("jax")],
        cwd=home,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def test_install_twice_at_once_installs_once(tmp_path):
    home, env = install_home(tmp_path)
    first, second = start_install(home, env), start_install(home, env)
    outputs = [p.communicate(timeout=60)[0] for p in (first, second)]
    assert first.returncode == second.returncode == 0, outputs
    assert sum("already done" in out for out in outputs) == 1
    assert (home / "calls").read_text() == "uv venv\nuv pip\n"
    assert (home / "synann_run/src/training/mnist.py").is_file()
    assert not (home / gcloud.REMOTE_TARBALL).exists()


def test_failed_install_keeps_its_inputs_and_a_rerun_finishes_it(tmp_path):
    home, env = install_home(tmp_path)
    (home / "fail-pip").touch()
    failed = start_install(home, env)
    failed.communicate(timeout=60)
    assert failed.returncode != 0
    assert (home / gcloud.REMOTE_TARBALL).is_file()  # kept for the rerun
    assert not (home / "synann_run/installed").exists()
    (home / "fail-pip").unlink()
    rerun = start_install(home, env)
    rerun.communicate(timeout=60)
    assert rerun.returncode == 0
    assert (home / "synann_run/installed").is_file()
    assert not (home / gcloud.REMOTE_TARBALL).exists()
    assert (home / "calls").read_text() == "uv venv\nuv pip\n" * 2
