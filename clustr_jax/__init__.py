"""clustr_jax: efficient self-attention (ClusTR, CAST, Sparsifiner) in JAX/Flax for TPU and GPU.

Subpackages: ``attention`` (the mechanisms and their registry), ``models``, ``data``; the train
loop is ``train.train_and_evaluate`` and its command line ``python -m clustr_jax.main``.
"""

__version__ = "0.1.0"
