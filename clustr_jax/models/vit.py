"""ViT / DeiT image classifiers with any attention from the registry, and Sparsifiner DeiT-S.

  images float32 [B, H, W, 3]
  --patch_embed (Conv p x p, stride p)-->        [B, H/p, W/p, D] -> tokens [B, N_p, D] (row-major)
  prepend cls_token, + pos_embed, Dropout         [B, N, D],  N = N_p + 1
  depth x pre-LN block:  x += DropPath(Attn(LN1(x)));  x += DropPath(Mlp(LN2(x)))
  LN (the final 'norm'), head Linear(D, classes) on the CLS token   -> logits float32 [B, classes]

Source: timm ``vision_transformer.py`` as used by DeiT (Touvron et al. 2021, ``deit_tiny/small/
base_patch16_224``) and the official Sparsifiner DeiT file (``lim142857/Sparsifiner`` @ 9a11e26,
``src/models/sparsifiner.py``: ``PatchEmbed``, ``Block``, ``Sparsifiner``; see ``docs/vision.md``
and ``docs/sparsifiner.md``): LayerNorm eps 1e-6, exact (erf) GELU, Mlp
fc1 -> GELU -> Dropout -> fc2 -> Dropout, stochastic depth rates linear in the block index from 0
to ``drop_path_rate`` (``torch.linspace(0, rate, depth)``), Linear weights trunc-normal(0.02) with
zero biases, cls_token and pos_embed trunc-normal(0.02), no pre-logits layer.

Parameter names mirror the official state-dict keys (``clustr_jax.convert`` maps them):
patch_embed/proj {kernel [p, p, 3, D], bias [D]}, cls_token [1, 1, D], pos_embed [1, N, D],
blocks_{i}/{norm1, attn, norm2, mlp/fc1, mlp/fc2}, norm, head. The attention's own parameters are
those of the registry module (dense: query/key/value/out; sparsifiner: query/key/value/proj and
mask_predictor; see ``clustr_jax/attention``).

Initialisation for training from scratch (``docs/vision.md``, "Initialisation"), as timm's
``_init_weights``: every Linear, the attention projections included (each mechanism's
``kernel_init`` field, ``build_attention``), trunc-normal(0.02) with zero bias; LayerNorm 1 / 0;
cls_token and pos_embed trunc-normal(0.02); the patch-embedding conv, which timm leaves alone,
PyTorch's Conv2d default (kaiming-uniform with a = sqrt(5): U(+-1 / sqrt(fan_in)) for the kernel
and the bias). A mechanism's own parameters (Sparsifiner's predictor, CAST's surrogates) keep
their initialisation. None of this changes a converted model.

Sown into 'intermediates' besides the attention modules' own tensors (e.g. Sparsifiner's
'approx_attn', 'unmasked_attn', 'attn_mask' under blocks_{i}/attn): 'features', the final-
normalised patch tokens [B, N_p, D] in ``dtype`` (the official Sparsifiner ``features``, used by
the token-distillation MSE), and with token pruning 'token_keep_mask', the final running keep
mask bool [B, N] (CLS True; the official ``token_mask_list[-1]``, which restricts that MSE to the
kept tokens).

Token pruning (official Sparsifiner ``Block`` / ``Attention``, docs/sparsifiner.md): a block whose
attention option token_keep_rate r < 1 keeps the ceil(r N_p) patches with the largest mean CLS
attention; the pruned tokens' features are zeroed after that block and every later one, and the
running keep mask goes to the later blocks' attention (``token_pruning``).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from clustr_jax import attention as attention_lib
from clustr_jax.attention import base as attention_base

Dtype = Any

#: timm's trunc_normal_(std=.02) cuts at +-2 in absolute value, i.e. +-100 standard deviations.
trunc_normal_02 = attention_base.trunc_normal_02

#: The official ViT/DeiT and ClusTR blocks use exact (erf) GELU, PyTorch's default.
def gelu(x: jax.Array) -> jax.Array:
  """Exact GELU x Phi(x) (PyTorch ``nn.GELU()``; JAX's default is the tanh approximation)."""
  return jax.nn.gelu(x, approximate=False)


def layer_norm(epsilon: float, dtype: Dtype, name: str) -> nn.LayerNorm:
  """LayerNorm with logically named scale and bias ('embed',): weight 1, bias 0."""
  return nn.LayerNorm(
      epsilon=epsilon, dtype=dtype, name=name,
      scale_init=nn.with_logical_partitioning(nn.initializers.ones_init(), ("embed",)),
      bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), ("embed",)))


