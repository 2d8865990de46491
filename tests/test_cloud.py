"""cloud/: input checks, quoting, and submit runs against a fake gcloud.

No network and no real gcloud: a fake `gcloud` on PATH records its argv and
fails, or signals the tool, at a chosen step.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

from cloud import checks, gcloud, pack, remote

REPO = Path(__file__).resolve().parent.parent

FAKE_GCLOUD = """\
#!{python}
import json, os, signal, sys, time
from pathlib import Path

argv = sys.argv[1:]
with open(os.environ["FAKE_GCLOUD_LOG"], "a") as log:
    log.write(json.dumps(argv) + "\\n")


def step():
    if "describe" in argv:
        return "exists" if "--format=value(name)" in argv else "describe"
    for verb in ("create", "delete"):
        if verb in argv:
            return verb
    if "scp" in argv:
        if "--recurse" not in argv:
            return "copy"
        source = argv[argv.index("--recurse") + 1]
        return "logs" if source.endswith("/logs") else "copy-back"
    if "ssh" in argv:
        command = [a for a in argv if a.startswith("--command=")][0]
        return "run" if "training/mnist.py" in command else "install"
    return "other"


s = step()
if s == os.environ.get("FAKE_GCLOUD_FAIL"):
    print(f"ERROR: fake failure at {{s}}", file=sys.stderr)
    sys.exit(1)
if s == os.environ.get("FAKE_GCLOUD_SIGNAL_AT"):
    for _ in range(int(os.environ.get("FAKE_GCLOUD_SIGNAL_COUNT", "1"))):
        os.kill(os.getppid(), getattr(signal, os.environ["FAKE_GCLOUD_SIGNAL"]))
        time.sleep(0.2)
    time.sleep(float(os.environ.get("FAKE_GCLOUD_SLEEP", "30")))
    sys.exit(0 if s == "delete" else 1)
if s == "exists":
    if os.environ.get("FAKE_GCLOUD_EXISTS"):
        print(argv[argv.index("describe") + 1])
        sys.exit(0)
    print("ERROR: NOT_FOUND: Resource was not found", file=sys.stderr)
    sys.exit(1)
if s == "describe":
    states = os.environ.get("FAKE_GCLOUD_STATES", "").split(",")
    counter = Path(os.environ["FAKE_GCLOUD_LOG"] + ".polls")
    n = int(counter.read_text()) if counter.exists() else 0
    counter.write_text(str(n + 1))
    ready = "ACTIVE" if "queued-resources" in argv else "READY"
    print(states[n] if n < len(states) and states[n] else ready)
if s in ("copy-back", "logs"):
    dest = Path(argv[argv.index("--recurse") + 2])
    if s == "logs":
        w = [a for a in argv if a.startswith("--worker=")][0].split("=")[1]
        statuses = dict(
            item.split(":")
            for item in os.environ.get("FAKE_GCLOUD_WORKER_EXIT", "").split(",")
            if item
        )
        (dest / "logs").mkdir(parents=True, exist_ok=True)
        (dest / "logs" / f"worker-{{w}}.log").write_text("epoch 1\\n")
        (dest / "logs" / f"worker-{{w}}.exit").write_text(statuses.get(w, "0") + "\\n")
    elif not os.environ.get("FAKE_GCLOUD_NO_METRICS"):
        (dest / "output").mkdir(parents=True, exist_ok=True)
        (dest / "output" / "metrics.json").write_text("{{}}")
if s == "run":
    print("worker 0: training")
"""

BASE = ["--name", "synann-test", "--zone", "us-west4-a"]


@pytest.fixture
def source(tmp_path):
    """A small tree like the repository's, with things that must stay behind."""
    src = tmp_path / "src"
    files = {
        "pyproject.toml": "[project]\n",
        "training/mnist.py": "print('train')\n",
        "training/data/mnist/train-images-idx3-ubyte.gz": "data",
        "keras_synann/__init__.py": "",
        "keras_synann/__pycache__/x.cpython-311.pyc": "",
        ".git/HEAD": "ref",
        ".tox/x": "",
        "runs/old/metrics.json": "{}",
        "build/lib/x.py": "",
        "keras_synann.egg-info/PKG-INFO": "",
        ".env": "TOKEN=secret",
        "key.pem": "secret",
        "sa/my-service-account.json": "{}",
    }
    for name, text in files.items():
        path = src / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return src


