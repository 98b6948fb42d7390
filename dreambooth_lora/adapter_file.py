"""Our adapter file, its one reader and one writer, and storing an adapter in the library.

The file is safetensors in diffusers' LoRA key layout (`unet.<module>.lora_A.weight` / `.lora_B.weight`,
`text_encoder.<module>...`; for the other adapter types their PEFT parameter names, e.g. `.hada_w1_a`,
`.lokr_w1`, `.lora_magnitude_vector`, adapter_types.py), plus each learned identifier as `lora_identifier.<token>`
(identifier.py), with two header entries: `lora_adapter_metadata` (per-layer rank and alpha, as diffusers reads
them) and `dreambooth_lora` (our metadata). Conversions to other tools' layouts live in formats.py.
"""

from __future__ import annotations

import collections
import json
import math
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .adapter_types import DoRA, LoHa, LoKr, LoRA, split_peft_key, type_of_peft_parts
from .errors import UserError
from .faults import fault_point
from .identifier import IDENTIFIER_PREFIX, LEGACY_PREFIX, from_file_tensors, to_file_tensors
from .library import PHOTOS_FOLDER, AdapterEntry, Library
from .paths import atomic_path

COMPONENTS = ("unet", "text_encoder")
STUDIO_META_KEY = "dreambooth_lora"
DIFFUSERS_META_KEY = "lora_adapter_metadata"  # what diffusers reads rank/alpha from
FILE_NAME = "adapter.safetensors"


LayerFactors = LoRA  # the plain LoRA layer (down = A, up = B, alpha); the other types live in adapter_types.py
Layer = LoRA | DoRA | LoHa | LoKr


@dataclass
class AdapterFile:
    """An adapter: layers keyed `unet.<module>` / `text_encoder.<module>`, identifiers (token -> [K, dim]), metadata."""

    layers: dict[str, Layer]
    identifiers: dict[str, torch.Tensor] = field(default_factory=dict)
    meta: dict = field(default_factory=dict)

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], meta: dict, alpha: float, rank: int | None = None) -> "AdapterFile":
        """Tensors in the file's key layout (as `lora.collect_adapter_tensors` gives them), every layer with one
        alpha (and, for LoKr, whose rank its shapes may not show, one rank)."""
        return cls(layers_from_tensors(tensors, lambda component, module, r: alpha, lambda component, module: rank, "adapter"),
                   from_file_tensors(tensors, meta.get("token", "")), meta)

    @property
    def max_rank(self) -> int:
        return max((layer.rank for layer in self.layers.values()), default=0)

    @property
    def common_alpha(self) -> float:
        return most_common([layer.alpha for layer in self.layers.values()]) if self.layers else 0.0

    @property
    def adapter_type(self) -> str:
        """The UNet layers' type (the text encoder's stay LoRA), else the text encoder's; lora when empty."""
        types = [type(layer).name for key, layer in sorted(self.layers.items(), key=lambda kv: not kv[0].startswith("unet."))]
        return types[0] if types else "lora"

    @property
    def num_params(self) -> int:
        """Learned values in the file: every layer's tensors and the identifier rows."""
        return sum(layer.num_params for layer in self.layers.values()) + sum(v.numel() for v in self.identifiers.values())

    def component_type(self, component: str) -> type | None:
        """The one adapter type of a component's layers (None without layers); PEFT attaches one config per component."""
        types = {type(layer) for key, layer in self.layers.items() if key.partition(".")[0] == component}
        if len(types) > 1:
            names = ", ".join(sorted(cls.name for cls in types))
            raise UserError(f"The {component} layers mix adapter types ({names}); an adapter holds one type per component.")
        return types.pop() if types else None

    @property
    def tensors(self) -> dict[str, torch.Tensor]:
        """Every tensor in the file's key layout: adapter weights, then identifiers."""
        return {**self.lora_only(), **self.identifier_tensors}

    def lora_only(self) -> dict[str, torch.Tensor]:
        """The adapter layers' tensors (every type's), without the identifier rows."""
        tensors = {}
        for layer_key, layer in sorted(self.layers.items()):
            tensors.update({f"{layer_key}.{name}": value for name, value in layer.tensors().items()})
        return tensors

    @property
    def unet_tensors(self) -> dict[str, torch.Tensor]:
        return _strip_prefix(self.lora_only(), "unet.")

    @property
    def text_encoder_tensors(self) -> dict[str, torch.Tensor]:
        return _strip_prefix(self.lora_only(), "text_encoder.")

    @property
    def identifier_tensors(self) -> dict[str, torch.Tensor]:
        return to_file_tensors(self.identifiers)


