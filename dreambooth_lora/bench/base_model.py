"""Train `builtin:tiny-world` from scratch: a VAE, then a CLIP text encoder and UNet jointly, on the world.

Everything is seeded; long phases checkpoint to a work folder and resume, so the CPU route can be
spread over sessions and the GPU route fits one short run. The shipped result is a diffusers folder.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass
from multiprocessing import Pool
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from safetensors.torch import load_file, save_file
from transformers import CLIPTextConfig, CLIPTextModel

from ..checkpoint import load_checkpoint, save_checkpoint
from ..models import BaseModel, assemble, sd_scheduler_config
from ..paths import atomic_path
from ..tokenizer import build_tokenizer
from ..tinyworld import analyser, world

MAX_TOKENS = 24  # longest caption is 15 tokens with start/end; 77 would waste compute
CAPTION_DROPOUT = 0.1  # empty captions teach the unconditional branch for guidance


@dataclass(frozen=True)
class BaseTrainConfig:
    seed: int = 0
    dataset_size: int = 300_000
    vae_steps: int = 4000
    vae_batch: int = 256
    vae_lr: float = 1e-3
    unet_steps: int = 20_000
    unet_batch: int = 512
    unet_lr: float = 5e-4  # the feasibility probe's rate for this size
    warmup: int = 500
    ema_decay: float = 0.999
    minutes: float = 0.0  # >0: shorten the UNet phase to fit this wall-clock budget
    vae_minutes: float = 0.0  # >0: likewise for the VAE phase
    checkpoint_every: int = 1000
    solid_share: float = world.SOLID_PROBABILITY  # lower it to show the UNet more two-colour looks
    init_from: str = ""  # a tiny-world diffusers folder: keep its VAE, continue its UNet and text encoder


def build_components(tokenizer):
    """The tiny-world architecture: SD layout, factor-4 VAE (32x32x3 -> 8x8x4), small CLIP and UNet."""
    vae = AutoencoderKL(
        in_channels=3, out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(32, 64, 64), layers_per_block=1, latent_channels=4, norm_num_groups=16, sample_size=32,
    )
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=256, num_hidden_layers=3, num_attention_heads=4,
        max_position_embeddings=MAX_TOKENS, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    ))
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(64, 128, 128), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=64, attention_head_dim=8, norm_num_groups=32,
    )
    return vae, text_encoder, unet


def _render_chunk(args) -> tuple[np.ndarray, list[str], list[dict]]:
    seed, count, solid_share = args
    images, captions, scenes = [], [], []
    for image, caption, scene in world.dataset(count, seed, exclude_held_out=True, solid_probability=solid_share):
        images.append(np.asarray(image))
        captions.append(caption)
        scenes.append(asdict(scene))
    return np.stack(images), captions, scenes


def render_dataset(size: int, seed: int, solid_share: float = world.SOLID_PROBABILITY,
                   processes: int | None = None) -> tuple[torch.Tensor, list[str]]:
    """`size` base-world images (uint8 NCHW) and captions; chunks are seeded so the result is the same on any core count."""
    chunk = 5000
    jobs = [(seed * 1_000_003 + i, min(chunk, size - i * chunk), solid_share) for i in range(math.ceil(size / chunk))]
    with Pool(processes or os.cpu_count()) as pool:
        parts = pool.map(_render_chunk, jobs)
    images = torch.from_numpy(np.concatenate([p[0] for p in parts])).permute(0, 3, 1, 2).contiguous()
    captions = [c for p in parts for c in p[1]]
    return images, captions


def _lr_factor(step: int, total: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))


def train_vae(vae, images, config: BaseTrainConfig, work: Path, device, log) -> None:
    done = work / "vae.safetensors"
    if done.exists():
        vae.load_state_dict(load_file(done))
        return
    vae.to(device).train()
    optimizer = torch.optim.AdamW(vae.parameters(), lr=config.vae_lr, weight_decay=0.0)
    generator = torch.Generator().manual_seed(config.seed + 1)
    step, losses = 0, []
    ckpt = work / "vae-ckpt.safetensors"
    if ckpt.exists():
        weights, step, losses = load_checkpoint(ckpt, optimizer, generator)
        vae.load_state_dict(weights)
    started, total = time.time(), config.vae_steps
    while step < total:
        for group in optimizer.param_groups:
            group["lr"] = config.vae_lr * _lr_factor(step, total, 200)
        index = torch.randint(0, images.shape[0], (config.vae_batch,), generator=generator)
        pixels = images[index].to(device).float() / 127.5 - 1
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            posterior = vae.encode(pixels).latent_dist
            recon = vae.decode(posterior.sample()).sample.float()
        # L1 keeps edges and colour seams sharper than MSE alone; the KL term only keeps latents bounded.
        loss = F.mse_loss(recon, pixels) + 0.5 * F.l1_loss(recon, pixels) + 1e-6 * posterior.kl().mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        if step == 50 and config.vae_minutes:
            total = min(total, int(config.vae_minutes * 60 / ((time.time() - started) / 50)))
        if step % 100 == 0:
            losses.append(round(loss.item(), 5))
            log({"phase": "vae", "step": step, "total": total, "loss": losses[-1], "s": round(time.time() - started, 1)})
        if step % config.checkpoint_every == 0 and step < total:
            save_checkpoint(ckpt, vae.state_dict(), optimizer, generator, step, losses)
    vae.eval()
    with atomic_path(done) as tmp:
        save_file({k: v.contiguous() for k, v in vae.state_dict().items()}, str(tmp))


@torch.no_grad()
def encode_dataset(vae, images, device) -> torch.Tensor:
    means = []
    for start in range(0, images.shape[0], 4096):
        pixels = images[start : start + 4096].to(device).float() / 127.5 - 1
        means.append(vae.encode(pixels).latent_dist.mean.float())
    return torch.cat(means)


def train_unet(unet, text_encoder, tokenizer, latents, captions, scaling: float, config: BaseTrainConfig, work: Path, device, log) -> None:
    done = work / "unet.safetensors"
    if done.exists():
        state = load_file(done)
        unet.load_state_dict({k[5:]: v for k, v in state.items() if k.startswith("unet.")})
        text_encoder.load_state_dict({k[3:]: v for k, v in state.items() if k.startswith("te.")})
        return
    unet.to(device).train()
    text_encoder.to(device).train()
    scheduler = DDPMScheduler.from_config(sd_scheduler_config())
    empty = tokenizer([""], padding="max_length", max_length=MAX_TOKENS, return_tensors="pt").input_ids
    ids = tokenizer(captions, padding="max_length", max_length=MAX_TOKENS, truncation=True, return_tensors="pt").input_ids
    params = list(unet.parameters()) + list(text_encoder.parameters())
    optimizer = torch.optim.AdamW(params, lr=config.unet_lr, weight_decay=1e-2)
    generator = torch.Generator().manual_seed(config.seed + 2)
    ema = [p.detach().clone() for p in params]
    step, losses, total = 0, [], config.unet_steps
    ckpt = work / "unet-ckpt.safetensors"
    if ckpt.exists():
        weights, step, losses = load_checkpoint(ckpt, optimizer, generator)
        for i, p in enumerate(params):
            p.data.copy_(weights[f"p{i}"])
            ema[i].copy_(weights[f"ema{i}"])
        total = int(json.loads((work / "unet-plan.json").read_text())["total"])
    latents, ids, empty = latents.to(device), ids.to(device), empty.to(device)
    started, measured_at = time.time(), None
    while step < total:
        for group in optimizer.param_groups:
            group["lr"] = config.unet_lr * _lr_factor(step, total, config.warmup)
        index = torch.randint(0, latents.shape[0], (config.unet_batch,), generator=generator).to(device)
        drop = (torch.rand(config.unet_batch, generator=generator) < CAPTION_DROPOUT).to(device)
        batch_ids = torch.where(drop[:, None], empty, ids[index])
        clean = latents[index] * scaling
        noise = torch.randn(clean.shape, generator=generator).to(device)
        timesteps = torch.randint(0, 1000, (config.unet_batch,), generator=generator).to(device)
        noisy = scheduler.add_noise(clean, noise, timesteps)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            hidden = text_encoder(batch_ids)[0]
            prediction = unet(noisy, timesteps, hidden).sample.float()
        loss = F.mse_loss(prediction, noise)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():
            torch._foreach_lerp_(ema, [p.detach() for p in params], 1 - config.ema_decay)
        step += 1
        if step == 100 and config.minutes and measured_at is None:
            # Fit the schedule to the time budget once, from the measured step time.
            per_step = (time.time() - started) / 100
            total = min(total, int(config.minutes * 60 / per_step))
            measured_at = step
        if step == 100 or not (work / "unet-plan.json").exists():
            (work / "unet-plan.json").write_text(json.dumps({"total": total}))
        if step % 200 == 0:
            losses.append(round(loss.item(), 5))
            log({"phase": "unet", "step": step, "total": total, "loss": losses[-1], "s": round(time.time() - started, 1)})
        if step % config.checkpoint_every == 0 and step < total:
            state = {f"p{i}": p.detach() for i, p in enumerate(params)} | {f"ema{i}": e for i, e in enumerate(ema)}
            save_checkpoint(ckpt, state, optimizer, generator, step, losses)
    with torch.no_grad():
        for p, e in zip(params, ema):
            p.copy_(e)
    unet.eval(), text_encoder.eval()
    state = {f"unet.{k}": v.contiguous() for k, v in unet.state_dict().items()}
    state |= {f"te.{k}": v.contiguous() for k, v in text_encoder.state_dict().items()}
    with atomic_path(done) as tmp:
        save_file(state, str(tmp))


def train_base_model(config: BaseTrainConfig, work: Path, out: Path, device: torch.device, log=print) -> BaseModel:
    """Run (or resume) every phase and write the diffusers folder to `out`."""
    work.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(config.seed)
    tokenizer = build_tokenizer(world.vocabulary())
    tokenizer.model_max_length = MAX_TOKENS
    vae, text_encoder, unet = build_components(tokenizer)
    log({"params": {"vae": _count(vae), "text_encoder": _count(text_encoder), "unet": _count(unet)}})
    started = time.time()
    images, captions = render_dataset(config.dataset_size, config.seed, config.solid_share)
    log({"phase": "render", "images": len(captions), "s": round(time.time() - started, 1)})
    if config.init_from:  # keep the source's VAE; its UNet and text encoder train on from here
        load_components(Path(config.init_from), vae, text_encoder, unet)
    else:
        train_vae(vae, images, config, work, device, log)
    vae.to(device).eval()
    latents = encode_dataset(vae, images, device)
    if config.init_from:  # the UNet being continued learned with the source's scaling
        scaling = json.loads((Path(config.init_from) / "vae" / "config.json").read_text())["scaling_factor"]
    else:
        scaling = float(1.0 / latents.std())  # unit-variance latents, as SD's 0.18215 does for its VAE
    vae.register_to_config(scaling_factor=scaling)
    log({"phase": "latents", "std": round(float(latents.std()), 4), "scaling_factor": round(scaling, 4)})
    train_unet(unet, text_encoder, tokenizer, latents, captions, scaling, config, work, device, log)
    model = assemble("builtin:tiny-world", unet.cpu().float(), vae.cpu().float(), text_encoder.cpu().float(),
                      tokenizer, sd_scheduler_config(), world.IMAGE_SIZE)
    export(model, out, config)
    return model


def load_components(folder: Path, vae, text_encoder, unet) -> None:
    """Start from a shipped tiny-world folder (fp16 weights, upcast into the fp32 modules)."""
    vae.load_state_dict(load_file(folder / "vae" / "diffusion_pytorch_model.safetensors"))
    unet.load_state_dict(load_file(folder / "unet" / "diffusion_pytorch_model.safetensors"))
    text_encoder.load_state_dict(load_file(folder / "text_encoder" / "model.safetensors"))


def export(model: BaseModel, out: Path, config: BaseTrainConfig) -> None:
    """Save as a diffusers folder in fp16 (the package ships it; loading upcasts to fp32)."""
    pipe = model.pipeline()
    pipe.to(torch.float16)
    pipe.save_pretrained(out, safe_serialization=True)
    pipe.to(torch.float32)  # the same modules stay in use (evaluation) after export
    (out / "studio.json").write_text(json.dumps({"resolution": world.IMAGE_SIZE, "train_config": asdict(config)}, indent=1))


def _count(module) -> int:
    return sum(p.numel() for p in module.parameters())


# Seen two-colour looks (none is a subject look): does the base draw the pattern it is asked for?
PATTERN_PROMPTS = (
    ("ball", "halves", ("red", "yellow")), ("ball", "split", ("red", "magenta")), ("ball", "stripes", ("blue", "cyan")),
    ("box", "split", ("red", "yellow")), ("box", "halves", ("blue", "cyan")), ("box", "stripes", ("magenta", "pink")),
    ("ring", "split", ("pink", "red")), ("ring", "stripes", ("red", "magenta")), ("triangle", "halves", ("blue", "magenta")),
    ("cross", "split", ("yellow", "pink")), ("triangle", "stripes", ("red", "yellow")), ("cross", "halves", ("red", "pink")),
)


@torch.no_grad()
def prompt_following(model: BaseModel, per_prompt: int = 16, guidance: float = 5.0, steps: int = 20, device="cpu") -> dict:
    """Share of generations the analyser reads as asked: held-out solid combinations (class, colour,
    background) and seen two-colour looks (class, pattern, colour pair)."""
    pipe = model.pipeline().to(device)

    def generate(prompt: str) -> list:
        generators = [torch.Generator().manual_seed(i) for i in range(per_prompt)]
        latents = torch.stack([torch.randn((4, 8, 8), generator=g) for g in generators]).to(device)
        images = pipe([prompt] * per_prompt, num_inference_steps=steps, guidance_scale=guidance, height=32, width=32, latents=latents).images
        return [analyser.analyse(image) for image in images]

    held_out, patterned = {}, {}
    for cls, colour, background in world.HELD_OUT:
        prompt = world.compose_caption(cls, "solid", (colour,), background, True)
        ok = [r.cls == cls and tuple(r.colours) == (colour,) and r.background == background for r in generate(prompt)]
        held_out[prompt] = sum(ok) / len(ok)
    for cls, pattern, colours in PATTERN_PROMPTS:
        prompt = world.compose_caption(cls, pattern, colours, None, True)
        ok = [r.cls == cls and r.pattern == pattern and set(r.colours) == set(colours) for r in generate(prompt)]
        patterned[prompt] = sum(ok) / len(ok)
    return {
        "held_out_all_correct": round(sum(held_out.values()) / len(held_out), 4),
        "patterned_correct": round(sum(patterned.values()) / len(patterned), 4),
        "per_prompt": held_out | patterned,
    }