@pytest.fixture
def fake(tmp_path, monkeypatch):
    """Put a recording fake gcloud first on PATH; returns a reader of its calls."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    exe = bin_dir / "gcloud"
    exe.write_text(FAKE_GCLOUD.format(python=f"{sys.executable} -S"))
    exe.chmod(0o755)
    log = tmp_path / "gcloud.log"
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_GCLOUD_LOG", str(log))
    for var in list(os.environ):
        if var.startswith("FAKE_GCLOUD_") and var != "FAKE_GCLOUD_LOG":
            monkeypatch.delenv(var)

    def calls() -> list[list[str]]:
        if not log.exists():
            return []
        return [json.loads(line) for line in log.read_text().splitlines()]

    return calls


def steps_of(calls: list[list[str]]) -> list[str]:
    """Name each recorded gcloud call the way the fake classifies it."""
    names = []
    for argv in calls:
        if "describe" in argv:
            names.append("exists" if "--format=value(name)" in argv else "describe")
        elif "create" in argv or "delete" in argv:
            names.append("create" if "create" in argv else "delete")
        elif "scp" in argv:
            if "--recurse" not in argv:
                names.append("copy")
            else:
                src = argv[argv.index("--recurse") + 1]
                names.append("logs" if src.endswith("/logs") else "copy-back")
        else:
            command = [a for a in argv if a.startswith("--command=")][0]
            names.append("run" if "training/mnist.py" in command else "install")
    return names


def submit(tmp_path, source, *extra, env=None, popen=False):
    argv = [sys.executable, "-m", "cloud.tpu", "submit", *BASE]
    argv += ["--accelerator-type", "v5litepod-8", "--source", str(source)]
    argv += ["--poll-interval", "0", "--output-dir", "out", *extra]
    full_env = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
    if popen:
        return subprocess.Popen(
            argv, cwd=tmp_path, env=full_env, stdout=subprocess.PIPE, text=True
        )
    return subprocess.run(
        argv, cwd=tmp_path, env=full_env, capture_output=True, text=True, timeout=60
    )


HAPPY = ["exists", "exists", "create", "describe", "copy", "install", "run"]
HAPPY += ["logs", "copy-back", "delete"]


# -- submit against the fake gcloud -------------------------------------------------


def test_success_runs_every_step_and_deletes(tmp_path, source, fake):
    result = submit(tmp_path, source, "--", "--epochs", "1")
    assert result.returncode == 0, result.stderr
    assert steps_of(fake()) == HAPPY
    assert "worker 0: training" in result.stdout  # worker 0's log is streamed
    assert (tmp_path / "out/output/metrics.json").is_file()
    assert (tmp_path / "out/logs/worker-0.log").is_file()
    names = tarfile.open(tmp_path / "out/source.tar.gz").getnames()
    assert "training/mnist.py" in names
    assert "training/data/mnist/train-images-idx3-ubyte.gz" in names
    run = [a for a in fake()[6] if a.startswith("--command=")][0]
    assert "--epochs 1 --output-dir ../output" in run
    assert "SYNANN_PINS=constraints.txt" in run and "../venv/bin/python" in run


def test_waits_until_active_and_says_so(tmp_path, source, fake):
    env = {"FAKE_GCLOUD_STATES": "WAITING_FOR_RESOURCES,PROVISIONING,ACTIVE"}
    result = submit(tmp_path, source, env=env)
    assert result.returncode == 0, result.stderr
    assert steps_of(fake()).count("describe") == 3
    assert "is WAITING_FOR_RESOURCES" in result.stderr
    assert "is PROVISIONING" in result.stderr


@pytest.mark.parametrize(
    "step, ran",
    [
        ("create", ["exists", "exists", "create"]),
        ("copy", ["exists", "exists", "create", "describe", "copy"]),
        ("install", HAPPY[:6]),
    ],
)
def test_failure_stops_there_and_still_deletes(tmp_path, source, fake, step, ran):
    result = submit(tmp_path, source, env={"FAKE_GCLOUD_FAIL": step})
    assert result.returncode == 1
    assert steps_of(fake()) == ran + ["delete"]
    assert f"step {step} failed" in result.stderr


def test_a_failed_worker_fails_the_run_and_its_log_is_kept(tmp_path, source, fake):
    # Worker 0's training exits 1 and gcloud says so: logs, outputs, delete.
    env = {"FAKE_GCLOUD_FAIL": "run", "FAKE_GCLOUD_WORKER_EXIT": "0:1"}
    result = submit(tmp_path, source, env=env)
    assert result.returncode == 1
    assert steps_of(fake()) == HAPPY
    assert "training failed on worker(s) 0 (exit 1)" in result.stderr
    assert (tmp_path / "out/logs/worker-0.log").is_file()


def test_worker_statuses_decide_not_gcloud_alone(tmp_path, source, fake):
    # Older gcloud returned 0 although a worker failed: its status file says so.
    result = submit(
        tmp_path,
        source,
        "--accelerator-type",
        "v4-16",
        env={"FAKE_GCLOUD_WORKER_EXIT": "1:3"},
    )
    assert result.returncode == 1, result.stderr
    assert steps_of(fake()).count("logs") == 2  # both workers' logs came back
    assert "training failed on worker(s) 1 (exit 3)" in result.stderr
    assert "out/logs/worker-1.log" in result.stderr
    assert steps_of(fake())[-1] == "delete"


def test_gcloud_error_after_clean_workers_is_only_noted(tmp_path, source, fake):
    result = submit(tmp_path, source, env={"FAKE_GCLOUD_FAIL": "run"})
    assert result.returncode == 0, result.stderr
    assert "gcloud ssh exited 1, but every worker's training exited 0" in result.stderr


def test_missing_status_is_a_failure(tmp_path, source, fake):
    result = submit(tmp_path, source, env={"FAKE_GCLOUD_FAIL": "logs"})
    assert result.returncode == 1
    assert "worker(s) 0 (no exit status came back)" in result.stderr
    assert steps_of(fake())[-1] == "delete"


def test_failed_queued_resource_is_deleted(tmp_path, source, fake):
    result = submit(tmp_path, source, env={"FAKE_GCLOUD_STATES": "ACCEPTED,FAILED"})
    assert result.returncode == 1
    assert steps_of(fake())[-1] == "delete"
    assert "is FAILED" in result.stderr


def test_wait_timeout_deletes(tmp_path, source, fake):
    env = {"FAKE_GCLOUD_STATES": ",".join(["WAITING_FOR_RESOURCES"] * 100)}
    args = ["--poll-interval", "0.3", "--wait-timeout", "1s"]
    result = submit(tmp_path, source, *args, env=env)
    assert result.returncode == 1
    assert "not ACTIVE within 0:00:01" in result.stderr
    assert steps_of(fake())[-1] == "delete"
    assert "copy" not in steps_of(fake())


@pytest.mark.parametrize(
    "env", [{"FAKE_GCLOUD_NO_METRICS": "1"}, {"FAKE_GCLOUD_FAIL": "copy-back"}]
)
def test_missing_metrics_is_a_failure(tmp_path, source, fake, env):
    result = submit(tmp_path, source, env=env)
    assert result.returncode == 1
    assert "metrics.json did not come back" in result.stderr
    assert steps_of(fake()) == HAPPY


@pytest.mark.parametrize(
    "step, sig, code",
    [("run", "SIGINT", 130), ("install", "SIGTERM", 143), ("create", "SIGINT", 130)],
)
def test_interrupt_still_deletes(tmp_path, source, fake, step, sig, code):
    env = {"FAKE_GCLOUD_SIGNAL_AT": step, "FAKE_GCLOUD_SIGNAL": sig}
    start = time.monotonic()
    result = submit(tmp_path, source, env=env)
    assert time.monotonic() - start < 20  # the interrupted command was stopped
    assert result.returncode == code
    ran = steps_of(fake())
    assert ran[-1] == "delete"
    assert ran[ran.index(step) + 1 :] == (["logs"] if step == "run" else []) + [
        "delete"
    ]
    assert "interrupted" in result.stderr


def test_signal_while_waiting_deletes(tmp_path, source, fake):
    env = {"FAKE_GCLOUD_STATES": ",".join(["WAITING_FOR_RESOURCES"] * 1000)}
    proc = submit(tmp_path, source, "--poll-interval", "0.05", env=env, popen=True)
    deadline = time.monotonic() + 15
    while "describe" not in steps_of(fake()) and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=20) == 143
    assert steps_of(fake())[-1] == "delete"
    assert "copy" not in steps_of(fake())


def test_one_signal_during_delete_does_not_stop_it(tmp_path, source, fake):
    env = {
        "FAKE_GCLOUD_SIGNAL_AT": "delete",
        "FAKE_GCLOUD_SIGNAL": "SIGINT",
        "FAKE_GCLOUD_SLEEP": "0.5",
    }
    result = submit(tmp_path, source, env=env)
    assert result.returncode == 0, result.stderr
    assert "cleanup in progress" in result.stderr
    assert "deleted synann-test" in result.stderr


def test_second_signal_abandons_cleanup_and_says_how(tmp_path, source, fake):
    env = {
        "FAKE_GCLOUD_SIGNAL_AT": "delete",
        "FAKE_GCLOUD_SIGNAL": "SIGINT",
        "FAKE_GCLOUD_SIGNAL_COUNT": "2",
    }
    start = time.monotonic()
    result = submit(tmp_path, source, env=env)
    assert time.monotonic() - start < 20
    assert result.returncode == 130
    assert "cleanup abandoned" in result.stderr
    assert "queued-resources delete synann-test" in result.stderr.splitlines()[-1]


def test_keep_skips_delete_and_prints_it(tmp_path, source, fake):
    result = submit(tmp_path, source, "--keep")
    assert result.returncode == 0
    assert "delete" not in steps_of(fake())
    assert (
        "gcloud compute tpus queued-resources delete synann-test --zone=us-west4-a "
        "--force --quiet" in result.stderr
    )


def test_failed_delete_is_reported(tmp_path, source, fake):
    result = submit(tmp_path, source, env={"FAKE_GCLOUD_FAIL": "delete"})
    assert result.returncode == 1
    assert "delete failed" in result.stderr
    assert "queued-resources delete synann-test" in result.stderr


def test_existing_tpu_is_left_alone(tmp_path, source, fake):
    result = submit(tmp_path, source, env={"FAKE_GCLOUD_EXISTS": "1"})
    assert result.returncode == 2
    assert steps_of(fake()) == ["exists"]
    assert "already exists" in result.stderr


def test_bad_input_never_calls_gcloud(tmp_path, source, fake):
    result = submit(tmp_path, source, "--zone", "uswest4")
    assert result.returncode == 2
    assert fake() == []
    assert result.stderr.count("\n") == 1 and "zone 'uswest4'" in result.stderr


def test_output_dir_must_be_new(tmp_path, source, fake):
    (tmp_path / "out" / "output").mkdir(parents=True)
    result = submit(tmp_path, source)
    assert result.returncode == 2 and fake() == []
    assert "already holds output/ from an earlier run" in result.stderr


def test_runs_as_a_script_too(tmp_path, source, fake):
    script = REPO / "cloud" / "tpu.py"
    argv = [sys.executable, str(script), "delete", *BASE, "--tpu-vm"]
    result = subprocess.run(argv, cwd=tmp_path, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert fake() == [
        ["compute", "tpus", "tpu-vm", "delete", "synann-test", "--zone=us-west4-a"]
        + ["--quiet"]
    ]


# -- quoting ---------------------------------------------------------------------

HOSTILE = [
    "a b",
    "it's",
    '"double"',
    "x; touch pwned",
    "$(touch pwned)",
    "`touch pwned`",
    "'; touch pwned; '",
    "line\nbreak; touch pwned",
    "--flag=$HOME",
    "*",
]

FAKE_PYTHON = """\
#!/bin/sh
# stands in for the worker venv's python: records its argv, one JSON string per line
"{python}" -c 'import json, os, sys
e = os.environ
print(json.dumps([e["KERAS_BACKEND"], e.get("MY_VAR")] + sys.argv[1:]))' "$@" > "$ARGV_OUT"
echo "trained"
"""


def run_remote(tmp_path, command, worker, python=None):
    """Run a remote command string with sh in a worker home, as ssh would."""
    home = tmp_path / "home"
    (home / "synann_run/src/training").mkdir(parents=True, exist_ok=True)
    (home / "synann_run/logs").mkdir(exist_ok=True)
    venv = home / "synann_run/venv/bin"
    venv.mkdir(parents=True, exist_ok=True)
    (venv / "python").write_text(python or FAKE_PYTHON.format(python=sys.executable))
    bin_dir = tmp_path / "rbin"
    bin_dir.mkdir(exist_ok=True)
    curl = bin_dir / "curl"
    curl.write_text(f"#!/bin/sh\necho {worker}\n")
    for exe in (venv / "python", curl):
        exe.chmod(0o755)
    env = {
        "PATH": f"{bin_dir}{os.pathsep}/usr/bin:/bin",
        "ARGV_OUT": str(tmp_path / "argv.json"),
    }
    return subprocess.run(
        ["sh", "-c", command], cwd=home, env=env, capture_output=True, text=True
    )


@pytest.mark.parametrize("worker", [0, 3])
def test_hostile_training_args_reach_python_intact(tmp_path, worker):
    hostile_env = {"MY_VAR": "x; touch pwned $(touch pwned) 'q'"}
    command = remote.run_command("jax", HOSTILE, env=hostile_env)
    result = run_remote(tmp_path, command, worker)
    assert result.returncode == 0, result.stderr
    argv = json.loads((tmp_path / "argv.json").read_text())
    assert argv[:2] == ["jax", hostile_env["MY_VAR"]]
    assert argv[2:] == ["training/mnist.py", *HOSTILE, "--output-dir", "../output"]
    assert not list(tmp_path.rglob("pwned"))
    log = tmp_path / f"home/synann_run/logs/worker-{worker}.log"
    assert log.read_text() == "trained\n"
    assert result.stdout == ("trained\n" if worker == 0 else "")
    status = tmp_path / f"home/synann_run/logs/worker-{worker}.exit"
    assert status.read_text() == "0\n"


def test_training_exit_code_comes_back(tmp_path):
    command = remote.run_command("jax", ["--epochs", "1"])
    result = run_remote(tmp_path, command, 2, python="#!/bin/sh\nexit 7\n")
    assert result.returncode == 7
    assert (tmp_path / "home/synann_run/logs/worker-2.exit").read_text() == "7\n"


def test_remote_values_are_quoted():
    run = remote.run_command("jax", ["x; rm -rf ~"], env={"A": "b c"})
    assert "'x; rm -rf ~'" in run and "A='b c'" in run
    install = remote.install_command("tensorflow", ["tfds"])
    assert "'.[training,tfds]'" in install  # tensorflow-tpu, not the stock build
    assert "tensorflow-tpu==2.19.1" in install
    # the remote command is one argv element, never split by a local shell
    argv = gcloud.ssh(gcloud.Target("a", "us-west4-a"), run)
    assert argv[-2] == f"--command={run}"


@pytest.mark.parametrize(
    "args, message",
    [
        (["--name", "tpu;rm"], "TPU name"),
        (["--name", "a" * 64], "TPU name"),
        (["--name", "ends-"], "TPU name"),
        (["--zone", "us-west4-a;x"], "zone"),
        (["--project", "p $(x)"], "project"),
        (["--output-dir", "host:dir"], "--output-dir"),
        (["--extra", "tfds];x"], "package extra"),
        (["--backend", "torch"], "torch_xla"),
        (["--provisioning", "cheap"], "provisioning"),
        (["--wait-timeout", "soon"], "duration"),
        (["--runtime-version", "v2-alpha-tpuv6e"], "is for v6e"),
        (["--", "--output-dir", "x"], "--output-dir"),
        (["--env", "A B=1"], "--env"),
        (["--env", "NOVALUE"], "--env"),
        (["--env", "KERAS_BACKEND=torch"], "--backend"),
    ],
)
def test_hostile_or_bad_inputs_are_refused(tmp_path, source, capsys, args, message):
    from cloud import tpu

    argv = ["submit", *BASE, "--accelerator-type", "v5litepod-8", "--dry-run"]
    argv += ["--source", str(source), "--output-dir", str(tmp_path / "o")]
    code = tpu.main(argv + args)
    err = capsys.readouterr().err
    assert code == 2 and message in err and err.count("\n") == 1


# -- checks and packing -------------------------------------------------------------


@pytest.mark.parametrize(
    "name, hosts, runtime",
    [
        ("v5litepod-8", 1, "v2-alpha-tpuv5-lite"),
        ("v5litepod-4", 1, "v2-alpha-tpuv5-lite"),
        ("v5litepod-16", 4, "v2-alpha-tpuv5-lite"),
        ("v5litepod-32", 8, "v2-alpha-tpuv5-lite"),
        ("v6e-8", 1, "v2-alpha-tpuv6e"),
        ("v6e-256", 64, "v2-alpha-tpuv6e"),
        ("v4-8", 1, "tpu-ubuntu2204-base"),
        ("v4-32", 4, "tpu-ubuntu2204-base"),
        ("v5p-8", 1, "v2-alpha-tpuv5"),
        ("v5p-128", 16, "v2-alpha-tpuv5"),
    ],
)
def test_accelerator_table(name, hosts, runtime):
    acc = checks.accelerator(name)
    assert acc.hosts == hosts and acc.multi_host == (hosts > 1)
    assert checks.default_runtime(acc) == runtime


@pytest.mark.parametrize(
    "name", ["v5litepod-12", "v4-12", "v4-4", "v7-8", "v5e-8", "V4-8", "v4", "tpu"]
)
def test_bad_accelerators(name):
    with pytest.raises(ValueError, match="accelerator type"):
        checks.accelerator(name)


def test_names_zones_durations():
    assert checks.tpu_name("a") == "a"
    assert checks.tpu_name("synann-v5e-1") == "synann-v5e-1"
    for bad in ("", "1abc", "Abc", "a_b", "a-", "a" * 64):
        with pytest.raises(ValueError):
            checks.tpu_name(bad)
    for good in ("us-central2-b", "europe-west4-a", "northamerica-northeast1-a"):
        assert checks.zone(good) == good
    for bad in ("us-central2", "us-central2-bb", "US-central2-b"):
        with pytest.raises(ValueError):
            checks.zone(bad)
    assert checks.duration("90") == 90
    assert checks.duration("1h30m") == 5400
    assert checks.duration("2d") == 172800
    for bad in ("0", "1.5h", "-3", "h"):
        with pytest.raises(ValueError):
            checks.duration(bad)


def test_pack_leaves_out_caches_outputs_and_secrets(source):
    out = source / "runs" / "new"
    files = {p.as_posix() for p in pack.select_files(source, [out], ["*.gz"])}
    assert files == {"pyproject.toml", "training/mnist.py", "keras_synann/__init__.py"}
    files = {p.as_posix() for p in pack.select_files(source)}
    assert "training/data/mnist/train-images-idx3-ubyte.gz" in files
    assert not {".env", "key.pem", ".git/HEAD", "sa/my-service-account.json"} & files


def test_no_shell_anywhere():
    for path in (REPO / "cloud").glob("*.py"):
        text = path.read_text()
        assert "shell=True" not in text and "os.system" not in text, path


def test_dry_run_runs_nothing(tmp_path, source, fake):
    result = submit(tmp_path, source, "--dry-run")
    assert result.returncode == 0 and fake() == []
    assert not (tmp_path / "out").exists()
    assert result.stdout.count("\ngcloud ") == len(HAPPY)


def test_status_logs_delete_commands(capsys):
    from cloud import tpu

    assert tpu.main(["status", *BASE, "--project", "my-proj", "--dry-run"]) == 0
    assert tpu.main(["logs", *BASE, "--worker", "all", "--follow", "--dry-run"]) == 0
    assert tpu.main(["delete", *BASE, "--tpu-vm", "--dry-run"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out == [
        "gcloud compute tpus queued-resources describe synann-test "
        "--zone=us-west4-a --project=my-proj",
        "gcloud compute tpus tpu-vm describe synann-test --zone=us-west4-a "
        "--project=my-proj",
        "gcloud compute tpus tpu-vm ssh synann-test --zone=us-west4-a --worker=all "
        "'--command=cd synann_run/logs && tail -n 100 -F worker-*.log' --quiet",
        "gcloud compute tpus tpu-vm delete synann-test --zone=us-west4-a --quiet",
    ]


def test_help_mentions_every_subcommand():
    result = subprocess.run(
        [sys.executable, "-m", "cloud.tpu", "--help"],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0
    for word in ("submit", "status", "logs", "delete"):
        assert word in result.stdout
