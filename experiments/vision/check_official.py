r"""Checks ``clustr_jax.convert`` against the official PyTorch models (needs torch and clones).

Loads the official model files from local clones of the official repositories (not part of
this project, never copied into it): ``YtongXie/ClusTR`` (``ClusTR.py``) and
``lim142857/Sparsifiner`` (``src/models/sparsifiner.py``). Both import a few helpers from timm
0.3.2; where timm is not installed, minimal stand-ins are put on the path for this run only
(``to_2tuple``, ``trunc_normal_``, an identity ``DropPath`` (eval mode, drop path 0),
``register_model``, ``_cfg`` and the ImageNet mean/std). Each official model is built with the
official constructor, given a state dict, run in eval mode, and its logits are compared with
those of ``convert.from_torch`` on the same state dict:

  * ClusTR, a small configuration (tests/test_convert.py's), random weights, 64x64, batch 4
    (the official clustering chunks the batch in 4), the density noise patched out
    (``torch.rand`` -> 0 while the official model runs; ``docs/conversion.md``);
  * ClusTR_b1 at 224x224 with the official initialisation, batch 4, noise patched out;
  * Sparsifiner (DeiT layout), a small configuration with random weights, keep rates
    (0.25, 0.5), in the official eval (sparse) mode, with |proj_back_n| > tau (no tied zeros);
  * Sparsifiner with token pruning (``PRUNED``: 12 blocks of width 32, 8x8 patches of 32x32
    images, the official main.py's token_keep_rate_list [1]*3 + [b]*3 + [b^2]*3 + [b^3]*3 with
    pruning at blocks 3, 6, 9), random weights, batch 2, the official handling of pruned tokens
    (``token_pruning='zero'``): b = 0.7 with attention keep 0.25, and b = 0.5 with attention
    keep 0.5, whose budget of 9 keys exceeds the 8, 4, 2 patches kept (the official budget
    lowered to the first sample's kept count).

  python experiments/vision/check_official.py --clustr_repo=/path/to/ClusTR \
      --sparsifiner_repo=/path/to/Sparsifiner > experiments/vision/results/check_official.txt
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import importlib.util
import math
import pathlib
import subprocess
import sys
import tempfile
import types

import jax
import jax.numpy as jnp
import numpy as np
import torch

REPO = pathlib.Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests"))

import test_convert  # noqa: E402  pylint: disable=wrong-import-position

from clustr_jax import convert  # noqa: E402  pylint: disable=wrong-import-position

_TIMM_STANDINS = {
    "timm/__init__.py": "",
    "timm/models/__init__.py": "",
    "timm/models/layers.py": (
        "import torch\n"
        "def to_2tuple(x):\n    return x if isinstance(x, tuple) else (x, x)\n"
        "def trunc_normal_(t, std=1.0, a=-2.0, b=2.0):\n"
        "    return torch.nn.init.trunc_normal_(t, std=std, a=a, b=b)\n"
        "class DropPath(torch.nn.Module):\n"
        "    def __init__(self, p=0.0):\n        super().__init__()\n"
        "    def forward(self, x):\n        return x\n"),
    "timm/models/registry.py": "def register_model(f):\n    return f\n",
    "timm/models/vision_transformer.py": "def _cfg(**kw):\n    return kw\n",
    "timm/data/__init__.py": ("IMAGENET_DEFAULT_MEAN = (0.485, 0.456, 0.406)\n"
                              "IMAGENET_DEFAULT_STD = (0.229, 0.224, 0.225)\n"),
}


def _timm_on_path(directory: pathlib.Path) -> None:
  if importlib.util.find_spec("timm") is not None:
    return
  for rel, text in _TIMM_STANDINS.items():
    path = directory / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
  sys.path.insert(0, str(directory))


def _load(path: pathlib.Path, name: str):
  spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


@contextlib.contextmanager
def _no_density_noise():
  """torch.rand -> zeros (the official DPC-kNN noise is the only torch.rand in the forward)."""
  rand = torch.rand
  torch.rand = lambda *shape, **kw: torch.zeros(
      *shape, **{k: v for k, v in kw.items() if k in ("dtype", "device")})
  try:
    yield
  finally:
    torch.rand = rand


def _ours(arch, state_dict, images, **kwargs):
  module, variables = convert.from_torch(arch, state_dict, **kwargs)
  fn = jax.jit(functools.partial(module.apply, train=False))
  return np.asarray(fn(variables, jnp.asarray(images.transpose(0, 2, 3, 1))))


def _official(model, state_dict, images):
  model.load_state_dict({k: torch.from_numpy(v) for k, v in state_dict.items()}, strict=True)
  with torch.no_grad():
    out = model.eval()(torch.from_numpy(images))
  return (out["x"] if isinstance(out, dict) else out).numpy()


def _report(label, want, got):
  print(f"{label}: max |ours - official| = {np.abs(got - want).max():.3g} "
        f"(max |logit| {np.abs(want).max():.3g}, logits {want.shape})")


#: The pruned Sparsifiner of the check: official main.py's token pruning on a small model.
PRUNED = dict(embed_dim=32, depth=12, num_heads=2, mlp_ratio=4.0, num_classes=10, qkv_bias=True,
              img_size=32, patch_size=8, attn_keep_rate_list=[0.25] * 12, reduce_n_factor=2,
              reduce_c_factor=2,
              token_keep_rate_list=[1.0] * 3 + [0.7] * 3 + [0.7 ** 2] * 3 + [0.7 ** 3] * 3,
              token_pruning_loc_indicator=[i in (3, 6, 9) for i in range(12)])


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--clustr_repo", required=True, help="clone of YtongXie/ClusTR")
  parser.add_argument("--sparsifiner_repo", required=True, help="clone of lim142857/Sparsifiner")
  args = parser.parse_args()
  print(f"torch {torch.__version__}, jax {jax.__version__}")
  for repo in (args.clustr_repo, args.sparsifiner_repo):
    commit = subprocess.run(["git", "-C", repo, "rev-parse", "HEAD"], capture_output=True,
                            text=True, check=False).stdout.strip() or "unknown commit"
    print(f"official code: {pathlib.Path(repo).name} @ {commit}")
  with tempfile.TemporaryDirectory() as tmp:
    _timm_on_path(pathlib.Path(tmp))
    clustr = _load(pathlib.Path(args.clustr_repo) / "ClusTR.py", "official_clustr")
    spar = _load(pathlib.Path(args.sparsifiner_repo) / "src/models/sparsifiner.py",
                 "official_sparsifiner")

  cfg = test_convert.CLUSTR
  sd = test_convert.random_state_dict("clustr", cfg, seed=5)
  images = np.random.default_rng(7).normal(size=(4, 3, 64, 64)).astype(np.float32)
  official = clustr.ClusTR(
      img_size=64, norm_layer=functools.partial(torch.nn.LayerNorm, eps=1e-6),
      **{k: v for k, v in cfg.items() if k != "img_size"})
  with _no_density_noise():
    want = _official(official, sd, images)
  _report("ClusTR small config, random weights, 64x64", want, _ours("clustr", sd, images, **cfg))

  torch.manual_seed(0)
  official = clustr.ClusTR_b1()
  sd = {k: v.numpy() for k, v in official.state_dict().items()}
  images = np.random.default_rng(8).normal(size=(4, 3, 224, 224)).astype(np.float32)
  with _no_density_noise():
    want = _official(official, sd, images)
  _report("ClusTR_b1, official init, 224x224", want, _ours("clustr", sd, images))

  node = types.SimpleNamespace
  yacs = node(SPAR=node(BASIS_THRESHOLD=0.02, BASIS_COEF=node(THRESHOLD=0.05, USE_TOPK=True,
                                                               TOPK=8),
                        ATTN_SCORE=node(USE_TOPK=True, THRESHOLD=1e-4),
                        PRUNE_ATTN_MATRIX_ROW=False, OUT_BASIS_SPARSITY=False,
                        OUT_BASIS_COEF_SPARSITY=False, OUT_ATTN_MASK_SPARSITY=False),
              LOSS=node(USE_ATTN_RECON=False))
  cfg = test_convert.SPARSIFINER
  depth = cfg["depth"]
  official = spar.Sparsifiner(token_keep_rate_list=[1] * depth,
                              token_pruning_loc_indicator=[False] * depth, cfg=yacs, **cfg)
  sd = test_convert.random_state_dict("sparsifiner", cfg, seed=6)
  images = np.random.default_rng(9).normal(size=(2, 3, 32, 32)).astype(np.float32)
  want = _official(official, sd, images)
  _report("Sparsifiner small config, random weights, sparse eval mode", want,
          _ours("sparsifiner", sd, images, **cfg))

  for base, rate in ((0.7, 0.25), (0.5, 0.5)):
    kw = dict(PRUNED, attn_keep_rate_list=[rate] * 12,
              token_keep_rate_list=[1.0] * 3 + [base] * 3 + [base ** 2] * 3 + [base ** 3] * 3)
    official = spar.Sparsifiner(cfg=yacs, **kw)
    sd = test_convert.random_state_dict("sparsifiner", kw, seed=10)
    images = np.random.default_rng(11).normal(size=(2, 3, 32, 32)).astype(np.float32)
    want = _official(official, sd, images)
    _report(f"Sparsifiner with token pruning (b = {base} at blocks 3, 6, 9, attention keep "
            f"{rate}), random weights, eval mode", want, _ours("sparsifiner", sd, images, **kw))
    unpruned = _ours("sparsifiner", sd, images,
                     **{**kw, "token_pruning_loc_indicator": [False] * 12})
    module, _ = convert.from_torch("sparsifiner", sd, **kw)
    print(f"  patches kept after blocks 3, 6, 9: {[b for b in module.token_budgets() if b]} of "
          f"16; attention budget ceil({rate} * 17) = {math.ceil(rate * 17)}; the pruning "
          f"matters: max |unpruned - official pruned| = {np.abs(unpruned - want).max():.3g}")


if __name__ == "__main__":
  main()
