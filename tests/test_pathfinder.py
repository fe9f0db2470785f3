"""Pathfinder: LRA parameters, generator determinism, labels against a flood fill, the release
reader on well-formed and malformed records, the split, the dataset adapter, the command line,
and both configs' first train steps."""

import dataclasses
import functools
import pathlib
import subprocess
import sys

import flax.linen as nn
import jax
import ml_collections
import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from clustr_jax import data as data_lib
from clustr_jax import models, optim, train
from clustr_jax.data import pathfinder
from clustr_jax.data.pathfinder import __main__ as pathfinder_cli
from configs import common as config_common

REPO = pathlib.Path(__file__).resolve().parent.parent
# A small, fast set: LRA's 32-pixel paddles in a 16-pixel window (the ``cpu`` config's set).
SMALL = dataclasses.replace(pathfinder.lra_parameters(32, "hard"), window_size=16,
                            contour_length=2, num_distractor_snakes=0, seed_distance=3)


# ---------------------------------------------------------------------------------------------
# Parameters.
# ---------------------------------------------------------------------------------------------
def test_lra_parameters():
  p32 = pathfinder.lra_parameters(32, "hard")
  assert (p32.window_size, p32.contour_length, p32.distractor_length,
          p32.num_distractor_snakes) == (32, 14, 4, 5)
  assert (p32.paddle_length, p32.paddle_thickness, p32.paddle_margin_list, p32.seed_distance,
          p32.marker_radius, p32.continuity) == (2, 0.5, (1,), 7, 1.5, 1.0)
  assert (p32.snake_contrast_list, p32.paddle_contrast_list) == ((2.0,), (0.75,))
  p128 = pathfinder.lra_parameters(128, "hard")
  assert (p128.paddle_margin_list, p128.num_distractor_snakes, p128.seed_distance) == ((2, 3), 8,
                                                                                      20)
  assert pathfinder.lra_parameters(32, "easy").contour_length == 6
  assert pathfinder.lra_parameters(32, "easy").num_distractor_snakes == 10
  with pytest.raises(ValueError, match="resolution=48"):
    pathfinder.lra_parameters(48)
  with pytest.raises(ValueError, match="difficulty='medium'"):
    pathfinder.lra_parameters(32, "medium")


def test_parameter_errors_name_the_field():
  with pytest.raises(ValueError, match="paddle_thickness \\* antialias_scale = 1.5"):
    dataclasses.replace(SMALL, paddle_thickness=0.75)
  with pytest.raises(ValueError, match="seed_distance=4"):
    dataclasses.replace(SMALL, seed_distance=4)
  with pytest.raises(ValueError, match="paddle_margin_list is empty"):
    dataclasses.replace(SMALL, paddle_margin_list=())


# ---------------------------------------------------------------------------------------------
# Generator.
# ---------------------------------------------------------------------------------------------
def test_images_are_deterministic_per_seed_batch_and_index():
  params = pathfinder.lra_parameters(32, "hard")
  first = [pathfinder.render_image(params, pathfinder.image_rng(3, 1, i)) for i in range(2)]
  again = [pathfinder.render_image(params, pathfinder.image_rng(3, 1, i)) for i in range(2)]
  other = pathfinder.render_image(params, pathfinder.image_rng(4, 1, 0))
  for (a, label_a, margin_a), (b, label_b, margin_b) in zip(first, again):
    np.testing.assert_array_equal(a, b)
    assert (label_a, margin_a) == (label_b, margin_b)
  assert not np.array_equal(first[0][0], other[0])
  for image, label, margin in first:
    assert image.dtype == np.uint8 and image.shape == (32, 32)
    assert image.max() == 255 and label in (0, 1) and margin == 1
    # LRA's 32-pixel contrasts: distractors (2.0) are the brightest strokes, targets (1.5) at
    # 3/4 of them, markers (1.0) at 1/2.
    assert 0.2 < np.mean(image > 0) < 0.8


