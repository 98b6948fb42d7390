"""Conversions to and from other tools' layouts: diffusers, kohya/A1111/ComfyUI and PEFT.

Every format is read into our one in-memory shape, `adapter_file.AdapterFile` (per layer: down = A, up = B,
alpha), and stored or exported from it; our own file is read and written by adapter_file.py alone.

Kohya export and the identifier embedding: A1111 reads "bundled embeddings" from a LoRA file as
`bundle_emb.<name>.string_to_param.*` keys, but diffusers only treats a file as kohya when *every*
key starts with `lora_te_` / `lora_unet_`; with one `bundle_emb` key it rejects the file outright
("Invalid LoRA checkpoint", checked with diffusers 0.42 in tests/test_formats.py). So the embedding goes
in a sidecar `<out stem>.embedding.safetensors` in A1111's textual-inversion layout `{"emb_params": [n, dim]}`
(the identifiers and their vector counts in its header), and import picks the sidecar up again when it sits beside
the file. Sidecars written before identifiers had tokens of their own name tokenizer pieces in a `tokens` header
entry; they are converted (identifier.py).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors.torch import save_file

from .adapter_file import (
    DIFFUSERS_META_KEY,
    STUDIO_META_KEY,
    AdapterFile,
    alpha_from_config,
    layers_from_tensors,
    rank_from_config,
    pattern_value,
    read_adapter,
    read_safetensors,
    store_adapter,
    write_adapter,
)
from .adapter_types import KOHYA_SUFFIXES, LoKr, LoRA, ShapeError, split_peft_key, type_of_kohya_parts
from .errors import UserError
from .identifier import IDENTIFIER_PREFIX, LEGACY_PREFIX, TOKEN_PATTERN, convert_pieces, from_file_tensors
from .library import AdapterEntry, Library
from .paths import atomic_path

KOHYA_PREFIX = {"unet": "lora_unet_", "text_encoder": "lora_te_text_model_"}  # CLIP paths kept their text_model. level in kohya names
PEFT_PREFIX = "base_model.model."
SIDECAR_SUFFIX = ".embedding.safetensors"
PICKLE_SUFFIXES = {".ckpt", ".pt", ".pth", ".bin", ".pkl"}


# ----- export -----

def export_adapter(entry: AdapterEntry, fmt: str, out: str | None) -> tuple[Path, list[str]]:
    """Write a library adapter as a diffusers or kohya/A1111/ComfyUI file; returns the file and notes for the person."""
    if fmt not in ("diffusers", "kohya"):
        raise UserError(f"--format {fmt!r}: use diffusers or kohya.")
    path = Path(out) if out else Path(f"{entry.name}.{fmt}.safetensors")
    if path.suffix != ".safetensors":
        raise UserError(f"--out {path}: the file name must end in .safetensors.")
    weights = read_adapter(entry.file)
    weights.meta = {**entry.meta, **weights.meta, "name": entry.name}
    path.parent.mkdir(parents=True, exist_ok=True)
    notes = []
    if entry.meta.get("identifier_embedding_missing"):
        notes.append(f"Adapter {entry.name!r} was imported without its identifier embedding, so this export lacks it too "
                     "and will not draw the subject.")
    if fmt == "diffusers":
        write_adapter(path, weights)  # diffusers ignores the lora_identifier.* rows; our import reads them
        if weights.adapter_type in ("loha", "lokr"):
            notes.append(f"{path.name} holds {weights.adapter_type} layers under PEFT's names (diffusers/PEFT layout): PEFT "
                         "and `library import` load it; diffusers' load_lora_weights cannot load LoHa/LoKr (0.42).")
        return path, notes
    tensors, header = kohya_state_dict(weights)
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=header)
    sidecar = sidecar_path(path)
    if weights.identifiers:
        counts = [[token, int(vectors.shape[0])] for token, vectors in weights.identifiers.items()]
        with atomic_path(sidecar) as tmp:
            save_file({"emb_params": torch.cat(list(weights.identifiers.values())).float().contiguous()}, str(tmp),
                      metadata={"identifiers": json.dumps(counts), "token": weights.meta.get("token", "")})
        notes.append(f"The identifier embedding ('{weights.meta.get('token', '')}') is in {sidecar}: keep it beside "
                     f"{path.name}, which needs it to draw the subject; `library import` reads it from there.")
    else:
        sidecar.unlink(missing_ok=True)  # a stale sidecar from an earlier export would be imported with this file
    return path, notes


def sidecar_path(lora_file: Path) -> Path:
    return lora_file.with_suffix(SIDECAR_SUFFIX)


def kohya_name(layer_key: str) -> str:
    """`unet.down_blocks.0...attn1.to_q` -> `lora_unet_down_blocks_0_..._attn1_to_q` (ComfyUI / A1111 / diffusers)."""
    component, _, module = layer_key.partition(".")
    return KOHYA_PREFIX[component] + module.replace(".", "_")


NETWORK_ARGS = {"dora": {"algo": "lora", "dora_wd": "True"}, "loha": {"algo": "loha"}, "lokr": {"algo": "lokr"}}


def kohya_state_dict(weights: AdapterFile) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Kohya/LyCORIS keys per layer type (adapter_types.py: `lora_down/up` + `dora_scale`, `hada_*`, `lokr_*`, `alpha`).

    LoRA and DoRA layers share one alpha, a layer whose own alpha differs having the ratio folded into up: one
    shared alpha keeps diffusers' kohya loader exact (with differing alphas it builds an alpha_pattern whose
    text-encoder keys do not match transformers 5 module paths). LoHa and LoKr keep their own (ComfyUI reads alpha per layer).
    """
    alpha = most_common_lora_alpha(weights)
    tensors = {}
    for layer_key, layer in sorted(weights.layers.items()):
        name = kohya_name(layer_key)
        for suffix, value in layer.kohya(alpha).items():
            tensors[f"{name}.{suffix}"] = value.float().contiguous()
    meta = weights.meta
    kind = weights.adapter_type
    steps = str(int(meta.get("steps") or 0))
    header = {
        "ss_network_module": "networks.lora" if kind == "lora" else "lycoris.kohya",
        "ss_network_dim": str(weights.max_rank),
        "ss_network_alpha": f"{alpha if kind in ('lora', 'dora') else weights.common_alpha:g}",
        **({"ss_network_args": json.dumps(NETWORK_ARGS[kind])} if kind in NETWORK_ARGS else {}),
        "ss_base_model_version": "sd_v1",
        "ss_output_name": str(meta.get("name", "")),
        "ss_sd_model_name": str(meta.get("base_model", "")),  # kohya's base-model field; import reads it
        "ss_training_comment": f"DreamBooth-LoRA Studio: '{meta.get('token', '')}' {meta.get('class_noun', '')} "
                               f"on {meta.get('base_model', '')}".strip(),
        "ss_steps": steps,
        "ss_max_train_steps": steps,
        STUDIO_META_KEY: json.dumps(meta, sort_keys=True),
    }
    return tensors, header


