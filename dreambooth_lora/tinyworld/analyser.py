"""Reads class, colours, pattern and background back from a tiny-world image, by rules.

Robust to the blur and noise of a small diffusion model's samples: the background is the
border's median; each object pixel is explained as a blend of that background with one named
colour (so soft edges count for the right colour); the class is the template that best overlaps
the soft coverage mask, placed from its area and centroid, which blur keeps.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageFilter

from .world import (
    BACKGROUND_COLOURS,
    CLASSES,
    COLOURS,
    CROSS_ARM_RATIO,
    OBJECT_COLOURS,
    RING_INNER_RATIO,
    STRIPE_WIDTH,
    SUBJECTS,
    Scene,
    canonical_colours,
    shape_coverage_grid,
    subpixel_grid,
)

# Pixels this far (RGB distance) from the background belong to the object; the nearest object
# colour is >= 114 away from every background, noise of sigma 8 per channel stays under 40.
MASK_DISTANCE = 50.0
SECOND_COLOUR_FRACTION = 0.15  # a triangle's top half holds a quarter of its area
NOTHING = "nothing"  # class and pattern read from an image with no object

# Area of each class as a fraction of size**2, and its centroid's depth below the top edge.
AREA_FACTOR = {
    "ball": np.pi / 4,
    "box": 1.0,
    "ring": np.pi / 4 * (1 - RING_INNER_RATIO**2),
    "triangle": 0.5,
    "cross": 2 * CROSS_ARM_RATIO - CROSS_ARM_RATIO**2,
}
CENTROID_DEPTH = {cls: 0.5 for cls in CLASSES} | {"triangle": 2 / 3}

# The softness the analyser is calibrated against (a diffusion model's samples are softer than renders).
SOFTEN_BLUR_RADIUS = 0.7
SOFTEN_NOISE_SIGMA = 8.0  # in 0..255 units


@dataclass(frozen=True)
class Attributes:
    """What the analyser read: colours in canonical order (see world.canonical_colours)."""

    cls: str
    colours: tuple[str, ...]
    pattern: str
    background: str


def expected_attributes(scene: Scene) -> Attributes:
    """The attributes the analyser should read from a render of the scene."""
    return Attributes(scene.cls, canonical_colours(scene.pattern, scene.colours), scene.pattern, scene.background)


def soften(
    image: Image.Image,
    rng: np.random.Generator,
    blur_radius: float = SOFTEN_BLUR_RADIUS,
    noise_sigma: float = SOFTEN_NOISE_SIGMA,
) -> Image.Image:
    """Gaussian blur then Gaussian noise: a render made as soft as a small diffusion model's sample."""
    blurred = np.asarray(image.filter(ImageFilter.GaussianBlur(blur_radius)), dtype=np.float32)
    noisy = blurred + rng.normal(0.0, noise_sigma, blurred.shape)
    return Image.fromarray(np.clip(np.round(noisy), 0, 255).astype(np.uint8), mode="RGB")


def as_array(img: Image.Image | np.ndarray) -> np.ndarray:
    """Float (H, W, 3) RGB in 0..255 from a PIL image or a uint8/float array."""
    if isinstance(img, Image.Image):
        return np.asarray(img.convert("RGB"), dtype=np.float32)
    array = np.asarray(img)
    # float images in 0..1 (e.g. a decoded tensor) are rescaled
    unit_range = np.issubdtype(array.dtype, np.floating) and array.max() <= 1.0
    return array.astype(np.float32) * (255.0 if unit_range else 1.0)


def nearest_name(pixels: np.ndarray, palette: dict[str, tuple[int, int, int]]) -> np.ndarray:
    """Index into the palette of the nearest named colour for each pixel, shape pixels.shape[:-1]."""
    centres = np.array(list(palette.values()), dtype=np.float32)
    distance = np.linalg.norm(pixels[..., None, :] - centres, axis=-1)
    return distance.argmin(axis=-1)


def border_pixels(array: np.ndarray) -> np.ndarray:
    """The outermost ring of pixels, shape (N, 3)."""
    return np.concatenate([array[0], array[-1], array[1:-1, 0], array[1:-1, -1]])


def dilate(mask: np.ndarray) -> np.ndarray:
    """8-neighbour binary dilation."""
    padded = np.pad(mask, 1)
    out = np.zeros_like(mask)
    for dy in range(3):
        for dx in range(3):
            out |= padded[dy : dy + mask.shape[0], dx : dx + mask.shape[1]]
    return out


