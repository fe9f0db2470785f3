r"""LRA Path-X (128 x 128 Pathfinder images, 16,384 tokens): the official LRA Transformer settings,
and a CPU-sized variant.

Official (``lra_benchmarks/image/configs/pathfinder128/{base_pathfinder128_config,
transformer_base}.py``, ``docs/lra.md``): 1 layer, emb 32, 2 heads, qkv 16, MLP 32,
learned positions, MEAN pooling, dropout 0.1 / 0.1, batch 64, 500,000 steps (200 epochs of
160,000 images), Adam(0.9, 0.98, 1e-9), lr 1e-3 * linear_warmup(2,500) * cosine_decay, no
weight decay, gradient clipping at norm 1, evaluation every epoch (2,500 steps). Data: the
``hard`` 128-pixel set (``curv_contour_length_14``) of 200,000 images, split 80/10/10
(``clustr_jax/data/pathfinder/``). Rendering takes about 0.6 CPU-seconds per 128-pixel image
(measured here), some 35 CPU-hours for the set (``--config.dataset.generator.workers=N`` renders
in parallel); the LRA release
(``lra_release/pathfinder128/curv_contour_length_14``, with ``dataset.generate=False``) is read
as it is. Every LRA model, the Transformer included, stays at chance on Path-X ("FAIL").
Pixel value 0 is padding (``model.zero_is_padding=True``, LRA's quirk; False attends every
pixel).

``cpu`` is a smoke-sized run of the Path-X model and optimiser, not a Path-X result: a 16,384-token
dense attention does not fit a CPU, so it uses 32 x 32 images (1,024 tokens) of the ``easy``
32-pixel set (contour length 6), 2,000 images, batch 32 and 200 steps (lr warmup 20); the
model, pooling, positions, clipping and schedule stay those of Path-X.

Args (comma-separated, e.g. ``:cpu,attention=cast``):
  cpu         the CPU-sized variant.
  attention   any registered mechanism (dense, clustr, cast, sparsifiner, ...), sized for the
              length by the mechanism itself (``clustr_jax.attention.sized_for``).
  difficulty  hard (LRA's Path-X) | intermediate | easy.

  python -m clustr_jax.main --config=configs/lra/pathx.py --workdir=/tmp/pathx \
      --config.dataset.data_dir=/data/lra_release/pathfinder128/curv_contour_length_14 \
      --config.dataset.generate=False
  python -m clustr_jax.main --config=configs/lra/pathx.py:cpu --workdir=workdir/pathx_cpu
"""

from configs import common
from configs.lra import common as lra_common


def get_config(arg=None):
  arg = common.parse_arg(arg, cpu=False, attention="dense", difficulty="hard")
  config = lra_common.base_config(
      dataset=lra_common.pathfinder_dataset(128, arg.difficulty, 200_000),
      model=dict(
          name="lra_encoder", emb_dim=32, num_heads=2, qkv_dim=16, mlp_dim=32, num_layers=1,
          dropout_rate=0.1, attention_dropout_rate=0.1, pooling="MEAN",
          learned_position_embedding=True, cls_mask_from_first_token=False, zero_is_padding=True,
          lra_padding=not arg.cpu,
          dtype="float32", attention=arg.attention),
      batch_size=64, num_train_steps=500_000, learning_rate=1e-3,
      schedule="constant*linear_warmup*cosine_decay", warmup_steps=2_500, weight_decay=0.0,
      eval_every_steps=2_500, grad_clip_norm=1.0, checkpoint_every_steps=25_000)

  if arg.cpu:
    config.dataset = lra_common.pathfinder_dataset(32, "easy", 2_000)
    config.batch_size = config.eval_batch_size = 32
    config.num_train_steps = 200
    config.warmup_steps = 20
    config.eval_every_steps = 100
    config.checkpoint_every_steps = 100

  return lra_common.finish(config)
