"""Semantic FPN on the ClusTR pyramid: dense prediction (semantic segmentation).

Sources: Kirillov, Girshick, He, Dollar, "Panoptic Feature Pyramid Networks", CVPR 2019 (the
semantic branch, "Semantic FPN"), as PVT uses it on ADE20K (Wang et al., "Pyramid Vision
Transformer", ICCV 2021, section 5.3; official ``whai362/PVT`` ``segmentation/``, built on
mmsegmentation v0.13: ``mmseg/models/necks/fpn.py`` ``FPN`` and
``mmseg/models/decode_heads/fpn_head.py`` ``FPNHead``); see ``docs/segmentation.md``.

  images float32 [B, H, W, 3]
  backbone: ClusTR pyramid (``clustr_vit.ClusTR(features_only=True)``)
                         -> c_i [B, H_i, W_i, C_i], strides 4, 8, 16, 32
  FPN neck (256 channels):
    lateral_i = Conv1x1(c_i) (with bias)
    top-down: lateral_{i-1} += nearest-resize(lateral_i to lateral_{i-1}'s size), i = 4..2
    p_i = Conv3x3(lateral_i) (with bias)                        -> p_i [B, H_i, W_i, 256]
  FPN head (128 channels):
    per level i: max(1, log2(stride_i / 4)) x [Conv3x3 (no bias) - GroupNorm(32) - ReLU
                 (- bilinear upsample x2 for levels above stride 4)]
    sum of the levels (each resized to level 1's size, bilinear)  -> [B, H_1, W_1, 128]
    Dropout(0.1), Conv1x1 -> classes                             -> [B, H_1, W_1, K]
  bilinear resize to the input size (half-pixel centres, PyTorch ``align_corners=False``)
                                                                 -> logits float32 [B, H, W, K]

Evaluation (``train=False``) runs the network on the whole image (``test_mode='whole'``, PVT's
setting) or on windows of ``test_window`` pixels every ``test_stride`` pixels whose logits are
averaged where they overlap (``'slide'``, mmsegmentation's ``EncoderDecoder.slide_inference``);
the window grid is static (from the input shape), so it compiles once per input size.

Initialisation (mmsegmentation's): FPN convolutions xavier-uniform, zero bias (``FPN``'s
``init_cfg``); head convolutions kaiming-normal (fan_out, ReLU gain) as mmcv's ``ConvModule``;
GroupNorm 1 / 0; the classifier normal(0, 0.01), zero bias (``BaseDecodeHead.init_weights``).
The backbone initialises as ``clustr_vit.ClusTR`` (an ImageNet checkpoint usually replaces it:
``config.init_checkpoint`` with ``config.init_prefix='backbone'``).

Parameter tree: backbone/<the ClusTR classifier's names without head>, neck/{lateral{i},
fpn{i}}, head/{scale{i}_{k}_conv, scale{i}_{k}_norm, cls}.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from clustr_jax.models import clustr_vit, vit

Dtype = Any

#: ``test_mode`` values.
TEST_MODES = ("whole", "slide")
#: Strides of the pyramid's four maps.
STRIDES = (4, 8, 16, 32)


def resize(x: jax.Array, size: tuple[int, int], method: str) -> jax.Array:
  """[B, H, W, C] -> [B, size[0], size[1], C] with half-pixel centres and no antialiasing:
  PyTorch's ``F.interpolate(mode='bilinear', align_corners=False)`` for ``method='bilinear'``;
  for 'nearest' the same as PyTorch's nearest at integer up-scaling factors (the FPN's x2)."""
  if tuple(x.shape[1:3]) == tuple(size):
    return x
  return jax.image.resize(x, (x.shape[0], *size, x.shape[3]), method=method, antialias=False)


def _conv(features: int, kernel: int, name: str, init, use_bias: bool, dtype: Dtype) -> nn.Conv:
  pad = kernel // 2
  return nn.Conv(features, (kernel, kernel), padding=((pad, pad), (pad, pad)),
                 use_bias=use_bias, dtype=dtype, name=name,
                 kernel_init=nn.with_logical_partitioning(init, (None, None, None, "mlp")),
                 bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), ("mlp",)))


_XAVIER = nn.initializers.xavier_uniform()
_KAIMING = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


class FPNNeck(nn.Module):
  """FPN (Lin et al. 2017; mmsegmentation ``FPN`` without extra levels): lateral 1x1 convs,
  nearest top-down path, 3x3 output convs, all with ``channels`` outputs and biases.

  Call: list of 4 maps [B, H_i, W_i, C_i] -> list of 4 maps [B, H_i, W_i, channels] in
  ``dtype``.
  """
  channels: int = 256
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, features: Sequence[jax.Array]) -> list[jax.Array]:
    laterals = [_conv(self.channels, 1, f"lateral{i + 1}", _XAVIER, True, self.dtype)(x)
                for i, x in enumerate(features)]
    for i in range(len(laterals) - 1, 0, -1):
      laterals[i - 1] = laterals[i - 1] + resize(laterals[i], laterals[i - 1].shape[1:3],
                                                 "nearest")
    return [_conv(self.channels, 3, f"fpn{i + 1}", _XAVIER, True, self.dtype)(x)
            for i, x in enumerate(laterals)]


class FPNHead(nn.Module):
  """Semantic FPN head (Kirillov et al. 2019, Fig. 3; mmsegmentation ``FPNHead``).

  Attributes:
    num_classes: K.
    channels: width of the per-level stages (128).
    num_groups: GroupNorm groups (32).
    dropout_rate: dropout before the classifier (0.1).
    strides: the input maps' strides (4, 8, 16, 32).

  Call: list of maps [B, H_i, W_i, C] (strides ``strides``) and ``deterministic`` -> logits
  float32 [B, H_1, W_1, K] at the first map's size.
  """
  num_classes: int
  channels: int = 128
  num_groups: int = 32
  dropout_rate: float = 0.1
  strides: Sequence[int] = STRIDES
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, features: Sequence[jax.Array], *, deterministic: bool) -> jax.Array:
    if len(features) != len(self.strides):
      raise ValueError(f"FPNHead: {len(features)} maps for strides {tuple(self.strides)}")
    output = None
    for i, x in enumerate(features):
      steps = max(1, int(math.log2(self.strides[i]) - math.log2(self.strides[0])))
      for k in range(steps):
        x = _conv(self.channels, 3, f"scale{i + 1}_{k}_conv", _KAIMING, False, self.dtype)(x)
        x = nn.GroupNorm(self.num_groups, epsilon=1e-5, dtype=self.dtype,
                         name=f"scale{i + 1}_{k}_norm")(x)
        x = nn.relu(x)
        if self.strides[i] != self.strides[0]:
          x = resize(x, (2 * x.shape[1], 2 * x.shape[2]), "bilinear")
      output = x if output is None else output + resize(x, output.shape[1:3], "bilinear")
    output = nn.Dropout(self.dropout_rate)(output, deterministic=deterministic)
    logits = nn.Conv(self.num_classes, (1, 1), dtype=self.dtype, name="cls",
                     kernel_init=nn.with_logical_partitioning(
                         nn.initializers.normal(0.01), (None, None, "mlp", "classes")),
                     bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(),
                                                            ("classes",)))(output)
    return logits.astype(jnp.float32)


def window_starts(size: int, window: int, stride: int) -> list[int]:
  """Window offsets along one axis as mmsegmentation's ``slide_inference``: ceil((size -
  window) / stride) + 1 windows, the last one moved back to end at ``size`` (one window at 0
  when ``size`` <= ``window``)."""
  count = max(size - window + stride - 1, 0) // stride + 1
  return sorted({max(min(i * stride + window, size) - window, 0) for i in range(count)})


class SemanticFPN(nn.Module):
  """ClusTR pyramid + Semantic FPN (see the module docstring).

  Attributes:
    num_classes: K (keyword-only; the dataset gives it).
    variant: the backbone, a key of ``clustr_vit.VARIANTS`` ('b1', 'b2', 'b3' = ClusTR-T/S/B).
    attention, attention_kwargs: the mechanism of the backbone's stages 1-3 and its options
      (``clustr_vit.ClusTR``); stage 4 is always full attention.
    drop_path_rate: the backbone's stochastic depth (PVT's segmentation backbones: 0.1).
    backbone_options: ``clustr_vit.ClusTR`` constructor options overriding the variant's (e.g.
      smaller ``embed_dims`` / ``depths`` for tests); None: the variant as published.
    attention_size: (H, W) the stage mechanisms' settings are sized for (``clustr_vit.ClusTR``;
      the recipes give the train crop, so that e.g. CAST's learned surrogates fit every input
      size); None: the actual input.
    fpn_channels: the FPN's width (256); head_channels: the head's (128).
    num_groups: the head's GroupNorm groups (32); dropout_rate: before the classifier (0.1).
    test_mode: 'whole' or 'slide' (evaluation, see the module docstring).
    test_window, test_stride: the slide mode's window and stride, (h, w) pixels.
    dtype: computation dtype (parameters and logits float32).

  Call: images float32 [B, H, W, 3] and ``train`` -> logits float32 [B, H, W, K].

  Raises:
    ValueError: unknown variant or test_mode, slide mode without window and stride, and the
      backbone's errors (``clustr_vit.ClusTR``).
  """
  num_classes: int = dataclasses.field(kw_only=True)
  variant: str = "b1"
  attention: str = "clustr"
  attention_kwargs: Mapping[str, Any] | None = None
  drop_path_rate: float = 0.1
  backbone_options: Mapping[str, Any] | None = None
  attention_size: Sequence[int] | None = None
  fpn_channels: int = 256
  head_channels: int = 128
  num_groups: int = 32
  dropout_rate: float = 0.1
  test_mode: str = "whole"
  test_window: Sequence[int] | None = None
  test_stride: Sequence[int] | None = None
  dtype: Dtype = jnp.float32

  def _check(self) -> None:
    if self.variant not in clustr_vit.VARIANTS:
      raise ValueError(f"SemanticFPN: variant={self.variant!r} unknown; valid: "
                       f"{', '.join(clustr_vit.VARIANTS)}")
    if self.test_mode not in TEST_MODES:
      raise ValueError(f"SemanticFPN: test_mode={self.test_mode!r} unknown; valid: "
                       f"{', '.join(TEST_MODES)}")
    if self.test_mode == "slide" and (
        self.test_window is None or self.test_stride is None or len(self.test_window) != 2
        or len(self.test_stride) != 2 or min(*self.test_window, *self.test_stride) < 1):
      raise ValueError(f"SemanticFPN: test_mode='slide' needs test_window and test_stride as "
                       f"(h, w) positive pixels; got {self.test_window}, {self.test_stride}")

  @nn.compact
  def __call__(self, images: jax.Array, *, train: bool = False) -> jax.Array:
    self._check()
    vit.check_images(images, "SemanticFPN")
    options = {**clustr_vit.VARIANTS[self.variant], "drop_path_rate": self.drop_path_rate,
               "attention": self.attention, "attention_kwargs": self.attention_kwargs,
               "attention_size": self.attention_size,
               **(self.backbone_options or {})}
    backbone = clustr_vit.ClusTR(num_classes=0, **options, dtype=self.dtype, features_only=True,
                                 name="backbone")
    neck = FPNNeck(self.fpn_channels, self.dtype, name="neck")
    head = FPNHead(self.num_classes, self.head_channels, self.num_groups, self.dropout_rate,
                   STRIDES, self.dtype, name="head")

    def forward(x):
      logits = head(neck(backbone(x, train=train)), deterministic=not train)
      return resize(logits, x.shape[1:3], "bilinear")

    if train or self.test_mode == "whole":
      return forward(images)
    batch, height, width, _ = images.shape
    (wh, ww), (sh, sw) = self.test_window, self.test_stride
    total = jnp.zeros((batch, height, width, self.num_classes), jnp.float32)
    count = jnp.zeros((1, height, width, 1), jnp.float32)
    for y in window_starts(height, wh, sh):
      for x in window_starts(width, ww, sw):
        window = images[:, y:y + wh, x:x + ww]
        total = total.at[:, y:y + window.shape[1], x:x + window.shape[2]].add(forward(window))
        count = count.at[:, y:y + window.shape[1], x:x + window.shape[2]].add(1.0)
    return total / count


#: Registered Semantic FPN models: name -> the backbone variant.
MODELS = {"clustr_t_fpn": "b1", "clustr_s_fpn": "b2", "clustr_b_fpn": "b3"}