def dense(features: int, axes: tuple[str, str], dtype: Dtype, name: str,
          use_bias: bool = True) -> nn.Dense:
  """Linear layer with trunc-normal(0.02) kernel and zero bias (timm ``_init_weights``)."""
  return nn.Dense(
      features, use_bias=use_bias, dtype=dtype, name=name,
      kernel_init=nn.with_logical_partitioning(trunc_normal_02, axes),
      bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), (axes[1],)))


class DropPath(nn.Module):
  """Stochastic depth (timm ``DropPath``): zero a whole sample's branch with probability ``rate``
  and scale the kept ones by 1 / (1 - rate); rng stream 'dropout'. Identity when deterministic.

  Call: x [B, ...] -> same shape and dtype.
  """
  rate: float

  @nn.compact
  def __call__(self, x: jax.Array, *, deterministic: bool) -> jax.Array:
    if deterministic or self.rate == 0.0:
      return x
    keep = 1.0 - self.rate
    shape = (x.shape[0],) + (1,) * (x.ndim - 1)
    kept = jax.random.bernoulli(self.make_rng("dropout"), keep, shape)
    return jnp.where(kept, x / jnp.asarray(keep, x.dtype), jnp.zeros_like(x))


def drop_path_rates(rate: float, depth: int) -> list[float]:
  """Linear stochastic-depth rule: block i of ``depth`` gets rate * i / (depth - 1)
  (``torch.linspace(0, rate, depth)``, float32 as torch computes it)."""
  if depth == 1:
    return [0.0]
  return [float(r) for r in np.linspace(0.0, rate, depth, dtype=np.float32)]


def build_attention(name: str, options: Mapping[str, Any], *, num_heads: int, features: int,
                    qkv_bias: bool, dropout_rate: float, dtype: Dtype,
                    module_name: str = "attn") -> nn.Module:
  """An attention module of the registry for a width-``features`` vision block.

  ``qkv_bias`` goes to the module's ``use_bias`` (for 'dense' only to q/k/v: its output
  projection always has a bias, as the official ``proj``); a mechanism with a ``kernel_init``
  field gets trunc-normal(0.02) (timm's and ClusTR's ``_init_weights`` for every Linear);
  ``options`` are the mechanism's own fields and override everything else.

  Raises:
    ValueError: unknown attention name, an option the module does not have, or a required
      option missing (e.g. CAST's num_clusters / cluster_size); the message names them.
  """
  cls = attention_lib.get(name)
  fields = {f.name: f for f in dataclasses.fields(cls) if f.name not in ("parent", "name")}
  kwargs: dict[str, Any] = dict(num_heads=num_heads, qkv_features=features,
                                out_features=features, dropout_rate=dropout_rate, dtype=dtype)
  if "use_bias" in fields:
    kwargs["use_bias"] = qkv_bias
  if "out_bias" in fields:
    kwargs["out_bias"] = True
  if "kernel_init" in fields:
    kwargs["kernel_init"] = trunc_normal_02
  unknown = sorted(set(options) - set(fields))
  if unknown:
    raise ValueError(f"attention {name!r} has no option(s) {unknown}; valid: {sorted(fields)}")
  kwargs.update(options)
  missing = sorted(f for f, spec in fields.items() if f not in kwargs
                   and spec.default is dataclasses.MISSING
                   and spec.default_factory is dataclasses.MISSING)
  if missing:
    raise ValueError(f"attention {name!r} needs option(s) {missing}: set them in "
                     "attention_kwargs")
  return cls(**kwargs, name=module_name)


