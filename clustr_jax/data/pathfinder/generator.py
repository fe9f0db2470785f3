"""The Pathfinder / Path-X generator (Linsley et al. 2018; LRA, Tay et al. 2021).

A Pathfinder image shows two target contours, a few distractor contours and two marker disks; the
label says whether both markers sit on the same contour (1) or not (0). Contours are chains of
short line segments ("paddles") separated by small gaps. LRA's "Pathfinder" is the 32 x 32
``hard`` set (1,024 tokens), "Path-X" the 128 x 128 ``hard`` set (16,384 tokens).

Sources (``docs/lra.md``, "The Pathfinder generator"; ``docs/data_formats.md``, Pathfinder):
  * The generator of ``drewlinsley/pathfinder`` @ 7b538865 (``snakes2.py``, ``snakes.py``), with
    LRA's parameters from the docstrings of ``lra_benchmarks/data/pathfinder.py``
    (``lra_parameters``).

The algorithm (``render_image``), for one image:
  1. label ~ Bernoulli(0.5); margin m uniform from ``paddle_margin_list``.
  2. Two target contours of ``contour_length`` paddles. The first one's tail is a uniformly drawn
     free pixel at least ``2 * seed_distance`` from the border (and ``padding`` from it, and such
     that its first paddle, of integer-degree orientation in [-180, 180), covers no occupied
     pixel); the second one's tail lies ``seed_distance`` away at a random integer-degree angle.
     Both then grow alternately: the next pivot is ``paddle_length + 2 m`` beyond the last one
     along the last orientation; the candidate heads are the pixels on the circle of radius
     ``paddle_length + m`` around it, weighted by (1 - occupancy dilated by m) *
     max(cos(min(turn * continuity, pi / 2)), 0) ** 2 and sampled by inverse CDF; a paddle from
     the head back towards the pivot is kept if its margin-dilated mask does not overlap the
     occupancy (max(occupancy + mask) < 1.8), with ``max_paddle_retrial`` retries. A failed
     contour resamples the pair.
  3. ``num_distractor_snakes`` distractor contours of ``distractor_length`` paddles, seeded anywhere
     free (1 px from the border), ``max_distractor_contour_retrial`` retries each, skipped when
     they fail, and none once less than 1% of the pixels are free.
  4. A marker disk of ``marker_radius`` on the tail of a random target contour and one on the head
     of the same contour (label 1) or of the other one (label 0).
  5. Paddles and disks are drawn at ``antialias_scale`` x resolution and Lanczos-downsampled; the
     image is the pixelwise max of all strokes (targets at contrast ``snake * paddle``, distractors
     at ``snake``, markers at 1), min-max scaled to 0..255 and rounded to uint8.

Choices where the official code leaves one open, or is broken (each documented where it acts):
  * Sampling uses ``numpy.random.default_rng((seed, batch, index))`` per image, so a set is
    reproducible and the same whatever the number of worker processes; the official stream
    (global ``np.random``, unseeded) cannot be reproduced anyway.
  * Downsampling follows the original ``scipy.misc.imresize`` (uint8 image, PIL Lanczos, /255).
    The current repository's PIL replacement resizes markers as float and then divides them by
    255 again, so its markers almost vanish; that is not reproduced.
  * Contour lengths are integers: ``distractor_length = contour_length // 3`` and
    ``num_distractor_snakes = base // distractor_length`` (base 20/22/35/30 at 32/64/128/256 px),
    Python 2's integer division, in which the generator was written (a float
    ``distractor_length`` cannot be a paddle count).
  * The official loop resamples a failed target pair forever; here it gives up with an error
    after ``MAX_PAIR_ATTEMPTS``.
  * Kept as published: a new paddle is checked against an occupancy that holds neither its own
    contour's previous paddle nor the other target's newest one, so the two target contours can
    cross at their growing ends; the second target tail is not checked against the first
    contour; the first target's last paddle never enters the occupancy (distractors may touch
    it); the seeding structure element is offset by one pixel from its anchor. So the label is
    the generator's (which contour carries the second marker), not always decidable from pixel
    connectivity alone.

``generate`` writes a set in the LRA release layout (``release``: ``imgs/<k>/sample_<i>.png`` and
one ``metadata/<k>.npy`` row per image); ``ensure_generated`` does so unless the directory
already holds that set, and resumes an interrupted one.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import multiprocessing
import os
import pathlib
import uuid

import numpy as np
from absl import logging
from PIL import Image, ImageDraw
from scipy import ndimage
from tqdm import tqdm

from clustr_jax import data as data_lib

GENERATOR_VERSION = 1  # Stored with generated sets; bump when the same seed gives other images.
# LRA release directory names of the three difficulties, and their contour lengths.
DIFFICULTIES = {"easy": ("curv_baseline", 6), "intermediate": ("curv_contour_length_9", 9),
                "hard": ("curv_contour_length_14", 14)}
MAX_PAIR_ATTEMPTS = 10_000
# A paddle is rejected where occupancy + its dilated mask reaches this (official threshold).
_OVERLAP_THRESHOLD = 1.8
# A pixel counts as free for seeding where the (dilated) occupancy is at most this.
_FREE_THRESHOLD = 0.3
# Distractors stop once fewer than this fraction of the pixels are free.
_STOP_AVAILABILITY = 0.01


@dataclasses.dataclass(frozen=True)
class PathfinderParams:
  """The generator's parameters (names as the official ``snakes2_wrapper.Args``).

  Lengths and distances are in output pixels; ``antialias_scale * paddle_thickness`` must be an
  integer (the paddle width at the drawing resolution).

  Raises:
    ValueError: a value outside its range (the message names the field).
  """
  window_size: int
  padding: int
  antialias_scale: int
  paddle_margin_list: tuple[int, ...]
  seed_distance: int
  marker_radius: float
  contour_length: int
  distractor_length: int
  num_distractor_snakes: int
  paddle_length: int
  paddle_thickness: float
  continuity: float
  snake_contrast_list: tuple[float, ...]
  paddle_contrast_list: tuple[float, ...]
  max_distractor_contour_retrial: int = 4
  max_paddle_retrial: int = 2

  def __post_init__(self):
    for name in ("paddle_margin_list", "snake_contrast_list", "paddle_contrast_list"):
      object.__setattr__(self, name, tuple(getattr(self, name)))
      if not getattr(self, name):
        raise ValueError(f"PathfinderParams.{name} is empty")
    positive = ("window_size", "padding", "antialias_scale", "seed_distance", "contour_length",
                "paddle_length")
    for name in positive:
      if getattr(self, name) < 1:
        raise ValueError(f"PathfinderParams.{name} must be >= 1; got {getattr(self, name)}")
    nonnegative = ("distractor_length", "num_distractor_snakes", "max_distractor_contour_retrial",
                   "max_paddle_retrial")
    for name in nonnegative:
      if getattr(self, name) < 0:
        raise ValueError(f"PathfinderParams.{name} must be >= 0; got {getattr(self, name)}")
    if self.num_distractor_snakes and not self.distractor_length:
      raise ValueError("PathfinderParams.distractor_length must be >= 1 when "
                       "num_distractor_snakes > 0")
    if min(self.paddle_margin_list) < 0:
      raise ValueError(f"PathfinderParams.paddle_margin_list must be >= 0; got "
                       f"{self.paddle_margin_list}")
    width = self.paddle_thickness * self.antialias_scale
    if width < 1 or width != round(width):
      raise ValueError(f"PathfinderParams: paddle_thickness * antialias_scale = {width} must be a "
                       f"positive integer")
    if self.marker_radius <= 0 or self.continuity <= 0:
      raise ValueError("PathfinderParams.marker_radius and continuity must be > 0")
    if 4 * self.seed_distance >= self.window_size:
      raise ValueError(f"PathfinderParams.seed_distance={self.seed_distance} leaves no seed "
                       f"position in a {self.window_size}-pixel window (needs 4 * seed_distance "
                       f"< window_size)")


def lra_parameters(resolution: int = 32, difficulty: str = "hard") -> PathfinderParams:
  """LRA's parameters (``lra_benchmarks/data/pathfinder.py``; ``docs/lra.md``, "The Pathfinder
  generator").

  Args:
    resolution: 32 (Pathfinder), 64, 128 (Path-X) or 256.
    difficulty: 'easy' (contour length 6), 'intermediate' (9) or 'hard' (14, LRA's choice).

  Raises:
    ValueError: another resolution or difficulty.
  """
  presets = {  # padding, seed_distance, margins, marker radius, paddle length, thickness,
               # continuity, snake contrast, paddle contrast, distractor base count.
      32: (1, 7, (1,), 1.5, 2, 0.5, 1.0, (2.0,), (0.75,), 20),
      64: (1, 12, (1,), 2.5, 5, 1.0, 1.8, (0.8,), (1.0,), 22),
      128: (1, 20, (2, 3), 3.0, 5, 1.5, 1.8, (0.9,), (1.0,), 35),
      256: (22, 27, (3,), 5.0, 5, 2.0, 1.8, (1.0,), (1.0,), 30),
  }
  if resolution not in presets:
    raise ValueError(f"resolution={resolution} unknown; valid: {', '.join(map(str, presets))}")
  if difficulty not in DIFFICULTIES:
    raise ValueError(f"difficulty={difficulty!r} unknown; valid: {', '.join(DIFFICULTIES)}")
  (padding, seed_distance, margins, marker_radius, paddle_length, thickness, continuity,
   snake_contrast, paddle_contrast, base) = presets[resolution]
  contour_length = DIFFICULTIES[difficulty][1]
  distractor_length = contour_length // 3
  return PathfinderParams(
      window_size=resolution, padding=padding, antialias_scale=2, paddle_margin_list=margins,
      seed_distance=seed_distance, marker_radius=marker_radius, contour_length=contour_length,
      distractor_length=distractor_length, num_distractor_snakes=base // distractor_length,
      paddle_length=paddle_length, paddle_thickness=thickness, continuity=continuity,
      snake_contrast_list=snake_contrast, paddle_contrast_list=paddle_contrast)


# ---------------------------------------------------------------------------------------------
# Drawing.
# ---------------------------------------------------------------------------------------------
def _step(point: tuple[int, int], angle: float, distance: float) -> tuple[int, int]:
  """(y, x) moved ``distance`` along ``angle`` (radians; y = sin), each coordinate rounded up."""
  return (math.ceil(point[0] + distance * math.sin(angle)),
          math.ceil(point[1] + distance * math.cos(angle)))


def _opposite(angle: float) -> float:
  return angle + np.pi if angle < 0 else angle - np.pi


def _disk(radius: float) -> np.ndarray:
  """bool [2r + 1, 2r + 1] (r = floor(radius)): the pixels within ``radius`` of the centre."""
  r = int(radius)
  y, x = np.ogrid[-r:r + 1, -r:r + 1]
  return x * x + y * y <= radius * radius


def _downsample(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
  """uint8 [h, w] -> float32 [size] in [0, 1]: PIL Lanczos, as ``scipy.misc.imresize`` did."""
  return np.asarray(Image.fromarray(image).resize((size[1], size[0]), Image.Resampling.LANCZOS),
                    np.float32) / 255.0


@functools.lru_cache(maxsize=16384)
def _paddle(angle: float, length: int, thickness: float, margin: int,
            scale: int) -> tuple[np.ndarray, np.ndarray]:
  """One paddle from the centre of a (2R + 1)^2 window along ``angle``, R = L + ceil(t) + m.

  Drawn at ``scale`` x resolution (a PIL line of width ``scale * thickness`` from the centre to
  the centre moved ``scale * length``), then Lanczos-downsampled. Returns (stroke, mask), both
  float32 [2R + 1, 2R + 1] in [0, 1]: the mask is the stroke dilated by a disk of radius
  ``scale * margin`` before downsampling (the occupancy the paddle claims).
  """
  reach = length + math.ceil(thickness) + margin
  centre = reach * scale
  big = Image.new("L", (2 * centre + 1, 2 * centre + 1), 0)
  head = _step((centre, centre), angle, length * scale)
  ImageDraw.Draw(big).line([(centre, centre), (head[1], head[0])], fill=255,
                           width=int(round(thickness * scale)))
  stroke = np.asarray(big) > 0
  claimed = ndimage.binary_dilation(stroke, _disk(margin * scale)) if margin else stroke
  size = (2 * reach + 1, 2 * reach + 1)
  return (_downsample(stroke.astype(np.uint8) * 255, size),
          _downsample(claimed.astype(np.uint8) * 255, size))


def _window(shape: tuple[int, int], centre: tuple[int, int],
            reach: int) -> tuple[tuple[slice, slice], tuple[slice, slice]]:
  """Slices of the image and of a (2 reach + 1)^2 sprite centred at ``centre``, clipped."""
  image_slices, sprite_slices = [], []
  for c, n in zip(centre, shape):
    lo, hi = max(c - reach, 0), min(c + reach + 1, n)
    image_slices.append(slice(lo, max(hi, lo)))
    sprite_slices.append(slice(lo - (c - reach), max(hi, lo) - (c - reach)))
  return tuple(image_slices), tuple(sprite_slices)


@dataclasses.dataclass
class _Placed:
  """A sprite placed in the image: ``array[sprite_slices]`` covers ``image[image_slices]``."""
  image_slices: tuple[slice, slice]
  sprite: np.ndarray

  def max_into(self, target: np.ndarray, scale: float = 1.0) -> None:
    view = target[self.image_slices]
    np.maximum(view, self.sprite * scale if scale != 1.0 else self.sprite, out=view)


def _place(params: PathfinderParams, shape: tuple[int, int], start: tuple[int, int], angle: float,
           margin: int) -> tuple[_Placed, _Placed]:
  """The stroke and mask of a paddle starting at pixel ``start`` along ``angle``."""
  stroke, mask = _paddle(float(angle), params.paddle_length, params.paddle_thickness, margin,
                         params.antialias_scale)
  reach = (stroke.shape[0] - 1) // 2
  image_slices, sprite_slices = _window(shape, start, reach)
  return _Placed(image_slices, stroke[sprite_slices]), _Placed(image_slices, mask[sprite_slices])


@functools.lru_cache(maxsize=4096)
def _seed_offsets(degrees: int, length: int, thickness: float, margin: int,
                  scale: int) -> np.ndarray:
  """int [k, 2]: pixel offsets a first paddle at ``degrees`` covers, relative to its tail.

  As published: the paddle's mask drawn from (L + m + 1, L + m + 1) into a (2(L + m) + 1)^2
  window, its fully covered pixels (value 1) taken relative to the window centre (L + m, L + m).
  """
  _, mask = _paddle(degrees * np.pi / 180, length, thickness, margin, scale)
  half = length + margin
  reach = (mask.shape[0] - 1) // 2
  image_slices, sprite_slices = _window((2 * half + 1, 2 * half + 1), (half + 1, half + 1), reach)
  window = np.zeros((2 * half + 1, 2 * half + 1), np.float32)
  window[image_slices] = mask[sprite_slices]
  return np.argwhere(window >= 1.0) - half


def _free_tails(occupancy: np.ndarray, offsets: np.ndarray) -> np.ndarray:
  """int [k, 2]: the pixels p (row-major) with occupancy[p + o] <= 0.3 for every offset o.

  Offsets that leave the image impose nothing (OpenCV's dilation border).
  """
  h, w = occupancy.shape
  pad = int(np.abs(offsets).max(initial=0))
  padded = np.zeros((h + 2 * pad, w + 2 * pad), occupancy.dtype)
  padded[pad:pad + h, pad:pad + w] = occupancy
  reached = np.zeros_like(occupancy)
  for dy, dx in offsets.tolist():
    np.maximum(reached, padded[pad + dy:pad + dy + h, pad + dx:pad + dx + w], out=reached)
  return np.argwhere(reached <= _FREE_THRESHOLD)


@functools.lru_cache(maxsize=64)
def _circle(radius: int) -> tuple[np.ndarray, np.ndarray]:
  """Candidate head offsets around a pivot and their orientations (``get_coords_cmf``).

  The points on the circle of ``radius``, one per arc pixel (angles 0, 360 / (2 pi r), ...
  degrees), rounded down to pixels, without repeats (sorted by (dy, dx)): int [k, 2], and
  atan2(dy, dx) float [k]. A pivot is an integer pixel, so a point lies inside the image exactly
  when its pixel does.
  """
  angles = np.arange(0, 360, 360.0 / (2 * radius * np.pi)) * np.pi / 180
  points = np.stack([radius * np.sin(angles), radius * np.cos(angles)], axis=1)
  offsets = np.unique(np.floor(points).astype(np.int64), axis=0)
  return offsets, np.arctan2(offsets[:, 0], offsets[:, 1])


@functools.lru_cache(maxsize=65536)
def _turn_weights(radius: int, angle: float, continuity: float) -> np.ndarray:
  """float [k]: max(cos(min(turn * continuity, pi / 2)), 0) ** 2 of each ``_circle(radius)``
  candidate, turn = its angle from ``angle`` (radians, in [0, pi])."""
  turn = np.abs(_circle(radius)[1] - angle)
  turn = np.minimum(np.minimum(turn, 2 * np.pi - turn) * continuity, np.pi / 2)
  return np.maximum(np.cos(turn), 0.0) ** 2


@functools.lru_cache(maxsize=64)
def _disk_offsets(radius: int) -> np.ndarray:
  """int [k, 2]: the offsets of ``_disk(radius)``'s pixels from its centre."""
  return np.argwhere(_disk(radius)) - radius


class _Canvas:
  """The image being drawn (float64 [n, n]) and the occupancy mask (float32 [n, n]), a view into
  ``padded`` (zeros ``pad = margin`` pixels wide around it, for dilations at the border)."""

  def __init__(self, params: PathfinderParams, margin: int, rng: np.random.Generator):
    self.params, self.margin, self.rng = params, margin, rng
    n, self.pad = params.window_size, margin
    self.image = np.zeros((n, n), np.float64)
    self.padded = np.zeros((n + 2 * margin, n + 2 * margin), np.float32)
    self.occupancy = self.padded[margin:margin + n, margin:margin + n]
    p = params.padding
    occupancy = self.occupancy
    occupancy[:p], occupancy[-p:], occupancy[:, :p], occupancy[:, -p:] = 1, 1, 1, 1

  def copy(self) -> _Canvas:
    other = object.__new__(_Canvas)
    other.params, other.margin, other.rng, other.pad = self.params, self.margin, self.rng, self.pad
    other.image, other.padded = self.image.copy(), self.padded.copy()
    n = self.params.window_size
    other.occupancy = other.padded[self.pad:self.pad + n, self.pad:self.pad + n]
    return other

  def in_bounds(self, *points: tuple[int, int]) -> bool:
    n = self.params.window_size
    return all(0 <= y < n and 0 <= x < n for y, x in points)

  def contrast(self, choices: tuple[float, ...]) -> float:
    return choices[self.rng.integers(len(choices))]


@dataclasses.dataclass
class _Snake:
  """A growing contour: its last pivot and orientation, the mask of its newest paddle (not yet in
  the occupancy, so the next paddle may touch it), and its two ends (tail, head)."""
  pivot: tuple[int, int]
  angle: float
  pending: _Placed
  tail: tuple[int, int]
  head: tuple[int, int]


def _seed(canvas: _Canvas, border: int, contrast: float) -> _Snake | None:
  """A contour's first paddle at a free tail ``border`` pixels or more inside; None on failure.

  Up to ``max_paddle_retrial + 1`` orientations; a tail whose head or pivot falls outside the
  image takes another orientation; no free tail at all fails at once.
  """
  p, m = canvas.params, canvas.margin
  n = p.window_size
  for _ in range(p.max_paddle_retrial + 1):
    degrees = int(canvas.rng.integers(-180, 180))
    angle = degrees * np.pi / 180
    lined = canvas.occupancy.copy()
    lined[:border], lined[n - border:], lined[:, :border], lined[:, n - border:] = 1, 1, 1, 1
    tails = _free_tails(lined, _seed_offsets(degrees, p.paddle_length, p.paddle_thickness, m,
                                             p.antialias_scale))
    if not len(tails):
      return None
    tail = tuple(int(v) for v in tails[canvas.rng.integers(len(tails))])
    head = _step(tail, angle, p.paddle_length)
    pivot = _step(head, _opposite(angle), p.paddle_length + m)
    if canvas.in_bounds(head, pivot):
      stroke, mask = _place(p, canvas.image.shape, tail, angle, m)
      stroke.max_into(canvas.image, contrast)
      return _Snake(pivot, angle, mask, tail, tail)
  return None


def _extend(canvas: _Canvas, snake: _Snake, contrast: float) -> bool:
  """Adds one paddle to ``snake`` (see the module docstring, step 2); False if none fits."""
  p, m = canvas.params, canvas.margin
  n = p.window_size
  pivot = _step(snake.pivot, snake.angle, p.paddle_length + 2 * m)
  radius = p.paddle_length + m
  offsets, angles = _circle(radius)
  heads = offsets + np.asarray(pivot)
  prior = _turn_weights(radius, snake.angle, p.continuity)
  if not (radius <= pivot[0] < n - radius and radius <= pivot[1] < n - radius):
    inside = ((heads >= 0) & (heads < n)).all(axis=1)
    heads, angles, prior = heads[inside], angles[inside], prior[inside]
    if not len(heads):
      return False
  # Occupancy dilated by a disk of radius m (outside the image counts as free), at the heads.
  disk = _disk_offsets(m) + canvas.pad
  near = canvas.padded[heads[:, :1] + disk[:, 0], heads[:, 1:] + disk[:, 1]].max(axis=1)
  weights = (1.0 - near) * prior
  total = weights.sum()
  if total < 1e-4:
    return False
  cdf = np.cumsum(weights / total)
  for _ in range(p.max_paddle_retrial + 1):
    index = min(int(np.searchsorted(cdf, canvas.rng.random(), side="right")), len(cdf) - 1)
    head = (int(heads[index, 0]), int(heads[index, 1]))
    stroke, mask = _place(p, canvas.image.shape, head, _opposite(float(angles[index])), m)
    if (canvas.occupancy[mask.image_slices] + mask.sprite).max(initial=0.0) < _OVERLAP_THRESHOLD:
      stroke.max_into(canvas.image, contrast)
      snake.pending.max_into(canvas.occupancy)
      snake.pivot, snake.angle, snake.pending, snake.head = pivot, float(angles[index]), mask, head
      return True
  return False


def _target_pair(canvas: _Canvas) -> tuple[_Snake, _Snake] | None:
  """The two target contours (``two_snakes``), drawn into ``canvas``; None on failure."""
  p = canvas.params
  mu = list(p.snake_contrast_list) * 2
  canvas.rng.shuffle(mu)
  first = _seed(canvas, 2 * p.seed_distance, canvas.contrast(p.paddle_contrast_list) * mu[0])
  if first is None:
    return None
  contrast = canvas.contrast(p.paddle_contrast_list) * mu[1]
  second = None
  for _ in range(p.max_paddle_retrial + 1):
    degrees = int(canvas.rng.integers(-180, 180))
    angle = degrees * np.pi / 180
    around = int(canvas.rng.integers(0, 360)) * np.pi / 180
    tail = (int(round(first.tail[0] + p.seed_distance * np.sin(around))),
            int(round(first.tail[1] + p.seed_distance * np.cos(around))))
    head = _step(tail, angle, p.paddle_length)
    pivot = _step(head, _opposite(angle), p.paddle_length + canvas.margin)
    if canvas.in_bounds(head, pivot):
      stroke, mask = _place(p, canvas.image.shape, tail, angle, canvas.margin)
      stroke.max_into(canvas.image, contrast)
      second = _Snake(pivot, angle, mask, tail, tail)
      break
  if second is None:
    return None
  for _ in range(p.contour_length - 1):
    contrast = canvas.contrast(p.paddle_contrast_list)
    for snake, scale in ((first, mu[0]), (second, mu[1])):
      if not _extend(canvas, snake, contrast * scale):
        return None
  second.pending.max_into(canvas.occupancy)  # As published: not ``first.pending``.
  return first, second


def _distractor(canvas: _Canvas) -> bool:
  """One distractor contour (``make_snake``) drawn into ``canvas``; False (canvas unchanged in
  its image; the caller discards it) if it does not fit."""
  p = canvas.params
  free = np.count_nonzero(canvas.occupancy <= _FREE_THRESHOLD) / canvas.occupancy.size
  if free < _STOP_AVAILABILITY:
    return False
  snake = _seed(canvas, 1, canvas.contrast(p.snake_contrast_list))
  if snake is None:
    return False
  for _ in range(p.distractor_length - 1):
    if not _extend(canvas, snake, canvas.contrast(p.snake_contrast_list)):
      return False
  snake.pending.max_into(canvas.occupancy)
  return True


def _marker(params: PathfinderParams, centre: tuple[int, int]) -> np.ndarray:
  """float32 [n, n]: a disk of ``marker_radius`` at pixel ``centre``, drawn at the antialiasing
  scale (pixel i <-> i - scale * centre) and Lanczos-downsampled."""
  n, s = params.window_size, params.antialias_scale
  y, x = np.ogrid[-centre[0] * s:(n - centre[0]) * s, -centre[1] * s:(n - centre[1]) * s]
  disk = (x * x + y * y <= (params.marker_radius * s) ** 2).astype(np.uint8) * 255
  return _downsample(disk, (n, n))


def render_image(params: PathfinderParams, rng: np.random.Generator) -> tuple[np.ndarray, int, int]:
  """One Pathfinder image (the algorithm in the module docstring).

  Args:
    params: the generator's parameters.
    rng: the random source (all draws of this image).

  Returns:
    (image uint8 [window_size, window_size], label 0/1, the paddle margin used).

  Raises:
    RuntimeError: no target pair fits after ``MAX_PAIR_ATTEMPTS`` attempts (parameters that
      leave too little room, e.g. a long contour in a small window).
  """
  label = int(rng.integers(2))
  margin = int(params.paddle_margin_list[rng.integers(len(params.paddle_margin_list))])
  for _ in range(MAX_PAIR_ATTEMPTS):
    canvas = _Canvas(params, margin, rng)
    pair = _target_pair(canvas)
    if pair is not None:
      break
  else:
    raise RuntimeError(f"no pair of target contours fitted in {MAX_PAIR_ATTEMPTS} attempts with "
                       f"{params}")
  for _ in range(params.num_distractor_snakes):
    for _ in range(params.max_distractor_contour_retrial + 1):
      trial = canvas.copy()
      if _distractor(trial):
        canvas = trial
        break
  origin = int(rng.integers(2))
  terminal = origin if label else 1 - origin
  image = canvas.image
  for centre in (pair[origin].tail, pair[terminal].head):
    np.maximum(image, _marker(params, centre), out=image)
  low, high = image.min(), image.max()
  scaled = (image - low) * (255.0 / (high - low)) if high > low else np.zeros_like(image)
  return np.floor(scaled + 0.5).astype(np.uint8), label, margin


# ---------------------------------------------------------------------------------------------
# Writing a set in the release layout.
# ---------------------------------------------------------------------------------------------
def image_rng(seed: int, batch: int, index: int) -> np.random.Generator:
  """The random source of image ``index`` of metadata batch ``batch``."""
  return np.random.default_rng((seed, batch, index))


def _metadata_row(params: PathfinderParams, batch: int, index: int, label: int,
                  margin: int) -> str:
  """The release's row: sub-directory, file, index, label, continuity, contour length, distractor
  length, paddle length, paddle thickness, margin, number of paddle contrasts."""
  fields = (f"imgs/{batch}", f"sample_{index}.png", index, label, params.continuity,
            params.contour_length, params.distractor_length, params.paddle_length,
            params.paddle_thickness, margin, len(params.paddle_contrast_list))
  return " ".join(map(str, fields)) + "\n"


def _write_atomically(path: pathlib.Path, data: bytes) -> None:
  tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
  try:
    tmp.write_bytes(data)
    os.replace(tmp, path)
  finally:
    tmp.unlink(missing_ok=True)


def _write_batch(task: tuple[PathfinderParams, str, int, int, int]) -> int:
  """Renders and writes metadata batch ``batch`` (``count`` images); returns ``count``."""
  params, root, seed, batch, count = task
  root = pathlib.Path(root)
  image_dir = root / "imgs" / str(batch)
  image_dir.mkdir(parents=True, exist_ok=True)
  rows = []
  for index in range(count):
    image, label, margin = render_image(params, image_rng(seed, batch, index))
    Image.fromarray(image, mode="L").save(image_dir / f"sample_{index}.png")
    rows.append(_metadata_row(params, batch, index, label, margin))
  # The metadata file comes last: a batch without it is incomplete and is rewritten.
  _write_atomically(root / "metadata" / f"{batch}.npy", "".join(rows).encode("ascii"))
  return count


def generate(out_dir: str | os.PathLike, params: PathfinderParams, *, num_images: int,
             images_per_batch: int = 1000, seed: int = 0, workers: int = 0,
             progress: bool = True) -> pathlib.Path:
  """Renders ``num_images`` images into ``out_dir`` in the LRA release layout.

  Image ``i`` of batch ``k`` (``imgs/<k>/sample_<i>.png``, a row of ``metadata/<k>.npy``) depends
  only on ``(params, seed, k, i)`` (``image_rng``), so the set is the same for any ``workers``.

  Args:
    out_dir: the set's root (created); existing batches with a metadata file are kept.
    params: the generator's parameters.
    num_images: images in all; batches of ``images_per_batch`` (the last one may be smaller).
    seed: the set's seed.
    workers: processes rendering batches in parallel (0: this process).
    progress: show a tqdm progress bar (images).

  Returns:
    ``out_dir`` as a path.

  Raises:
    ValueError: ``num_images`` or ``images_per_batch`` < 1, or ``workers`` < 0.
  """
  if num_images < 1 or images_per_batch < 1:
    raise ValueError(f"num_images={num_images} and images_per_batch={images_per_batch} must be "
                     f">= 1")
  if workers < 0:
    raise ValueError(f"workers must be >= 0; got {workers}")
  root = pathlib.Path(out_dir)
  (root / "metadata").mkdir(parents=True, exist_ok=True)
  counts = [min(images_per_batch, num_images - start)
            for start in range(0, num_images, images_per_batch)]
  tasks = [(params, str(root), seed, batch, count) for batch, count in enumerate(counts)
           if not (root / "metadata" / f"{batch}.npy").is_file()]
  with tqdm(total=num_images, initial=num_images - sum(t[-1] for t in tasks), unit="img",
            desc=f"Pathfinder {params.window_size}px", disable=not progress) as bar:
    if workers:
      with multiprocessing.get_context("spawn").Pool(workers) as pool:
        for done in pool.imap_unordered(_write_batch, tasks):
          bar.update(done)
    else:
      for task in tasks:
        bar.update(_write_batch(task))
  return root


def _set_description(params: PathfinderParams, num_images: int, images_per_batch: int,
                     seed: int) -> dict:
  return {"generator_version": GENERATOR_VERSION, "num_images": num_images,
          "images_per_batch": images_per_batch, "seed": seed,
          "params": json.loads(json.dumps(dataclasses.asdict(params)))}


def ensure_generated(out_dir: str | os.PathLike, params: PathfinderParams, *, num_images: int,
                     images_per_batch: int = 1000, seed: int = 0, workers: int = 0,
                     progress: bool = True) -> pathlib.Path:
  """``generate`` unless ``out_dir`` already holds this set; resumes an interrupted one.

  What was asked is stored in ``out_dir/generator.json`` before the first image; a directory
  with metadata but no such file (e.g. the LRA release) is used as it is.

  Raises:
    ValueError: ``out_dir`` holds a set made with other parameters (the message lists them), or
      ``generate`` rejects the arguments.
  """
  root = pathlib.Path(out_dir)
  wanted = _set_description(params, num_images, images_per_batch, seed)
  description = root / "generator.json"
  if description.is_file():
    stored = json.loads(description.read_text(encoding="utf-8"))
    if stored != wanted:
      diff = data_lib.describe_differences(stored, wanted)
      raise ValueError(f"{root} holds a Pathfinder set generated with other parameters ({diff}); "
                       f"delete it or use another directory")
  elif (root / "metadata").is_dir() and any((root / "metadata").iterdir()):
    logging.warning("Using the Pathfinder set in %s as it is: no generator.json records how it "
                    "was made", root)
    return root
  else:
    root.mkdir(parents=True, exist_ok=True)
    _write_atomically(description, (json.dumps(wanted, indent=2, sort_keys=True) + "\n").encode())
  return generate(root, params, num_images=num_images, images_per_batch=images_per_batch,
                  seed=seed, workers=workers, progress=progress)
