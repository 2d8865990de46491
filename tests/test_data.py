"""training/data.py: IDX reading, checks, the validation split, tfds, download."""

import gzip
import hashlib
from pathlib import Path

import numpy as np
import pytest
from conftest import write_idx, write_mnist

from training import data


def _rewrite_sums(directory):
    lines = []
    for name in data.FILES.values():
        digest = hashlib.sha256((directory / name).read_bytes()).hexdigest()
        lines.append(f"{digest}  {name}\n")
    (directory / data.CHECKSUMS).write_text("".join(lines))


@pytest.mark.any_backend
def test_read_idx_round_trip(tmp_path):
    array = np.arange(2 * 28 * 28).reshape(2, 28, 28) % 256
    write_idx(tmp_path / "x.gz", array)
    np.testing.assert_array_equal(data.read_idx(tmp_path / "x.gz"), array)


@pytest.mark.any_backend
@pytest.mark.parametrize(
    "payload, message",
    [
        (b"\x01\x02\x08\x01\x00\x00\x00\x01\x00", "bad magic"),
        (b"\x00\x00\x0d\x01\x00\x00\x00\x01\x00", "not supported"),
        (b"\x00\x00\x08\x01\x00\x00\x00\x05\x00", "expected 13"),
        (b"\x00\x00\x08\x02\x00\x00", "truncated"),
    ],
)
def test_read_idx_rejects_malformed_files(tmp_path, payload, message):
    path = tmp_path / "bad.gz"
    path.write_bytes(gzip.compress(payload))
    with pytest.raises(data.DataError, match=message):
        data.read_idx(path)


@pytest.mark.any_backend
def test_read_idx_rejects_non_gzip(tmp_path):
    path = tmp_path / "plain.gz"
    path.write_bytes(b"not gzip at all")
    with pytest.raises(data.DataError, match="gzip"):
        data.read_idx(path)


@pytest.mark.any_backend
def test_load_mnist_shapes_ranges_and_split(mnist_dir):
    splits = data.load_mnist(mnist_dir, val_size=16, seed=3)
    assert splits.sizes() == {"train": 48, "val": 16, "test": 32}
    for x in (splits.x_train, splits.x_val, splits.x_test):
        assert x.dtype == np.float32 and x.shape[1:] == (28, 28, 1)
        assert 0.0 <= x.min() and x.max() <= 1.0
    for y in (splits.y_train, splits.y_val, splits.y_test):
        assert y.dtype == np.int32 and 0 <= y.min() and y.max() <= 9


@pytest.mark.any_backend
def test_validation_split_is_seeded_and_disjoint():
    x = np.arange(100)[:, None]
    y = np.arange(100)
    xt, yt, xv, yv = data.split_validation(x, y, 10, seed=1)
    assert sorted(np.concatenate([yt, yv]).tolist()) == list(range(100))
    assert len(yv) == 10 and not set(yt) & set(yv)
    np.testing.assert_array_equal(yv, data.split_validation(x, y, 10, seed=1)[3])
    assert not np.array_equal(yv, data.split_validation(x, y, 10, seed=2)[3])
    with pytest.raises(data.DataError, match="validation size"):
        data.split_validation(x, y, 100, seed=1)


@pytest.mark.any_backend
def test_data_dir_from_environment(mnist_dir, monkeypatch):
    monkeypatch.setenv(data.DATA_DIR_ENV, str(mnist_dir))
    assert data.resolve_data_dir(None) == mnist_dir
    assert data.load_mnist(val_size=8).sizes()["test"] == 32


@pytest.mark.any_backend
def test_checksum_mismatch(mnist_dir):
    name = data.FILES["test_labels"]
    write_idx(mnist_dir / name, np.zeros(32))  # valid IDX, different bytes
    with pytest.raises(data.DataError, match=f"checksum mismatch for .*{name}"):
        data.load_mnist(mnist_dir, val_size=8)


@pytest.mark.any_backend
def test_missing_checksums_file_and_missing_files(mnist_dir, tmp_path):
    (mnist_dir / data.CHECKSUMS).unlink()
    with pytest.raises(data.DataError, match="SHA256SUMS"):
        data.load_mnist(mnist_dir, val_size=8)
    (mnist_dir / data.FILES["train_images"]).unlink()
    with pytest.raises(data.DataError, match="lacks train-images"):
        data.load_mnist(mnist_dir, val_size=8)
    with pytest.raises(data.DataError, match="does not exist"):
        data.load_mnist(tmp_path / "nowhere", val_size=8)