class PatchEmbed(nn.Module):
  """Patch embedding: Conv2d (kernel k, stride s, zero padding p on every side) then an optional
  LayerNorm, tokens flattened row-major over (H, W) (timm ``PatchEmbed``: k = s = 16, p = 0, no
  norm; ClusTR ``OverlapPatchEmbed``: k = 7, s = 4, p = 3 or k = 3, s = 2, p = 1, LayerNorm eps
  1e-5). Explicit padding: ``"SAME"`` would pad (1, 2) instead of (3, 3) at stride 4.

  Call: x [B, H, W, C_in] -> (tokens [B, H' W', features] in ``dtype``, (H', W')) with
  H' = (H + 2p - k) // s + 1. Parameters: proj {kernel [k, k, C_in, features], bias
  [features]} (the official weight (O, I, k, k) transposed to (k, k, I, O)), norm {scale, bias}.
  Initialisation: ``kernel_init`` and ``bias_init``; None gives PyTorch's Conv2d default,
  U(+-1 / sqrt(fan_in)) with fan_in = k k C_in for both (timm's ViT leaves its conv so).
  """
  features: int
  kernel: int
  stride: int
  padding: int
  norm_eps: float | None
  dtype: Dtype = jnp.float32
  kernel_init: Callable[..., jax.Array] | None = None
  bias_init: Callable[..., jax.Array] | None = None

  @nn.compact
  def __call__(self, x: jax.Array) -> tuple[jax.Array, tuple[int, int]]:
    pad = self.padding
    bound = 1.0 / math.sqrt(self.kernel * self.kernel * x.shape[-1])  # PyTorch: 1 / sqrt(fan_in)
    kernel_init = self.kernel_init or nn.initializers.variance_scaling(1 / 3, "fan_in", "uniform")
    bias_init = self.bias_init or (
        lambda key, shape, dtype=jnp.float32: jax.random.uniform(key, shape, dtype, -bound, bound))
    x = nn.Conv(
        self.features, (self.kernel, self.kernel), strides=self.stride,
        padding=((pad, pad), (pad, pad)), dtype=self.dtype, name="proj",
        kernel_init=nn.with_logical_partitioning(kernel_init, (None, None, None, "embed")),
        bias_init=nn.with_logical_partitioning(bias_init, ("embed",)))(x.astype(self.dtype))
    batch, height, width, _ = x.shape
    x = x.reshape(batch, height * width, self.features)
    if self.norm_eps is not None:
      x = layer_norm(self.norm_eps, self.dtype, "norm")(x)
    return nn.with_logical_constraint(x, ("batch", "length", "activation_embed")), (height, width)


def conv_init(kernel: int, out_channels: int, groups: int = 1) -> nn.initializers.Initializer:
  """ClusTR's Conv2d init: normal(0, sqrt(2 / fan_out)), fan_out = k k out_channels / groups."""
  return nn.initializers.normal(stddev=math.sqrt(2.0 / (kernel * kernel * out_channels // groups)))


class Mlp(nn.Module):
  """fc1 (D -> hidden) -> [h + DWConv(h)] -> exact GELU -> Dropout -> fc2 -> Dropout.

  Without ``dwconv`` it is timm's ``Mlp``; with it, ClusTR's ``Mlp``: a depthwise 3x3 conv
  (stride 1, pad 1, groups = hidden, with bias) on the token grid, inside a residual before the
  activation (PVTv2 has GELU(DWConv(fc1(x))) instead).

  Call: x [B, N, D], ``size`` (H, W) with N = H W (row-major tokens; needed with dwconv) ->
  [B, N, D] in ``dtype``. Parameters: fc1 {kernel [D, hidden], bias}, dwconv {kernel
  [3, 3, 1, hidden] (official mlp.dwconv.dwconv.weight (hidden, 1, 3, 3) transposed), bias},
  fc2 {kernel [hidden, D], bias}.
  """
  hidden: int
  dropout_rate: float = 0.0
  dwconv: bool = False
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, size: tuple[int, int] | None = None, *,
               deterministic: bool) -> jax.Array:
    batch, length, features = x.shape
    h = dense(self.hidden, ("embed", "mlp"), self.dtype, "fc1")(x)
    h = nn.with_logical_constraint(h, ("batch", "length", "activation_mlp"))
    if self.dwconv:
      grid = h.reshape(batch, size[0], size[1], self.hidden)
      dw = nn.Conv(
          self.hidden, (3, 3), padding=((1, 1), (1, 1)), feature_group_count=self.hidden,
          dtype=self.dtype, name="dwconv",
          kernel_init=nn.with_logical_partitioning(conv_init(3, self.hidden, self.hidden),
                                                   (None, None, None, "mlp")),
          bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), ("mlp",)))(grid)
      h = h + dw.reshape(batch, length, self.hidden)
    h = nn.Dropout(self.dropout_rate)(gelu(h), deterministic=deterministic)
    h = dense(features, ("mlp", "embed"), self.dtype, "fc2")(h)
    return nn.Dropout(self.dropout_rate)(h, deterministic=deterministic)


