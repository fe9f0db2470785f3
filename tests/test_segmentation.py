"""Semantic segmentation: the ADE20K and CamVid readers on real sample files
(tests/data/segmentation, see its SOURCE.md), malformed input, the augmentation, the ClusTR
pyramid's feature maps, the Semantic FPN's shapes, sliding-window evaluation, the confusion-matrix
metrics, the poly schedule, the backbone's initial checkpoint, and two train steps of every
config variant through the real loop."""

from __future__ import annotations

import pathlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from PIL import Image

from clustr_jax import distill, losses, models, optim, train
from clustr_jax.data import ade20k, camvid, segmentation
from clustr_jax.models import segmentation as seg_models
from configs import common as config_common

REPO = pathlib.Path(__file__).parent.parent
DATA = REPO / "tests" / "data" / "segmentation"
ADE = DATA / "ADEChallengeData2016"
CAMVID = DATA / "CamVid"
TINY_BACKBONE = dict(embed_dims=(16, 32, 32, 32), num_heads=(1, 1, 1, 1), depths=(1, 1, 1, 1),
                     mlp_ratios=(2, 2, 2, 2))
TINY_HEAD = dict(fpn_channels=16, head_channels=8, num_groups=4)


def _raw(path) -> np.ndarray:
  return np.asarray(Image.open(path))


# ---------------------------------------------------------------------------------------------
# Readers.
# ---------------------------------------------------------------------------------------------
def test_ade20k_reader_on_the_released_files():
  (train_pair,) = ade20k.split_pairs(ADE, "training")
  val_pairs = ade20k.split_pairs(ADE, "validation")
  assert [pathlib.Path(p.image).name for p in val_pairs] == ["ADE_val_00000002.jpg",
                                                             "ADE_val_00000003.jpg"]
  image, labels = segmentation.read_pair(train_pair, ade20k.LABEL_MAP)
  raw = _raw(train_pair.label)
  assert image.shape == (512, 683, 3) and image.dtype == np.uint8 and labels.shape == (512, 683)
  np.testing.assert_array_equal(labels[raw == 0], 255)  # 'other' is ignored.
  np.testing.assert_array_equal(labels[raw > 0], raw[raw > 0] - 1)  # 1..150 -> 0..149.
  assert 149 in labels and labels[labels != 255].max() == 149  # Stored 150 is present.


def test_ade20k_padding_label_is_ignored():
  (pair,) = ade20k.split_pairs(DATA / "ade20k_tiny_512", "validation")
  _, labels = segmentation.read_pair(pair, ade20k.LABEL_MAP)
  raw = _raw(pair.label)
  assert labels.shape == (512, 512) and (raw == 255).any()
  np.testing.assert_array_equal(labels[raw == 255], 255)


def test_camvid_reader_maps_void_to_ignore():
  (pair,) = camvid.split_pairs(CAMVID, "train")
  image, labels = segmentation.read_pair(pair, camvid.LABEL_MAP)
  raw = _raw(pair.label)
  assert image.shape == (360, 480, 3) and (raw == 11).any()
  np.testing.assert_array_equal(labels[raw == 11], 255)
  np.testing.assert_array_equal(labels[raw < 11], raw[raw < 11])


def _camvid_copy(root: pathlib.Path, copies: int = 1) -> pathlib.Path:
  """A CamVid folder holding ``copies`` copies of the shipped pair in train and val."""
  (pair,) = camvid.split_pairs(CAMVID, "train")
  for split in ("train", "val"):
    (root / split).mkdir(parents=True)
    (root / f"{split}annot").mkdir()
    for i in range(copies):
      (root / split / f"f{i}.png").write_bytes(pathlib.Path(pair.image).read_bytes())
      (root / f"{split}annot" / f"f{i}.png").write_bytes(pathlib.Path(pair.label).read_bytes())
  return root


def test_malformed_input_names_the_file(tmp_path):
  root = _camvid_copy(tmp_path / "camvid")
  label = root / "trainannot" / "f0.png"
  raw = _raw(label).copy()
  raw[0, 0] = 200
  Image.fromarray(raw).save(label)
  (pair,) = camvid.split_pairs(root, "train")
  with pytest.raises(ValueError, match=r"f0\.png.*\[200\] out of range"):
    segmentation.read_pair(pair, camvid.LABEL_MAP)
  Image.fromarray(raw[:-1]).save(label)  # 480 x 359.
  with pytest.raises(ValueError, match=r"trainannot/f0\.png: size 480x359 differs"):
    segmentation.read_pair(pair, camvid.LABEL_MAP)
  (root / "valannot" / "f0.png").unlink()
  with pytest.raises(FileNotFoundError, match=r"val/f0\.png has no label file"):
    camvid.split_pairs(root, "val")
  (root / "trainannot" / "f1.png").write_bytes(label.read_bytes())
  with pytest.raises(FileNotFoundError, match=r"trainannot/f1\.png has no image"):
    camvid.split_pairs(root, "train")


