"""The slice's agent (cloud/agent.py) against the rehearsal's servers, in
process: its copies to Cloud Storage, its delete over HTTPS and its reading
of the metadata server, without ssh or gcloud (fast)."""

from __future__ import annotations

import json
import time

import pytest

from cloud import agent
from cloud.rehearsal.api import Clock, TpuApi
from cloud.rehearsal.metadata import MetadataServer, worker_token
from cloud.rehearsal.server import Journal, Server
from cloud.rehearsal.storage import Storage, crc32c

pytestmark = pytest.mark.any_backend


class _Api(Server):
    """The TPU API and Cloud Storage of a rehearsal, nothing else."""

    def __init__(self, journal, root):
        super().__init__(journal)
        self.tpu = TpuApi(lambda t: 1, clock=Clock(0, 0, 0, 0.1))
        self.storage = Storage(root / "gcs")

    def answer(self, request):
        if self.storage.handles(request.path):
            return self.storage.answer(request, f"http://{self.address}/")
        return self.tpu.answer(request)


@pytest.fixture
def cloud(tmp_path, monkeypatch):
    """A TPU API with one ACTIVE queued resource `q` (its metadata: a
    deadline and the resource path), Cloud Storage, and worker 0's metadata
    server, each reached the way the agent reaches them on a TPU VM."""
    journal = Journal(tmp_path / "requests.jsonl")
    api = _Api(journal, tmp_path).start()
    body = {
        "tpu": {
            "nodeSpec": [
                {
                    "nodeId": "q",
                    "node": {
                        "acceleratorType": "v5litepod-8",
                        "metadata": {
                            "synann-deadline": str(int(time.time()) + 3600),
                            "synann-resource": "locations/z-a1-b/queuedResources/q",
                        },
                    },
                }
            ]
        }
    }
    base = f"http://{api.address}/"
    url = f"{base}v2/projects/p/locations/z-a1-b/queuedResources?queuedResourceId=q"
    assert agent.http("POST", url, body)[0] == 200  # as gcloud would create it
    for _ in range(4):  # ACCEPTED, WAITING_FOR_RESOURCES, PROVISIONING, ACTIVE
        api.tpu.tick()
    s = api.tpu.slices["q"]
    assert s.qr_state == "ACTIVE"
    metadata = MetadataServer(journal, s, 0).start()
    monkeypatch.setenv("GCE_METADATA_ROOT", metadata.address)
    monkeypatch.setenv("CLOUDSDK_API_ENDPOINT_OVERRIDES_TPU", base)
    monkeypatch.setenv("CLOUDSDK_API_ENDPOINT_OVERRIDES_STORAGE", base)
    monkeypatch.setenv("CLOUDSDK_API_ENDPOINT_OVERRIDES_CLOUDRESOURCEMANAGER", base)
    monkeypatch.setenv("PATH", str(tmp_path / "no-bin"))  # no gcloud
    yield api, journal, tmp_path
    metadata.close()
    api.close()


def test_the_agent_reads_its_metadata_and_token(cloud):
    assert agent.metadata("instance/attributes/agent-worker-number") == "0"
    assert agent.token() == worker_token(1, 0)
    resource = agent.Resource(agent.metadata("instance/attributes/synann-resource"))
    assert resource.path == "projects/p/locations/z-a1-b/queuedResources/q"
    assert resource.gcloud_delete()[-4:] == [
        "--project=p",
        "--force",
        "--async",
        "--quiet",
    ]


def test_copies_send_what_changed_only(cloud):
    api, journal, root = cloud
    logs = root / "logs"
    (logs / "sub").mkdir(parents=True)
    (logs / "worker-0.log").write_text("epoch 1\n")
    (logs / "sub" / "x.json").write_text("{}")
    copier = agent.Copier("gs://bucket/run/1")
    assert copier.sync([(logs, "logs")])
    stored = root / "gcs" / "bucket" / "run" / "1" / "logs"
    assert (stored / "worker-0.log").read_text() == "epoch 1\n"
    assert (stored / "sub" / "x.json").read_text() == "{}"
    uploads = lambda: sum("/upload/" in e["path"] for e in journal.entries)  # noqa: E731
    assert uploads() == 2
    assert copier.sync([(logs, "logs")]) and uploads() == 2  # nothing changed
    (logs / "worker-0.log").write_text("epoch 1\nepoch 2\n")
    assert copier.sync([(logs, "logs")]) and uploads() == 3
    assert (stored / "worker-0.log").read_text().endswith("epoch 2\n")
    assert {e["authorization"] for e in journal.entries if "/upload/" in e["path"]} == {
        f"Bearer {worker_token(1, 0)}"
    }


def test_the_https_delete_is_idempotent(cloud):
    api, journal, _ = cloud
    resource = agent.Resource("locations/z-a1-b/queuedResources/q")
    assert agent.delete_once(resource)  # no gcloud on PATH: the TPU API
    time.sleep(0.3)
    api.tpu.tick()
    assert "q" not in api.tpu.slices
    assert agent.delete_once(resource)  # NOT_FOUND counts as done
    deletes = [e for e in journal.entries if e["method"] == "DELETE"]
    assert [d["query"] for d in deletes] == [{"force": "true"}] * 2
    assert {d["agent"] for d in deletes} == {"keras-synann-agent"}


def test_preflight_wants_a_new_output_directory(cloud, capsys):
    _, journal, _ = cloud
    uri = "gs://bucket/run/2"
    assert agent.main(["preflight", "--output", uri, "--new"]) == 0  # empty: fine
    assert agent.Copier(uri).put("logs/worker-0.log", b"an earlier run") == 200
    assert agent.main(["preflight", "--output", uri, "--new"]) == 1
    assert "gs://bucket/run/2 already holds run/2/logs/worker-0.log" in (
        capsys.readouterr().err
    )
    assert agent.main(["preflight", "--output", uri]) == 0  # a retry adds to it
    asked = [e for e in journal.entries if e["path"].endswith(":testIamPermissions")]
    assert asked and asked[0]["body"] == {"permissions": ["tpu.queuedResources.delete"]}


def test_the_storage_stand_in_reports_crc32c():
    # The check value of CRC-32C (RFC 3720, B.4): "123456789" -> 0xE3069283.
    assert crc32c(b"123456789") == 0xE3069283
    assert json.dumps(crc32c(b"")) == "0"
