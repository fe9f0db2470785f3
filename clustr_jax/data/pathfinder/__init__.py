"""Pathfinder and Path-X (Linsley et al. 2018; LRA, Tay et al. 2021), by role:

``generator``  the generator (``PathfinderParams``, ``lra_parameters``, ``render_image``) and
               ``generate`` / ``ensure_generated``, which write a set in the release layout.
``release``    ``read_release``: a set in the LRA release layout (``metadata/<k>.npy`` rows,
               ``imgs/<k>/sample_<i>.png``) as uint8 images and int32 labels.
``dataset``    ``split`` (LRA's 80/10/10, seeded) and ``load_dataset(config, workdir)``, the
               train loop's adapter (``config.dataset.name='pathfinder'``, Pathfinder and Path-X).
``__main__``   the command line, ``python -m clustr_jax.data.pathfinder --output_dir=...``.

The public names of ``generator``, ``release`` and ``dataset`` are importable from here
(``pathfinder.render_image``, ``pathfinder.read_release``, ``pathfinder.load_dataset``, ...). The
command line's ``main`` is in ``clustr_jax.data.pathfinder.__main__`` (not imported here, so that
``python -m`` runs it once).
"""

from clustr_jax.data.pathfinder.dataset import (
                                                NUM_CLASSES,
                                                SPLIT_FRACTIONS,
                                                VOCAB_SIZE,
                                                load_dataset,
                                                split,
)
from clustr_jax.data.pathfinder.generator import (
                                                DIFFICULTIES,
                                                GENERATOR_VERSION,
                                                MAX_PAIR_ATTEMPTS,
                                                PathfinderParams,
                                                ensure_generated,
                                                generate,
                                                image_rng,
                                                lra_parameters,
                                                render_image,
)
from clustr_jax.data.pathfinder.release import read_release

__all__ = [
    "DIFFICULTIES", "GENERATOR_VERSION", "MAX_PAIR_ATTEMPTS", "NUM_CLASSES", "PathfinderParams",
    "SPLIT_FRACTIONS", "VOCAB_SIZE", "ensure_generated", "generate", "image_rng", "load_dataset",
    "lra_parameters", "read_release", "render_image", "split",
]
