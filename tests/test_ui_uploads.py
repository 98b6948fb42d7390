"""The studio's upload check applies the training photo rules and names each rejected file (no browser needed)."""

from __future__ import annotations

from PIL import Image

from app.views import check_uploads


def test_upload_check_names_tiny_and_extreme_photos(make_subject_images, tmp_path):
    good = [str(p) for p in make_subject_images(3)]
    bad = []
    for name, size in (("dot.png", (1, 1)), ("icon.png", (8, 8)), ("strip.png", (4000, 10))):
        Image.new("RGB", size).save(tmp_path / name)
        bad.append(str(tmp_path / name))
    previews, notes = check_uploads(good + bad, "builtin:tiny-random", 0)  # 0: the model's native 64 px
    assert previews == good
    for text in ("dot.png: 1x1 px", "icon.png: 8x8 px", "strip.png: 4000x10 px", "half the 64 px training resolution",
                 "4:1"):
        assert text in notes
    previews, notes = check_uploads(good, "builtin:tiny-random", 128)  # a larger resolution asked for
    assert previews == [] and "photo0.png: 40x36 px: its shorter side is below 64 px" in notes
