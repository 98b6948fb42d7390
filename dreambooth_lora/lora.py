"""LoRA layers (PEFT) on the UNet and text encoder, the identifier embedding, and the adapter file."""

from __future__ import annotations

import json
from dataclasses import dataclass

import torch
from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .errors import UserError

UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]  # attention projections (DreamBooth-LoRA)
TEXT_ENCODER_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]
ADAPTER_NAME = "default"
EMBEDDING_PREFIX = "lora_token_embedding."  # learned identifier rows; diffusers skips it (no unet./text_encoder. prefix) but needs "lora" in every key
STUDIO_META_KEY = "dreambooth_lora"
DIFFUSERS_META_KEY = "lora_adapter_metadata"  # what diffusers reads rank/alpha from


def lora_config(rank: int, alpha: float, targets: list[str]) -> LoraConfig:
    """A (Gaussian) and B = 0 at init, so the adapted model starts equal to the base model."""
    return LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights="gaussian", target_modules=targets)


def attach_unet_lora(unet, rank: int, alpha: float) -> LoraConfig:
    config = lora_config(rank, alpha, UNET_TARGETS)
    unet.add_adapter(config, adapter_name=ADAPTER_NAME)
    return config


def attach_text_encoder_lora(text_encoder, rank: int, alpha: float) -> LoraConfig:
    # peft's own injection: transformers' add_adapter refuses peft 0.21 on some versions (docs/DESIGN.md, "Versions").
    config = lora_config(rank, alpha, TEXT_ENCODER_TARGETS)
    inject_adapter_in_model(config, text_encoder, adapter_name=ADAPTER_NAME)
    return config


def lora_parameters(module) -> list[torch.nn.Parameter]:
    return [p for n, p in module.named_parameters() if "lora_" in n and p.requires_grad]


class TokenEmbedding(torch.nn.Module):
    """Trainable input embeddings for identifier tokens, swapped in by a hook on the embedding layer.

    The big embedding table stays frozen and untouched; only these rows learn (pivotal tuning).
    """

    def __init__(self, token_ids: list[int], initial: torch.Tensor, tokens: list[str]):
        super().__init__()
        self.tokens = list(tokens)
        self.register_buffer("token_ids", torch.tensor(token_ids, dtype=torch.long))
        self.vectors = torch.nn.Parameter(initial.detach().clone().float())
        self._handle = None

    @classmethod
    def for_token(cls, text_encoder, tokenizer, token: str) -> "TokenEmbedding":
        pieces = tokenizer.tokenize(token)
        ids = tokenizer.convert_tokens_to_ids(pieces)
        table = text_encoder.get_input_embeddings().weight
        return cls(ids, table[ids].float(), pieces)

    def attach(self, text_encoder) -> "TokenEmbedding":
        self.detach()
        self.to(text_encoder.get_input_embeddings().weight.device)
        self._handle = text_encoder.get_input_embeddings().register_forward_hook(self._replace)
        return self

    def detach(self) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    def _replace(self, module, inputs, output):
        input_ids = inputs[0]
        for row, token_id in enumerate(self.token_ids.tolist()):
            mask = (input_ids == token_id).unsqueeze(-1)
            output = torch.where(mask, self.vectors[row].to(output.dtype), output)
        return output

    @torch.no_grad()
    def clamp_norm(self, max_norm: float) -> None:
        """Keep each learned vector no longer than a typical word's, so the identifier cannot drown
        out the rest of the prompt ("... on a green background")."""
        norms = self.vectors.norm(dim=-1, keepdim=True).clamp(min=1e-8)
        self.vectors.mul_((max_norm / norms).clamp(max=1.0))

    def state(self) -> dict[str, torch.Tensor]:
        return {f"{EMBEDDING_PREFIX}{piece}": self.vectors[i].detach().cpu().contiguous() for i, piece in enumerate(self.tokens)}

    @classmethod
    def from_state(cls, tensors: dict[str, torch.Tensor], tokenizer) -> "TokenEmbedding | None":
        pieces = [key.removeprefix(EMBEDDING_PREFIX) for key in tensors if key.startswith(EMBEDDING_PREFIX)]
        if not pieces:
            return None
        ids = tokenizer.convert_tokens_to_ids(pieces)
        if tokenizer.unk_token_id in ids and tokenizer.unk_token not in pieces:
            raise UserError(f"The adapter's identifier tokens {pieces} are not in this base model's vocabulary.")
        vectors = torch.stack([tensors[EMBEDDING_PREFIX + p].float() for p in pieces])
        return cls(ids, vectors, pieces)


