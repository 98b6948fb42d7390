"""Real-shaped built-ins: SD 1.5's exact architecture from config, a toy of its layout that trains, and both
savable as diffusers folders that load back unchanged."""

from __future__ import annotations

import pytest

from dreambooth_lora import builtin_configs
from dreambooth_lora.config import TrainConfig, uses_tiny_defaults
from dreambooth_lora.library import Library
from dreambooth_lora.models import load_base_model
from dreambooth_lora.tokenizer import CLIP_VOCAB_SIZE, build_clip_tokenizer
from dreambooth_lora.jobs import create_job
from dreambooth_lora.train import run_training


def test_sd15_random_unet_has_sd15s_parameter_count():
    assert builtin_configs.unet_parameter_count("builtin:sd15-random") == 859_520_964  # SD 1.5's UNet


def test_toy_keeps_sd15s_layout_at_toy_widths():
    model = load_base_model("builtin:sd15-toy")
    assert model.unet.config.block_out_channels == (32, 32, 64, 64)
    assert [type(b).__name__ for b in model.unet.down_blocks] == ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"]
    assert model.unet.config.layers_per_block == 2 and model.text_encoder.config.num_hidden_layers == 2
    assert model.text_encoder.config.hidden_size == 32 and model.native_resolution == 64
    assert builtin_configs.sd15_scheduler().config.skip_prk_steps  # PNDM as SD 1.5 ships it, for other trainers


def test_builtin_weights_are_seeded():
    assert load_base_model("builtin:sd15-toy").fingerprint == load_base_model("builtin:sd15-toy").fingerprint


def test_real_shaped_builtins_take_real_model_defaults():
    assert not uses_tiny_defaults("builtin:sd15-toy") and uses_tiny_defaults("builtin:tiny-random")


def test_clip_tokenizer_from_open_clip_data_matches_sd15s_ids():
    tokenizer = build_clip_tokenizer()
    if tokenizer is None:
        pytest.skip("open-clip-torch is not installed (optional; scripts/bootstrap installs it)")
    assert len(tokenizer) == CLIP_VOCAB_SIZE
    assert tokenizer("a photo of sks dog").input_ids == [49406, 320, 1125, 539, 48136, 1929, 49407]


def test_toy_saves_as_a_diffusers_folder_that_loads_back(tmp_path):
    folder = builtin_configs.save_builtin("builtin:sd15-toy", tmp_path / "toy")
    assert (folder / "model_index.json").exists() and (folder / "scheduler" / "scheduler_config.json").exists()
    assert load_base_model(str(folder)).fingerprint == load_base_model("builtin:sd15-toy").fingerprint


def test_toy_trains_two_steps(tmp_path, session_subject_images, session_prior_dir):
    library = Library(tmp_path / "lib")
    config = TrainConfig(token="sks", class_noun="dog", base_model="builtin:sd15-toy", name="toy", steps=2,
                         num_class_images=1, train_token_embedding=False)
    result = run_training(library, create_job(library, config, session_subject_images), session_prior_dir)
    assert len(result.losses) == 2 and result.adapter.meta["resolution"] == 64


def test_step_cost_counts_flops_and_gives_small_steps_one_thread():
    import torch
    from diffusers import UNet2DConditionModel

    from dreambooth_lora.builtin_configs import SHAPES
    from dreambooth_lora.step_cost import ONE_THREAD_BELOW, cpu_threads, step_flops, step_size

    with torch.device("meta"):  # its full config (defaults filled in), without weights
        toy = UNet2DConditionModel.from_config(SHAPES["builtin:sd15-toy"][0])
    config = dict(toy.config)
    at_64, at_256 = step_flops(config, 4, 8, 2), step_flops(config, 4, 32, 2)
    assert 0 < at_64 and at_256 / at_64 > 16  # 16x the pixels, and attention grows faster
    assert step_flops(config, 4, 8, 4) == pytest.approx(2 * at_64, rel=0.01)
    # the thread choice: one thread for the toy at 64 px, torch's count from 128 px, or what was asked
    assert step_size(toy, 8) < ONE_THREAD_BELOW < step_size(toy, 16)
    assert cpu_threads(None, step_size(toy, 8), 8) == 1 and cpu_threads(None, step_size(toy, 16), 8) == 8
    assert cpu_threads(3, step_size(toy, 8), 8) == 3
