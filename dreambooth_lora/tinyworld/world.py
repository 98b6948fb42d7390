"""The tiny world: one coloured shape on a plain background, 32x32 RGB, seeded and captioned.

A base diffusion model is trained on it on CPU, so everything is small and deterministic given a
seed. Subjects (DreamBooth instances) are looks that the base generator never draws.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
from PIL import Image

IMAGE_SIZE = 32  # the base model is trained on CPU; keep it 32 px
SUPERSAMPLE = 4  # sub-pixels per side, for light anti-aliasing
MARGIN = 1  # objects keep 1 px off the border so the border is pure background

CLASSES = ("ball", "box", "triangle", "ring", "cross")

# Saturated object colours, far apart in RGB and from every background.
OBJECT_COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "yellow": (240, 210, 40),
    "blue": (40, 70, 220),
    "cyan": (40, 200, 220),
    "magenta": (210, 50, 200),
    "pink": (250, 140, 185),
}
COLOURS = tuple(OBJECT_COLOURS)

# Never object colours, so object and background always separate; "green" is free for recontext.
BACKGROUND_COLOURS: dict[str, tuple[int, int, int]] = {
    "white": (240, 240, 240),
    "black": (20, 20, 20),
    "gray": (128, 128, 128),
    "green": (50, 150, 60),
}
BACKGROUNDS = tuple(BACKGROUND_COLOURS)
# Shipped instance images avoid "green" so that "sks ball on a green background" tests recontext.
INSTANCE_BACKGROUNDS = ("white", "black", "gray")

PATTERNS = ("solid", "split", "halves", "stripes")
SOLID_PROBABILITY = 0.7
STRIPE_WIDTH = 4  # px

# Two-colour pairs whose blend at the seam stays nearest one of the pair (and far from every
# background). Complementary pairs blur to gray and red|blue to a magenta-ish purple: a trap for
# the VAE and the analyser, so they are never patterned together.
PATTERN_PAIRS = (
    ("red", "yellow"),
    ("red", "magenta"),
    ("red", "pink"),
    ("yellow", "pink"),
    ("blue", "cyan"),
    ("blue", "magenta"),
    ("magenta", "pink"),
)

SIZE_RANGE = (14, 26)  # px, inclusive
RING_INNER_RATIO = 0.5  # hole diameter / outer diameter; survives blur at the smallest size
CROSS_ARM_RATIO = 1 / 3  # arm thickness / size

# (class, colour, background) never used in base training; no two share a pair of attributes,
# so every pair is still seen and prompt following can be measured on unseen combinations.
HELD_OUT: tuple[tuple[str, str, str], ...] = (
    ("ball", "red", "green"),
    ("ball", "cyan", "gray"),
    ("box", "red", "black"),
    ("box", "blue", "gray"),
    ("triangle", "red", "white"),
    ("triangle", "blue", "black"),
    ("triangle", "magenta", "green"),
    ("ring", "yellow", "green"),
    ("ring", "cyan", "black"),
    ("cross", "red", "gray"),
    ("cross", "magenta", "white"),
    ("cross", "pink", "green"),
)


@dataclass(frozen=True)
class Scene:
    """One image's ground truth: colours are ordered left|right, top|bottom, or stripes from the left."""

    cls: str
    pattern: str
    colours: tuple[str, ...]
    background: str
    size: int
    x: int
    y: int


@dataclass(frozen=True)
class Subject:
    """A DreamBooth subject: a look (class, pattern, colour order) the base generator never draws."""

    name: str
    cls: str
    pattern: str
    colours: tuple[str, str]
    identifier: str  # what the studio's example fills in: distinct, so example subjects mix (docs/DESIGN.md, "Identifiers")


SUBJECTS: dict[str, Subject] = {
    subject.name: subject
    for subject in (
        Subject("redyellow-ball", "ball", "split", ("red", "yellow"), "rby"),
        Subject("bluecyan-box", "box", "stripes", ("blue", "cyan"), "bcx"),
        Subject("pinkred-ring", "ring", "halves", ("pink", "red"), "prx"),
    )
}

SUBJECT_IMAGE_DIR = Path(__file__).parent / "subjects"
INSTANCE_IMAGE_COUNT = 4
INSTANCE_SEED = 2024  # fixed so scripts/make_subject_images.py reproduces the shipped PNGs


# ---------------------------------------------------------------- sampling


def canonical_colours(pattern: str, colours: tuple[str, ...]) -> tuple[str, ...]:
    """Colours in the order that identifies a look: stripes have no direction, so palette order."""
    if pattern == "stripes":
        return tuple(sorted(colours, key=COLOURS.index))
    return tuple(colours)


def is_subject_look(cls: str, pattern: str, colours: tuple[str, ...]) -> bool:
    """True if this class/pattern/colour pair belongs to a subject (in either order)."""
    return any(
        cls == s.cls and pattern == s.pattern and set(colours) == set(s.colours)
        for s in SUBJECTS.values()
    )


