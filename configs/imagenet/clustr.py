r"""ClusTR-T/S/B (official ``ClusTR_b1/b2/b3``) on ImageNet-1k with the official recipe; a CPU
variant on Imagenette.

Official (``YtongXie/ClusTR`` ``main.py`` defaults and ``configs/ClusTR/ClusTR_b{1,2,3}.py``,
``docs/vision.md``): AdamW (eps 1e-8), lr 5e-4 * batch / 512 (batch 8 x 128 = 1024:
1e-3), weight decay 0.05 (timm groups: none for biases and norms), timm cosine over 300 epochs
with 5 warmup epochs from 1e-6, min lr 1e-5, 10 cooldown epochs; drop path 0.1 / 0.1 / 0.3 and
gradient clipping none / none / 1.0 for T / S / B; DeiT preprocessing (RandAugment m9-mstd0.5,
random erasing 0.25, mixup 0.8 / cutmix 1.0, label smoothing 0.1, repeated augmentation; colour
jitter 0.4 is inactive under RandAugment in timm); no EMA, no distillation.

``cpu``: ClusTR-T (11.7M parameters) at 64 x 64 px (stage grids 16, 8, 4, 2; 4 and 16 clusters
per clustered stage) from scratch on an Imagenette sample (``data_dir``: an ImageNet-layout
folder) for ``steps`` steps of batch 64, lr
1e-3 with warmup over the first tenth of the steps, light augmentation (crop and flip), no
drop path.

Args: model=clustr_t|clustr_s|clustr_b, cpu, steps, data_dir, source=folder|tfds.

  python -m clustr_jax.main \
      --config=configs/imagenet/clustr.py:model=clustr_s,data_dir=/data/imagenet \
      --workdir=workdir/clustr_s
  python -m clustr_jax.main --config=configs/imagenet/clustr.py:cpu,data_dir=/path/to/imagenette \
      --workdir=workdir/clustr_t_cpu
"""

from configs import common, default
from configs.imagenet import common as recipes

#: Per-variant drop path and gradient clipping (``configs/ClusTR/ClusTR_b{1,2,3}.py``).
VARIANTS = {"clustr_t": (0.1, None), "clustr_s": (0.1, None), "clustr_b": (0.3, 1.0)}


def get_config(arg=None):
  arg = common.parse_arg(arg, model="clustr_t", cpu=False, steps=300, data_dir="",
                               source="folder")
  if arg.model not in VARIANTS:
    raise ValueError(f"model={arg.model!r} unknown; valid: {', '.join(VARIANTS)}")
  drop_path, clip = VARIANTS[arg.model]
  config = default.get_config()
  config.dataset = recipes.dataset_config(cpu=arg.cpu, data_dir=arg.data_dir or None,
                                           source=arg.source, image_size=64 if arg.cpu else 224)
  config.model = dict(name=arg.model, attention="clustr", drop_path_rate=drop_path,
                      dtype="float32")
  config.batch_size = 1024
  config.eval_batch_size = 1024
  recipes.timm_optimizer(config, base_lr=5e-4 * config.batch_size / 512, epochs=300,
                         warmup_epochs=5, cooldown_epochs=10,
                         steps=recipes.steps_per_epoch(config.batch_size))
  config.weight_decay_skip = ()  # No positional embeddings; biases and norms still skip.
  config.grad_clip_norm = clip
  recipes.schedule_and_data_workers(config, cpu=arg.cpu)
  if arg.cpu:
    recipes.cpu_variant(config, arg.steps)
  return config
