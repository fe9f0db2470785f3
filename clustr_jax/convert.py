"""Official PyTorch checkpoints -> our Flax variables: ClusTR b1/b2/b3, Sparsifiner DeiT-S, DeiT.

  module, variables = from_torch(arch, state_dict, **arch_kwargs)

``arch`` is 'clustr' (official ``YtongXie/ClusTR`` ``ClusTR.py``), 'sparsifiner' (official
``lim142857/Sparsifiner`` ``src/models/sparsifiner.py``) or 'deit' (timm / DeiT
``VisionTransformer``); ``state_dict`` maps the official parameter names to numpy arrays (any
float dtype; stored as float32); ``arch_kwargs`` are the official constructor's own keyword
arguments (below), defaulting to a released variant. With ``variant=None`` (the default) the
released variant whose keys and shapes the state dict has is chosen (ClusTR b1/b2/b3; DeiT tiny/
small/base; Sparsifiner small); explicit keywords override the variant's values, so any official
configuration converts.

The returned module in eval mode (``module.apply(variables, images, train=False)``; images
float32 [B, H, W, 3], i.e. the official NCHW input transposed) reproduces the official model's
eval-mode logits: ClusTR without the density tie-break noise, Sparsifiner in its sparse inference
mode (mode B, ``recon_mode=False``). Two caveats of the official methods themselves: ClusTR's
DPC-kNN and Sparsifiner's top-k can meet exact ties (``docs/conversion.md``,
"What is checked, and how"), where the chosen set is implementation-defined.

Layout rules (``docs/conversion.md``, "Layout rules"): a Linear weight W [out, in]
becomes the kernel W.T (reshaped to [in, heads, head_dim] for query-like projections and
[heads, head_dim, out] for output projections; ClusTR's kv [2C, C] to [C, 2, heads, head_dim],
K first); a Conv weight (O, I, kh, kw) becomes (kh, kw, I, O) (depthwise (rC, 1, 3, 3) ->
(3, 3, 1, rC)); timm's qkv [3C, C] splits into query, key, value (rows q | k | v); ClusTR's
stage-4 kv splits into key and value; Sparsifiner's proj_n / proj_back_n are copied as they are.

Keyword arguments accepted (official names):
  clustr:      embed_dims, num_heads, mlp_ratios, depths, sr_ratios, num_classes, qkv_bias,
               img_size (the input side used to check shapes; ClusTR itself takes any size),
               drop_rate, attn_drop_rate, drop_path_rate, patch_size (unused, as in the official
               class), in_chans (3), qk_scale (None), num_stages (4)
  deit:        img_size, patch_size, embed_dim, depth, num_heads, mlp_ratio, qkv_bias,
               num_classes, drop_rate, attn_drop_rate, drop_path_rate, in_chans (3),
               qk_scale (None), representation_size (None)
  sparsifiner: those of deit, plus attn_keep_rate_list, reduce_n_factor, reduce_c_factor,
               token_keep_rate_list and token_pruning_loc_indicator (token pruning at the
               blocks marked True, to ceil(rate * N_p) patches; default none; main.py's
               defaults are rates [1]*3 + [b]*3 + [b^2]*3 + [b^3]*3 and blocks 3, 6, 9),
               share_inout_proj (False)
Values outside what the official model supports here (in brackets) raise ValueError.

Errors: unknown, missing or mis-shaped keys raise ``ConversionError`` (a ValueError) that lists
every one of them.

CLI (torch only for .pth: ``pip install -e '.[convert]'``):

  python -m clustr_jax.convert --arch=clustr --input=ClusTR_b2.pth --output=/ckpt/clustr_s
  python -m clustr_jax.convert --arch=deit --input=deit_small_patch16_224-cd65a155.pth \\
      --output=/ckpt/deit_s
  python -m clustr_jax.convert --arch=sparsifiner --input=sd.safetensors --output=/ckpt/spar \\
      --kwargs='{"attn_keep_rate_list": [0.1, 0.1, 0.1, 0.1, 0.1, 0.1,
                                        0.1, 0.1, 0.1, 0.1, 0.1, 0.1]}'

reads ``.pth`` / ``.pt`` (``torch.load(..., weights_only=True)``; a checkpoint dict's 'model',
'state_dict' or 'model_ema' entry is used), ``.npz`` or ``.safetensors``, and writes an Orbax
checkpoint of ``{'params': ...}`` to ``<output>/params`` plus ``<output>/model.json`` (the model
class and its constructor fields); ``load(output)`` gives (module, variables) back.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
from typing import Any, Callable, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from clustr_jax.models import clustr_vit, vit

ARCHS = ("clustr", "sparsifiner", "deit")

#: Released variants: the official constructor keywords of each (num_classes 1000).
VARIANTS: dict[str, dict[str, dict[str, Any]]] = {
    "clustr": {name: {**spec, "num_classes": 1000, "img_size": 224}
               for name, spec in clustr_vit.VARIANTS.items()},
    "deit": {
        size: dict(embed_dim=dim, depth=12, num_heads=heads, mlp_ratio=4.0, qkv_bias=True,
                   num_classes=1000, img_size=224, patch_size=16)
        for size, dim, heads in (("tiny", 192, 3), ("small", 384, 6), ("base", 768, 12))},
    "sparsifiner": {
        "small": dict(embed_dim=384, depth=12, num_heads=6, mlp_ratio=4.0, qkv_bias=True,
                      num_classes=1000, img_size=224, patch_size=16,
                      attn_keep_rate_list=[0.25] * 12, reduce_n_factor=6, reduce_c_factor=2)},
}

# Official keywords that must keep the value in brackets of the module docstring.
_FIXED = {"in_chans": 3, "qk_scale": None, "num_stages": 4, "representation_size": None,
          "share_inout_proj": False}
_COMMON = {"num_classes", "img_size", "drop_rate", "attn_drop_rate", "drop_path_rate",
           "qk_scale", "in_chans"}
_KWARGS = {
    "clustr": _COMMON | {"embed_dims", "num_heads", "mlp_ratios", "depths", "sr_ratios",
                         "qkv_bias", "patch_size", "num_stages"},
    "deit": _COMMON | {"patch_size", "embed_dim", "depth", "num_heads", "mlp_ratio", "qkv_bias",
                       "representation_size"},
}
_KWARGS["sparsifiner"] = _KWARGS["deit"] | {
    "attn_keep_rate_list", "reduce_n_factor", "reduce_c_factor", "token_keep_rate_list",
    "token_pruning_loc_indicator", "share_inout_proj"}


class ConversionError(ValueError):
  """The state dict does not fit the architecture: lists unknown, missing and mis-shaped keys."""


@dataclasses.dataclass(frozen=True)
class _Entry:
  """One official tensor: its key and shape, and where it goes (fn -> [(our path, array)])."""
  key: str
  shape: tuple[int, ...]
  fn: Callable[[np.ndarray], list[tuple[tuple[str, ...], np.ndarray]]]


def _as_is(path):
  return lambda w: [(path, w)]


def _linear(key, out, inp, path, bias=True, kernel=lambda w: w.T):
  """nn.Linear(inp, out): weight [out, inp] -> path/kernel = kernel(W), bias [out] -> path/bias."""
  entries = [_Entry(f"{key}.weight", (out, inp), lambda w: [(path + ("kernel",), kernel(w))])]
  if bias:
    entries.append(_Entry(f"{key}.bias", (out,), _as_is(path + ("bias",))))
  return entries


def _heads_in(key, dim, heads, path, bias):
  """A query-like Linear(dim, dim) into HeadProjection: kernel [dim, H, d], bias [H, d]."""
  d = dim // heads
  entries = [_Entry(f"{key}.weight", (dim, dim),
                    lambda w: [(path + ("kernel",), w.T.reshape(dim, heads, d))])]
  if bias:
    entries.append(_Entry(f"{key}.bias", (dim,),
                          lambda b: [(path + ("bias",), b.reshape(heads, d))]))
  return entries


def _heads_out(key, dim, heads, path):
  """An output Linear(dim, dim) into OutputProjection: kernel [H, d, dim], bias [dim]."""
  d = dim // heads
  return [_Entry(f"{key}.weight", (dim, dim),
                 lambda w: [(path + ("kernel",), w.T.reshape(heads, d, dim))]),
          _Entry(f"{key}.bias", (dim,), _as_is(path + ("bias",)))]


def _split_heads(key, dim, heads, paths, bias):
  """A fused Linear(dim, n dim) (timm qkv, ClusTR stage-4 kv) into n HeadProjections."""
  d, n = dim // heads, len(paths)

  def weight(w):
    return [(p + ("kernel",), w[i * dim:(i + 1) * dim].T.reshape(dim, heads, d))
            for i, p in enumerate(paths)]

  def bias_fn(b):
    return [(p + ("bias",), b[i * dim:(i + 1) * dim].reshape(heads, d))
            for i, p in enumerate(paths)]
  entries = [_Entry(f"{key}.weight", (n * dim, dim), weight)]
  if bias:
    entries.append(_Entry(f"{key}.bias", (n * dim,), bias_fn))
  return entries


def _kv(key, dim, heads, path, bias):
  """ClusTR's Linear(dim, 2 dim) into KeyValueProjection: kernel [dim, 2, H, d], bias [2, H, d]."""
  d = dim // heads
  entries = [_Entry(f"{key}.weight", (2 * dim, dim),
                    lambda w: [(path + ("kernel",), w.T.reshape(dim, 2, heads, d))])]
  if bias:
    entries.append(_Entry(f"{key}.bias", (2 * dim,),
                          lambda b: [(path + ("bias",), b.reshape(2, heads, d))]))
  return entries