@pytest.mark.any_backend
def test_label_out_of_range(mnist_dir):
    write_idx(mnist_dir / data.FILES["train_labels"], np.full(64, 10))
    _rewrite_sums(mnist_dir)
    with pytest.raises(data.DataError, match="train labels out of range: max 10"):
        data.load_mnist(mnist_dir, val_size=8)


@pytest.mark.any_backend
def test_wrong_image_shape_and_count(mnist_dir):
    write_idx(mnist_dir / data.FILES["test_images"], np.zeros((32, 27, 28)))
    _rewrite_sums(mnist_dir)
    with pytest.raises(data.DataError, match=r"test images have shape \(32, 27, 28\)"):
        data.load_mnist(mnist_dir, val_size=8)
    write_idx(mnist_dir / data.FILES["test_images"], np.zeros((31, 28, 28)))
    _rewrite_sums(mnist_dir)
    with pytest.raises(data.DataError, match="test labels have shape"):
        data.load_mnist(mnist_dir, val_size=8)


@pytest.mark.any_backend
def test_carried_dataset_matches_its_checksums():
    data.verify_checksums(data.DEFAULT_DATA_DIR)
    assert (data.DEFAULT_DATA_DIR / "README.md").is_file()


@pytest.mark.any_backend
def test_download_from_file_url(mnist_dir, tmp_path):
    dest = data.download(
        tmp_path / "fetched",
        base_url=mnist_dir.as_uri(),
        checksums=mnist_dir / data.CHECKSUMS,
    )
    assert data.load_mnist(dest, val_size=8).sizes()["train"] == 56


@pytest.mark.any_backend
def test_download_rejects_corrupt_and_failed_fetches(mnist_dir, tmp_path):
    sums = mnist_dir / data.CHECKSUMS
    with pytest.raises(data.DataError, match="checksum mismatch"):
        data.download(tmp_path / "a", checksums=sums, fetch=lambda url: b"junk")

    def offline(url):
        raise OSError("network unreachable")

    with pytest.raises(data.DataError, match="cannot download .*network unreachable"):
        data.download(tmp_path / "b", checksums=sums, fetch=offline)


def test_tfds_source_offline():
    tfds = pytest.importorskip("tensorflow_datasets")
    with tfds.testing.mock_data(num_examples=24):
        splits = data.load_tfds(val_size=4, seed=0)
    assert splits.sizes() == {"train": 20, "val": 4, "test": 24}
    assert (
        splits.x_train.shape[1:] == (28, 28, 1) and splits.x_train.dtype == np.float32
    )
    assert splits.x_train.max() <= 1.0 and splits.y_test.max() <= 9


def test_tfds_missing_dataset_is_one_line_error(tmp_path):
    tfds = pytest.importorskip("tensorflow_datasets")
    del tfds
    with pytest.raises(data.DataError, match="tensorflow-datasets could not load"):
        data.load_tfds(tmp_path, name="no_such_dataset_xyz")


@pytest.mark.any_backend
@pytest.mark.parametrize(
    "absent, named",
    [
        ({"tensorflow"}, "needs tensorflow: "),
        ({"tensorflow_datasets"}, "needs tensorflow-datasets: "),
        (
            {"tensorflow", "tensorflow_datasets"},
            "needs tensorflow and tensorflow-datasets",
        ),
    ],
)
def test_tfds_without_tensorflow_refuses_in_one_line(monkeypatch, absent, named):
    import importlib.util

    real = importlib.util.find_spec
    both = {"tensorflow", "tensorflow_datasets"}

    def find_spec(name, *args):
        if name in both:  # present or absent as the case says, installed or not
            return None if name in absent else object()
        return real(name, *args)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    with pytest.raises(data.DataError) as error:
        data.load_tfds(val_size=4)
    message = str(error.value)
    assert "\n" not in message and named in message
    assert "pip install '.[tfds]'" in message


@pytest.mark.any_backend
def test_tfds_extra_installs_tensorflow():
    import tomllib

    pyproject = tomllib.loads(
        (Path(__file__).parents[1] / "pyproject.toml").read_text()
    )
    extra = pyproject["project"]["optional-dependencies"]["tfds"]
    assert {r.split(">")[0] for r in extra} == {"tensorflow-datasets", "tensorflow"}


@pytest.mark.any_backend
def test_synthetic_fixture_is_learnable_shape(tmp_path):
    directory = write_mnist(tmp_path / "m", n_train=20, n_test=10)
    splits = data.load_mnist(directory, val_size=5)
    assert splits.sizes() == {"train": 15, "val": 5, "test": 10}
