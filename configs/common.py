"""Config-time helpers shared by every config file: big_vision-style arguments, and loading.

A config file's ``get_config(arg)`` receives the text after ``:`` in ``--config=path.py:arg``: a
comma-separated list of flags and ``key=value`` pairs, e.g. ``cpu,attention=cast``. ``load``
builds a config from such a spec as ``--config`` does, for notebooks, sweeps and tests.
"""

from __future__ import annotations

import importlib.util
import pathlib

import ml_collections


def parse_arg(arg: str | None, **defaults) -> ml_collections.ConfigDict:
  """Parses ``arg`` against ``defaults`` (name -> default value, whose type is kept).

  A bare ``name`` sets a bool default to True; ``name=value`` converts ``value`` to the
  default's type (bools accept true/false/1/0/yes/no).

  Raises:
    ValueError: an unknown name (the message lists the valid ones), a bare name whose default is
      not a bool, or a value that does not convert.
  """
  result = ml_collections.ConfigDict(defaults)
  if not arg:
    return result
  for item in arg.split(","):
    item = item.strip()
    if not item:
      continue
    name, sep, value = item.partition("=")
    name = name.strip()
    if name not in defaults:
      raise ValueError(f"config arg {name!r} unknown; valid: {', '.join(sorted(defaults))}")
    default = defaults[name]
    if not sep:
      if not isinstance(default, bool):
        raise ValueError(f"config arg {name!r} needs a value ({name}=...)")
      result[name] = True
      continue
    value = value.strip()
    try:
      if isinstance(default, bool):
        lowered = value.lower()
        if lowered not in ("true", "false", "1", "0", "yes", "no"):
          raise ValueError(value)
        result[name] = lowered in ("true", "1", "yes")
      elif default is None:
        result[name] = value
      else:
        result[name] = type(default)(value)
    except ValueError:
      raise ValueError(
          f"config arg {name}={value!r}: expected a {type(default).__name__}") from None
  return result


#: The installed ``configs`` package (the config files ship with clustr_jax).
CONFIGS_DIR = pathlib.Path(__file__).resolve().parent


def resolve(path: str | pathlib.Path) -> pathlib.Path:
  """A config file's path: ``path`` itself if it exists, else the same path inside the installed
  ``configs`` package (``configs/lra/listops.py`` and ``lra/listops.py`` both name
  ``<configs>/lra/listops.py``), so a spec works from any directory.

  Raises:
    FileNotFoundError: neither exists (the message gives both paths).
  """
  path = pathlib.Path(path)
  if path.is_file():
    return path
  parts = path.parts[1:] if path.parts[:1] == ("configs",) else path.parts
  packaged = CONFIGS_DIR.joinpath(*parts)
  if not path.is_absolute() and packaged.is_file():
    return packaged
  raise FileNotFoundError(f"config file not found: {path} (nor {packaged})")


def load(spec: str, *, lock: bool = True) -> ml_collections.ConfigDict:
  """Loads ``path/to/config.py[:arg]`` as ``--config`` does (for notebooks, sweeps and tests).

  ``path`` is resolved by ``resolve``. The config comes back locked (``lock``): keys can be
  changed, a mistyped key cannot be added.

  Raises:
    FileNotFoundError: the config file does not exist (the message gives the path).
    AttributeError: the file defines no ``get_config``.
  """
  path, _, arg = spec.partition(":")
  path = resolve(path)
  module_spec = importlib.util.spec_from_file_location(path.stem, path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  if not hasattr(module, "get_config"):
    raise AttributeError(f"config file {path} defines no get_config(arg)")
  config = module.get_config(arg or None)
  if lock:
    config.lock()
  return config