def is_held_out(cls: str, colours: tuple[str, ...], background: str) -> bool:
    """True if any of the object's colours makes a held-out combination with class and background."""
    return any((cls, colour, background) in HELD_OUT for colour in colours)


def place(rng: np.random.Generator) -> tuple[int, int, int]:
    """Random size and top-left corner that keep the object fully inside the image."""
    size = int(rng.integers(SIZE_RANGE[0], SIZE_RANGE[1] + 1))
    high = IMAGE_SIZE - MARGIN - size
    return size, int(rng.integers(MARGIN, high + 1)), int(rng.integers(MARGIN, high + 1))


def scene_for(
    rng: np.random.Generator,
    cls: str,
    colours: tuple[str, ...],
    background: str,
    pattern: str = "solid",
) -> Scene:
    """A scene with the given attributes and a random size and position."""
    size, x, y = place(rng)
    return Scene(cls, pattern, canonical_colours(pattern, tuple(colours)), background, size, x, y)


def sample(rng: np.random.Generator, exclude_held_out: bool = False, solid_probability: float = SOLID_PROBABILITY) -> Scene:
    """One random base-world scene; never a subject look, and never held out if asked."""
    while True:
        cls = CLASSES[rng.integers(len(CLASSES))]
        background = BACKGROUNDS[rng.integers(len(BACKGROUNDS))]
        if rng.random() < solid_probability:
            pattern, colours = "solid", (COLOURS[rng.integers(len(COLOURS))],)
        else:
            pattern = PATTERNS[1 + rng.integers(len(PATTERNS) - 1)]
            pair = PATTERN_PAIRS[rng.integers(len(PATTERN_PAIRS))]
            colours = pair if rng.random() < 0.5 else pair[::-1]
        scene = scene_for(rng, cls, colours, background, pattern)
        if is_subject_look(scene.cls, scene.pattern, scene.colours):
            continue
        if exclude_held_out and is_held_out(scene.cls, scene.colours, scene.background):
            continue
        return scene


def subject_scene(
    subject: Subject, rng: np.random.Generator, background: str | None = None
) -> Scene:
    """A random placement of the subject; background random among the instance backgrounds if None."""
    if background is None:
        background = INSTANCE_BACKGROUNDS[rng.integers(len(INSTANCE_BACKGROUNDS))]
    return scene_for(rng, subject.cls, subject.colours, background, subject.pattern)


# ---------------------------------------------------------------- rendering


def shape_coverage_grid(cls: str, u: np.ndarray, v: np.ndarray, x: float, y: float, size: float) -> np.ndarray:
    """Boolean inside-test of the shape at continuous top-left (x, y) for points (u, v) in pixels."""
    cx, cy, half = x + size / 2, y + size / 2, size / 2
    if cls == "ball":
        return (u - cx) ** 2 + (v - cy) ** 2 <= half**2
    if cls == "box":
        return (np.abs(u - cx) <= half) & (np.abs(v - cy) <= half)
    if cls == "ring":
        r2 = (u - cx) ** 2 + (v - cy) ** 2
        return (r2 <= half**2) & (r2 >= (half * RING_INNER_RATIO) ** 2)
    if cls == "triangle":
        # apex at top centre, base along the bottom edge
        depth = (v - y) / size
        return (depth >= 0) & (depth <= 1) & (np.abs(u - cx) <= half * depth)
    if cls == "cross":
        arm = size * CROSS_ARM_RATIO / 2
        inside = (np.abs(u - cx) <= half) & (np.abs(v - cy) <= half)
        return inside & ((np.abs(u - cx) <= arm) | (np.abs(v - cy) <= arm))
    raise ValueError(f"unknown class {cls!r}; expected one of {CLASSES}")


def subpixel_grid(image_size: int = IMAGE_SIZE, factor: int = SUPERSAMPLE) -> tuple[np.ndarray, np.ndarray]:
    """Sub-pixel centre coordinates (u, v), shape (H*f, W*f), in pixel units."""
    axis = (np.arange(image_size * factor) + 0.5) / factor
    return np.meshgrid(axis, axis)


def pattern_first_colour(pattern: str, u: np.ndarray, v: np.ndarray, scene: Scene) -> np.ndarray:
    """Boolean map: True where the first colour of the pattern is drawn."""
    if pattern == "solid":
        return np.ones_like(u, dtype=bool)
    if pattern == "split":
        return u < scene.x + scene.size / 2
    if pattern == "halves":
        return v < scene.y + scene.size / 2
    if pattern == "stripes":
        return np.floor((u - scene.x) / STRIPE_WIDTH) % 2 == 0
    raise ValueError(f"unknown pattern {pattern!r}; expected one of {PATTERNS}")


