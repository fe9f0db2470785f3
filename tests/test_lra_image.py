"""LRA Image: CIFAR-10 binary and TFDS readers, grayscale, splits, malformed files, pixel-0 padding,
the config. ``tests/data/cifar10`` holds the first 10 records of each file of
../shared/data/cifar10 (the CIFAR binary release format)."""

import shutil

import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds
from lra_testing import DATA, REPO, run_two_steps

from clustr_jax import data as data_lib
from clustr_jax import models
from clustr_jax.data import image
from configs import common as config_common

CIFAR = DATA / "cifar10"


def test_read_bin_real_records():
  images, labels = image.read_bin(CIFAR / "test_batch.bin")
  assert images.shape == (10, 32, 32, 3) and images.dtype == np.uint8
  # The first ten test labels of CIFAR-10 (cat, ship, ship, airplane, frog, frog, automobile, ...).
  np.testing.assert_array_equal(labels, [3, 8, 8, 0, 6, 6, 1, 6, 3, 1])
  raw = np.fromfile(CIFAR / "test_batch.bin", np.uint8)[:image.RECORD_BYTES]
  np.testing.assert_array_equal(images[0, 5, 7], raw[1 + 5 * 32 + 7::1024][:3])  # R, G, B planes.


def test_grayscale_is_tf_formula():
  images, _ = image.read_bin(CIFAR / "data_batch_1.bin")
  gray = image.grayscale(images)
  assert gray.shape == (10, 32, 32) and gray.dtype == np.uint8
  # trunc((0.2989 R + 0.587 G + 0.114 B) / 255 * 255.5), in float64: equal but for rare
  # float32 rounding at integer boundaries.
  x = images.astype(np.float64)
  expected = np.floor((x @ [0.2989, 0.5870, 0.1140]) / 255 * 255.5)
  assert np.mean(gray == expected) > 0.999 and np.abs(gray - expected).max() <= 1
  corners = np.array([[[0, 0, 0], [255, 255, 255], [255, 0, 0], [0, 0, 255]]], np.uint8)
  np.testing.assert_array_equal(image.grayscale(corners), [[0, 255, 76, 29]])


def test_binary_splits_and_tokens():
  config = config_common.load(f"{REPO}/configs/lra/image.py:cpu")
  config.dataset.data_dir = str(CIFAR)
  dataset = data_lib.get(config, "/unused")
  assert dataset.model_kwargs == {"vocab_size": 256, "num_classes": 10, "max_length": 1024}
  splits = dataset.splits
  assert [len(splits[s]["targets"]) for s in ("train", "val", "test")] == [45, 5, 10]
  images, labels = image.read_bin(CIFAR / "data_batch_5.bin")
  np.testing.assert_array_equal(splits["val"]["targets"], labels[5:])  # The last 10%, file order.
  np.testing.assert_array_equal(splits["val"]["inputs"][0],
                                image.grayscale(images[5]).reshape(-1))
  assert splits["train"]["inputs"].dtype == np.int32
  assert splits["train"]["inputs"].max() <= 255


@pytest.mark.parametrize("damage, message", [
    (lambda p: p.write_bytes(p.read_bytes()[:-100]),
     r"data_batch_3.bin: 30630 bytes is not a whole number of 3073-byte records .* record 9 at "
     r"byte 27657 is truncated after 2973 bytes"),
    (lambda p: p.write_bytes(p.read_bytes()[:image.RECORD_BYTES * 4] + b"\x0a"
                             + p.read_bytes()[image.RECORD_BYTES * 4 + 1:]),
     r"data_batch_3.bin: record 4 \(byte 12292\): label 10 outside 0..9"),
    (lambda p: p.write_bytes(b""), r"data_batch_3.bin: empty file"),
    (lambda p: p.unlink(), r"CIFAR-10 binary files missing: .*data_batch_3.bin"),
])
def test_malformed_files_name_file_and_record(tmp_path, damage, message):
  folder = tmp_path / "cifar-10-batches-bin"
  shutil.copytree(CIFAR, folder)
  damage(folder / "data_batch_3.bin")
  with pytest.raises((ValueError, FileNotFoundError), match=message):
    image.load_binary_splits(tmp_path)  # The parent of cifar-10-batches-bin works too.


def test_tfds_source_checks_image_size(monkeypatch):
  good = {"image": np.full((32, 32, 3), 7, np.uint8), "label": 4}
  sources = {"train[:90%]": [good, good], "bad": [good, {"image": np.zeros((28, 28, 3),
                                                                           np.uint8), "label": 1}]}
  monkeypatch.setattr(tfds, "data_source", lambda name, *, split, data_dir: sources[split])
  images, labels = image.read_tfds("train[:90%]")
  assert images.shape == (2, 32, 32, 3) and labels.tolist() == [4, 4]
  with pytest.raises(ValueError, match=r"split 'bad' record 1: image shape \(28, 28, 3\)"):
    image.read_tfds("bad")


def test_pixel_zero_is_padding_quirk():
  """With the quirk, black pixels never reach the CLS token: the embedding of 0 is irrelevant."""
  kwargs = dict(vocab_size=256, num_classes=10, max_length=64, emb_dim=16, num_heads=2,
                qkv_dim=16, mlp_dim=16, num_layers=1, dropout_rate=0.0,
                attention_dropout_rate=0.0, learned_position_embedding=True)
  x = np.random.default_rng(0).integers(0, 4, (2, 64)).astype(np.int32)  # Many black pixels.
  x[:, 0] = 3
  for zero_is_padding in (True, False):
    model = models.get("lra_encoder", zero_is_padding=zero_is_padding, **kwargs)
    variables = jax.jit(model.init)(jax.random.key(0), x)
    table = variables["params"]["encoder"]["embedding"]["embedding"]
    changed = jax.tree.map(lambda v: v, variables)
    changed["params"]["encoder"]["embedding"]["embedding"] = table.replace(  # Not a constant:
        value=table.value.at[0].add(np.arange(16.0)))  # LayerNorm would remove a constant.
    apply = jax.jit(model.apply)
    same = np.allclose(apply(variables, x), apply(changed, x), atol=1e-5)
    assert same == zero_is_padding


def test_configs_official_values_and_two_steps(tmp_path):
  official = config_common.load(f"{REPO}/configs/lra/image.py")
  model = official.model
  assert (model.num_layers, model.emb_dim, model.num_heads, model.qkv_dim, model.mlp_dim) == (
      1, 128, 8, 64, 128)
  assert model.learned_position_embedding and model.zero_is_padding
  assert (official.batch_size, official.num_train_steps, official.learning_rate) == (256, 35_000,
                                                                                    5e-4)
  results = run_two_steps("image.py:cpu", CIFAR, tmp_path)
  assert results["test"]["num_examples"] == 10 and results["val"]["num_examples"] == 5
