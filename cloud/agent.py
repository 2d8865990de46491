"""The slice's own supervisor, on every TPU VM of a slice: the slice keeps its
results and ends itself without the client. Python 3.8+, standard library
only (the watchdog runs on the image's python3 before anything is installed).

    agent.py watchdog      (the startup script, at every boot) delete the
                           slice at its deadline
    agent.py preflight [--output URI]   the metadata, the token, the right
                           to delete the slice, an empty writable URI
    agent.py run --worker N --log-dir DIR [--output-dir DIR] [--output URI]
                 [--delete-after S] [--stop-grace S] -- COMMAND ...
        run training; its log and exit status in DIR/worker-N.{log,exit};
        copy DIR (worker 0: and the outputs) to URI every --copy-every and
        at the end; SIGTERM training --stop-grace before the deadline,
        SIGKILL at it; worker 0 deletes the slice --delete-after seconds
        after training ended (-1: never).

From the metadata server (GCE_METADATA_ROOT, as gcloud and google-auth read
it, else metadata.google.internal): instance/attributes/synann-resource
(locations/Z/queuedResources/Q or .../nodes/N), synann-deadline (Unix time),
agent-worker-number, instance/preempted, and the service account's token.
The deadline is wall-clock time: a reboot or a suspended VM does not move it
(waits re-read the clock every WAKE_S). Deletes are idempotent: gcloud
(`delete --async`), else the TPU API over HTTPS with the token; NOT_FOUND is
done. Endpoints: gcloud's CLOUDSDK_API_ENDPOINT_OVERRIDES_TPU, _STORAGE and
_CLOUDRESOURCEMANAGER where set; copies use the Cloud Storage JSON API.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request

COPY_EVERY_S = 60.0
STOP_GRACE_S = 120.0  # training gets SIGTERM this long before the deadline
WAKE_S = 30.0  # the longest sleep between two readings of the wall clock
FINAL_COPY_S = 120.0  # how long the final copy is retried
ATTRIBUTES = "instance/attributes/"
ENDPOINTS = {
    "tpu": ("CLOUDSDK_API_ENDPOINT_OVERRIDES_TPU", "https://tpu.googleapis.com/"),
    "storage": (
        "CLOUDSDK_API_ENDPOINT_OVERRIDES_STORAGE",
        "https://storage.googleapis.com/",
    ),
    "crm": (
        "CLOUDSDK_API_ENDPOINT_OVERRIDES_CLOUDRESOURCEMANAGER",
        "https://cloudresourcemanager.googleapis.com/",
    ),
}
USER_AGENT = "keras-synann-agent"
LOG_FILE = None


def log(message: str) -> None:
    line = time.strftime("%Y-%m-%dT%H:%M:%SZ ", time.gmtime()) + message + "\n"
    for write in (lambda: sys.stderr.write(line), lambda: _append(LOG_FILE, line)):
        try:
            write()
            sys.stderr.flush()
        except (OSError, ValueError):
            pass


def _append(path, text: str) -> None:
    if path:
        with open(path, "a") as f:
            f.write(text)


def endpoint(api: str) -> str:
    variable, default = ENDPOINTS[api]
    base = os.environ.get(variable) or default
    return base if base.endswith("/") else base + "/"


# -- the metadata server and HTTP -----------------------------------------------------


def http(method, url, body=None, token=None, headers=None, timeout=30.0):
    """(status, body bytes); status 0 when nothing answered."""
    head = {"User-Agent": USER_AGENT, **(headers or {})}
    if token:
        head["Authorization"] = "Bearer " + token
    if isinstance(body, (dict, list)):
        body, head["Content-Type"] = json.dumps(body).encode(), "application/json"
    request = urllib.request.Request(url, data=body, headers=head, method=method)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()
    except (OSError, ValueError) as error:
        return 0, str(error).encode()


def metadata(path: str, timeout: float = 5.0):
    """The metadata server's answer for `path` (text), or None."""
    root = os.environ.get("GCE_METADATA_ROOT") or "metadata.google.internal"
    url = "http://" + root + "/computeMetadata/v1/" + path
    status, body = http(
        "GET", url, headers={"Metadata-Flavor": "Google"}, timeout=timeout
    )
    return body.decode("utf-8", "replace") if status == 200 else None


def token():
    text = metadata("instance/service-accounts/default/token")
    try:
        return json.loads(text)["access_token"] if text else None
    except (ValueError, KeyError, TypeError):
        return None


