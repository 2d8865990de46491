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

pytestmark = pytest.mark.any_backend  # no Keras backend involved

FAKE_GCLOUD = """\
#!{python}
import json, os, signal, sys, time
from pathlib import Path

argv = sys.argv[1:]
env = os.environ
with open(env["FAKE_GCLOUD_LOG"], "a") as log:
    log.write(json.dumps(argv) + "\\n")
STATE = Path(env["FAKE_GCLOUD_LOG"] + ".state")
state = json.loads(STATE.read_text()) if STATE.exists() else {{}}


def save():
    STATE.write_text(json.dumps(state))


def count(key):
    state[key] = state.get(key, 0) + 1
    save()
    return state[key]


def step():
    if "describe" in argv:
        if "--format=value(name)" in argv:
            return "exists"
        return "workers" if "--format=json" in argv else "describe"
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
        if "training/mnist.py" in command:
            return "run"
        if "preflight:" in command:
            return "preflight"
        if command == "--command=true":
            return "probe"
        return "stop" if "kill -s TERM" in command else "install"
    return "other"


s = step()
hosts = state.get("endpoints", 1)
if s == "create":
    state.update(preempted=False, unreachable=False)
    acc = [a for a in argv if a.startswith("--accelerator-type=")][0].split("=")[1]
    from cloud import checks
    hosts = int(env.get("FAKE_GCLOUD_ENDPOINTS") or checks.accelerator(acc).hosts)
    state["endpoints"] = hosts
    save()
if s == env.get("FAKE_GCLOUD_PREEMPT_AT") and not state.get("preempted"):
    if count("preemptions") <= int(env.get("FAKE_GCLOUD_PREEMPT_TIMES", "1")):
        state["preempted"] = True
        save()
        print("ERROR: connection lost", file=sys.stderr)
        sys.exit(255)
if s == env.get("FAKE_GCLOUD_UNREACHABLE_AT") and not state.get("unreachable"):
    if count("unreachable_times") == 1:
        state["unreachable"] = True
        save()
if s in ("copy", "install", "preflight", "run", "logs", "copy-back", "probe", "stop"):
    if state.get("preempted"):
        print('ERROR: This TPU has terminal state "PREEMPTED"', file=sys.stderr)
        sys.exit(1)
    if state.get("unreachable"):
        print("ssh: connect to host: Connection timed out", file=sys.stderr)
        sys.exit(255)
if s == env.get("FAKE_GCLOUD_FAIL"):
    print(f"ERROR: fake failure at {{s}}", file=sys.stderr)
    sys.exit(1)
if s == env.get("FAKE_GCLOUD_SIGNAL_AT"):
    if count("signal_at") == int(env.get("FAKE_GCLOUD_SIGNAL_NTH", "1")):
        for _ in range(int(env.get("FAKE_GCLOUD_SIGNAL_COUNT", "1"))):
            os.kill(os.getppid(), getattr(signal, env["FAKE_GCLOUD_SIGNAL"]))
            time.sleep(0.2)
        time.sleep(float(env.get("FAKE_GCLOUD_SLEEP", "30")))
        sys.exit(0 if s == "delete" else 1)
if s == "exists":
    if env.get("FAKE_GCLOUD_EXISTS"):
        print(argv[argv.index("describe") + 1])
        sys.exit(0)
    print("ERROR: NOT_FOUND: Resource was not found", file=sys.stderr)
    sys.exit(1)
if s == "describe":
    queued = "queued-resources" in argv
    if state.get("preempted"):
        print("SUSPENDED" if queued else "PREEMPTED")
        sys.exit(0)
    states = env.get("FAKE_GCLOUD_STATES", "").split(",")
    n = count("polls") - 1
    print(states[n] if n < len(states) and states[n] else ("ACTIVE" if queued else "READY"))
if s == "workers":  # the node: its state and workers
    node = "PREEMPTED" if state.get("preempted") else "READY"
    print(json.dumps({{"state": node, "networkEndpoints": [{{}}] * hosts}}))
if s == "preflight":
    lines = env.get("FAKE_GCLOUD_PREFLIGHT") or ",".join(f"{{w}}:ok" for w in range(hosts))
    for item in lines.split(","):
        w, _, result = item.partition(":")
        print(f"preflight: worker {{w}} {{result}}")
    sys.exit(0 if "failed" not in lines else 1)
if s in ("copy-back", "logs"):
    dest = Path(argv[argv.index("--recurse") + 2])
    if s == "logs":
        w = [a for a in argv if a.startswith("--worker=")][0].split("=")[1]
        statuses = dict(
            item.split(":")
            for item in env.get("FAKE_GCLOUD_WORKER_EXIT", "").split(",")
            if item
        )
        (dest / "logs").mkdir(parents=True, exist_ok=True)
        (dest / "logs" / f"worker-{{w}}.log").write_text("epoch 1\\n")
        (dest / "logs" / f"worker-{{w}}.exit").write_text(statuses.get(w, "0") + "\\n")
        if env.get("FAKE_GCLOUD_SIGTERM"):  # the run recorded a SIGTERM
            (dest / "logs" / f"worker-{{w}}.sigterm").write_text("SIGTERM\\n")
    elif not env.get("FAKE_GCLOUD_NO_METRICS"):
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
        "pyproject.toml": (REPO / "pyproject.toml").read_text(),
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
            if "--format=value(name)" in argv:
                names.append("exists")
            else:
                names.append("workers" if "--format=json" in argv else "describe")
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
            if "training/mnist.py" in command:
                names.append("run")
            elif "preflight:" in command:
                names.append("preflight")
            elif command == "--command=true":
                names.append("probe")
            else:
                names.append("stop" if "kill -s TERM" in command else "install")
    return names


def commands_of(calls: list[list[str]], step: str) -> list[str]:
    """The remote commands of the recorded calls of one step."""
    return [
        [a for a in argv if a.startswith("--command=")][0]
        for argv, name in zip(calls, steps_of(calls), strict=True)
        if name == step
    ]


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


HAPPY = ["exists", "exists", "create", "describe", "workers", "copy", "install"]
HAPPY += ["preflight", "run", "logs", "copy-back", "delete"]
ATTEMPT = HAPPY[2:-1]  # create .. copy-back
HEALTH = ["describe", "workers"]  # the queued resource's state, then the node's


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
    (run,) = commands_of(fake(), "run")
    assert "--epochs 1 --output-dir ../output" in run
    assert "SYNANN_PINS=constraints.txt" in run and "../venv/bin/python" in run


RETRY = ["--retries", "1", "--checkpoint-dir", "gs://synann-ckpt/run1"]


def test_preempted_run_is_retried_and_resumes(tmp_path, source, fake):
    env = {"FAKE_GCLOUD_PREEMPT_AT": "run"}
    result = submit(tmp_path, source, *RETRY, "--", "--epochs", "3", env=env)
    assert result.returncode == 0, result.stderr
    # Preempted during run: logs and outputs (refused: the TPU is PREEMPTED),
    # the queued resource's state (SUSPENDED), delete, then a new attempt.
    lost = ["logs", "copy-back", "describe", "delete"]
    assert steps_of(fake()) == HAPPY[:2] + ATTEMPT[:7] + lost + ATTEMPT + ["delete"]
    first, second = commands_of(fake(), "run")
    assert "--epochs 3 --checkpoint-dir gs://synann-ckpt/run1 --output-dir" in first
    assert "--resume" not in first and "synann-test-1" in first
    assert "--checkpoint-dir gs://synann-ckpt/run1 --resume --output-dir" in second
    assert "synann-test-2" in second
    lines = [ln for ln in result.stderr.splitlines() if "] attempt " in ln]
    assert lines == [
        "[tpu] attempt 1 of 2: create the TPU, copy, install, train",
        "[tpu] attempt 1 of 2: the slice was lost during step run (queued resource "
        "synann-test is SUSPENDED); deleting it, then attempt 2 resumes from "
        "gs://synann-ckpt/run1",
        "[tpu] attempt 2 of 2: a new TPU; training resumes from "
        "gs://synann-ckpt/run1 (--resume)",
        "[tpu] attempt 2 of 2 succeeded",
    ]
    assert (tmp_path / "out/output/metrics.json").is_file()


def test_preemption_without_retries_is_named_with_the_way_out(tmp_path, source, fake):
    result = submit(tmp_path, source, env={"FAKE_GCLOUD_PREEMPT_AT": "install"})
    assert result.returncode == 1
    assert steps_of(fake()) == HAPPY[:7] + ["describe", "delete"]
    last_error = [ln for ln in result.stderr.splitlines() if "error:" in ln][-1]
    assert last_error == (
        "[tpu] error: the slice was lost during step install: queued resource "
        "synann-test is SUSPENDED; with --retries N --checkpoint-dir "
        "gs://BUCKET/PATH, submit replaces a lost slice and training resumes"
    )


def test_retries_run_out(tmp_path, source, fake):
    env = {"FAKE_GCLOUD_PREEMPT_AT": "preflight", "FAKE_GCLOUD_PREEMPT_TIMES": "2"}
    result = submit(tmp_path, source, *RETRY, env=env)
    assert result.returncode == 1
    assert steps_of(fake()).count("create") == 2
    assert steps_of(fake()).count("delete") == 2
    assert "no retries left (--retries 1)" in result.stderr


def test_lost_while_waiting_is_retried(tmp_path, source, fake):
    env = {"FAKE_GCLOUD_STATES": "PROVISIONING,SUSPENDED"}
    result = submit(tmp_path, source, *RETRY, env=env)
    assert result.returncode == 0, result.stderr
    assert steps_of(fake()).count("create") == 2
    assert "lost during step wait (queued resource synann-test is SUSPENDED)" in (
        result.stderr
    )


def test_a_sigterm_then_a_lost_state_is_a_preemption(tmp_path, source, fake):
    # The workers got SIGTERM and exited 143; the state changes only later.
    env = {
        "FAKE_GCLOUD_WORKER_EXIT": "0:143",
        "FAKE_GCLOUD_SIGTERM": "1",
        "FAKE_GCLOUD_STATES": "ACTIVE,ACTIVE,ACTIVE,SUSPENDED",
    }
    result = submit(tmp_path, source, env=env)
    assert result.returncode == 1
    assert (
        "the slice was lost during step run: queued resource synann-test is "
        "SUSPENDED (preempted: worker(s) 0 got SIGTERM first)" in result.stderr
    )
    assert "--retries N" in result.stderr  # a preemption: retries would help
    assert steps_of(fake())[-1] == "delete"


def _submission(tmp_path, source, *extra):
    from cloud import options, tpu

    argv = ["submit", *BASE, "--accelerator-type", "v5litepod-8", "--source"]
    argv += [str(source), "--poll-interval", "0", "--output-dir", str(tmp_path / "o")]
    args = tpu.build_parser().parse_args([*argv, *extra])
    return options.submission_from_args(args, [], tpu._target(args))


def test_a_sigterm_on_a_healthy_slice_is_watched_for_a_bounded_time(
    tmp_path, source, fake
):
    import dataclasses

    from cloud import steps
    from cloud.runner import Runner

    sub = _submission(tmp_path, source)
    sub.limits = dataclasses.replace(sub.limits, preempt_poll_s=3)
    start = time.monotonic()
    assert steps.watch_for_preemption(Runner(), sub, [0]) is None  # a failure
    assert 3 <= time.monotonic() - start < 20
    assert set(steps_of(fake())) == {"describe", "workers"}  # states only


def test_workers_that_no_longer_answer_count_as_lost(tmp_path, source, fake):
    # The node still says READY, but no worker answers ssh: a new slice.
    env = {"FAKE_GCLOUD_UNREACHABLE_AT": "run"}
    result = submit(tmp_path, source, *RETRY, "--accelerator-type", "v4-16", env=env)
    assert result.returncode == 0, result.stderr
    ran = steps_of(fake())
    assert ran.count("create") == 2 and ran.count("probe") == 2
    assert "none of its 2 workers answers ssh" in result.stderr


def test_a_failed_worker_on_a_healthy_slice_is_not_retried(tmp_path, source, fake):
    env = {"FAKE_GCLOUD_WORKER_EXIT": "0:1"}
    result = submit(tmp_path, source, *RETRY, env=env)
    assert result.returncode == 1
    assert steps_of(fake()).count("create") == 1
    assert "training failed on worker(s) 0 (exit 1)" in result.stderr


def test_interrupt_during_a_retry_deletes(tmp_path, source, fake):
    env = {
        "FAKE_GCLOUD_PREEMPT_AT": "run",
        "FAKE_GCLOUD_SIGNAL_AT": "install",
        "FAKE_GCLOUD_SIGNAL_NTH": "2",
        "FAKE_GCLOUD_SIGNAL": "SIGINT",
    }
    result = submit(tmp_path, source, *RETRY, env=env)
    assert result.returncode == 130
    ran = steps_of(fake())
    assert ran.count("create") == 2 and ran.count("delete") == 2
    assert ran[-2:] == ["install", "delete"]


def test_interrupt_while_deleting_a_lost_slice_creates_no_other(tmp_path, source, fake):
    env = {
        "FAKE_GCLOUD_PREEMPT_AT": "run",
        "FAKE_GCLOUD_SIGNAL_AT": "delete",
        "FAKE_GCLOUD_SIGNAL": "SIGTERM",
        "FAKE_GCLOUD_SLEEP": "0.5",
    }
    result = submit(tmp_path, source, *RETRY, env=env)
    assert result.returncode == 143
    assert steps_of(fake()).count("create") == 1
    assert steps_of(fake())[-1] == "delete"
    assert "cleanup in progress" in result.stderr


def test_a_slice_past_its_deadline_is_not_replaced(
    tmp_path, source, fake, monkeypatch, capsys
):
    """A slice gone at its deadline (its own watchdog deleted it) ended by
    --max-run-duration: a failure, not a lost slice to replace."""
    from cloud import plan, submit
    from cloud.runner import Runner

    monkeypatch.setenv("FAKE_GCLOUD_PREEMPT_AT", "run")
    monkeypatch.setenv("PYTHONPATH", str(REPO))  # the fake gcloud imports cloud
    sub = _submission(tmp_path, source, *RETRY, "--max-run-duration", "1h")
    clock = iter([1.8e9] + [1.8e9 + 3601] * 100)  # create, then past the deadline
    monkeypatch.setattr(plan, "now", lambda: next(clock))
    Path(sub.local_dir).mkdir(parents=True)
    assert submit.run_submission(sub, Runner()) == 1
    assert steps_of(fake()).count("create") == 1
    assert steps_of(fake())[-1] == "delete"
    err = capsys.readouterr().err
    assert "synann-test reached its deadline, 2027-01-15 09:00:00 UTC" in err, err


def test_limits_use_a_clock_that_counts_suspend():
    """Time limits read CLOCK_BOOTTIME (time.monotonic stops while the machine
    is suspended); the suspend itself is not reproduced here."""
    from cloud import runner

    assert time.CLOCK_BOOTTIME  # Linux
    before = time.clock_gettime(time.CLOCK_BOOTTIME)
    assert before <= runner.clock() <= time.clock_gettime(time.CLOCK_BOOTTIME)


def test_worker_count_comes_from_the_created_tpu(tmp_path, source, fake):
    result = submit(tmp_path, source, env={"FAKE_GCLOUD_ENDPOINTS": "2"})
    assert result.returncode == 0, result.stderr
    assert steps_of(fake()).count("copy") == 2
    assert steps_of(fake()).count("logs") == 2
    assert (
        "note: synann-test has 2 workers (networkEndpoints) but the accelerator "
        "table says 1 for v5litepod-8; using 2" in result.stderr
    )
    copies = [argv for argv in fake() if steps_of([argv]) == ["copy"]]
    workers = [a for argv in copies for a in argv if a.startswith("--worker=")]
    assert sorted(workers) == ["--worker=0", "--worker=1"]  # run at once: any order


@pytest.mark.parametrize(
    "lines, message",
    [
        (
            "0:ok,1:failed: Python 3.10 (pinned 3.11)",
            "preflight failed on worker 1: Python 3.10 (pinned 3.11)",
        ),
        ("0:ok,0:ok", "no report from worker(s) 1 (reported: 0)"),
    ],
)
def test_preflight_stops_before_any_worker_trains(
    tmp_path, source, fake, lines, message
):
    env = {"FAKE_GCLOUD_PREFLIGHT": lines}
    result = submit(tmp_path, source, "--accelerator-type", "v4-16", *RETRY, env=env)
    assert result.returncode == 1
    assert "run" not in steps_of(fake())
    assert steps_of(fake()).count("create") == 1  # not a lost slice: no retry
    assert steps_of(fake())[-1] == "delete"
    assert message in result.stderr


def test_keep_stops_the_training_after_a_failure(tmp_path, source, fake):
    env = {"FAKE_GCLOUD_WORKER_EXIT": "0:1"}
    result = submit(tmp_path, source, "--keep", env=env)
    assert result.returncode == 1
    assert steps_of(fake())[-1] == "stop"
    assert "delete" not in steps_of(fake())


@pytest.mark.parametrize(
    "args, message",
    [
        (["--retries", "2"], "--retries 2 needs --checkpoint-dir"),
        (["--checkpoint-dir", "ckpt"], "is not a gs:// path"),
        (["--checkpoint-dir", "gs://x"], "does not name a valid bucket"),
        (["--retries", "-1"], "--retries '-1' is not valid"),
        (
            ["--rehearse-preempt-after-epoch", "1", "--checkpoint-dir", "gs://bkt/c"],
            "needs --rehearse",
        ),
        (["--rehearse", "--checkpoint-dir", "gs://bkt/c"], "give a local directory"),
        (["--backend", "tensorflow", "--accelerator-type", "v4-16"], "multi-host"),
        (["--backend", "tensorflow", "--accelerator-type", "v4-8"], "PJRT"),
        (
            ["--backend", "tensorflow", "--extra", "tfds"],
            "'tfds' requires tensorflow>=2.19",
        ),
        (["--backend", "tensorflow", "--extra", "legacy"], "requires tf_keras"),
        (["--extra", "nosuch"], "'nosuch' is not in"),
        (
            ["--backend", "tensorflow", "--checkpoint-dir", "gs://bkt/c"],
            "--checkpoint-dir needs --backend jax",
        ),
        (["--", "--checkpoint-dir", "gs://bkt/c"], "give --checkpoint-dir to submit"),
    ],
)
def test_bad_combinations_fail_before_any_gcloud_call(
    tmp_path, source, fake, args, message
):
    result = submit(tmp_path, source, *args)
    assert result.returncode == 2, result.stderr
    assert fake() == []
    assert result.stderr.count("\n") == 1 and message in result.stderr


def test_the_batch_must_split_over_the_slice_before_anything_is_created():
    from cloud import checks

    v6e = checks.accelerator("v6e-256")  # 256 chips, one device each
    with pytest.raises(
        ValueError, match="devices of v6e-256; use a multiple of 256, e.g. 256$"
    ):
        checks.global_batch([], v6e)  # the default 128
    assert checks.global_batch(["--batch-size=512"], v6e) == 512


def test_tensorflow_extras_are_derived_from_pyproject(tmp_path):
    pyproject = tmp_path / "pyproject.toml"
    pyproject.write_text(
        '[project]\nname = "my-pkg"\n[project.optional-dependencies]\n'
        'tf = ["tensorflow-cpu>=2"]\nviz = ["my_pkg[tf]", "rich"]\n'
        'plots = ["matplotlib"]\n'
    )
    assert checks.tensorflow_pullers("viz", pyproject) == ["tensorflow-cpu>=2"]
    assert checks.tensorflow_pullers("plots", pyproject) == []
    assert checks.extras(["plots"], pyproject, "tensorflow") == ["plots"]
    assert checks.extras(["viz"], pyproject, "jax") == ["viz"]  # jax workers: fine
    with pytest.raises(ValueError, match="'viz' requires tensorflow-cpu>=2"):
        checks.extras(["viz"], pyproject, "tensorflow")


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
        ("copy", HAPPY[:6] + HEALTH + ["probe"]),
        ("install", HAPPY[:7] + HEALTH + ["probe"]),
    ],
)
def test_failure_stops_there_and_still_deletes(tmp_path, source, fake, step, ran):
    # The slice is healthy (its state, a worker answering ssh): no retry.
    result = submit(tmp_path, source, env={"FAKE_GCLOUD_FAIL": step})
    assert result.returncode == 1
    assert steps_of(fake()) == ran + ["delete"]
    assert f"step {step} failed" in result.stderr


def test_a_failed_worker_fails_the_run_and_its_log_is_kept(tmp_path, source, fake):
    # Worker 0's training exits 1 and gcloud says so: logs, outputs, delete.
    env = {"FAKE_GCLOUD_FAIL": "run", "FAKE_GCLOUD_WORKER_EXIT": "0:1"}
    result = submit(tmp_path, source, env=env)
    assert result.returncode == 1
    assert steps_of(fake()) == HAPPY[:-1] + HEALTH + ["delete"]
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
    # No status came back: is any worker reachable? (Yes: not a lost slice.)
    assert steps_of(fake())[-5:] == ["copy-back", *HEALTH, "probe", "delete"]


def test_failed_queued_resource_is_deleted_and_not_retried(tmp_path, source, fake):
    # FAILED before it was ever ACTIVE: capacity or the request; no retry.
    env = {"FAKE_GCLOUD_STATES": "ACCEPTED,FAILED"}
    result = submit(tmp_path, source, *RETRY, env=env)
    assert result.returncode == 1
    assert steps_of(fake()).count("create") == 1
    assert steps_of(fake())[-1] == "delete"
    assert "queued resource synann-test FAILED before it was ever ACTIVE" in (
        result.stderr
    )
    assert "--retries N" not in result.stderr


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
    assert steps_of(fake()) == HAPPY[:-1] + HEALTH + ["delete"]


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
    assert proc.wait(timeout=60) == 143  # a loaded 2-core machine: seconds
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


def test_failed_delete_is_retried_then_printed(
    tmp_path, source, fake, capsys, monkeypatch
):
    import dataclasses

    from cloud import steps, submit
    from cloud.runner import Runner

    monkeypatch.setenv("FAKE_GCLOUD_FAIL", "delete")
    sub = _submission(tmp_path, source)
    sub.limits = dataclasses.replace(sub.limits, delete_s=8)
    sub.deadline = 1.8e9
    progress = steps.Progress(created=True)
    start = time.monotonic()
    code = submit._finish(steps.Context(Runner(), sub, progress), 0)
    assert code == 1 and 5 <= time.monotonic() - start < 20
    assert steps_of(fake()) == ["delete", "delete"]  # again after 5 s, then no time
    err = capsys.readouterr().err.splitlines()
    assert "[tpu] trying again in 5s" in err
    assert (
        err[-2] == "[tpu] (else synann-test deletes itself at 2027-01-15 08:00:00 UTC)"
    )
    assert err[-1] == (
        "  gcloud compute tpus queued-resources delete synann-test "
        "--zone=us-west4-a --force --quiet"
    )


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


def run_remote(tmp_path, command, worker, python=None, wait=True):
    """Run a remote command string with sh in a worker home, as ssh would
    (`wait=False`: return the running process). The venv's python runs the
    slice's agent (cloud/agent.py, as packed) with this Python, and stands in
    for training with `python`; no metadata server answers."""
    home = tmp_path / "home"
    (home / "synann_run/src/training").mkdir(parents=True, exist_ok=True)
    (home / "synann_run/src/.synann").mkdir(parents=True, exist_ok=True)
    (home / "synann_run/src/.synann/agent.py").write_text(
        (REPO / "cloud" / "agent.py").read_text()
    )
    (home / "synann_run/logs").mkdir(exist_ok=True)
    venv = home / "synann_run/venv/bin"
    venv.mkdir(parents=True, exist_ok=True)
    training = python or FAKE_PYTHON.format(python=sys.executable)
    (venv / "training").write_text(training)
    (venv / "python").write_text(
        f'#!/bin/sh\nif [ "$1" = {remote.AGENT} ]; then exec {sys.executable} "$@"; fi\n'
        f'exec {venv / "training"} "$@"\n'
    )
    bin_dir = tmp_path / "rbin"
    bin_dir.mkdir(exist_ok=True)
    curl = bin_dir / "curl"
    curl.write_text(f"#!/bin/sh\necho {worker}\n")
    for exe in (venv / "python", venv / "training", curl):
        exe.chmod(0o755)
    env = {
        "PATH": f"{bin_dir}{os.pathsep}/usr/bin:/bin",
        "ARGV_OUT": str(tmp_path / "argv.json"),
        "GCE_METADATA_ROOT": "127.0.0.1:9",  # nothing answers there
    }
    if not wait:
        pipe = subprocess.PIPE
        return subprocess.Popen(
            ["sh", "-c", command],
            cwd=home,
            env=env,
            stdout=pipe,
            stderr=pipe,
            text=True,
        )
    return subprocess.run(
        ["sh", "-c", command], cwd=home, env=env, capture_output=True, text=True
    )


SLOW_PYTHON = """\
#!/bin/sh
# a training that takes a while: counts its starts, prints, exits 3
echo start >> "{starts}"
echo "epoch 1"; sleep 1.5; echo "epoch 2"
exit 3
"""


@pytest.mark.parametrize("second_while_first_runs", [True, False])
def test_run_step_twice_starts_one_training(tmp_path, second_while_first_runs):
    # gcloud runs an ssh command again when its connection failed: the second
    # run follows the first training instead of starting another.
    starts = tmp_path / "starts"
    python = SLOW_PYTHON.format(starts=starts)
    command = remote.run_command("jax", ["--epochs", "2"], run_id="tpu-1")
    first = run_remote(tmp_path, command, 0, python=python, wait=False)
    if not second_while_first_runs:
        first.wait(timeout=30)
    else:
        time.sleep(0.5)
    second = run_remote(tmp_path, command, 0, python=python)
    out, _ = first.communicate(timeout=30)
    assert first.returncode == second.returncode == 3
    assert starts.read_text() == "start\n"
    assert "epoch 1\nepoch 2\n" in out and "epoch 1\nepoch 2\n" in second.stdout
    assert "run tpu-1 was started already; following it" in second.stderr


def test_run_step_refuses_a_second_training(tmp_path):
    starts = tmp_path / "starts"
    python = SLOW_PYTHON.format(starts=starts)
    first = remote.run_command("jax", [], run_id="tpu-1")
    assert run_remote(tmp_path, first, 1, python=python).returncode == 3
    other = remote.run_command("jax", [], run_id="tpu-2")
    result = run_remote(tmp_path, other, 1, python=python)
    assert result.returncode == 1
    assert "another training (tpu-1) holds this worker; not starting run tpu-2" in (
        result.stderr
    )
    assert starts.read_text() == "start\n"


def test_stop_ends_the_training_and_its_children(tmp_path):
    python = "#!/bin/sh\nsleep 60 &\nwait\n"
    run = run_remote(tmp_path, remote.run_command("jax", []), 0, python, wait=False)
    pid_file = tmp_path / "home/synann_run/run/pid"
    deadline = time.monotonic() + 10
    while not pid_file.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    stop = run_remote(tmp_path, remote.stop_command(), 0)
    assert stop.returncode == 0 and "stopped training" in stop.stdout
    run.communicate(timeout=20)
    status = tmp_path / "home/synann_run/logs/worker-0.exit"
    assert run.returncode == 143 and status.read_text() == "143\n"
    group, deadline = int(pid_file.read_text()), time.monotonic() + 10
    while time.monotonic() < deadline:  # nothing of the group is left
        try:
            os.killpg(group, 0)
        except ProcessLookupError:
            break
        time.sleep(0.1)
    else:
        pytest.fail(f"process group {group} still has members")


@pytest.mark.parametrize("worker", [0, 3])
def test_hostile_training_args_reach_python_intact(tmp_path, worker):
    hostile_env = {"MY_VAR": "x; touch pwned $(touch pwned) 'q'"}
    command = remote.run_command("jax", HOSTILE, env=hostile_env)
    result = run_remote(tmp_path, command, worker)
    assert result.returncode == 0, result.stderr
    argv = json.loads((tmp_path / "argv.json").read_text())
    assert argv[:2] == ["jax", hostile_env["MY_VAR"]]
    assert argv[2:] == ["training/mnist.py", *HOSTILE, "--output-dir", "../output",
                        "--status-file", remote.STATUS_FILE]  # fmt: skip
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
    assert f"--command={run}" in argv


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
        (["--", "--batch-size", "100"], "use a multiple of 8, e.g. 96 or 104"),
        (["--service-account", "me"], "--service-account"),
        (["--rehearse-fault", "hang-worker"], "needs --rehearse"),
        (["--rehearse", "--rehearse-fault", "gremlins"], "use one of hang-worker"),
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
        "'--command=cd synann_run/logs && tail -n 100 -F worker-*.log' "
        "--ssh-flag=-oServerAliveInterval=30 --ssh-flag=-oServerAliveCountMax=4 "
        "--ssh-flag=-oConnectTimeout=30 --quiet",
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


def test_a_rehearsal_without_gcloud_says_what_to_install(tmp_path, source):
    env = {**os.environ, "PATH": str(tmp_path / "empty"), "PYTHONPATH": str(REPO)}
    argv = [sys.executable, "-m", "cloud.tpu", "submit", *BASE, "--rehearse"]
    argv += ["--accelerator-type", "v4-16", "--source", str(source)]
    argv += ["--output-dir", str(tmp_path / "o")]
    result = subprocess.run(
        argv, env=env, capture_output=True, text=True, timeout=60, cwd=tmp_path
    )
    assert result.returncode == 2
    last = result.stderr.strip().splitlines()[-1]
    assert "install the Google Cloud CLI" in last and "google-cloud-cli" in last
