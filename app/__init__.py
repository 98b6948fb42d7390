"""The DreamBooth-LoRA Studio web UI (Gradio): a view over dreambooth_lora; start it with `python -m app`."""
