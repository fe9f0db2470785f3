"""DeiT/ClusTR image augmentation in numpy and Pillow, with timm 0.3.2's semantics.

DeiT (``facebookresearch/deit`` ``datasets.build_transform``), ClusTR (``main.py``, the same
transform) and Sparsifiner (DeiT's) train with timm 0.3.2's ``create_transform(is_training=True)``
followed by timm's ``Mixup`` on the batch (``docs/vision.md``, "ImageNet input").
timm needs torch, so the same operations are written here on Pillow images and numpy arrays:

  per image (``train_transform``):
    RandomResizedCropAndInterpolation(size, scale (0.08, 1), ratio (3/4, 4/3), bicubic)
    -> horizontal flip (p 0.5) -> RandAugment ``rand-m9-mstd0.5-inc1`` -> to float [0, 1]
    -> normalise with the ImageNet mean and std -> RandomErasing(p 0.25, 'pixel' mode, 1 box)
    (timm disables colour jitter when RandAugment is on, so ``color_jitter 0.4`` has no effect)
  per batch (``mixup_cutmix``): Mixup(mixup_alpha 0.8, cutmix_alpha 1.0, prob 1, switch_prob 0.5,
    mode 'batch', label_smoothing 0.1, correct_lam True): one lambda for the whole batch, each
    image mixed with the image at the mirrored batch position (``x.flip(0)``).
  evaluation (``eval_transform``): resize the short side to int(size / crop_pct) (bicubic), centre
    crop ``size``, normalise (DeiT ``build_transform(is_train=False)``, crop_pct 0.875).

Every random draw comes from an explicit ``numpy.random.Generator`` (timm uses Python's and
numpy's global generators): the distributions are timm's, the streams are not.
RandAugment details (timm ``auto_augment.py``): ``num_layers`` ops drawn uniformly with
replacement from the 15 "increasing" ops; each applies with probability 0.5 at a magnitude
drawn from N(m, mstd) and clipped to [0, 10]; geometric ops fill with the rounded ImageNet mean
and resample bicubic; translation is 0.45 * level / 10 of the image size.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable

import numpy as np
from PIL import Image, ImageEnhance, ImageOps

#: ImageNet channel mean and std of RGB in [0, 1] (timm IMAGENET_DEFAULT_MEAN / _STD).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
#: The fill colour of RandAugment's geometric ops: round(255 * mean) (timm ``img_mean``).
FILL = tuple(int(round(255 * m)) for m in IMAGENET_MEAN)
#: RandAugment's magnitude scale: level / 10 maps to each op's full range (timm _MAX_LEVEL).
MAX_LEVEL = 10.0
BICUBIC = Image.Resampling.BICUBIC


# ---------------------------------------------------------------------------------------------
# Crops and resizes.
# ---------------------------------------------------------------------------------------------
def random_resized_crop_box(width: int, height: int, rng: np.random.Generator,
                            scale: tuple[float, float] = (0.08, 1.0),
                            ratio: tuple[float, float] = (3 / 4, 4 / 3)
                            ) -> tuple[int, int, int, int]:
  """The crop box (left, top, width, height) of timm's RandomResizedCropAndInterpolation.

  Ten tries of area ~ U(scale) * W * H and log aspect ratio ~ U(log ratio); the first box that
  fits is placed uniformly. Otherwise the whole image, centre-cropped to the nearest ratio bound.
  """
  area = width * height
  log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
  for _ in range(10):
    target_area = rng.uniform(*scale) * area
    aspect = math.exp(rng.uniform(*log_ratio))
    w = int(round(math.sqrt(target_area * aspect)))
    h = int(round(math.sqrt(target_area / aspect)))
    if 0 < w <= width and 0 < h <= height:
      top = int(rng.integers(0, height - h + 1))
      left = int(rng.integers(0, width - w + 1))
      return left, top, w, h
  in_ratio = width / height
  if in_ratio < min(ratio):
    w, h = width, int(round(width / min(ratio)))
  elif in_ratio > max(ratio):
    w, h = int(round(height * max(ratio))), height
  else:
    w, h = width, height
  return (width - w) // 2, (height - h) // 2, w, h


def random_resized_crop(image: Image.Image, size: int, rng: np.random.Generator,
                        scale: tuple[float, float] = (0.08, 1.0),
                        ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> Image.Image:
  """A random crop (``random_resized_crop_box``) resized to size x size, bicubic."""
  left, top, w, h = random_resized_crop_box(image.width, image.height, rng, scale, ratio)
  return image.resize((size, size), BICUBIC, box=(left, top, left + w, top + h))


def resize_center_crop(image: Image.Image, size: int, crop_pct: float = 0.875) -> Image.Image:
  """DeiT's eval transform on a PIL image: short side to int(size / crop_pct), centre crop.

  torchvision ``Resize(int)`` (the long side becomes int(new_short * long / short)), bicubic;
  ``CenterCrop``: offsets int(round((side - size) / 2)).

  Raises:
    ValueError: ``crop_pct`` outside (0, 1].
  """
  if not 0 < crop_pct <= 1:
    raise ValueError(f"crop_pct must be in (0, 1]; got {crop_pct}")
  short_target = int(size / crop_pct)
  w, h = image.size
  if w <= h:
    new_w, new_h = short_target, int(short_target * h / w)
  else:
    new_w, new_h = int(short_target * w / h), short_target
  if (new_w, new_h) != (w, h):
    image = image.resize((new_w, new_h), BICUBIC)
  left = int(round((new_w - size) / 2.0))
  top = int(round((new_h - size) / 2.0))
  return image.crop((left, top, left + size, top + size))


def normalize(image: Image.Image | np.ndarray, mean=IMAGENET_MEAN, std=IMAGENET_STD
              ) -> np.ndarray:
  """uint8 RGB [H, W, 3] -> float32 [H, W, 3], (x / 255 - mean) / std (ToTensor + Normalize)."""
  x = np.asarray(image, dtype=np.float32) / 255.0
  return (x - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)


# ---------------------------------------------------------------------------------------------
# RandAugment (timm auto_augment.py, rand_augment_transform).
# ---------------------------------------------------------------------------------------------
def _signed(value: float, rng: np.random.Generator) -> float:
  """timm ``_randomly_negate``: -value with probability 0.5."""
  return -value if rng.random() > 0.5 else value


def _affine(image: Image.Image, matrix: tuple[float, ...]) -> Image.Image:
  return image.transform(image.size, Image.Transform.AFFINE, matrix, resample=BICUBIC,
                         fillcolor=FILL)


def _solarize_add(image: Image.Image, add: int, threshold: int = 128) -> Image.Image:
  lut = [min(255, i + add) if i < threshold else i for i in range(256)]
  return image.point(lut * len(image.getbands()))


def _enhance(enhancer) -> Callable:
  def op(image, level, rng):
    return enhancer(image).enhance(1.0 + _signed(level / MAX_LEVEL * 0.9, rng))
  return op


def _posterize(image, level, rng):
  del rng
  bits = 4 - int(level / MAX_LEVEL * 4)
  if bits <= 0:  # timm's Pillow masked every bit; today's Pillow rejects bits < 1.
    return Image.new(image.mode, image.size)
  return image if bits >= 8 else ImageOps.posterize(image, bits)


def _translate(axis: int):
  def op(image, level, rng):
    pixels = _signed(level / MAX_LEVEL * 0.45, rng) * image.size[axis]
    return _affine(image, (1, 0, pixels, 0, 1, 0) if axis == 0 else (1, 0, 0, 0, 1, pixels))
  return op


def _shear(axis: int):
  def op(image, level, rng):
    factor = _signed(level / MAX_LEVEL * 0.3, rng)
    return _affine(image, (1, factor, 0, 0, 1, 0) if axis == 0 else (1, 0, 0, factor, 1, 0))
  return op


#: The ops of timm's ``_RAND_INCREASING_TRANSFORMS`` (``inc1``): name -> op(image, level, rng).
RAND_INCREASING_OPS: dict[str, Callable[[Image.Image, float, np.random.Generator],
                                        Image.Image]] = {
    "AutoContrast": lambda im, level, rng: ImageOps.autocontrast(im),
    "Equalize": lambda im, level, rng: ImageOps.equalize(im),
    "Invert": lambda im, level, rng: ImageOps.invert(im),
    "Rotate": lambda im, level, rng: im.rotate(_signed(level / MAX_LEVEL * 30.0, rng),
                                               resample=BICUBIC, fillcolor=FILL),
    "PosterizeIncreasing": _posterize,
    "SolarizeIncreasing": lambda im, level, rng: ImageOps.solarize(
        im, 256 - int(level / MAX_LEVEL * 256)),
    "SolarizeAdd": lambda im, level, rng: _solarize_add(im, int(level / MAX_LEVEL * 110)),
    "ColorIncreasing": _enhance(ImageEnhance.Color),
    "ContrastIncreasing": _enhance(ImageEnhance.Contrast),
    "BrightnessIncreasing": _enhance(ImageEnhance.Brightness),
    "SharpnessIncreasing": _enhance(ImageEnhance.Sharpness),
    "ShearX": _shear(0),
    "ShearY": _shear(1),
    "TranslateXRel": _translate(0),
    "TranslateYRel": _translate(1),
}


def parse_rand_augment(spec: str) -> tuple[int, float, float]:
  """timm's RandAugment string -> (num_layers, magnitude, magnitude_std).

  Accepts ``rand-m<M>[-n<N>][-mstd<S>][-inc1]``, e.g. ``rand-m9-mstd0.5-inc1`` (N defaults to 2,
  mstd to 0).

  Raises:
    ValueError: not a 'rand-' string, an unknown field, or without ``-inc1`` (only timm's
      "increasing" op set is implemented).
  """
  fields = spec.split("-")
  if fields[0] != "rand":
    raise ValueError(f"rand_augment={spec!r}: expected timm's 'rand-m9-mstd0.5-inc1' form")
  num_layers, magnitude, magnitude_std, increasing = 2, None, 0.0, False
  for field in fields[1:]:
    match = re.fullmatch(r"(mstd|m|n|inc)([\d.]+)", field)
    if not match:
      raise ValueError(f"rand_augment={spec!r}: unknown field {field!r}")
    key, value = match.groups()
    if key == "m":
      magnitude = float(value)
    elif key == "n":
      num_layers = int(value)
    elif key == "mstd":
      magnitude_std = float(value)
    else:
      increasing = bool(int(value))
  if magnitude is None:
    raise ValueError(f"rand_augment={spec!r}: no magnitude field 'm<M>'")
  if not increasing:
    raise ValueError(f"rand_augment={spec!r}: only the '-inc1' op set is implemented")
  return num_layers, magnitude, magnitude_std


def rand_augment(image: Image.Image, rng: np.random.Generator, num_layers: int = 2,
                 magnitude: float = 9.0, magnitude_std: float = 0.5,
                 prob: float = 0.5) -> Image.Image:
  """timm ``RandAugment`` with the increasing ops on an RGB PIL image.

  ``num_layers`` ops drawn uniformly with replacement; each applies with probability ``prob``
  at level clip(N(magnitude, magnitude_std), 0, 10) (a fixed ``magnitude`` when std is 0).
  """
  names = list(RAND_INCREASING_OPS)
  for index in rng.choice(len(names), size=num_layers, replace=True):
    if prob < 1.0 and rng.random() > prob:
      continue
    level = magnitude
    if magnitude_std > 0:
      level = rng.normal(magnitude, magnitude_std)
    level = min(MAX_LEVEL, max(0.0, level))
    image = RAND_INCREASING_OPS[names[index]](image, level, rng)
  return image


# ---------------------------------------------------------------------------------------------
# Random erasing (timm random_erasing.py, mode 'pixel').
# ---------------------------------------------------------------------------------------------
def random_erasing(x: np.ndarray, rng: np.random.Generator, probability: float = 0.25,
                   min_area: float = 0.02, max_area: float = 1 / 3,
                   min_aspect: float = 0.3) -> np.ndarray:
  """timm ``RandomErasing(probability, mode='pixel', max_count=1)`` on a normalised image.

  With probability ``probability``: up to ten tries of area ~ U(min_area, max_area) * H * W and
  log aspect ~ U(log min_aspect, -log min_aspect); the first box strictly inside the image is
  filled with N(0, 1) noise per pixel and channel. ``x``: float32 [H, W, C], changed in place
  and returned.
  """
  if rng.random() > probability:
    return x
  height, width, channels = x.shape
  area = height * width
  log_ratio = (math.log(min_aspect), math.log(1 / min_aspect))
  for _ in range(10):
    target_area = rng.uniform(min_area, max_area) * area
    aspect = math.exp(rng.uniform(*log_ratio))
    h = int(round(math.sqrt(target_area * aspect)))
    w = int(round(math.sqrt(target_area / aspect)))
    if w < width and h < height:
      top = int(rng.integers(0, height - h + 1))
      left = int(rng.integers(0, width - w + 1))
      x[top:top + h, left:left + w] = rng.standard_normal((h, w, channels), np.float32)
      break
  return x


# ---------------------------------------------------------------------------------------------
# Whole transforms.
# ---------------------------------------------------------------------------------------------
def train_transform(image: Image.Image, size: int, rng: np.random.Generator, *,
                    scale: tuple[float, float] = (0.08, 1.0), hflip: float = 0.5,
                    rand_augment_spec: str | None = "rand-m9-mstd0.5-inc1",
                    erasing_prob: float = 0.25) -> np.ndarray:
  """DeiT's training transform: RGB PIL image -> float32 [size, size, 3], normalised.

  ``rand_augment_spec`` None or '' disables RandAugment; ``erasing_prob`` 0 disables erasing.
  """
  image = random_resized_crop(image, size, rng, scale=scale)
  if rng.random() < hflip:
    image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
  if rand_augment_spec:
    num_layers, magnitude, magnitude_std = parse_rand_augment(rand_augment_spec)
    image = rand_augment(image, rng, num_layers, magnitude, magnitude_std)
  x = normalize(image)
  if erasing_prob > 0:
    x = random_erasing(x, rng, erasing_prob)
  return x


def eval_transform(image: Image.Image, size: int, crop_pct: float = 0.875) -> np.ndarray:
  """DeiT's evaluation transform: RGB PIL image -> float32 [size, size, 3], normalised."""
  return normalize(resize_center_crop(image, size, crop_pct))


