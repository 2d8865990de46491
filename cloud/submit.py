"""Run a submission's steps through gcloud; replace a lost slice; always clean up.

Every failure ends in one line saying which step failed and why. A step that
fails on a slice that was lost (the queued resource FAILED or SUSPENDED, the
node PREEMPTED or TERMINATED or gone, or none of its workers answering ssh)
raises `Lost`: with --retries left, the slice is deleted and the attempt runs
again on a new one (cloud/plan.py). Any other failure, such as a worker's
training exiting non-zero on a healthy slice, is final. Logs are fetched once
training has started, and the TPU is deleted after success, failure or Ctrl-C
(unless --keep).
"""

from __future__ import annotations

import json
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from cloud import gcloud, pack
from cloud.plan import ATTEMPT_STEPS, Step, Submission, hms
from cloud.runner import WATCH_STOPPED, Interrupted, Runner, say

#: States in which a slice will not become usable again: the queued resource
#: (True) or the TPU VM node (False). Those in LOST are what preemption (or a
#: failed provisioning) leaves: with --retries, a new slice replaces it.
LOST_STATES = {
    True: {"FAILED", "SUSPENDING", "SUSPENDED"},
    False: {"PREEMPTED", "TERMINATED"},
}
BAD_STATES = {
    True: LOST_STATES[True] | {"DELETING"},
    False: LOST_STATES[False] | {"STOPPING", "STOPPED", "DELETING", "HIDDEN"},
}
DESCRIBE_RETRIES = 5  # consecutive failed readiness checks before giving up
#: The failedData message of a FAILED queued resource.
FAILED_MESSAGE = "value(state.failedData.error.message)"


class StepFailed(Exception):
    """A submit step failed; the message says which and why."""


class Lost(Exception):
    """The slice was lost (preempted, failed, unreachable); the message says how.
    `gone`: its state says so (its VMs cannot be reached: no logs to copy)."""

    def __init__(self, message: str, gone: bool = False):
        super().__init__(message)
        self.gone = gone


@dataclass
class Progress:
    """What the current attempt has done so far (for the cleanup)."""

    attempt: int = 1
    step: str = ""
    created: bool = False
    started: bool = False
    logs_copied: bool = False
    run_rc: int = 0
    run_timed_out: bool = False
    gone: bool = False  # the slice's state says it is lost: no logs to copy


def run_submission(sub: Submission, runner: Runner) -> int:
    """Run every step, attempt after attempt; fetch logs and delete the TPU
    whatever happens."""
    progress, code = Progress(), 1
    try:
        for step in sub.setup_steps():
            say(f"{step.name}: {step.about}")
            if step.name == "check":
                _check_free(runner, step, sub.target.name)
            else:
                _pack(sub)
        _multi_host_note(sub)
        for attempt in range(1, sub.attempts + 1):
            progress.attempt = attempt
            try:
                _run_attempt(sub, runner, progress)
                break
            except Lost as lost:
                progress.gone = progress.gone or lost.gone
                if attempt == sub.attempts:
                    raise StepFailed(_lost_for_good(sub, progress, lost)) from None
                _replace_lost_slice(sub, runner, progress, lost)
        say(f"done: results in {sub.output_dir}/output")
        code = 0
    except ValueError as error:  # a pre-flight check, before anything was created
        say(f"error: {error}")
        code = 2
    except StepFailed as error:
        say(f"error: {error}")
    except Interrupted as stop:
        say(f"interrupted ({stop}); cleaning up")
        code = stop.exit_code
    finally:
        code = _finish(sub, runner, code, progress)
    return code


def _run_attempt(sub: Submission, runner: Runner, progress: Progress) -> None:
    attempt = progress.attempt
    progress.started = progress.logs_copied = False
    if sub.attempts > 1:
        what = (
            "create the TPU, copy, install, train"
            if attempt == 1
            else f"a new TPU; training resumes from {sub.checkpoint_dir} (--resume)"
        )
        say(f"attempt {attempt} of {sub.attempts}: {what}")
    for name in ATTEMPT_STEPS:
        step = sub.step(name, attempt)
        if name not in ("logs", "copy-back", "verify"):  # these judge the run
            progress.step = name
        say(f"{step.name}: {step.about}")
        limits = sub.limits
        if name == "create":
            progress.created = True
            _run_step(runner, step, limits.describe_s)
        elif name == "wait":
            _wait_ready(runner, sub, step)
        elif name == "workers":
            _count_workers(runner, sub, step)
        elif name == "copy":
            _copy(runner, sub, step)
        elif name == "install":
            rc, _, _ = runner.run(step.argv, timeout=limits.install_s)
            if rc != 0:
                _fail_or_lost(
                    runner, sub, _step_failure("install", rc, limits.install_s)
                )
        elif name == "preflight":
            _preflight(runner, sub, step)
        elif name == "run":
            progress.started = True
            _run_training(runner, sub, step, progress)
        elif name == "logs":
            progress.logs_copied = True
            _copy_logs(runner, sub)
        elif name == "copy-back":
            rc, _, _ = runner.run(step.argv, timeout=limits.copy_back_s)
            if rc != 0:
                say(
                    f"copying the outputs back failed ({_exit(rc, limits.copy_back_s)})"
                )
        elif name == "verify":
            _verify(runner, sub, progress)
    if sub.attempts > 1:
        say(f"attempt {attempt} of {sub.attempts} succeeded")


