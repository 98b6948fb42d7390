"""Generation with library adapters mixed by weight (negative weights allowed), writing PNGs with settings."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from peft.tuners.lora import LoraLayer
from PIL import Image, PngImagePlugin

from .errors import UserError
from .library import AdapterEntry, Library
from .adapter_file import read_adapter
from .identifier import IdentifierEmbedding, mix_identifiers
from .models import BaseModel, load_base_model
from .paths import atomic_path


@dataclass(frozen=True)
class GenerateSettings:
    prompt: str
    negative_prompt: str = ""
    num_images: int = 4
    steps: int = 20  # DPM-Solver++ converges in ~20 steps
    guidance: float = 5.0
    seed: int = 0
    size: int | None = None  # None: the base model's native size
    adapters: tuple[tuple[str, float], ...] = field(default_factory=tuple)

    def __post_init__(self):
        if not self.prompt.strip():
            raise UserError("--prompt is empty: say what to draw, e.g. 'a photo of sks dog'.")
        if not 1 <= self.num_images <= 64:
            raise UserError(f"--num-images {self.num_images}: must be from 1 to 64.")
        if not 1 <= self.steps <= 500:
            raise UserError(f"--steps {self.steps}: must be from 1 to 500.")
        if not 0 <= self.guidance <= 50:
            raise UserError(f"--guidance {self.guidance}: must be from 0 to 50.")
        if self.size is not None and (self.size % 8 or not 16 <= self.size <= 2048):
            raise UserError(f"--size {self.size}: must be a multiple of 8 from 16 to 2048.")


def parse_adapter_spec(spec: str) -> tuple[str, float]:
    """'name=0.8' -> ('name', 0.8); a bare name means weight 1."""
    name, sep, weight = spec.rpartition("=") if "=" in spec else (spec, "", "1")
    try:
        value = float(weight)
    except ValueError:
        raise UserError(f"--adapter {spec!r}: the weight after '=' must be a number, e.g. {name}=0.8.") from None
    if not -10 <= value <= 10:
        raise UserError(f"--adapter {spec!r}: weight must be between -10 and 10.")
    return name, value


def resolve_adapters(library: Library, specs: list[tuple[str, float]]) -> list[tuple[AdapterEntry, float]]:
    return [(library.get(name), weight) for name, weight in specs]


def base_model_for(adapters: list[tuple[AdapterEntry, float]], explicit: str | None, default: str) -> str:
    """The adapters' own base model unless one is named; adapters from different models are refused."""
    bases = {entry.base_model for entry, _ in adapters}
    prints = {entry.fingerprint for entry, _ in adapters}
    if len(prints) > 1:
        listing = ", ".join(f"{e.name} ({e.base_model})" for e, _ in adapters)
        raise UserError(f"These adapters were trained on different base models and cannot be mixed: {listing}.")
    return explicit or (bases.pop() if bases else default)


