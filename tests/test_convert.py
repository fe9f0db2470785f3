"""Checkpoint conversion against forward passes written independently in PyTorch layout (numpy).

The reference forwards below follow docs/clustr.md, docs/vision.md, docs/sparsifiner.md and
docs/conversion.md in float64 numpy on the official NCHW tensors and state-dict
keys; they share no code with clustr_jax. Random official-layout state dicts are drawn with
activations of order one, so that 1e-4 on the logits is a real check.
"""

import functools
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.special import erf

from clustr_jax import convert

# --------------------------------------------------------------------------------------------
# numpy reference (PyTorch layout: images [B, 3, H, W], Linear weight [out, in]).
# --------------------------------------------------------------------------------------------


def _linear(sd, key, x):
  y = x @ sd[f"{key}.weight"].T
  return y + sd[f"{key}.bias"] if f"{key}.bias" in sd else y


def _ln(sd, key, x, eps):
  mu = x.mean(-1, keepdims=True)
  var = ((x - mu) ** 2).mean(-1, keepdims=True)
  return (x - mu) / np.sqrt(var + eps) * sd[f"{key}.weight"] + sd[f"{key}.bias"]


def _gelu(x):
  return 0.5 * x * (1.0 + erf(x / math.sqrt(2.0)))


def _softmax(x):
  e = np.exp(x - x.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


def _conv(x, w, b, stride, pad, groups=1):
  """Conv2d NCHW: x [B, I, H, W], w [O, I / groups, k, k] -> [B, O, H', W']."""
  k = w.shape[-1]
  x = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
  win = np.lib.stride_tricks.sliding_window_view(x, (k, k), axis=(2, 3))[:, :, ::stride, ::stride]
  if groups == 1:
    y = np.einsum("bihwuv,oiuv->bohw", win, w)
  else:  # depthwise
    y = np.einsum("bchwuv,cuv->bchw", win, w[:, 0])
  return y + b[None, :, None, None]


def _heads(x, h):
  b, n, c = x.shape
  return x.reshape(b, n, h, c // h).transpose(0, 2, 1, 3)


def _merge_heads(x):
  b, h, n, d = x.shape
  return x.transpose(0, 2, 1, 3).reshape(b, n, h * d)


def _dpc_knn(x, num_clusters, k=5):
  """One sample x [N, C]: labels per scale (docs/clustr.md, no noise)."""
  n, c = x.shape
  dist = np.sqrt(((x[:, None, :] - x[None, :, :]) ** 2).sum(-1)) / math.sqrt(c)
  rho = np.exp(-(np.sort(dist, axis=1)[:, :k] ** 2).mean(1))
  delta = np.empty(n)
  for i in range(n):
    denser = rho > rho[i]
    delta[i] = dist[i, denser].min() if denser.any() else dist.max()
  order = np.argsort(-(rho * delta), kind="stable")
  labels = []
  for m in num_clusters:
    centres = order[:m]
    lab = np.argmin(dist[centres], axis=0)
    lab[centres] = np.arange(m)
    labels.append(lab)
  return labels


def _clustr_attention(sd, key, x, heads, sr):
  b, n, c = x.shape
  d = c // heads
  q = _heads(_linear(sd, f"{key}.q", x), heads)
  if sr == 1:
    kv = _linear(sd, f"{key}.kv", x)
    k, v = _heads(kv[..., :c], heads), _heads(kv[..., c:], heads)
    out = _softmax(q @ k.transpose(0, 1, 3, 2) * d ** -0.5) @ v
    return _linear(sd, f"{key}.proj", _merge_heads(out))
  w = np.exp(_linear(sd, f"{key}.weight_layer", x))                       # [B, N, 1]
  m = n // sr ** 2
  total = 0.0
  for s, ms in enumerate((m, 4 * m)):
    xbar = np.zeros((b, ms, c))
    for i in range(b):
      lab = _dpc_knn(x[i], (m, 4 * m))[s]
      for j in range(ms):
        sel = lab == j
        xbar[i, j] = (w[i, sel] * x[i, sel]).sum(0) / (w[i, sel].sum() + 1e-6)
    kv = _linear(sd, f"{key}.kv{s + 1}", xbar)
    k, v = _heads(kv[..., :c], heads), _heads(kv[..., c:], heads)
    total = total + _softmax(q @ k.transpose(0, 1, 3, 2) * d ** -0.5) @ v
  return _linear(sd, f"{key}.proj", _merge_heads(total))


def clustr_reference(sd, cfg, images):
  x = images
  for i in range(4):
    kern, stride = (7, 4) if i == 0 else (3, 2)
    x = _conv(x, sd[f"patch_embed{i + 1}.proj.weight"], sd[f"patch_embed{i + 1}.proj.bias"],
              stride, kern // 2)
    b, c, hh, ww = x.shape
    t = _ln(sd, f"patch_embed{i + 1}.norm", x.reshape(b, c, hh * ww).transpose(0, 2, 1), 1e-5)
    for j in range(cfg["depths"][i]):
      key = f"block{i + 1}.{j}"
      t = t + _clustr_attention(sd, f"{key}.attn", _ln(sd, f"{key}.norm1", t, 1e-6),
                                cfg["num_heads"][i], cfg["sr_ratios"][i])
      h = _linear(sd, f"{key}.mlp.fc1", _ln(sd, f"{key}.norm2", t, 1e-6))
      grid = h.transpose(0, 2, 1).reshape(b, -1, hh, ww)
      dw = _conv(grid, sd[f"{key}.mlp.dwconv.dwconv.weight"], sd[f"{key}.mlp.dwconv.dwconv.bias"],
                 1, 1, groups=grid.shape[1])
      h = _gelu(h + dw.reshape(b, -1, hh * ww).transpose(0, 2, 1))
      t = t + _linear(sd, f"{key}.mlp.fc2", h)
    t = _ln(sd, f"norm{i + 1}", t, 1e-6)
    x = t.reshape(b, hh, ww, c).transpose(0, 3, 1, 2)
  return _linear(sd, "head", t.mean(1))


def _sparse_attention(sd, key, q, k, heads, rate, cfg, keep=None):
  """Mode-B mask (docs/sparsifiner.md): bool [B, H, N, N]; ``keep`` bool [B, N] the running
  token keep mask (official: pruned q~ / k~ rows zeroed, pruned columns -inf, the budget lowered
  to the kept patch count)."""
  b, _, n, d = q.shape
  mp = f"{key}.mask_predictor"
  qt, kt = _linear(sd, f"{mp}.proj_c_q", q), _linear(sd, f"{mp}.proj_c_k", k)
  if keep is not None:
    qt, kt = (np.where(keep[:, None, :, None], t, 0.0) for t in (qt, kt))
  k_down = np.einsum("bhnc,nm->bhcm", kt, sd[f"{mp}.proj_n"])
  coef = _softmax(qt[:, :, 1:] @ k_down * heads ** -0.5)                  # [B, H, N-1, n_down]
  kth = np.sort(coef, -1)[..., -8][..., None]
  coef = np.where(coef >= kth, coef, 0.0)
  basis = np.abs(sd[f"{mp}.proj_back_n"].T)
  basis = np.where(basis > 0.02, basis, 0.0)
  approx = coef @ basis                                                   # [B, H, N-1, N]
  k_att = math.ceil(rate * n)
  if keep is not None:
    approx = np.where(keep[:, None, None, :], approx, -np.inf)
    k_att = min(k_att, int(keep[0, 1:].sum()))
  top = np.argsort(-approx, axis=-1)[..., :k_att]
  rows = np.zeros(approx.shape, bool)
  np.put_along_axis(rows, top, True, axis=-1)
  return np.concatenate([np.ones((b, heads, 1, n), bool), rows], axis=2)


def vit_reference(sd, cfg, images, keep_rates=None, token_rates=None):
  """DeiT / Sparsifiner logits; ``token_rates`` (per block, None: no pruning) prunes as the
  official Block: top ceil(rate N_p) patches by the mean CLS attention, zeroed after the block,
  and their q, k, v zeroed in later blocks."""
  p, heads = cfg["patch_size"], cfg["num_heads"]
  x = _conv(images, sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], p, 0)
  b, c = x.shape[:2]
  x = x.reshape(b, c, -1).transpose(0, 2, 1)
  x = np.concatenate([np.broadcast_to(sd["cls_token"], (b, 1, c)), x], 1) + sd["pos_embed"]
  d = c // heads
  keep = None
  for i in range(cfg["depth"]):
    key = f"blocks.{i}"
    qkv = _linear(sd, f"{key}.attn.qkv", _ln(sd, f"{key}.norm1", x, 1e-6))
    q, k, v = (_heads(qkv[..., j * c:(j + 1) * c], heads) for j in range(3))
    if keep is not None:
      q, k, v = (np.where(keep[:, None, :, None], t, 0.0) for t in (q, k, v))
    logits = q @ k.transpose(0, 1, 3, 2) * d ** -0.5
    if keep_rates is not None:
      mask = _sparse_attention(sd, f"{key}.attn", q, k, heads, keep_rates[i], cfg, keep)
      logits = np.where(mask, logits, -np.inf)
    weights = _softmax(logits)
    x = x + _linear(sd, f"{key}.attn.proj", _merge_heads(weights @ v))
    h = _gelu(_linear(sd, f"{key}.mlp.fc1", _ln(sd, f"{key}.norm2", x, 1e-6)))
    x = x + _linear(sd, f"{key}.mlp.fc2", h)
    if token_rates is not None and token_rates[i] is not None:
      score = weights[:, :, 0, 1:].mean(1)
      if keep is not None:
        score = np.where(keep[:, 1:], score, -np.inf)
      top = np.argsort(-score, axis=-1)[:, :math.ceil(token_rates[i] * (x.shape[1] - 1))]
      keep = np.zeros(x.shape[:2], bool)
      keep[:, 0] = True
      np.put_along_axis(keep[:, 1:], top, True, axis=-1)
    if keep is not None:
      x = np.where(keep[..., None], x, 0.0)
  return _linear(sd, "head", _ln(sd, "norm", x, 1e-6)[:, 0])


# --------------------------------------------------------------------------------------------
# Random official-layout state dicts.
# --------------------------------------------------------------------------------------------


def random_state_dict(arch, kwargs, seed=0):
  """Every official key of the architecture, float32, scaled for activations of order one."""
  _, entries, _ = convert._build(arch, dict(kwargs))  # pylint: disable=protected-access
  rng = np.random.default_rng(seed)
  sd = {}
  for e in entries:
    if e.key.endswith(("norm1.weight", "norm2.weight", "norm.weight")) or (
        e.key.startswith("norm") and e.key.endswith(".weight")):
      a = 1.0 + 0.1 * rng.normal(size=e.shape)
    elif e.key.endswith("proj_back_n"):          # |W_up| > tau everywhere: no tied zeros in A^
      a = rng.choice([-1.0, 1.0], size=e.shape) * (0.05 + 0.3 * rng.random(e.shape))
    elif e.key.endswith(".bias") or len(e.shape) == 1:
      a = 0.1 * rng.normal(size=e.shape)
    elif e.key in ("cls_token", "pos_embed"):
      a = 0.5 * rng.normal(size=e.shape)
    else:
      fan_in = int(np.prod(e.shape[1:])) if len(e.shape) > 1 else 1
      a = rng.normal(size=e.shape) / math.sqrt(fan_in)
    sd[e.key] = a.astype(np.float32)
  return sd


CLUSTR = dict(embed_dims=[16, 32, 32, 64], num_heads=[1, 2, 2, 4], mlp_ratios=[8, 8, 4, 4],
              depths=[1, 1, 2, 1], sr_ratios=[8, 4, 2, 1], num_classes=10, qkv_bias=True,
              img_size=64)
DEIT = dict(embed_dim=32, depth=2, num_heads=2, mlp_ratio=4.0, num_classes=10, qkv_bias=True,
            img_size=32, patch_size=8)
SPARSIFINER = dict(DEIT, patch_size=4, attn_keep_rate_list=[0.25, 0.5], reduce_n_factor=6,
                   reduce_c_factor=2)


def _images(batch, size, seed=1):
  return np.random.default_rng(seed).normal(size=(batch, 3, size, size)).astype(np.float32)


def _ours(module, variables, images_nchw):
  fn = jax.jit(functools.partial(module.apply, train=False))
  return np.asarray(fn(variables, jnp.asarray(images_nchw.transpose(0, 2, 3, 1))))


def test_clustr_matches_reference():
  sd = random_state_dict("clustr", CLUSTR)
  module, variables = convert.from_torch("clustr", sd, **CLUSTR)
  images = _images(2, 64)
  want = clustr_reference({k: v.astype(np.float64) for k, v in sd.items()}, CLUSTR,
                          images.astype(np.float64))
  assert np.abs(want).max() > 0.3                                   # logits of order one
  np.testing.assert_allclose(_ours(module, variables, images), want, atol=1e-4, rtol=0)


@pytest.mark.parametrize("qkv_bias", [True, False])
def test_deit_matches_reference(qkv_bias):
  kwargs = dict(DEIT, qkv_bias=qkv_bias)
  sd = random_state_dict("deit", kwargs)
  assert ("blocks.0.attn.qkv.bias" in sd) == qkv_bias
  module, variables = convert.from_torch("deit", sd, **kwargs)
  images = _images(2, 32)
  want = vit_reference({k: v.astype(np.float64) for k, v in sd.items()}, kwargs,
                       images.astype(np.float64))
  assert np.abs(want).max() > 0.3
  np.testing.assert_allclose(_ours(module, variables, images), want, atol=1e-4, rtol=0)


@pytest.mark.parametrize("path", ["gather", "masked"])
def test_sparsifiner_matches_reference_in_sparse_mode(path):
  sd = random_state_dict("sparsifiner", SPARSIFINER)
  module, variables = convert.from_torch("sparsifiner", sd, **SPARSIFINER)
  assert module.layer_attention_kwargs == ({"keep_rate": 0.25}, {"keep_rate": 0.5})
  module = module.clone(attention_kwargs={**module.attention_kwargs, "path": path})
  images = _images(2, 32)
  sd64 = {k: v.astype(np.float64) for k, v in sd.items()}
  want = vit_reference(sd64, SPARSIFINER, images.astype(np.float64),
                       keep_rates=SPARSIFINER["attn_keep_rate_list"])
  dense = vit_reference(sd64, SPARSIFINER, images.astype(np.float64))
  assert np.abs(want - dense).max() > 1e-2                           # the mask matters
  np.testing.assert_allclose(_ours(module, variables, images), want, atol=1e-4, rtol=0)


def test_released_variants_are_detected_and_counted():
  for arch, variant, count in [("clustr", "b2", 22_690_941), ("deit", "base", 86_567_656),
                               ("sparsifiner", "small", 22_251_880)]:
    _, entries, _ = convert._build(arch, dict(convert.VARIANTS[arch][variant]))  # pylint: disable=protected-access
    sd = {e.key: np.zeros(e.shape, np.float32) for e in entries}
    assert sum(v.size for v in sd.values()) == count
    module, variables = convert.from_torch(arch, sd)
    assert sum(v.size for v in jax.tree.leaves(variables)) == count
  assert module.attention_kwargs["keep_rate"] == 0.25
  assert module.attention_kwargs["reduce_n_factor"] == 6


def test_bad_state_dicts_list_every_problem():
  sd = random_state_dict("deit", DEIT)
  sd.pop("blocks.1.mlp.fc2.bias")
  sd["blocks.0.attn.qkv.weight"] = sd["blocks.0.attn.qkv.weight"][:, :8]
  sd["dist_token"] = np.zeros((1, 1, 32), np.float32)
  with pytest.raises(convert.ConversionError) as info:
    convert.from_torch("deit", sd, **DEIT)
  message = str(info.value)
  assert "unknown key 'dist_token' (1, 1, 32)" in message
  assert "missing key 'blocks.1.mlp.fc2.bias' (32,)" in message
  assert "mis-shaped key 'blocks.0.attn.qkv.weight': (96, 8), expected (96, 32)" in message
  with pytest.raises(ValueError, match="unknown keyword"):
    convert.from_torch("deit", sd, depths=[1])
  with pytest.raises(ValueError, match="unknown arch"):
    convert.from_torch("swin", sd)
  with pytest.raises(ValueError, match="share_inout_proj"):
    convert.from_torch("sparsifiner", sd, **SPARSIFINER, share_inout_proj=True)


@pytest.mark.parametrize("suffix", [".npz", ".safetensors"])
def test_cli_writes_an_orbax_checkpoint_that_loads(tmp_path, suffix, capsys):
  sd = random_state_dict("deit", DEIT, seed=3)
  path = tmp_path / f"weights{suffix}"
  if suffix == ".npz":
    np.savez(path, **sd)
  else:
    from safetensors.numpy import save_file  # pylint: disable=import-outside-toplevel
    save_file(sd, str(path))
  kwargs = {k: v for k, v in DEIT.items()}
  convert.main(["--arch=deit", f"--input={path}", f"--output={tmp_path / 'out'}",
                f"--kwargs={json.dumps(kwargs)}"])
  assert "parameters" in capsys.readouterr().out
  module, variables = convert.load(tmp_path / "out")
  images = _images(1, 32)
  want = vit_reference({k: v.astype(np.float64) for k, v in sd.items()}, DEIT,
                       images.astype(np.float64))
  np.testing.assert_allclose(_ours(module, variables, images), want, atol=1e-4, rtol=0)
  with pytest.raises(ValueError, match="exists already"):
    convert.save(tmp_path / "out", module, variables)
  with pytest.raises(ValueError, match="unknown checkpoint format"):
    convert.read_state_dict(tmp_path / "weights.bin")


def test_cli_reads_torch_pth(tmp_path):
  torch = pytest.importorskip("torch")
  sd = random_state_dict("deit", DEIT, seed=4)
  path = tmp_path / "deit.pth"
  torch.save({"model": {k: torch.from_numpy(v) for k, v in sd.items()}}, path)
  read = convert.read_state_dict(path)
  assert set(read) == set(sd)
  for key, value in sd.items():
    np.testing.assert_array_equal(read[key], value)


def test_sparsifiner_token_pruning_kwargs():
  """The official constructor's token_keep_rate_list / token_pruning_loc_indicator: a block
  prunes only where its indicator is True; the rest of the list is unused (official)."""
  sd = random_state_dict("sparsifiner", SPARSIFINER)
  module, _ = convert.from_torch("sparsifiner", sd, **SPARSIFINER,
                                 token_keep_rate_list=[0.7, 0.5],
                                 token_pruning_loc_indicator=[False, True])
  assert module.layer_attention_kwargs == ({"keep_rate": 0.25},
                                           {"keep_rate": 0.5, "token_keep_rate": 0.5})
  assert module.token_budgets() == [None, 32]                  # ceil(0.5 * 64) of 8 x 8 patches
  assert module.token_pruning == "zero"
  module, _ = convert.from_torch("sparsifiner", sd, **SPARSIFINER, token_keep_rate_list=[1, 0.7])
  assert module.token_budgets() == [None, None]                # no indicator: no pruning
  bad = [(dict(token_keep_rate_list=[0.5]), "token_keep_rate_list has 1 entries; need depth=2"),
         (dict(token_pruning_loc_indicator=[True]), "has 1 entries"),
         (dict(token_keep_rate_list=[1.0, 0.0], token_pruning_loc_indicator=[False, True]),
          r"must lie in \(0, 1\]"),
         (dict(token_pruning_loc_indicator=[0, 1]), "must hold bools"),
         (dict(token_keep_rate_list=[0.5, 1.0], token_pruning_loc_indicator=[True, True]),
          "block 1 prunes with token_keep_rate 1"),
         (dict(token_keep_rate_list=[0.5, 0.7], token_pruning_loc_indicator=[True, True]),
          "must not grow")]
  for kwargs, message in bad:
    with pytest.raises(ValueError, match=message):
      convert.from_torch("sparsifiner", sd, **SPARSIFINER, **kwargs)


@pytest.mark.parametrize("path", ["gather", "masked"])
def test_pruned_sparsifiner_matches_reference(path):
  """Official token pruning (blocks 1 and 2 of 3, 64 patches): 32 then 16 kept; the attention
  budget ceil(0.5 * 65) = 33 exceeds the 16 kept, so it is lowered to them (official)."""
  cfg = dict(SPARSIFINER, depth=3, attn_keep_rate_list=[0.25, 0.5, 0.5],
             token_keep_rate_list=[1.0, 0.5, 0.25],
             token_pruning_loc_indicator=[False, True, True])
  sd = random_state_dict("sparsifiner", cfg, seed=4)
  module, variables = convert.from_torch("sparsifiner", sd, **cfg)
  module = module.clone(attention_kwargs={**module.attention_kwargs, "path": path})
  images = _images(2, 32, seed=5)
  sd64 = {k: v.astype(np.float64) for k, v in sd.items()}
  want = vit_reference(sd64, cfg, images.astype(np.float64), keep_rates=cfg["attn_keep_rate_list"],
                       token_rates=[None, 0.5, 0.25])
  unpruned = vit_reference(sd64, cfg, images.astype(np.float64),
                           keep_rates=cfg["attn_keep_rate_list"])
  assert np.abs(want - unpruned).max() > 1e-2                       # the pruning matters
  np.testing.assert_allclose(_ours(module, variables, images), want, atol=1e-4, rtol=0)
