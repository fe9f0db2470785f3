"""Pathfinder / Path-X sets in the LRA release layout: the reader.

Sources (``docs/lra.md``, "The Pathfinder generator"; ``docs/data_formats.md``, Pathfinder):
  * The LRA release layout, read by ``read_release``::

      <root>/metadata/<k>.npy         plain text despite the extension: one row per image,
                                      "imgs/<k> sample_<i>.png <i> <label> <continuity> ..."
      <root>/imgs/<k>/sample_<i>.png  8-bit grayscale

    with ``<root>`` e.g. ``lra_release/pathfinder32/curv_contour_length_14``.

``generator.generate`` writes this layout too.

Zero-byte images (one in the release, ``pathfinder32/curv_baseline/imgs/0/sample_172.png``) are
dropped with a warning, as LRA's builder and S4's reader drop them; every other unreadable image
is an error naming the file and the metadata line.
"""

from __future__ import annotations

import os
import pathlib
from collections.abc import Iterator

import numpy as np
from absl import logging
from PIL import Image
from tqdm import tqdm


def _metadata_files(root: pathlib.Path) -> list[pathlib.Path]:
  """``root/metadata/*.npy`` in numeric order of their names (0, 1, ..., 10, ...)."""
  directory = root / "metadata"
  if not directory.is_dir():
    raise FileNotFoundError(f"Pathfinder metadata directory missing: {directory} (expected "
                            f"<root>/metadata/<k>.npy and <root>/imgs/<k>/sample_<i>.png)")
  files = sorted(directory.glob("*.npy"), key=lambda p: (not p.stem.isdigit(),
                                                         int(p.stem) if p.stem.isdigit() else 0,
                                                         p.name))
  if not files:
    raise FileNotFoundError(f"no metadata files {directory}/*.npy")
  return files


def _records(root: pathlib.Path) -> Iterator[tuple[str, pathlib.Path, int]]:
  """(``<metadata file>:<line>``, image path, label) of every row, in file and line order."""
  for path in _metadata_files(root):
    try:
      text = path.read_text(encoding="ascii")
    except UnicodeDecodeError as e:
      raise ValueError(f"{path}: not a text metadata file ({e}); the release's metadata/*.npy "
                       f"files are plain text") from None
    for line_number, line in enumerate(text.splitlines(), start=1):
      if not line.strip():
        continue
      where = f"{path}:{line_number}"
      fields = line.split()
      if len(fields) < 4:
        raise ValueError(f"{where}: expected at least 4 space-separated fields (sub-directory, "
                         f"file, index, label, ...), found {len(fields)}: {line[:80]!r}")
      if fields[3] not in ("0", "1"):
        raise ValueError(f"{where}: label (field 4) {fields[3]!r} is not 0 or 1")
      yield where, root / fields[0] / fields[1], int(fields[3])


def read_release(root: str | os.PathLike, resolution: int, *,
                 progress: bool = False) -> tuple[np.ndarray, np.ndarray]:
  """Reads a Pathfinder set in the LRA release layout (module docstring).

  Args:
    root: the set's directory, e.g. ``lra_release/pathfinder32/curv_contour_length_14``.
    resolution: the expected image side (32, 64, 128, 256).
    progress: show a tqdm progress bar.

  Returns:
    (images uint8 [n, resolution, resolution], labels int32 [n]) in metadata-file order
    (numeric file names), then line order. Zero-byte images are left out, with a warning.

  Raises:
    FileNotFoundError: no metadata directory or files, or an image a row names is missing (the
      message gives the metadata file and line, and the image path).
    ValueError: a malformed row (fewer than 4 fields, a label not 0/1), an image that does not
      decode (e.g. truncated), is not 8-bit grayscale of ``resolution`` x ``resolution``, or no
      images at all; each message starts with ``<metadata file>:<line>:``.
  """
  root = pathlib.Path(root)
  records = list(_records(root))
  images = np.zeros((len(records), resolution, resolution), np.uint8)
  labels = np.zeros((len(records),), np.int32)
  n = 0
  skipped = []
  for where, path, label in tqdm(records, unit="img", desc=f"Reading {root.name}",
                                 disable=not progress):
    try:
      size = path.stat().st_size
    except FileNotFoundError:
      raise FileNotFoundError(f"{where}: image {path} is missing") from None
    if size == 0:
      skipped.append(str(path))
      continue
    try:
      with Image.open(path) as image:
        image.load()
        mode, shape, pixels = image.mode, image.size, np.asarray(image)
    except (OSError, SyntaxError, ValueError) as e:
      raise ValueError(f"{where}: image {path} does not decode ({e})") from None
    if mode != "L" or shape != (resolution, resolution):
      raise ValueError(f"{where}: image {path} is {shape[0]}x{shape[1]} mode {mode!r}; expected "
                       f"{resolution}x{resolution} 8-bit grayscale ('L')")
    images[n], labels[n] = pixels, label
    n += 1
  if skipped:
    logging.warning("Pathfinder: left out %d empty image file(s) (as LRA and S4 do): %s",
                    len(skipped), ", ".join(skipped[:5]) + (" ..." if len(skipped) > 5 else ""))
  if n == 0:
    raise ValueError(f"{root}: no images")
  return images[:n], labels[:n]
