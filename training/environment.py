"""What a training process runs on: versions, devices, and a check of the pins.

`banner()` starts every training log (each Cloud TPU worker's included): the
Python, keras, backend and NumPy versions, the process and the devices.

`check_pins(path)` compares the installed versions of the packages that decide
the numbers (keras, the backends, NumPy, ml_dtypes, h5py) and the Python version
with a pip constraints file such as the repository's `constraints.txt`
(`name==version` lines; a `# python X.Y` line pins the interpreter). The
training script runs it when `SYNANN_PINS=FILE` is set (`check_pins_in_env`),
as `cloud/` sets it on TPU workers, so a worker whose install went astray
stops before training.
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
import re
import sys
from pathlib import Path

PINS_ENV = "SYNANN_PINS"
#: Distributions whose versions decide a run's numbers (PEP 503 names).
CHECKED = (
    "keras",
    "numpy",
    "ml-dtypes",
    "h5py",
    "jax",
    "jaxlib",
    "libtpu",
    "tensorflow",
    "tensorflow-cpu",
    "tensorflow-tpu",
    "torch",
)
_BACKEND_PACKAGES = {
    "jax": ("jax", "jaxlib", "libtpu"),
    "tensorflow": ("tensorflow", "tensorflow-cpu", "tensorflow-tpu"),
    "torch": ("torch",),
}
_PIN = re.compile(r"([A-Za-z0-9][A-Za-z0-9._-]*)\s*==\s*([^\s;#]+)")
_PYTHON = re.compile(r"#\s*python\s+(\d+\.\d+)\s*$")


class PinMismatch(Exception):
    """The installed versions differ from the pinned ones (one-line message)."""


def _normalized(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def installed(name: str) -> str | None:
    """The installed version of a distribution, or None."""
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def python_version() -> str:
    return platform.python_version()


def versions(backend: str) -> dict[str, str]:
    """Python, keras, NumPy and the backend's installed packages, with versions."""
    names = ("keras", *_BACKEND_PACKAGES.get(backend, ()), "numpy")
    found = {name: installed(name) for name in names}
    return {"python": python_version(), **{k: v for k, v in found.items() if v}}


def banner(backend: str, process: int, processes: int, devices) -> str:
    """The first lines of a training log."""
    packages = ", ".join(f"{k} {v}" for k, v in versions(backend).items())
    return (
        f"Environment: {packages}; backend {backend}; process {process} of "
        f"{processes}; devices ({len(devices)}): {', '.join(map(str, devices))}"
    )


def read_pins(path: str | Path) -> tuple[str | None, dict[str, str]]:
    """(pinned Python "X.Y" or None, {normalized name: version}) from a
    constraints file."""
    python, pins = None, {}
    for line in Path(path).read_text().splitlines():
        if match := _PYTHON.match(line.strip()):
            python = match.group(1)
            continue
        if match := _PIN.match(line.strip()):
            pins[_normalized(match.group(1))] = match.group(2)
    return python, pins


def pin_mismatches(path: str | Path) -> list[str]:
    """What differs from the pins in `path`, one short phrase each."""
    python, pins = read_pins(path)
    problems = []
    running = ".".join(python_version().split(".")[:2])
    if python and running != python:
        # Say what to do: the pins were resolved on that Python, and some of
        # them (wheels of compiled packages) exist only for it.
        problems.append(
            f"Python {running} (pinned {python}: run with a Python {python} "
            f"environment, e.g. made by `uv venv --python {python}`)"
        )
    for name in CHECKED:
        version = installed(name)
        if name in pins and version is not None and version != pins[name]:
            problems.append(f"{name} {version} (pinned {pins[name]})")
    return problems


def check_pins(path: str | Path) -> None:
    """Raise `PinMismatch` (one line) unless the environment matches `path`."""
    if not Path(path).is_file():
        raise PinMismatch(f"{PINS_ENV}={path}: no such constraints file")
    problems = pin_mismatches(path)
    if problems:
        raise PinMismatch(
            f"this environment is not the tested one: {'; '.join(problems)}; "
            f"install with `pip install -c {path} ...` (checked because "
            f"{PINS_ENV}={path}) using {sys.executable}"
        )


def check_pins_in_env() -> None:
    """With SYNANN_PINS=FILE in the environment, `check_pins(FILE)`."""
    pins = os.environ.get(PINS_ENV)
    if pins:
        check_pins(pins)