def most_common_lora_alpha(weights: AdapterFile) -> float:
    from .adapter_file import most_common

    alphas = [layer.alpha for layer in weights.layers.values() if isinstance(layer, LoRA)]
    return most_common(alphas) if alphas else weights.common_alpha


# ----- import -----

def import_adapter(library: Library, file: Path, name: str | None, base_model: str | None, token: str, class_noun: str,
                   sidecar: Path | None = None) -> tuple[AdapterEntry, list[str]]:
    """Add a diffusers, kohya or PEFT LoRA .safetensors file to the library, checked against the base model's layers.

    Without `base_model`, the model the file's metadata names is used (ours, else kohya's `ss_sd_model_name`), else
    the default model. A kohya file's identifier embedding comes from `sidecar`, else `<file>.embedding.safetensors`.
    Returns the entry and notes for the person (e.g. an embedding the adapter needs but the import did not find).
    """
    from .models import load_base_model

    file = Path(file)
    if file.suffix.lower() in PICKLE_SUFFIXES:
        raise UserError(f"{file}: only .safetensors LoRA files can be imported ({file.suffix} files can run code when loaded).")
    if file.suffix.lower() != ".safetensors":
        raise UserError(f"{file}: not a .safetensors file; only .safetensors LoRA files can be imported.")
    if not file.is_file():
        raise UserError(f"{file}: no such file.")
    name = library.check_new_name(name or file.name.removesuffix(".safetensors"))
    tensors, header = read_safetensors(file)
    ours = studio_meta(file, header)
    model = load_base_model(base_model or base_model_for_file(file, header))
    modules = model_linear_shapes(model)
    fmt, layers, identifiers = parse_lora_file(file, tensors, header, modules)
    identifiers.update(_sidecar_identifiers(file, sidecar))
    identifiers = _checked_identifiers(file, identifiers, model, token)
    notes = []
    missing = bool(ours.get("train_token_embedding")) and not identifiers
    if missing:
        notes.append(f"{file.name} was trained with an identifier embedding for '{ours.get('token', '')}', but it is not in "
                     f"the file and no {sidecar_path(file).name} was found beside it: without it the adapter will not "
                     "draw the subject, so import the file again with its sidecar.")
    if ours.get("fingerprint") and ours["fingerprint"] != model.fingerprint:
        notes.append(f"{file.name} was trained on {ours.get('base_model')!r}, whose weights differ from {model.name!r}'s; "
                     "its layers fit, but the results may differ from the original's.")
    token = token or (" ".join(identifiers) if identifiers else ours.get("token", ""))
    meta = {
        "name": name, "token": token, "class_noun": class_noun or ours.get("class_noun", ""),
        "base_model": model.name, "fingerprint": model.fingerprint,
        "steps": int(ours.get("steps") or header.get("ss_steps") or 0),
        "instance_prompt": f"a photo of {token} {class_noun or ours.get('class_noun', '')}".strip() if token else "",
        "text_encoder": "lora" if any(k.startswith("text_encoder.") for k in layers) else "none",
        "train_token_embedding": bool(identifiers),
        "adapter_type": AdapterFile(layers).adapter_type,
        "imported_from": str(file), "imported_format": fmt,
        "imported_meta": ours or {k: v for k, v in header.items() if k.startswith("ss_")},
    }
    if missing:
        meta["identifier_embedding_missing"] = True
    return store_adapter(library, AdapterFile(layers, identifiers, meta)), notes


