"""ImageNet input: DeiT preprocessing on real sample images, the folder source, the Grain train
iterator (determinism, resume, repeated augmentation, unreadable files) and eval batches."""

from __future__ import annotations

import logging
import os
import pathlib
import shutil
import subprocess
import sys
import textwrap

import ml_collections
import numpy as np
import pytest
from PIL import Image

from clustr_jax import data as data_lib
from clustr_jax.data import augment, imagenet

REPO = pathlib.Path(__file__).parent.parent
DATA = REPO / "tests" / "data"
FOLDER = DATA / "imagenet"
SAMPLES = sorted((DATA / "imagenet_samples").glob("*.JPEG"))
MEAN, STD = np.array(augment.IMAGENET_MEAN), np.array(augment.IMAGENET_STD)
LOW, HIGH = (0 - MEAN) / STD, (1 - MEAN) / STD


def _config(**overrides) -> ml_collections.ConfigDict:
  ds = dict(name="imagenet", source="folder", data_dir=str(FOLDER), tfds_name="imagenet2012",
            classes="folder", splits={"train": "train", "val": "val", "test": "val"},
            image_size=32, crop_pct=0.875, scale=(0.08, 1.0), hflip=0.5,
            rand_augment="rand-m9-mstd0.5-inc1", random_erasing=0.25, mixup_alpha=0.8,
            cutmix_alpha=1.0, mix_prob=1.0, mix_switch_prob=0.5, label_smoothing=0.1,
            repeated_augmentation=1, read_threads=2)
  ds.update(overrides)
  return ml_collections.ConfigDict({"dataset": ds})


def _open(path) -> Image.Image:
  with Image.open(path) as image:
    return image.convert("RGB")


@pytest.mark.parametrize("path", SAMPLES, ids=lambda p: p.stem)
def test_eval_transform_on_real_images(path):
  image = _open(path)
  x = augment.eval_transform(image, 224)
  assert x.shape == (224, 224, 3) and x.dtype == np.float32
  assert np.all(x >= LOW - 1e-5) and np.all(x <= HIGH + 1e-5)
  # Undoing the normalisation gives the uint8 pixels of the independently computed crop.
  w, h = image.size
  short = int(224 / 0.875)
  size = (short, int(short * h / w)) if w <= h else (int(short * w / h), short)
  resized = np.asarray(image.resize(size, Image.Resampling.BICUBIC))
  top, left = int(round((size[1] - 224) / 2)), int(round((size[0] - 224) / 2))
  expected = resized[top:top + 224, left:left + 224]
  np.testing.assert_allclose((x * STD + MEAN) * 255, expected, atol=1e-3)


@pytest.mark.parametrize("path", SAMPLES, ids=lambda p: p.stem)
def test_train_transform_on_real_images(path):
  image = _open(path)
  rng = np.random.default_rng(0)
  for _ in range(3):
    x = augment.train_transform(image, 224, rng, erasing_prob=0.0)
    assert x.shape == (224, 224, 3) and x.dtype == np.float32
    assert np.all(x >= LOW - 1e-5) and np.all(x <= HIGH + 1e-5)
  x = augment.train_transform(image, 96, rng, rand_augment_spec=None, erasing_prob=1.0)
  assert x.shape == (96, 96, 3) and np.isfinite(x).all()


def test_random_resized_crop_box_bounds():
  rng = np.random.default_rng(0)
  for _ in range(200):
    left, top, w, h = augment.random_resized_crop_box(500, 375, rng)
    assert 0 <= left and left + w <= 500 and 0 <= top and top + h <= 375
    assert 0.08 * 0.9 <= w * h / (500 * 375) <= 1.0
    assert 3 / 4 * 0.95 <= w / h <= 4 / 3 * 1.05
  # A very wide image never fits a sampled box: centre crop at the largest allowed ratio.
  assert augment.random_resized_crop_box(1000, 10, rng, scale=(0.99, 1.0)) == (493, 0, 13, 10)


def test_rand_augment_ops_identity_at_level_zero_and_known_values():
  image = _open(SAMPLES[0])
  pixels = np.asarray(image)
  rng = np.random.default_rng(0)
  for name in ("Rotate", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel",
               "SolarizeIncreasing", "SolarizeAdd", "ColorIncreasing", "ContrastIncreasing",
               "BrightnessIncreasing", "SharpnessIncreasing"):
    out = augment.RAND_INCREASING_OPS[name](image, 0.0, rng)
    np.testing.assert_array_equal(np.asarray(out), pixels, err_msg=name)
  assert len(augment.RAND_INCREASING_OPS) == 15
  np.testing.assert_array_equal(np.asarray(augment.RAND_INCREASING_OPS["Invert"](image, 0, rng)),
                                255 - pixels)
  added = np.asarray(augment.RAND_INCREASING_OPS["SolarizeAdd"](image, 10.0, rng)).astype(int)
  np.testing.assert_array_equal(added, np.where(pixels < 128, np.minimum(pixels + 110, 255),
                                                pixels))
  # Level 10 posterize keeps 0 bits in timm's increasing form: 4 - int(10 / 10 * 4) = 0.
  posterized = np.asarray(augment.RAND_INCREASING_OPS["PosterizeIncreasing"](image, 10.0, rng))
  assert np.all(posterized == 0)
  out = augment.rand_augment(image, rng, num_layers=2, magnitude=9, magnitude_std=0.5)
  assert out.size == image.size and out.mode == "RGB"


