"""Real-shaped built-ins for speed work: SD 1.5's architecture (random weights) and a toy of the same layout.

`builtin:sd15-random` is Stable Diffusion 1.5's exact architecture (UNet 859.5 M, VAE 83.7 M, CLIP-L text 123 M
parameters) with seeded random weights; `builtin:sd15-toy` keeps its layout at toy widths. Both train with the
defaults of real models, and `save_builtin` writes either as a diffusers folder that other trainers can read.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

from .tokenizer import CLIP_VOCAB_SIZE, build_clip_tokenizer, build_tokenizer

SD15_BLOCKS = dict(
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
)
VAE_BLOCKS = dict(down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)

# name -> (UNet, VAE, CLIP text config, native resolution). SD 1.5's values are those of its published configs.
SHAPES = {
    "builtin:sd15-random": (
        dict(sample_size=64, block_out_channels=(320, 640, 1280, 1280), layers_per_block=2, cross_attention_dim=768,
             attention_head_dim=8, norm_num_groups=32, **SD15_BLOCKS),
        dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, norm_num_groups=32, sample_size=512,
             latent_channels=4, **VAE_BLOCKS),
        dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
             projection_dim=768, hidden_act="quick_gelu"),
        512,
    ),
    "builtin:sd15-toy": (
        dict(sample_size=8, block_out_channels=(32, 32, 64, 64), layers_per_block=2, cross_attention_dim=32,
             attention_head_dim=8, norm_num_groups=32, **SD15_BLOCKS),
        dict(block_out_channels=(32, 32, 64, 64), layers_per_block=1, norm_num_groups=32, sample_size=64,
             latent_channels=4, **VAE_BLOCKS),
        dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, projection_dim=32),
        64,
    ),
}
NAMES = tuple(SHAPES)


def sd15_scheduler() -> PNDMScheduler:
    """SD 1.5's shipped scheduler (PNDM, skipping PRK steps), which other trainers read from the folder."""
    return PNDMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
                         set_alpha_to_one=False, skip_prk_steps=True, steps_offset=1)


def tokenizer_for_builtin():
    """CLIP's real tokenizer when open-clip-torch's data file is installed, else the built-in one with a notice."""
    tokenizer = build_clip_tokenizer()
    if tokenizer is None:
        print("notice: open-clip-torch is not installed, so builtin:sd15-* use the small built-in tokenizer "
              "(scripts/bootstrap installs it).", file=sys.stderr)
        tokenizer = build_tokenizer()
    return tokenizer


def build_components(name: str, seed: int = 0, device: str | torch.device = "cpu"):
    """UNet, VAE, text encoder, tokenizer and scheduler of a real-shaped built-in, with seeded random weights."""
    unet_shape, vae_shape, text_shape, _ = SHAPES[name]
    tokenizer = tokenizer_for_builtin()
    cuda = [torch.device(device)] if torch.device(device).type == "cuda" else []
    with torch.random.fork_rng(devices=cuda), torch.device(device):  # the caller's random state left alone
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(in_channels=4, out_channels=4, **unet_shape)
        vae = AutoencoderKL(in_channels=3, out_channels=3, scaling_factor=0.18215, **vae_shape)
        text_encoder = CLIPTextModel(CLIPTextConfig(
            architectures=["CLIPTextModel"], max_position_embeddings=77,
            # SD 1.5's vocabulary size even with the small fallback tokenizer, so the architecture stays exact
            vocab_size=CLIP_VOCAB_SIZE if name == "builtin:sd15-random" else len(tokenizer),
            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id, **text_shape,
        ))
    return unet, vae, text_encoder, tokenizer, sd15_scheduler()


def native_resolution(name: str) -> int:
    return SHAPES[name][3]


def unet_parameter_count(name: str) -> int:
    """The UNet's parameter count from its config alone (built on the meta device: no memory, no init)."""
    with torch.device("meta"):
        unet = UNet2DConditionModel(in_channels=4, out_channels=4, **SHAPES[name][0])
    return sum(p.numel() for p in unet.parameters())


def save_builtin(name: str, folder: Path, seed: int = 0, device: str = "cpu") -> Path:
    """Write a real-shaped built-in as a diffusers folder (model_index.json, unet/, vae/, ...)."""
    unet, vae, text_encoder, tokenizer, scheduler = build_components(name, seed, device)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.save_pretrained(folder)
    return Path(folder)


if __name__ == "__main__":  # python -m dreambooth_lora.builtin_configs save builtin:sd15-toy DIR [--device cuda]
    import argparse

    parser = argparse.ArgumentParser(description="Save a real-shaped built-in model as a diffusers folder.")
    parser.add_argument("action", choices=["save"])
    parser.add_argument("name", choices=NAMES)
    parser.add_argument("folder")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu", help="where the random weights are drawn (cuda is faster for sd15-random)")
    args = parser.parse_args()
    print(save_builtin(args.name, Path(args.folder), args.seed, args.device))
