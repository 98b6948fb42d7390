"""DreamBooth-LoRA Studio: personalise Stable-Diffusion-style models with LoRA adapters."""

__version__ = "0.1.0"