# ---------------------------------------------------------------------------------------------
# Augmentation and evaluation resize.
# ---------------------------------------------------------------------------------------------
def test_train_transform_shapes_labels_and_determinism():
  (pair,) = camvid.split_pairs(CAMVID, "train")
  image, labels = segmentation.read_pair(pair, camvid.LABEL_MAP)
  options = segmentation.Options(scale=(240, 180), crop_size=(96, 128))
  outs = [segmentation.train_transform(image, labels, options, np.random.default_rng(s))
          for s in (0, 0, 1)]
  x, y = outs[0]
  assert x.shape == (96, 128, 3) and x.dtype == np.float32 and y.shape == (96, 128)
  assert set(np.unique(y)) <= set(range(11)) | {255}
  np.testing.assert_array_equal(outs[0][0], outs[1][0])
  assert not np.array_equal(outs[0][0], outs[2][0])
  # Small scale: the resized image (at most 120 x 90) is padded with the ignore label.
  small = segmentation.Options(scale=(120, 90), ratio_range=(1.0, 1.0), crop_size=(96, 128),
                               photometric=False, hflip=0.0)
  x, y = segmentation.train_transform(image, labels, small, np.random.default_rng(0))
  assert (y[90:] == 255).all() and (y[:, 120:] == 255).all() and (x[90:] == 0).all()


def test_random_crop_respects_cat_max_ratio():
  labels = np.zeros((100, 100), np.uint8)
  labels[:, 90:] = 1  # Class 0 dominates every crop except those at the right edge.
  rng = np.random.default_rng(0)
  boxes = [segmentation.random_crop_box(labels, (20, 20), 0.75, rng) for _ in range(50)]
  ok = [left >= 75 for _, left in boxes]
  assert np.mean(ok) > np.mean([left >= 75 for _, left in
                                (segmentation.random_crop_box(labels, (20, 20), 1.0, rng)
                                 for _ in range(50))])


def test_eval_transform_resizes_aligns_and_pads():
  (pair,) = ade20k.split_pairs(ADE, "training")
  image, labels = segmentation.read_pair(pair, ade20k.LABEL_MAP)  # 683 x 512.
  options = segmentation.Options(eval_scale=(2048, 512), eval_size=(512, 736))
  x, y = segmentation.eval_transform(image, labels, options)
  assert x.shape == (512, 736, 3) and y.shape == (512, 736)
  assert (y[:, 704:] == 255).all() and (y[:, :704] != 255).any()  # 683 aligned to 704.
  assert (x[:, 704:] == 0).all() and (x[:, 703] != 0).any()