def render_array(scene: Scene) -> np.ndarray:
    """The scene as a uint8 (32, 32, 3) array, anti-aliased by box-filtering a supersampled grid."""
    u, v = subpixel_grid()
    inside = shape_coverage_grid(scene.cls, u, v, scene.x, scene.y, scene.size)
    first = pattern_first_colour(scene.pattern, u, v, scene)
    fine = np.empty(u.shape + (3,), dtype=np.float32)
    fine[:] = BACKGROUND_COLOURS[scene.background]
    fine[inside & first] = OBJECT_COLOURS[scene.colours[0]]
    fine[inside & ~first] = OBJECT_COLOURS[scene.colours[-1]]
    f = SUPERSAMPLE
    coarse = fine.reshape(IMAGE_SIZE, f, IMAGE_SIZE, f, 3).mean(axis=(1, 3))
    return np.round(coarse).astype(np.uint8)


def render(scene: Scene) -> Image.Image:
    """The scene as a 32x32 RGB PIL image."""
    return Image.fromarray(render_array(scene), mode="RGB")


# ---------------------------------------------------------------- captions


def describe_object(cls: str, pattern: str = "solid", colours: tuple[str, ...] = ()) -> str:
    """'red ball', 'red and blue split ball', or just 'ball' when no colour is given."""
    if not colours:
        return cls
    if pattern == "solid":
        return f"{colours[0]} {cls}"
    return f"{colours[0]} and {colours[1]} {pattern} {cls}"


def compose_caption(
    cls: str,
    pattern: str = "solid",
    colours: tuple[str, ...] = (),
    background: str | None = None,
    photo: bool = True,
) -> str:
    """A caption from parts, e.g. 'a photo of a red ball on a white background'."""
    text = f"a {describe_object(cls, pattern, colours)}"
    if photo:
        text = f"a photo of {text}"
    if background is not None:
        text = f"{text} on a {background} background"
    return text


def full_caption(scene: Scene) -> str:
    """The complete caption: 'a photo of a red and blue split ball on a white background'."""
    return compose_caption(scene.cls, scene.pattern, scene.colours, scene.background)


def caption_variant(scene: Scene, rng: np.random.Generator) -> str:
    """A seeded caption variant: the full caption half the time, else a shorter form."""
    # (keep colour, keep background, say "a photo of"): the full form is the first entry
    forms = (
        (True, True, True),
        (True, False, False),
        (False, False, True),
        (False, True, False),
        (True, True, False),
        (True, False, True),
    )
    index = 0 if rng.random() < 0.5 else int(rng.integers(1, len(forms)))
    keep_colour, keep_background, photo = forms[index]
    return compose_caption(
        scene.cls,
        scene.pattern,
        scene.colours if keep_colour else (),
        scene.background if keep_background else None,
        photo,
    )


def vocabulary() -> list[str]:
    """Every word that can appear in a caption, sorted (the core builds its tokenizer from it)."""
    words = {"a", "photo", "of", "on", "background", "and"}
    words.update(CLASSES, COLOURS, BACKGROUNDS, PATTERNS[1:])
    return sorted(words)


# ---------------------------------------------------------------- datasets and subjects


def dataset(
    n: int, seed: int, exclude_held_out: bool = False, solid_probability: float = SOLID_PROBABILITY
) -> Iterator[tuple[Image.Image, str, Scene]]:
    """n seeded (image, caption variant, scene) triples of the base world; no subject looks."""
    rng = np.random.default_rng(seed)
    for _ in range(n):
        scene = sample(rng, exclude_held_out, solid_probability)
        yield render(scene), caption_variant(scene, rng), scene


def render_subject(
    name: str, rng: np.random.Generator, background: str | None = None
) -> tuple[Image.Image, Scene]:
    """A random rendering of the named subject and its scene."""
    if name not in SUBJECTS:
        raise KeyError(f"unknown subject {name!r}; expected one of {sorted(SUBJECTS)}")
    scene = subject_scene(SUBJECTS[name], rng, background)
    return render(scene), scene


def instance_scenes(name: str, count: int = INSTANCE_IMAGE_COUNT, seed: int = INSTANCE_SEED) -> list[Scene]:
    """The scenes of the shipped instance images: varied placement, backgrounds cycling over
    INSTANCE_BACKGROUNDS (all on one background, the identifier absorbs the background)."""
    rng = np.random.default_rng([seed, list(SUBJECTS).index(name)])
    return [
        subject_scene(SUBJECTS[name], rng, INSTANCE_BACKGROUNDS[i % len(INSTANCE_BACKGROUNDS)])
        for i in range(count)
    ]


def subject_image_paths(name: str) -> list[Path]:
    """The shipped instance images of the named subject, in order."""
    if name not in SUBJECTS:
        raise KeyError(f"unknown subject {name!r}; expected one of {sorted(SUBJECTS)}")
    return sorted((SUBJECT_IMAGE_DIR / name).glob("*.png"), key=lambda p: int(p.stem))
