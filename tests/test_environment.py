"""training/environment.py: the log banner and the check against the pins."""

from __future__ import annotations

import platform
from pathlib import Path

import keras
import numpy as np
import pytest

from training import environment

pytestmark = pytest.mark.any_backend

REPO_PINS = Path(__file__).resolve().parents[1] / "constraints.txt"


def test_pins_are_read_with_normalized_names(tmp_path):
    pins = tmp_path / "c.txt"
    pins.write_text(
        "# a comment\n# python 3.11\nML_Dtypes==0.6.0\ntensorflow_cpu == 2.21.0\n"
        "requests>=2\nkeras==3.15.1 ; python_version >= '3.11'\n"
    )
    python, found = environment.read_pins(pins)
    assert python == "3.11"
    assert found == {
        "ml-dtypes": "0.6.0",
        "tensorflow-cpu": "2.21.0",
        "keras": "3.15.1",
    }


def test_mismatches_name_what_differs(tmp_path):
    pins = tmp_path / "c.txt"
    running = ".".join(platform.python_version().split(".")[:2])
    pins.write_text(
        f"# python 2.7\nkeras=={keras.__version__}\nnumpy==0.1\n"
        "jax==0.0.1\nnot-installed-anywhere==1.0\n"
    )
    problems = environment.pin_mismatches(pins)
    assert (
        f"Python {running} (pinned 2.7: run with a Python 2.7 environment, "
        "e.g. made by `uv venv --python 2.7`)"
    ) in problems
    assert f"numpy {np.__version__} (pinned 0.1)" in problems
    assert not any(p.startswith(("keras", "not-installed")) for p in problems)
    assert any(p.startswith("jax ") for p in problems) == bool(
        environment.installed("jax")
    )
    with pytest.raises(environment.PinMismatch, match="not the tested one: Python"):
        environment.check_pins(pins)


def test_matching_pins_pass(tmp_path):
    pins = tmp_path / "c.txt"
    running = ".".join(platform.python_version().split(".")[:2])
    pins.write_text(f"# python {running}\nnumpy=={np.__version__}\n")
    environment.check_pins(pins)  # no exception
    with pytest.raises(environment.PinMismatch, match="no such constraints file"):
        environment.check_pins(tmp_path / "missing.txt")


def test_repository_pins_name_the_stack_tox_tests():
    python, pins = environment.read_pins(REPO_PINS)
    assert python == "3.11"
    assert {"keras", "jax", "jaxlib", "numpy", "tensorflow"} <= set(pins)
    assert "torch" not in pins  # tox.ini pins the CPU build instead


def test_banner_names_versions_process_and_devices():
    line = environment.banner(keras.backend.backend(), 1, 2, ["cpu:0", "cpu:1"])
    assert line.startswith(f"Environment: python {platform.python_version()}")
    assert f"keras {keras.__version__}" in line and "numpy" in line
    assert line.endswith("process 1 of 2; devices (2): cpu:0, cpu:1")
