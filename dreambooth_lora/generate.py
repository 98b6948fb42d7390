"""Generation with library adapters mixed by weight (negative weights allowed), writing PNGs with settings.

A weight is one number (UNet and text encoder alike) or a pair (UNet, text encoder), as A1111's
`<lora:name:unet:te>` and ComfyUI's model/clip strengths. The text strength also scales the identifier
embedding (it changes what the prompt encodes, as the text encoder's layers do). Every adapter type is
attached through PEFT directly (diffusers' loader cannot load LoHa/LoKr), and a component at strength 0
is not attached at all: a DoRA layer at scale 0 is m W / ||W||, not W (docs/DESIGN.md, "Adapter types").
"""

from __future__ import annotations

import json
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from peft import inject_adapter_in_model, set_peft_model_state_dict
from peft.tuners.tuners_utils import BaseTunerLayer
from PIL import Image, PngImagePlugin

from .errors import UserError
from .library import AdapterEntry, Library
from .adapter_types import DoRA
from .adapter_file import COMPONENTS, AdapterFile, diffusers_layer_config, read_adapter
from .identifier import IdentifierEmbedding, mix_identifiers
from .models import BaseModel, load_base_model
from .paths import atomic_path


MAX_IMAGES = 64  # images one generate call makes


@dataclass(frozen=True)
class GenerateSettings:
    prompt: str
    negative_prompt: str = ""
    num_images: int = 4
    steps: int = 20  # DPM-Solver++ converges in ~20 steps
    guidance: float = 5.0
    seed: int = 0
    size: int | None = None  # None: the base model's native size
    adapters: tuple[tuple[str, "Weight"], ...] = field(default_factory=tuple)  # (name, weight or (unet, text))

    def __post_init__(self):
        if not self.prompt.strip():
            raise UserError("--prompt is empty: say what to draw, e.g. 'a photo of sks dog'.")
        if not 1 <= self.num_images <= MAX_IMAGES:
            raise UserError(f"--num-images {self.num_images}: must be from 1 to {MAX_IMAGES}.")
        if not 1 <= self.steps <= 500:
            raise UserError(f"--steps {self.steps}: must be from 1 to 500.")
        if not 0 <= self.guidance <= 50:
            raise UserError(f"--guidance {self.guidance}: must be from 0 to 50.")
        if self.size is not None and (self.size % 8 or not 16 <= self.size <= 2048):
            raise UserError(f"--size {self.size}: must be a multiple of 8 from 16 to 2048.")


Weight = float | tuple[float, float]


def parse_adapter_spec(spec: str) -> tuple[str, Weight]:
    """'name=0.8' -> ('name', 0.8); 'name=1:0.5' -> ('name', (1.0, 0.5)) as UNet and text-encoder strengths;
    a bare name means weight 1. One number applies to both components (A1111's single-weight form)."""
    name, sep, weight = spec.rpartition("=") if "=" in spec else (spec, "", "1")
    try:
        values = tuple(float(part) for part in weight.split(":"))
    except ValueError:
        values = ()
    if not name or not 1 <= len(values) <= 2:
        raise UserError(f"--adapter {spec!r}: write NAME=WEIGHT or NAME=UNET:TEXT with numbers, e.g. {name or 'a'}=0.8 "
                        f"or {name or 'a'}=1:0.5.")
    if not all(-10 <= value <= 10 for value in values):
        raise UserError(f"--adapter {spec!r}: weight must be between -10 and 10.")
    return name, values[0] if len(values) == 1 else values


def split_weight(weight: Weight) -> tuple[float, float]:
    """(UNet strength, text strength): one number is both."""
    if isinstance(weight, (tuple, list)):
        return float(weight[0]), float(weight[1])
    return float(weight), float(weight)