def _norm(key, dim, path):
  return [_Entry(f"{key}.weight", (dim,), _as_is(path + ("scale",))),
          _Entry(f"{key}.bias", (dim,), _as_is(path + ("bias",)))]


def _conv(key, out, inp, k, path, groups=1):
  return [_Entry(f"{key}.weight", (out, inp // groups, k, k),
                 lambda w: [(path + ("kernel",), w.transpose(2, 3, 1, 0))]),
          _Entry(f"{key}.bias", (out,), _as_is(path + ("bias",)))]


def _mlp(prefix, dim, hidden, path, dwconv):
  entries = _linear(f"{prefix}.fc1", hidden, dim, path + ("fc1",))
  if dwconv:
    entries += _conv(f"{prefix}.dwconv.dwconv", hidden, hidden, 3, path + ("dwconv",),
                     groups=hidden)
  return entries + _linear(f"{prefix}.fc2", dim, hidden, path + ("fc2",))


# ---------------------------------------------------------------------------------------------
# Architectures: official keywords -> (our module, the official tensors).
# ---------------------------------------------------------------------------------------------
def _check_fixed(kw: Mapping[str, Any], arch: str) -> None:
  for key, required in _FIXED.items():
    if key in kw and kw[key] != required:
      raise ValueError(f"from_torch({arch!r}): {key}={kw[key]!r} is not supported; only "
                       f"{required!r} (the released models' value)")


def _clustr(kw: dict[str, Any]) -> tuple[nn.Module, list[_Entry], int]:
  dims, heads = tuple(kw["embed_dims"]), tuple(kw["num_heads"])
  ratios, depths, srs = tuple(kw["mlp_ratios"]), tuple(kw["depths"]), tuple(kw["sr_ratios"])
  module = clustr_vit.ClusTR(
      num_classes=kw["num_classes"], embed_dims=dims, num_heads=heads, mlp_ratios=ratios,
      depths=depths, sr_ratios=srs, qkv_bias=kw["qkv_bias"], drop_rate=kw.get("drop_rate", 0.0),
      attn_drop_rate=kw.get("attn_drop_rate", 0.0),
      drop_path_rate=kw.get("drop_path_rate", 0.0))
  module._check()  # pylint: disable=protected-access
  bias = kw["qkv_bias"]
  entries: list[_Entry] = []
  for i in range(4):
    dim, inp, k = dims[i], 3 if i == 0 else dims[i - 1], 7 if i == 0 else 3
    entries += _conv(f"patch_embed{i + 1}.proj", dim, inp, k, (f"patch_embed{i + 1}", "proj"))
    entries += _norm(f"patch_embed{i + 1}.norm", dim, (f"patch_embed{i + 1}", "norm"))
    for j in range(depths[i]):
      key, path = f"block{i + 1}.{j}", (f"block{i + 1}_{j}",)
      attn, at = f"{key}.attn", path + ("attn",)
      entries += _norm(f"{key}.norm1", dim, path + ("norm1",))
      if srs[i] > 1:
        entries += _heads_in(f"{attn}.q", dim, heads[i], at + ("q",), bias)
        entries += _linear(f"{attn}.weight_layer", 1, dim, at + ("weight_layer",))
        for s in (1, 2):
          entries += _kv(f"{attn}.kv{s}", dim, heads[i], at + (f"kv{s}",), bias)
        entries += _heads_out(f"{attn}.proj", dim, heads[i], at + ("proj",))
      else:
        entries += _heads_in(f"{attn}.q", dim, heads[i], at + ("query",), bias)
        entries += _split_heads(f"{attn}.kv", dim, heads[i], (at + ("key",), at + ("value",)),
                                bias)
        entries += _heads_out(f"{attn}.proj", dim, heads[i], at + ("out",))
      entries += _norm(f"{key}.norm2", dim, path + ("norm2",))
      entries += _mlp(f"{key}.mlp", dim, int(dim * ratios[i]), path + ("mlp",), dwconv=True)
    entries += _norm(f"norm{i + 1}", dim, (f"norm{i + 1}",))
  entries += _linear("head", kw["num_classes"], dims[3], ("head",))
  return module, entries, kw.get("img_size", 224)


def _token_keep_rates(kw: dict[str, Any], depth: int) -> list[float]:
  """Each block's token keep rate from the official ``token_keep_rate_list`` and
  ``token_pruning_loc_indicator`` (official ``Attention``: a block prunes only where its
  indicator is True, to ceil(rate * N_p) patches); 1.0 where a block does not prune.

  Raises:
    ValueError: a list not of length ``depth``, a rate outside (0, 1], an indicator that is not
      a bool, or a pruning block whose budget exceeds the patches kept before it (the official
      top-k would then select pruned tokens again; ours does not reproduce that).
  """
  where = "from_torch('sparsifiner')"
  rates = [float(r) for r in kw.get("token_keep_rate_list", [1.0] * depth)]
  prune = list(kw.get("token_pruning_loc_indicator", [False] * depth))
  for key, values in (("token_keep_rate_list", rates), ("token_pruning_loc_indicator", prune)):
    if len(values) != depth:
      raise ValueError(f"{where}: {key} has {len(values)} entries; need depth={depth}")
  if any(not 0.0 < r <= 1.0 for r in rates):
    raise ValueError(f"{where}: token_keep_rate_list={rates} must lie in (0, 1]")
  if any(not isinstance(p, (bool, np.bool_)) for p in prune):
    raise ValueError(f"{where}: token_pruning_loc_indicator={prune} must hold bools")
  out, pruned = [], False
  for i, (rate, here) in enumerate(zip(rates, prune)):
    if here and rate == 1.0 and pruned:
      raise ValueError(f"{where}: block {i} prunes with token_keep_rate 1 after an earlier "
                       "pruning block (the official top-k would select pruned tokens again)")
    out.append(rate if here else 1.0)
    pruned = pruned or (here and rate < 1.0)
  return out


def _vit(kw: dict[str, Any], sparsifiner: bool) -> tuple[nn.Module, list[_Entry], int]:
  dim, depth, heads = kw["embed_dim"], kw["depth"], kw["num_heads"]
  img, patch, bias = kw["img_size"], kw["patch_size"], kw["qkv_bias"]
  hidden = int(dim * kw["mlp_ratio"])
  tokens = (img // patch) ** 2 + 1
  fields = dict(num_classes=kw["num_classes"], img_size=img, patch_size=patch, embed_dim=dim,
                depth=depth, num_heads=heads, mlp_ratio=kw["mlp_ratio"], qkv_bias=bias,
                drop_rate=kw.get("drop_rate", 0.0), attn_drop_rate=kw.get("attn_drop_rate", 0.0),
                drop_path_rate=kw.get("drop_path_rate", 0.0))
  out_name = "out"
  if sparsifiner:
    rates = [float(r) for r in kw["attn_keep_rate_list"]]
    if len(rates) != depth:
      raise ValueError(f"from_torch('sparsifiner'): attn_keep_rate_list has {len(rates)} "
                       f"entries; need depth={depth}")
    token_rates = _token_keep_rates(kw, depth)
    options = dict(reduce_n_factor=kw["reduce_n_factor"], reduce_c_factor=kw["reduce_c_factor"])
    layer = None
    if len(set(rates)) == 1 and all(t == 1.0 for t in token_rates):
      options["keep_rate"] = rates[0]
    else:
      layer = tuple({"keep_rate": r, **({"token_keep_rate": t} if t < 1.0 else {})}
                    for r, t in zip(rates, token_rates))
    fields.update(attention="sparsifiner", attention_kwargs=options, layer_attention_kwargs=layer)
    out_name = "proj"
  module = vit.VisionTransformer(**fields)
  module._check()  # pylint: disable=protected-access
  entries = _conv("patch_embed.proj", dim, 3, patch, ("patch_embed", "proj"))
  entries += [_Entry("cls_token", (1, 1, dim), _as_is(("cls_token",))),
              _Entry("pos_embed", (1, tokens, dim), _as_is(("pos_embed",)))]
  d = dim // heads
  for i in range(depth):
    key, path = f"blocks.{i}", (f"blocks_{i}",)
    at = path + ("attn",)
    entries += _norm(f"{key}.norm1", dim, path + ("norm1",))
    entries += _split_heads(f"{key}.attn.qkv", dim, heads,
                            (at + ("query",), at + ("key",), at + ("value",)), bias)
    entries += _heads_out(f"{key}.attn.proj", dim, heads, at + (out_name,))
    if sparsifiner:
      mp, mpath = f"{key}.attn.mask_predictor", at + ("mask_predictor",)
      c, n_down = d // kw["reduce_c_factor"], tokens // kw["reduce_n_factor"]
      entries += _linear(f"{mp}.proj_c_q", c, d, mpath + ("proj_c_q",))
      entries += _linear(f"{mp}.proj_c_k", c, d, mpath + ("proj_c_k",))
      entries += [_Entry(f"{mp}.proj_n", (tokens, n_down), _as_is(mpath + ("proj_n",))),
                  _Entry(f"{mp}.proj_back_n", (tokens, n_down), _as_is(mpath + ("proj_back_n",)))]
    entries += _norm(f"{key}.norm2", dim, path + ("norm2",))
    entries += _mlp(f"{key}.mlp", dim, hidden, path + ("mlp",), dwconv=False)
  entries += _norm("norm", dim, ("norm",))
  entries += _linear("head", kw["num_classes"], dim, ("head",))
  return module, entries, img


def _build(arch: str, kw: dict[str, Any]) -> tuple[nn.Module, list[_Entry], int]:
  _check_fixed(kw, arch)
  if arch == "clustr":
    return _clustr(kw)
  return _vit(kw, sparsifiner=arch == "sparsifiner")


def _problems(entries: Sequence[_Entry], state_dict: Mapping[str, Any]) -> list[str]:
  """Unknown, missing and mis-shaped keys, one line each."""
  expected = {e.key: e.shape for e in entries}
  lines = [f"unknown key {k!r} {tuple(np.shape(state_dict[k]))}"
           for k in sorted(set(state_dict) - set(expected))]
  lines += [f"missing key {k!r} {expected[k]}" for k in expected if k not in state_dict]
  lines += [f"mis-shaped key {k!r}: {tuple(np.shape(state_dict[k]))}, expected {expected[k]}"
            for k in expected if k in state_dict and tuple(np.shape(state_dict[k])) != expected[k]]
  return lines


def _set(tree: dict, path: tuple[str, ...], value: np.ndarray) -> None:
  for name in path[:-1]:
    tree = tree.setdefault(name, {})
  tree[path[-1]] = value


def from_torch(arch: str, state_dict: Mapping[str, Any], variant: str | None = None,
               **arch_kwargs: Any) -> tuple[nn.Module, dict[str, Any]]:
  """Converts an official state dict into (our module, its variables {'params': ...}).

  Args:
    arch: 'clustr', 'sparsifiner' or 'deit'.
    state_dict: official parameter name -> array (numpy or anything ``np.asarray`` takes) in
      the PyTorch layout. Buffers are not expected (none of these models has any).
    variant: released defaults to start from (``VARIANTS[arch]``: clustr 'b1'/'b2'/'b3', deit
      'tiny'/'small'/'base', sparsifiner 'small'); None = the variant whose keys and shapes the
      state dict matches (ties and no match: the first variant, whose mismatches are reported).
    **arch_kwargs: the official constructor's keywords (see the module docstring), overriding
      the variant's.

  Returns:
    (module, variables): ``module.apply(variables, images, train=False)`` with images float32
    [B, H, W, 3] gives the official eval-mode logits float32 [B, num_classes]. Parameters are
    float32 jax arrays (unboxed; wrap with the module's logical names via ``jax.eval_shape``
    of ``module.init`` for sharded use).

  Raises:
    ValueError: unknown arch, variant or keyword, or an unsupported keyword value.
    ConversionError: unknown, missing or mis-shaped keys (all listed).
  """
  if arch not in ARCHS:
    raise ValueError(f"from_torch: unknown arch {arch!r}; valid choices: {', '.join(ARCHS)}")
  unknown = sorted(set(arch_kwargs) - _KWARGS[arch])
  if unknown:
    raise ValueError(f"from_torch({arch!r}): unknown keyword(s) {unknown}; valid: "
                     f"{sorted(_KWARGS[arch])}")
  variants = VARIANTS[arch]
  if variant is not None and variant not in variants:
    raise ValueError(f"from_torch({arch!r}): unknown variant {variant!r}; valid choices: "
                     f"{', '.join(variants)}")
  report = {}
  for name in [variant] if variant is not None else list(variants):
    module, entries, img = _build(arch, {**variants[name], **arch_kwargs})
    report[name] = _problems(entries, state_dict)
    if not report[name]:
      break
  else:
    name = min(report, key=lambda n: len(report[n]))    # the closest variant's problems
    raise ConversionError(
        f"from_torch({arch!r}): the state dict does not match variant {name!r} with keywords "
        f"{arch_kwargs} ({len(report[name])} problem(s)):\n  " + "\n  ".join(report[name]))
  params: dict[str, Any] = {}
  for entry in entries:
    for path, value in entry.fn(np.asarray(state_dict[entry.key], dtype=np.float32)):
      _set(params, path, np.ascontiguousarray(value))
  abstract = jax.eval_shape(module.init, jax.random.key(0),
                            jnp.zeros((1, img, img, 3), jnp.float32))
  want = jax.tree.map(lambda a: a.shape, nn.meta.unbox(abstract)["params"])
  got = jax.tree.map(lambda a: a.shape, params)
  if want != got:  # an internal inconsistency between this file and the model, not user input
    raise AssertionError(f"from_torch({arch!r}): converted tree differs from the model's: "
                         f"{jax.tree_util.tree_structure(got)} vs "
                         f"{jax.tree_util.tree_structure(want)}")
  return module, {"params": jax.tree.map(jnp.asarray, params)}


# ---------------------------------------------------------------------------------------------
# Files and the CLI.
# ---------------------------------------------------------------------------------------------
def read_state_dict(path: str | pathlib.Path) -> dict[str, np.ndarray]:
  """Reads a state dict from ``.pth``/``.pt`` (torch, weights only), ``.npz`` or ``.safetensors``.

  A torch checkpoint dict holding the weights under 'model', 'state_dict' or 'model_ema' (DeiT,
  timm and the official training scripts) is unwrapped.

  Raises:
    ValueError: unknown suffix, or a file without a tensor dict; ImportError: .pth without torch.
  """
  path = pathlib.Path(path)
  suffix = path.suffix.lower()
  if suffix in (".pth", ".pt"):
    try:
      import torch  # pylint: disable=import-outside-toplevel
    except ImportError as e:
      raise ImportError(f"{path}: reading .pth needs torch: pip install -e '.[convert]'") from e
    data = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("model", "state_dict", "model_ema"):
      if isinstance(data, dict) and isinstance(data.get(key), dict):
        data = data[key]
        break
    if not isinstance(data, dict):
      raise ValueError(f"{path}: expected a state dict (name -> tensor); got {type(data)}")
    return {k: v.detach().to(torch.float32).numpy() for k, v in data.items()
            if isinstance(v, torch.Tensor)}
  if suffix == ".npz":
    with np.load(path) as data:
      return {k: data[k] for k in data.files}
  if suffix == ".safetensors":
    from safetensors.numpy import load_file  # pylint: disable=import-outside-toplevel
    return load_file(str(path))
  raise ValueError(f"{path}: unknown checkpoint format {suffix!r}; use .pth, .pt, .npz or "
                   ".safetensors")


def _jsonable(value: Any) -> Any:
  if isinstance(value, Mapping):
    return {k: _jsonable(v) for k, v in value.items()}
  if isinstance(value, (tuple, list)):
    return [_jsonable(v) for v in value]
  return value


_CLASSES = {"ClusTR": clustr_vit.ClusTR, "VisionTransformer": vit.VisionTransformer}


def save(directory: str | pathlib.Path, module: nn.Module, variables: Mapping[str, Any]) -> None:
  """Writes ``variables`` as an Orbax checkpoint to ``directory/params`` and the module's class
  and constructor fields to ``directory/model.json``.

  Raises:
    ValueError: ``directory/params`` exists already (Orbax never overwrites).
  """
  import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel
  directory = pathlib.Path(directory).absolute()
  if (directory / "params").exists():
    raise ValueError(f"{directory / 'params'} exists already; choose another --output")
  directory.mkdir(parents=True, exist_ok=True)
  fields = {f.name: _jsonable(getattr(module, f.name)) for f in dataclasses.fields(module)
            if f.name not in ("parent", "name", "dtype")}
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(directory / "params", dict(variables))
  (directory / "model.json").write_text(
      json.dumps({"class": type(module).__name__, "fields": fields}, indent=1) + "\n")


def _tuples(value: Any) -> Any:
  if isinstance(value, list):
    return tuple(_tuples(v) for v in value)
  if isinstance(value, dict):
    return {k: _tuples(v) for k, v in value.items()}
  return value


def load(directory: str | pathlib.Path, **overrides: Any) -> tuple[nn.Module, dict[str, Any]]:
  """Reads what ``save`` (or the CLI) wrote: (module, variables {'params': ...}).

  ``overrides`` replace constructor fields (e.g. ``drop_path_rate`` for fine-tuning, ``dtype``,
  or ``attention_kwargs`` such as Sparsifiner's ``recon_mode``).

  Raises:
    ValueError: no model.json, or an unknown model class in it.
  """
  import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel
  directory = pathlib.Path(directory).absolute()
  meta_path = directory / "model.json"
  if not meta_path.exists():
    raise ValueError(f"{directory}: no model.json; not written by clustr_jax.convert")
  meta = json.loads(meta_path.read_text())
  if meta.get("class") not in _CLASSES:
    raise ValueError(f"{meta_path}: unknown model class {meta.get('class')!r}; valid: "
                     f"{', '.join(_CLASSES)}")
  module = _CLASSES[meta["class"]](**{**_tuples(meta["fields"]), **overrides})
  with ocp.StandardCheckpointer() as checkpointer:
    variables = checkpointer.restore(directory / "params")
  return module, variables


def main(argv: Sequence[str] | None = None) -> None:
  """CLI: official checkpoint file -> Orbax checkpoint (see the module docstring)."""
  import argparse  # pylint: disable=import-outside-toplevel
  parser = argparse.ArgumentParser(prog="python -m clustr_jax.convert", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--arch", required=True, choices=ARCHS)
  parser.add_argument("--input", required=True, help=".pth/.pt, .npz or .safetensors file")
  parser.add_argument("--output", required=True, help="output directory (must not exist)")
  parser.add_argument("--variant", default=None, help="released variant (default: detected)")
  parser.add_argument("--kwargs", default="{}", help="official constructor keywords as JSON")
  args = parser.parse_args(argv)
  try:
    arch_kwargs = json.loads(args.kwargs)
  except json.JSONDecodeError as e:
    parser.error(f"--kwargs is not valid JSON: {e}")
  if not isinstance(arch_kwargs, dict):
    parser.error(f"--kwargs must be a JSON object; got {args.kwargs!r}")
  module, variables = from_torch(args.arch, read_state_dict(args.input), args.variant,
                                 **arch_kwargs)
  save(args.output, module, variables)
  count = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(variables))
  print(f"{args.input} -> {args.output}: {type(module).__name__}, {count:,} parameters")


if __name__ == "__main__":
  main()