# ---------------------------------------------------------------------------------------------
# Mixup / CutMix and label smoothing on a batch (timm mixup.py, mode 'batch').
# ---------------------------------------------------------------------------------------------
def smooth_one_hot(labels: np.ndarray, num_classes: int, smoothing: float) -> np.ndarray:
  """int [batch] -> float32 [batch, classes]: 1 - smoothing + smoothing / K on the label,
  smoothing / K elsewhere (timm ``one_hot(off, on)``)."""
  off = smoothing / num_classes
  targets = np.full((labels.shape[0], num_classes), off, np.float32)
  targets[np.arange(labels.shape[0]), labels] = 1.0 - smoothing + off
  return targets


def cutmix_box(height: int, width: int, lam: float, rng: np.random.Generator
               ) -> tuple[int, int, int, int]:
  """timm ``rand_bbox``: a box of sides int(side * sqrt(1 - lam)) centred uniformly, clipped.

  Returns (y_low, y_high, x_low, x_high).
  """
  ratio = math.sqrt(1.0 - lam)
  cut_h, cut_w = int(height * ratio), int(width * ratio)
  cy, cx = int(rng.integers(0, height)), int(rng.integers(0, width))
  return (int(np.clip(cy - cut_h // 2, 0, height)), int(np.clip(cy + cut_h // 2, 0, height)),
          int(np.clip(cx - cut_w // 2, 0, width)), int(np.clip(cx + cut_w // 2, 0, width)))


def mixup_cutmix(images: np.ndarray, labels: np.ndarray, num_classes: int,
                 rng: np.random.Generator, *, mixup_alpha: float = 0.8,
                 cutmix_alpha: float = 1.0, prob: float = 1.0, switch_prob: float = 0.5,
                 label_smoothing: float = 0.1) -> tuple[np.ndarray, np.ndarray]:
  """timm ``Mixup`` in 'batch' mode with ``correct_lam=True``.

  With probability ``prob`` one lambda for the batch: CutMix (lambda ~ Beta(cutmix_alpha,
  cutmix_alpha), with probability ``switch_prob`` when both are on) pastes the box
  ``cutmix_box`` from the mirrored batch ``images[::-1]`` and sets lambda to the unpasted area
  fraction; otherwise Mixup blends ``lam * x + (1 - lam) * x[::-1]`` (lambda ~ Beta(mixup_alpha,
  mixup_alpha)). Targets: ``lam * y + (1 - lam) * y[::-1]`` of label-smoothed one-hots.

  Args:
    images: float32 [batch, H, W, C] (not changed).
    labels: int [batch] class ids.
    num_classes: K.
    rng: the batch's generator.

  Returns:
    (mixed images float32 [batch, H, W, C], targets float32 [batch, K]).

  Raises:
    ValueError: an odd batch (timm's requirement for flip mixing) or alphas both 0 with prob > 0.
  """
  if images.shape[0] % 2:
    raise ValueError(f"mixup/cutmix needs an even batch size; got {images.shape[0]}")
  if prob > 0 and mixup_alpha <= 0 and cutmix_alpha <= 0:
    raise ValueError("mixup_cutmix: prob > 0 needs mixup_alpha > 0 or cutmix_alpha > 0")
  lam, use_cutmix = 1.0, False
  if rng.random() < prob:
    if mixup_alpha > 0 and cutmix_alpha > 0:
      use_cutmix = rng.random() < switch_prob
    else:
      use_cutmix = cutmix_alpha > 0
    alpha = cutmix_alpha if use_cutmix else mixup_alpha
    lam = float(rng.beta(alpha, alpha))
  images = np.array(images, np.float32, copy=True)
  if lam < 1.0:
    flipped = images[::-1]
    if use_cutmix:
      height, width = images.shape[1:3]
      y0, y1, x0, x1 = cutmix_box(height, width, lam, rng)
      images[:, y0:y1, x0:x1] = flipped[:, y0:y1, x0:x1].copy()
      lam = 1.0 - (y1 - y0) * (x1 - x0) / float(height * width)
    else:
      images = lam * images + (1.0 - lam) * flipped
  y = smooth_one_hot(labels, num_classes, label_smoothing)
  return images.astype(np.float32), (lam * y + (1.0 - lam) * y[::-1]).astype(np.float32)