def format_weight(weight: Weight) -> str:
    unet, text = split_weight(weight)
    return f"{unet:g}" if unet == text else f"{unet:g}:{text:g}"


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

    def apply(self, adapters: list[tuple[AdapterEntry, Weight]], fuse: bool = False) -> None:
        for entry, _ in adapters:
            check_compatible(entry, self.model)
        self.clear()
        names, weights, identifiers = [], [], []
        files = [read_adapter(entry.file) for entry, _ in adapters]
        # PEFT computes a DoRA layer against the output of what runs before it (an inner wrapper, an adapter active
        # earlier): DoRA adapters are attached and activated first, so each stays relative to the base model, as
        # mixing.py assumes (exact with one DoRA adapter in a mix).
        order = sorted(range(len(adapters)), key=lambda i: not any(isinstance(l, DoRA) for l in files[i].layers.values()))
        for index in order:
            (entry, weight), adapter = adapters[index], files[index]
            adapter_name = f"adapter{index}"
            unet_weight, text_weight = split_weight(weight)
            strengths = {"unet": unet_weight, "text_encoder": text_weight}
            attached = attach_adapter(self.pipe, adapter, adapter_name, entry.name, skip={c for c, w in strengths.items() if w == 0})
            if attached:
                names.append(adapter_name)
                weights.append({component: strengths[component] for component in attached})  # diffusers warns about others
                self.loaded[entry.id] = adapter_name
            if text_weight != 0:  # the text strength scales the identifier too: both change what the prompt encodes
                identifiers.append((adapter.identifiers, text_weight))
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


def attach_adapter(pipe, adapter: AdapterFile, adapter_name: str, label: str, skip=frozenset()) -> list[str]:
    """Attach each component's layers through PEFT (config from the file's ranks and alphas), then check every
    layer in the file was placed; components in `skip` stay off. Returns the components attached."""
    attached = []
    for component in COMPONENTS:
        cls = adapter.component_type(component)
        if cls is None or component in skip:
            continue
        module = getattr(pipe, component)
        mine = {key: layer for key, layer in adapter.layers.items() if key.partition(".")[0] == component}
        layer_config = diffusers_layer_config(mine)
        config = cls.config(layer_config[f"{component}.r"], layer_config[f"{component}.lora_alpha"],
                            layer_config[f"{component}.target_modules"], layer_config[f"{component}.rank_pattern"],
                            layer_config[f"{component}.alpha_pattern"])
        tensors = {f"{key.partition('.')[2]}.{name}": value for key, layer in mine.items() for name, value in layer.tensors().items()}
        try:
            with warnings.catch_warnings():  # "Already found a peft_config": several adapters side by side is the point
                warnings.simplefilter("ignore", UserWarning)
                if component == "unet":
                    module.add_adapter(config, adapter_name=adapter_name)  # diffusers' bookkeeping (set_adapters, unload, fuse)
                else:
                    known = dict(getattr(module, "peft_config", {}))  # a fresh injection would replace the list of adapters
                    inject_adapter_in_model(config, module, adapter_name=adapter_name)
                    module.peft_config = {**known, **module.peft_config}
                    module._hf_peft_config_loaded = True
            result = set_peft_model_state_dict(module, tensors, adapter_name=adapter_name)
        except (ValueError, RuntimeError) as error:  # PEFT: a target module missing, a shape that does not fit
            if adapter_name in getattr(module, "peft_config", {}):
                pipe.delete_adapters(adapter_name)
            raise UserError(f"Adapter {label!r}: its {component} layers do not fit this base model "
                            f"({' '.join(str(error).split())[:200]}).") from None
        placed = sum(1 for m in module.modules() if isinstance(m, BaseTunerLayer)
                     and any(adapter_name in getattr(m, attr, {}) for attr in m.adapter_layer_names))
        unexpected = list(getattr(result, "unexpected_keys", None) or [])
        if placed != len(mine) or unexpected:
            pipe.delete_adapters(adapter_name)
            raise UserError(f"Adapter {label!r}: only {placed} of its {len(mine)} {component} layers fit this base model.")
        attached.append(component)
    return attached


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