def studio_meta(file: Path, header: dict) -> dict:
    """Our metadata from a file's header ({} when the file is not ours)."""
    try:
        meta = json.loads(header.get(STUDIO_META_KEY, "{}"))
    except ValueError:
        raise UserError(f"{file}: its {STUDIO_META_KEY!r} header entry is not valid JSON.") from None
    return meta if isinstance(meta, dict) else {}


def base_model_for_file(file: Path, header: dict) -> str:
    """The base model the file's metadata names, if it is available here; the default model when none is named."""
    from .models import available_here, default_base_model

    named = studio_meta(file, header).get("base_model") or header.get("ss_sd_model_name")
    if not named:
        return default_base_model()
    if not available_here(named):
        raise UserError(f"{file.name} was made for the base model {named!r}, which is not available here; pass "
                        "--base-model MODEL naming a copy of it (a built-in, hub id, diffusers folder or .safetensors file).")
    return named


def model_linear_shapes(model) -> dict[str, tuple[int, int]]:
    """`unet.<module>` / `text_encoder.<module>` -> (out_features, in_features) for every Linear of the base model."""
    shapes = {}
    for component, module in (("unet", model.unet), ("text_encoder", model.text_encoder)):
        for module_name, layer in module.named_modules():
            if isinstance(layer, torch.nn.Linear):
                shapes[f"{component}.{module_name}"] = (layer.out_features, layer.in_features)
    return shapes


def parse_lora_file(file: Path, tensors: dict, header: dict, modules: dict[str, tuple[int, int]]):
    """Detect the key layout and return (format, layers, identifiers); every layer checked against `modules`."""
    keys = list(tensors)
    if not keys:
        raise UserError(f"{file}: the file holds no tensors.")
    if any(k.startswith(("lora_te1_", "lora_te2_")) for k in keys):
        raise UserError(f"{file}: an SDXL LoRA (lora_te1_/lora_te2_ keys); only Stable Diffusion 1.x layouts are supported.")
    if any(k.startswith(("lora_unet_", "lora_te_")) for k in keys):
        layers, identifiers = _parse_kohya(file, tensors, modules)
        return "kohya", layers, identifiers
    if any(k.startswith(PEFT_PREFIX) for k in keys):
        return "peft", _parse_peft(file, tensors, modules), {}
    ours = ("unet.", "text_encoder.", IDENTIFIER_PREFIX, LEGACY_PREFIX)
    if all(k.startswith(ours) for k in keys):
        hint = studio_meta(file, header).get("token", "")
        return "diffusers", _parse_diffusers(file, tensors, header, modules), from_file_tensors(tensors, hint)
    bad = next(k for k in keys if not k.startswith(ours))
    raise UserError(f"{file}: not a diffusers, kohya or PEFT LoRA file (first unrecognised key {bad!r}).")


