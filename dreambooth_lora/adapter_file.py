"""Our adapter file, its one reader and one writer, and storing an adapter in the library.

The file is safetensors in diffusers' LoRA key layout (`unet.<module>.lora_A.weight` / `.lora_B.weight`,
`text_encoder.<module>...`), plus the learned identifier rows as `lora_token_embedding.<piece>`, with two
header entries: `lora_adapter_metadata` (per-layer rank and alpha, as diffusers reads them) and
`dreambooth_lora` (our metadata). Conversions to other tools' layouts live in formats.py.
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

from .errors import UserError
from .faults import fault_point
from .library import PHOTOS_FOLDER, AdapterEntry, Library
from .paths import atomic_path, validate_name

COMPONENTS = ("unet", "text_encoder")
EMBEDDING_PREFIX = "lora_token_embedding."  # learned identifier rows; diffusers skips it (no unet./text_encoder. prefix) but needs "lora" in every key
STUDIO_META_KEY = "dreambooth_lora"
DIFFUSERS_META_KEY = "lora_adapter_metadata"  # what diffusers reads rank/alpha from
FILE_NAME = "adapter.safetensors"


@dataclass
class LayerFactors:
    """One LoRA layer: delta W = (alpha / rank) * up @ down."""

    down: torch.Tensor  # A, [rank, in_features]
    up: torch.Tensor  # B, [out_features, rank]
    alpha: float

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def delta(self) -> torch.Tensor:
        return self.scale * (self.up.double() @ self.down.double())


@dataclass
class AdapterFile:
    """An adapter: layers keyed `unet.<module>` / `text_encoder.<module>`, identifier rows by token piece, metadata."""

    layers: dict[str, LayerFactors]
    embeddings: dict[str, torch.Tensor] = field(default_factory=dict)
    meta: dict = field(default_factory=dict)

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], meta: dict, alpha: float) -> "AdapterFile":
        """Tensors in the file's key layout (as `lora.collect_adapter_tensors` gives them), every layer with one alpha."""
        return cls(_layers(tensors, lambda component, module, rank: alpha, "adapter"), _embeddings(tensors), meta)

    @property
    def max_rank(self) -> int:
        return max((layer.rank for layer in self.layers.values()), default=0)

    @property
    def common_alpha(self) -> float:
        return most_common([layer.alpha for layer in self.layers.values()]) if self.layers else 0.0

    @property
    def tensors(self) -> dict[str, torch.Tensor]:
        """Every tensor in the file's key layout: LoRA factors, then identifier rows."""
        return {**self.lora_only(), **self.embedding_tensors}

    def lora_only(self) -> dict[str, torch.Tensor]:
        tensors = {}
        for layer_key, layer in sorted(self.layers.items()):
            tensors[f"{layer_key}.lora_A.weight"] = layer.down
            tensors[f"{layer_key}.lora_B.weight"] = layer.up
        return tensors

    @property
    def unet_tensors(self) -> dict[str, torch.Tensor]:
        return _strip_prefix(self.lora_only(), "unet.")

    @property
    def text_encoder_tensors(self) -> dict[str, torch.Tensor]:
        return _strip_prefix(self.lora_only(), "text_encoder.")

    @property
    def embedding_tensors(self) -> dict[str, torch.Tensor]:
        return {EMBEDDING_PREFIX + piece: vector for piece, vector in self.embeddings.items()}


# ----- the file -----

def read_adapter(path) -> AdapterFile:
    """Read our adapter file; each layer's alpha comes from diffusers' header metadata (rank/alpha patterns)."""
    tensors, header = read_safetensors(Path(path))
    config = json.loads(header.get(DIFFUSERS_META_KEY, "{}"))
    layers = _layers(tensors, lambda component, module, rank: alpha_from_config(config, component, module, rank), path)
    return AdapterFile(layers, _embeddings(tensors), json.loads(header.get(STUDIO_META_KEY, "{}")))


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


def diffusers_layer_config(layers: dict[str, LayerFactors]) -> dict:
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
    return config


def alpha_from_config(config: dict, component: str, module: str, rank: int) -> float:
    """Alpha as diffusers/PEFT resolve it: alpha_pattern, else lora_alpha, else rank (no metadata: scale 1)."""
    default = config.get(f"{component}.lora_alpha", rank)
    return float(pattern_value(config.get(f"{component}.alpha_pattern") or {}, module, default))


def pattern_value(patterns: dict, module: str, default):
    # peft.utils.other.get_pattern_key: a pattern matches the module path or its dotted tail.
    for pattern, value in patterns.items():
        if re.match(rf"(.*\.)?({pattern})$", module):
            return value
    return default


def most_common(values):
    return collections.Counter(values).most_common(1)[0][0]


def _layers(tensors: dict, alpha_of: Callable[[str, str, int], float], source) -> dict[str, LayerFactors]:
    layers = {}
    for key, down in tensors.items():
        if not key.endswith(".lora_A.weight"):
            continue
        layer_key = key.removesuffix(".lora_A.weight")
        component, _, module = layer_key.partition(".")
        up = tensors.get(f"{layer_key}.lora_B.weight")
        if up is None:
            raise UserError(f"{source}: {key!r} has no matching lora_B weight.")
        layers[layer_key] = LayerFactors(down, up, alpha_of(component, module, down.shape[0]))
    return layers


def _embeddings(tensors: dict) -> dict[str, torch.Tensor]:
    return {key.removeprefix(EMBEDDING_PREFIX): value for key, value in tensors.items() if key.startswith(EMBEDDING_PREFIX)}


def _strip_prefix(tensors: dict, prefix: str) -> dict:
    return {k.removeprefix(prefix): v for k, v in tensors.items() if k.startswith(prefix)}


# ----- the library -----

def check_new_name(library: Library, name: str) -> str:
    """`name` if it is valid and free in the library, else a UserError."""
    validate_name(name, "adapter name")
    if library.name_taken(name):
        raise UserError(f"An adapter named {name!r} already exists; choose another --name.")
    return name


def free_name(library: Library, base: str) -> str:
    """`base`, or `base-2`, `base-3`, ... : the first name not yet in the library."""
    name, suffix = base, 2
    while library.name_taken(name):
        name, suffix = f"{base}-{suffix}", suffix + 1
    return name


def store_adapter(library: Library, adapter: AdapterFile, samples=(), photos=()) -> AdapterEntry:
    """Write the file, sample images and copies of the training `photos` (paths) into a staging folder and move it
    into the library (all or nothing).

    The metadata gets a new id, the time, and the rank and alpha the layers have (docs/DESIGN.md, "On-disk state").
    """
    meta = {**adapter.meta, "id": library.new_adapter_id(), "created": time.time(),
            "rank": adapter.max_rank, "alpha": adapter.common_alpha}
    staging = library.staging_folder()
    try:
        write_adapter(staging / FILE_NAME, AdapterFile(adapter.layers, adapter.embeddings, meta))
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
