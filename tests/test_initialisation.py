"""Initial parameter statistics of each parameter group against the official rule
(``docs/vision.md``, "Initialisation"; ``docs/lra.md``, "The model and its quirks"):

  ViT / DeiT (timm ``_init_weights``): every Linear, the attention's included, trunc-normal(0.02)
    with zero bias; LayerNorm 1 / 0; cls_token and pos_embed trunc-normal(0.02); the patch conv
    PyTorch's Conv2d default, U(+-1 / sqrt(fan_in)).
  ClusTR (its ``_init_weights``): every Linear trunc-normal(0.02), zero bias; LayerNorm 1 / 0;
    Conv normal(0, sqrt(2 / fan_out)), fan_out = k k out / groups, zero bias.
  LRA encoder (LRA's ``common_layers``): attention and MLP kernels xavier-uniform, attention
    without biases, MLP biases normal(1e-6), embedding normal(1), head lecun-normal.

Every parameter must fall in a group: a new parameter without a rule fails the test.
"""

from __future__ import annotations

import math

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from clustr_jax import attention, models


def _leaves(model, *inputs) -> dict[str, np.ndarray]:
  variables = model.init({"params": jax.random.key(0)}, *inputs, train=False)
  flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(variables["params"]), sep="/")
  return {k: np.asarray(getattr(v, "value", v), np.float64) for k, v in flat.items()}


def _check_std(name, x, std, uniform_bound=None):
  """Sample std within the sampling error of ``std`` (4 standard errors, at least 5 %), mean
  near 0; with ``uniform_bound`` every value within it."""
  n = x.size
  tolerance = max(0.05, 4.0 / math.sqrt(2 * n))
  assert abs(x.std() / std - 1) < tolerance, f"{name}: std {x.std():.4g}, rule {std:.4g}"
  assert abs(x.mean()) < 5 * std / math.sqrt(n) + 1e-12, f"{name}: mean {x.mean():.4g}"
  if uniform_bound is not None:
    assert np.abs(x).max() <= uniform_bound + 1e-7, f"{name}: beyond the bound {uniform_bound}"


def _check_vision(leaves, *, clustr: bool):
  unclassified = []
  for name, x in leaves.items():
    last = name.split("/")[-1]
    if "norm" in name.split("/")[-2] if "/" in name else False:       # LayerNorm 1 / 0
      expected = 1.0 if last == "scale" else 0.0
      assert np.all(x == expected), name
    elif "patch_embed" in name and last in ("kernel", "bias"):
      k, _, c_in, out = leaves[name.rsplit("/", 1)[0] + "/kernel"].shape
      if clustr:                                                       # normal(sqrt(2/fan_out))
        if last == "bias":
          assert np.all(x == 0), name
        else:
          _check_std(name, x, math.sqrt(2.0 / (k * k * out)))
      else:                                                            # PyTorch Conv2d default
        bound = 1.0 / math.sqrt(k * k * c_in)
        _check_std(name, x, bound / math.sqrt(3), uniform_bound=bound)
    elif "dwconv" in name:                                             # groups = channels
      if last == "bias":
        assert np.all(x == 0), name
      else:
        _check_std(name, x, math.sqrt(2.0 / (x.shape[0] * x.shape[1])))
    elif last == "bias":                                               # every Linear bias
      assert np.all(x == 0), name
    elif last in ("kernel", "proj_n", "proj_back_n") or name in ("cls_token", "pos_embed"):
      _check_std(name, x, 0.02)                                        # trunc-normal(0.02)
      assert np.abs(x).max() <= 2.0, name
    else:
      unclassified.append(name)
  assert not unclassified, f"parameters without a rule: {unclassified}"


@pytest.mark.parametrize("mechanism", attention.names())
def test_deit_follows_timm(mechanism):
  options = attention.sized_for(mechanism, 17, grid=(4, 4), cls_token=True)
  model = models.get("deit_ti", num_classes=10, img_size=64, depth=2, attention=mechanism,
                     attention_kwargs=options)
  leaves = _leaves(model, jnp.zeros((1, 64, 64, 3)))
  if mechanism == "cast":   # CAST's own surrogates keep their normal(0.02) (C10).
    leaves = {k: v for k, v in leaves.items() if not k.endswith("surrogates")}
  _check_vision(leaves, clustr=False)
  # The attention projections, the case: 0.051 (xavier) before, 0.02 now.
  qkv = [v for k, v in leaves.items() if "/attn/" in k and k.endswith("kernel")
         and "mask_predictor" not in k and "weight_layer" not in k]
  assert qkv and all(abs(v.std() - 0.02) < 0.002 for v in qkv)


def test_clustr_follows_its_init_weights():
  model = models.get("clustr_t", num_classes=10)
  leaves = _leaves(model, jnp.zeros((1, 64, 64, 3)))
  _check_vision(leaves, clustr=True)
  attn = [k for k in leaves if "/attn/" in k and k.endswith("kernel")]
  assert {k.split("/")[-2] for k in attn} >= {"q", "kv1", "kv2", "proj", "weight_layer"}


@pytest.mark.parametrize("mechanism", attention.names())
def test_lra_encoder_keeps_lra_inits(mechanism):
  """The LRA encoder's attention keeps xavier-uniform (LRA's), whatever the mechanism."""
  options = attention.sized_for(mechanism, 65)
  model = models.get("lra_encoder", vocab_size=20, num_classes=10, max_length=64, emb_dim=64,
                     num_heads=4, qkv_dim=64, mlp_dim=128, num_layers=1, attention=mechanism,
                     attention_kwargs=options)
  leaves = _leaves(model, jnp.ones((1, 64), jnp.int32))
  for name, x in leaves.items():
    parts = name.split("/")
    if parts[-1] == "embedding":
      _check_std(name, x, 1.0)
    elif "/attention/" in name and parts[-1] == "kernel" and "mask_predictor" not in name \
        and parts[-2] != "weight_layer":
      shape = x.shape
      if parts[-2] in ("out", "proj"):
        fan_in, fan_out = shape[0] * shape[1], shape[2]
      else:
        fan_in, fan_out = shape[0], math.prod(shape[1:])
      bound = math.sqrt(6.0 / (fan_in + fan_out))
      _check_std(name, x, bound / math.sqrt(3), uniform_bound=bound)
    elif "/mlp/" in name and parts[-1] == "kernel":
      bound = math.sqrt(6.0 / sum(x.shape))
      _check_std(name, x, bound / math.sqrt(3), uniform_bound=bound)
    elif "/mlp/" in name and parts[-1] == "bias":
      _check_std(name, x, 1e-6)
