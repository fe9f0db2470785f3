"""The ClusTR pyramid vision transformer (ClusTR-T/S/B = official ``ClusTR_b1/b2/b3``).

Source: Xie et al., "ClusTR: Exploring Efficient Self-attention via Clustering for Vision
Transformers", arXiv 2208.13138; official code GitHub ``YtongXie/ClusTR`` @ 3b5e28d, ``ClusTR.py``
(``OverlapPatchEmbed``, ``Block``, ``Mlp``, ``DWConv``, ``ClusTR``, ``ClusTR_b1/b2/b3``); see
``docs/vision.md`` ("The ClusTR pyramid"), ``docs/clustr.md`` and ``docs/conversion.md``.

  images float32 [B, H, W, 3]
  for stage i = 1..4 (C_i = embed_dims[i]):
    patch_embed{i}: Conv (7x7 stride 4 pad 3 for i = 1, else 3x3 stride 2 pad 1) + LayerNorm
                    (eps 1e-5)                       -> tokens [B, N_i, C_i], N_i = H_i W_i
    depths[i] x block{i}_{j} (pre-LN, LN eps 1e-6):
      x += DropPath(Attn(LN1(x)))                     Attn: ClusTR attention (sr_ratio > 1, the
                                                      official stages 1-3) or full MHSA
                                                      (sr_ratio = 1, stage 4)
      x += DropPath(Mlp(LN2(x)))                      Mlp: h = fc1(x) [B, N, r C];
                                                      h = GELU(h + DWConv3x3(h)); fc2(Dropout(h))
    norm{i} (LN eps 1e-6); stages 1-3 reshape back to [B, H_i, W_i, C_i]
  mean over the stage-4 tokens, head Linear(C_4, classes)          -> logits float32 [B, classes]

``features_only=True`` makes the same module a dense-prediction backbone (the PVT/ClusTR
pyramid as the Semantic FPN uses it, ``clustr_jax/models/segmentation.py``): the call returns
the four normed stage maps [B, H_i, W_i, C_i] (strides 4, 8, 16, 32; H_1 = ceil(H / 4), then
H_{i+1} = ceil(H_i / 2), the patch embeddings' output sizes) and builds no head, so the
parameter names equal the classifier's without ``head``.

The depthwise conv (3x3, stride 1, pad 1, groups r C, with bias) sits inside a residual before
the exact (erf) GELU (PVTv2 has GELU(DWConv(fc1(x)))). No position embeddings. Stochastic depth
rates are linear from 0 to drop_path_rate over all blocks of all stages together. The cluster
counts (N_i // sr_i^2, 4 N_i // sr_i^2) follow from the actual token count, so any input side
divisible by 32 works (224: 49 and 196 clusters in every ClusTR stage).

Initialisation as the official ``_init_weights``: every Linear trunc-normal(0.02), zero bias, the
attention's q/kv1/kv2/proj (each mechanism's ``kernel_init``, set by ``vit.build_attention``) and
weight_layer included; LayerNorm 1 / 0; Conv normal(0, sqrt(2 / fan_out)), fan_out = k k
out_channels / groups, zero bias (``docs/vision.md``, "Initialisation").

Parameter names mirror the official keys (``clustr_jax.convert``): patch_embed{i}/{proj, norm},
block{i}_{j}/{norm1, attn, norm2, mlp/{fc1, dwconv, fc2}}, norm{i}, head; ClusTR attention
attn/{q, weight_layer, kv1, kv2, proj}; full attention attn/{query, key, value, out} (the
official q, kv split into K and V, proj).

Eval-mode semantics: the official 1e-6 U(0,1) tie-break noise of the DPC-kNN density (rng
'clustering') is applied only with ``train=True`` (ClusTR attention's ``density_noise='train'``,
its setting for a pyramid stage), so ``train=False`` is deterministic (the official model also
draws it in eval mode); ``attention_kwargs={'density_noise': False}`` switches it off.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from clustr_jax import attention as attention_lib
from clustr_jax.models import vit

Dtype = Any


class ClusTR(nn.Module):
  """The ClusTR pyramid classifier (official ``ClusTR``; see the module docstring).

  Attributes (official constructor names; defaults = ``ClusTR_b1``):
    num_classes: classes of the head (keyword-only).
    embed_dims, num_heads, mlp_ratios, depths, sr_ratios: per stage (4 entries each).
    qkv_bias: biases on q and kv (official variants: True).
    drop_rate: dropout in the Mlp and after the attention projection (official 0).
    attn_drop_rate: attention-weight dropout (official 0).
    drop_path_rate: stochastic depth, linear over all blocks (official recipe 0.1 / 0.1 / 0.3).
    attention: mechanism of the stages with sr_ratio > 1 (default 'clustr'; any registry name,
      e.g. 'dense' for an ablation); stages with sr_ratio = 1 always use full attention ('dense').
    attention_kwargs: options of that mechanism (for 'clustr': knn_k, distance_chunk_size,
      merge_eps, num_clusters, ...; sr_ratio is set per stage and must not be given).
    dtype: computation dtype (parameters float32; logits float32).
    features_only: return the four stage maps instead of logits (no head; ``num_classes`` is
      then unused, e.g. 0).
    attention_size: None, or the (H, W) input size the mechanisms' settings are chosen for
      (``attention.sized_for`` gets that size's stage grids instead of the actual ones), for
      mechanisms whose parameters depend on the token count (e.g. CAST's learned surrogates),
      so that a dense-prediction backbone trained on crops runs at other sizes. ClusTR's own
      cluster counts follow the actual tokens either way.

  Call: images float32 [B, H, W, 3] (H, W divisible by 32 for the official grids; any size
  whose stage-4 grid is non-empty and whose cluster counts are >= 1 otherwise) and ``train``
  bool (dropout, drop path, ClusTR's density noise) -> logits float32 [B, num_classes], or with
  ``features_only`` a list of 4 maps [B, H_i, W_i, C_i] in ``dtype`` (strides 4, 8, 16, 32).

  Raises:
    ValueError: per-stage settings without 4 entries, embed_dims not divisible by num_heads,
      images not [B, H, W, 3] floats, sr_ratio in attention_kwargs, a cluster count outside
      [1, N] for the input size (from ClusTRAttention), or an attention error.
  """
  num_classes: int = dataclasses.field(kw_only=True)
  embed_dims: Sequence[int] = (64, 128, 256, 512)
  num_heads: Sequence[int] = (1, 2, 4, 8)
  mlp_ratios: Sequence[float] = (8, 8, 4, 4)
  depths: Sequence[int] = (1, 2, 6, 1)
  sr_ratios: Sequence[int] = (8, 4, 2, 1)
  qkv_bias: bool = True
  drop_rate: float = 0.0
  attn_drop_rate: float = 0.0
  drop_path_rate: float = 0.0
  attention: str = "clustr"
  attention_kwargs: Mapping[str, Any] | None = None
  dtype: Dtype = jnp.float32
  features_only: bool = False
  attention_size: Sequence[int] | None = None

  def _check(self) -> None:
    for key in ("embed_dims", "num_heads", "mlp_ratios", "depths", "sr_ratios"):
      if len(getattr(self, key)) != 4:
        raise ValueError(f"ClusTR: {key} needs 4 entries (one per stage); got "
                         f"{tuple(getattr(self, key))}")
    for dim, heads in zip(self.embed_dims, self.num_heads):
      if dim % heads:
        raise ValueError(f"ClusTR: embed_dims {tuple(self.embed_dims)} must be divisible by "
                         f"num_heads {tuple(self.num_heads)} stage by stage")
    if "sr_ratio" in (self.attention_kwargs or {}):
      raise ValueError("ClusTR: attention_kwargs must not set sr_ratio; use sr_ratios")

  def _stage_attention(self, sr_ratio: int, length: int, grid: tuple[int, int]
                       ) -> tuple[str, dict[str, Any]]:
    """(attention name, options) of a stage of ``length`` tokens on ``grid``: full attention at
    sr 1, else ``attention`` with the settings the registry gives a pyramid stage
    (``attention.sized_for``; for ClusTR the official clusters and tie-break noise) under the
    config's ``attention_kwargs``."""
    if sr_ratio == 1:
      return "dense", {}
    options = attention_lib.sized_for(self.attention, length, grid=grid, cls_token=False,
                                      sr_ratio=sr_ratio)
    options.update(self.attention_kwargs or {})
    return self.attention, options

  @nn.compact
  def __call__(self, images: jax.Array, *, train: bool = False) -> jax.Array:
    self._check()
    vit.check_images(images, "ClusTR")
    deterministic = not train
    rates = vit.drop_path_rates(self.drop_path_rate, sum(self.depths))
    x = images
    cur = 0
    features = []
    for i in range(4):
      dim = self.embed_dims[i]
      kernel, stride = (7, 4) if i == 0 else (3, 2)
      tokens, size = vit.PatchEmbed(dim, kernel, stride, kernel // 2, 1e-5, self.dtype,
                                    vit.conv_init(kernel, dim), nn.initializers.zeros_init(),
                                    name=f"patch_embed{i + 1}")(x)
      grid = size
      if self.attention_size is not None:
        grid = tuple(-(-s // (4 * 2 ** i)) for s in self.attention_size)  # ceil(H / stride).
      name, options = self._stage_attention(self.sr_ratios[i], grid[0] * grid[1], grid)
      for j in range(self.depths[i]):
        tokens = vit.Block(self.num_heads[i], self.mlp_ratios[i], self.qkv_bias,
                           self.drop_rate, self.attn_drop_rate, rates[cur + j], name, options,
                           dwconv=True, dtype=self.dtype, name=f"block{i + 1}_{j}")(
                               tokens, size, deterministic=deterministic)
      cur += self.depths[i]
      tokens = vit.layer_norm(1e-6, self.dtype, f"norm{i + 1}")(tokens)
      x = tokens.reshape(tokens.shape[0], size[0], size[1], dim)
      features.append(x)
    if self.features_only:
      return features
    pooled = jnp.mean(tokens.astype(jnp.float32), axis=1)
    return vit.dense(self.num_classes, ("embed", "classes"), jnp.float32, "head")(pooled)


#: Official variants (``ClusTR_b1/b2/b3``): constructor defaults besides num_classes.
VARIANTS: dict[str, dict[str, Any]] = {
    "b1": dict(embed_dims=(64, 128, 256, 512), num_heads=(1, 2, 4, 8), mlp_ratios=(8, 8, 4, 4),
               depths=(1, 2, 6, 1), sr_ratios=(8, 4, 2, 1), qkv_bias=True),
    "b2": dict(embed_dims=(64, 128, 256, 512), num_heads=(1, 2, 4, 8), mlp_ratios=(8, 8, 4, 4),
               depths=(3, 5, 13, 2), sr_ratios=(8, 4, 2, 1), qkv_bias=True),
    "b3": dict(embed_dims=(64, 128, 320, 512), num_heads=(1, 2, 5, 8), mlp_ratios=(8, 8, 4, 4),
               depths=(3, 5, 18, 3), sr_ratios=(8, 4, 2, 1), qkv_bias=True),
}
