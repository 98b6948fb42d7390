"""The tiny-world base-model trainer runs end to end at toy sizes, resumes, and exports a loadable model."""

from __future__ import annotations

import pytest
import torch

from dreambooth_lora.bench.base_model import BaseTrainConfig, train_base_model


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


@pytest.mark.slow
def test_init_from_continues_a_shipped_model_and_keeps_its_vae(tmp_path):
    from safetensors.torch import load_file

    from dreambooth_lora.models import BUILTIN_DIR

    source = BUILTIN_DIR / "tiny-world"
    # Zero further steps: the export must be the source model itself (VAE, UNet, text encoder, scaling).
    config = BaseTrainConfig(dataset_size=16, unet_steps=0, unet_batch=4, init_from=str(source), solid_share=0.4)
    train_base_model(config, tmp_path / "work", tmp_path / "out", torch.device("cpu"), log=lambda record: None)
    for part in ("vae/diffusion_pytorch_model.safetensors", "unet/diffusion_pytorch_model.safetensors", "text_encoder/model.safetensors"):
        before, after = load_file(source / part), load_file(tmp_path / "out" / part)
        assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before), part
    import json

    scaling = lambda folder: json.loads((folder / "vae" / "config.json").read_text())["scaling_factor"]
    assert scaling(tmp_path / "out") == scaling(source)

    # A few steps move the UNet away from the source.
    config = BaseTrainConfig(dataset_size=16, unet_steps=2, unet_batch=4, warmup=1, init_from=str(source))
    train_base_model(config, tmp_path / "work2", tmp_path / "out2", torch.device("cpu"), log=lambda record: None)
    before, after = load_file(source / "unet/diffusion_pytorch_model.safetensors"), load_file(tmp_path / "out2/unet/diffusion_pytorch_model.safetensors")
    assert any(not torch.equal(before[k], after[k]) for k in before)
