"""MNIST for training: the carried IDX files (checked) or tensorflow-datasets.

    load_mnist(data_dir)            -> Splits of images in [0, 1], (N, 28, 28, 1)
    load_tfds(data_dir)             -> the same through tensorflow-datasets
    split_validation(x, y, n, seed) -> the validation split

Every check that fails raises `DataError` with a one-line message.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import struct
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import numpy as np

#: The carried dataset: training/data/mnist/ next to this file.
DEFAULT_DATA_DIR = Path(__file__).resolve().parent / "data" / "mnist"
#: Environment variable that points at another directory of IDX files.
DATA_DIR_ENV = "SYNANN_DATA_DIR"
#: Where `download` fetches from by default (the files are then checked
#: against the carried SHA256SUMS).
DOWNLOAD_URL = "https://storage.googleapis.com/cvdf-datasets/mnist/"

FILES = {
    "train_images": "train-images-idx3-ubyte.gz",
    "train_labels": "train-labels-idx1-ubyte.gz",
    "test_images": "t10k-images-idx3-ubyte.gz",
    "test_labels": "t10k-labels-idx1-ubyte.gz",
}
CHECKSUMS = "SHA256SUMS"
IMAGE_SHAPE = (28, 28)
NUM_CLASSES = 10
_IDX_DTYPES = {0x08: np.uint8}


class DataError(Exception):
    """Missing, corrupt or malformed data (one-line message)."""


@dataclass
class Splits:
    """Train / validation / test arrays: images float32 in [0, 1], labels int32."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_val: np.ndarray
    y_val: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray

    def sizes(self) -> dict[str, int]:
        return {
            "train": len(self.y_train),
            "val": len(self.y_val),
            "test": len(self.y_test),
        }


def resolve_data_dir(data_dir: str | os.PathLike | None = None) -> Path:
    """`data_dir`, else $SYNANN_DATA_DIR, else the carried dataset."""
    return Path(data_dir or os.environ.get(DATA_DIR_ENV) or DEFAULT_DATA_DIR)


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_checksums(path: Path) -> dict[str, str]:
    """Parses a `sha256sum` file into {file name: hex digest}."""
    sums = {}
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        parts = line.split()
        if len(parts) != 2 or len(parts[0]) != 64:
            raise DataError(
                f"{path}:{number}: expected '<sha256>  <file name>', got {line!r}"
            )
        sums[parts[1].lstrip("*")] = parts[0].lower()
    return sums


def verify_checksums(data_dir: Path, names=None) -> None:
    """Checks `names` (default: the four MNIST files) against data_dir/SHA256SUMS."""
    sums_path = data_dir / CHECKSUMS
    if not sums_path.is_file():
        raise DataError(
            f"{sums_path} not found; the data directory needs a SHA256SUMS file "
            "(e.g. `sha256sum *.gz > SHA256SUMS`)"
        )
    sums = read_checksums(sums_path)
    for name in names or FILES.values():
        if name not in sums:
            raise DataError(f"{sums_path} has no checksum for {name}")
        actual = sha256(data_dir / name)
        if actual != sums[name]:
            raise DataError(
                f"checksum mismatch for {data_dir / name}: sha256 {actual}, "
                f"expected {sums[name]}"
            )


