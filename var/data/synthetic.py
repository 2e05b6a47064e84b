"""A class-conditional image generator with structure at every scale, used as the embedded dataset.

A scaling study needs data on which bigger models keep winning, so each class is a *distribution* of
scenes, not a flat colour blob. Every class fixes a recipe; every image samples its free parameters:

  layout  (coarsest)  background kind and its direction, the arrangement of objects
  objects             shape, count, size, rotation
  colour              class palette with per-image hue / brightness jitter
  texture             stripes / checks / dots / rings inside objects, with per-image phase and frequency
  fine detail         oriented high-frequency grain and small speckles

The 1x1 and 2x2 token scales mostly see the layout and palette, the middle scales the objects, the last
ones texture and grain. Rendering is plain numpy with anti-aliased edges, so it works at any resolution
from 16 to 256 px; the same (seed, index) always gives the same pixels.
"""

from __future__ import annotations

import colorsys
from dataclasses import dataclass

import numpy as np

GENERATOR_VERSION = 1

SHAPES = ("disc", "square", "triangle", "ring", "cross", "diamond", "star", "ellipse", "bar", "halfdisc")
BACKGROUNDS = ("vertical", "horizontal", "radial", "diagonal", "horizon")
ARRANGEMENTS = ("center", "row", "diagonal", "scatter", "grid")
TEXTURES = ("plain", "stripes", "checks", "dots", "rings")


@dataclass(frozen=True)
class ClassRecipe:
    name: str
    shape: str
    background: str
    arrangement: str
    texture: str
    hue: float          # object hue in [0, 1)
    bg_hue: float       # background hue
    count: tuple[int, int]
    size: tuple[float, float]   # object radius as a fraction of the image side
    grain_angle: float  # orientation of the fine grain, radians