def _run_training(
    runner: Runner, sub: Submission, step: Step, progress: Progress
) -> None:
    """The run step, within --run-timeout + margin. While it runs, the
    slice's state is read every poll interval (at least 5 s): a slice lost
    meanwhile (preempted) ends the wait at once, instead of gcloud retrying
    ssh to VMs that are gone."""
    limit = sub.run_timeout_s + sub.limits.run_margin_s
    watcher = Runner(env=runner.env, label=runner.label)
    seen: list[Lost] = []

    def lost_meanwhile() -> bool:
        lost = slice_lost(watcher, sub, probe=False, echo=False)
        seen.extend([lost] if lost else [])
        return lost is not None

    progress.run_rc, _, _ = runner.run(
        step.argv, timeout=limit, watch=lost_meanwhile, watch_s=max(sub.poll_s, 5.0)
    )
    progress.run_timed_out = progress.run_rc == 124
    if progress.run_rc == WATCH_STOPPED and seen:
        progress.gone = True
        raise Lost(f"{seen[0]} (seen while training ran)", gone=True)


def _multi_host_note(sub: Submission) -> None:
    if sub.acc.multi_host and not sub.rehearse:
        say(
            f"note: gcloud runs ssh on all {sub.acc.hosts} workers at once; if your "
            "key has a passphrase, add it to your ssh-agent first "
            "(ssh-add ~/.ssh/google_compute_engine)"
        )


def _lost_for_good(sub: Submission, progress: Progress, lost: Lost) -> str:
    message = f"the slice was lost during step {progress.step}: {lost}"
    if sub.retries:
        return f"{message}; no retries left (--retries {sub.retries})"
    return (
        f"{message}; with --retries N --checkpoint-dir gs://BUCKET/PATH, submit "
        "replaces a lost slice and training resumes"
    )


def _replace_lost_slice(
    sub: Submission, runner: Runner, progress: Progress, lost: Lost
) -> None:
    """Keep what came back of the lost attempt's logs, delete its TPU."""
    attempt = progress.attempt
    say(
        f"attempt {attempt} of {sub.attempts}: the slice was lost during step "
        f"{progress.step} ({lost}); deleting it, then attempt {attempt + 1} resumes "
        f"from {sub.checkpoint_dir}"
    )
    with runner.protect():
        if progress.started and not progress.logs_copied:
            _copy_logs(runner, sub, progress)
        logs = Path(sub.output_dir) / "logs"
        if logs.is_dir():
            kept = logs.with_name(f"logs-attempt-{attempt}")
            logs.rename(kept)
            say(f"kept attempt {attempt}'s logs in {kept}")
        delete = sub.delete_step()
        say("delete: delete the lost TPU before creating a new one")
        rc, _, _ = runner.run(delete.argv, timeout=sub.limits.delete_s)
    progress.created = rc != 0
    runner.raise_pending()  # Ctrl-C while deleting: no new TPU
    if rc != 0:
        raise StepFailed(
            f"could not delete the lost TPU (gcloud exit code {rc}), so no new one "
            "is created"
        )


# -- steps ---------------------------------------------------------------------------


def _exit(rc: int, limit: float) -> str:
    """How a gcloud command ended: its exit code, or the time limit."""
    if rc == 124:
        return f"no answer within {hms(limit)}, the time limit of this step"
    return f"gcloud exit code {rc}"


def _step_failure(name: str, rc: int, limit: float) -> str:
    return f"step {name} failed ({_exit(rc, limit)})"


def _copy(runner: Runner, sub: Submission, step: Step) -> None:
    """Worker 0 first, alone: its gcloud call makes the ssh key (if there is
    none yet) and puts it in the node's metadata once, so the parallel calls
    for the other workers find both done (concurrent first calls would each
    run ssh-keygen on the same file)."""
    limit = sub.limits.copy_s
    first, rest = step.parallel[0], step.parallel[1:]
    start = time.monotonic()
    rc, _, _ = runner.run(first, timeout=limit)
    codes = [rc]
    if rc == 0 and rest:
        left = max(1.0, limit - (time.monotonic() - start))
        codes += runner.run_parallel(rest, timeout=left)
    failed = [str(w) for w, rc in enumerate(codes) if rc != 0]
    if failed:
        how = "; ".join(sorted({_exit(rc, limit) for rc in codes if rc != 0}))
        why = f"step copy failed for worker(s) {', '.join(failed)} ({how})"
        _fail_or_lost(runner, sub, why)


