"""LoRA layers (PEFT) on the UNet and text encoder (the file: adapter_file.py; the identifier: identifier.py)."""

from __future__ import annotations

import torch
from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model

from .identifier import IdentifierEmbedding

UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]  # attention projections (DreamBooth-LoRA)
TEXT_ENCODER_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]
ADAPTER_NAME = "default"


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


def collect_adapter_tensors(unet, text_encoder=None, identifier: IdentifierEmbedding | None = None) -> dict[str, torch.Tensor]:
    """The trained LoRA weights in diffusers' layout (`unet.` / `text_encoder.` prefixes), in fp32."""
    tensors = {f"unet.{k}": v for k, v in get_peft_model_state_dict(unet, adapter_name=ADAPTER_NAME).items()}
    if text_encoder is not None and any("lora_" in n for n, _ in text_encoder.named_parameters()):
        te_state = get_peft_model_state_dict(text_encoder, adapter_name=ADAPTER_NAME)
        tensors.update({f"text_encoder.{k}": v for k, v in te_state.items()})
    if identifier is not None:
        tensors.update(identifier.state())
    return {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in tensors.items()}
