"""Loading a library module as it was at an earlier commit, for the A/B benchmark scripts here.

Used by ``clustr_clustering_ab.py`` and ``cast_ab.py`` (run them as scripts: this directory is
then on ``sys.path``).
"""

from __future__ import annotations

import importlib.util
import pathlib
import subprocess
import sys
import tempfile

REPO = pathlib.Path(__file__).resolve().parents[2]


def load_baseline(commit: str, source: str):
  """The module file ``source`` (a path in the repository) as of ``commit``.

  It is imported under the name ``<file stem>_baseline`` and may import the current library
  (e.g. ``clustr_jax.attention.base``).

  Raises:
    subprocess.CalledProcessError: ``commit`` or the file at it does not exist.
  """
  text = subprocess.run(["git", "-C", str(REPO), "show", f"{commit}:{source}"], check=True,
                        capture_output=True, text=True).stdout
  name = f"{pathlib.Path(source).stem}_baseline"
  path = pathlib.Path(tempfile.mkdtemp()) / f"{name}.py"
  path.write_text(text)
  spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(spec)
  sys.modules[spec.name] = module
  spec.loader.exec_module(module)
  return module