def class_recipes(num_classes: int) -> list[ClassRecipe]:
    """Recipes are fixed by the generator version, not the seed, so classes mean the same thing everywhere."""
    recipes = []
    for c in range(num_classes):
        # Golden-ratio hue steps keep neighbouring classes far apart in colour.
        hue = (0.07 + c * 0.618034) % 1.0
        recipes.append(
            ClassRecipe(
                name=f"{SHAPES[c % len(SHAPES)]}-{TEXTURES[(c * 3) % len(TEXTURES)]}",
                shape=SHAPES[c % len(SHAPES)],
                background=BACKGROUNDS[(c * 2 + c // len(SHAPES)) % len(BACKGROUNDS)],
                arrangement=ARRANGEMENTS[(c + c // len(SHAPES)) % len(ARRANGEMENTS)],
                texture=TEXTURES[(c * 3 + c // len(SHAPES)) % len(TEXTURES)],
                hue=hue,
                bg_hue=(hue + 0.45 + 0.1 * (c % 3)) % 1.0,
                count=(1, 1) if c % 4 == 0 else (2, 3) if c % 4 == 1 else (1, 2) if c % 4 == 2 else (3, 5),
                size=(0.16, 0.26) if c % 4 != 3 else (0.08, 0.13),
                grain_angle=np.pi * ((c * 0.37) % 1.0),
            )
        )
    return recipes


def _hsv(h: float, s: float, v: float) -> np.ndarray:
    return np.array(colorsys.hsv_to_rgb(h % 1.0, np.clip(s, 0, 1), np.clip(v, 0, 1)), dtype=np.float32)


def _soft(distance_inside: np.ndarray, res: int) -> np.ndarray:
    """Anti-aliased mask from a signed distance (positive inside), about one pixel of soft edge."""
    return np.clip(distance_inside * res + 0.5, 0.0, 1.0)


def _shape_mask(shape: str, u: np.ndarray, v: np.ndarray, r: float, res: int) -> np.ndarray:
    """Mask of a shape of radius r centred at the origin of the (rotated) local coordinates u, v."""
    rad = np.sqrt(u * u + v * v)
    if shape == "disc":
        d = r - rad
    elif shape == "square":
        d = r * 0.85 - np.maximum(np.abs(u), np.abs(v))
    elif shape == "triangle":
        # Intersection of three half-planes of an equilateral triangle.
        d = np.full_like(u, np.inf)
        for k in range(3):
            a = np.pi / 2 + k * 2 * np.pi / 3
            d = np.minimum(d, r * 0.5 - (u * np.cos(a) + v * np.sin(a)))
    elif shape == "ring":
        d = np.minimum(r - rad, rad - r * 0.55)
    elif shape == "cross":
        arm = r * 0.3
        d = np.maximum(np.minimum(arm - np.abs(u), r - np.abs(v)), np.minimum(arm - np.abs(v), r - np.abs(u)))
    elif shape == "diamond":
        d = r - (np.abs(u) + np.abs(v))
    elif shape == "star":
        ang = np.arctan2(v, u)
        d = r * (0.6 + 0.4 * np.cos(5 * ang)) - rad
    elif shape == "ellipse":
        d = r - np.sqrt((u / 1.0) ** 2 + (v / 0.5) ** 2)
    elif shape == "bar":
        d = np.minimum(r - np.abs(u), r * 0.28 - np.abs(v))
    elif shape == "halfdisc":
        d = np.minimum(r - rad, v + r * 0.1)
    else:
        raise ValueError(f"unknown shape {shape}")
    return _soft(d, res)


def _texture(kind: str, u: np.ndarray, v: np.ndarray, freq: float, phase: float) -> np.ndarray:
    """A pattern in [0, 1] inside an object, in the object's own coordinates (it rotates with it)."""
    if kind == "plain":
        return np.zeros_like(u)
    if kind == "stripes":
        return 0.5 + 0.5 * np.sin(2 * np.pi * freq * u + phase)
    if kind == "checks":
        return ((np.floor(freq * u + phase) + np.floor(freq * v)) % 2).astype(np.float32)
    if kind == "dots":
        fu, fv = (freq * u + phase) % 1.0 - 0.5, (freq * v) % 1.0 - 0.5
        return (fu * fu + fv * fv < 0.09).astype(np.float32)
    if kind == "rings":
        return 0.5 + 0.5 * np.sin(2 * np.pi * freq * np.sqrt(u * u + v * v) + phase)
    raise ValueError(f"unknown texture {kind}")


def _background(recipe: ClassRecipe, x: np.ndarray, y: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    h = recipe.bg_hue + rng.uniform(-0.04, 0.04)
    c0 = _hsv(h, rng.uniform(0.35, 0.6), rng.uniform(0.25, 0.45))
    c1 = _hsv(h + rng.uniform(0.05, 0.15), rng.uniform(0.4, 0.7), rng.uniform(0.65, 0.9))
    kind = recipe.background
    if kind == "vertical":
        t = y
    elif kind == "horizontal":
        t = x
    elif kind == "radial":
        cx, cy = rng.uniform(0.3, 0.7, size=2)
        t = np.clip(np.sqrt((x - cx) ** 2 + (y - cy) ** 2) * 1.6, 0, 1)
    elif kind == "diagonal":
        a = rng.uniform(0.6, 1.0) * np.pi / 4
        t = np.clip(x * np.cos(a) + y * np.sin(a), 0, 1)
    else:  # horizon: a hard two-tone split at a random height, with a soft gradient above it
        level = rng.uniform(0.45, 0.7)
        t = np.where(y > level, 1.0, y / level * 0.5)
    t = t[..., None]
    return (1 - t) * c0 + t * c1


def _positions(recipe: ClassRecipe, n: int, rng: np.random.Generator) -> list[tuple[float, float]]:
    kind = recipe.arrangement
    jitter = lambda: rng.uniform(-0.05, 0.05)  # noqa: E731
    if kind == "center" or n == 1:
        return [(0.5 + jitter(), 0.5 + jitter()) for _ in range(n)]
    if kind == "row":
        y = rng.uniform(0.35, 0.65)
        return [(0.2 + 0.6 * i / (n - 1) + jitter() * 0.5, y + jitter()) for i in range(n)]
    if kind == "diagonal":
        flip = rng.random() < 0.5
        pts = [(0.22 + 0.56 * i / (n - 1), 0.22 + 0.56 * i / (n - 1)) for i in range(n)]
        return [(x + jitter() * 0.5, (1 - y if flip else y) + jitter() * 0.5) for x, y in pts]
    if kind == "grid":
        cols = int(np.ceil(np.sqrt(n)))
        return [(0.28 + 0.44 * (i % cols) / max(cols - 1, 1) + jitter(), 0.28 + 0.44 * (i // cols) + jitter())
                for i in range(n)]
    return [(rng.uniform(0.2, 0.8), rng.uniform(0.2, 0.8)) for _ in range(n)]  # scatter


def render(recipe: ClassRecipe, resolution: int, rng: np.random.Generator) -> np.ndarray:
    """One image as uint8 HWC."""
    res = resolution
    coords = (np.arange(res, dtype=np.float32) + 0.5) / res
    y, x = np.meshgrid(coords, coords, indexing="ij")
    img = _background(recipe, x, y, rng)

    n = int(rng.integers(recipe.count[0], recipe.count[1] + 1))
    obj_hue = recipe.hue + rng.uniform(-0.05, 0.05)
    base = _hsv(obj_hue, rng.uniform(0.65, 0.95), rng.uniform(0.7, 1.0))
    accent = _hsv(obj_hue + 0.5, rng.uniform(0.3, 0.6), rng.uniform(0.15, 0.4))
    freq = rng.uniform(2.5, 4.5) / (recipe.size[1] * 2)   # a few texture periods across an object
    for cx, cy in _positions(recipe, n, rng):
        r = rng.uniform(*recipe.size)
        a = rng.uniform(0, 2 * np.pi) if recipe.shape not in ("halfdisc", "bar") else rng.uniform(-0.4, 0.4)
        dx, dy = x - cx, y - cy
        u, v = dx * np.cos(a) + dy * np.sin(a), -dx * np.sin(a) + dy * np.cos(a)
        mask = _shape_mask(recipe.shape, u, v, r, res)[..., None]
        pattern = _texture(recipe.texture, u, v, freq, rng.uniform(0, 2 * np.pi))[..., None]
        colour = base * (1 - 0.55 * pattern) + accent * 0.55 * pattern
        # A soft drop shadow gives each object a second, darker, lower-frequency footprint.
        shadow = _shape_mask(recipe.shape, u - 0.02, v - 0.02, r, res)[..., None] * (1 - mask)
        img = img * (1 - 0.35 * shadow)
        img = img * (1 - mask) + colour * mask

    # Fine detail: an oriented grain whose direction is a class cue, plus sparse speckles.
    g = recipe.grain_angle + rng.uniform(-0.1, 0.1)
    grain = np.sin(2 * np.pi * (res / 3.0) * (x * np.cos(g) + y * np.sin(g)) + rng.uniform(0, 2 * np.pi))
    img = img + 0.04 * grain[..., None]
    speckle = rng.random((res, res)) < 0.004
    img[speckle] = 1.0 - img[speckle]
    img = img + rng.normal(0, 0.012, size=img.shape)
    return (np.clip(img, 0, 1) * 255 + 0.5).astype(np.uint8)


def image_rng(seed: int, split: str, index: int) -> np.random.Generator:
    """Each image has its own stream, so any subset can be regenerated alone and in any order."""
    split_id = {"train": 0, "val": 1, "test": 2}[split]
    return np.random.default_rng([seed, split_id, index, GENERATOR_VERSION])


def generate(seed: int, split: str, index: int, num_classes: int, resolution: int,
             recipes: list[ClassRecipe] | None = None) -> tuple[np.ndarray, int]:
    """Image ``index`` of ``split``: classes cycle so every split is balanced."""
    recipes = recipes or class_recipes(num_classes)
    label = index % num_classes
    return render(recipes[label], resolution, image_rng(seed, split, index)), label