def _check_free(runner: Runner, step: Step, name: str) -> None:
    rc, _, err = runner.run(step.argv, capture=True, timeout=120)
    if rc == 0:
        raise ValueError(
            f"{name} already exists in this zone; choose another --name, or delete "
            f"it first (python -m cloud.tpu delete --name {name} ...)"
        )
    if not _not_found(err):
        last = _last_line(err, f"exit code {rc}")
        raise ValueError(f"could not check whether {name} exists: {last}")


def _last_line(err: str, default: str) -> str:
    """gcloud's last line of stderr (its error), or `default` if it said nothing."""
    return (err.strip().splitlines() or [default])[-1]


def _not_found(err: str) -> bool:
    return "not_found" in err.lower() or "not found" in err.lower()


def _wait_ready(runner: Runner, sub: Submission, step: Step) -> None:
    t, kind = sub.target, sub.kind
    ready = gcloud.ready_state(t)
    start = time.monotonic()
    last, failures, polls = None, 0, 0
    while True:
        rc, out, err = runner.run(
            step.argv, capture=True, echo=polls == 0, timeout=sub.limits.describe_s
        )
        polls += 1
        elapsed = time.monotonic() - start
        state = out.strip() if rc == 0 else None
        if state == ready:
            say(f"{kind} {t.name} is {ready} after {hms(elapsed)}")
            return
        if state == "FAILED" and t.queued:  # never ACTIVE: no slice was lost
            raise StepFailed(_failed_before_active(runner, sub))
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


def _failed_before_active(runner: Runner, sub: Submission) -> str:
    """A queued resource FAILED before it was ever ACTIVE: capacity, quota or
    the request itself, which a new attempt would not change."""
    t = sub.target
    argv = gcloud.describe(t, FAILED_MESSAGE)
    rc, out, _ = runner.run(argv, capture=True, timeout=sub.limits.describe_s)
    why = out.strip() if rc == 0 and out.strip() else "no failedData message"
    return (
        f"queued resource {t.name} FAILED before it was ever ACTIVE: {why}; "
        "nothing was retried (try another zone, --provisioning, or a longer "
        "--wait-timeout)"
    )


def _count_workers(runner: Runner, sub: Submission, step: Step) -> None:
    """The created node's networkEndpoints decide how many workers get copies
    and give logs; the accelerator table is the fallback."""
    table = sub.acc.hosts
    rc, out, err = runner.run(step.argv, capture=True, timeout=sub.limits.describe_s)
    try:
        found = len(json.loads(out)["networkEndpoints"]) if rc == 0 else 0
    except (ValueError, KeyError, TypeError):
        found = 0
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


def _pack(sub: Submission) -> None:
    try:
        files = pack.select_files(sub.source, [sub.output_dir], sub.excludes)
        size = pack.write_tarball(sub.source, files, Path(sub.tarball))
    except OSError as error:
        raise StepFailed(f"cannot pack {sub.source}: {error}") from error
    say(f"packed {len(files)} files ({size / 1e6:.1f} MB) into {sub.tarball}")
    if size > 200e6:
        say("that is large: leave data out with --exclude PATTERN")


def _run_step(runner: Runner, step: Step, limit: float) -> None:
    rc, _, _ = runner.run(step.argv, timeout=limit)
    if rc != 0:
        raise StepFailed(_step_failure(step.name, rc, limit))


def _preflight(runner: Runner, sub: Submission, step: Step) -> None:
    """Every worker must report `preflight: worker N ok`, each N once."""
    rc, out, err = runner.run(step.argv, capture=True, timeout=sub.limits.preflight_s)
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
        _fail_or_lost(
            runner, sub, _step_failure("preflight", rc, sub.limits.preflight_s)
        )
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


