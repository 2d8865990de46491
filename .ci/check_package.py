"""Checks the built distributions as PyPI and a user will see them (tox -e package).

    python .ci/check_package.py DIST_DIR

DIST_DIR holds what `python -m build` wrote: one sdist and one wheel. This runs
`twine check --strict` on both and `check-wheel-contents` on the wheel, then makes
a fresh virtual environment in a temporary directory outside the repository,
installs the wheel there with the jax backend (at the versions in
constraints.txt), and runs SMOKE in it from that directory: the package imports
from the venv, its version is the wheel's, implementation="cpu" compiles the C
loops from the wheel's own sources, and a model saves and loads.

jax is the smoke test's backend because it installs as a small CPU wheel on
every platform; a plain `torch` requirement downloads a multi-GB CUDA build.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import venv
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

SMOKE = r"""
import sys
from pathlib import Path

import keras
import numpy as np

import keras_synann
from keras_synann import ops as synann_ops

venv_dir, version = sys.argv[1], sys.argv[2]
assert keras_synann.__file__.startswith(venv_dir), keras_synann.__file__
assert keras_synann.__version__ == version, (keras_synann.__version__, version)
assert keras.backend.backend() == "jax", keras.backend.backend()

rng = np.random.default_rng(0)
x = rng.uniform(0.01, 0.99, (4, 16)).astype("float32")
kernel = rng.uniform(0.0, 0.6, (16, 16)).astype("float32")
got = keras.ops.convert_to_numpy(
    synann_ops.log_inhibition(x, kernel, implementation="cpu")
)
want = np.log1p(-x[:, :, None].astype("float64") * kernel[None]).sum(axis=1)
np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5)
built = sorted(p.name for p in Path(sys.argv[3]).glob("*.so"))
assert built, "implementation='cpu' compiled nothing"

model = keras.Sequential(
    [
        keras.Input((16,)),
        keras.layers.Dense(8, activation="sigmoid"),
        keras_synann.Synapse(implementation="cpu"),
        keras.layers.Dense(3),
    ]
)
model.save("smoke.keras")
loaded = keras.models.load_model("smoke.keras")
np.testing.assert_allclose(model.predict(x, verbose=0), loaded.predict(x, verbose=0))
print(f"keras_synann {version}: import, cpu loops ({', '.join(built)}), save and load")
"""


def run(*argv, **kwargs) -> None:
    shown = ("SMOKE" if a == SMOKE else str(a) for a in argv)
    print("+", " ".join(shown), flush=True)
    subprocess.run([str(a) for a in argv], check=True, **kwargs)


def main(dist: Path) -> None:
    (sdist,) = dist.glob("keras_synann-*.tar.gz")
    (wheel,) = dist.glob("keras_synann-*.whl")
    version = wheel.name.split("-")[1]
    assert sdist.name == f"keras_synann-{version}.tar.gz", (sdist.name, version)

    run(sys.executable, "-m", "twine", "check", "--strict", sdist, wheel)
    run(sys.executable, "-m", "check_wheel_contents", wheel)

    with tempfile.TemporaryDirectory(prefix="keras-synann-smoke-") as tmp:
        home = Path(tmp)
        env_dir = home / "venv"
        venv.create(env_dir, with_pip=True)
        python = env_dir / "bin" / "python"
        env = {
            key: value
            for key, value in os.environ.items()
            if key not in {"PYTHONPATH", "KERAS_BACKEND", "VIRTUAL_ENV"}
        }
        env.update(
            PIP_CONSTRAINT=str(REPO / "constraints.txt"),
            PIP_DISABLE_PIP_VERSION_CHECK="1",
            KERAS_BACKEND="jax",
            KERAS_HOME=str(home / "keras-home"),
            KERAS_SYNANN_CACHE=str(home / "cache"),
            KERAS_SYNANN_REQUIRE_CPU_KERNEL="1",
        )
        run(python, "-m", "pip", "install", "--quiet", f"{wheel}[jax]", env=env)
        run(
            python,
            "-I",
            "-c",
            SMOKE,
            env_dir,
            version,
            home / "cache",
            cwd=home,
            env=env,
        )


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__.strip().splitlines()[2].strip())
    main(Path(sys.argv[1]).resolve())
