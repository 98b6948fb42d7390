"""The procedural tiny world (32x32 shapes with captions) and the rule-based analyser that reads it back."""

from .analyser import Attributes, analyse, expected_attributes, is_subject, soften, subject_score
from .world import (
    BACKGROUNDS,
    CLASSES,
    COLOURS,
    HELD_OUT,
    PATTERNS,
    SUBJECTS,
    Scene,
    Subject,
    caption_variant,
    compose_caption,
    dataset,
    full_caption,
    render,
    render_subject,
    sample,
    subject_image_paths,
    vocabulary,
)