def test_generated_set_has_the_release_layout_and_matches_render_image(tmp_path):
  root = pathfinder.generate(tmp_path / "set", SMALL, num_images=7, images_per_batch=3, seed=5,
                             progress=False)
  assert sorted(p.name for p in (root / "metadata").iterdir()) == ["0.npy", "1.npy", "2.npy"]
  rows = (root / "metadata" / "1.npy").read_text().splitlines()
  assert len(rows) == 3
  fields = rows[2].split()
  assert fields[:3] == ["imgs/1", "sample_2.png", "2"] and len(fields) == 11
  assert fields[4:] == ["1.0", "2", "4", "2", "0.5", "1", "1"]
  image, label, _ = pathfinder.render_image(SMALL, pathfinder.image_rng(5, 1, 2))
  assert fields[3] == str(label)
  np.testing.assert_array_equal(np.asarray(Image.open(root / "imgs" / "1" / "sample_2.png")),
                                image)
  images, labels = pathfinder.read_release(root, 16)
  assert images.shape == (7, 16, 16) and labels.shape == (7,)
  np.testing.assert_array_equal(images[5], image)  # Batches 0 (3 images), then 1.


def test_ensure_generated_reuses_and_refuses_other_parameters(tmp_path):
  root = tmp_path / "set"
  pathfinder.ensure_generated(root, SMALL, num_images=4, images_per_batch=2, progress=False)
  stamp = (root / "imgs" / "0" / "sample_0.png").stat().st_mtime_ns
  pathfinder.ensure_generated(root, SMALL, num_images=4, images_per_batch=2, progress=False)
  assert (root / "imgs" / "0" / "sample_0.png").stat().st_mtime_ns == stamp
  with pytest.raises(ValueError, match="contour_length"):
    pathfinder.ensure_generated(root, dataclasses.replace(SMALL, contour_length=3), num_images=4,
                                images_per_batch=2, progress=False)


def test_labels_are_balanced():
  labels = [pathfinder.render_image(SMALL, pathfinder.image_rng(0, 0, i))[1] for i in range(300)]
  assert 120 <= sum(labels) <= 180  # Bernoulli(0.5): 150 +- 3.5 sigma.


def _markers_connected(image: np.ndarray) -> bool:
  """Whether the two marker disks of a 64-pixel image lie on one stroke, from the pixels alone.

  At 64 px the markers (contrast 1.0) are the only pixels above 230 (paths: 0.8 -> 204). The
  strokes are the pixels above 40, each dilated by a disk of radius 2, which bridges the gaps of
  about 2 * margin = 2 pixels between the paddles of one contour; then an 8-connected flood fill.
  """
  markers, count = ndimage.label(image > 230, np.ones((3, 3)))
  assert count == 2, f"found {count} marker blobs"
  strokes = ndimage.binary_dilation(image > 40, np.hypot(*np.mgrid[-2:3, -2:3]) <= 2)
  components, _ = ndimage.label(strokes | (markers > 0), np.ones((3, 3)))
  return components[markers == 1][0] == components[markers == 2][0]


def test_labels_agree_with_a_flood_fill_of_the_image():
  """Label 1 <=> the markers share a contour, checked on the rendered pixels only.

  Exact in one direction: every label-1 image is connected. Not in the other: the published
  algorithm places contours as close as 2 * margin (the gap between a contour's own paddles) and
  lets a new paddle cross the other target's newest one (it is not yet in the occupancy), so some
  label-0 images are connected in pixels too; here about 40% (a wrong label rule gives 0% or
  100% in one of the two groups).
  """
  params = dataclasses.replace(pathfinder.lra_parameters(64, "easy"), num_distractor_snakes=0)
  connected = {0: [], 1: []}
  for i in range(120):
    image, label, _ = pathfinder.render_image(params, pathfinder.image_rng(5, 0, i))
    connected[label].append(_markers_connected(image))
  assert len(connected[0]) >= 40 and len(connected[1]) >= 40
  assert all(connected[1])
  assert np.mean(connected[0]) < 0.6


