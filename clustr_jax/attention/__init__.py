"""Attention mechanisms behind one contract, and the registry that names them.

Every mechanism is a Flax Linen module called as ``module(x, mask=None, *, deterministic=True)``
with x [batch, length, features] and mask bool [batch, length] (True = real token), constructed
with at least ``num_heads`` and ``qkv_features`` (see ``base``), and states its own settings for
where it runs with the classmethod ``sized_for(length, *, grid=None, cls_token=None,
sr_ratio=None, budget=None) -> dict`` (see ``sized_for`` below; ``Budget`` is the parameter
allowance of an LRA comparison). ``get(name)`` returns the class.

  dense        full softmax attention (``dense.py``)
  clustr       ClusTR clustering-guided multi-scale attention, Xie et al. 2022 (``clustr.py``)
  cast         CAST surrogate-token clustered attention, van Engelenhoven et al. 2024 (``cast.py``)
  sparsifiner  Sparsifiner predicted top-k sparse attention, Wei et al. CVPR 2023
               (``sparsifiner.py``)

This registry is the only list of mechanism names: configs and models ask it. Adding a mechanism
is one file here and one line in ``_REGISTRY`` (``docs/adding_a_mechanism.md``); the contract
tests (``tests/test_attention_contract.py``) and every config file then run with it.
"""

from __future__ import annotations

import dataclasses
import importlib
from typing import Any

import flax.linen as nn

# name -> "module:Class". Imported lazily, so a mechanism's import cost is paid only when used.
_REGISTRY: dict[str, str] = {
    "dense": "clustr_jax.attention.dense:DenseAttention",
    "clustr": "clustr_jax.attention.clustr:ClusTRAttention",
    "cast": "clustr_jax.attention.cast:CASTAttention",
    "sparsifiner": "clustr_jax.attention.sparsifiner:SparsifinerAttention",
}


@dataclasses.dataclass(frozen=True)
class Budget:
  """The parameters a mechanism may add per attention layer in a comparison with dense attention.

  LRA's rule (``docs/lra.md``, "Parameter budgets"): an efficient model stays within +10 % of the
  dense Transformer's parameters. ``configs/lra/common.py`` turns that into an allowance per
  layer; a mechanism's ``sized_for`` chooses settings whose parameters beyond a bias-free dense
  attention of the same widths (q, k, v [features, qkv_features] and out [qkv_features,
  features]) stay within ``extra_parameters``, where its method allows it.

  Attributes:
    features: the model width C (the attention's input and output width).
    qkv_features: the total query/key/value width H d.
    num_heads: H.
    extra_parameters: parameters allowed per attention layer beyond the dense attention's.
    num_layers: the model's attention layers (a mechanism that can share parameters between
      its layers counts a shared parameter as 1 / num_layers per layer).
  """
  features: int
  qkv_features: int
  num_heads: int
  extra_parameters: int
  num_layers: int = 1


def names() -> tuple[str, ...]:
  """The registered mechanism names."""
  return tuple(_REGISTRY)


def register(name: str, target: str | type[nn.Module]) -> None:
  """Registers ``target`` (a class, or ``'module:Class'``) under ``name`` for this process, as a
  line in ``_REGISTRY`` does (for notebooks and tests; a mechanism of the package belongs in
  ``_REGISTRY``).

  Raises:
    ValueError: ``name`` is already registered.
  """
  if name in _REGISTRY:
    raise ValueError(f"attention {name!r} is already registered ({_REGISTRY[name]})")
  _REGISTRY[name] = target


def get(name: str) -> type[nn.Module]:
  """Returns the attention module class registered under ``name``.

  Raises:
    ValueError: ``name`` is not registered; the message lists the valid names.
  """
  if name not in _REGISTRY:
    raise ValueError(f"unknown attention {name!r}; valid choices: {', '.join(_REGISTRY)}")
  target = _REGISTRY[name]
  if not isinstance(target, str):
    return target
  module_name, class_name = target.split(":")
  return getattr(importlib.import_module(module_name), class_name)


def sized_for(name: str, length: int, *, grid: tuple[int, int] | None = None,
              cls_token: bool | None = None, sr_ratio: int | None = None,
              budget: Budget | None = None) -> dict[str, Any]:
  """The settings (constructor keywords) mechanism ``name`` chooses for where it runs.

  Args:
    name: a registered mechanism.
    length: tokens N the module sees (a CLS token included).
    grid: None for a 1-D sequence (e.g. an LRA task), or (h, w) image patches of a ViT or of a
      pyramid stage.
    cls_token: whether the first token is a CLS token (None: not stated; the module's default).
    sr_ratio: the spatial-reduction ratio of a ClusTR-pyramid stage (None: not in a pyramid).
    budget: the parameter allowance per attention layer (``Budget``; None: no allowance stated,
      the mechanism's own sizing). Where the method cannot fit it, the mechanism returns its
      nearest settings and the config states the overhead (``configs/lra/common.py``).

  Returns:
    A dict of the mechanism's own constructor keywords; options given in a config
    (``attention_kwargs``) override them.

  Raises:
    ValueError: unknown ``name``, or ``length`` < 1.
  """
  if length < 1:
    raise ValueError(f"attention.sized_for({name!r}): length must be >= 1; got {length}")
  return dict(get(name).sized_for(length, grid=grid, cls_token=cls_token, sr_ratio=sr_ratio,
                                  budget=budget))
