"""The runners of the submit steps: each takes the `Context` (the runner of
gcloud commands, the submission, what the attempt has done so far) and its
`Step` (cloud/plan.py), runs the step's command(s) within the step's time
limit, and raises `StepFailed` (one line: which step, why) or `Lost` (the
slice was lost: with --retries, a new one replaces it).
"""

from __future__ import annotations

import json
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from cloud import agent, gcloud, remote
from cloud import pack as packing
from cloud.health import BAD_STATES, LOST_STATES, Lost, Node, not_found, slice_lost
from cloud.runner import WATCH_STOPPED, Runner, clock, hms, say

DESCRIBE_RETRIES = 5  # consecutive failed readiness checks before giving up
#: The failedData message of a FAILED queued resource.
FAILED_MESSAGE = "value(state.failedData.error.message)"


class StepFailed(Exception):
    """A submit step failed; the message says which and why."""


@dataclass
class Progress:
    """What the current attempt has done so far (for the cleanup)."""

    attempt: int = 1
    step: str = ""
    created: bool = False
    started: bool = False
    detached: bool = False  # training runs on its own: the client leaves it
    logs_copied: bool = False
    run_rc: int = 0
    run_timed_out: bool = False
    gone: bool = False  # the slice's state says it is lost: no logs to copy


@dataclass
class Context:
    runner: Runner
    sub: object  # cloud.plan.Submission
    progress: Progress


def _exit(rc: int, limit: float) -> str:
    """How a gcloud command ended: its exit code, or the time limit."""
    if rc == 124:
        return f"no answer within {hms(limit)}, the time limit of this step"
    return f"gcloud exit code {rc}"


def _last_line(err: str, default: str) -> str:
    """gcloud's last line of stderr (its error), or `default` if it said nothing."""
    return (err.strip().splitlines() or [default])[-1]


def fail_or_lost(ctx: Context, failure: str) -> None:
    """A step failed: Lost if the slice is gone, else StepFailed."""
    lost = slice_lost(ctx.runner, ctx.sub)
    if lost:
        raise lost
    raise StepFailed(failure)


# -- setup ---------------------------------------------------------------------------------


def check_free(ctx: Context, step) -> None:
    name = ctx.sub.target.name
    rc, _, err = ctx.runner.run(step.argv, capture=True, timeout=step.limit_s)
    if rc == 0:
        raise ValueError(
            f"{name} already exists in this zone; choose another --name, or delete "
            f"it first (python -m cloud.tpu delete --name {name} ...)"
        )
    if not not_found(err):
        last = _last_line(err, f"exit code {rc}")
        raise ValueError(f"could not check whether {name} exists: {last}")


def pack(ctx: Context, step) -> None:
    """The tarball (the tree and, as .synann/agent.py, the slice's agent) and
    the startup script that starts the agent's watchdog at every boot."""
    sub = ctx.sub
    agent_file = Path(agent.__file__)
    try:
        files = packing.select_files(sub.source, [sub.local_dir], sub.excludes)
        extra = {remote.AGENT: agent_file}
        size = packing.write_tarball(sub.source, files, Path(sub.tarball), extra)
        script = remote.startup_script(agent_file.read_text())
        Path(sub.startup_script).write_text(script)
    except OSError as error:
        raise StepFailed(f"cannot pack {sub.source}: {error}") from error
    say(f"packed {len(files)} files ({size / 1e6:.1f} MB) into {sub.tarball}")
    if size > 200e6:
        say("that is large: leave data out with --exclude PATTERN")


# -- the slice -------------------------------------------------------------------------------


def create(ctx: Context, step) -> None:
    ctx.progress.created = True
    rc, _, _ = ctx.runner.run(step.argv, timeout=step.limit_s)
    if rc != 0:
        raise StepFailed(f"step create failed ({_exit(rc, step.limit_s)})")


