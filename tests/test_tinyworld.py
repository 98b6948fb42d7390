"""The tiny world is deterministic, keeps held-out and subject looks out, and the analyser reads it back."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from PIL import Image

from dreambooth_lora.tinyworld import analyser, world
from dreambooth_lora.tinyworld.analyser import analyse, expected_attributes, is_subject, soften


def accuracy(n: int, seed: int, softened: bool) -> dict[str, float]:
    """Per-attribute and all-correct accuracy of the analyser on n fresh scenes."""
    rng = np.random.default_rng(seed)
    fields = ("cls", "colours", "pattern", "background")
    hits = dict.fromkeys(fields + ("all",), 0)
    for _ in range(n):
        scene = world.sample(rng)
        image = soften(world.render(scene), rng) if softened else world.render(scene)
        seen, truth = analyse(image), expected_attributes(scene)
        right = [getattr(seen, f) == getattr(truth, f) for f in fields]
        for field, ok in zip(fields + ("all",), right + [all(right)]):
            hits[field] += ok
    return {field: count / n for field, count in hits.items()}


# ---------------------------------------------------------------- the world


def test_dataset_is_deterministic_given_the_seed():
    first = list(world.dataset(30, seed=7))
    again = list(world.dataset(30, seed=7))
    other = list(world.dataset(30, seed=8))
    for (image_a, caption_a, scene_a), (image_b, caption_b, scene_b) in zip(first, again):
        assert np.array_equal(np.asarray(image_a), np.asarray(image_b))
        assert (caption_a, scene_a) == (caption_b, scene_b)
    assert [s for _, _, s in first] != [s for _, _, s in other]


def test_renders_are_32px_rgb_with_a_pure_background_border():
    rng = np.random.default_rng(0)
    for _ in range(200):
        scene = world.sample(rng)
        array = np.asarray(world.render(scene))
        assert array.shape == (32, 32, 3) and array.dtype == np.uint8
        border = analyser.border_pixels(array.astype(np.float32))
        assert (border == world.BACKGROUND_COLOURS[scene.background]).all(), scene
        assert world.SIZE_RANGE[0] <= scene.size <= world.SIZE_RANGE[1]


def test_pattern_mix_is_about_seventy_percent_solid():
    rng = np.random.default_rng(1)
    scenes = [world.sample(rng) for _ in range(3000)]
    solid = sum(s.pattern == "solid" for s in scenes) / len(scenes)
    assert 0.65 < solid < 0.75
    assert {s.pattern for s in scenes} == set(world.PATTERNS)
    for s in scenes:
        if s.pattern != "solid":
            assert tuple(sorted(s.colours)) in {tuple(sorted(p)) for p in world.PATTERN_PAIRS}


def test_pattern_pairs_do_not_blend_into_another_named_colour():
    named = world.OBJECT_COLOURS | world.BACKGROUND_COLOURS
    for a, b in world.PATTERN_PAIRS:
        seam = (np.array(named[a]) + np.array(named[b])) / 2
        nearest = min(named, key=lambda n: np.linalg.norm(np.array(named[n]) - seam))
        assert nearest in (a, b), (a, b, nearest)


def test_held_out_keeps_every_pair_of_attributes_seen():
    kept = [
        combo
        for combo in itertools.product(world.CLASSES, world.COLOURS, world.BACKGROUNDS)
        if combo not in world.HELD_OUT
    ]
    assert 0.08 <= len(world.HELD_OUT) / (len(kept) + len(world.HELD_OUT)) <= 0.12
    for i, j in itertools.combinations(range(3), 2):
        seen = {(c[i], c[j]) for c in kept}
        every = {(c[i], c[j]) for c in itertools.product(world.CLASSES, world.COLOURS, world.BACKGROUNDS)}
        assert seen == every


def test_held_out_combinations_never_produced_with_exclude_on():
    rng = np.random.default_rng(2)
    excluded = [world.sample(rng, exclude_held_out=True) for _ in range(4000)]
    assert not any(world.is_held_out(s.cls, s.colours, s.background) for s in excluded)
    rng = np.random.default_rng(2)
    included = [world.sample(rng) for _ in range(4000)]
    assert any(world.is_held_out(s.cls, s.colours, s.background) for s in included)


def test_base_generator_never_draws_a_subject_look():
    rng = np.random.default_rng(3)
    for _ in range(6000):
        scene = world.sample(rng)
        for subject in world.SUBJECTS.values():
            same_look = (scene.cls, scene.pattern) == (subject.cls, subject.pattern)
            assert not (same_look and set(scene.colours) == set(subject.colours)), scene


def test_captions_use_only_vocabulary_words():
    vocabulary = set(world.vocabulary())
    assert world.vocabulary() == sorted(vocabulary)
    captions = [caption for _, caption, _ in world.dataset(400, seed=4)]
    rng = np.random.default_rng(4)
    captions += [world.full_caption(world.sample(rng)) for _ in range(400)]
    for caption in captions:
        assert set(caption.split()) <= vocabulary, caption
    assert len(set(captions)) > 100
    assert "green" in world.BACKGROUNDS and "green" not in world.COLOURS


def test_full_caption_names_colours_pattern_and_background():
    solid = world.Scene("ball", "solid", ("red",), "white", 20, 4, 4)
    split = world.Scene("ball", "split", ("red", "blue"), "white", 20, 4, 4)
    assert world.full_caption(solid) == "a photo of a red ball on a white background"
    assert world.full_caption(split) == "a photo of a red and blue split ball on a white background"
    assert world.compose_caption("ball", background="black", photo=False) == "a ball on a black background"


# ---------------------------------------------------------------- subjects


def test_shipped_subject_images_are_32px_rgb_subjects_on_several_backgrounds():
    for name in world.SUBJECTS:
        paths = world.subject_image_paths(name)
        assert 3 <= len(paths) <= 5
        scenes = world.instance_scenes(name, count=len(paths))
        for path, scene in zip(paths, scenes):
            image = Image.open(path)
            assert image.size == (32, 32) and image.mode == "RGB"
            # scripts/make_subject_images.py reproduces them exactly
            assert np.array_equal(np.asarray(image), np.asarray(world.render(scene)))
            assert is_subject(image, name)
        assert len({s.background for s in scenes}) >= 2
        assert "green" not in {s.background for s in scenes}


def test_is_subject_detects_softened_subjects_and_rejects_the_base_world():
    rng = np.random.default_rng(5)
    for name in world.SUBJECTS:
        hits = sum(is_subject(soften(world.render_subject(name, rng)[0], rng), name) for _ in range(60))
        assert hits / 60 >= 0.95, name
    false_hits = 0
    for _ in range(300):
        image = soften(world.render(world.sample(rng)), rng)
        false_hits += any(is_subject(image, name) for name in world.SUBJECTS)
    assert false_hits / 300 <= 0.01


def test_is_subject_is_order_aware_for_directional_patterns():
    rng = np.random.default_rng(6)
    mirrored = world.scene_for(rng, "ball", ("yellow", "red"), "white", "split")
    assert not is_subject(world.render(mirrored), "redyellow-ball")
    assert analyser.subject_score(world.render(mirrored), "redyellow-ball") == 0.75


# ---------------------------------------------------------------- the analyser


@pytest.mark.parametrize("softened", [False, True], ids=["clean", "blur+noise"])
def test_analyser_accuracy_at_least_95_percent(softened):
    result = accuracy(300, seed=10 + softened, softened=softened)
    assert min(result.values()) >= 0.95, result


def test_analyser_reads_an_empty_image_as_nothing():
    empty = np.full((32, 32, 3), world.BACKGROUND_COLOURS["gray"], dtype=np.uint8)
    seen = analyse(empty)
    assert (seen.cls, seen.colours, seen.background) == (analyser.NOTHING, (), "gray")


def test_analyser_accepts_float_arrays_in_unit_range():
    rng = np.random.default_rng(7)
    scene = world.sample(rng)
    unit = np.asarray(world.render(scene), dtype=np.float32) / 255.0
    assert analyse(unit) == expected_attributes(scene)
