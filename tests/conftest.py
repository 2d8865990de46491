"""Shared pytest setup: report the backend, seed every test."""

import os

# Without a CUDA GPU the Triton kernels run in Triton's interpreter. Triton reads
# this when the kernels are defined, so it is set before anything imports them.
if os.environ.get("KERAS_BACKEND") == "torch":
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")

import keras  # noqa: E402
import pytest  # noqa: E402


def pytest_report_header(config):
    return f"keras {keras.__version__}, backend: {keras.backend.backend()}"


@pytest.fixture(autouse=True)
def _seed():
    keras.utils.set_random_seed(1337)
    yield
    keras.config.set_dtype_policy("float32")


def write_idx(path, array) -> None:
    """Writes a uint8 array as a gzip-compressed IDX file."""
    import gzip
    import struct

    import numpy as np

    array = np.asarray(array, dtype=np.uint8)
    header = struct.pack(f">BBBB{array.ndim}I", 0, 0, 0x08, array.ndim, *array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.tobytes())


def write_mnist(directory, n_train: int = 64, n_test: int = 32, seed: int = 0):
    """Tiny learnable MNIST-shaped IDX files (class c lights row band c) plus
    their SHA256SUMS in `directory`; returns the directory."""
    import hashlib
    from pathlib import Path

    import numpy as np

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    arrays = {}
    for split, n in (("train", n_train), ("t10k", n_test)):
        labels = np.arange(n) % 10
        images = rng.integers(0, 40, (n, 28, 28))
        for i, label in enumerate(labels):
            images[i, 2 * label + 4 : 2 * label + 6, 4:24] = 255
        arrays[f"{split}-images-idx3-ubyte.gz"] = images
        arrays[f"{split}-labels-idx1-ubyte.gz"] = labels
    sums = []
    for name, array in arrays.items():
        write_idx(directory / name, array)
        digest = hashlib.sha256((directory / name).read_bytes()).hexdigest()
        sums.append(f"{digest}  {name}\n")
    (directory / "SHA256SUMS").write_text("".join(sums))
    return directory


@pytest.fixture
def mnist_dir(tmp_path):
    """A directory of tiny synthetic MNIST IDX files with their checksums."""
    return write_mnist(tmp_path / "mnist")