def wait_ready(ctx: Context, step) -> None:
    sub, runner = ctx.sub, ctx.runner
    t, kind = sub.target, sub.kind
    ready = gcloud.ready_state(t)
    start = clock()
    last, failures, polls = None, 0, 0
    while True:
        rc, out, err = runner.run(
            step.argv, capture=True, echo=polls == 0, timeout=sub.limits.describe_s
        )
        polls += 1
        elapsed = clock() - start
        state = out.strip() if rc == 0 else None
        if state == ready:
            say(f"{kind} {t.name} is {ready} after {hms(elapsed)}")
            return
        if state == "FAILED" and t.queued:  # never ACTIVE: no slice was lost
            raise StepFailed(_failed_before_active(ctx))
        if state in LOST_STATES[t.queued]:
            raise Lost(f"{kind} {t.name} is {state}", gone=True)
        if state in BAD_STATES[t.queued]:
            raise StepFailed(f"{kind} {t.name} is {state}; it will not become {ready}")
        failures = 0 if rc == 0 else failures + 1
        if failures >= DESCRIBE_RETRIES:
            last_err = _last_line(err, f"exit code {rc}")
            raise StepFailed(f"cannot read the state of {t.name}: {last_err}")
        if state != last or polls % 10 == 0:
            say(
                f"waiting for {kind} {t.name} to be {ready}: it is "
                f"{state or 'not readable yet'} ({hms(elapsed)} of "
                f"{hms(sub.wait_timeout_s)})"
            )
            last = state
        remaining = sub.wait_timeout_s - elapsed
        if remaining <= 0:
            raise StepFailed(
                f"{kind} {t.name} was not {ready} within {hms(sub.wait_timeout_s)} "
                f"(last state: {state or 'unknown'}); raise --wait-timeout or try "
                "another zone or --provisioning"
            )
        time.sleep(min(sub.poll_s, remaining))


def _failed_before_active(ctx: Context) -> str:
    """A queued resource FAILED before it was ever ACTIVE: capacity, quota or
    the request itself, which a new attempt would not change."""
    t = ctx.sub.target
    argv = gcloud.describe(t, FAILED_MESSAGE)
    rc, out, _ = ctx.runner.run(argv, capture=True, timeout=ctx.sub.limits.describe_s)
    why = out.strip() if rc == 0 and out.strip() else "no failedData message"
    return (
        f"queued resource {t.name} FAILED before it was ever ACTIVE: {why}; "
        "nothing was retried (try another zone, --provisioning, or a longer "
        "--wait-timeout)"
    )


def count_workers(ctx: Context, step) -> None:
    """The created node's networkEndpoints decide how many workers get copies
    and give logs; the accelerator table is the fallback."""
    sub = ctx.sub
    table = sub.acc.hosts
    rc, out, err = ctx.runner.run(step.argv, capture=True, timeout=step.limit_s)
    node = Node.parse(out) if rc == 0 else None
    found = node.workers if node else 0
    if not found:
        why = _last_line(err, "no networkEndpoints")
        say(
            f"note: could not read {sub.target.name}'s workers ({why}); using the "
            f"accelerator table's {table}"
        )
    elif found != table:
        say(
            f"note: {sub.target.name} has {found} workers (networkEndpoints) but the "
            f"accelerator table says {table} for {sub.acc.name}; using {found}"
        )
    sub.workers = found or table


# -- the workers -----------------------------------------------------------------------------


def copy(ctx: Context, step) -> None:
    """Worker 0 first, alone: its gcloud call makes the ssh key (if there is
    none yet) and puts it in the node's metadata once, so the parallel calls
    for the other workers find both done (concurrent first calls would each
    run ssh-keygen on the same file)."""
    runner, limit = ctx.runner, step.limit_s
    first, rest = step.parallel[0], step.parallel[1:]
    start = clock()
    rc, _, _ = runner.run(first, timeout=limit)
    codes = [rc]
    if rc == 0 and rest:
        codes += runner.run_parallel(rest, timeout=max(1.0, limit - (clock() - start)))
    failed = [str(w) for w, rc in enumerate(codes) if rc != 0]
    if failed:
        how = "; ".join(sorted({_exit(rc, limit) for rc in codes if rc != 0}))
        fail_or_lost(ctx, f"step copy failed for worker(s) {', '.join(failed)} ({how})")


def remote_step(ctx: Context, step) -> None:
    rc, _, _ = ctx.runner.run(step.argv, timeout=step.limit_s)
    if rc != 0:
        fail_or_lost(ctx, f"step {step.name} failed ({_exit(rc, step.limit_s)})")


def run_parallel(ctx: Context, step) -> list[int]:
    return ctx.runner.run_parallel(step.parallel, timeout=step.limit_s)


