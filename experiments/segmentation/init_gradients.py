r"""Where the first step's gradient norm of ClusTR-T + Semantic FPN comes from at initialisation:
one CamVid training batch of the CPU config (``configs/segmentation/clustr_fpn.py:cpu``, seed 0:
the first batch and the initial parameters of ``experiments/segmentation/camvid_cpu.py``'s
runs), the loop's loss (``losses.task_loss('segmentation')``: mean cross-entropy over the
labelled pixels) and its gradient at the initial parameters, for ClusTR, dense and CAST
attention in stages 1-3.

Reported per run: the global gradient norm (the loop's ``grad_norm``), the norm per parameter
group (backbone patch embeddings / stage blocks / stage norms, FPN neck, FPN head) and the
parameters with the largest gradient norms. ``--variant`` repeats the gradient with a change to
locate the cause (``docs/segmentation.md``, "Gradient norm at initialisation"):
``eval`` (train=False: no dropout, no clustering noise), ``noise_pad`` (the crops' padding,
image 0 after normalisation, replaced by standard normal noise; labels unchanged, still
ignored).

  python experiments/segmentation/init_gradients.py --data_dir=/path/to/CamVid

Output: experiments/segmentation/results/init_gradients.md.
"""

from __future__ import annotations

import argparse
import collections
import functools
import os
import pathlib

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from clustr_jax import losses, models
from clustr_jax.data import camvid
from configs import common

REPO = pathlib.Path(__file__).resolve().parents[2]
RESULTS = REPO / "experiments" / "segmentation" / "results"
ATTENTIONS = ("clustr", "dense", "cast")


def group_of(path: tuple[str, ...]) -> str:
  """A parameter's group: 'backbone/patch_embed1', 'backbone/block1 attn', 'backbone/block1
  mlp', 'backbone/block1 norms', 'backbone/norm1', 'neck/lateral', 'neck/fpn', 'head/scale1',
  'head/cls'."""
  top, module = path[0], path[1]
  if top == "backbone" and module.startswith("block"):
    stage = module.split("_")[0]
    part = path[2]
    return f"backbone/{stage} " + ("norms" if part.startswith("norm") else part)
  if top == "neck":
    return "neck/" + module.rstrip("0123456789")
  if top == "head":
    return "head/" + module.split("_")[0]
  return f"{top}/{module}"


def gradients(attention: str, data_dir: str, variant: str):
  """(loss, flat gradients {path: array}, padded fraction of the batch's pixels) of the first
  batch at the initial parameters."""
  config = common.load(f"configs/segmentation/clustr_fpn.py:cpu,attention={attention}")
  config.dataset.data_dir = data_dir
  dataset = camvid.load_dataset(config, pathlib.Path("."))
  batch = next(dataset.train_iterator(batch_size=config.batch_size, seed=config.seed))
  model = models.from_config(config.model, dataset.model_kwargs)
  rng = jax.random.key(config.seed)
  init_rng, step_rng = jax.random.split(rng)
  images = np.asarray(batch["images"])
  if variant == "noise_pad":
    padded = (images == 0).all(-1)                                    # [B, h, w]
    noise = np.random.default_rng(0).standard_normal(images.shape).astype(np.float32)
    images = np.where(padded[..., None], noise, images)
  images = jnp.asarray(images)
  params = nn.meta.unbox(jax.jit(functools.partial(model.init, train=False))(
      init_rng, jnp.zeros_like(images))["params"])
  dropout_rng, clustering_rng = jax.random.split(jax.random.fold_in(step_rng, 0))

  def loss_fn(p):
    logits = model.apply({"params": p}, images, train=variant != "eval",
                         rngs={"dropout": dropout_rng, "clustering": clustering_rng})
    return losses.task_loss("segmentation", logits, jnp.asarray(batch["targets"]))

  loss, grads = jax.jit(jax.value_and_grad(loss_fn))(params)
  padded = float((np.asarray(batch["images"]) == 0).all(-1).mean())
  return float(loss), flax.traverse_util.flatten_dict(jax.device_get(grads)), padded


def report(attention: str, variant: str, loss: float, flat: dict, padded: float
           ) -> list[str]:
  norms = {k: float(np.linalg.norm(v)) for k, v in flat.items()}
  total = float(np.sqrt(sum(n ** 2 for n in norms.values())))
  groups = collections.defaultdict(float)
  for k, n in norms.items():
    groups[group_of(k)] += n ** 2
  lines = [f"## {attention} ({variant})", "",
           f"loss {loss:.4f}, global gradient norm **{total:,.1f}**; padded pixels (image 0) "
           f"{padded:.1%} of the batch", "",
           "| group | gradient norm | share of squared norm |", "|---|---|---|"]
  for g, sq in sorted(groups.items(), key=lambda kv: -kv[1])[:10]:
    lines.append(f"| {g} | {np.sqrt(sq):,.2f} | {sq / total ** 2:.1%} |")
  lines += ["", "| parameter | shape | gradient norm |", "|---|---|---|"]
  for k, n in sorted(norms.items(), key=lambda kv: -kv[1])[:8]:
    lines.append(f"| {'/'.join(k)} | {tuple(flat[k].shape)} | {n:,.2f} |")
  return lines + [""]


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--data_dir", required=True)
  parser.add_argument("--attentions", default=",".join(ATTENTIONS))
  parser.add_argument("--variants", default="train")
  args = parser.parse_args()
  lines = ["# Gradient norm at initialisation, ClusTR-T + Semantic FPN, CamVid CPU config", "",
           f"`python experiments/segmentation/init_gradients.py --data_dir=<CamVid> "
           f"--attentions={args.attentions} --variants={args.variants}` (jax "
           f"{jax.__version__}; first batch of 8 128 x 128 crops, seed 0; load average "
           f"{os.getloadavg()[0]:.1f}; nothing timed).", ""]
  for attention in args.attentions.split(","):
    for variant in args.variants.split(","):
      if variant not in ("train", "eval", "noise_pad"):
        parser.error(f"--variants: {variant!r} unknown (train, eval, noise_pad)")
      loss, flat, padded = gradients(attention, args.data_dir, variant)
      lines += report(attention, variant, loss, flat, padded)
      print("\n".join(lines[-20:]), flush=True)
  RESULTS.mkdir(parents=True, exist_ok=True)
  (RESULTS / "init_gradients.md").write_text("\n".join(lines))


if __name__ == "__main__":
  main()
