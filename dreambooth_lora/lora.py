"""Adapter layers (PEFT) on the UNet and text encoder (the file: adapter_file.py; the identifier: identifier.py).

The UNet takes any adapter type of adapter_types.py; the text encoder's modes stay LoRA.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model

from .adapter_types import TRAINABLE_MARKERS, adapter_type
from .identifier import IdentifierEmbedding
from .research_types import attach_qrlora, qrlora_disabled, research_kind, trained_state, vera_config

# --unet-layers: which attention projections of the UNet carry the adapter (PEFT matches each name as a path suffix)
UNET_LAYERS = {
    "attention": ["to_q", "to_k", "to_v", "to_out.0"],  # self- and cross-attention (diffusers' DreamBooth-LoRA)
    # cross-attention only (attn2, where the prompt enters): README "Quality", "The cross-attention layers only"
    "cross-attention": ["attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out.0"],
    # every projection but cross-attention's keys and values, the only ones that read the prompt's words: what a class
    # word means to the UNet stays the base model's (README "Quality", "Where the leak comes from")
    "no-prompt-kv": ["attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "attn2.to_q", "attn2.to_out.0"],
}
UNET_TARGETS = UNET_LAYERS["attention"]
TEXT_ENCODER_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]
ADAPTER_NAME = "default"


def lora_config(rank: int, alpha: float, targets: list[str]) -> LoraConfig:
    """A (Gaussian) and B = 0 at init, so the adapted model starts equal to the base model."""
    return LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights="gaussian", target_modules=targets)


def attach_unet_lora(unet, rank: int, alpha: float, kind: str = "lora", qr_energy: float | None = None,
                     targets: list[str] = UNET_TARGETS):
    """The adapter type `kind` (lora, dora, loha, lokr, qrlora, vera) on the UNet's attention projections `targets`
    (UNET_LAYERS), equal to the base at init. qrlora is ours (research_types.py), not PEFT's: it returns no config.
    adalora needs the run's step count and a tuner the loop calls: research_types.attach_adalora."""
    if kind == "qrlora":
        attach_qrlora(unet, rank, targets, qr_energy)
        return None
    if kind == "vera":
        # PEFT's injection refuses VeRA (its shared A, B live on the tuner): the tuner injects into the UNet in place,
        # and every layer keeps a reference to the shared projections, so they move with the UNet.
        from peft.tuners.vera import VeraModel

        config = vera_config(rank, targets)
        VeraModel(unet, config, ADAPTER_NAME)
        return config
    config = adapter_type(kind).config(rank, alpha, targets)
    unet.add_adapter(config, adapter_name=ADAPTER_NAME)
    return config


def attach_text_encoder_lora(text_encoder, rank: int, alpha: float) -> LoraConfig:
    # peft's own injection: transformers' add_adapter refuses peft 0.21 on some versions (docs/DESIGN.md, "Versions").
    config = lora_config(rank, alpha, TEXT_ENCODER_TARGETS)
    inject_adapter_in_model(config, text_encoder, adapter_name=ADAPTER_NAME)
    return config


def lora_parameters(module) -> list[torch.nn.Parameter]:
    return [p for n, p in module.named_parameters() if any(m in n for m in TRAINABLE_MARKERS) and p.requires_grad]


def collect_adapter_tensors(unet, text_encoder=None, identifier: IdentifierEmbedding | None = None) -> dict[str, torch.Tensor]:
    """The trained adapter weights in diffusers' layout (`unet.` / `text_encoder.` prefixes), in fp32."""
    kind = research_kind(unet)
    if kind is not None:  # qrlora/vera/adalora: their own parameters; the file gets LoRA factors (train.save_adapter)
        tensors = trained_state(unet, kind)
    else:
        tensors = {f"unet.{k}": v for k, v in get_peft_model_state_dict(unet, adapter_name=ADAPTER_NAME).items()}
    if text_encoder is not None and any(any(m in n for m in TRAINABLE_MARKERS) for n, _ in text_encoder.named_parameters()):
        te_state = get_peft_model_state_dict(text_encoder, adapter_name=ADAPTER_NAME)
        tensors.update({f"text_encoder.{k}": v for k, v in te_state.items()})
    if identifier is not None:
        tensors.update(identifier.state())
    return {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in tensors.items()}


@contextmanager
def adapters_disabled(unet, text_encoder):
    """Within the block the model is the frozen base: every adapter layer off (PEFT's enable_adapters(False)). The
    meter's prior drift compares against this. An identifier needs no switching off: it touches no word but its
    own (identifier.py), and the class prompt has none."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers = [m for module in (unet, text_encoder) for m in module.modules() if isinstance(m, BaseTunerLayer)]
    for layer in layers:
        layer.enable_adapters(False)
    try:
        with qrlora_disabled(unet):
            yield
    finally:
        for layer in layers:
            layer.enable_adapters(True)  # PEFT also sets requires_grad back on the active adapter's weights
