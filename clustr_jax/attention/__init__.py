"""Attention mechanisms behind one contract, and the registry that names them.

Every mechanism is a Flax Linen module called as ``module(x, mask=None, *, deterministic=True)``
with x [batch, length, features] and mask bool [batch, length] (True = real token), constructed
with at least ``num_heads`` and ``qkv_features`` (see ``base``). ``get(name)`` returns the class.

  dense        full softmax attention (``dense.py``)
  clustr       ClusTR clustering-guided multi-scale attention, Xie et al. 2022 (``clustr.py``)
  cast         CAST surrogate-token clustered attention, van Engelenhoven et al. 2024 (``cast.py``)
  sparsifiner  Sparsifiner predicted top-k sparse attention, Wei et al. CVPR 2023
               (``sparsifiner.py``)

Adding a mechanism: one file here and one line in ``_REGISTRY``; the shared contract tests in
``tests/test_attention_contract.py`` then run on it.
"""

from __future__ import annotations

import importlib

import flax.linen as nn

# name -> (module, class). Imported lazily, so a mechanism's import cost is paid only when used.
_REGISTRY: dict[str, tuple[str, str]] = {
    "dense": ("clustr_jax.attention.dense", "DenseAttention"),
    "clustr": ("clustr_jax.attention.clustr", "ClusTRAttention"),
    "cast": ("clustr_jax.attention.cast", "CASTAttention"),
    "sparsifiner": ("clustr_jax.attention.sparsifiner", "SparsifinerAttention"),
}


def names() -> tuple[str, ...]:
  """The registered mechanism names."""
  return tuple(_REGISTRY)


def get(name: str) -> type[nn.Module]:
  """Returns the attention module class registered under ``name``.

  Raises:
    ValueError: ``name`` is not registered; the message lists the valid names.
  """
  if name not in _REGISTRY:
    raise ValueError(f"unknown attention {name!r}; valid choices: {', '.join(_REGISTRY)}")
  module_name, class_name = _REGISTRY[name]
  return getattr(importlib.import_module(module_name), class_name)