@dataclass
class AdapterFile:
    """An adapter's tensors (diffusers key layout) and metadata, as stored in one safetensors file."""

    tensors: dict[str, torch.Tensor]
    meta: dict

    @property
    def unet_tensors(self) -> dict[str, torch.Tensor]:
        return _strip_prefix(self.tensors, "unet.")

    @property
    def text_encoder_tensors(self) -> dict[str, torch.Tensor]:
        return _strip_prefix(self.tensors, "text_encoder.")

    @property
    def embedding_tensors(self) -> dict[str, torch.Tensor]:
        return {k: v for k, v in self.tensors.items() if k.startswith(EMBEDDING_PREFIX)}

    def lora_only(self) -> dict[str, torch.Tensor]:
        return {k: v for k, v in self.tensors.items() if not k.startswith(EMBEDDING_PREFIX)}


def collect_adapter_tensors(unet, text_encoder=None, token_embedding: TokenEmbedding | None = None) -> dict[str, torch.Tensor]:
    """The trained LoRA weights in diffusers' layout (`unet.` / `text_encoder.` prefixes), in fp32."""
    tensors = {f"unet.{k}": v for k, v in get_peft_model_state_dict(unet, adapter_name=ADAPTER_NAME).items()}
    if text_encoder is not None and any("lora_" in n for n, _ in text_encoder.named_parameters()):
        te_state = get_peft_model_state_dict(text_encoder, adapter_name=ADAPTER_NAME)
        tensors.update({f"text_encoder.{k}": v for k, v in te_state.items()})
    if token_embedding is not None:
        tensors.update(token_embedding.state())
    return {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in tensors.items()}


def diffusers_metadata(rank: int, alpha: float, has_text_encoder: bool) -> str:
    """The `lora_adapter_metadata` JSON diffusers reads so that alpha != rank loads with the right scale."""
    meta = {f"unet.{k}": v for k, v in _config_dict(rank, alpha, UNET_TARGETS).items()}
    if has_text_encoder:
        meta.update({f"text_encoder.{k}": v for k, v in _config_dict(rank, alpha, TEXT_ENCODER_TARGETS).items()})
    return json.dumps(meta, sort_keys=True)


def _config_dict(rank, alpha, targets) -> dict:
    config = lora_config(rank, alpha, targets).to_dict()
    return {k: (sorted(v) if isinstance(v, set) else v) for k, v in config.items() if k in {"r", "lora_alpha", "target_modules", "init_lora_weights"}}


def write_adapter_file(path, tensors: dict[str, torch.Tensor], meta: dict, rank: int, alpha: float) -> None:
    """Save tensors with diffusers' metadata and ours in the safetensors header (strings only)."""
    header = {
        "format": "pt",
        DIFFUSERS_META_KEY: diffusers_metadata(rank, alpha, any(k.startswith("text_encoder.") for k in tensors)),
        STUDIO_META_KEY: json.dumps(meta, sort_keys=True),
    }
    save_file(tensors, str(path), metadata=header)


def read_safetensors(path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and header of an untrusted file (safetensors only, never pickle), or a UserError."""
    try:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            header = handle.metadata() or {}
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    except (OSError, ValueError, RuntimeError, SafetensorError) as error:
        raise UserError(f"{path}: not a readable safetensors file ({error}).".replace("\n", " ")) from None
    return tensors, header


def read_adapter_file(path) -> AdapterFile:
    """Load an adapter written by write_adapter_file."""
    tensors, header = read_safetensors(path)
    return AdapterFile(tensors, json.loads(header.get(STUDIO_META_KEY, "{}")))


def _strip_prefix(tensors: dict, prefix: str) -> dict:
    return {k.removeprefix(prefix): v for k, v in tensors.items() if k.startswith(prefix)}