def test_parse_rand_augment():
  assert augment.parse_rand_augment("rand-m9-mstd0.5-inc1") == (2, 9.0, 0.5)
  assert augment.parse_rand_augment("rand-m7-n3-inc1") == (3, 7.0, 0.0)
  for bad in ("auto-m9", "rand-m9-mstd0.5", "rand-x3-inc1", "rand-inc1"):
    with pytest.raises(ValueError, match="rand_augment"):
      augment.parse_rand_augment(bad)


def test_random_erasing_box():
  rng = np.random.default_rng(1)
  untouched = np.zeros((64, 64, 3), np.float32)
  assert not augment.random_erasing(untouched, rng, probability=0.0).any()
  for _ in range(20):
    x = augment.random_erasing(np.zeros((64, 64, 3), np.float32), rng, probability=1.0)
    rows, cols = np.nonzero(x.any(-1))
    assert rows.size, "probability 1 erases a box"
    h, w = rows.max() - rows.min() + 1, cols.max() - cols.min() + 1
    assert 0.02 * 0.7 <= h * w / 64 ** 2 <= 1 / 3 * 1.3
    assert np.count_nonzero(x.any(-1)) == h * w  # One solid rectangle.


def test_mixup_cutmix_targets_and_pixels():
  rng = np.random.default_rng(0)
  images = rng.normal(size=(8, 16, 16, 3)).astype(np.float32)
  labels = np.arange(8) % 4
  seen = set()
  for _ in range(30):
    mixed, targets = augment.mixup_cutmix(images, labels, 4, rng)
    assert mixed.shape == images.shape and targets.shape == (8, 4)
    np.testing.assert_allclose(targets.sum(-1), 1.0, rtol=1e-6)
    # lam from the targets of row 0 (label 0, partner label 3): lam * on + (1 - lam) * off.
    on, off = 1 - 0.1 + 0.025, 0.025
    lam = (targets[0, 0] - off) / (on - off)
    from_self = np.isclose(mixed, images).all(-1)
    from_partner = np.isclose(mixed, images[::-1]).all(-1)
    if (from_self | from_partner).all():  # CutMix: every pixel is one of the two.
      seen.add("cutmix")
      np.testing.assert_allclose(from_self[0].mean(), lam, atol=1e-6)
    else:
      seen.add("mixup")
      np.testing.assert_allclose(mixed, lam * images + (1 - lam) * images[::-1], atol=1e-5)
  assert seen == {"cutmix", "mixup"}
  _, smoothed = augment.mixup_cutmix(images, labels, 4, rng, prob=0.0)
  np.testing.assert_allclose(smoothed, augment.smooth_one_hot(labels, 4, 0.1))
  with pytest.raises(ValueError, match="even batch"):
    augment.mixup_cutmix(images[:3], labels[:3], 4, rng)


def test_parse_split():
  assert imagenet.parse_split("train", lambda n: 100) == ("train", slice(None))
  assert imagenet.parse_split("train[:99%]", lambda n: 1000) == ("train", slice(0, 990))
  assert imagenet.parse_split("train[-10:]", lambda n: 1000) == ("train", slice(990, 1000))
  with pytest.raises(ValueError, match="split"):
    imagenet.parse_split("train[a:b]", lambda n: 10)


def test_labels_in_tfds_order():
  wnids = imagenet.imagenet_wnids()
  assert len(wnids) == 1000 and wnids[0] == "n01440764" and list(wnids) == sorted(wnids)
  dataset = data_lib.get(_config(classes="imagenet"), "unused")
  assert dataset.model_kwargs == {"num_classes": 1000}
  labels = {int(b["targets"][i]) for b in dataset.eval_batches("val", batch_size=2)
            for i in range(2)}
  assert labels == {0, wnids.index("n03888257")}


def test_epoch_indices_cover_each_epoch():
  shards = [imagenet.EpochIndices(10, 0, p, 3, repeats=1) for p in range(3)]
  assert shards[0].per_epoch == 4
  for epoch in range(2):
    seen = [s[epoch * 4 + i] for s in shards for i in range(4)]
    assert set(seen) == set(range(10)) and len(seen) == 12  # Padded with 2 repeats.
  ra = imagenet.EpochIndices(600, 0, 0, 1, repeats=3)
  assert ra.per_epoch == 512
  stream = [ra[i] for i in range(511)]
  assert all(stream[3 * i] == stream[3 * i + 1] == stream[3 * i + 2] for i in range(170))
  with pytest.raises(ValueError, match="repeated_augmentation"):
    imagenet.EpochIndices(100, 0, 0, 1, repeats=3)


