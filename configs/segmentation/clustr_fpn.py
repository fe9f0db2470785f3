r"""ClusTR-T/S/B + Semantic FPN on ADE20K (PVT's recipe) or CamVid; a CPU variant on the CamVid
sample.

PVT's Semantic FPN recipe on ADE20K (Wang et al., "Pyramid Vision Transformer", ICCV 2021,
section 5.3: "AdamW ... initial learning rate 1e-4 ... poly ... power 0.9 ... 80k iterations
... batch size of 16 ... random resize, crop 512 x 512"; official ``whai362/PVT``
``segmentation/configs/sem_fpn/PVT/fpn_pvt_s_ade20k_40k.py`` and ``_base_/datasets/ade20k.py``,
which trains the equivalent 40k iterations of batch 32 at lr 2e-4 on 8 GPUs): AdamW (b 0.9,
0.999, eps 1e-8), lr 1e-4, weight decay 1e-4 on every parameter (no ``paramwise_cfg``), poly
schedule power 0.9 to 0 without warm-up, 80,000 iterations of batch 16, no gradient clipping;
mmsegmentation's ADE20K pipeline (resize (2048, 512) x U(0.5, 2.0), 512 x 512 crops with
cat_max_ratio 0.75, flip, photometric distortion); evaluation on the whole image resized to
short side 512 (long side <= 2048; PVT's ``AlignResize`` to multiples of 32), here on a 512 x 704
canvas (4:3 images whole; wider ones shrink to fit); backbone drop path 0.1 (PVT's
``pvt_small``). The backbone starts from an ImageNet checkpoint: ``--config.init_checkpoint=``
(a ClusTR classifier's run or a converted official checkpoint; ``init_prefix='backbone'``).

CamVid (``dataset=camvid``): the same optimiser and head on the SegNet release at its 480 x 360:
resize (480, 360) x U(0.5, 2.0), 360 x 480 crops, evaluation at 384 x 480 (360 aligned to 32).

``cpu``: ClusTR-T-sized runs on the CamVid sample (150 train / 50 val pairs, ``--config.
dataset.data_dir``): images at half size (240 x 180) x U(0.5, 2.0), 128 x 128 crops, batch 8,
``steps`` steps from scratch (no ImageNet checkpoint on a CPU box) at lr 1e-3 with warm-up over
the first tenth, no drop path; evaluation at 256 x 192 (180 x 240 aligned to 32); val = test =
the sample's val folder.

Args: dataset=ade20k|camvid, backbone=clustr_t|clustr_s|clustr_b, attention=<a registered
mechanism for stages 1-3> (default clustr; stage 4 is always full attention), cpu, steps.

  python -m clustr_jax.main --config=configs/segmentation/clustr_fpn.py:backbone=clustr_s \
      --config.dataset.data_dir=/data/ADEChallengeData2016 \
      --config.init_checkpoint=/ckpt/clustr_s --workdir=workdir/clustr_s_fpn_ade20k
  python -m clustr_jax.main --config=configs/segmentation/clustr_fpn.py:cpu,attention=dense \
      --config.dataset.data_dir=/path/to/CamVid --workdir=workdir/dense_fpn_camvid_cpu
"""

import ml_collections

from clustr_jax import attention as attention_lib
from configs import common, default

BACKBONES = ("clustr_t", "clustr_s", "clustr_b")
DATASETS = ("ade20k", "camvid")


def dataset_config(name: str, cpu: bool) -> ml_collections.ConfigDict:
  """``config.dataset`` (``clustr_jax/data/segmentation.py`` ``Options`` and the splits)."""
  if name == "ade20k":
    sizes = dict(scale=(2048, 512), crop_size=(512, 512), eval_scale=(2048, 512),
                 eval_size=(512, 704),
                 splits=dict(train="training", val="validation", test="validation"))
  elif cpu:
    sizes = dict(scale=(240, 180), crop_size=(128, 128), eval_scale=(240, 180),
                 eval_size=(192, 256), splits=dict(train="train", val="val", test="val"))
  else:
    sizes = dict(scale=(480, 360), crop_size=(360, 480), eval_scale=(480, 360),
                 eval_size=(384, 480), splits=dict(train="train", val="val", test="test"))
  return ml_collections.ConfigDict(dict(
      name=name, data_dir="", ratio_range=(0.5, 2.0), cat_max_ratio=0.75, hflip=0.5,
      photometric=True, size_divisor=32, read_threads=2 if cpu else 8, **sizes))


def get_config(arg=None):
  arg = common.parse_arg(arg, dataset="ade20k", backbone="clustr_t", attention="clustr",
                         cpu=False, steps=300)
  if arg.backbone not in BACKBONES:
    raise ValueError(f"backbone={arg.backbone!r} unknown; valid: {', '.join(BACKBONES)}")
  if arg.attention not in attention_lib.names():
    raise ValueError(f"attention={arg.attention!r} unknown; valid: "
                     f"{', '.join(attention_lib.names())}")
  dataset = "camvid" if arg.cpu else arg.dataset
  if dataset not in DATASETS:
    raise ValueError(f"dataset={arg.dataset!r} unknown; valid: {', '.join(DATASETS)}")
  config = default.get_config()
  config.dataset = dataset_config(dataset, arg.cpu)
  config.model = dict(name=f"{arg.backbone}_fpn", attention=arg.attention, drop_path_rate=0.1,
                      test_mode="whole", dtype="float32")
  # The mechanisms' settings are sized for the train crop (CAST's surrogates, Sparsifiner's
  # predictor depend on the token count), also when evaluating at eval_size; follows crop_size.
  config.model.attention_size = config.dataset.get_ref("crop_size")
  config.init_prefix = "backbone"
  config.batch_size = 16
  config.eval_batch_size = 16
  config.num_train_steps = 80_000
  config.optimizer = "adamw"
  config.learning_rate = 1e-4
  config.weight_decay = 1e-4
  config.schedule = "poly"
  config.poly_power = 0.9
  config.min_lr = 0.0
  config.warmup_steps = 0
  config.log_every_steps = 50
  config.eval_every_steps = 8_000
  config.checkpoint_every_steps = 8_000
  if arg.cpu:
    config.model.drop_path_rate = 0.0
    config.batch_size = 8
    config.eval_batch_size = 10
    config.num_train_steps = arg.steps
    config.learning_rate = 1e-3
    config.warmup_steps = max(1, arg.steps // 10)
    config.log_every_steps = 10
    config.eval_every_steps = arg.steps
    config.checkpoint_every_steps = arg.steps
  return config
