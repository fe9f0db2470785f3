"""Tests of the segmentation experiments' pieces: the mmcv-convention MAC counter
(experiments/segmentation/mmcv_flops.py), the model table's extra terms and the ADE20K
evaluation pass's data (ade20k_eval.py); shapes only, nothing timed.

The scripts are loaded from their paths, as when run.
"""

import importlib.util
import pathlib
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from clustr_jax import models

_DIR = pathlib.Path(__file__).resolve().parents[1] / "experiments" / "segmentation"
sys.path.insert(0, str(_DIR))


def _load(name):
  spec = importlib.util.spec_from_file_location(name, _DIR / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  sys.modules[name] = module
  spec.loader.exec_module(module)
  return module


mmcv_flops = _load("mmcv_flops")
model_table = _load("model_table")
ade20k_eval = _load("ade20k_eval")
TINY_512 = pathlib.Path(__file__).resolve().parent / "data" / "segmentation" / "ade20k_tiny_512"


class Tiny(nn.Module):
  """conv 3x3 (3 -> 8, bias, stride 2) -> LayerNorm -> dense 8 -> 5 -> GroupNorm(1, no affine)
  -> depthwise conv 3x3 without bias."""

  @nn.compact
  def __call__(self, x):
    x = nn.Conv(8, (3, 3), strides=2, padding=1, name="conv")(x)
    x = nn.LayerNorm(name="ln")(x)
    x = nn.relu(x)                                     # functional: not counted
    x = nn.Dense(5, name="fc")(x)
    x = nn.GroupNorm(1, use_scale=False, use_bias=False, name="gn")(x)
    return nn.Conv(5, (3, 3), padding=1, feature_group_count=5, use_bias=False, name="dw")(x)


def test_counter_matches_hand_count_for_a_tiny_model():
  x = jax.ShapeDtypeStruct((2, 16, 12, 3), jnp.float32)
  model = Tiny()
  variables = jax.eval_shape(model.init, jax.random.key(0), x)
  calls = mmcv_flops.count_macs(model.apply, variables, x)
  positions = 2 * 8 * 6                                   # batch x output H x W
  want = {
      "conv": positions * 3 * 3 * 3 * 8 + positions * 8,  # kernel MACs + bias
      "ln": 2 * positions * 8,                            # numel, x 2 (affine)
      "fc": positions * 8 * 5,                            # numel(input) x out, no bias term
      "gn": positions * 5,                                # numel, not affine
      "dw": positions * 3 * 3 * 1 * 5,                    # groups = channels
  }
  assert {c.path: c.macs for c in calls} == want
  assert [c.kind for c in calls] == ["Conv", "LayerNorm", "Dense", "GroupNorm", "Conv"]
  assert mmcv_flops.total(calls) == sum(want.values())


def test_attention_and_head_terms_of_a_small_fpn():
  options = dict(embed_dims=(8, 8, 16, 16), num_heads=(1, 1, 2, 2), mlp_ratios=(2, 2, 2, 2),
                 depths=(1, 1, 1, 1))
  model = models.get("clustr_t_fpn", num_classes=3, backbone_options=options, fpn_channels=8,
                     head_channels=8, num_groups=2)
  x = jax.ShapeDtypeStruct((1, 64, 64, 3), jnp.float32)
  variables = jax.eval_shape(model.init, jax.random.key(0), x)
  calls = mmcv_flops.count_macs(lambda v, x: model.apply(v, x), variables, x)
  # Stage i: N_i = (64 / 4 / 2^i)^2 tokens; ClusTR keys N / r^2 + 4 N / r^2 (r = 8, 4, 2), stage
  # 4 all N tokens; 2 N N_k C per layer.
  want = 0
  for n, keys, c in [(256, 4 + 16, 8), (64, 4 + 16, 8), (16, 4 + 16, 16), (4, 4, 16)]:
    want += 2 * n * keys * c
  assert model_table.attention_products(calls) == want
  # Head: 8 channels; level 1 one stage at 16 x 16 (ReLU only); levels 2-4 have 1, 2, 3 stages
  # ending at 16 x 16, each stage a ReLU on its input size and an x2 upsample (4 x numel).
  relu = 8 * (16 * 16 + 8 * 8 + (4 * 4 + 8 * 8) + (2 * 2 + 4 * 4 + 8 * 8))
  upsample = 4 * 8 * (8 * 8 + (4 * 4 + 8 * 8) + (2 * 2 + 4 * 4 + 8 * 8))
  assert model_table.head_functional_terms(calls) == relu + upsample


def test_sra_flops_is_pvts_formula():
  variant = {"sr_ratios": (8, 4, 2, 1), "embed_dims": (64, 128, 256, 512),
             "depths": (1, 2, 6, 1)}
  # PVT get_flops.py: 2 h w (h // r)(w // r) dim per block, at H // 4 ... H // 32.
  want = (2 * 56 * 56 * 7 * 7 * 64 + 2 * 2 * 28 * 28 * 7 * 7 * 128 + 6 * 2 * 14 * 14 * 7 * 7 * 256
          + 2 * 7 * 7 * 7 * 7 * 512)
  assert model_table.sra_flops(224, variant) == want


def test_ade20k_eval_reads_the_pre_padded_512_copy():
  config, dataset = ade20k_eval.load(str(TINY_512), "clustr_t")
  (pair,) = dataset.pairs("val")
  assert config.model.name == "clustr_t_fpn" and tuple(config.dataset.eval_size) == (512, 704)
  (batch,) = list(dataset.eval_batches("val", batch_size=1))
  assert batch["images"].shape == (1, 512, 704, 3) and batch["weights"].tolist() == [1.0]
  targets = batch["targets"][0]
  raw = np.asarray(Image.open(pair.label))
  # The 512 x 512 pair is kept as is (short side already 512); the canvas adds 192 columns.
  np.testing.assert_array_equal(targets[:, 512:], 255)
  np.testing.assert_array_equal(targets[:, :512][raw == 255], 255)      # padding ignored
  np.testing.assert_array_equal(targets[:, :512][raw == 0], 255)        # 'other' ignored
  labelled = (raw != 255) & (raw != 0)
  np.testing.assert_array_equal(targets[:, :512][labelled], raw[labelled].astype(np.int32) - 1)