# ---------------------------------------------------------------------------------------------
# Models.
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("size", [(64, 96), (100, 70)])
def test_backbone_feature_strides(size):
  model = models.get("clustr_t", num_classes=0, features_only=True, **TINY_BACKBONE)
  x = jnp.zeros((1, *size, 3))
  params = nn.unbox(model.init(jax.random.key(0), x)["params"])
  features = model.apply({"params": params}, x)
  h, w = size
  expected = []
  for stride in (4, 8, 16, 32):
    expected.append((1, -(-h // stride), -(-w // stride)))
  assert [f.shape[:3] for f in features] == expected
  assert [f.shape[3] for f in features] == list(TINY_BACKBONE["embed_dims"])
  classifier = models.get("clustr_t", num_classes=5, **TINY_BACKBONE)
  classifier_params = nn.unbox(classifier.init(jax.random.key(0), x)["params"])
  assert set(classifier_params) - set(params) == {"head"}


def test_semantic_fpn_shapes_and_parameters():
  model = models.get("clustr_t_fpn", num_classes=7, backbone_options=TINY_BACKBONE,
                     attention="dense", **TINY_HEAD)
  x = jax.random.normal(jax.random.key(1), (2, 64, 96, 3))
  params = nn.unbox(model.init(jax.random.key(0), x)["params"])
  logits = model.apply({"params": params}, x)
  assert logits.shape == (2, 64, 96, 7) and logits.dtype == jnp.float32
  assert set(params) == {"backbone", "neck", "head"}
  assert set(params["neck"]) == {f"{k}{i}" for k in ("lateral", "fpn") for i in (1, 2, 3, 4)}
  # One stage at stride 4 and 8, two at 16, three at 32 (Kirillov et al. 2019, Fig. 3).
  assert sorted(k for k in params["head"] if k.endswith("_conv")) == [
      "scale1_0_conv", "scale2_0_conv", "scale3_0_conv", "scale3_1_conv", "scale4_0_conv",
      "scale4_1_conv", "scale4_2_conv"]
  assert params["head"]["cls"]["kernel"].shape == (1, 1, 8, 7)
  head = seg_models.FPNHead(7, channels=8, num_groups=4)
  maps = [jnp.ones((2, 64 // s, 96 // s, 16)) for s in (4, 8, 16, 32)]
  out, _ = head.init_with_output(jax.random.key(0), maps, deterministic=True)
  assert out.shape == (2, 16, 24, 7)


def test_window_starts_and_slide_equals_whole_with_one_window():
  assert seg_models.window_starts(512, 512, 341) == [0]
  assert seg_models.window_starts(683, 512, 341) == [0, 171]
  assert seg_models.window_starts(1000, 512, 341) == [0, 341, 488]
  kwargs = dict(num_classes=5, backbone_options=TINY_BACKBONE, attention="dense", **TINY_HEAD)
  whole = models.get("clustr_t_fpn", **kwargs)
  x = jax.random.normal(jax.random.key(1), (1, 64, 64, 3))
  params = nn.unbox(whole.init(jax.random.key(0), x)["params"])
  slide = models.get("clustr_t_fpn", test_mode="slide", test_window=(64, 64),
                     test_stride=(48, 48), **kwargs)
  np.testing.assert_allclose(slide.apply({"params": params}, x),
                             whole.apply({"params": params}, x), rtol=1e-6, atol=1e-6)
  # Overlapping windows average the windows' logits: 96 px wide, two windows (0, 32).
  wide = jax.random.normal(jax.random.key(2), (1, 64, 96, 3))
  out = slide.apply({"params": params}, wide)
  left = whole.apply({"params": params}, wide[:, :, :64])
  right = whole.apply({"params": params}, wide[:, :, 32:])
  np.testing.assert_allclose(out[:, :, :32], left[:, :, :32], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(out[:, :, 32:64], (left[:, :, 32:] + right[:, :, :32]) / 2,
                             rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# Loss and metrics.
# ---------------------------------------------------------------------------------------------
def test_confusion_matrix_miou_against_a_hand_computed_one():
  labels = jnp.array([[[0, 0, 1], [1, 2, 255]]])  # 5 labelled pixels, one ignored.
  preds = jnp.array([[[0, 1, 1], [1, 1, 2]]])
  logits = jax.nn.one_hot(preds, 4)  # Class 3: never labelled nor predicted.
  confusion = np.asarray(losses.confusion_matrix(logits, labels))
  np.testing.assert_array_equal(confusion[:3, :3], [[1, 1, 0], [0, 2, 0], [0, 1, 0]])
  assert confusion.sum() == 5
  scores = losses.segmentation_metrics(confusion)
  # IoU: class 0 1/2, class 1 2/4, class 2 0/1; class 3 undefined (left out).
  assert scores["miou"] == pytest.approx((0.5 + 0.5 + 0.0) / 3)
  assert scores["mean_accuracy"] == pytest.approx((0.5 + 1.0 + 0.0) / 3)
  assert scores["pixel_accuracy"] == pytest.approx(3 / 5)
  # Padding rows (weight 0) count nowhere; the loss is the mean over labelled pixels.
  sums = losses.eval_sums("segmentation", jnp.concatenate([logits, logits]),
                          jnp.concatenate([labels, labels]), jnp.array([1.0, 0.0]))
  np.testing.assert_array_equal(sums["confusion"], confusion)
  assert int(sums["count"]) == 5
  total, count = losses.pixel_cross_entropy(logits, labels)
  expected = -np.mean([np.log(np.exp(1) / (np.exp(1) + 3)) if p == t else
                       np.log(1 / (np.exp(1) + 3))
                       for t, p in [(0, 0), (0, 1), (1, 1), (1, 1), (2, 1)]])
  assert float(total) / int(count) == pytest.approx(expected, rel=1e-5)
  assert float(losses.task_loss("segmentation", logits, labels)) == pytest.approx(expected,
                                                                                  rel=1e-5)
  with pytest.raises(ValueError, match="task 'detection' unknown"):
    losses.task_loss("detection", logits, labels)


def test_poly_schedule():
  schedule = optim.poly_schedule(1e-4, 100, power=0.9)
  assert float(schedule(0)) == pytest.approx(1e-4)
  assert float(schedule(50)) == pytest.approx(1e-4 * 0.5 ** 0.9)
  assert float(schedule(100)) == 0.0
  warm = optim.poly_schedule(1e-3, 100, power=1.0, min_lr=1e-5, warmup_steps=10)
  assert float(warm(5)) == pytest.approx(5e-4)
  assert float(warm(20)) == pytest.approx((1e-3 - 1e-5) * 0.8 + 1e-5)


def test_backbone_from_a_classifier_checkpoint(tmp_path):
  x = jnp.zeros((1, 64, 64, 3))
  classifier = models.get("clustr_t", num_classes=10, **TINY_BACKBONE)
  source = nn.unbox(classifier.init(jax.random.key(3), x)["params"])
  with ocp.StandardCheckpointer() as ckpt:
    ckpt.save(tmp_path / "ckpt", source)
  model = models.get("clustr_t_fpn", num_classes=5, backbone_options=TINY_BACKBONE, **TINY_HEAD)
  params = nn.unbox(model.init(jax.random.key(0), x)["params"])
  merged = distill.params_from_checkpoint(params, tmp_path / "ckpt", prefix="backbone")
  jax.tree.map(np.testing.assert_array_equal, merged["backbone"],
               {k: v for k, v in source.items() if k != "head"})
  jax.tree.map(np.testing.assert_array_equal, merged["head"], params["head"])
  with pytest.raises(KeyError, match="init_prefix='trunk'"):
    distill.params_from_checkpoint(params, tmp_path / "ckpt", prefix="trunk")


# ---------------------------------------------------------------------------------------------
# Two train steps of every config variant through the loop.
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def data_dirs(tmp_path_factory):
  """8 copies of the shipped pairs (8 fake devices need a batch of 8)."""
  root = tmp_path_factory.mktemp("seg")
  ade_root = root / "ade"
  for split in ("training", "validation"):
    (ade_root / "images" / split).mkdir(parents=True)
    (ade_root / "annotations" / split).mkdir(parents=True)
    for i, pair in enumerate(ade20k.split_pairs(ADE, split) * (8 if split == "training" else 1)):
      (ade_root / "images" / split / f"a{i}.jpg").write_bytes(pathlib.Path(pair.image)
                                                             .read_bytes())
      (ade_root / "annotations" / split / f"a{i}.png").write_bytes(pathlib.Path(pair.label)
                                                                  .read_bytes())
  return {"ade20k": ade_root, "camvid": _camvid_copy(root / "camvid", copies=8)}


@pytest.mark.parametrize("arg", ["cpu", "cpu,attention=dense", "cpu,attention=cast",
                                 "dataset=ade20k,backbone=clustr_s",
                                 "dataset=camvid,backbone=clustr_b,attention=dense"])
def test_config_two_steps(arg, data_dirs, tmp_path):
  config = config_common.load(f"configs/segmentation/clustr_fpn.py:{arg}")
  with config.unlocked():
    config.model.backbone_options = TINY_BACKBONE
    config.model.update(TINY_HEAD)
  config.dataset.data_dir = str(data_dirs[config.dataset.name])
  if config.dataset.name == "camvid":
    config.dataset.splits.test = "val"  # The copy has no test folder.
  config.dataset.crop_size = (64, 64)
  config.dataset.eval_size = (64, 96)
  config.dataset.eval_scale = (96, 64)
  config.batch_size = config.eval_batch_size = 8
  config.num_train_steps = 2
  config.log_every_steps = config.checkpoint_every_steps = config.eval_every_steps = 2
  config.checkpoint_async = False
  results = train.train_and_evaluate(config, tmp_path)
  assert results["step"] == 2 and np.isfinite(results["test"]["loss"])
  assert 0.0 <= results["test"]["miou"] <= 1.0
  assert results["test"]["pixel_accuracy"] == results["test"]["accuracy"]
  assert results["test"]["num_pixels"] > 0
  assert (tmp_path / "results.json").exists()
