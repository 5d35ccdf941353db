"""Data sources: IDX (Fashion-)MNIST files, TFDS under mock_data, and image folders."""
from __future__ import annotations

import dataclasses
import gzip
from pathlib import Path

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from adcorda_jax.data import load_dataset
from adcorda_jax.data import idx, tfds_source
from adcorda_jax.errors import ConfigError, DataError
from tests.helpers import FASHION_DIR, data_config, one_line

# --- IDX files (MNIST / Fashion-MNIST) --------------------------------------------------------


def _idx_bytes(array: np.ndarray) -> bytes:
  type_codes = {np.dtype(np.uint8): 0x08, np.dtype(np.int32): 0x0C}
  header = bytes([0, 0, type_codes[array.dtype], array.ndim])
  dims = np.asarray(array.shape, ">u4").tobytes()
  return header + dims + array.astype(array.dtype.newbyteorder(">")).tobytes()


def _write_idx(path: Path, array: np.ndarray) -> Path:
  content = _idx_bytes(array)
  path.write_bytes(gzip.compress(content) if path.suffix == ".gz" else content)
  return path


def _write_mnist_dir(folder: Path, num_train: int = 40, num_test: int = 20, size: int = 6,
                     gz: bool = True) -> dict[str, np.ndarray]:
  """Writes the four IDX files (train gzipped when `gz`, test raw) and returns their arrays."""
  folder.mkdir(parents=True, exist_ok=True)
  rng = np.random.default_rng(0)
  arrays = {
      "train-images-idx3-ubyte": rng.integers(0, 256, (num_train, size, size), np.uint8),
      "train-labels-idx1-ubyte": (np.arange(num_train) % 10).astype(np.uint8),
      "t10k-images-idx3-ubyte": rng.integers(0, 256, (num_test, size, size), np.uint8),
      "t10k-labels-idx1-ubyte": (np.arange(num_test) % 10).astype(np.uint8),
  }
  for name, array in arrays.items():
    suffix = ".gz" if gz and name.startswith("train") else ""
    _write_idx(folder / f"{name}{suffix}", array)
  return arrays


@pytest.mark.parametrize("filename", ["data-idx3-ubyte", "data-idx3-ubyte.gz"])
def test_read_idx_round_trips_raw_and_gzip(tmp_path, filename):
  images = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
  loaded = idx.read_idx(_write_idx(tmp_path / filename, images))
  assert loaded.dtype == np.uint8
  np.testing.assert_array_equal(loaded, images)
  wide = np.array([-5, 70000, 3], np.int32)  # Multi-byte values must be read big-endian.
  np.testing.assert_array_equal(idx.read_idx(_write_idx(tmp_path / "wide", wide)), wide)


@pytest.mark.parametrize("corruption, expected", [
    (lambda data: data[:-5], "truncated"),
    (lambda data: data[:6], "truncated"),
    (lambda data: data + b"\x00", "trailing bytes"),
    (lambda data: b"\x01" + data[1:], "bad magic number"),
    (lambda data: data[:2] + b"\x07" + data[3:], "unknown type code"),
])
def test_read_idx_rejects_corrupt_files_naming_the_path(tmp_path, corruption, expected):
  path = tmp_path / "broken-idx3-ubyte"
  path.write_bytes(corruption(_idx_bytes(np.zeros((2, 3, 3), np.uint8))))
  with pytest.raises(DataError) as error:
    idx.read_idx(path)
  assert str(path) in one_line(error) and expected in str(error.value)


def test_read_idx_rejects_truncated_gzip(tmp_path):
  path = tmp_path / "images-idx3-ubyte.gz"
  path.write_bytes(gzip.compress(_idx_bytes(np.ones((4, 5, 5), np.uint8)))[:-10])
  with pytest.raises(DataError) as error:
    idx.read_idx(path)
  assert str(path) in one_line(error)


def test_fashion_mnist_from_data_dir(tmp_path):
  arrays = _write_mnist_dir(tmp_path / "fmnist")
  dataset = load_dataset(data_config(name="fashion_mnist", data_dir=str(tmp_path / "fmnist"),
                                 val_fraction=0.25), seed=0)
  assert dataset.image_shape == (6, 6, 1) and dataset.num_classes == 10
  assert dataset.class_names[:2] == ("T-shirt/top", "Trouser")
  assert dataset.class_names[-1] == "Ankle boot"
  assert (len(dataset.train), len(dataset.val), len(dataset.test)) == (30, 10, 20)
  np.testing.assert_array_equal(dataset.test.images[..., 0],
                                arrays["t10k-images-idx3-ubyte"].astype(np.float32) / 255)
  np.testing.assert_array_equal(dataset.test.labels, arrays["t10k-labels-idx1-ubyte"])
  np.testing.assert_array_equal(np.bincount(dataset.val.labels), np.ones(10))


