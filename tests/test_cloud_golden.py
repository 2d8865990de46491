"""Golden tests: the exact gcloud command sequence `submit --dry-run` prints.

Regenerate after an intended change with UPDATE_GOLDEN=1 and review the diff.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from cloud import plan, tpu

#: The create request's time in every golden file (its deadline follows).
CREATED = 1_800_000_000

GOLDEN = Path(__file__).parent / "golden" / "cloud"
REPO = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.any_backend  # no Keras backend involved

CASES = {
    "single_host": [
        "--name=synann-v5e",
        "--zone=us-west4-a",
        "--accelerator-type=v5litepod-8",
        "--",
        "--epochs",
        "3",
    ],
    "multi_host": [
        "--name=synann-v4",
        "--zone=us-central2-b",
        "--project=my-project",
        "--accelerator-type=v4-32",
        "--provisioning=spot",
        "--wait-timeout=2h",
        "--retries=2",
        "--checkpoint-dir=gs://my-bucket/synann-v4",
        "--",
        "--epochs",
        "5",
        "--batch-size",
        "1024",
    ],
    "tensorflow": [
        "--name=synann-tf",
        "--zone=us-west4-a",
        "--accelerator-type=v5litepod-8",
        "--backend=tensorflow",
        "--tpu-vm",
        "--provisioning=reserved",
        "--",
        "--epochs",
        "1",
    ],
    "detached": [
        "--name=synann-v6e",
        "--zone=us-east5-b",
        "--accelerator-type=v6e-8",
        "--detach",
        "--provisioning=flex-start",
        "--max-run-duration=3h",
        "--output-dir=gs://my-bucket/runs/synann-v6e",
        "--network=my-vpc",
        "--subnetwork=my-subnet",
        "--internal-ips",
        "--tags=allow-ssh,tpu",
        "--labels=team=ml",
        "--gcloud-create-arg=--reservation=my-reservation",
        "--",
        "--epochs",
        "2",
    ],
    "keep": [
        "--name=synann-v6e",
        "--zone=us-east5-b",
        "--accelerator-type=v6e-8",
        "--keep",
        "--run-timeout=3h",
        "--extra=tfds",
        "--output-dir=runs/keep test",
        "--env=XLA_FLAGS=--xla_dump_to=/tmp/x y",
    ],
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_dry_run_matches_golden(case, tmp_path, monkeypatch, capsys):
    (tmp_path / "src" / "training").mkdir(parents=True)
    (tmp_path / "src" / "training" / "mnist.py").write_text("")
    (tmp_path / "src" / "pyproject.toml").write_text(
        (REPO / "pyproject.toml").read_text()  # the extras submit checks
    )
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(plan, "now", lambda: CREATED)
    args = CASES[case]
    cut = args.index("--") if "--" in args else len(args)
    argv = ["submit", *args[:cut], "--source=src", "--dry-run", *args[cut:]]
    assert tpu.main(argv) == 0
    printed = capsys.readouterr().out
    golden = GOLDEN / f"{case}.txt"
    if os.environ.get("UPDATE_GOLDEN"):
        golden.parent.mkdir(parents=True, exist_ok=True)
        golden.write_text(printed)
    assert printed == golden.read_text()
    assert not (tmp_path / "runs").exists()  # a dry run writes nothing
