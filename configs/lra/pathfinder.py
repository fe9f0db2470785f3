r"""LRA Pathfinder (32 x 32 images, 1,024 tokens): the official LRA Transformer settings, and a
CPU-sized variant.

Official (``lra_benchmarks/image/configs/pathfinder32/{base_pathfinder32_config,
transformer_base}.py``, ``docs/lra.md``): 4 layers, emb 32, 4 heads, qkv 16, MLP 32,
sinusoidal positions, MEAN pooling, dropout 0.2 / attention dropout 0.1, batch 512, 62,400 steps
(200 epochs of 160,000 images), Adam(0.9, 0.98, 1e-9), lr 1e-3 * linear_warmup(312) *
cosine_decay, no weight decay, evaluation every epoch (312 steps). Data: the ``hard`` set
(``curv_contour_length_14``) of 200,000 images, split 80/10/10 (``clustr_jax/data/pathfinder/``),
rendered here first unless ``dataset.data_dir`` points at the LRA release
(``lra_release/pathfinder32/curv_contour_length_14``, with ``dataset.generate=False``). LRA's
Transformer reaches 71.40% test accuracy; users report ~50% with these sinusoidal positions and
~70% with learned ones (LRA issues #15 / #60): ``--config.model.learned_position_embedding=True``.
Pixel value 0 is padding (``model.zero_is_padding=True``, LRA's quirk of its ``inputs > 0``
mask), so black pixels take no part in attention and MEAN pooling averages the non-black pixels;
``--config.model.zero_is_padding=False`` attends every pixel.

``cpu`` (measured: test accuracy 0.663 against chance 0.5, 0.73 steps/s and 21.5 minutes with
generation on 2 CPU cores shared with five other jobs; experiments/lra/results/
pathfinder_cpu_dense.json) differs, because 1,024-token Pathfinder needs tens of thousands of
large-batch steps before it leaves chance: 16 x 16 images (256 tokens) of an easier set drawn by
the same generator with LRA's 32-pixel paddles (length 2, thickness 0.5, margin 1, continuity 1,
contrasts 2 / 0.75, antialiasing 2, marker radius 1.5) but contours of 2 paddles, no
distractors, seed distance 3; 6,000 images; a 1-layer model of width 64 (4 heads, qkv 64,
MLP 128) with learned positions, no dropout; batch 32, 800 steps, lr 2e-3 * warmup(100) * cosine.

Args (comma-separated, e.g. ``:cpu,attention=cast``):
  cpu         the CPU-sized variant.
  attention   any registered mechanism (dense, clustr, cast, sparsifiner, ...), sized for the
              length by the mechanism itself (``clustr_jax.attention.sized_for``).
  difficulty  hard (LRA's Pathfinder) | intermediate | easy: contour length 14 / 9 / 6.

  python -m clustr_jax.main --config=configs/lra/pathfinder.py:cpu --workdir=workdir/pathfinder_cpu
  python -m clustr_jax.main --config=configs/lra/pathfinder.py --workdir=/tmp/pathfinder
  python -m clustr_jax.main --config=configs/lra/pathfinder.py --workdir=/tmp/pf \
      --config.dataset.data_dir=/data/lra_release/pathfinder32/curv_contour_length_14 \
      --config.dataset.generate=False
"""

from configs import common
from configs.lra import common as lra_common


def get_config(arg=None):
  arg = common.parse_arg(arg, cpu=False, attention="dense", difficulty="hard")
  config = lra_common.base_config(
      dataset=lra_common.pathfinder_dataset(32, arg.difficulty, 200_000),
      model=dict(
          name="lra_encoder", emb_dim=32, num_heads=4, qkv_dim=16, mlp_dim=32, num_layers=4,
          dropout_rate=0.2, attention_dropout_rate=0.1, pooling="MEAN",
          learned_position_embedding=False, cls_mask_from_first_token=False, zero_is_padding=True,
          lra_padding=not arg.cpu,
          dtype="float32", attention=arg.attention),
      batch_size=512, num_train_steps=62_400, learning_rate=1e-3,
      schedule="constant*linear_warmup*cosine_decay", warmup_steps=312, weight_decay=0.0,
      eval_every_steps=312, checkpoint_every_steps=3_120)

  if arg.cpu:
    config.dataset.resolution = 16
    config.dataset.max_length = 256
    config.dataset.generator.update(contour_length=2, num_distractor_snakes=0, seed_distance=3,
                                    num_images=6_000, workers=2)
    config.model.update(emb_dim=64, num_heads=4, qkv_dim=64, mlp_dim=128, num_layers=1,
                        dropout_rate=0.0, attention_dropout_rate=0.0,
                        learned_position_embedding=True)
    config.batch_size = config.eval_batch_size = 32
    config.num_train_steps = 800
    config.learning_rate = 2e-3
    config.warmup_steps = 100
    config.eval_every_steps = 250
    config.checkpoint_every_steps = 250
    config.log_every_steps = 50

  return lra_common.finish(config)