def _parse_kohya(file, tensors, modules):
    """Group keys by kohya layer name, each layer's type from its parts, every tensor checked against the base layer."""
    by_kohya_name = {kohya_name(key): key for key in modules}
    grouped, identifiers = {}, {}
    for key, value in tensors.items():
        if key.startswith("bundle_emb."):  # an A1111 bundled embedding: its name is what prompts type
            identifiers[key.split(".")[1]] = value.reshape(-1, value.shape[-1]).float()
            continue
        lora_name, _, part = key.partition(".")
        if part not in KOHYA_SUFFIXES:
            raise UserError(f"{file}: key {key!r} is not a LoRA, DoRA, LoHa or LoKr weight (LoCon/GLoRA/OFT parts are "
                            "not supported).")
        if lora_name not in by_kohya_name:
            raise UserError(f"{file}: key {key!r} names no layer of the base model's UNet or text encoder.")
        grouped.setdefault(lora_name, {})[part] = value
    layers = {}
    for lora_name, parts in grouped.items():
        cls = type_of_kohya_parts(parts)
        first = f"{lora_name}.{next((k for k in (cls.kohya_keys if cls else ()) if k in parts), sorted(parts)[0])}"
        if cls is None:
            raise UserError(f"{file}: key {first!r} has no weights beside it (only {', '.join(sorted(parts))}).")
        missing = [k for k in cls.kohya_keys if k not in parts and cls is not LoKr]
        if missing:
            raise UserError(f"{file}: key {first!r} has no matching {lora_name}.{missing[0]}.")
        layer_key = by_kohya_name[lora_name]
        out_features, in_features = modules[layer_key]
        try:
            layer = cls.from_kohya(parts, out_features, in_features)
        except ShapeError as error:
            raise UserError(f"{file}: key {first!r} has shapes that do not fit ({cls.name}: {error}); the base model's layer is "
                            f"{out_features}x{in_features}: this file was made for a different model.") from None
        if not layer.alpha > 0:
            raise UserError(f"{file}: key {first!r} has alpha {layer.alpha}; it must be positive.")
        layers[layer_key] = layer
    return layers, identifiers


def _parse_peft(file, tensors, modules):
    config_file = file.parent / "adapter_config.json"
    config = json.loads(config_file.read_text()) if config_file.exists() else {}
    renamed = {}
    for key, value in tensors.items():
        split = split_peft_key(key.removeprefix(PEFT_PREFIX)) if key.startswith(PEFT_PREFIX) else None
        if split is None:
            raise UserError(f"{file}: key {key!r} is not a PEFT adapter weight (base_model.model.<module>.lora_A.weight, "
                            ".hada_w1_a, .lokr_w1, ...).")
        module = split[0]
        candidates = [f"unet.{module}", f"text_encoder.{module}", f"text_encoder.{module.removeprefix('text_model.')}"]
        layer_key = next((c for c in candidates if c in modules), None)
        if layer_key is None:
            raise UserError(f"{file}: key {key!r} names no layer of the base model's UNet or text encoder.")
        renamed[f"{layer_key}.{split[1]}"] = value

    def alpha(component, module, rank):
        # No adapter_config.json: alpha = rank (scale 1), the diffusers/PEFT convention for bare state dicts.
        if not config:
            return float(rank)
        default = config.get("lora_alpha", config.get("alpha", rank))  # LoHa/LoKr configs call it alpha
        return float(pattern_value(config.get("alpha_pattern") or {}, module, default))

    def rank(component, module):
        return int(pattern_value(config.get("rank_pattern") or {}, module, config["r"])) if "r" in config else None

    layers = _checked_layers(file, renamed, alpha, rank, modules)
    if len({k.partition(".")[0] for k in layers}) > 1:
        raise UserError(f"{file}: a PEFT file adapts one model, but its keys match both the UNet and the text encoder.")
    return layers