class AdapterSession:
    """A base pipeline with a set of adapters applied at given weights; reusable between calls."""

    def __init__(self, model: BaseModel):
        self.model = model
        self.pipe = model.pipeline()
        self.loaded: dict[str, str] = {}  # adapter id -> peft adapter name
        self.fused = False
        self.identifier: IdentifierEmbedding | None = None

    def apply(self, adapters: list[tuple[AdapterEntry, float]], fuse: bool = False) -> None:
        for entry, _ in adapters:
            check_compatible(entry, self.model)
        self.clear()
        names, weights, identifiers = [], [], []
        for index, (entry, weight) in enumerate(adapters):
            adapter_name = f"adapter{index}"
            load_counted(self.pipe, entry.file, adapter_name, entry.name)
            names.append(adapter_name)
            weights.append(weight)
            self.loaded[entry.id] = adapter_name
            identifiers.append((read_adapter(entry.file).identifiers, weight))
        if names:
            self.pipe.set_adapters(names, weights)
            if fuse:
                self.pipe.fuse_lora(adapter_names=names)
                self.fused = True
        rows = mix_identifiers(identifiers, self.model.tokenizer, self.model.text_encoder.get_input_embeddings().weight)
        if rows:  # each adapter's identifier as a token of its own, in this pipeline only (identifier.py)
            self.identifier = IdentifierEmbedding.for_text_encoder(self.pipe.text_encoder, self.model.tokenizer, rows)
            self.identifier.attach(self.pipe.text_encoder)
            self.pipe.tokenizer = self.identifier.tokenizer

    def clear(self) -> None:
        if self.identifier is not None:
            self.identifier.detach()
            self.identifier = None
            self.pipe.tokenizer = self.model.tokenizer
        if self.fused:
            self.pipe.unfuse_lora()
            self.fused = False
        if self.loaded:
            self.pipe.unload_lora_weights()
            self.loaded = {}

    @torch.no_grad()
    def generate(self, settings: GenerateSettings) -> list[Image.Image]:
        size = settings.size or self.model.native_resolution
        device = self.pipe.unet.device
        generators = [torch.Generator("cpu").manual_seed(settings.seed + i) for i in range(settings.num_images)]
        return self.pipe(
            [settings.prompt] * settings.num_images,
            negative_prompt=[settings.negative_prompt] * settings.num_images if settings.negative_prompt else None,
            num_inference_steps=settings.steps, guidance_scale=settings.guidance,
            height=size, width=size, generator=generators if device.type == "cpu" else None,
            latents=None if device.type == "cpu" else _latents(self.pipe, settings, size, device),
        ).images


def _latents(pipe, settings, size, device):
    # CPU generators give the same images on every device for the same seed.
    shape = (pipe.unet.config.in_channels, size // pipe.vae_scale_factor, size // pipe.vae_scale_factor)
    noise = [torch.randn(shape, generator=torch.Generator().manual_seed(settings.seed + i)) for i in range(settings.num_images)]
    return torch.stack(noise).to(device, pipe.unet.dtype)


def check_compatible(entry: AdapterEntry, model: BaseModel) -> None:
    if entry.fingerprint and entry.fingerprint != model.fingerprint:
        raise UserError(
            f"Adapter {entry.name!r} was trained on {entry.base_model} (fingerprint {entry.fingerprint}); "
            f"the base model {model.name} has fingerprint {model.fingerprint}. Use its own base model."
        )


def load_counted(pipe, file: Path, adapter_name: str, label: str) -> None:
    """load_lora_weights, then check every LoRA module in the file was placed (diffusers only warns)."""
    tensors = read_adapter(file).lora_only()
    expected = {key.split(".lora_")[0] for key in tensors}
    pipe.load_lora_weights(str(file), adapter_name=adapter_name)
    placed = 0
    for prefix, module in (("unet", pipe.unet), ("text_encoder", pipe.text_encoder)):
        placed += sum(1 for m in module.modules() if isinstance(m, LoraLayer) and adapter_name in m.lora_A)
    if placed != len(expected):
        pipe.delete_adapters(adapter_name)
        raise UserError(f"Adapter {label!r}: only {placed} of its {len(expected)} LoRA layers fit this base model.")


def save_images(images: list[Image.Image], out_dir: Path, settings: GenerateSettings, base_model: str) -> list[Path]:
    """PNG files with the prompt and settings in a text chunk, so an image says how it was made."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    start = len(list(out_dir.glob("image-*.png")))
    paths = []
    for index, image in enumerate(images):
        info = PngImagePlugin.PngInfo()
        info.add_text("parameters", json.dumps({**asdict(settings), "seed": settings.seed + index, "base_model": base_model}))
        path = out_dir / f"image-{start + index:04d}.png"
        with atomic_path(path) as tmp:
            image.save(tmp, format="PNG", pnginfo=info)
        paths.append(path)
    return paths


def generate_to_folder(library: Library, settings: GenerateSettings, out_dir: Path, base_model: str | None, default_model: str) -> list[Path]:
    """The CLI's generate: resolve adapters, load their base model, generate, write PNGs."""
    adapters = resolve_adapters(library, list(settings.adapters))
    model = load_base_model(base_model_for(adapters, base_model, default_model))
    session = AdapterSession(model)
    session.apply(adapters)
    return save_images(session.generate(settings), out_dir, settings, model.name)
