r"""Sparsifiner DeiT-S: the official two-stage fine-tuning from a dense DeiT-S, and a CPU chain on
Imagenette.

Official (``lim142857/Sparsifiner`` @ 9a11e26, released ``sparsifiner_default_config.yaml``,
``main.py``, ``losses.py``; ``docs/sparsifiner.md``): the student and the teacher
both start from the pretrained DeiT-S; batch 168 x 8 = 1,344; AdamW, weight decay 0.05 (biases
and norms without); model EMA 0.9999; DeiT preprocessing; drop path 0; keep rate 0.25,
n_down = N // 6, c = d // 2.

  stage=recon    (attn_recon, 5 epochs) only the connectivity predictors train, attention mode A,
                 loss 0.01 * L_recon; lr 3e-4 -> 2e-4, 3 warmup epochs from 0.
                 ``init_checkpoint``: the dense DeiT-S (e.g. converted with clustr_jax.convert).
  stage=distill  (cls_distill, 45 epochs) only the backbone trains, attention mode B, loss
                 CE + 0.5 KL(teacher || student) + 0.5 token MSE; lr 8e-5 -> 2e-6, 3
                 warmup epochs from 0. ``init_checkpoint``: stage 1's checkpoints;
                 ``teacher_checkpoint``: the dense DeiT-S.
Both stages use the official schedule, ``utils.cosine_scheduler`` per iteration
(``schedule='warmup_cosine'``: a linear warm-up, then the cosine over the remaining steps; timm's
cosine would count the warm-up inside the cosine). See ``clustr_jax/distill.py`` for the losses,
freezing and EMA.

``cpu``: the same two stages on DeiT-Ti with Sparsifiner attention at 64 x 64 px, 16 x 16 patches
(17 tokens) on an Imagenette sample (``data_dir``),
batch 64, no EMA, light augmentation; the teacher is the
dense DeiT-Ti of ``configs/imagenet/deit.py:cpu`` (its checkpoints by default), which also
initialises stage 1:

  python -m clustr_jax.main --config=configs/imagenet/deit.py:cpu,data_dir=/path/to/imagenette \
      --workdir=workdir/deit_ti_cpu
  python -m clustr_jax.main \
      --config=configs/imagenet/sparsifiner.py:cpu,stage=recon,data_dir=/path/to/imagenette \
      --workdir=workdir/sparsifiner_cpu_recon
  python -m clustr_jax.main \
      --config=configs/imagenet/sparsifiner.py:cpu,stage=distill,data_dir=/path/to/imagenette \
      --workdir=workdir/sparsifiner_cpu_distill

Args: stage=recon|distill, cpu, steps, init_checkpoint, teacher_checkpoint, data_dir,
source=folder|tfds, ema (bool; full runs only).
"""

import ml_collections

from configs import common, default
from configs.imagenet import common as recipes

#: (epochs, warmup epochs, peak lr, final lr) of each stage (the released INDICATOR and yaml).
STAGES = {"recon": (5, 3, 3e-4, 2e-4), "distill": (45, 3, 8e-5, 2e-6)}
CPU_DEFAULTS = {"teacher_checkpoint": "workdir/deit_ti_cpu/checkpoints",
                "recon": "workdir/deit_ti_cpu/checkpoints",
                "distill": "workdir/sparsifiner_cpu_recon/checkpoints"}


def get_config(arg=None):
  arg = common.parse_arg(arg, stage="recon", cpu=False, steps=0, init_checkpoint="",
                               teacher_checkpoint="", data_dir="", source="folder", ema=True)
  if arg.stage not in STAGES:
    raise ValueError(f"stage={arg.stage!r} unknown; valid: {', '.join(STAGES)}")
  epochs, warmup_epochs, peak_lr, final_lr = STAGES[arg.stage]
  config = default.get_config()
  config.dataset = recipes.dataset_config(cpu=arg.cpu, data_dir=arg.data_dir or None,
                                          source=arg.source, image_size=64 if arg.cpu else 224)
  patch = 16
  attention = recipes.vit_attention_kwargs("sparsifiner", config.dataset.image_size, patch)
  model = "deit_ti" if arg.cpu else "deit_s"
  config.model = dict(
      name="deit_ti" if arg.cpu else "sparsifiner_deit_s", attention="sparsifiner",
      attention_kwargs=attention, img_size=config.dataset.image_size, patch_size=patch,
      drop_path_rate=0.0, dtype="float32")
  config.batch_size = 1344
  config.eval_batch_size = 1344
  steps = recipes.steps_per_epoch(config.batch_size)
  recipes.timm_optimizer(config, base_lr=peak_lr, epochs=epochs, warmup_epochs=warmup_epochs,
                         cooldown_epochs=0, steps=steps, min_lr=final_lr, warmup_init_lr=0.0)
  config.schedule = "warmup_cosine"  # Sparsifiner's utils.cosine_scheduler, not timm's.
  config.ema_decay = 0.9999 if arg.ema else None

  init = arg.init_checkpoint or (CPU_DEFAULTS[arg.stage] if arg.cpu else "")
  teacher = arg.teacher_checkpoint or (CPU_DEFAULTS["teacher_checkpoint"] if arg.cpu else "")
  config.distill = default.distill_config(arg.stage)
  config.distill.init_checkpoint = init or None
  # Our dense DeiT names its output projection 'out', Sparsifiner attention 'proj'.
  config.distill.init_rename = {"/attn/out/": "/attn/proj/"}
  config.distill.teacher = dict(
      name=model, attention="dense", img_size=config.dataset.image_size, patch_size=patch,
      dtype="float32", checkpoint=ml_collections.FieldReference(teacher or None,
                                                                field_type=str))
  recipes.schedule_and_data_workers(config, cpu=arg.cpu)

  if arg.cpu:
    config.batch_size = 64
    config.eval_batch_size = 100
    config.ema_decay = None
    config.num_train_steps = arg.steps or (100 if arg.stage == "recon" else 300)
    config.warmup_steps = config.num_train_steps // 10
    config.learning_rate = 1e-3 if arg.stage == "recon" else 2e-4
    config.min_lr = config.learning_rate * final_lr / peak_lr
    config.log_every_steps = 25
    config.eval_every_steps = config.num_train_steps
    config.checkpoint_every_steps = config.num_train_steps
  return config