class Block(nn.Module):
  """Pre-LN block: x += DropPath(Attn(LN1(x))); x += DropPath(Mlp(LN2(x))); LN eps 1e-6
  (timm / Sparsifiner ``Block``; with ``dwconv`` the ClusTR ``Block`` and its conv Mlp).

  Call: x [B, N, D], ``size`` (H, W) of the token grid (needed with dwconv) -> [B, N, D] in
  ``dtype``. With ``token_pruning`` ('zero' or 'mask', ``VisionTransformer``) the call also
  takes ``token_keep`` bool [B, N] (the running keep mask, CLS True) and ``kept_patches`` (int,
  its kept patch count) and returns (x, keep): the attention's keep mask, whose pruned tokens'
  features are zeroed after the Mlp (official Sparsifiner ``Block.forward``).
  """
  num_heads: int
  mlp_ratio: float
  qkv_bias: bool
  drop_rate: float
  attn_drop_rate: float
  drop_path_rate: float
  attention: str
  attention_kwargs: Mapping[str, Any]
  dwconv: bool = False
  dtype: Dtype = jnp.float32
  token_pruning: str | None = None

  @nn.compact
  def __call__(self, x: jax.Array, size: tuple[int, int] | None = None, *,
               deterministic: bool, token_keep: jax.Array | None = None,
               kept_patches: int | None = None):
    features = x.shape[-1]
    attn = build_attention(self.attention, self.attention_kwargs, num_heads=self.num_heads,
                           features=features, qkv_bias=self.qkv_bias,
                           dropout_rate=self.attn_drop_rate, dtype=self.dtype)
    drop_path = DropPath(self.drop_path_rate)
    h = layer_norm(1e-6, self.dtype, "norm1")(x)
    if self.token_pruning is None:
      y = attn(h, deterministic=deterministic)
    elif self.token_pruning == "zero":
      y, keep = attn(h, deterministic=deterministic, token_keep=token_keep,
                     kept_patches=kept_patches, return_token_keep=True)
    else:
      y, keep = attn(h, token_keep, deterministic=deterministic, return_token_keep=True)
    y = nn.Dropout(self.drop_rate)(y, deterministic=deterministic)        # official proj_drop
    x = x + drop_path(y, deterministic=deterministic)
    x = nn.with_logical_constraint(x, ("batch", "length", "activation_embed"))
    y = Mlp(int(features * self.mlp_ratio), self.drop_rate, self.dwconv, self.dtype, name="mlp")(
        layer_norm(1e-6, self.dtype, "norm2")(x), size, deterministic=deterministic)
    x = x + drop_path(y, deterministic=deterministic)
    x = nn.with_logical_constraint(x, ("batch", "length", "activation_embed"))
    if self.token_pruning is None:
      return x
    return jnp.where(keep[:, :, None], x, jnp.zeros((), x.dtype)), keep


#: ``VisionTransformer.token_pruning`` choices: 'zero' is the official handling, 'mask' ours.
TOKEN_PRUNING = ("zero", "mask")


def token_keep_rates(base: float, locations: Sequence[int] = (3, 6, 9),
                     depth: int = 12) -> tuple[dict[str, float], ...]:
  """``layer_attention_kwargs`` entries of the official token pruning: base^(j + 1) at the j-th
  of ``locations`` (official ``main.py``: TOKEN_KEEP_RATE_BASE b, TOKEN_PRUNING_LOC [3, 6, 9],
  rates b, b^2, b^3), an empty entry elsewhere.

  Raises:
    ValueError: base outside (0, 1], a location outside [0, depth) or repeated.
  """
  if not 0.0 < base <= 1.0:
    raise ValueError(f"token_keep_rates: base must be in (0, 1]; got {base}")
  if len(set(locations)) != len(locations) or any(not 0 <= i < depth for i in locations):
    raise ValueError(f"token_keep_rates: locations {list(locations)} must be distinct blocks "
                     f"in [0, {depth})")
  rates = {i: base ** (j + 1) for j, i in enumerate(sorted(locations))}
  return tuple({"token_keep_rate": rates[i]} if i in rates else {} for i in range(depth))


