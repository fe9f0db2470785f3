"""Shared pieces of the vision recipes in ``configs/imagenet/`` (DeiT, ClusTR, Sparsifiner).

All three papers train with DeiT's ``main.py`` on timm 0.3.2 (``docs/vision.md``): AdamW with
timm's parameter groups and cosine schedule, counted in epochs of DeiT's repeated-augmentation
sampler. Configs call these to set the optimizer keys that ``clustr_jax.optim.create_optimizer``
reads, and ``dataset_config`` for the ImageNet data section; a mechanism's settings for the ViT
grid come from the attention registry (``clustr_jax.attention.sized_for``).
"""

from __future__ import annotations

import ml_collections

from clustr_jax import attention

#: ILSVRC-2012 training images.
IMAGENET_TRAIN_IMAGES = 1_281_167


def vit_attention_kwargs(name: str, image_size: int, patch_size: int) -> dict:
  """The settings ``attention.sized_for`` gives mechanism ``name`` for a ViT on
  ``image_size``^2 images of ``patch_size``^2 patches (a CLS token first).

  Raises:
    ValueError: unknown ``name`` (the message lists the registered names).
  """
  grid = image_size // patch_size
  return attention.sized_for(name, grid * grid + 1, grid=(grid, grid), cls_token=True)


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
  config.grad_clip_norm = None


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


def dataset_config(*, cpu: bool = False, data_dir: str | None = None, source: str = "folder",
                   image_size: int = 224) -> ml_collections.ConfigDict:
  """``config.dataset`` for ImageNet with DeiT's training preprocessing (the recipes' shared part).

  Full: ImageNet-1k from ``data_dir`` (``source`` 'folder' or 'tfds'), 1,000 TFDS-order classes,
  val = test = the ILSVRC-2012 validation set, RandAugment m9-mstd0.5, random erasing 0.25, mixup
  0.8 / cutmix 1.0, label smoothing 0.1, repeated augmentation x3, crop_pct 0.875.
  ``cpu``: an ImageNet-layout folder of a few classes (e.g. an Imagenette sample; ``data_dir``
  must be set, here or with ``--config.dataset.data_dir``), its own classes, ``image_size`` as
  given (e.g. 64), and light augmentation for short runs from scratch: random resized crop with
  scale (0.35, 1) and flips only, label smoothing 0.1, no repeated augmentation.
  """
  ds = ml_collections.ConfigDict()
  ds.name = "imagenet"
  ds.source = source
  ds.data_dir = ml_collections.FieldReference(data_dir, field_type=str)
  ds.tfds_name = "imagenet2012"
  ds.classes = "imagenet"
  if source == "tfds":
    ds.splits = {"train": "train", "val": "validation", "test": "validation"}
  else:
    ds.splits = {"train": "train", "val": "val", "test": "val"}
  ds.image_size = image_size
  ds.crop_pct = 0.875
  ds.scale = (0.08, 1.0)
  ds.hflip = 0.5
  ds.rand_augment = ml_collections.FieldReference("rand-m9-mstd0.5-inc1", field_type=str)
  ds.random_erasing = 0.25
  ds.mixup_alpha = 0.8
  ds.cutmix_alpha = 1.0
  ds.mix_prob = 1.0
  ds.mix_switch_prob = 0.5
  ds.label_smoothing = 0.1
  ds.repeated_augmentation = 3
  ds.read_threads = 8
  if cpu:
    ds.classes = "folder"
    ds.scale = (0.35, 1.0)
    ds.rand_augment = None
    ds.random_erasing = 0.0
    ds.mix_prob = 0.0
    ds.repeated_augmentation = 1
    ds.read_threads = 2
  return ds
