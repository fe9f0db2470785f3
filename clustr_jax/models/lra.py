"""The Long Range Arena Transformer encoder baseline, with any attention from the registry.

  tokens int [batch, length] --embed--> [batch, length, emb_dim]   (normal(1.0), no sqrt(d) scale)
  (CLS pooling) prepend a learned zero-initialised CLS vector      -> [batch, length + 1, emb_dim]
  + position embedding (fixed sinusoidal, or learned normal(0.02)), dropout
  num_layers x pre-LN block:  x += Dropout(Attn(LN(x), mask));  x += MLP(LN(x))
  final LayerNorm, pooling (CLS token or masked MEAN), head Dense(mlp_dim) -> ReLU -> Dense(classes)

The retrieval dual encoder (``LRADualEncoder``) runs the one shared encoder on both documents and
classifies [pooled_1, pooled_2] with Dense(mlp_dim) -> ReLU -> Dense(mlp_dim // 2) -> ReLU ->
Dense(classes) (LRA ``TransformerDualEncoder`` with its default ``interaction=None``; 'NLI' uses
[e1, e2, e1 * e2, e1 - e2]).

Source: LRA ``lra_benchmarks/models/transformer/transformer.py`` and
``models/layers/common_layers.py`` (google-research/long-range-arena @ cd31e5c6), as summarised in
``docs/lra.md``, "The model and its quirks": LayerNorm eps 1e-6, no attention biases, xavier-uniform
kernels, MLP biases normal(1e-6), tanh-approximate GELU (``jax.nn.gelu``'s default), padding mask
``inputs > 0``. Padding (``docs/lra.md``, "Padding semantics"):
  * ``lra_padding=True`` (the faithful configs) is LRA's computation: LRA masks queries as well
    as keys (``make_padding_mask``: a -1e10 bias on every logit of a padded query, whose softmax
    is then uniform over all keys, padded ones included), so a padded token's attention output
    is the output projection of the mean value over all positions; here it is the mechanism's
    output for a sequence whose every token is the mean of the block's (normalised) input over
    all positions, which for dense attention (no biases, values linear) is exactly LRA's, and
    for every mechanism what it gives a query attending uniformly. MEAN pooling then averages
    every position, padding included, as LRA's ``classifier_head``.
  * ``lra_padding=False``: the attention contract (a padded token never changes a real token;
    its own output is unspecified) and MEAN pooling over real tokens only.
  * The CLS token is always a real token unless ``cls_mask_from_first_token`` (LRA's quirk: the
    CLS token takes the first input token's mask) is set; with ``lra_padding`` a padded CLS token
    is then a padded query too, LRA's quirk in full.
  * Token id 0 is padding (masked out of attention and MEAN pooling) unless ``zero_is_padding``
    is False. LRA masks id 0 for images too, so its black pixels are never attended (its quirk,
    on in the faithful Image / Pathfinder configs); False attends every token.
Every parameter and activation carries logical axis names (see ``clustr_jax/sharding.py``).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from clustr_jax import attention as attention_lib

Dtype = Any
xavier_uniform = nn.initializers.xavier_uniform()


def sinusoidal_position_embedding(length: int, features: int) -> np.ndarray:
  """Fixed sinusoidal table [1, length, features] (float32): even channels sin, odd cos.

  pe[p, 2i] = sin(p * div_i), pe[p, 2i + 1] = cos(p * div_i), div_i = exp(-ln(10000) * 2i / d),
  as LRA's ``common_layers.AddPositionEmbs`` (Vaswani et al. 2017 §3.5).
  """
  position = np.arange(length, dtype=np.float32)[:, None]
  div = np.exp(np.arange(0, features, 2, dtype=np.float32) * -(np.log(10000.0) / features))
  pe = np.zeros((length, features), dtype=np.float32)
  pe[:, 0::2] = np.sin(position * div)
  pe[:, 1::2] = np.cos(position * div)[:, : features // 2]
  return pe[None]


class MlpBlock(nn.Module):
  """Dense(mlp_dim) -> GELU(tanh) -> Dropout -> Dense(features) -> Dropout (LRA ``MlpBlock``)."""
  mlp_dim: int
  dropout_rate: float
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, *, deterministic: bool) -> jax.Array:
    features = x.shape[-1]
    bias_init = nn.initializers.normal(stddev=1e-6)
    x = nn.Dense(self.mlp_dim, dtype=self.dtype, name="fc1",
                 kernel_init=nn.with_logical_partitioning(xavier_uniform, ("embed", "mlp")),
                 bias_init=nn.with_logical_partitioning(bias_init, ("mlp",)))(x)
    x = nn.with_logical_constraint(x, ("batch", "length", "activation_mlp"))
    x = nn.gelu(x)
    x = nn.Dropout(self.dropout_rate)(x, deterministic=deterministic)
    x = nn.Dense(features, dtype=self.dtype, name="fc2",
                 kernel_init=nn.with_logical_partitioning(xavier_uniform, ("mlp", "embed")),
                 bias_init=nn.with_logical_partitioning(bias_init, ("embed",)))(x)
    return nn.Dropout(self.dropout_rate)(x, deterministic=deterministic)


class EncoderBlock(nn.Module):
  """Pre-LN Transformer block: x += Dropout(Attn(LN(x))); x += MLP(LN(x))."""
  attention_cls: type[nn.Module]
  attention_kwargs: Mapping[str, Any]
  num_heads: int
  qkv_dim: int
  mlp_dim: int
  dropout_rate: float
  attention_dropout_rate: float
  dtype: Dtype = jnp.float32
  lra_padding: bool = False

  @nn.compact
  def __call__(self, x: jax.Array, mask: jax.Array, *, deterministic: bool) -> jax.Array:
    ln = lambda name: nn.LayerNorm(  # noqa: E731
        epsilon=1e-6, dtype=self.dtype, name=name,
        scale_init=nn.with_logical_partitioning(nn.initializers.ones_init(), ("embed",)),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), ("embed",)))
    y = ln("ln_attention")(x)
    attention = self.attention_cls(
        num_heads=self.num_heads, qkv_features=self.qkv_dim, out_features=x.shape[-1],
        dropout_rate=self.attention_dropout_rate, dtype=self.dtype, name="attention",
        **self.attention_kwargs)
    out = attention(y, mask, deterministic=deterministic)
    if self.lra_padding:
      # LRA: a padded query attends uniformly to every position (module docstring). A functional
      # call with the same parameters, so that what the mechanism sows (e.g. CAST's coverage)
      # describes the real sequence only.
      mean = jnp.broadcast_to(jnp.mean(y, axis=1, keepdims=True), y.shape)
      rngs = {} if deterministic else {
          stream: self.make_rng(stream) for stream in ("dropout", "clustering")
          if self.has_rng(stream)}
      params = dict(attention.variables["params"])
      for field in dataclasses.fields(attention):  # modules shared between layers (as children)
        shared = getattr(attention, field.name)
        if isinstance(shared, nn.Module):
          params[field.name] = shared.variables["params"]
      uniform = attention.clone(parent=None, name=None).apply(
          {"params": params}, mean, None, deterministic=deterministic, rngs=rngs)
      out = jnp.where(mask[..., None], out, uniform)
    y = out
    x = x + nn.Dropout(self.dropout_rate)(y, deterministic=deterministic)
    x = nn.with_logical_constraint(x, ("batch", "length", "activation_embed"))
    y = MlpBlock(self.mlp_dim, self.dropout_rate, self.dtype, name="mlp")(
        ln("ln_mlp")(x), deterministic=deterministic)
    x = x + y
    return nn.with_logical_constraint(x, ("batch", "length", "activation_embed"))


class TransformerEncoder(nn.Module):
  """Embedding, optional CLS token, positions and pre-LN blocks, with a final LayerNorm.

  Fields: see ``LRAEncoder``. Call: inputs int32 [batch, max_length]
  (0 = padding), ``train`` bool -> (encodings [batch, length, emb_dim] in ``dtype``, mask bool
  [batch, length]) where length = max_length + 1 with CLS pooling (the CLS token first).
  """
  vocab_size: int
  max_length: int
  emb_dim: int = 512
  num_heads: int = 8
  qkv_dim: int = 512
  mlp_dim: int = 1024
  num_layers: int = 4
  dropout_rate: float = 0.1
  attention_dropout_rate: float = 0.1
  pooling: str = "CLS"
  learned_position_embedding: bool = False
  attention: str = "dense"
  attention_kwargs: Mapping[str, Any] | None = None
  cls_mask_from_first_token: bool = False
  zero_is_padding: bool = True
  lra_padding: bool = False
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, inputs: jax.Array, *, train: bool = False) -> tuple[jax.Array, jax.Array]:
    if inputs.ndim != 2 or inputs.shape[1] != self.max_length:
      raise ValueError(f"TransformerEncoder: inputs must be [batch, max_length={self.max_length}]; "
                       f"got shape {tuple(inputs.shape)}")
    if self.pooling not in ("CLS", "MEAN"):
      raise ValueError(f"TransformerEncoder: pooling must be 'CLS' or 'MEAN'; got {self.pooling!r}")
    attention_cls = attention_lib.get(self.attention)
    mask = inputs > 0 if self.zero_is_padding else jnp.ones(inputs.shape, bool)
    x = nn.Embed(self.vocab_size, self.emb_dim, name="embedding",
                 embedding_init=nn.with_logical_partitioning(
                     nn.initializers.normal(stddev=1.0), ("vocab", "embed")))(inputs)
    x = x.astype(self.dtype)
    if self.pooling == "CLS":
      cls = self.param("cls", nn.with_logical_partitioning(
          nn.initializers.zeros_init(), (None, None, "embed")), (1, 1, self.emb_dim))
      x = jnp.concatenate([jnp.broadcast_to(cls, (x.shape[0], 1, self.emb_dim)).astype(x.dtype),
                           x], axis=1)
      cls_mask = mask[:, :1] if self.cls_mask_from_first_token else jnp.ones_like(mask[:, :1])
      mask = jnp.concatenate([cls_mask, mask], axis=1)
    length = x.shape[1]
    if self.learned_position_embedding:
      pos = self.param("pos_embedding", nn.with_logical_partitioning(
          nn.initializers.normal(stddev=0.02), (None, "length", "embed")),
          (1, length, self.emb_dim))
    else:
      pos = sinusoidal_position_embedding(length, self.emb_dim)
    x = x + jnp.asarray(pos, x.dtype)
    x = nn.Dropout(self.dropout_rate)(x, deterministic=not train)
    x = nn.with_logical_constraint(x, ("batch", "length", "activation_embed"))
    attention_kwargs = dict(self.attention_kwargs or {})
    share = getattr(attention_cls, "shared_across_layers", None)
    if share is not None:  # parameters a mechanism shares between its layers, in this scope
      attention_kwargs = share(attention_kwargs, length)
    for i in range(self.num_layers):
      x = EncoderBlock(attention_cls, attention_kwargs, self.num_heads,
                       self.qkv_dim, self.mlp_dim, self.dropout_rate,
                       self.attention_dropout_rate, self.dtype, self.lra_padding,
                       name=f"block_{i}")(x, mask, deterministic=not train)
    x = nn.LayerNorm(epsilon=1e-6, dtype=self.dtype, name="encoder_norm",
                     scale_init=nn.with_logical_partitioning(nn.initializers.ones_init(),
                                                             ("embed",)),
                     bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(),
                                                            ("embed",)))(x)
    return x, mask


def pool(x: jax.Array, mask: jax.Array, pooling: str, lra_padding: bool = False) -> jax.Array:
  """[batch, length, emb_dim] -> [batch, emb_dim] float32 by CLS token (index 0) or mean: over
  real tokens (``mask``), or with ``lra_padding`` over every position (LRA's ``jnp.mean``)."""
  x = x.astype(jnp.float32)
  if pooling == "CLS":
    return x[:, 0]
  if lra_padding:
    return jnp.mean(x, axis=1)
  weights = mask.astype(jnp.float32)[..., None]
  return (x * weights).sum(axis=1) / jnp.maximum(weights.sum(axis=1), 1.0)


class LRAEncoder(TransformerEncoder):
  """LRA Transformer encoder classifier: ``TransformerEncoder`` -> pooling -> MLP head.

  Attributes (besides ``num_classes``, those of ``TransformerEncoder``):
    vocab_size: token vocabulary including padding id 0.
    num_classes: output classes (keyword-only).
    max_length: input length (without CLS); fixes the position table.
    emb_dim, num_heads, qkv_dim, mlp_dim, num_layers: sizes (LRA names).
    dropout_rate, attention_dropout_rate: dropout probabilities.
    pooling: 'CLS' (prepend a CLS token, pool it) or 'MEAN' (average of real tokens).
    learned_position_embedding: learned normal(0.02) table instead of fixed sinusoids.
    attention: registry name of the attention mechanism; attention_kwargs: its own options.
    cls_mask_from_first_token: LRA's quirk (the CLS token takes token 0's padding mask).
    zero_is_padding: token id 0 is padding (LRA, also for image pixels); False: no padding.
    lra_padding: LRA's padding computation: padded queries attend uniformly to every position,
      MEAN pooling over every position (module docstring); False: the attention contract.
    dtype: computation dtype (parameters stay float32).

  Call: inputs int32 [batch, max_length] (0 = padding), ``train`` bool -> logits float32
  [batch, num_classes]. Raises ValueError for an input of the wrong rank or length, an unknown
  pooling, or an unknown attention name.
  """
  num_classes: int = dataclasses.field(kw_only=True)

  @nn.compact
  def __call__(self, inputs: jax.Array, *, train: bool = False) -> jax.Array:
    x, mask = TransformerEncoder(**_encoder_fields(self), name="encoder")(inputs, train=train)
    x = pool(x, mask, self.pooling, self.lra_padding)
    x = nn.relu(_head_dense(self.mlp_dim, ("embed", "mlp"), "head_hidden")(x))
    return _head_dense(self.num_classes, ("mlp", "classes"), "head")(x)


def _head_dense(features: int, axes: tuple[str | None, str], name: str) -> nn.Dense:
  """A classifier-head Dense with Flax's default init (lecun-normal, zero bias), as LRA's heads."""
  return nn.Dense(features, name=name,
                  kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(), axes),
                  bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(),
                                                         axes[-1:]))