# ---------------------------------------------------------------------------------------------
# Reader.
# ---------------------------------------------------------------------------------------------
def _write_release(root: pathlib.Path, rows_by_file: dict[str, list[tuple[int, int]]],
                   size: int = 8) -> dict[tuple[str, int], np.ndarray]:
  """Writes ``metadata/<k>.npy`` text rows and PNGs as in the LRA release; returns the pixels."""
  pixels = {}
  (root / "metadata").mkdir(parents=True)
  for k, rows in rows_by_file.items():
    (root / "imgs" / k).mkdir(parents=True)
    lines = []
    for index, label in rows:
      image = np.random.default_rng((int(k), index)).integers(0, 256, (size, size), np.uint8)
      Image.fromarray(image, mode="L").save(root / "imgs" / k / f"sample_{index}.png")
      pixels[(k, index)] = image
      lines.append(f"imgs/{k} sample_{index}.png {index} {label} 1.0 14 4 2 0.5 1 1\n")
    (root / "metadata" / f"{k}.npy").write_text("".join(lines))
  return pixels


def test_reader_on_release_records(tmp_path):
  pixels = _write_release(tmp_path, {"10": [(0, 1)], "2": [(0, 0), (1, 1)], "0": [(3, 0)]})
  images, labels = pathfinder.read_release(tmp_path, 8)
  # Numeric order of the metadata files (0, 2, 10), then row order.
  order = [("0", 3), ("2", 0), ("2", 1), ("10", 0)]
  np.testing.assert_array_equal(images, np.stack([pixels[o] for o in order]))
  np.testing.assert_array_equal(labels, [0, 0, 1, 1])
  assert labels.dtype == np.int32 and images.dtype == np.uint8


def test_reader_drops_empty_images_like_lra(tmp_path):
  _write_release(tmp_path, {"0": [(0, 1), (1, 0), (2, 1)]})
  (tmp_path / "imgs" / "0" / "sample_1.png").write_bytes(b"")
  images, labels = pathfinder.read_release(tmp_path, 8)
  assert images.shape == (2, 8, 8) and labels.tolist() == [1, 1]


@pytest.mark.parametrize("corrupt, error, message", [
    (lambda root: (root / "metadata" / "0.npy").write_text(
        "imgs/0 sample_0.png 0 1 1.0 14 4 2 0.5 1 1\nimgs/0 sample_1.png\n"),
     ValueError, r"metadata/0.npy:2: expected at least 4 .*found 2"),
    (lambda root: (root / "metadata" / "0.npy").write_text(
        "imgs/0 sample_0.png 0 yes 1.0 14 4 2 0.5 1 1\n"),
     ValueError, r"metadata/0.npy:1: label \(field 4\) 'yes' is not 0 or 1"),
    (lambda root: (root / "imgs" / "0" / "sample_1.png").unlink(),
     FileNotFoundError, r"metadata/0.npy:2: image .*sample_1.png is missing"),
    (lambda root: Image.new("L", (9, 8)).save(root / "imgs" / "0" / "sample_1.png"),
     ValueError, r"metadata/0.npy:2: image .*sample_1.png is 9x8 mode 'L'; expected 8x8"),
    (lambda root: Image.new("RGB", (8, 8)).save(root / "imgs" / "0" / "sample_1.png"),
     ValueError, r"metadata/0.npy:2: .*mode 'RGB'"),
    (lambda root: (root / "imgs" / "0" / "sample_1.png").write_bytes(
        (root / "imgs" / "0" / "sample_1.png").read_bytes()[:40]),
     ValueError, r"metadata/0.npy:2: image .*sample_1.png does not decode"),
    (lambda root: np.save(root / "metadata" / "0.npy", np.array([["imgs/0", "x.png"]])),
     ValueError, r"metadata/0.npy: not a text metadata file"),
])
def test_reader_errors_name_file_and_line(tmp_path, corrupt, error, message):
  _write_release(tmp_path, {"0": [(0, 1), (1, 0)]})
  corrupt(tmp_path)
  with pytest.raises(error, match=message):
    pathfinder.read_release(tmp_path, 8)


