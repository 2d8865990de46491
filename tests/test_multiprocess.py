"""Several jax processes as one run (2 processes x 2 simulated CPU devices over
loopback, gloo collectives), started as users start training/mnist.py: the
setting that hung (the carried MNIST, validation of more batches than
jaxlib's CPU client keeps in flight), several times.
"""

from __future__ import annotations

import json

import keras
import pytest
from processes import finish, start_cluster

pytestmark = pytest.mark.skipif(
    keras.backend.backend() != "jax", reason="multi-process runs are jax's"
)


def assert_ok(results):
    for r in results:
        assert r.returncode == 0, r.output[-3000:]


# ----------------------------------------------------------------------------
# The setting that hung


@pytest.mark.parametrize("attempt", range(3))
def test_lenet_on_the_carried_mnist_does_not_hang(tmp_path, attempt):
    """Each epoch validates on 5,000 samples in 157 batches of 32: more steps
    than jaxlib's CPU client keeps in flight (32), which deadlocked the
    processes whenever Keras queued them all."""
    args = [
        "--epochs", "2", "--steps-per-epoch", "10", "--batch-size", "32",
        "--verbose", "2", "--output-dir", str(tmp_path / "out"),
    ]  # fmt: skip
    results = finish(start_cluster(args), timeout=240)
    assert_ok(results)
    history = json.loads((tmp_path / "out" / "history.json").read_text())
    assert [row["epoch"] for row in history] == [1, 2]
    tests = [
        [ln for ln in r.output.splitlines() if ln.startswith("Test accuracy")]
        for r in results
    ]
    assert tests[0] == tests[1] and len(tests[0]) == 1