def _parse_diffusers(file, tensors, header, modules):
    config = json.loads(header.get(DIFFUSERS_META_KEY, "{}"))
    renamed = {}
    for key, value in tensors.items():
        if key.startswith((IDENTIFIER_PREFIX, LEGACY_PREFIX)):
            continue
        split = split_peft_key(key)
        if split is None:
            raise UserError(f"{file}: key {key!r} is not a diffusers/PEFT adapter weight "
                            "(<component>.<module>.lora_A.weight, .hada_w1_a, .lokr_w1, ...).")
        component, _, module = split[0].partition(".")
        module = module.removeprefix("text_model.") if component == "text_encoder" else module
        if f"{component}.{module}" not in modules:
            raise UserError(f"{file}: key {key!r} names no layer of the base model's UNet or text encoder.")
        renamed[f"{component}.{module}.{split[1]}"] = value
    return _checked_layers(file, renamed, lambda c, m, r: alpha_from_config(config, c, m, r),
                           lambda c, m: rank_from_config(config, c, m), modules)


def _checked_layers(file, tensors, alpha_of, rank_of, modules) -> dict:
    """Layers of any type from `<component>.<module>.<PEFT name>` tensors, each checked against the base layer."""
    layers = layers_from_tensors(tensors, alpha_of, rank_of, file)
    for layer_key, layer in layers.items():
        out_features, in_features = modules[layer_key]
        first = f"{layer_key}.{next(iter(layer.tensors()))}"
        try:
            layer.check(out_features, in_features)
        except ShapeError as error:
            raise UserError(f"{file}: key {first!r} has shapes that do not fit ({type(layer).name}: {error}); the base "
                            f"model's layer is {out_features}x{in_features}: this LoRA was made for a different model.") from None
        if not layer.alpha > 0:
            raise UserError(f"{file}: key {first!r} has alpha {layer.alpha}; it must be positive.")
    return layers


def _sidecar_identifiers(file: Path, sidecar: Path | None) -> dict[str, torch.Tensor]:
    """The identifiers of a textual-inversion sidecar: the one given, else the one beside the file, if any."""
    if sidecar is not None and not Path(sidecar).is_file():
        raise UserError(f"{sidecar}: no such embedding file.")
    sidecar = Path(sidecar) if sidecar is not None else sidecar_path(file)
    if not sidecar.exists():
        return {}
    tensors, header = read_safetensors(sidecar)
    if "emb_params" not in tensors:
        raise UserError(f"{sidecar}: not a textual-inversion file (no emb_params).")
    vectors = tensors["emb_params"].reshape(-1, tensors["emb_params"].shape[-1]).float()
    if "tokens" in header:  # written before identifiers had tokens of their own: tokenizer pieces
        pieces = json.loads(header["tokens"])
        if len(pieces) != len(vectors):
            raise UserError(f"{sidecar}: its header names {len(pieces)} token pieces for {len(vectors)} embedding rows.")
        return convert_pieces(dict(zip(pieces, vectors)), header.get("token", ""))
    try:
        counts = json.loads(header.get("identifiers") or "null") or [[header.get("token") or sidecar.name.split(".")[0], len(vectors)]]
        sizes = [int(count) for _, count in counts]
    except (ValueError, TypeError):
        raise UserError(f"{sidecar}: its 'identifiers' header entry is not a list of [token, count] pairs.") from None
    if sum(sizes) != len(vectors) or min(sizes, default=1) < 1:
        raise UserError(f"{sidecar}: its header names {sum(sizes)} vectors for {len(vectors)} embedding rows.")
    return {token: part for (token, _), part in zip(counts, vectors.split(sizes))}


def _checked_identifiers(file, identifiers: dict[str, torch.Tensor], model, token: str) -> dict[str, torch.Tensor]:
    """Identifiers that fit the base model; one identifier takes the name `token` when one is given."""
    dim = model.text_encoder.get_input_embeddings().weight.shape[1]
    for name, vectors in identifiers.items():
        if vectors.shape[-1] != dim:
            raise UserError(f"{file}: the identifier {name!r} has vectors of size {vectors.shape[-1]}, the base model's are {dim}.")
    if token and len(identifiers) == 1:  # a token of its own is renamed freely: the row is keyed by its name
        identifiers = {token: next(iter(identifiers.values()))}
    for name in identifiers:
        if not re.fullmatch(TOKEN_PATTERN, name):
            raise UserError(f"{file}: the identifier {name!r} is not one word of letters or digits; import it with "
                            "--token WORD to give it one.")
    return identifiers
