"""Loading a library module as it was at an earlier commit, for the A/B benchmark scripts here.

Used by ``clustr_clustering_ab.py`` and ``cast_ab.py`` (with the writer of their outputs); run
them as scripts, so that this directory is on ``sys.path``.
"""

from __future__ import annotations

import csv
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


def write_ab_outputs(rows: list[dict], output: str, title: str, settings: str) -> None:
  """Writes an A/B run's rows to <output>.csv and <output>.md (title, command, settings, table).

  Args:
    rows: one dict per measurement, all with the same keys (the table's columns).
    output: path prefix of the two files.
    title: the Markdown heading; settings: the paragraph under the command line.
  """
  with open(f"{output}.csv", "w", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
  lines = [f"# {title}", "", f"Command: `{' '.join(sys.argv)}`", "", settings, "",
           "| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(rows[0])]
  lines += ["| " + " | ".join(str(v) for v in r.values()) + " |" for r in rows]
  pathlib.Path(f"{output}.md").write_text("\n".join(lines) + "\n")
