r"""ViT/DeiT on ImageNet-1k with DeiT's recipe, any attention; and a CPU variant on Imagenette.

DeiT (``facebookresearch/deit`` ``main.py`` defaults, timm 0.3.2; ClusTR and Sparsifiner train
with the same script, ``docs/vision.md``): batch 1024, AdamW
(b2 0.999, eps 1e-8), lr 5e-4 * batch / 512, weight decay 0.05 except biases, norms, pos_embed
and cls_token, timm cosine over 300 epochs with 5 warmup epochs from 1e-6 to the peak, min lr
1e-5, then 10 cooldown epochs at the min; drop path 0.1; model EMA 0.99996; DeiT preprocessing
(``clustr_jax.data.imagenet.dataset_config``: RandAugment m9-mstd0.5, random erasing 0.25, mixup
0.8 / cutmix 1.0, label smoothing 0.1, repeated augmentation x3). An epoch is
floor(1,281,167 // 256 * 256 / batch) = 1,251 steps (RASampler).

``cpu``: DeiT-Ti's architecture (12 blocks, width 192, 3 heads) at 64 x 64 px with 16 x 16
patches (17 tokens), trained from scratch on an Imagenette sample (``data_dir``; 1,200 train /
300 val images, 10 classes) for ``steps`` steps of batch 64: lr 1e-3 (5e-4 * 64 / 512 = 6e-5 barely
moves in minutes), warmup over the first tenth of the steps, light augmentation (crop and
flip), no EMA, no drop path.

Args (comma-separated): model=deit_ti|deit_s|deit_b, attention=<any registered mechanism>, cpu,
steps (CPU steps), data_dir, source=folder|tfds.

  python -m clustr_jax.main --config=configs/imagenet/deit.py:model=deit_s,data_dir=/data/imagenet \
      --workdir=workdir/deit_s
  python -m clustr_jax.main \
      --config=configs/imagenet/deit.py:cpu,attention=cast,data_dir=/path/to/imagenette \
      --workdir=workdir/deit_ti_cpu_cast
"""

from configs import common, default
from configs.imagenet import common as recipes


def get_config(arg=None):
  arg = common.parse_arg(arg, model="deit_ti", attention="dense", cpu=False, steps=300,
                               data_dir="", source="folder")
  config = default.get_config()
  config.dataset = recipes.dataset_config(cpu=arg.cpu, data_dir=arg.data_dir or None,
                                           source=arg.source, image_size=64 if arg.cpu else 224)
  patch = 16
  config.model = dict(
      name=arg.model, attention=arg.attention,
      attention_kwargs=recipes.vit_attention_kwargs(arg.attention, config.dataset.image_size,
                                                    patch),
      img_size=config.dataset.image_size, patch_size=patch, drop_path_rate=0.1, dtype="float32")
  config.batch_size = 1024
  config.eval_batch_size = 1024
  recipes.timm_optimizer(config, base_lr=5e-4 * config.batch_size / 512, epochs=300,
                         warmup_epochs=5, cooldown_epochs=10,
                         steps=recipes.steps_per_epoch(config.batch_size))
  config.ema_decay = 0.99996
  recipes.schedule_and_data_workers(config, cpu=arg.cpu)
  if arg.cpu:
    recipes.cpu_variant(config, arg.steps)
    config.ema_decay = None
  return config
