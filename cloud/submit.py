"""Run a submission's steps; replace a lost slice; always clean up.

Every failure ends in one line saying which step failed and why. A step that
fails on a slice that was lost (the queued resource FAILED or SUSPENDED, the
node PREEMPTED, TERMINATED, REPAIRING or gone, a maintenance under way, or
none of its workers answering ssh) raises `Lost`: with --retries left, the
slice is deleted and the attempt runs again on a new one (cloud/plan.py).
Any other failure, such as a worker's training exiting non-zero on a healthy
slice, is final. Logs are fetched once training has started, and the TPU is
deleted after success, failure or Ctrl-C (unless --keep), the delete retried
with backoff; a detached run leaves it to the slice once training runs.
"""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

from cloud import plan, steps
from cloud.health import Lost
from cloud.runner import Interrupted, Runner, hms, say
from cloud.steps import Context, Progress, StepFailed


def run_submission(sub: plan.Submission, runner: Runner) -> int:
    """Run every step, attempt after attempt; fetch logs and delete the TPU
    whatever happens."""
    ctx, code = Context(runner, sub, Progress()), 1
    try:
        for step in sub.setup_steps():
            say(f"{step.name}: {step.about}")
            step.runner(ctx, step)
        _multi_host_note(sub)
        for attempt in range(1, sub.attempts + 1):
            ctx.progress.attempt = attempt
            try:
                _run_attempt(ctx)
                break
            except Lost as lost:
                ctx.progress.gone = ctx.progress.gone or lost.gone
                if lost.gone and sub.deadline and plan.now() >= sub.deadline:
                    raise StepFailed(
                        f"{sub.target.name} reached its deadline, "
                        f"{plan.utc(sub.deadline)} (--max-run-duration "
                        f"{hms(sub.max_run_s)}): {lost}"
                    ) from None
                if attempt == sub.attempts:
                    raise StepFailed(_lost_for_good(ctx, lost)) from None
                _replace_lost_slice(ctx, lost)
        say(_done(sub))
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
        code = _finish(ctx, code)
    return code


def _done(sub: plan.Submission) -> str:
    if sub.detach:
        return f"detached: training runs on {sub.target.name}"
    return f"done: results in {sub.local_dir}/output"


def _run_attempt(ctx: Context) -> None:
    sub, progress = ctx.sub, ctx.progress
    attempt = progress.attempt
    progress.started = progress.logs_copied = progress.gone = False
    if sub.attempts > 1:
        what = (
            "create the TPU, copy, install, train"
            if attempt == 1
            else f"a new TPU; training resumes from {sub.checkpoint_dir} (--resume)"
        )
        say(f"attempt {attempt} of {sub.attempts}: {what}")
    for build in sub.attempt_steps():
        step = build(sub, attempt)
        if not step.judges:
            progress.step = step.name
        say(f"{step.name}: {step.about}")
        step.runner(ctx, step)
    if sub.attempts > 1:
        say(f"attempt {attempt} of {sub.attempts} succeeded")


def _multi_host_note(sub: plan.Submission) -> None:
    if sub.acc.multi_host and not sub.rehearse:
        say(
            f"note: gcloud runs ssh on all {sub.acc.hosts} workers at once; if your "
            "key has a passphrase, add it to your ssh-agent first "
            "(ssh-add ~/.ssh/google_compute_engine)"
        )


def _lost_for_good(ctx: Context, lost: Lost) -> str:
    sub = ctx.sub
    message = f"the slice was lost during step {ctx.progress.step}: {lost}"
    if sub.retries:
        return f"{message}; no retries left (--retries {sub.retries})"
    return (
        f"{message}; with --retries N --checkpoint-dir gs://BUCKET/PATH, submit "
        "replaces a lost slice and training resumes"
    )


def _replace_lost_slice(ctx: Context, lost: Lost) -> None:
    """Keep what came back of the lost attempt's logs, delete its TPU."""
    sub, progress, runner = ctx.sub, ctx.progress, ctx.runner
    attempt = progress.attempt
    say(
        f"attempt {attempt} of {sub.attempts}: the slice was lost during step "
        f"{progress.step} ({lost}); deleting it, then attempt {attempt + 1} resumes "
        f"from {sub.checkpoint_dir}"
    )
    with runner.protect():
        if progress.started and not progress.logs_copied:
            logs = plan.logs_step(sub)
            logs.runner(ctx, logs)
        logs = Path(sub.local_dir) / "logs"
        if logs.is_dir():
            kept = logs.with_name(f"logs-attempt-{attempt}")
            logs.rename(kept)
            say(f"kept attempt {attempt}'s logs in {kept}")
        delete = sub.delete_step()
        say("delete: delete the lost TPU before creating a new one")
        deleted = delete.runner(ctx, delete)
    progress.created = not deleted
    runner.raise_pending()  # Ctrl-C while deleting: no new TPU
    if not deleted:
        raise StepFailed("could not delete the lost TPU, so no new one is created")


def _finish(ctx: Context, code: int) -> int:
    sub, progress, runner = ctx.sub, ctx.progress, ctx.runner
    delete = sub.delete_step()
    try:
        with runner.protect():
            if progress.detached and code == 0:
                _print_follow_up(sub)
                return code
            if progress.started and not progress.logs_copied:
                logs = plan.logs_step(sub)
                say(f"logs: {logs.about}")
                logs.runner(ctx, logs)
            if not progress.created:
                return code
            if sub.keep:
                if progress.started and code != 0:
                    stop = sub.stop_step()
                    say(f"{stop.name}: {stop.about}")
                    runner.run(stop.argv, timeout=stop.limit_s)
                say(
                    f"--keep: {sub.target.name} is still running (and billing) until "
                    f"its deadline, {plan.utc(sub.deadline)}; delete it with:\n  "
                    f"{shlex.join(delete.argv)}"
                )
                return code
            say(f"delete: {delete.about}")
            if delete.runner(ctx, delete):
                say(f"deleted {sub.target.name}")
                return code
            say("delete failed; run it by hand:")
    except Interrupted as stop:
        say(f"cleanup abandoned ({stop}); the TPU may still be running. Run:")
        code = code or stop.exit_code
    if sub.deadline:
        say(f"(else {sub.target.name} deletes itself at {plan.utc(sub.deadline)})")
    print(f"  {shlex.join(delete.argv)}", file=sys.stderr, flush=True)
    return code or 1


def _print_follow_up(sub: plan.Submission) -> None:
    say(
        f"training runs on {sub.target.name}; its results go to "
        f"{sub.remote_output}. Worker 0 deletes {sub.target.name} when training "
        f"ends; every worker deletes it at {plan.utc(sub.deadline)} "
        "(--max-run-duration). Follow it with:"
    )
    for line in plan.follow_commands(sub):
        print(f"  {line}", file=sys.stderr, flush=True)


__all__ = ["run_submission", "steps"]