def test_data_dir_without_idx_files_is_named(tmp_path):
  (tmp_path / "train-images-idx3-ubyte").write_bytes(b"")
  with pytest.raises(DataError) as error:
    load_dataset(data_config(name="mnist", data_dir=str(tmp_path)), seed=0)
  assert str(tmp_path) in one_line(error) and "t10k-labels-idx1-ubyte" in str(error.value)


def test_mnist_from_environment_variable(tmp_path, monkeypatch):
  _write_mnist_dir(tmp_path / "mnist", gz=False)
  monkeypatch.setenv("ADCORDA_MNIST_DIR", str(tmp_path / "mnist"))
  dataset = load_dataset(data_config(name="mnist", val_fraction=0.0), seed=0)
  assert (len(dataset.train), len(dataset.test)) == (40, 20)
  assert dataset.class_names == tuple("0123456789")


def test_missing_mnist_says_how_to_get_it(tmp_path, monkeypatch):
  monkeypatch.delenv("ADCORDA_MNIST_DIR", raising=False)
  config = data_config(name="mnist", tfds_download=False, tfds_data_dir=str(tmp_path))
  with pytest.raises(DataError) as error:
    load_dataset(config, seed=0)
  message = one_line(error)
  assert message.startswith("mnist not found:")
  assert "data.data_dir" in message and "ADCORDA_MNIST_DIR" in message
  assert "data.tfds_download=True" in message


def test_missing_fashion_mnist_mentions_the_debian_package(tmp_path, monkeypatch):
  monkeypatch.delenv("ADCORDA_FASHION_MNIST_DIR", raising=False)
  monkeypatch.setattr(idx, "FASHION_MNIST", dataclasses.replace(
      idx.FASHION_MNIST, package_dirs=(str(tmp_path / "absent"),)))
  config = data_config(name="fashion_mnist", tfds_download=False, tfds_data_dir=str(tmp_path))
  with pytest.raises(DataError) as error:
    load_dataset(config, seed=0)
  assert "apt-get install dataset-fashion-mnist" in one_line(error)
  assert "ADCORDA_FASHION_MNIST_DIR" in str(error.value)


@pytest.mark.slow
@pytest.mark.skipif(not FASHION_DIR.is_dir(), reason=f"{FASHION_DIR} not installed "
                    "(apt-get install dataset-fashion-mnist)")
def test_real_fashion_mnist_from_debian_package(monkeypatch):
  monkeypatch.delenv("ADCORDA_FASHION_MNIST_DIR", raising=False)
  dataset = load_dataset(data_config(name="fashion_mnist", val_fraction=0.0), seed=0)
  assert (len(dataset.train), len(dataset.val), len(dataset.test)) == (60000, 0, 10000)
  assert dataset.image_shape == (28, 28, 1) and dataset.class_names[0] == "T-shirt/top"
  assert np.bincount(dataset.train.labels).tolist() == [6000] * 10
  assert np.bincount(dataset.test.labels).tolist() == [1000] * 10
  assert dataset.train.images.min() == 0.0 and dataset.train.images.max() == 1.0
  assert 0.25 < dataset.mean[0] < 0.32 and 0.32 < dataset.std[0] < 0.38


# --- TFDS ---------------------------------------------------------------------------------------


def _mock_tfds(num_examples: int):
  # USE_CODE: builders use their code-defined features; no metadata is read or downloaded.
  return tfds.testing.mock_data(num_examples=num_examples,
                                policy=tfds.testing.MockPolicy.USE_CODE)


def test_tfds_cifar10_via_mock_data(tmp_path):
  with _mock_tfds(40):
    dataset = load_dataset(data_config(name="cifar10", val_fraction=0.25,
                                   tfds_data_dir=str(tmp_path)), seed=0)
  assert dataset.image_shape == (32, 32, 3) and dataset.num_classes == 10
  assert (len(dataset.train), len(dataset.val), len(dataset.test)) == (30, 10, 40)
  for split in (dataset.train, dataset.val, dataset.test):
    assert split.images.dtype == np.float32 and split.labels.dtype == np.int32
    assert 0.0 <= split.images.min() and split.images.max() <= 1.0
    assert split.labels.min() >= 0 and split.labels.max() < 10
  assert dataset.train.images.std() > 0.1  # Real (random) pixels, not zeros.
  assert len(dataset.mean) == len(dataset.std) == 3


def test_tfds_builder_config_names_resolve(tmp_path):
  with _mock_tfds(12):
    dataset = load_dataset(data_config(name="cifar10_corrupted/gaussian_noise_5", val_fraction=0.0,
                                   tfds_data_dir=str(tmp_path)), seed=0)
  assert dataset.name == "cifar10_corrupted/gaussian_noise_5"
  assert dataset.image_shape == (32, 32, 3) and len(dataset.test) == 12


def test_mnist_falls_back_to_tfds_without_local_files(tmp_path, monkeypatch):
  monkeypatch.delenv("ADCORDA_MNIST_DIR", raising=False)
  with _mock_tfds(20):
    dataset = load_dataset(data_config(name="mnist", val_fraction=0.0,
                                   tfds_data_dir=str(tmp_path)), seed=0)
  assert dataset.image_shape == (28, 28, 1) and dataset.class_names == tuple("0123456789")
  assert (len(dataset.train), len(dataset.test)) == (20, 20)


