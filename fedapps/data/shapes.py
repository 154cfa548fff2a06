"""``shapes``: a procedurally generated 10-class set of 3x32x32 colour images, made offline.

What it is: each image shows one shape whose kind is the label (disk, square, triangle, ring,
cross, diamond, bar, L, two dots, frame), drawn at a random position, size and small tilt, on a
background blending two random colours under a random stripe texture, in a colour 0.2-0.5 away
from the background's mean in each channel (so every shape is visible), sometimes with a small
distractor disk of the same colour elsewhere, with Gaussian pixel noise (SD 0.1) on top. Colour,
texture and position carry no information about the class: a model has to learn form. It is a
stand-in for CIFAR-10's size and compute cost where nothing can be downloaded, not a natural-image
benchmark, and accuracies on it are not comparable with CIFAR-10's. It is hard enough that a
small CNN trained centrally on a few thousand of its images needs several epochs to leave chance
level, and the federated global model climbs over tens of rounds.

Deterministic: the same ``seed`` gives the same images bit for bit (numpy's PCG64); the 12,000
registered images take a few seconds to make, so nothing is cached on disk.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

SIDE = 32
NUM_SAMPLES = 12_000  # 1,200 per class
SEED = 2026  # the registered data set; runs draw their partitions with their own seed
CHUNK = 1_000  # images generated at once (bounds temporary memory)
MAX_ROTATION = np.pi / 8  # small: a square turned by 45 degrees would be the diamond class

Mask = Callable[[np.ndarray, np.ndarray], np.ndarray]

# Shape of each class in the shape's own coordinates (u right, v down, unit = its radius).
SHAPES: tuple[tuple[str, Mask], ...] = (
    ("disk", lambda u, v: u**2 + v**2 < 0.9),
    ("square", lambda u, v: np.maximum(abs(u), abs(v)) < 0.75),
    ("triangle", lambda u, v: (v < 0.7) & (abs(u) < (v + 0.9) * 0.55)),
    ("ring", lambda u, v: (u**2 + v**2 > 0.35) & (u**2 + v**2 < 0.95)),
    ("cross", lambda u, v: ((abs(u) < 0.28) | (abs(v) < 0.28)) & (np.maximum(abs(u), abs(v)) < 1)),
    ("diamond", lambda u, v: abs(u) + abs(v) < 1.0),
    ("bar", lambda u, v: (abs(u) < 1.0) & (abs(v) < 0.3)),
    ("L", lambda u, v: ((u > -0.8) & (u < 0.8) & (v > 0.35) & (v < 0.85))
     | ((u > -0.8) & (u < -0.3) & (v > -0.85) & (v < 0.85))),
    ("two dots", lambda u, v: ((u - 0.5) ** 2 + v**2 < 0.15) | ((u + 0.5) ** 2 + v**2 < 0.15)),
    ("frame", lambda u, v: (np.maximum(abs(u), abs(v)) > 0.55)
     & (np.maximum(abs(u), abs(v)) < 0.9)),
)
CLASS_NAMES = tuple(name for name, _ in SHAPES)


def make_shapes(num_samples: int = NUM_SAMPLES, seed: int = SEED) -> tuple[np.ndarray, np.ndarray]:
    """Images ``(N, 3, 32, 32)`` float32 scaled to [-1, 1] and labels ``(N,)``, balanced."""
    if num_samples < len(SHAPES):
        raise ValueError(f"num_samples={num_samples}: need at least one image per class (10)")
    rng = np.random.default_rng(seed)
    labels = rng.permutation(np.arange(num_samples) % len(SHAPES))
    images = np.empty((num_samples, 3, SIDE, SIDE), dtype=np.float32)
    for start in range(0, num_samples, CHUNK):
        chunk = labels[start : start + CHUNK]
        images[start : start + len(chunk)] = _draw(chunk, rng)
    return images, labels.astype(np.int64)


def _draw(labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """One chunk of images for ``labels``: background, shape, distractor, noise."""
    n = len(labels)
    image = _background(n, rng)
    shape = _shape_masks(labels, rng)
    ink = _contrasting(image.mean(axis=(2, 3)), rng)[:, :, None, None]
    image = np.where(shape[:, None], ink, image)
    blob = _distractor(n, rng) & ~shape
    image = np.where(blob[:, None], ink, image)  # same colour as the shape: only form tells
    image += rng.normal(0.0, 0.1, image.shape)
    return ((np.clip(image, 0.0, 1.0) - 0.5) / 0.5).astype(np.float32)


def _grid() -> tuple[np.ndarray, np.ndarray]:
    y, x = np.mgrid[0:SIDE, 0:SIDE].astype(np.float64) + 0.5
    return y[None], x[None]


def _colours(n: int, rng: np.random.Generator) -> np.ndarray:
    return rng.uniform(0.0, 1.0, (n, 3))


def _contrasting(mean: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A colour 0.2-0.5 away from the background's mean in every channel (visible shapes)."""
    step = rng.uniform(0.2, 0.5, mean.shape)
    return np.where(mean > 0.5, mean - step, mean + step)


def _background(n: int, rng: np.random.Generator) -> np.ndarray:
    """A linear blend of two random colours plus stripes of random angle, period and strength."""
    y, x = _grid()
    angle = rng.uniform(0, np.pi, (n, 1, 1))
    along = (np.cos(angle) * x + np.sin(angle) * y) / SIDE  # in [0, ~1.4]
    blend = np.clip(along, 0, 1)[:, None]
    a, b = _colours(n, rng)[:, :, None, None], _colours(n, rng)[:, :, None, None]
    stripe_angle = rng.uniform(0, np.pi, (n, 1, 1))
    period = rng.uniform(3.0, 10.0, (n, 1, 1))
    phase = np.cos(stripe_angle) * x + np.sin(stripe_angle) * y
    stripes = np.sin(2 * np.pi * phase / period) * rng.uniform(0.0, 0.2, (n, 1, 1))
    return (1 - blend) * a + blend * b + stripes[:, None]


def _shape_masks(labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """``(n, 32, 32)`` bool: each image's class shape at a random place, size and tilt."""
    n = len(labels)
    radius = rng.uniform(5.0, 12.0, (n, 1, 1))
    centre_x = rng.uniform(radius, SIDE - radius)
    centre_y = rng.uniform(radius, SIDE - radius)
    tilt = rng.uniform(-MAX_ROTATION, MAX_ROTATION, (n, 1, 1))
    y, x = _grid()
    dx, dy = (x - centre_x) / radius, (y - centre_y) / radius
    u = np.cos(tilt) * dx + np.sin(tilt) * dy
    v = -np.sin(tilt) * dx + np.cos(tilt) * dy
    masks = np.zeros((n, SIDE, SIDE), dtype=bool)
    for label, (_, inside) in enumerate(SHAPES):
        chosen = labels == label
        masks[chosen] = inside(u[chosen], v[chosen])
    return masks


def _distractor(n: int, rng: np.random.Generator) -> np.ndarray:
    """A small disk somewhere in half of the images (never the class signal)."""
    y, x = _grid()
    r = rng.uniform(1.5, 3.0, (n, 1, 1))
    cx, cy = rng.uniform(0, SIDE, (n, 1, 1)), rng.uniform(0, SIDE, (n, 1, 1))
    present = rng.uniform(0, 1, (n, 1, 1)) < 0.5
    return present & ((x - cx) ** 2 + (y - cy) ** 2 < r**2)