def _copy_logs(
    runner: Runner, sub: Submission, progress: Progress | None = None
) -> None:
    """Every worker's log and exit status into OUTPUT_DIR/logs (best effort;
    not from a slice whose state says its VMs are gone)."""
    if progress is not None and progress.gone:
        say("the slice's VMs are gone: their logs cannot be copied")
        return
    codes = runner.run_parallel(sub.logs_step().parallel, timeout=sub.limits.logs_s)
    missing = [str(w) for w, rc in enumerate(codes) if rc != 0]
    if missing:
        say(f"could not copy the logs of worker(s) {', '.join(missing)}")


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
    (logs/worker-N.sigterm, written by the run step on the worker)."""
    return [w for w in range(hosts) if (logs_dir / f"worker-{w}.sigterm").is_file()]


def _verify(runner: Runner, sub: Submission, progress: Progress) -> None:
    """Success needs every worker's exit status 0 (read from the statuses the
    workers wrote, not only gcloud's exit code) and worker 0's metrics.json.
    A failure on a lost slice raises Lost; so does one that began with a
    SIGTERM to the workers once the slice's state shows the preemption (it
    changes after the VMs got SIGTERM, so it is watched for a while)."""
    logs = Path(sub.output_dir) / "logs"
    statuses = worker_statuses(logs, sub.workers)
    failed = {w: rc for w, rc in statuses.items() if rc != 0}
    metrics = Path(sub.output_dir) / "output" / "metrics.json"
    terms = sigterm_records(logs, sub.workers)
    if failed or not metrics.is_file() or progress.run_timed_out:
        reachable = any(rc is not None for rc in statuses.values())
        lost = slice_lost(runner, sub, probe=not reachable)
        if not lost and terms:
            lost = _watch_for_preemption(runner, sub, terms)
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


def _watch_for_preemption(
    runner: Runner, sub: Submission, terms: list[int]
) -> str | None:
    """Training was ended by SIGTERM (or no worker's status came back): watch
    the slice's state for at most preempt_poll_s; how it was lost, or None."""
    limit = sub.limits.preempt_poll_s
    why = (
        f"worker(s) {', '.join(map(str, terms))} got SIGTERM"
        if terms
        else "no worker's exit status came back"
    )
    say(
        f"{why}: watching {sub.target.name}'s state for up to {hms(limit)} (a "
        "preemption shows there after the SIGTERM)"
    )
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        time.sleep(min(max(sub.poll_s, 1.0), max(0.0, deadline - time.monotonic())))
        lost = slice_lost(runner, sub, probe=False)
        if lost:
            return Lost(f"{lost} (preempted: {why} first)", gone=lost.gone)
    say(f"{sub.target.name} stayed usable for {hms(limit)}: not a preemption")
    return None


def _fail_or_lost(runner: Runner, sub: Submission, failure: str) -> None:
    """A step failed: Lost if the slice is gone, else StepFailed."""
    lost = slice_lost(runner, sub)
    if lost:
        raise lost
    raise StepFailed(failure)


def slice_lost(
    runner: Runner, sub: Submission, probe: bool = True, echo: bool = True
) -> Lost | None:
    """How the slice was lost (its state, or no worker answering ssh), or None
    when it is usable."""
    t = sub.target
    checks = [(gcloud.describe_vm(t, gcloud.VM_STATE), False, "TPU VM")]
    if t.queued:
        checks.insert(0, (gcloud.describe(t, gcloud.QR_STATE), True, "queued resource"))
    for argv, queued, kind in checks:
        rc, out, err = runner.run(
            argv, capture=True, timeout=sub.limits.describe_s, echo=echo
        )
        if rc == 0 and out.strip() in LOST_STATES[queued]:
            return Lost(f"{kind} {t.name} is {out.strip()}", gone=True)
        if rc != 0 and _not_found(err):
            return Lost(f"{kind} {t.name} no longer exists", gone=True)
    if not probe:
        return None
    step = sub.probe_step()
    say(f"{step.name}: {step.about}")
    codes = runner.run_parallel(step.parallel, timeout=sub.limits.probe_s)
    if all(rc != 0 for rc in codes):
        return Lost(f"none of its {sub.workers} workers answers ssh")
    return None


# -- cleanup -------------------------------------------------------------------------


def _finish(sub: Submission, runner: Runner, code: int, progress: Progress) -> int:
    delete = sub.delete_step()
    try:
        with runner.protect():
            if progress.started and not progress.logs_copied:
                say(f"logs: {sub.logs_step().about}")
                _copy_logs(runner, sub, progress)
            if not progress.created:
                return code
            if sub.keep:
                if progress.started and code != 0:
                    stop = sub.stop_step()
                    say(f"{stop.name}: {stop.about}")
                    runner.run(stop.argv, timeout=sub.limits.preflight_s)
                say(
                    f"--keep: {sub.target.name} is still running (and billing); "
                    f"delete it with:\n  {shlex.join(delete.argv)}"
                )
                return code
            say(f"delete: {delete.about}")
            rc, _, _ = runner.run(delete.argv, timeout=sub.limits.delete_s)
            if rc == 0:
                say(f"deleted {sub.target.name}")
                return code
            say(f"delete failed (gcloud exit code {rc}); run it by hand:")
    except Interrupted as stop:
        say(f"cleanup abandoned ({stop}); the TPU may still be running. Run:")
        code = code or stop.exit_code
    print(f"  {shlex.join(delete.argv)}", file=sys.stderr, flush=True)
    return code or 1