def _encoder_fields(module: nn.Module) -> dict[str, Any]:
  """The ``TransformerEncoder`` fields of ``module`` (a subclass instance)."""
  return {f: getattr(module, f) for f in TransformerEncoder.__dataclass_fields__
          if f not in ("parent", "name")}


class LRADualEncoder(TransformerEncoder):
  """LRA Retrieval dual encoder: one shared ``TransformerEncoder`` on both documents.

  Source: LRA ``models/transformer/transformer.py`` ``TransformerDualEncoder`` and
  ``models/layers/common_layers.py`` ``classifier_head_dual`` (docs/lra.md): encode each
  document, pool it (``pooling``), then [e1, e2] (or 'NLI': [e1, e2, e1 * e2, e1 - e2]) ->
  Dense(mlp_dim) -> ReLU -> Dense(mlp_dim // 2) -> ReLU -> Dense(num_classes).

  Attributes: those of ``LRAEncoder`` (``num_classes`` keyword-only) and ``interaction``: None
  (LRA's default) or 'NLI'.

  Call: inputs1, inputs2 int32 [batch, max_length] (0 = padding), ``train`` bool -> logits
  float32 [batch, num_classes]. Raises ValueError for inputs of the wrong rank or length, an
  unknown pooling, interaction or attention name.
  """
  num_classes: int = dataclasses.field(kw_only=True)
  interaction: str | None = dataclasses.field(default=None, kw_only=True)

  @nn.compact
  def __call__(self, inputs1: jax.Array, inputs2: jax.Array, *,
               train: bool = False) -> jax.Array:
    if self.interaction not in (None, "NLI"):
      raise ValueError(f"LRADualEncoder: interaction must be None or 'NLI'; got "
                       f"{self.interaction!r}")
    encoder = TransformerEncoder(**_encoder_fields(self), name="encoder")
    e1 = pool(*encoder(inputs1, train=train), self.pooling, self.lra_padding)
    e2 = pool(*encoder(inputs2, train=train), self.pooling, self.lra_padding)
    parts = [e1, e2] if self.interaction is None else [e1, e2, e1 * e2, e1 - e2]
    x = jnp.concatenate(parts, axis=-1)
    x = nn.relu(_head_dense(self.mlp_dim, (None, "mlp"), "head_hidden")(x))
    x = nn.relu(_head_dense(self.mlp_dim // 2, ("mlp", None), "head_hidden2")(x))
    return _head_dense(self.num_classes, (None, "classes"), "head")(x)