def test_train_iterator_batches_determinism_and_resume():
  dataset = data_lib.get(_config(), "unused")
  assert dataset.input_keys == ("images",) and dataset.model_kwargs == {"num_classes": 2}
  assert dataset.example_spec == {"images": ((32, 32, 3), np.float32),
                                  "targets": ((2,), np.float32)}
  it = dataset.train_iterator(batch_size=4, seed=3)
  batch = next(it)
  assert batch["images"].shape == (4, 32, 32, 3) and batch["images"].dtype == np.float32
  assert batch["targets"].shape == (4, 2) and np.allclose(batch["targets"].sum(-1), 1)
  state = it.get_state()
  second = next(it)
  again = dataset.train_iterator(batch_size=4, seed=3)
  np.testing.assert_array_equal(next(again)["images"], batch["images"])
  again.set_state(state)
  np.testing.assert_array_equal(next(again)["images"], second["images"])
  plain = data_lib.get(_config(mix_prob=0.0, label_smoothing=0.0), "unused")
  targets = next(plain.train_iterator(batch_size=4, seed=0))["targets"]
  assert targets.dtype == np.int32 and targets.shape == (4,) and set(targets) <= {0, 1}


def test_eval_batches_cover_split_once():
  dataset = data_lib.get(_config(image_size=48), "unused")
  batches = list(dataset.eval_batches("test", batch_size=3))
  assert len(batches) == 1
  assert batches[0]["images"].shape == (3, 48, 48, 3)
  np.testing.assert_array_equal(batches[0]["weights"], [1, 1, 0])
  np.testing.assert_array_equal(batches[0]["targets"][:2], [0, 1])
  shards = [list(dataset.eval_batches("val", batch_size=1, shard_index=p, shard_count=2))
            for p in range(2)]
  assert [len(s) for s in shards] == [1, 1]
  assert [s[0]["targets"][0] for s in shards] == [0, 1]


def test_unreadable_images_are_skipped_and_counted(tmp_path, caplog):
  root = tmp_path / "imagenet"
  shutil.copytree(FOLDER, root)
  bad = root / "train" / "n01440764" / "n01440764_0.JPEG"
  bad.write_bytes(b"not a jpeg")
  (root / "val" / "n03888257" / "n03888257_0.JPEG").write_bytes(
      (FOLDER / "val" / "n03888257" / "n03888257_35800.JPEG").read_bytes()[:300])  # Truncated.
  dataset = data_lib.get(_config(data_dir=str(root), read_threads=1), "unused")
  assert dataset.num_examples("train") == 5
  with caplog.at_level(logging.WARNING):
    it = dataset.train_iterator(batch_size=4, seed=0)
    for _ in range(3):  # Three batches of 4 from epochs of 4 readable images.
      assert next(it)["images"].shape == (4, 32, 32, 3)
    assert dataset.num_skipped >= 1
    assert str(bad) in caplog.text
    batches = list(dataset.eval_batches("val", batch_size=4))
  assert batches[0]["weights"].tolist() == [1, 0, 1, 0]
  assert "n03888257_0.JPEG" in caplog.text


def test_missing_data_raises_with_path(tmp_path):
  missing = tmp_path / "nowhere"
  with pytest.raises(FileNotFoundError, match=str(missing)):
    data_lib.get(_config(data_dir=str(missing)), "unused")
  (tmp_path / "train").mkdir()
  (tmp_path / "val").mkdir()
  with pytest.raises(FileNotFoundError, match="no images"):
    data_lib.get(_config(data_dir=str(tmp_path)), "unused")
  with pytest.raises(ValueError, match="config.dataset.source"):
    data_lib.get(_config(source="lmdb"), "unused")


def test_tfds_source_not_prepared(tmp_path):
  with pytest.raises(FileNotFoundError, match="tfds build imagenet2012"):
    data_lib.get(_config(source="tfds", data_dir=str(tmp_path)), "unused")


def test_worker_processes_give_the_same_batches(tmp_path):
  # Grain workers need absl flags parsed; a subprocess keeps that out of this test process.
  script = tmp_path / "workers.py"
  script.write_text(textwrap.dedent(f"""
      import ml_collections
      import numpy as np
      from absl import app
      from clustr_jax import data as data_lib

      def main(argv):
        config = ml_collections.ConfigDict({_config().to_dict()!r})
        dataset = data_lib.get(config, "unused")
        plain = dataset.train_iterator(batch_size=4, seed=5)
        workers = dataset.train_iterator(batch_size=4, seed=5, worker_count=1)
        for _ in range(3):
          a, b = next(plain), next(workers)
          np.testing.assert_array_equal(a["images"], b["images"])
          np.testing.assert_array_equal(a["targets"], b["targets"])
        workers.close()
        print("same batches")

      if __name__ == "__main__":
        app.run(main)
  """))
  result = subprocess.run([sys.executable, str(script)], cwd=REPO, capture_output=True,
                          text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(REPO)})
  assert "same batches" in result.stdout, result.stderr[-3000:]
