"""Subject photos: EXIF orientation, alpha flattening, centre crop and resize, counts, folders, bad files."""

from __future__ import annotations

import resource
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dreambooth_lora.errors import UserError
from dreambooth_lora.images import (
    MAX_IMAGES,
    check_subject_photos,
    expand_image_paths,
    load_subject_images,
    photo_problem,
    prepare_image,
    read_image,
    size_problem,
)


def halves(path: Path, top=(255, 0, 0), bottom=(0, 0, 255), size=32, **save) -> Path:
    pixels = np.zeros((size, size, 3), dtype=np.uint8)
    pixels[: size // 2], pixels[size // 2 :] = top, bottom
    Image.fromarray(pixels).save(path, **save)
    return path


def mean_rgb(image: Image.Image, box=None) -> np.ndarray:
    return np.asarray(image.crop(box) if box else image, dtype=np.float64).reshape(-1, 3).mean(axis=0)


def test_exif_orientation_is_applied(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: the stored pixels must be turned 90 degrees clockwise to display
    path = halves(tmp_path / "rotated.jpg", format="JPEG", quality=95, exif=exif.tobytes())
    image = prepare_image(read_image(path), 32)
    # Stored: red on top, blue below. Turned clockwise, the top edge becomes the right edge.
    left, right = mean_rgb(image, (0, 0, 12, 32)), mean_rgb(image, (20, 0, 32, 32))
    assert left[2] > 200 and left[0] < 50, left
    assert right[0] > 200 and right[2] < 50, right
    # Without the tag the same pixels stay as stored: red on top.
    plain = prepare_image(read_image(halves(tmp_path / "plain.jpg", format="JPEG", quality=95)), 32)
    assert mean_rgb(plain, (0, 0, 32, 12))[0] > 200


def test_rgba_is_flattened_on_white(tmp_path):
    pixels = np.zeros((16, 16, 4), dtype=np.uint8)
    pixels[:, :8] = (255, 0, 0, 128)  # half-transparent red on the left, fully transparent on the right
    Image.fromarray(pixels, "RGBA").save(tmp_path / "alpha.png")
    image = prepare_image(read_image(tmp_path / "alpha.png"), 16)
    assert image.mode == "RGB"
    assert np.allclose(mean_rgb(image, (10, 0, 16, 16)), 255, atol=1)  # transparent -> white, not black
    assert np.allclose(mean_rgb(image, (0, 0, 6, 16)), (255, 127, 127), atol=2)  # 50% red over white


def test_palette_transparency_is_flattened_on_white(tmp_path):
    image = Image.new("P", (16, 16), 0)
    image.putpalette([0, 0, 0] * 256)
    image.save(tmp_path / "p.png", transparency=0)
    assert np.allclose(mean_rgb(prepare_image(read_image(tmp_path / "p.png"), 16)), 255, atol=1)


@pytest.mark.parametrize("orientation", ["wide", "tall"])
def test_centre_crop_then_resize(tmp_path, orientation):
    # Three equal bands green | red | blue along the long side: only the red middle survives the crop.
    bands = np.zeros((30, 90, 3), dtype=np.uint8)
    bands[:, :30], bands[:, 30:60], bands[:, 60:] = (0, 255, 0), (255, 0, 0), (0, 0, 255)
    if orientation == "tall":
        bands = bands.transpose(1, 0, 2).copy()
    Image.fromarray(bands).save(tmp_path / "bands.png")
    image = prepare_image(read_image(tmp_path / "bands.png"), 24)
    assert image.size == (24, 24) and image.mode == "RGB"
    centre = mean_rgb(image, (4, 4, 20, 20))
    assert centre[0] > 240 and centre[1] < 15 and centre[2] < 15, centre


def test_more_than_five_images_allowed_with_a_note(make_subject_images):
    images, notes = load_subject_images(make_subject_images(6), 16)
    assert len(images) == 6 and all(image.size == (16, 16) for image in images)
    assert len(notes) == 1 and "6 images" in notes[0] and "3-5" in notes[0]
    _, notes = load_subject_images(make_subject_images(5, folder="five"), 16)
    assert notes == []


def test_too_few_and_too_many_images_are_refused(make_subject_images):
    with pytest.raises(UserError, match="at least 3 images.*got 2"):
        load_subject_images(make_subject_images(2, folder="two"), 16)
    with pytest.raises(UserError, match=f"at most {MAX_IMAGES} images.*got {MAX_IMAGES + 1}"):
        load_subject_images(make_subject_images(MAX_IMAGES + 1, folder="many", size=(8, 8)), 8)


def test_folders_are_expanded_to_their_images(make_subject_images, tmp_path):
    files = make_subject_images(3, folder="dir")
    (tmp_path / "dir" / "notes.txt").write_text("not a photo")
    (tmp_path / "dir" / "nested").mkdir()
    extra = make_subject_images(1, folder="other")[0]
    expanded = expand_image_paths([tmp_path / "dir", extra])
    assert expanded == sorted(files) + [extra]
    images, _ = load_subject_images([tmp_path / "dir"], 16)
    assert len(images) == 3


# ----- bad files: each refused with a sentence naming the file -----

def png_claiming_size(path: Path, width: int, height: int) -> Path:
    """A valid 1x1 PNG whose header is patched to claim width x height (the CRC fixed up), a few bytes on disk."""
    Image.new("RGB", (1, 1)).save(path)
    data = bytearray(path.read_bytes())
    assert data[12:16] == b"IHDR"
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    path.write_bytes(bytes(data))
    return path


@pytest.mark.parametrize("width,height", [(30000, 30000), (9000, 9000)])  # past Pillow's own limit; past only ours
def test_decompression_bomb_refused_without_decoding(tmp_path, width, height):
    path = png_claiming_size(tmp_path / "bomb.png", width, height)
    assert path.stat().st_size < 100
    peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    with pytest.raises(UserError, match=r"bomb\.png: .*too large"):
        read_image(path)
    # Decoding would need width*height*3 bytes (243 MB at 9000 px); the peak must not move by that.
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak_before < 50_000


def test_bad_files_are_named(tmp_path):
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "notes.png").write_text("this is not an image")
    Image.new("RGB", (64, 64), (10, 20, 30)).save(tmp_path / "full.png")
    Image.effect_noise((64, 64), 50).convert("RGB").save(tmp_path / "whole.png")
    data = (tmp_path / "whole.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    cases = {"empty.png": "empty file", "notes.png": "not an image", "cut.png": "truncated", "missing.png": "not found"}
    for name, message in cases.items():
        with pytest.raises(UserError, match=f"{name}: .*{message}"):
            read_image(tmp_path / name)
    # load_subject_images reports every bad file at once, not only the first
    with pytest.raises(UserError) as caught:
        load_subject_images([tmp_path / "empty.png", tmp_path / "full.png", tmp_path / "notes.png"], 16)
    assert "empty.png" in str(caught.value) and "notes.png" in str(caught.value) and "full.png" not in str(caught.value)


# ----- sizes: tiny or extreme photos are refused at the training resolution -----

def test_tiny_and_extreme_photos_are_refused_in_one_message(make_subject_images, tmp_path):
    good = make_subject_images(3)
    for name, size in (("dot.png", (1, 1)), ("icon.png", (8, 8)), ("strip.png", (4000, 10))):
        Image.new("RGB", size, (90, 120, 150)).save(tmp_path / name)
    bad = [tmp_path / "dot.png", tmp_path / "icon.png", tmp_path / "strip.png"]
    with pytest.raises(UserError) as caught:
        check_subject_photos([*good, *bad], 64)
    message = str(caught.value)
    assert "dot.png: 1x1 px: its shorter side is below 32 px (half the 64 px training resolution)." in message
    assert "icon.png: 8x8 px: its shorter side is below 32 px" in message
    assert "strip.png: 4000x10 px: its shorter side is below 32 px (half the 64 px training resolution) " \
           "and its sides are further apart than 4:1." in message
    assert "photo" not in message  # the three good photos are not named
    with pytest.raises(UserError, match="icon.png: 8x8 px"):
        load_subject_images([*good, *bad], 64)  # training applies the same rules


def test_size_rules_at_their_limits(tmp_path):
    assert size_problem("a.png", 32, 32, 64) is None and size_problem("a.png", 31, 40, 64) is not None
    assert size_problem("a.png", 400, 100, 64) is None  # exactly 4:1 is allowed
    assert "further apart than 4:1" in size_problem("a.png", 401, 100, 64)
    assert size_problem("a.png", 8, 8, None) is None  # no known size: only the aspect rule
    Image.new("RGB", (40, 36)).save(tmp_path / "ok.png")
    assert photo_problem(tmp_path / "ok.png", 64) is None
    assert photo_problem(tmp_path / "ok.png", 512) == "ok.png: 40x36 px: its shorter side is below 256 px " \
                                                        "(half the 512 px training resolution)."


def test_native_resolution_needs_no_model_load():
    from dreambooth_lora.models import load_base_model, native_resolution

    assert native_resolution("builtin:tiny-random") == load_base_model("builtin:tiny-random").native_resolution == 64
    assert native_resolution("builtin:tiny-world") == 32
    assert native_resolution("runwayml/stable-diffusion-v1-5") == native_resolution("/some/folder") == 512
    assert native_resolution("builtin:nope") is None