def preflight(ctx: Context, step) -> None:
    """Every worker must report `preflight: worker N ok`, each N once."""
    sub = ctx.sub
    rc, out, err = ctx.runner.run(step.argv, capture=True, timeout=step.limit_s)
    sys.stderr.write(out + err)
    lines = [ln for ln in out.splitlines() if ln.startswith("preflight: worker ")]
    failed = [
        ln.removeprefix("preflight: ").replace(" failed: ", ": ", 1)
        for ln in lines
        if " failed: " in ln
    ]
    if failed:
        raise StepFailed("preflight failed on " + "; ".join(sorted(set(failed))))
    if rc != 0:
        fail_or_lost(ctx, f"step preflight failed ({_exit(rc, step.limit_s)})")
    # A repeated ssh command (gcloud's retry) may repeat lines: compare sets.
    reported = {ln.split()[2] for ln in lines}
    expected = {str(w) for w in range(sub.workers)}
    if reported != expected:
        missing = ", ".join(sorted(expected - reported, key=int)) or "none"
        raise StepFailed(
            f"preflight: no report from worker(s) {missing} (reported: "
            f"{', '.join(sorted(reported)) or 'none'}); each of the {sub.workers} "
            "workers must report its own index (from the TPU metadata server)"
        )


def run_training(ctx: Context, step) -> None:
    """The run step, within --run-timeout + margin. While it runs, the
    slice's state is read every poll interval (at least 5 s): a slice lost
    meanwhile (preempted, in maintenance) ends the wait at once, instead of
    gcloud retrying ssh to VMs that are gone."""
    sub, progress = ctx.sub, ctx.progress
    progress.started = True
    watcher = Runner(env=ctx.runner.env, label=ctx.runner.label)
    seen: list[Lost] = []

    def lost_meanwhile() -> bool:
        lost = slice_lost(watcher, sub, probe=False, echo=False)
        seen.extend([lost] if lost else [])
        return lost is not None

    progress.run_rc, _, _ = ctx.runner.run(
        step.argv,
        timeout=step.limit_s,
        watch=lost_meanwhile,
        watch_s=max(sub.poll_s, 5.0),
    )
    progress.run_timed_out = progress.run_rc == 124
    if progress.run_rc == WATCH_STOPPED and seen:
        progress.gone = True
        raise Lost(f"{seen[0]} (seen while training ran)", gone=True)


def start_detached(ctx: Context, step) -> None:
    """Start training on every worker and return: each must say that its
    training runs."""
    sub, progress = ctx.sub, ctx.progress
    progress.started = True
    rc, out, err = ctx.runner.run(step.argv, capture=True, timeout=step.limit_s)
    sys.stderr.write(out + err)
    running = {ln.split()[1].rstrip(":") for ln in out.splitlines() if " runs (" in ln}
    expected = {str(w) for w in range(sub.workers)}
    if rc != 0 or running != expected:
        missing = ", ".join(sorted(expected - running, key=int)) or "none"
        fail_or_lost(
            ctx,
            f"step start failed ({_exit(rc, step.limit_s)}; not running: {missing})",
        )
    progress.detached = True


# -- after training ------------------------------------------------------------------------------


def copy_logs(ctx: Context, step) -> None:
    """Every worker's log and exit status into LOCAL_DIR/logs (best effort;
    not from a slice whose state says its VMs are gone)."""
    ctx.progress.logs_copied = True
    if ctx.progress.gone:
        say("the slice's VMs are gone: their logs cannot be copied")
        return
    codes = ctx.runner.run_parallel(step.parallel, timeout=step.limit_s)
    missing = [str(w) for w, rc in enumerate(codes) if rc != 0]
    if missing:
        say(f"could not copy the logs of worker(s) {', '.join(missing)}")


def copy_back(ctx: Context, step) -> None:
    rc, _, _ = ctx.runner.run(step.argv, timeout=step.limit_s)
    if rc != 0:
        say(f"copying the outputs back failed ({_exit(rc, step.limit_s)})")


def worker_statuses(logs_dir: Path, hosts: int) -> dict[int, int | None]:
    """Each worker's training exit status from logs/worker-N.exit (None: none
    came back)."""
    statuses: dict[int, int | None] = {}
    for w in range(hosts):
        try:
            statuses[w] = int((logs_dir / f"worker-{w}.exit").read_text().strip())
        except (OSError, ValueError):
            statuses[w] = None
    return statuses


def sigterm_records(logs_dir: Path, hosts: int) -> list[int]:
    """The workers whose training was ended by a SIGTERM it did not ask for
    (logs/worker-N.sigterm, written by the slice's agent)."""
    return [w for w in range(hosts) if (logs_dir / f"worker-{w}.sigterm").is_file()]


