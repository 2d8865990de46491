"""One Compute Engine metadata server per rehearsal worker, as a TPU VM sees
it: the worker reaches it through GCE_METADATA_ROOT (the variable gcloud and
google-auth read), and it answers only requests that carry
`Metadata-Flavor: Google`, with that header, as the real one does.

    computeMetadata/v1/instance/attributes/KEY    the node's metadata (ssh-keys,
        startup-script, synann-*), agent-worker-number, worker-network-endpoints,
        tpu-env, accelerator-type
    computeMetadata/v1/instance/preempted         FALSE, TRUE once preempted
    computeMetadata/v1/instance/service-accounts/default/token   a token the
        rehearsal API knows as this worker's
    computeMetadata/v1/instance/service-accounts/default/{email,scopes}
    computeMetadata/v1/instance/{zone,hostname,id,name}, project/project-id,
        project/numeric-project-id, universe/universe-domain
"""

from __future__ import annotations

import base64
import json
import time

from cloud.rehearsal.server import Answer, Journal, Request, Server

NUMERIC_PROJECT = "123456789012"
DEFAULT_ACCOUNT = "rehearsal-compute@rehearsal-project.iam.gserviceaccount.com"


def worker_token(number: int, worker: int) -> str:
    """The access token worker `worker` of slice `number` gets."""
    return f"rehearsal-token-{number}-{worker}"


class MetadataServer(Server):
    """Worker `worker` of slice `s` (an api.Slice, read at each request)."""

    def __init__(self, journal: Journal, s, worker: int):
        super().__init__(journal)
        self.slice, self.worker = s, worker

    def who(self, request: Request) -> dict:
        return {"from": f"worker-{self.worker}", "slice": self.slice.name}

    def values(self) -> dict[str, str]:
        s, w = self.slice, self.worker
        endpoints = [s.endpoint(i)[0] for i in range(s.hosts)]
        accelerator = s.node_spec.get("acceleratorType", "")
        tpu_env = {
            "ACCELERATOR_TYPE": accelerator,
            "WORKER_ID": str(w),
            "ZONE": s.zone,
            "NODE_ID": s.name,
            "WORKER_HOSTNAMES": ",".join(
                f"t1v-n-{s.number}-w-{i}" for i in range(s.hosts)
            ),
        }
        account = s.node_spec.get("serviceAccount", {}).get("email") or DEFAULT_ACCOUNT
        attributes = {
            **{k: str(v) for k, v in s.metadata.items()},
            "agent-worker-number": str(w),
            "accelerator-type": accelerator,
            "worker-network-endpoints": ",".join(
                f"t1v-n-{s.number}-w-{i}:{i}:{ip}" for i, ip in enumerate(endpoints)
            ),
            "tpu-env": "".join(f"{k}: '{v}'\n" for k, v in tpu_env.items()),
        }
        token = {
            "access_token": worker_token(s.number, w),
            "expires_in": 3599,
            "token_type": "Bearer",
        }
        info = {
            "aliases": ["default"],
            "email": account,
            "scopes": ["https://www.googleapis.com/auth/cloud-platform"],
        }
        values = {f"instance/attributes/{k}": v for k, v in attributes.items()}
        for name in ("default", account):
            values[f"instance/service-accounts/{name}/?recursive"] = json.dumps(info)
            values[f"instance/service-accounts/{name}/token"] = json.dumps(token)
            values[f"instance/service-accounts/{name}/email"] = account
            values[f"instance/service-accounts/{name}/identity"] = _id_token(account)
        values["instance/attributes/"] = "".join(f"{k}\n" for k in sorted(attributes))
        values.update(
            {
                "instance/preempted": "TRUE" if s.preempted else "FALSE",
                "instance/service-accounts/": f"default/\n{account}/\n",
                "instance/service-accounts/default/scopes": (
                    "https://www.googleapis.com/auth/cloud-platform\n"
                ),
                "instance/zone": f"projects/{NUMERIC_PROJECT}/zones/{s.zone}",
                "instance/hostname": f"t1v-n-{s.number}-w-{w}",
                "instance/name": f"t1v-n-{s.number}-w-{w}",
                "instance/id": str(8000000000 + 100 * s.number + w),
                "project/project-id": s.project,
                "project/numeric-project-id": NUMERIC_PROJECT,
                "universe/universe-domain": "googleapis.com",
            }
        )
        return values

    def answer(self, request: Request):
        if request.headers.get("Metadata-Flavor") != "Google":
            raise Answer(403, "FORBIDDEN", "Missing Metadata-Flavor: Google header")
        path = request.path.removeprefix("/computeMetadata/v1/")
        if request.path in ("/", ""):
            return 200, {"Metadata-Flavor": "Google"}, b"computeMetadata/\n"
        values = self.values()
        if request.arg("recursive") == "true":
            path = path.rstrip("/") + "/?recursive"
        value = values.get(path)
        if value is None and path.endswith("/"):
            value = values.get(path.rstrip("/"))
        if value is None:
            return 404, {"Metadata-Flavor": "Google"}, b"Not Found\n"
        json_value = path.endswith(("/token", "?recursive"))
        kind = "application/json" if json_value else "application/text"
        headers = {"Metadata-Flavor": "Google", "Content-Type": kind}
        return 200, headers, value.encode()


def _id_token(account: str) -> str:
    """An unsigned JWT shaped like Google's identity tokens."""
    now = int(time.time())
    claims = {"iss": "https://accounts.google.com", "email": account}
    claims.update(aud="rehearsal", iat=now, exp=now + 3600, sub="1")
    parts = [{"alg": "RS256", "typ": "JWT"}, claims]
    encoded = [
        base64.urlsafe_b64encode(json.dumps(p).encode()).rstrip(b"=") for p in parts
    ]
    return b".".join([*encoded, b"c2ln"]).decode()
