"""The Generate tab's work as plain functions: form values to settings, generate (kept in the history), the weight
sweep and saving a mix. No Gradio here, so each is tested without a browser (tests/test_ui_generation.py)."""

from __future__ import annotations

import tempfile
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
from PIL import Image

from dreambooth_lora.errors import UserError
from dreambooth_lora.generate import AdapterSession, GenerateSettings, base_model_for, format_weight, resolve_adapters, split_weight
from dreambooth_lora.history import Generation, record_generation
from dreambooth_lora.library import AdapterEntry, Library
from dreambooth_lora.models import default_base_model, load_base_model
from dreambooth_lora.sweep import run_sweep

MAX_MIX = 4  # sliders in the Generate tab's fixed pool


class ModelCache:
    """Loaded base models with their AdapterSession, keyed by base-model name (the last `size` kept)."""

    def __init__(self, size: int = 1):
        self.size = size
        self.sessions: OrderedDict[str, AdapterSession] = OrderedDict()
        self.lock = threading.Lock()  # one generation at a time per process: a session is stateful

    def session(self, base_model: str) -> AdapterSession:
        if base_model in self.sessions:
            self.sessions.move_to_end(base_model)
        else:
            self.sessions[base_model] = AdapterSession(load_base_model(base_model))
            while len(self.sessions) > self.size:
                self.sessions.popitem(last=False)
        return self.sessions[base_model]


def mix_specs(chosen, weights, text_apart=False, text_weights=()) -> list[tuple[str, object]]:
    """(name, weight) per chosen adapter, or (name, (unet, text)) with the text strengths set apart (generate's
    `NAME=UNET:TEXT`); past the sliders' pool there is no weight (views.mix_note says so)."""
    names = list(chosen or [])[:MAX_MIX]
    if not text_apart:
        return [(name, float(weight)) for name, weight in zip(names, weights)]
    return [(name, (float(weight), float(text))) for name, weight, text in zip(names, weights, text_weights)]


def generate_settings(prompt, negative, seed, steps, guidance, size, count, chosen=(), weights=(), text_apart=False,
                      text_weights=()) -> GenerateSettings:
    """The Generate form's values as GenerateSettings (validated there); size 0 means the model's native size."""
    return GenerateSettings(
        prompt=prompt or "", negative_prompt=negative or "", num_images=int(count), steps=int(steps),
        guidance=float(guidance), seed=int(seed or 0), size=int(size) if size else None,
        adapters=tuple(mix_specs(chosen, weights, text_apart, text_weights)),
    )


def form_of(generation: Generation) -> dict:
    """A past generation's settings as the Generate form's values (generate_settings' inverse), to repeat it."""
    s = generation.settings
    pairs = [split_weight(tuple(w) if isinstance(w, list) else w) for _, w in s.adapters]
    apart = any(unet != text for unet, text in pairs)
    return dict(prompt=s.prompt, negative=s.negative_prompt, seed=s.seed, steps=s.steps, guidance=s.guidance,
                size=s.size or 0, count=s.num_images, chosen=[name for name, _ in s.adapters],
                weights=[unet for unet, _ in pairs], text_apart=apart, text_weights=[text for _, text in pairs],
                base_model=generation.base_model)


def mix_text(adapters) -> str:
    return ", ".join(f"{name} × {format_weight(tuple(w) if isinstance(w, list) else w)}" for name, w in adapters) or "no adapters"


@dataclass(frozen=True)
class GenerationResult:
    generation: Generation
    captioned: list[tuple[str, str]]  # (image file, "seed N"): each image says how to draw it again
    message: str


def run_generation(library: Library, cache: ModelCache, settings: GenerateSettings, base_model: str | None) -> GenerationResult:
    """Generate with the settings' adapters (on their base model, else `base_model`) and keep it in the history."""
    adapters = resolve_adapters(library, list(settings.adapters))
    model_name = base_model_for(adapters, None, (base_model or "").strip() or default_base_model())
    started = time.time()
    with cache.lock:
        session = cache.session(model_name)
        session.apply(adapters)
        images = session.generate(settings)
    seconds = time.time() - started
    generation = record_generation(library.history_root, images, settings, model_name, seconds)
    captioned = [(str(path), f"seed {settings.seed + i}") for i, path in enumerate(generation.images)]
    message = (f"{len(images)} images from {model_name} with {mix_text(settings.adapters)} in {seconds:.1f} s "
               "(kept in the history below).")
    return GenerationResult(generation, captioned, message)


HISTORY_COLUMNS = ["time", "prompt", "adapters", "seed", "steps", "guidance", "size", "images", "base model", "id"]


def history_frame(generations: list[Generation]) -> pd.DataFrame:
    """The history table: when, prompt, adapters and weights, seed, steps, guidance, size, images, base model, id."""
    rows = [[time.strftime("%H:%M:%S", time.localtime(g.created)), g.settings.prompt, mix_text(g.settings.adapters),
             g.settings.seed, g.settings.steps, g.settings.guidance, g.settings.size or "native", g.settings.num_images,
             g.base_model, g.id] for g in generations]
    return pd.DataFrame(rows, columns=HISTORY_COLUMNS)


def history_text(generation: Generation) -> str:
    s = generation.settings
    negative = f" · negative *{s.negative_prompt}*" if s.negative_prompt else ""
    return (f"From the history: *{s.prompt}*{negative} · {mix_text(s.adapters)} · seeds {s.seed}-{s.seed + s.num_images - 1}"
            f" · {s.steps} steps · guidance {s.guidance:g} · {generation.base_model}; its settings are in the form again.")


def run_weight_sweep(library: Library, cache: ModelCache, settings: GenerateSettings) -> tuple[Image.Image, Path, str]:
    """The settings' prompt at the sweep's weights of each chosen adapter, as a labelled grid, also saved as a PNG."""
    mix = list(settings.adapters)
    if not mix:
        raise UserError("Choose the adapters to sweep first.")
    adapters = resolve_adapters(library, mix)
    model_name = base_model_for(adapters, None, default_base_model())
    started = time.time()
    with cache.lock:
        grid = run_sweep(cache.session(model_name), library, settings, mix)
    path = Path(tempfile.mkdtemp(prefix="dbl-sweep-")) / "weight-sweep.png"
    grid.save(path)
    message = (f"Weight sweep of {', '.join(n for n, _ in mix)} at seed {settings.seed} "
               f"in {time.time() - started:.1f} s.")
    return grid, path, message


def save_mix(library: Library, cache: ModelCache, mix: list[tuple[str, float]], name: str, prompt: str, seed: int,
             steps: int, guidance: float) -> tuple[AdapterEntry, str]:
    """Save the chosen adapters at their weights as one adapter (exact concatenation) with four samples of the mix
    itself at the form's prompt (else its first part's), so the Library shows what it draws."""
    from dreambooth_lora.mixing import mix_adapters

    if not mix:
        raise UserError("Choose the adapters to mix first.")
    adapters = resolve_adapters(library, mix)
    first = adapters[0][0]
    settings = GenerateSettings(prompt=(prompt or "").strip() or f"a photo of {first.token} {first.class_noun}",
                                num_images=4, steps=int(steps), guidance=float(guidance), seed=int(seed or 0))
    with cache.lock:
        session = cache.session(base_model_for(adapters, None, default_base_model()))
        session.apply(adapters)
        samples = session.generate(settings)
    entry, _ = mix_adapters(library, mix, (name or "").strip(), method="cat", samples=samples)
    return entry, (f"Saved the mix as **{entry.name}** (exact concatenation, rank {entry.rank}) with samples of "
                   f"*{settings.prompt}*.")