class Resource:
    """projects/P/locations/Z/queuedResources/Q or .../nodes/N; without
    projects/P, the project is the VM's own (the metadata server's)."""

    def __init__(self, path: str):
        parts = path.strip().strip("/").split("/")
        if parts[:1] == ["locations"]:
            parts = ["projects", metadata("project/project-id") or "", *parts]
        if len(parts) != 6 or parts[0] != "projects" or parts[2] != "locations":
            raise ValueError("not a TPU resource path: " + repr(path))
        if parts[4] not in ("queuedResources", "nodes") or not parts[1]:
            raise ValueError("not a queued resource or node: " + repr(path))
        self.path = "/".join(parts)
        self.project, self.zone, self.kind, self.name = parts[1], parts[3], *parts[4:]

    @property
    def queued(self) -> bool:
        return self.kind == "queuedResources"

    def gcloud_delete(self) -> list:
        group = "queued-resources" if self.queued else "tpu-vm"
        argv = ["gcloud", "compute", "tpus", group, "delete", self.name]
        argv += ["--zone=" + self.zone, "--project=" + self.project]
        return argv + (["--force"] if self.queued else []) + ["--async", "--quiet"]

    def permission(self) -> str:
        return "tpu.queuedResources.delete" if self.queued else "tpu.nodes.delete"


def wait_for_metadata(name: str, patience_s: float = 600.0):
    """An attribute, asked until it answers (the metadata server may not be up
    yet at boot); None when it never does."""
    give_up = time.time() + patience_s
    while True:
        value = metadata(ATTRIBUTES + name)
        if value is not None or time.time() >= give_up:
            return value
        time.sleep(5)


# -- deleting the slice -------------------------------------------------------------


def delete_once(resource: Resource) -> bool:
    """One try, gcloud first; True once the slice is deleted or being deleted."""
    if shutil.which("gcloud"):
        try:
            done = subprocess.run(
                resource.gcloud_delete(),
                stdin=subprocess.DEVNULL,
                capture_output=True,
                text=True,
                timeout=300,
            )
        except (OSError, subprocess.TimeoutExpired) as error:
            log(f"gcloud delete did not finish: {error}")
        else:
            said = (done.stderr or "").strip().splitlines()
            if done.returncode == 0 or "NOT_FOUND" in done.stderr.upper():
                log(f"deleted {resource.path} with gcloud")
                return True
            log(f"gcloud delete exited {done.returncode}: {(said or [''])[-1]}")
    else:
        log("gcloud not found: deleting through the TPU API")
    url = endpoint("tpu") + "v2/" + resource.path
    url += "?force=true" if resource.queued else ""
    status, body = http("DELETE", url, token=token())
    if status in (200, 404):
        log(f"deleted {resource.path} through the TPU API (HTTP {status})")
        return True
    log(f"TPU API delete: HTTP {status} {body[:200].decode('utf-8', 'replace')}")
    return False


def delete(resource: Resource, give_up_at=None) -> bool:
    """Delete until it is done (backoff 2 s doubling to 60 s), or until the
    wall-clock time `give_up_at`."""
    pause = 2.0
    while True:
        if delete_once(resource):
            return True
        if give_up_at is not None and time.time() + pause > give_up_at:
            return False
        time.sleep(pause)
        pause = min(60.0, pause * 2)


def sleep_until(when: float) -> None:
    """Sleep to the wall-clock time `when`, reading the clock every WAKE_S."""
    while True:
        left = when - time.time()
        if left <= 0:
            return
        time.sleep(min(left, WAKE_S))


# -- copies to the output directory ------------------------------------------------------


