"""LRA's padding computation (``lra_padding=True``, ``clustr_jax/models/lra.py``; ``docs/lra.md``,
"Padding semantics") against an independent NumPy transcription of the official LRA encoder
(``lra_benchmarks/models/transformer/transformer.py``, ``models/layers/common_layers.py`` and the
old ``flax.nn.attention``: ``make_padding_mask`` of queries and keys, a -1e10 bias, float32)."""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from clustr_jax import attention, models
from configs import common


def _layer_norm(x, p):
  mean = x.mean(-1, keepdims=True)
  var = ((x - mean) ** 2).mean(-1, keepdims=True)
  return (x - mean) / np.sqrt(var + np.float32(1e-6)) * p["scale"] + p["bias"]


def _gelu_tanh(x):
  return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi).astype(np.float32) * (x + 0.044715 * x ** 3)))


def _sinusoids(length, features):
  position = np.arange(length)[:, None]
  div = np.exp(np.arange(0, features, 2) * -(math.log(10000.0) / features))
  table = np.zeros((length, features))
  table[:, 0::2] = np.sin(position * div)
  table[:, 1::2] = np.cos(position * div)
  return table.astype(np.float32)


def official_lra_encoder(params, inputs, *, num_heads, pooling, learned_pos):
  """LRA's ``TransformerEncoder`` + ``classifier_head`` in NumPy float32 (eval mode): padding
  mask ``inputs > 0`` (black pixels too); CLS pooling prepends a zero CLS vector whose mask is the
  first token's; every attention logit of a (query, key) pair with either padded gets -1e10
  (so a padded query's softmax is uniform over all keys); MEAN pools every position."""
  p = jax.tree.map(lambda a: np.asarray(a, np.float32), params)
  enc = p["encoder"]
  mask = inputs > 0
  x = enc["embedding"]["embedding"][inputs]
  if pooling == "CLS":
    x = np.concatenate([np.broadcast_to(enc["cls"], (x.shape[0], 1, x.shape[2])), x], axis=1)
    mask = np.concatenate([mask[:, :1], mask], axis=1)
  x = x + (enc["pos_embedding"][0] if learned_pos else _sinusoids(x.shape[1], x.shape[2]))
  pair = mask[:, None, :, None] & mask[:, None, None, :]                 # [B, 1, Lq, Lk]
  bias = np.where(pair, np.float32(0), np.float32(-1e10))
  for name in sorted(k for k in enc if k.startswith("block_")):
    blk = enc[name]
    h = _layer_norm(x, blk["ln_attention"])
    att = blk["attention"]
    q, k, v = (np.einsum("blc,chd->bhld", h, att[n]["kernel"]) for n in ("query", "key", "value"))
    logits = np.einsum("bhqd,bhkd->bhqk", q / np.float32(math.sqrt(q.shape[-1])), k) + bias
    weights = np.exp(logits - logits.max(-1, keepdims=True))
    weights = weights / weights.sum(-1, keepdims=True)
    out = np.einsum("bhqk,bhkd->bqhd", weights, v)
    x = x + np.einsum("bqhd,hdc->bqc", out, att["out"]["kernel"])
    h = _layer_norm(x, blk["ln_mlp"])
    h = _gelu_tanh(h @ blk["mlp"]["fc1"]["kernel"] + blk["mlp"]["fc1"]["bias"])
    x = x + h @ blk["mlp"]["fc2"]["kernel"] + blk["mlp"]["fc2"]["bias"]
  x = _layer_norm(x, enc["encoder_norm"])
  pooled = x[:, 0] if pooling == "CLS" else x.mean(axis=1)
  hidden = np.maximum(pooled @ p["head_hidden"]["kernel"] + p["head_hidden"]["bias"], 0)
  return hidden @ p["head"]["kernel"] + p["head"]["bias"]


def _inputs():
  rng = np.random.default_rng(0)
  tokens = rng.integers(1, 12, size=(3, 16)).astype(np.int32)
  tokens[0, 10:] = 0                    # trailing padding
  tokens[1, [2, 5, 6]] = 0              # interior zeros (LRA's black pixels)
  tokens[2, 0] = 0                      # first token padding: the CLS token is padded too
  tokens[2, 12:] = 0
  return tokens


def _model(pooling, learned_pos, mechanism="dense", lra_padding=True):
  length = 16 + (pooling == "CLS")
  return models.get(
      "lra_encoder", vocab_size=12, num_classes=3, max_length=16, emb_dim=32, num_heads=4,
      qkv_dim=32, mlp_dim=24, num_layers=2, dropout_rate=0.0, attention_dropout_rate=0.0,
      pooling=pooling, learned_position_embedding=learned_pos, cls_mask_from_first_token=True,
      zero_is_padding=True, lra_padding=lra_padding, attention=mechanism,
      attention_kwargs=attention.sized_for(mechanism, length, cls_token=pooling == "CLS"))


@pytest.mark.parametrize("pooling", ["CLS", "MEAN"])
@pytest.mark.parametrize("learned_pos", [False, True])
def test_lra_padding_matches_the_official_encoder(pooling, learned_pos):
  model = _model(pooling, learned_pos)
  tokens = _inputs()
  params = nn.meta.unbox(model.init({"params": jax.random.key(0)}, jnp.asarray(tokens))["params"])
  # Non-zero CLS vector and biases would hide nothing: perturb every parameter a little.
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(1), len(leaves))
  params = treedef.unflatten([x + 0.1 * jax.random.normal(k, x.shape) for x, k in
                              zip(leaves, keys)])
  got = np.asarray(model.apply({"params": params}, jnp.asarray(tokens)))
  want = official_lra_encoder(params, tokens, num_heads=4, pooling=pooling,
                              learned_pos=learned_pos)
  np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)
  # The contract's semantics differ from LRA's on these inputs (else the test shows nothing).
  contract = _model(pooling, learned_pos, lra_padding=False)
  other = np.asarray(contract.apply({"params": params}, jnp.asarray(tokens)))
  assert np.abs(other - want).max() > 1e-3


@pytest.mark.parametrize("mechanism", attention.names())
def test_every_mechanism_takes_lra_padding(mechanism):
  """With ``lra_padding`` padded positions count (MEAN pooling over all positions), and real
  tokens' outputs still ignore what the padded tokens hold."""
  model = _model("MEAN", False, mechanism)
  tokens = _inputs()
  variables = model.init({"params": jax.random.key(0)}, jnp.asarray(tokens))
  logits = np.asarray(model.apply(variables, jnp.asarray(tokens)))
  assert np.isfinite(logits).all()
  contract = _model("MEAN", False, mechanism, lra_padding=False)
  assert np.abs(np.asarray(contract.apply(variables, jnp.asarray(tokens))) - logits).max() > 1e-6


@pytest.mark.parametrize("spec", ["listops.py", "text.py", "retrieval.py", "image.py",
                                  "pathfinder.py", "pathx.py"])
def test_faithful_configs_use_lra_padding(spec):
  assert common.load(f"configs/lra/{spec}").model.lra_padding is True
  assert common.load(f"configs/lra/{spec}:cpu").model.lra_padding is False