def check_images(images: jax.Array, name: str, size: tuple[int, int] | None = None) -> None:
  """Raises ValueError unless ``images`` is a float array [B, H, W, 3] (of spatial ``size``)."""
  if images.ndim != 4 or images.shape[-1] != 3:
    raise ValueError(f"{name}: images must be [batch, height, width, 3]; got shape "
                     f"{tuple(images.shape)}")
  if not jnp.issubdtype(images.dtype, jnp.floating):
    raise ValueError(f"{name}: images must be floating point (normalised); got {images.dtype}")
  if size is not None and tuple(images.shape[1:3]) != tuple(size):
    raise ValueError(f"{name}: images must be {size[0]}x{size[1]} (img_size={size[0]}, which "
                     f"fixes pos_embed); got {images.shape[1]}x{images.shape[2]}")


class VisionTransformer(nn.Module):
  """ViT / DeiT classifier (timm ``VisionTransformer``), any registry attention per block.

  Attributes (official constructor names):
    num_classes: classes of the head (keyword-only).
    img_size: square input side (fixes pos_embed: N = (img_size // patch_size)^2 + 1).
    patch_size: patch side p (the patch-embedding conv kernel and stride).
    embed_dim, depth, num_heads, mlp_ratio, qkv_bias: sizes (DeiT-S: 384, 12, 6, 4, True).
    drop_rate: dropout after pos_embed, in the Mlp and after the attention projection.
    attn_drop_rate: attention-weight dropout (passed to the attention module).
    drop_path_rate: stochastic depth, linear from 0 (first block) to this (last block).
    attention: registry name of the mechanism ('dense', 'clustr', 'cast', 'sparsifiner').
    attention_kwargs: the mechanism's own options (e.g. {'recon_mode': True} for Sparsifiner
      stage 1, {'num_clusters': 16, 'cluster_size': 16} for CAST).
    layer_attention_kwargs: per-block options merged over ``attention_kwargs`` (length
      ``depth``), e.g. the official Sparsifiner ``attn_keep_rate_list`` as
      ({'keep_rate': r} for r in rates), and its token pruning as {'token_keep_rate': r} at the
      pruning blocks (official defaults: b, b^2, b^3 at blocks 3, 6, 9; ``token_keep_rates``).
    token_pruning: how blocks after a pruning block (an option token_keep_rate < 1, for a
      mechanism with ``supports_token_pruning``) treat the pruned tokens: 'zero' (official
      Sparsifiner, the default) keeps them in the sequence with zeroed features and zeroed
      q / k / v, so the dense CLS row still gives them weight; 'mask' (ours) passes the running
      keep mask as the attention's padding mask, so they take no part at all. Either way their
      features are zeroed after each block, budgets are ceil(rate * N_p) of the original N_p
      patches, and the final keep mask is sown as 'token_keep_mask' [B, N] bool
      (docs/sparsifiner.md, "Token pruning").
    dtype: computation dtype (parameters float32; logits float32).

  Call: images float32 [B, img_size, img_size, 3], ``train`` bool (dropout and drop path with
  rng 'dropout') -> logits float32 [B, num_classes].

  Raises:
    ValueError: images not [B, img_size, img_size, 3] floats, img_size not divisible by
      patch_size, embed_dim not divisible by num_heads, layer_attention_kwargs of the wrong
      length, an unknown token_pruning, token pruning with a mechanism that does not support it,
      token budgets that grow from one pruning block to the next, or an attention error (see
      ``build_attention``).
  """
  num_classes: int = dataclasses.field(kw_only=True)
  img_size: int = 224
  patch_size: int = 16
  embed_dim: int = 768
  depth: int = 12
  num_heads: int = 12
  mlp_ratio: float = 4.0
  qkv_bias: bool = True
  drop_rate: float = 0.0
  attn_drop_rate: float = 0.0
  drop_path_rate: float = 0.0
  attention: str = "dense"
  attention_kwargs: Mapping[str, Any] | None = None
  layer_attention_kwargs: Sequence[Mapping[str, Any]] | None = None
  token_pruning: str = "zero"
  dtype: Dtype = jnp.float32

  def _layer_options(self) -> list[dict[str, Any]]:
    """Each block's attention options: ``attention_kwargs`` updated by its layer entry."""
    layers = self.layer_attention_kwargs or [{}] * self.depth
    return [{**dict(self.attention_kwargs or {}), **dict(layer)} for layer in layers]

  def _check(self) -> None:
    name = type(self).__name__
    if self.img_size % self.patch_size:
      raise ValueError(f"{name}: img_size={self.img_size} must be divisible by "
                       f"patch_size={self.patch_size}")
    if self.embed_dim % self.num_heads:
      raise ValueError(f"{name}: embed_dim={self.embed_dim} must be divisible by "
                       f"num_heads={self.num_heads}")
    if self.layer_attention_kwargs is not None and len(self.layer_attention_kwargs) != self.depth:
      raise ValueError(f"{name}: layer_attention_kwargs has {len(self.layer_attention_kwargs)} "
                       f"entries; need depth={self.depth}")
    if self.token_pruning not in TOKEN_PRUNING:
      raise ValueError(f"{name}: unknown token_pruning {self.token_pruning!r}; valid choices: "
                       f"{', '.join(TOKEN_PRUNING)}")
    budgets = self.token_budgets()
    if any(b is not None for b in budgets) and not getattr(
        attention_lib.get(self.attention), "supports_token_pruning", False):
      raise ValueError(f"{name}: token_keep_rate < 1 (token pruning) needs an attention with "
                       f"supports_token_pruning; {self.attention!r} has none")
    kept = (self.img_size // self.patch_size) ** 2
    for i, budget in enumerate(budgets):
      if budget is not None:
        if budget > kept:
          raise ValueError(f"{name}: block {i} keeps {budget} patches "
                           f"(token_keep_rate={self._layer_options()[i]['token_keep_rate']}), "
                           f"more than the {kept} kept before it; keep rates must not grow")
        kept = budget

  def token_budgets(self) -> list[int | None]:
    """Per block: the patches kept by its token pruning, ceil(token_keep_rate * N_p) of the
    original N_p = (img_size // patch_size)^2 (official ``Attention.token_budget``), or None
    where the block does not prune (token_keep_rate 1 or absent)."""
    patches = (self.img_size // self.patch_size) ** 2
    return [math.ceil(o["token_keep_rate"] * patches) if o.get("token_keep_rate", 1.0) < 1.0
            else None for o in self._layer_options()]

  @nn.compact
  def __call__(self, images: jax.Array, *, train: bool = False) -> jax.Array:
    self._check()
    check_images(images, type(self).__name__, (self.img_size, self.img_size))
    deterministic = not train
    x, _ = PatchEmbed(self.embed_dim, self.patch_size, self.patch_size, 0, None, self.dtype,
                      name="patch_embed")(images)                          # [B, N_p, D]
    batch = x.shape[0]
    cls = self.param("cls_token", nn.with_logical_partitioning(
        trunc_normal_02, (None, None, "embed")), (1, 1, self.embed_dim))
    x = jnp.concatenate([jnp.broadcast_to(cls, (batch, 1, self.embed_dim)).astype(x.dtype), x],
                        axis=1)
    pos = self.param("pos_embed", nn.with_logical_partitioning(
        trunc_normal_02, (None, "length", "embed")), (1, x.shape[1], self.embed_dim))
    x = nn.Dropout(self.drop_rate)(x + pos.astype(x.dtype), deterministic=deterministic)
    x = nn.with_logical_constraint(x, ("batch", "length", "activation_embed"))
    keep, kept = None, None          # the running token keep mask [B, N] and its patch count
    for i, (rate, options, budget) in enumerate(zip(
        drop_path_rates(self.drop_path_rate, self.depth), self._layer_options(),
        self.token_budgets())):
      pruning = self.token_pruning if (budget is not None or keep is not None) else None
      block = Block(self.num_heads, self.mlp_ratio, self.qkv_bias, self.drop_rate,
                    self.attn_drop_rate, rate, self.attention, options, dtype=self.dtype,
                    token_pruning=pruning, name=f"blocks_{i}")
      if pruning is None:
        x = block(x, deterministic=deterministic)
      else:
        x, keep = block(x, deterministic=deterministic, token_keep=keep, kept_patches=kept)
        kept = budget if budget is not None else kept
    if keep is not None:
      self.sow("intermediates", "token_keep_mask", keep)
    x = layer_norm(1e-6, self.dtype, "norm")(x)
    self.sow("intermediates", "features", x[:, 1:])
    return dense(self.num_classes, ("embed", "classes"), jnp.float32, "head")(
        x[:, 0].astype(jnp.float32))


def deit(size: str) -> dict[str, Any]:
  """Constructor defaults of DeiT-``size`` ('ti', 's', 'b'; patch 16, 224^2, depth 12)."""
  width, heads = {"ti": (192, 3), "s": (384, 6), "b": (768, 12)}[size]
  return dict(embed_dim=width, num_heads=heads, depth=12, patch_size=16, img_size=224,
              mlp_ratio=4.0, qkv_bias=True)