class Copier:
    """Uploads changed files to gs://BUCKET/PREFIX through the JSON API."""

    def __init__(self, uri: str):
        if not uri.startswith("gs://"):
            raise ValueError("not a gs:// URI: " + repr(uri))
        bucket, _, prefix = uri[len("gs://") :].partition("/")
        self.uri, self.bucket, self.prefix = uri, bucket, prefix.strip("/")
        self.sent = {}

    def name(self, relative: str) -> str:
        return "/".join(p for p in (self.prefix, relative) if p)

    def put(self, relative: str, data: bytes, auth=None) -> int:
        query = urllib.parse.urlencode(
            {"uploadType": "media", "name": self.name(relative)}
        )
        url = endpoint("storage") + f"upload/storage/v1/b/{self.bucket}/o?{query}"
        head = {"Content-Type": "application/octet-stream"}
        status, _ = http("POST", url, data, token=auth or token(), headers=head)
        return status

    def list(self, auth=None) -> list:
        """Up to two object names under the prefix (so: whether it is empty)."""
        prefix = self.prefix + "/" if self.prefix else ""
        query = urllib.parse.urlencode({"prefix": prefix, "maxResults": 2})
        url = endpoint("storage") + f"storage/v1/b/{self.bucket}/o?{query}"
        status, body = http("GET", url, token=auth or token())
        try:
            items = json.loads(body).get("items", []) if status == 200 else []
        except ValueError:
            items = []
        return [item.get("name", "") for item in items]

    def remove(self, relative: str, auth=None) -> int:
        name = urllib.parse.quote(self.name(relative), safe="")
        url = endpoint("storage") + f"storage/v1/b/{self.bucket}/o/{name}"
        return http("DELETE", url, token=auth or token())[0]

    def sync(self, trees) -> bool:
        """Upload every file under each (local dir, remote dir) that changed
        since its last upload; whether all went."""
        auth, ok = None, True
        for local, remote in trees:
            for path in sorted(_files(local)):
                try:
                    stat = os.stat(path)
                except OSError:
                    continue
                stamp = (stat.st_mtime_ns, stat.st_size)
                if self.sent.get(path) == stamp:
                    continue
                auth = auth or token()
                try:
                    with open(path, "rb") as f:
                        data = f.read()
                except OSError:
                    continue
                relative = (
                    remote + "/" + os.path.relpath(path, local).replace(os.sep, "/")
                )
                status = self.put(relative, data, auth)
                if status == 200:
                    self.sent[path] = stamp
                else:
                    ok = False
                    log(f"copy of {path} to {self.uri} failed (HTTP {status})")
        return ok


def _files(directory):
    for here, _, names in os.walk(directory):
        for name in names:
            if not name.startswith("."):
                yield os.path.join(here, name)


# -- the commands ----------------------------------------------------------------------------


def cmd_watchdog(args) -> int:
    path = wait_for_metadata("synann-resource")
    deadline = wait_for_metadata("synann-deadline")
    if not path or not deadline:
        log("no synann-resource or synann-deadline in the metadata: nothing to watch")
        return 0
    resource = Resource(path)
    when = float(deadline)
    log(f"watching {resource.path}: deletes it at {_iso(when)}")
    sleep_until(when)
    log(f"the deadline {_iso(when)} passed: deleting {resource.path}")
    delete(resource)
    return 0


def cmd_preflight(args) -> int:
    """Exits 1 with one line saying what is missing."""
    path = metadata(ATTRIBUTES + "synann-resource")
    deadline = metadata(ATTRIBUTES + "synann-deadline")
    if not path or not deadline:
        return _refuse("no synann-resource or synann-deadline in the VM's metadata")
    resource = Resource(path)
    if float(deadline) <= time.time():
        return _refuse(f"the slice's deadline {_iso(float(deadline))} has passed")
    auth = token()
    if not auth:
        return _refuse("no access token from the metadata server")
    url = endpoint("crm") + f"v1/projects/{resource.project}:testIamPermissions"
    wanted = resource.permission()
    status, body = http("POST", url, {"permissions": [wanted]}, token=auth)
    try:
        granted = json.loads(body).get("permissions", []) if status == 200 else None
    except ValueError:
        granted = None
    if granted is None:
        log(f"note: could not check {wanted} (HTTP {status})")
    elif wanted not in granted:
        return _refuse(
            f"the VM's service account lacks {wanted}, so the slice could not delete "
            f"itself; grant it roles/tpu.admin on project {resource.project}"
        )
    if args.output:
        copier, probe = Copier(args.output), f".synann-probe-{os.getpid()}"
        found = copier.list(auth) if args.new else []
        if found:
            return _refuse(
                f"{args.output} already holds {found[0]} (another run's?); give "
                "a new --output-dir so old results cannot pass for new ones"
            )
        status = copier.put(probe, b"probe", auth)
        if status != 200:
            return _refuse(
                f"cannot write {args.output} (HTTP {status}); the VM's service account "
                "needs roles/storage.objectAdmin on the bucket"
            )
        copier.remove(probe, auth)
    return 0


def _refuse(why: str) -> int:
    print(why, file=sys.stderr)
    return 1


