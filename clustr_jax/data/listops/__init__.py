"""ListOps (Nangia & Bowman 2018) as used by the Long Range Arena, by role:

``generator``  LRA's tree generator (seeded), ``ensure_generated`` (generate and write the files
               unless present) and ``evaluate``, an independent evaluator used as the oracle.
``release``    the files: ``{task}_{train,val,test}.tsv`` read and written, LRA's tokenizer with
               the fixed ``VOCAB`` (pad 0, tokens 1..15, out-of-vocabulary 16).
``dataset``    ``load_dataset(config, workdir)``, the train loop's adapter
               (``config.dataset.name='listops'``).
``__main__``   the command line, ``python -m clustr_jax.data.listops --output_dir=...``.

The public names of ``generator``, ``release`` and ``dataset`` are importable from here
(``listops.generate``, ``listops.read_tsv``, ``listops.load_dataset``, ...). A module-level
setting such as ``MAX_TRIALS_WITHOUT_NEW`` is read by the module that defines it: patch it there
(``listops.generator.MAX_TRIALS_WITHOUT_NEW``), not here.
"""

from clustr_jax.data.listops.dataset import load_dataset
from clustr_jax.data.listops.generator import (
                                               GENERATOR_VERSION,
                                               MAX_TRIALS_WITHOUT_NEW,
                                               TREES_PER_DRAW,
                                               ensure_generated,
                                               evaluate,
                                               generate,
)
from clustr_jax.data.listops.release import (
                                               DIGITS,
                                               END,
                                               NUM_CLASSES,
                                               OOV_ID,
                                               OOV_TOKEN,
                                               OPERATORS,
                                               PAD_ID,
                                               PAD_TOKEN,
                                               SPLITS,
                                               VOCAB,
                                               VOCAB_SIZE,
                                               load_splits,
                                               read_tsv,
                                               split_paths,
                                               tokenize,
                                               write_tsv,
)

__all__ = [
    "DIGITS", "END", "GENERATOR_VERSION", "MAX_TRIALS_WITHOUT_NEW", "NUM_CLASSES", "OOV_ID",
    "OOV_TOKEN", "OPERATORS", "PAD_ID", "PAD_TOKEN", "SPLITS", "TREES_PER_DRAW", "VOCAB",
    "VOCAB_SIZE", "ensure_generated", "evaluate", "generate", "load_dataset", "load_splits",
    "read_tsv", "split_paths", "tokenize", "write_tsv",
]