def line_fits(array: np.ndarray, background_rgb: np.ndarray, object_rgbs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each pixel as background + alpha * (colour - background) for each colour: (alpha, residual), (H, W, k)."""
    offset = array - background_rgb
    directions = object_rgbs - background_rgb  # (k, 3)
    alphas = np.einsum("hwc,kc->hwk", offset, directions) / (directions**2).sum(-1)
    # a pixel never holds more than the object's colour, so the fit stops at alpha = 1
    clipped = np.clip(alphas, 0.0, 1.0)
    residual = np.linalg.norm(offset[..., None, :] - clipped[..., None] * directions, axis=-1)
    return clipped, residual


def read_colours(array: np.ndarray, background_rgb: np.ndarray, mask: np.ndarray) -> list[str]:
    """The one or two dominant object colours in the mask, most coverage first.

    Each pixel is explained as a blend of the background with one named colour, so the soft
    edge of a red ball on white counts as red, not as pink.
    """
    named = np.array(list(OBJECT_COLOURS.values()), dtype=np.float32)
    alphas, residual = line_fits(array[mask][None], background_rgb, named)
    labels = residual[0].argmin(-1)
    weights = np.take_along_axis(alphas[0], labels[:, None], -1)[:, 0]
    coverage = np.bincount(labels, weights=weights, minlength=len(COLOURS))
    coverage = coverage / max(coverage.sum(), 1e-6)
    order = np.argsort(-coverage, kind="stable")
    names = [COLOURS[order[0]]]
    if coverage[order[1]] >= SECOND_COLOUR_FRACTION:
        names.append(COLOURS[order[1]])
    return names


def soft_coverage(array: np.ndarray, background_rgb: np.ndarray, object_rgbs: np.ndarray, near: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-pixel object coverage in 0..1 and the index of the object colour that explains each pixel."""
    alphas, residual = line_fits(array, background_rgb, object_rgbs)
    which = residual.argmin(-1)
    alpha = np.take_along_axis(alphas, which[..., None], -1)[..., 0]
    # far from the object only noise remains; zero it so it cannot add area
    return np.where(near, alpha, 0.0), which


def template(cls: str, x: float, y: float, size: float, shape: tuple[int, int]) -> np.ndarray:
    """Anti-aliased coverage of a class's shape at continuous top-left (x, y)."""
    u, v = subpixel_grid(shape[0])
    fine = shape_coverage_grid(cls, u, v, x, y, size).astype(np.float32)
    f = fine.shape[0] // shape[0]
    return fine.reshape(shape[0], f, shape[1], f).mean(axis=(1, 3))


def fit_class(coverage: np.ndarray) -> tuple[str, float, float, float]:
    """Best-matching class by soft IoU with templates placed from area and centroid; (cls, x, y, size)."""
    area = coverage.sum()
    ys, xs = np.indices(coverage.shape) + 0.5
    cx, cy = (coverage * xs).sum() / area, (coverage * ys).sum() / area
    candidates = []
    for cls in CLASSES:
        size = float(np.sqrt(area / AREA_FACTOR[cls]))
        x, y = cx - size / 2, cy - size * CENTROID_DEPTH[cls]
        shape_map = template(cls, x, y, size, coverage.shape)
        iou = np.minimum(coverage, shape_map).sum() / np.maximum(coverage, shape_map).sum()
        candidates.append((iou, cls, x, y, size))
    _, cls, x, y, size = max(candidates)
    return cls, x, y, size


def read_pattern(
    core: np.ndarray, first: np.ndarray, x: float, y: float, size: float
) -> tuple[str, bool]:
    """(pattern, first colour comes first) from where the core's two colours lie."""
    ys, xs = np.nonzero(core)
    u, v = xs + 0.5, ys + 0.5
    scores: dict[str, tuple[float, bool]] = {}
    for pattern, predicted in (
        ("split", u < x + size / 2),
        ("halves", v < y + size / 2),
    ):
        agreement = (predicted == first).mean()
        scores[pattern] = (max(agreement, 1 - agreement), agreement >= 0.5)
    # stripes have no direction; allow the fitted left edge to be off by up to a pixel and a half
    best_stripes = 0.0
    for shift in np.arange(-1.5, 1.75, 0.5):
        predicted = np.floor((u - x - shift) / STRIPE_WIDTH) % 2 == 0
        agreement = (predicted == first).mean()
        best_stripes = max(best_stripes, agreement, 1 - agreement)
    scores["stripes"] = (best_stripes, True)
    pattern = max(scores, key=lambda p: scores[p][0])
    return pattern, scores[pattern][1]


def analyse(img: Image.Image | np.ndarray) -> Attributes:
    """Read class, colours, pattern and background from a square tiny-world image (PIL or array)."""
    array = as_array(img)
    border_median = np.median(border_pixels(array), axis=0)
    background = list(BACKGROUND_COLOURS)[int(nearest_name(border_median, BACKGROUND_COLOURS))]
    distance = np.linalg.norm(array - border_median, axis=-1)
    mask = distance > MASK_DISTANCE
    if not mask.any():
        # no object drawn: a reading that matches no prompt, rather than a guess that might
        return Attributes(NOTHING, (), NOTHING, background)
    names = read_colours(array, border_median, mask)
    named = np.array([OBJECT_COLOURS[n] for n in names], dtype=np.float32)
    coverage, which = soft_coverage(array, border_median, named, dilate(dilate(mask)))
    cls, x, y, size = fit_class(coverage)
    if len(names) == 1:
        return Attributes(cls, (names[0],), "solid", background)
    core = mask & (coverage >= 0.5)
    pattern, in_order = read_pattern(core, (which == 0)[core], x, y, size)
    colours = tuple(names) if in_order else tuple(names[::-1])
    return Attributes(cls, canonical_colours(pattern, colours), pattern, background)


def subject_score(img: Image.Image | np.ndarray, subject_name: str) -> float:
    """Fraction of the subject's traits read from the image: class, pattern, colour pair, colour order."""
    if subject_name not in SUBJECTS:
        raise KeyError(f"unknown subject {subject_name!r}; expected one of {sorted(SUBJECTS)}")
    subject = SUBJECTS[subject_name]
    seen = analyse(img)
    traits = (
        seen.cls == subject.cls,
        seen.pattern == subject.pattern,
        set(seen.colours) == set(subject.colours),
        seen.colours == canonical_colours(subject.pattern, subject.colours),
    )
    return sum(traits) / len(traits)


def is_subject(img: Image.Image | np.ndarray, subject_name: str) -> bool:
    """True if the image shows the subject: class, pattern and colour pair, order-aware where directional."""
    return subject_score(img, subject_name) == 1.0