def read_idx(path: Path) -> np.ndarray:
    """Reads a gzip-compressed IDX file (unsigned bytes) into a NumPy array."""
    try:
        with gzip.open(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as e:
        raise DataError(f"cannot read {path} as gzip: {e}") from None
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise DataError(f"{path} is not an IDX file (bad magic number)")
    dtype_code, ndim = data[2], data[3]
    if dtype_code not in _IDX_DTYPES:
        raise DataError(
            f"{path}: IDX type 0x{dtype_code:02x} not supported; expected 0x08 "
            "(unsigned byte)"
        )
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DataError(f"{path}: truncated IDX header")
    shape = struct.unpack(f">{ndim}I", data[4:header])
    expected = header + int(np.prod(shape, dtype=np.int64))
    if len(data) != expected:
        raise DataError(
            f"{path}: {len(data)} bytes, expected {expected} for shape {shape}"
        )
    return np.frombuffer(data, _IDX_DTYPES[dtype_code], offset=header).reshape(shape)


def _check(images: np.ndarray, labels: np.ndarray, split: str) -> None:
    if images.ndim != 3 or images.shape[1:] != IMAGE_SHAPE:
        raise DataError(
            f"{split} images have shape {images.shape}; expected (N, 28, 28)"
        )
    if labels.ndim != 1 or len(labels) != len(images):
        raise DataError(
            f"{split} labels have shape {labels.shape}; expected ({len(images)},)"
        )
    if len(labels) == 0:
        raise DataError(f"{split} split is empty")
    if labels.max() >= NUM_CLASSES:
        raise DataError(
            f"{split} labels out of range: max {labels.max()}, expected 0..9"
        )


def _to_float(images: np.ndarray) -> np.ndarray:
    return (images.astype("float32") / 255.0)[..., None]


def split_validation(
    x: np.ndarray, y: np.ndarray, val_size: int, seed: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(x_train, y_train, x_val, y_val): `val_size` samples chosen by `seed`."""
    if not 0 < val_size < len(y):
        raise DataError(
            f"validation size {val_size} must be between 1 and {len(y) - 1} "
            f"(the training set has {len(y)} samples)"
        )
    order = np.random.default_rng(seed).permutation(len(y))
    val, train = np.sort(order[:val_size]), np.sort(order[val_size:])
    return x[train], y[train], x[val], y[val]


def load_mnist(
    data_dir: str | os.PathLike | None = None,
    val_size: int = 5000,
    seed: int = 0,
    verify: bool = True,
) -> Splits:
    """Reads, checks and splits the four MNIST IDX files in `data_dir`."""
    data_dir = resolve_data_dir(data_dir)
    if not data_dir.is_dir():
        raise DataError(f"data directory {data_dir} does not exist")
    missing = [name for name in FILES.values() if not (data_dir / name).is_file()]
    if missing:
        raise DataError(f"{data_dir} lacks {', '.join(missing)}")
    if verify:
        verify_checksums(data_dir)
    arrays = {key: read_idx(data_dir / name) for key, name in FILES.items()}
    return _splits(
        arrays["train_images"],
        arrays["train_labels"],
        arrays["test_images"],
        arrays["test_labels"],
        val_size,
        seed,
    )


def _splits(x_train, y_train, x_test, y_test, val_size: int, seed: int) -> Splits:
    """Checked uint8 images and labels -> Splits: images in [0, 1], int32
    labels, `val_size` training samples (chosen by `seed`) for validation."""
    _check(x_train, y_train, "train")
    _check(x_test, y_test, "test")
    x_train, y_train, x_val, y_val = split_validation(
        _to_float(x_train), y_train.astype("int32"), val_size, seed
    )
    return Splits(
        x_train, y_train, x_val, y_val, _to_float(x_test), y_test.astype("int32")
    )


def load_tfds(
    data_dir: str | os.PathLike | None = None,
    val_size: int = 5000,
    seed: int = 0,
    name: str = "mnist",
) -> Splits:
    """MNIST through tensorflow-datasets (downloads or reads `data_dir`, e.g. gs://).

    tfds.load returns tf.data datasets, so this needs TensorFlow installed
    whatever the Keras backend; both come with the `tfds` extra."""
    import importlib.util

    missing = [
        name
        for name in ("tensorflow", "tensorflow_datasets")
        if importlib.util.find_spec(name) is None
    ]
    if missing:
        raise DataError(
            "--source tfds reads MNIST through tf.data and needs "
            f"{' and '.join(n.replace('_', '-') for n in missing)}: "
            "pip install '.[tfds]' (or leave out --source tfds: the carried IDX "
            "files need neither)"
        )
    import tensorflow_datasets as tfds

    try:
        train, test = tfds.load(
            name,
            split=["train", "test"],
            data_dir=None if data_dir is None else str(data_dir),
            as_supervised=True,
        )
        x_train, y_train = _stack(tfds.as_numpy(train.batch(4096)))
        x_test, y_test = _stack(tfds.as_numpy(test.batch(4096)))
    except Exception as e:  # tfds raises many kinds; report them on one line
        message = " ".join(str(e).split())
        raise DataError(
            f"tensorflow-datasets could not load {name}: {message}"
        ) from None
    x_train, x_test = np.squeeze(x_train, -1), np.squeeze(x_test, -1)
    return _splits(x_train, y_train, x_test, y_test, val_size, seed)


def _stack(batches) -> tuple[np.ndarray, np.ndarray]:
    """Concatenates (images, labels) batches from a tfds split."""
    images, labels = [], []
    for image, label in batches:
        images.append(image)
        labels.append(label)
    if not images:
        raise DataError("tensorflow-datasets returned an empty split")
    return np.concatenate(images), np.concatenate(labels)


def download(
    dest: str | os.PathLike,
    base_url: str = DOWNLOAD_URL,
    checksums: str | os.PathLike = DEFAULT_DATA_DIR / CHECKSUMS,
    fetch=None,
) -> Path:
    """Fetches the four files from `base_url` into `dest` and checks them.

    `checksums` is the SHA256SUMS the files must match (copied into `dest`).
    `fetch(url) -> bytes` defaults to `urllib.request` (any `file://` URL works).
    """
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    fetch = fetch or _urlopen_bytes
    (dest / CHECKSUMS).write_bytes(Path(checksums).read_bytes())
    for name in FILES.values():
        url = base_url.rstrip("/") + "/" + name
        try:
            data = fetch(url)
        except OSError as e:
            raise DataError(f"cannot download {url}: {e}") from None
        (dest / name).write_bytes(data)
    verify_checksums(dest)
    return dest


def _urlopen_bytes(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=60) as response:
        return response.read()
