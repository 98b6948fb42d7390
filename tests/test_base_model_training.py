"""The tiny-world base-model trainer runs end to end at toy sizes, resumes, and exports a loadable model."""

from __future__ import annotations

import pytest
import torch

from dreambooth_lora.tinyworld.base_model import BaseTrainConfig, train_base_model


@pytest.mark.slow
def test_train_base_model_exports_a_pipeline_that_loads_and_resumes(tmp_path):
    config = BaseTrainConfig(dataset_size=64, vae_steps=4, vae_batch=4, unet_steps=4, unet_batch=4, warmup=2, checkpoint_every=2)
    logs = []
    model = train_base_model(config, tmp_path / "work", tmp_path / "out", torch.device("cpu"), log=logs.append)
    assert (tmp_path / "out" / "model_index.json").exists() and (tmp_path / "out" / "studio.json").exists()
    assert (tmp_path / "work" / "vae.safetensors").exists() and (tmp_path / "work" / "unet.safetensors").exists()

    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(tmp_path / "out", dtype=torch.float32)
    assert pipe.tokenizer.model_max_length == 24
    image = pipe("a photo of a red ball", num_inference_steps=2, height=32, width=32).images[0]
    assert image.size == (32, 32)

    # A second run finds both phases done and reproduces the same weights without training again.
    again = train_base_model(config, tmp_path / "work", tmp_path / "out2", torch.device("cpu"), log=logs.append)
    for a, b in zip(model.unet.parameters(), again.unet.parameters()):
        assert torch.equal(a, b)