def status_message(logs_dir: Path, worker: int) -> str:
    """What training's status file (--status-file) says, or ""."""
    try:
        record = json.loads((logs_dir / f"status-{worker}.json").read_text())
    except (OSError, ValueError):
        return ""
    return f"{record.get('status', '?')}: {record.get('message', '')}".strip(": ")


def verify(ctx: Context, step) -> None:
    """Success needs every worker's exit status 0 (read from the statuses the
    workers wrote, not only gcloud's exit code) and worker 0's metrics.json.
    A failure on a lost slice raises Lost; so does one that began with a
    SIGTERM to the workers once the slice's state shows the preemption (it
    changes after the VMs got SIGTERM, so it is watched for a while)."""
    sub, progress, runner = ctx.sub, ctx.progress, ctx.runner
    logs = Path(sub.local_dir) / "logs"
    statuses = worker_statuses(logs, sub.workers)
    failed = {w: rc for w, rc in statuses.items() if rc != 0}
    metrics = Path(sub.local_dir) / "output" / "metrics.json"
    terms = sigterm_records(logs, sub.workers)
    if failed or not metrics.is_file() or progress.run_timed_out:
        reachable = any(rc is not None for rc in statuses.values())
        lost = slice_lost(runner, sub, probe=not reachable)
        if not lost and terms:
            lost = watch_for_preemption(runner, sub, terms)
        if lost:
            progress.gone = lost.gone
            raise lost
    if progress.run_timed_out:
        limit = sub.run_timeout_s + sub.limits.run_margin_s
        raise StepFailed(
            f"step run did not end within {hms(limit)} (--run-timeout "
            f"{hms(sub.run_timeout_s)} + {hms(sub.limits.run_margin_s)}): a worker "
            f"stopped answering or training hung; logs in {logs}"
        )
    if failed:
        what = ", ".join(
            f"{w} ("
            + ("no exit status came back" if rc is None else f"exit {rc}")
            + (", SIGTERM" if w in terms else "")
            + (f"; {status_message(logs, w)}" if status_message(logs, w) else "")
            + ")"
            for w, rc in failed.items()
        )
        logs_named = ", ".join(str(logs / f"worker-{w}.log") for w in failed)
        raise StepFailed(f"training failed on worker(s) {what}; see {logs_named}")
    if progress.run_rc != 0:
        say(
            f"note: gcloud ssh exited {progress.run_rc}, but every worker's training "
            "exited 0 (a connection dropped after training?)"
        )
    if not metrics.is_file():
        raise StepFailed(f"training ran but {metrics} did not come back")


def watch_for_preemption(runner: Runner, sub, terms: list[int]) -> Lost | None:
    """Training was ended by SIGTERM: watch the slice's state for at most
    preempt_poll_s; how it was lost, or None."""
    limit = sub.limits.preempt_poll_s
    why = f"worker(s) {', '.join(map(str, terms))} got SIGTERM"
    say(
        f"{why}: watching {sub.target.name}'s state for up to {hms(limit)} (a "
        "preemption shows there after the SIGTERM)"
    )
    deadline = clock() + limit
    while clock() < deadline:
        time.sleep(min(max(sub.poll_s, 1.0), max(0.0, deadline - clock())))
        lost = slice_lost(runner, sub, probe=False)
        if lost:
            return Lost(f"{lost} (preempted: {why} first)", gone=lost.gone)
    say(f"{sub.target.name} stayed usable for {hms(limit)}: not a preemption")
    return None


# -- the end -------------------------------------------------------------------------------------


def delete(ctx: Context, step) -> bool:
    """Delete, retried with backoff (5 s doubling to 60 s) until the step's
    time limit; a resource already gone (the slice deleted itself) counts
    as deleted."""
    runner, limit = ctx.runner, step.limit_s
    give_up, pause, tries = clock() + limit, 5.0, 0
    while True:
        tries += 1
        left = give_up - clock()
        rc, _, err = runner.run(step.argv, capture=True, timeout=max(1.0, left))
        if rc == 0 or (rc != 124 and not_found(err)):
            return True
        say(f"delete failed ({_exit(rc, left)}): {_last_line(err, 'no message')}")
        if clock() + pause >= give_up:
            say(f"gave up after {tries} tries in {hms(limit)}")
            return False
        say(f"trying again in {pause:.0f}s")
        time.sleep(pause)
        pause = min(60.0, pause * 2)


def delete_command(step) -> str:
    return shlex.join(step.argv)
