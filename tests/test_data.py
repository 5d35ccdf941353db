"""Data loading: digits, stratified deterministic splits, config errors, and augmentation."""
from __future__ import annotations


import hypothesis
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from hypothesis import strategies as st
from sklearn import datasets as sklearn_datasets

from adcorda_jax.data import DATASETS, Split, load_dataset, random_crop_flip, splits
from adcorda_jax.errors import ConfigError
from tests.helpers import LOCAL_DATASETS, data_config, one_line, sorted_rows

# --- digits and splitting ---------------------------------------------------------------------


def test_digits_shapes_range_and_labels():
  dataset = load_dataset(data_config(), seed=0)
  assert set(DATASETS.names()) == set(LOCAL_DATASETS)
  assert dataset.name == "digits" and dataset.image_shape == (8, 8, 1)
  assert dataset.num_classes == 10 and dataset.class_names == tuple("0123456789")
  assert (len(dataset.train), len(dataset.val), len(dataset.test)) == (1294, 144, 359)
  for split in (dataset.train, dataset.val, dataset.test):
    assert split.images.dtype == np.float32 and split.labels.dtype == np.int32
    assert split.images.shape[1:] == (8, 8, 1) and split.labels.shape == (len(split),)
    assert 0.0 <= split.images.min() and split.images.max() <= 1.0
    assert set(np.unique(split.labels)) == set(range(10))
  assert dataset.train.images.max() == 1.0  # 16/16: the full range is used.
  np.testing.assert_allclose(dataset.mean, [dataset.train.images.mean()], rtol=1e-5)
  np.testing.assert_allclose(dataset.std, [dataset.train.images.std()], rtol=1e-4)
  assert all(isinstance(value, float) for value in dataset.mean + dataset.std)


def test_splits_are_deterministic_per_seed_and_partition_the_data():
  first, again, other = (load_dataset(data_config(), seed) for seed in (3, 3, 4))
  for name in ("train", "val", "test"):
    np.testing.assert_array_equal(getattr(first, name).images, getattr(again, name).images)
    np.testing.assert_array_equal(getattr(first, name).labels, getattr(again, name).labels)
  assert not np.array_equal(first.val.images, other.val.images)
  assert not np.array_equal(first.test.images, other.test.images)
  # Together the splits are exactly the 1,797 digits (compared as sorted image rows).
  every = np.concatenate([first.train.images, first.val.images, first.test.images])
  original = (sklearn_datasets.load_digits().images / 16.0).astype(np.float32)[..., None]
  assert every.shape == original.shape
  np.testing.assert_array_equal(sorted_rows(every), sorted_rows(original))


def test_val_and_test_are_stratified_by_class():
  dataset = load_dataset(data_config(val_fraction=0.25, test_fraction=0.3), seed=1)
  all_labels = np.concatenate([dataset.train.labels, dataset.val.labels, dataset.test.labels])
  class_counts = np.bincount(all_labels, minlength=10)
  test_counts = np.bincount(dataset.test.labels, minlength=10)
  np.testing.assert_allclose(test_counts, class_counts * 0.3, atol=1)
  remaining = class_counts - test_counts
  np.testing.assert_allclose(np.bincount(dataset.val.labels, minlength=10), remaining * 0.25,
                             atol=1)


@hypothesis.settings(max_examples=60, deadline=None)
@hypothesis.given(labels=st.lists(st.integers(0, 4), min_size=1, max_size=80),
                  share=st.floats(0, 1), seed=st.integers(0, 2**32))
def test_stratified_pick_partitions_and_keeps_class_shares(labels, share, seed):
  labels = np.asarray(labels)
  count = int(share * len(labels))
  rest, picked = splits.stratified_pick(labels, count, np.random.default_rng(seed))
  assert len(picked) == count
  np.testing.assert_array_equal(np.sort(np.concatenate([rest, picked])), np.arange(len(labels)))
  quota = np.bincount(labels, minlength=5) * count / len(labels)
  picked_counts = np.bincount(labels[picked], minlength=5)
  assert np.all(picked_counts >= np.floor(quota)) and np.all(picked_counts <= np.ceil(quota))


def test_imbalanced_classes_keep_their_proportion():
  labels = np.array([0] * 90 + [1] * 10)
  _, picked = splits.stratified_pick(labels, 20, np.random.default_rng(0))
  assert np.bincount(labels[picked]).tolist() == [18, 2]


def test_max_train_examples_subsamples_deterministically():
  small = load_dataset(data_config(max_train_examples=100), seed=0)
  again = load_dataset(data_config(max_train_examples=100), seed=0)
  full = load_dataset(data_config(), seed=0)
  assert len(small.train) == 100 and len(small.val) == len(full.val)
  np.testing.assert_array_equal(small.train.images, again.train.images)
  np.testing.assert_array_equal(small.val.labels, full.val.labels)  # Val unaffected.
  assert set(np.unique(small.train.labels)) == set(range(10))
  np.testing.assert_allclose(small.mean, [small.train.images.mean()], rtol=1e-5)


