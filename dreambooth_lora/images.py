"""Reading subject photos: validation with one clear message, EXIF, RGB, centre crop, resize."""

from __future__ import annotations

import warnings
from pathlib import Path

from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import UserError

MIN_IMAGES = 3  # DreamBooth works from 3-5 photos of the subject
MAX_IMAGES = 20
RECOMMENDED_MAX = 5
MAX_PIXELS = 8192 * 8192  # larger than any camera photo; more is a decompression bomb
MIN_SIDE_SHARE = 0.5  # the shorter side at least half the training resolution: smaller is upscaled into mush
MAX_ASPECT = 4.0  # longer side at most 4x the shorter: the centre crop of a longer strip keeps too little
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"}


def expand_image_paths(paths: list[str | Path]) -> list[Path]:
    """Files as given, folders expanded to the image files they hold (sorted)."""
    expanded: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            expanded += sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        else:
            expanded.append(path)
    return expanded


def load_subject_images(paths: list[str | Path], resolution: int) -> tuple[list[Image.Image], list[str]]:
    """Load and prepare the subject's photos; returns images and notes, raises UserError naming every bad file."""
    return _subject_images(paths, resolution, prepare=True)


def check_subject_photos(paths: list[str | Path], resolution: int | None) -> list[str]:
    """The checks of load_subject_images without preparing the images (for a job before it is queued); returns notes.

    `resolution` None (a base model with no known size) leaves out the shorter-side rule."""
    return _subject_images(paths, resolution, prepare=False)[1]


def photo_problem(path: Path, resolution: int | None) -> str | None:
    """Why one photo cannot be trained on at `resolution` (a sentence naming it), or None."""
    try:
        read_photo(Path(path), resolution)
    except UserError as error:
        return str(error)
    return None


def size_problem(name: str, width: int, height: int, resolution: int | None) -> str | None:
    """A sentence naming the file, its size and each rule it breaks, or None."""
    shorter, longer = min(width, height), max(width, height)
    rules = []
    if resolution is not None and shorter < resolution * MIN_SIDE_SHARE:
        rules.append(f"its shorter side is below {resolution * MIN_SIDE_SHARE:g} px "
                     f"(half the {resolution} px training resolution)")
    if longer > MAX_ASPECT * shorter:
        rules.append(f"its sides are further apart than {MAX_ASPECT:g}:1")
    return f"{name}: {width}x{height} px: {' and '.join(rules)}." if rules else None


def read_photo(path: Path, resolution: int | None) -> Image.Image:
    """read_image, then the size rules for training at `resolution`."""
    image = read_image(path)
    problem = size_problem(path.name, image.width, image.height, resolution)
    if problem:
        raise UserError(problem)
    return image


def _subject_images(paths, resolution: int | None, prepare: bool) -> tuple[list[Image.Image], list[str]]:
    files = expand_image_paths(paths)
    problems, images = [], []
    for path in files:
        try:
            image = read_photo(path, resolution)
            images.append(prepare_image(image, resolution) if prepare else None)  # one photo in memory at a time
        except UserError as error:
            problems.append(str(error))
    if problems:
        raise UserError(" ".join(problems))
    if len(images) < MIN_IMAGES:
        raise UserError(f"Give at least {MIN_IMAGES} images of the subject; got {len(images)}.")
    if len(images) > MAX_IMAGES:
        raise UserError(f"Give at most {MAX_IMAGES} images of the subject; got {len(images)}.")
    notes = []
    if len(images) > RECOMMENDED_MAX:
        notes.append(f"{len(images)} images given: DreamBooth usually needs only 3-5; training will take longer.")
    return images, notes


def read_image(path: Path) -> Image.Image:
    """Open and fully decode one image file, or raise UserError naming it and the problem."""
    if not path.exists():
        raise UserError(f"{path.name}: file not found.")
    if path.is_dir() or path.stat().st_size == 0:
        raise UserError(f"{path.name}: empty file.")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as opened:
                if opened.width * opened.height > MAX_PIXELS:
                    raise UserError(f"{path.name}: {opened.width}x{opened.height} pixels is too large to be a photo.")
                opened.load()
                image = opened.copy()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise UserError(f"{path.name}: image is too large (possible decompression bomb).") from None
    except UnidentifiedImageError:
        raise UserError(f"{path.name}: not an image file.") from None
    except (OSError, SyntaxError, ValueError) as error:
        raise UserError(f"{path.name}: unreadable or truncated image ({error}).".replace("\n", " ")) from None
    return image


def prepare_image(image: Image.Image, resolution: int) -> Image.Image:
    """Apply EXIF orientation, flatten alpha on white, centre-crop to square and resize."""
    image = ImageOps.exif_transpose(image)
    if image.mode in ("RGBA", "LA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, rgba)
    image = image.convert("RGB")
    return ImageOps.fit(image, (resolution, resolution), method=Image.Resampling.LANCZOS)