@pytest.mark.parametrize("available, expected", [
    (["train", "test"], ("train", "test")),
    (["train", "validation"], ("train", "validation")),
    (["train"], ("train", None)),
    (["test"], ("test", None)),
    (["extra"], ("extra", None)),
    ([], ("train", "test")),
])
def test_tfds_split_choice(available, expected):
  assert tfds_source._choose_splits(available) == expected


def test_unprepared_tfds_without_download_is_a_data_error(tmp_path):
  with pytest.raises(DataError) as error:
    load_dataset(data_config(name="cifar10", tfds_download=False, tfds_data_dir=str(tmp_path)),
                 seed=0)
  message = one_line(error)
  assert "'cifar10'" in message and str(tmp_path) in message
  assert "tfds build cifar10" in message and "data.tfds_download=True" in message


# --- image folders ------------------------------------------------------------------------------


def _write_image(path: Path, size: tuple[int, int], color: tuple[int, int, int]) -> None:
  path.parent.mkdir(parents=True, exist_ok=True)
  Image.new("RGB", size, color).save(path)


def _write_tree(root: Path, files_per_class: int = 3) -> None:
  for class_index, (class_name, color) in enumerate((("cat", (255, 0, 0)),
                                                     ("dog", (0, 0, 255)))):
    for index in range(files_per_class):
      size = (5 + index * 7, 9 + class_index * 4)  # Every file has a different size.
      suffix = (".png", ".JPG", ".bmp")[index % 3]
      _write_image(root / class_name / f"{index}{suffix}", size, color)
  (root / "cat" / "notes.txt").write_text("not an image, ignored")
  (root / ".hidden").mkdir()


def test_image_folder_reads_resizes_and_labels(tmp_path):
  _write_tree(tmp_path / "train", files_per_class=5)
  config = data_config(name="image_folder", data_dir=str(tmp_path / "train"), image_size=4,
                   val_fraction=0.0, test_fraction=0.2)
  dataset = load_dataset(config, seed=0)
  assert dataset.class_names == ("cat", "dog") and dataset.image_shape == (4, 4, 3)
  assert (len(dataset.train), len(dataset.test)) == (8, 2)
  assert np.bincount(dataset.test.labels).tolist() == [1, 1]
  for split in (dataset.train, dataset.test):
    red = split.images[split.labels == 0]
    blue = split.images[split.labels == 1]
    np.testing.assert_allclose(red, np.broadcast_to([1.0, 0.0, 0.0], red.shape), atol=0.01)
    np.testing.assert_allclose(blue, np.broadcast_to([0.0, 0.0, 1.0], blue.shape), atol=0.01)
  config.grayscale = True
  assert load_dataset(config, seed=0).image_shape == (4, 4, 1)


def test_image_folder_with_test_dir(tmp_path):
  _write_tree(tmp_path / "train")
  _write_tree(tmp_path / "test", files_per_class=2)
  dataset = load_dataset(data_config(name="image_folder", data_dir=str(tmp_path / "train"),
                                 test_dir=str(tmp_path / "test"), image_size=6,
                                 val_fraction=0.0), seed=0)
  assert (len(dataset.train), len(dataset.test)) == (6, 4)
  assert dataset.test.labels.tolist() == [0, 0, 1, 1]  # Sorted classes, sorted files.
  _write_image(tmp_path / "test" / "bird" / "0.png", (3, 3), (0, 255, 0))
  with pytest.raises(DataError) as error:
    load_dataset(data_config(name="image_folder", data_dir=str(tmp_path / "train"),
                         test_dir=str(tmp_path / "test")), seed=0)
  assert str(tmp_path / "test") in one_line(error) and "extra ['bird']" in str(error.value)


@pytest.mark.parametrize("layout, expected", [
    ("missing", "does not exist"),
    ("empty", "has no class sub-folders"),
    ("empty_class", "contains no images"),
    ("corrupt", "cannot read image"),
])
def test_image_folder_errors_name_the_path(tmp_path, layout, expected):
  root = tmp_path / "root"
  culprit = root
  if layout != "missing":
    root.mkdir()
  if layout == "empty_class":
    _write_tree(root)
    culprit = root / "zebra"
    culprit.mkdir()
  if layout == "corrupt":
    _write_tree(root)
    culprit = root / "dog" / "broken.png"
    culprit.write_bytes(b"definitely not a png")
  with pytest.raises(DataError) as error:
    load_dataset(data_config(name="image_folder", data_dir=str(root)), seed=0)
  assert str(culprit) in one_line(error) and expected in str(error.value)


def test_image_folder_requires_data_dir():
  with pytest.raises(ConfigError, match="data.data_dir"):
    load_dataset(data_config(name="image_folder"), seed=0)
