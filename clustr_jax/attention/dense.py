"""Dense (full softmax) multi-head self-attention: the reference every mechanism is checked against.

  Q = x W_q,  K = x W_k,  V = x W_v                       [batch, length, heads, head_dim]
  A = softmax(Q K^T / sqrt(head_dim) + padding bias)       [batch, heads, length, length]
  y = merge_heads(A V) W_o                                 [batch, length, out_features]

Cost O(length^2 * qkv_features) time; memory O(length^2 * heads) on the XLA path (cuDNN's fused
kernel on GPU needs O(length)). Source: Vaswani et al. 2017 §3.2; the LRA baseline
(``lra_benchmarks/models/transformer/transformer.py``: no biases, xavier-uniform kernels, logit
scale 1/sqrt(qkv_dim / num_heads), attention dropout not broadcast).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from clustr_jax.attention import base


def masked_softmax_attention(query: jax.Array, key: jax.Array, value: jax.Array,
                             key_mask: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Explicit dense attention, used where the attention weights themselves are needed.

  Args:
    query: [batch, q_length, heads, head_dim].
    key, value: [batch, kv_length, heads, head_dim].
    key_mask: bool [batch, kv_length], True = the key may be attended to.

  Returns:
    (output [batch, q_length, heads, head_dim], weights float32 [batch, heads, q_length, kv_length]).
  """
  scale = query.shape[-1] ** -0.5
  logits = jnp.einsum("bqhd,bkhd->bhqk", query, key).astype(jnp.float32) * scale
  logits = jnp.where(key_mask[:, None, None, :], logits, base.MASK_VALUE)
  weights = jax.nn.softmax(logits, axis=-1)
  out = jnp.einsum("bhqk,bkhd->bqhd", weights.astype(value.dtype), value)
  return out, weights


class DenseAttention(nn.Module):
  """Full multi-head self-attention behind the attention contract (see ``base``).

  Attributes:
    num_heads: number of heads H.
    qkv_features: total query/key/value width (H * head_dim); default: the input width.
    out_features: output width; default: the input width.
    dropout_rate: dropout on the attention weights (training only).
    use_bias: biases on the projections (LRA: False).
    out_bias: bias on the output projection; None = ``use_bias`` (ViT/DeiT and ClusTR stage 4:
      the official ``proj`` always has one, whatever qkv_bias).
    implementation: ``jax.nn.dot_product_attention``'s implementation (None = XLA choice, 'xla',
      'cudnn'); used whenever attention dropout is inactive.
    dtype: computation dtype; param_dtype: parameter dtype.
    kernel_init: the projections' kernel initializer (None: xavier-uniform, LRA's).

  Call: ``x`` [batch, length, features], ``mask`` bool [batch, length] (True = real token) ->
  [batch, length, out_features]. Raises ValueError for a mask of the wrong shape or heads that do
  not divide ``qkv_features``.
  """
  num_heads: int
  qkv_features: int | None = None
  out_features: int | None = None
  dropout_rate: float = 0.0
  use_bias: bool = False
  out_bias: bool | None = None
  implementation: str | None = None
  dtype: base.Dtype = jnp.float32
  param_dtype: base.Dtype = jnp.float32
  kernel_init: base.Initializer | None = None

  @classmethod
  def sized_for(cls, length: int, *, grid: tuple[int, int] | None = None,
                cls_token: bool | None = None, sr_ratio: int | None = None,
                budget: Any = None) -> dict[str, Any]:
    """Settings for a sequence of ``length`` tokens (see ``clustr_jax.attention.sized_for``):
    none, full attention has nothing to size (it is the budget's reference)."""
    del length, grid, cls_token, sr_ratio, budget
    return {}

  @nn.compact
  def __call__(self, x: jax.Array, mask: jax.Array | None = None, *,
               deterministic: bool = True) -> jax.Array:
    mask = base.check_inputs(x, mask, "DenseAttention")
    features = x.shape[-1]
    _, head_dim = base.head_dims(features, self.qkv_features, self.num_heads, "DenseAttention")
    proj = lambda name: base.HeadProjection(  # noqa: E731
        self.num_heads, head_dim, self.use_bias, self.dtype, self.param_dtype,
        kernel_init=self.kernel_init, name=name)
    q, k, v = proj("query")(x), proj("key")(x), proj("value")(x)
    q = nn.with_logical_constraint(q, ("batch", "length", "heads", "kv"))
    if deterministic or self.dropout_rate == 0.0:
      out = jax.nn.dot_product_attention(
          q, k, v, mask=mask[:, None, None, :], implementation=self.implementation)
    else:
      _, weights = masked_softmax_attention(q, k, v, mask)
      weights = base.attention_dropout(weights, self.dropout_rate, deterministic)
      out = jnp.einsum("bhqk,bkhd->bqhd", weights.astype(v.dtype), v)
    return base.OutputProjection(
        self.out_features or features,
        self.use_bias if self.out_bias is None else self.out_bias, self.dtype,
        self.param_dtype, kernel_init=self.kernel_init, name="out")(out)