def test_reader_without_metadata(tmp_path):
  with pytest.raises(FileNotFoundError, match="metadata directory missing"):
    pathfinder.read_release(tmp_path, 8)
  (tmp_path / "metadata").mkdir()
  with pytest.raises(FileNotFoundError, match="no metadata files"):
    pathfinder.read_release(tmp_path, 8)


def test_split_is_80_10_10_seeded_and_disjoint():
  images = np.arange(50 * 4, dtype=np.uint8).reshape(50, 2, 2)
  labels = np.arange(50, dtype=np.int32) % 2
  splits = pathfinder.split(images, labels, seed=1)
  assert {k: len(v["targets"]) for k, v in splits.items()} == {"train": 40, "val": 5, "test": 5}
  firsts = np.concatenate([v["inputs"][:, 0] for v in splits.values()])
  assert sorted(firsts.tolist()) == list(range(0, 200, 4))  # Every image once.
  for v in splits.values():
    np.testing.assert_array_equal(v["targets"], (v["inputs"][:, 0] // 4) % 2)
    assert v["inputs"].shape[1] == 4
  again = pathfinder.split(images, labels, seed=1)
  np.testing.assert_array_equal(again["val"]["inputs"], splits["val"]["inputs"])
  assert not np.array_equal(pathfinder.split(images, labels, seed=2)["val"]["inputs"],
                            splits["val"]["inputs"])


def test_cli_writes_a_set(tmp_path, capsys):
  pathfinder_cli.main([f"--output_dir={tmp_path}", "--resolution=32", "--difficulty=easy",
                   "--num_images=2", "--images_per_batch=2", "--set=num_distractor_snakes=0",
                   "--no_progress"])
  assert capsys.readouterr().out.strip() == str(tmp_path)
  images, _ = pathfinder.read_release(tmp_path, 32)
  assert images.shape == (2, 32, 32)
  with pytest.raises(SystemExit):
    pathfinder_cli.main([f"--output_dir={tmp_path}/b", "--set=bogus=1"])


def test_cli_runs_as_a_module():
  result = subprocess.run([sys.executable, "-m", "clustr_jax.data.pathfinder", "--help"],
                          cwd=REPO, capture_output=True, text=True, timeout=120, check=True)
  assert "--output_dir" in result.stdout and "--set NAME=VALUE" in result.stdout
  assert not result.stderr


# ---------------------------------------------------------------------------------------------
# Dataset adapter (config built here; the configs' own tests are below).
# ---------------------------------------------------------------------------------------------
def _small_dataset_config(data_dir, **generator):
  params = dataclasses.asdict(SMALL)
  del params["window_size"]
  params.update(num_images=20, images_per_batch=8, seed=0, workers=0, **generator)
  return ml_collections.ConfigDict({"dataset": dict(
      name="pathfinder", resolution=16, max_length=256, data_dir=str(data_dir), generate=True,
      split_seed=0, generator=params)})


def test_load_dataset_renders_once_then_reads(tmp_path):
  config = _small_dataset_config(tmp_path / "set")
  dataset = data_lib.get(config, "/unused")
  assert (tmp_path / "set" / "generator.json").is_file()
  assert not (tmp_path / "set" / ".generate_once.json").exists()  # One process: no marker.
  assert dict(dataset.model_kwargs) == {"vocab_size": 256, "num_classes": 2, "max_length": 256}
  assert dataset.example_spec == {"inputs": ((256,), np.uint8), "targets": ((), np.int32)}
  assert [len(dataset.splits[s]["targets"]) for s in ("train", "val", "test")] == [16, 2, 2]
  images, labels = pathfinder.read_release(tmp_path / "set", 16)
  np.testing.assert_array_equal(dataset.splits["test"]["inputs"],
                                pathfinder.split(images, labels)["test"]["inputs"])


def test_load_dataset_errors(tmp_path):
  with pytest.raises(ValueError, match=r"unknown key\(s\) \['bogus'\]; valid: .*contour_length"):
    data_lib.get(_small_dataset_config(tmp_path, bogus=1), "/unused")
  config = _small_dataset_config(tmp_path)
  config.dataset.max_length = 1024
  with pytest.raises(ValueError, match=r"max_length=1024 must be resolution \*\* 2 = 256"):
    data_lib.get(config, "/unused")


# ---------------------------------------------------------------------------------------------
# Configs.
# ---------------------------------------------------------------------------------------------
def test_official_configs():
  pf = config_common.load(f"{REPO}/configs/lra/pathfinder.py")
  assert (pf.model.num_layers, pf.model.emb_dim, pf.model.num_heads, pf.model.qkv_dim,
          pf.model.mlp_dim, pf.model.pooling, pf.batch_size, pf.num_train_steps,
          pf.learning_rate, pf.warmup_steps, pf.weight_decay) == (
              4, 32, 4, 16, 32, "MEAN", 512, 62_400, 1e-3, 312, 0.0)
  assert pf.dataset.max_length == 1024 and pf.dataset.generator.contour_length == 14
  px = config_common.load(f"{REPO}/configs/lra/pathx.py:attention=cast")
  assert (px.model.num_layers, px.model.num_heads, px.model.learned_position_embedding,
          px.batch_size, px.grad_clip_norm, px.dataset.max_length) == (1, 2, True, 64, 1.0, 16384)
  assert px.model.attention == "cast" and px.model.attention_kwargs["num_clusters"] == 128
  with pytest.raises(ValueError, match="difficulty='medium'"):
    config_common.load(f"{REPO}/configs/lra/pathfinder.py:difficulty=medium")


@pytest.mark.parametrize("spec", ["pathfinder.py:cpu", "pathx.py:cpu"])
def test_config_trains_two_steps(tmp_path, spec):
  """The data the config names (rendered into the workdir), its model and optimiser: two train
  steps (the loop itself is tested in test_train.py)."""
  config = config_common.load(f"{REPO}/configs/lra/{spec}")
  config.dataset.generator.update(num_images=40, workers=0)
  config.model.update(emb_dim=16, num_heads=2, qkv_dim=16, mlp_dim=16)
  config.warmup_steps = 1
  dataset = data_lib.get(config, tmp_path)
  side = config.dataset.resolution
  assert (tmp_path / "data" / f"pathfinder{side}" / "generator.json").is_file()
  assert dict(dataset.model_kwargs) == {"vocab_size": 256, "num_classes": 2,
                                        "max_length": side * side}
  assert dataset.example_spec["inputs"] == ((side * side,), np.uint8)
  model = models.from_config(config.model, dict(dataset.model_kwargs))
  tx, schedule = optim.create_optimizer(config)
  batches = dataset.train_iterator(batch_size=8, seed=0)
  first = next(batches)
  init = jax.jit(lambda rng, x: nn.unbox(train.create_train_state(model, tx, rng, x)))
  state = init(jax.random.key(0), first["inputs"])
  step = jax.jit(functools.partial(train.train_step, model=model, tx=tx, schedule=schedule,
                                   rng=jax.random.key(1)))
  for batch in (first, next(batches)):
    state, metrics = step(state, batch)
  assert int(state.step) == 2 and np.isfinite(float(metrics["loss"]))
  test_rows = sum(batch["weights"].sum() for batch in dataset.eval_batches("test", batch_size=8))
  assert test_rows == 4  # 10% of 40 images.