# ----- the file -----

def read_adapter(path) -> AdapterFile:
    """Read our adapter file; each layer's alpha comes from diffusers' header metadata (rank/alpha patterns)."""
    tensors, header = read_safetensors(Path(path))
    config = json.loads(header.get(DIFFUSERS_META_KEY, "{}"))
    layers = layers_from_tensors(tensors, lambda component, module, rank: alpha_from_config(config, component, module, rank),
                                 lambda component, module: rank_from_config(config, component, module), path)
    meta = json.loads(header.get(STUDIO_META_KEY, "{}"))
    return AdapterFile(layers, from_file_tensors(tensors, meta.get("token", "")), meta)


def write_adapter(path, adapter: AdapterFile) -> None:
    """Write the adapter atomically: fp32 tensors, diffusers' layer config and our metadata in the header."""
    header = {
        "format": "pt",
        DIFFUSERS_META_KEY: json.dumps(diffusers_layer_config(adapter.layers), sort_keys=True),
        STUDIO_META_KEY: json.dumps(adapter.meta, sort_keys=True),
    }
    tensors = {key: value.detach().to("cpu", torch.float32).contiguous() for key, value in adapter.tensors.items()}
    with atomic_path(Path(path)) as tmp:
        save_file(tensors, str(tmp), metadata=header)


def parameter_count(path) -> int:
    """How many numbers the file holds (LoRA factors and identifier rows), read from its header alone."""
    try:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            return sum(math.prod(handle.get_slice(key).get_shape()) for key in handle.keys())
    except (OSError, ValueError, RuntimeError, SafetensorError) as error:
        raise UserError(f"{path}: not a readable safetensors file ({error}).".replace("\n", " ")) from None


