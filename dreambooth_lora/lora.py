"""LoRA layers (PEFT) on the UNet and text encoder, and the identifier embedding (the file: adapter_file.py)."""

from __future__ import annotations

from contextlib import contextmanager

import torch
from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model

from .adapter_file import EMBEDDING_PREFIX
from .errors import UserError

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


def collect_adapter_tensors(unet, text_encoder=None, token_embedding: TokenEmbedding | None = None) -> dict[str, torch.Tensor]:
    """The trained LoRA weights in diffusers' layout (`unet.` / `text_encoder.` prefixes), in fp32."""
    tensors = {f"unet.{k}": v for k, v in get_peft_model_state_dict(unet, adapter_name=ADAPTER_NAME).items()}
    if text_encoder is not None and any("lora_" in n for n, _ in text_encoder.named_parameters()):
        te_state = get_peft_model_state_dict(text_encoder, adapter_name=ADAPTER_NAME)
        tensors.update({f"text_encoder.{k}": v for k, v in te_state.items()})
    if token_embedding is not None:
        tensors.update(token_embedding.state())
    return {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in tensors.items()}


@contextmanager
def adapters_disabled(unet, text_encoder, token_embedding: TokenEmbedding | None = None):
    """Within the block the model is the frozen base: every LoRA layer off (PEFT's enable_adapters(False)) and the
    identifier embedding's hook removed. The meter's prior drift compares against this."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers = [m for module in (unet, text_encoder) for m in module.modules() if isinstance(m, BaseTunerLayer)]
    for layer in layers:
        layer.enable_adapters(False)
    if token_embedding is not None:
        token_embedding.detach()
    try:
        yield
    finally:
        for layer in layers:
            layer.enable_adapters(True)  # PEFT also sets requires_grad back on the active adapter's weights
        if token_embedding is not None:
            token_embedding.attach(text_encoder)