class Run:
    """One worker's training under supervision."""

    def __init__(self, args):
        self.args, self.worker = args, args.worker
        self.logs = args.log_dir
        self.files = {
            k: os.path.join(self.logs, f"worker-{self.worker}.{k}")
            for k in ("log", "exit", "sigterm", "json")
        }
        self.copier = Copier(args.output) if args.output else None
        self.trees = [(self.logs, "logs")]
        if self.worker == 0 and args.output_dir:
            self.trees.append((args.output_dir, "output"))
        path = metadata(ATTRIBUTES + "synann-resource")
        deadline = metadata(ATTRIBUTES + "synann-deadline")
        self.resource = Resource(path) if path else None
        self.deadline = float(deadline) if deadline else None
        self.record = {"worker": self.worker, "state": "running", "exit": None}
        self.record.update(started=_iso(time.time()), deadline=self.deadline)
        self.child = None

    def on_signal(self, signum, frame) -> None:
        """A SIGTERM nobody asked for (a preemption notice reaches every
        process): record it with what the metadata server says."""
        if signum == signal.SIGTERM and not os.path.exists(self.args.stopped_file):
            said = metadata("instance/preempted", timeout=2.0) or "unknown"
            _write(self.files["sigterm"], f"SIGTERM preempted={said.strip()}\n")
        log(f"got {signal.Signals(signum).name}; training ends on its own signal")

    def write_record(self) -> None:
        _write(self.files["json"], json.dumps(self.record) + "\n")

    def copy(self) -> bool:
        return self.copier.sync(self.trees) if self.copier else True

    def main(self) -> int:
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, self.on_signal)
        os.makedirs(self.logs, exist_ok=True)
        self.write_record()
        with open(self.files["log"], "ab") as out:
            self.child = subprocess.Popen(
                self.args.command, stdin=subprocess.DEVNULL, stdout=out, stderr=out
            )
        code = self.supervise()
        _write(self.files["exit"], f"{code}\n")
        now = time.time()
        self.record.update(state="ended", exit=code, ended=_iso(now), ended_at=now)
        self.write_record()
        give_up = time.time() + FINAL_COPY_S
        while not self.copy() and time.time() < give_up:
            time.sleep(5)
        if self.worker == 0 and self.args.delete_after >= 0 and self.resource:
            sleep_until(time.time() + self.args.delete_after)
            log(f"training ended (exit {code}): deleting {self.resource.path}")
            delete(self.resource)
            self.copy()  # this log, while the VMs last
        return code

    def supervise(self) -> int:
        """Wait for training, copying every --copy-every; SIGTERM it
        --stop-grace before the deadline, SIGKILL it at the deadline."""
        every, next_copy, stopped = self.args.copy_every, 0.0, False
        grace = self.args.stop_grace
        while True:
            try:
                code = self.child.wait(timeout=min(every, WAKE_S))
                return code if code >= 0 else 128 - code
            except subprocess.TimeoutExpired:
                pass
            now = time.time()
            if self.deadline and now >= self.deadline - grace and not stopped:
                log(f"the deadline {_iso(self.deadline)} is near: stopping training")
                stopped = True
                self.child.terminate()
            if self.deadline and now >= self.deadline:
                self.child.kill()
            if now >= next_copy:
                self.copy()
                next_copy = now + every


def _write(path: str, text: str) -> None:
    partial = path + ".partial"
    with open(partial, "w") as f:
        f.write(text)
    os.replace(partial, path)


def _iso(when: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(when))


def cmd_run(args) -> int:
    if args.pid_file:
        _write(args.pid_file, f"{os.getpid()}\n")
    return Run(args).main()


def main(argv=None) -> int:
    global LOG_FILE
    parser = argparse.ArgumentParser(
        prog="agent.py", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--log", help="also append the agent's log to this file")
    sub = parser.add_subparsers(dest="command_name", required=True)
    sub.add_parser("watchdog").set_defaults(func=cmd_watchdog)
    p = sub.add_parser("preflight")
    p.add_argument("--output", default="", help="gs:// URI to test a write to")
    p.add_argument("--new", action="store_true", help="--output must be empty")
    p.set_defaults(func=cmd_preflight)
    p = sub.add_parser("run")
    p.add_argument("--worker", type=int, required=True)
    p.add_argument("--log-dir", required=True)
    p.add_argument("--output-dir", default="")
    p.add_argument("--output", default="", help="gs:// URI the copies go to")
    p.add_argument("--delete-after", type=float, default=-1.0)
    p.add_argument("--copy-every", type=float, default=COPY_EVERY_S)
    p.add_argument("--stop-grace", type=float, default=STOP_GRACE_S)
    p.add_argument("--pid-file", default="")
    p.add_argument("--stopped-file", default="/nonexistent")
    p.add_argument("command", nargs=argparse.REMAINDER)
    p.set_defaults(func=cmd_run)
    args = parser.parse_args(argv)
    LOG_FILE = args.log
    if args.command_name == "run":
        args.command = args.command[1:] if args.command[:1] == ["--"] else args.command
        if not args.command:
            parser.error("run needs a command after --")
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