def read_safetensors(path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and header of an untrusted file (safetensors only, never pickle), or a UserError."""
    try:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            header = handle.metadata() or {}
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    except (OSError, ValueError, RuntimeError, SafetensorError) as error:
        raise UserError(f"{path}: not a readable safetensors file ({error}).".replace("\n", " ")) from None
    return tensors, header


def diffusers_layer_config(layers: dict[str, Layer]) -> dict:
    """`lora_adapter_metadata` for any per-layer ranks and alphas: diffusers builds its LoraConfig from it as is.

    Target modules are the exact module paths, so a file covering only some layers injects exactly those.
    """
    config = {}
    for component in COMPONENTS:
        mine = {key.partition(".")[2]: layer for key, layer in layers.items() if key.partition(".")[0] == component}
        if not mine:
            continue
        rank = most_common([layer.rank for layer in mine.values()])
        alpha = most_common([layer.alpha for layer in mine.values()])
        config.update({
            f"{component}.r": rank,
            f"{component}.lora_alpha": alpha,
            f"{component}.target_modules": sorted(mine),
            f"{component}.rank_pattern": {m: layer.rank for m, layer in sorted(mine.items()) if layer.rank != rank},
            f"{component}.alpha_pattern": {m: layer.alpha for m, layer in sorted(mine.items()) if layer.alpha != alpha},
        })
        if all(isinstance(layer, DoRA) for layer in mine.values()):
            config[f"{component}.use_dora"] = True  # diffusers builds LoraConfig(**these) for the component
    return config


def alpha_from_config(config: dict, component: str, module: str, rank: int) -> float:
    """Alpha as diffusers/PEFT resolve it: alpha_pattern, else lora_alpha, else rank (no metadata: scale 1)."""
    default = config.get(f"{component}.lora_alpha", rank)
    return float(pattern_value(config.get(f"{component}.alpha_pattern") or {}, module, default))


def rank_from_config(config: dict, component: str, module: str) -> int | None:
    """A layer's rank as written (rank_pattern, else r); None when the header has none."""
    default = config.get(f"{component}.r")
    value = pattern_value(config.get(f"{component}.rank_pattern") or {}, module, default)
    return None if value is None else int(value)


def pattern_value(patterns: dict, module: str, default):
    # peft.utils.other.get_pattern_key: a pattern matches the module path or its dotted tail.
    for pattern, value in patterns.items():
        if re.match(rf"(.*\.)?({pattern})$", module):
            return value
    return default


def most_common(values):
    return collections.Counter(values).most_common(1)[0][0]


def layers_from_tensors(tensors: dict, alpha_of: Callable[[str, str, int], float], rank_of: Callable[[str, str], int | None],
                        source) -> dict[str, Layer]:
    """Group `<component>.<module>.<PEFT name>` tensors by layer; each layer's type from its parameter names."""
    grouped: dict[str, dict] = {}
    for key, value in tensors.items():
        split = split_peft_key(key)
        if split is not None and not key.startswith((IDENTIFIER_PREFIX, LEGACY_PREFIX)):
            grouped.setdefault(split[0], {})[split[1]] = value
    layers = {}
    for layer_key, parts in grouped.items():
        component, _, module = layer_key.partition(".")
        cls = type_of_peft_parts(parts)
        missing = cls.missing(parts)
        if missing:
            raise UserError(f"{source}: layer {layer_key!r} has no {missing} weight beside its {sorted(parts)[0]}.")
        rank = rank_of(component, module) if cls is LoKr else cls.rank_of(parts)  # LoKr's shapes may not show it
        layers[layer_key] = cls.from_tensors(parts, alpha_of(component, module, rank or 1), rank)
    return layers


def _strip_prefix(tensors: dict, prefix: str) -> dict:
    return {k.removeprefix(prefix): v for k, v in tensors.items() if k.startswith(prefix)}


# ----- the library -----

def store_adapter(library: Library, adapter: AdapterFile, samples=(), photos=()) -> AdapterEntry:
    """Write the file, sample images and copies of the training `photos` (paths) into a staging folder and move it
    into the library (all or nothing).

    The metadata gets a new id, the time, and the rank and alpha the layers have (docs/DESIGN.md, "On-disk state").
    """
    meta = {**adapter.meta, "id": library.new_adapter_id(), "created": time.time(),
            "rank": adapter.max_rank, "alpha": adapter.common_alpha,
            "adapter_type": adapter.adapter_type, "trainable_params": adapter.num_params}
    if adapter.meta.get("adapter_type") in ("qrlora", "vera", "adalora") and adapter.adapter_type == "lora":
        # trained as qrlora/vera/adalora, stored as their exact LoRA factors: the type and learned-value count as trained
        meta.update(adapter_type=adapter.meta["adapter_type"], trainable_params=adapter.meta.get("trainable_params", adapter.num_params),
                    stored_as="lora")
    staging = library.staging_folder()
    try:
        write_adapter(staging / FILE_NAME, AdapterFile(adapter.layers, adapter.identifiers, meta))
        fault_point("saving")  # the file is in its staging folder, not yet in the library
        if samples:
            (staging / "samples").mkdir()
            for index, image in enumerate(samples):
                image.save(staging / "samples" / f"{index}.png")
        if photos:
            (staging / PHOTOS_FOLDER).mkdir()
            for index, path in enumerate(photos):
                shutil.copyfile(path, staging / PHOTOS_FOLDER / f"{index:02d}{Path(path).suffix.lower()}")
        return library.add_adapter(staging, meta)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