def test_zero_val_fraction_gives_empty_val_split():
  dataset = load_dataset(data_config(val_fraction=0.0), seed=0)
  assert len(dataset.val) == 0 and dataset.val.images.shape == (0, 8, 8, 1)
  assert len(dataset.train) + len(dataset.test) == 1797


def test_missing_optional_fields_use_defaults():
  dataset = load_dataset(ml_collections.ConfigDict({"name": "digits"}), seed=0)
  assert (len(dataset.train), len(dataset.val), len(dataset.test)) == (1294, 144, 359)


# --- config errors ----------------------------------------------------------------------------


@pytest.mark.parametrize("key, value, expected", [
    ("val_fraction", 1.5, "data.val_fraction must be in [0, 1), got 1.5"),
    ("val_fraction", -0.1, "data.val_fraction"),
    ("test_fraction", 0.0, "data.test_fraction must be in (0, 1), got 0.0"),
    ("test_fraction", 1.0, "data.test_fraction"),
    ("max_train_examples", -1, "data.max_train_examples"),
    ("image_size", 0, "data.image_size must be an integer > 0, got 0"),
    ("tfds_download", "yes", "data.tfds_download"),
    ("data_dir", 3, "data.data_dir"),
    ("name", "", "data.name"),
])
def test_bad_config_values_name_their_key(key, value, expected):
  config = data_config()
  with config.ignore_type():
    config[key] = value
  with pytest.raises(ConfigError) as error:
    load_dataset(config, seed=0)
  assert expected in one_line(error)


def test_unknown_name_lists_local_names_and_suggests():
  with pytest.raises(ConfigError) as error:
    load_dataset(data_config(name="cifar100x"), seed=0)
  message = one_line(error)
  assert "'cifar100x' (data.name)" in message and "or any TFDS builder name" in message
  assert all(name in message for name in LOCAL_DATASETS)
  assert "did you mean 'cifar100'?" in message


def test_too_large_val_fraction_leaving_no_train_is_a_config_error():
  with pytest.raises(ConfigError, match="data.val_fraction"):
    splits.finalize("tiny", Split(np.zeros((2, 1, 1, 1)), np.array([0, 1])), None, ("a", "b"),
                    val_fraction=0.9, test_fraction=0.5, max_train_examples=0, seed=0)


# --- augmentation -------------------------------------------------------------------------------


def _distinct_images(batch: int, height: int = 5, width: int = 6, channels: int = 2) -> jax.Array:
  # Every pixel value is unique (and non-zero), so any crop or flip is identifiable.
  values = np.arange(1, batch * height * width * channels + 1, dtype=np.float32)
  return jnp.asarray(values.reshape(batch, height, width, channels))


def _padded_crops(image: np.ndarray, padding: int) -> list[np.ndarray]:
  height, width, _ = image.shape
  padded = np.pad(image, ((padding, padding), (padding, padding), (0, 0)))
  crops = [padded[top:top + height, left:left + width]
           for top in range(2 * padding + 1) for left in range(2 * padding + 1)]
  return crops + [crop[:, ::-1] for crop in crops]


@pytest.mark.slow
def test_augment_keeps_shape_dtype_and_is_deterministic_per_key():
  images = _distinct_images(8)
  augment = jax.jit(random_crop_flip, static_argnums=2)
  first = augment(jax.random.key(0), images, 2)
  assert first.shape == images.shape and first.dtype == images.dtype
  np.testing.assert_array_equal(first, augment(jax.random.key(0), images, 2))
  np.testing.assert_array_equal(first, random_crop_flip(jax.random.key(0), images, 2))
  assert not np.array_equal(first, augment(jax.random.key(1), images, 2))
  as_uint8 = random_crop_flip(jax.random.PRNGKey(0), images.astype(jnp.uint8), 1)
  assert as_uint8.dtype == jnp.uint8 and as_uint8.shape == images.shape


def test_augment_without_padding_only_flips():
  images = _distinct_images(32)
  output = np.asarray(random_crop_flip(jax.random.key(7), images, 0))
  flipped = [np.array_equal(out, image[:, ::-1]) for out, image in zip(output, np.asarray(images))]
  kept = [np.array_equal(out, image) for out, image in zip(output, np.asarray(images))]
  assert all(f or k for f, k in zip(flipped, kept))
  assert 4 <= sum(flipped) <= 28  # p=0.5 over 32 examples: both outcomes occur.


def test_augment_crops_are_shifts_of_the_zero_padded_image():
  padding = 2
  images = np.asarray(_distinct_images(32))
  output = np.asarray(random_crop_flip(jax.random.key(3), jnp.asarray(images), padding))
  matches = []
  for out, image in zip(output, images):
    candidates = _padded_crops(image, padding)
    found = [index for index, crop in enumerate(candidates) if np.array_equal(out, crop)]
    assert len(found) == 1, "each output must be exactly one shifted (maybe flipped) crop"
    matches.append(found[0])
  assert len(set(matches)) > 5  # Offsets and flips actually vary across the batch.
  assert any(index % 25 != 12 for index in matches)  # Not all centered (index 12 = no shift).
