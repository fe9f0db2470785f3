"""Shared pieces of the vision recipes in ``configs/imagenet/`` (DeiT, ClusTR, Sparsifiner).

All three papers train with DeiT's ``main.py`` on timm 0.3.2 (../shared/reference/clustr.md §6,
sparsifiner.md §3): AdamW with timm's parameter groups and cosine schedule, counted in epochs of
DeiT's repeated-augmentation sampler. Configs call these to set the optimizer keys that
``clustr_jax.optim.create_optimizer`` reads.
"""

from __future__ import annotations

import ml_collections

#: ILSVRC-2012 training images.
IMAGENET_TRAIN_IMAGES = 1_281_167


def vit_attention_kwargs(name: str, tokens: int) -> dict:
  """Options of each mechanism for a ViT of ``tokens`` tokens (CLS included)."""
  if name == "dense":
    return {}
  if name == "clustr":
    # ClusTR's two scales (M, 4M) with M = N // sr^2 at sr 2, as in its third stage (49, 196 at
    # 197 tokens).
    m = max(1, tokens // 4)
    return {"num_clusters": (m, min(4 * m, tokens))}
  if name == "cast":
    num_clusters = max(1, int(round(tokens ** 0.5)))
    return {"num_clusters": num_clusters, "cluster_size": -(-tokens // num_clusters)}
  if name == "sparsifiner":
    # The released configuration: keep 0.25, n_down = N // 6, c = d // 2, CLS token first; for
    # short sequences (N < 48) a smaller factor keeps n_down >= basis_topk = 8.
    factor = 6 if tokens // 6 >= 8 else max(1, tokens // 8)
    return {"keep_rate": 0.25, "reduce_n_factor": factor, "reduce_c_factor": 2,
            "has_cls_token": True}
  raise ValueError(f"attention={name!r} unknown; valid: dense, clustr, cast, sparsifiner")


def steps_per_epoch(batch_size: int, num_images: int = IMAGENET_TRAIN_IMAGES,
                    repeated_augmentation: int = 3) -> int:
  """Optimizer steps per epoch: DeiT's RASampler takes floor(n // 256 * 256) images per epoch."""
  used = num_images // 256 * 256 if repeated_augmentation > 1 else num_images
  return used // batch_size


def timm_optimizer(config: ml_collections.ConfigDict, *, base_lr: float, epochs: int,
                   warmup_epochs: int, cooldown_epochs: int, steps: int, min_lr: float = 1e-5,
                   warmup_init_lr: float = 1e-6) -> None:
  """Sets timm's AdamW (``weight_decay`` 0.05 except biases, norms, pos_embed and cls_token) and
  cosine schedule (``schedule='timm_cosine'``, ``epochs`` + ``cooldown_epochs`` epochs of
  ``steps`` steps) on ``config``."""
  config.optimizer = "adamw"
  config.learning_rate = base_lr
  config.schedule = "timm_cosine"
  config.warmup_steps = warmup_epochs * steps
  config.cooldown_steps = cooldown_epochs * steps
  config.num_train_steps = (epochs + cooldown_epochs) * steps
  config.warmup_init_lr = warmup_init_lr
  config.min_lr = min_lr
  config.adam_b1 = 0.9
  config.adam_b2 = 0.999
  config.adam_eps = 1e-8
  config.weight_decay = 0.05
  config.weight_decay_skip = ("pos_embed", "cls_token")
  config.grad_clip_norm = ml_collections.FieldReference(None, field_type=float)


def schedule_and_data_workers(config: ml_collections.ConfigDict, *, cpu: bool) -> None:
  """Logging, evaluation and checkpoints once per epoch of ``config.batch_size``; 8 Grain
  workers (none for CPU runs)."""
  config.log_every_steps = 100
  config.eval_every_steps = steps_per_epoch(config.batch_size)
  config.checkpoint_every_steps = steps_per_epoch(config.batch_size)
  config.max_checkpoints_to_keep = 3
  config.data_workers = 0 if cpu else 8


def cpu_variant(config: ml_collections.ConfigDict, steps: int) -> None:
  """The CPU-sized training of a recipe on the Imagenette sample: ``steps`` steps of batch 64
  from scratch, lr 1e-3 (5e-4 * 64 / 512 barely moves in minutes) with warmup over the first
  tenth, no cooldown, no drop path; evaluation and a checkpoint at the end."""
  config.model.drop_path_rate = 0.0
  config.batch_size = 64
  config.eval_batch_size = 100
  config.learning_rate = 1e-3
  config.num_train_steps = steps
  config.warmup_steps = max(1, steps // 10)
  config.cooldown_steps = 0
  config.log_every_steps = 25
  config.eval_every_steps = steps
  config.checkpoint_every_steps = steps
