"""The wheel holds the C sources, and the installed package compiles and runs
the C loops (implementation="cpu") from its own files, outside the repository."""

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import keras
import pytest

REPO = Path(__file__).resolve().parents[1]

RUN = r"""
import sys
site = sys.argv[1]
sys.path.insert(0, site)
import numpy as np
from keras import ops
import keras_synann
from keras_synann import ops as synann_ops
from keras_synann.kernels import cpu_build

assert keras_synann.__file__.startswith(site), keras_synann.__file__
rng = np.random.default_rng(0)
x = rng.uniform(0, 1, (5, 40)).astype("float32")
kernel = rng.uniform(0, 0.6, (40, 40)).astype("float32")
s = ops.convert_to_numpy(synann_ops.log_inhibition(x, kernel, implementation="cpu"))
expected = np.log1p(-x[:, :, None].astype(np.float64) * kernel[None]).sum(axis=1)
np.testing.assert_allclose(s, expected, rtol=2e-5, atol=2e-5)
print(synann_ops.resolve_implementation("auto", x, kernel))
print(sorted(p.name for p in cpu_build.cache_dir().glob("*.so")))
"""


@pytest.mark.slow
def test_installed_wheel_compiles_and_runs_the_c_loops(tmp_path):
    # Build from a copy of what the wheel is made of, so that no stale build
    # directory of the checkout leaks into it.
    source = tmp_path / "source"
    shutil.copytree(REPO / "keras_synann", source / "keras_synann",
                    ignore=shutil.ignore_patterns("__pycache__"))  # fmt: skip
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(REPO / name, source / name)
    wheels = tmp_path / "wheels"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", str(source), "--no-deps", "-w", str(wheels)],
        check=True, capture_output=True, text=True,
    )  # fmt: skip
    (wheel,) = wheels.glob("keras_synann-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "keras_synann/kernels/cpu_loops.c" in names
    assert "keras_synann/kernels/cpu_ffi.c" in names
    assert any(name.endswith(".dist-info/licenses/LICENSE") for name in names), names
    site = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "--target", str(site), str(wheel)],
        check=True, capture_output=True, text=True,
    )  # fmt: skip
    cache = tmp_path / "cache"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(KERAS_BACKEND=keras.backend.backend(), KERAS_SYNANN_CACHE=str(cache))
    result = subprocess.run(
        [sys.executable, "-I", "-c", RUN, str(site)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    auto, libraries = result.stdout.strip().splitlines()[-2:]
    assert auto == "cpu"
    variant = {"jax": "xla_ffi", "tensorflow": "pthreads", "torch": "openmp"}
    assert f"synann_{variant[keras.backend.backend()]}_" in libraries
