"""The DreamBooth-LoRA training loop: encode once, then noise, predict, loss, backward, step."""

from __future__ import annotations

import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from . import __version__
from .adapter_file import AdapterFile, check_new_name, free_name, store_adapter
from .checkpoint import load_checkpoint, save_checkpoint
from .config import TrainConfig
from .errors import UserError
from .images import check_subject_photos, expand_image_paths, load_subject_images
from .library import AdapterEntry, Library
from .lora import (
    EMBEDDING_PREFIX,
    TokenEmbedding,
    attach_text_encoder_lora,
    attach_unet_lora,
    collect_adapter_tensors,
    lora_parameters,
)
from .losses import prior_preservation_loss
from .models import BaseModel, load_base_model, native_resolution
from .paths import prior_root
from .prior import PriorSettings, ensure_prior_images, load_prior_images

SAMPLE_COUNT = 4
# The identifier may grow to this many times a typical word embedding's norm. On the tiny world a
# 1x cap learned little (fidelity 0.12) and no cap let it drown "on a green background"; with the
# stage-2 base, 6x beat 3x on the four hardest lambda=1 runs (fidelity 0.86 vs 0.77, background kept).
NORM_ALLOWANCE = 6.0


@dataclass(frozen=True)
class Progress:
    """One progress report: phase is preparing, class_images, training, saving or done."""

    phase: str
    step: int = 0
    total: int = 0
    loss: float | None = None
    message: str = ""
    sample: Path | None = None


class TrainingStopped(Exception):
    """Raised when the run was cancelled or interrupted; a resumable checkpoint has been saved."""

    def __init__(self, job_id: str, step: int):
        super().__init__(f"Training stopped at step {step}; resume with: dreambooth-lora train --resume {job_id}")
        self.job_id, self.step = job_id, step


@dataclass
class TrainResult:
    adapter: AdapterEntry
    job_id: str
    losses: list[float] = field(default_factory=list)
    seconds: float = 0.0


def create_job(library: Library, config: TrainConfig, image_paths: list, status: str = "running") -> str:
    """Check the images and name, copy the photos into jobs/<id>/images and record the job."""
    files = expand_image_paths(image_paths)
    # every file, its size at the training resolution and the count, now, before anything slow happens
    check_subject_photos(files, config.resolution or native_resolution(config.base_model))
    name = check_new_name(library, config.name or default_adapter_name(library, config))
    params = {"config": {**config.to_dict(), "name": name}}
    job_id = library.create_job(params, status=status)
    images_dir = library.job_folder(job_id) / "images"
    images_dir.mkdir()
    for index, path in enumerate(files):
        shutil.copyfile(path, images_dir / f"{index:02d}{Path(path).suffix.lower()}")
    return job_id


def default_adapter_name(library: Library, config: TrainConfig) -> str:
    return free_name(library, f"{config.token}-{config.class_noun.replace(' ', '-')}-{time.strftime('%Y%m%d-%H%M')}")


def run_training(
    library: Library,
    job_id: str,
    prior_dir: Path | None = None,
    on_progress: Callable[[Progress], None] = lambda progress: None,
    should_stop: Callable[[], bool] = lambda: False,
    sample_every: int = 0,
) -> TrainResult:
    """Train the job's adapter from its checkpoint (if any) to the end and add it to the library."""
    started = time.time()
    job_dir = library.job_folder(job_id)
    config = TrainConfig(**library.job(job_id)["params"]["config"])
    on_progress(Progress("preparing", message=f"loading {config.base_model}"))
    model = load_base_model(config.base_model, config.config_dir)
    image_files = sorted((job_dir / "images").iterdir())
    config = config.resolved(len(image_files), model.name.startswith("builtin:"), model.native_resolution)
    instance_images, notes = load_subject_images(image_files, config.resolution)
    for note in notes:
        on_progress(Progress("preparing", message=note))
    device, weight_dtype, autocast_dtype = pick_precision(config)

    class_images = ensure_class_images(model, config, device, prior_dir, on_progress)

    _move(model.unet, device, weight_dtype)
    model.vae.to(device)  # SD's VAE overflows in fp16; it only runs once, so fp32 is cheap
    instance_latents = encode_images(model, instance_images)
    class_latents = encode_images(model, class_images) if class_images else None

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)  # LoRA's initial A matrices: from the run's seed, not from what ran before
        trainables = attach_trainables(model, config, device, weight_dtype, autocast_dtype)
    on_progress(Progress("preparing", message=prompt_check_message(trainables.separation, config)))
    optimizer = make_optimizer(trainables, config)
    generator = torch.Generator().manual_seed(config.seed)
    step, losses = 0, []
    checkpoint_path = job_dir / "checkpoint.safetensors"
    if checkpoint_path.exists():
        weights, step, losses = load_checkpoint(checkpoint_path, optimizer, generator)
        trainables.load_tensors(weights)
        on_progress(Progress("training", step, config.steps, losses[-1] if losses else None, f"resumed at step {step}"))

    scheduler = model.training_scheduler()
    scaler = torch.amp.GradScaler("cuda") if autocast_dtype == torch.float16 else None
    batch = config.batch_size

    def checkpoint(at_step: int) -> None:
        save_checkpoint(checkpoint_path, trainables.tensors(), optimizer, generator, at_step, losses)

    model.unet.train()
    try:
        while step < config.steps:
            if should_stop():
                raise KeyboardInterrupt
            # --- one DreamBooth step: instance and class examples in the same forward pass ---
            latents, n_instance = sample_latents(instance_latents, class_latents, batch, generator)
            latents = latents.to(device) * model.vae.config.scaling_factor
            noise = torch.randn(latents.shape, generator=generator).to(device)
            timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (latents.shape[0],), generator=generator).to(device)
            noisy = scheduler.add_noise(latents, noise, timesteps)
            hidden = trainables.prompt_embeddings(n_instance, latents.shape[0] - n_instance)
            with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
                prediction = model.unet(noisy.to(weight_dtype), timesteps, hidden.to(weight_dtype)).sample
            target = noise if scheduler.config.prediction_type == "epsilon" else scheduler.get_velocity(latents, noise, timesteps)
            loss, _, _ = prior_preservation_loss(prediction, target, n_instance, config.prior_weight)
            if scaler:
                scaler.scale(loss).backward()
                scaler.unscale_(optimizer)
            else:
                loss.backward()
            torch.nn.utils.clip_grad_norm_(trainables.parameters, 1.0)
            scaler.step(optimizer) if scaler else optimizer.step()
            if scaler:
                scaler.update()
            optimizer.zero_grad(set_to_none=True)
            trainables.after_step()
            step += 1
            losses.append(round(loss.item(), 6))
            on_progress(Progress("training", step, config.steps, losses[-1]))
            if config.checkpoint_every and step % config.checkpoint_every == 0 and step < config.steps:
                checkpoint(step)
            if sample_every and step % sample_every == 0 and step < config.steps:
                sample = job_dir / "samples" / f"step-{step:05d}.png"
                sample.parent.mkdir(exist_ok=True)
                generate_samples(model, trainables, config, 1)[0].save(sample)
                on_progress(Progress("training", step, config.steps, losses[-1], sample=sample))
    except KeyboardInterrupt:
        checkpoint(step)
        raise TrainingStopped(job_id, step) from None
    model.unet.eval()

    on_progress(Progress("saving", step, config.steps, losses[-1] if losses else None))
    entry = save_adapter(library, model, trainables, config, job_id, losses)
    checkpoint_path.unlink(missing_ok=True)  # the adapter is saved; the checkpoint has no further use
    return TrainResult(entry, job_id, losses, time.time() - started)


def ensure_class_images(model: BaseModel, config: TrainConfig, device, prior_dir: Path | None,
                        on_progress: Callable[[Progress], None] = lambda progress: None) -> list:
    """The run's class-prior images from the cache, generating the missing ones; none when priors are off."""
    if config.prior_weight <= 0 or config.num_class_images <= 0:
        return []
    settings = PriorSettings(prompt=config.class_prompt, resolution=config.resolution)
    report = lambda done, total: on_progress(Progress("class_images", done, total))
    model.unet.to(device), model.vae.to(device), model.text_encoder.to(device)
    paths, _ = ensure_prior_images(model, settings, config.num_class_images, prior_root(prior_dir), on_progress=report)
    return load_prior_images(paths)


def prompt_check_message(similarity: float, config: TrainConfig) -> str:
    """Say whether the base text encoder already tells the instance prompt from the class prompt."""
    text = f"'{config.instance_prompt}' vs '{config.class_prompt}': text-encoder similarity {similarity:.3f}"
    if similarity < 0.995:
        return text + "."
    if config.train_token_embedding or config.text_encoder != "none":
        return text + f" (nearly identical, so the '{config.token}' embedding/text encoder is trained to separate them)."
    return text + (f" (nearly identical: with a frozen text encoder '{config.token}' cannot be learned apart from the "
                   "class; consider --train-token-embedding).")


def _move(module, device, dtype) -> None:
    # Only cast when needed: diffusers warns on every dtype cast, even a no-op one.
    module.to(device) if dtype == torch.float32 else module.to(device, dtype)


def pick_precision(config: TrainConfig) -> tuple[torch.device, torch.dtype, torch.dtype | None]:
    """Device, base-weight dtype and autocast dtype: bf16 on CUDA where supported, fp16 otherwise, fp32 on CPU."""
    if config.device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA GPU is available here; use --device cpu or auto.")
    device = torch.device("cuda" if config.device in ("auto", "cuda") and torch.cuda.is_available() else "cpu")
    precision = config.mixed_precision
    if device.type == "cpu":
        if precision in ("fp16", "bf16"):
            raise UserError(f"--mixed-precision {precision} needs a CUDA GPU; on CPU use no or auto.")
        return device, torch.float32, None
    if precision == "auto":
        precision = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if precision == "no":
        return device, torch.float32, None
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return device, dtype, dtype


@torch.no_grad()
def encode_images(model: BaseModel, images: list) -> tuple[torch.Tensor, torch.Tensor]:
    """VAE latent mean and std of every image, computed once (sampled afresh each step)."""
    means, stds = [], []
    for start in range(0, len(images), 16):
        pixels = torch.stack([_to_tensor(image) for image in images[start : start + 16]]).to(model.vae.device)
        dist = model.vae.encode(pixels).latent_dist
        means.append(dist.mean.float().cpu())
        stds.append(dist.std.float().cpu())
    return torch.cat(means), torch.cat(stds)


def _to_tensor(image) -> torch.Tensor:
    array = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8).reshape(image.height, image.width, 3)
    return array.permute(2, 0, 1).float() / 127.5 - 1.0


def sample_latents(instance, prior, batch: int, generator: torch.Generator) -> tuple[torch.Tensor, int]:
    """Draw `batch` instance latents and, with priors, `batch` class latents; instance rows first."""
    parts = [instance] + ([prior] if prior is not None else [])
    drawn = []
    for mean, std in parts:
        index = torch.randint(0, mean.shape[0], (batch,), generator=generator)
        drawn.append(mean[index] + std[index] * torch.randn(mean[index].shape, generator=generator))
    return torch.cat(drawn), batch


class Trainables:
    """What learns in a run (UNet LoRA, optional text-encoder LoRA, optional identifier embedding)."""

    def __init__(self, model: BaseModel, config: TrainConfig, device, autocast_dtype):
        self.model, self.config, self.device, self.autocast_dtype = model, config, device, autocast_dtype
        self.token_embedding: TokenEmbedding | None = None
        self.prompt_ids = model.tokenizer(
            [config.instance_prompt, config.class_prompt], padding="max_length",
            max_length=model.tokenizer.model_max_length, truncation=True, return_tensors="pt",
        ).input_ids.to(device)
        self.cached: torch.Tensor | None = None
        self.separation = 0.0
        self.max_token_norm = 0.0  # set with the identifier embedding: NORM_ALLOWANCE x a typical word's norm

    @property
    def text_encoder_trains(self) -> bool:
        return self.config.text_encoder != "none" or self.token_embedding is not None

    @property
    def parameters(self) -> list[torch.nn.Parameter]:
        params = lora_parameters(self.model.unet) + lora_parameters(self.model.text_encoder)
        return params + ([self.token_embedding.vectors] if self.token_embedding else [])

    def after_step(self) -> None:
        if self.token_embedding is not None:
            self.token_embedding.clamp_norm(self.max_token_norm)

    def encode(self) -> torch.Tensor:
        with torch.autocast(self.device.type, dtype=self.autocast_dtype, enabled=self.autocast_dtype is not None):
            return self.model.text_encoder(self.prompt_ids)[0].float()

    def prompt_embeddings(self, n_instance: int, n_class: int) -> torch.Tensor:
        """Encoder states for the batch rows: cached when nothing in the text encoder learns."""
        if self.text_encoder_trains:
            both = self.encode()
        else:
            if self.cached is None:
                with torch.no_grad():
                    self.cached = self.encode()
            both = self.cached
        return torch.cat([both[0:1].expand(n_instance, -1, -1), both[1:2].expand(n_class, -1, -1)])

    def tensors(self) -> dict[str, torch.Tensor]:
        te = self.model.text_encoder if self.config.text_encoder != "none" else None
        return collect_adapter_tensors(self.model.unet, te, self.token_embedding)

    def load_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        from peft import set_peft_model_state_dict

        strip = lambda prefix: {k.removeprefix(prefix): v for k, v in tensors.items() if k.startswith(prefix)}
        set_peft_model_state_dict(self.model.unet, strip("unet."), adapter_name="default")
        if self.config.text_encoder != "none":
            set_peft_model_state_dict(self.model.text_encoder, strip("text_encoder."), adapter_name="default")
        if self.token_embedding is not None:
            for row, piece in enumerate(self.token_embedding.tokens):
                self.token_embedding.vectors.data[row] = tensors[EMBEDDING_PREFIX + piece].to(self.device)


def attach_trainables(model: BaseModel, config: TrainConfig, device, weight_dtype, autocast_dtype) -> Trainables:
    """Put LoRA on the UNet (and text encoder per its mode) and the identifier embedding if asked."""
    if config.text_encoder == "qlora":
        model.text_encoder = quantize_text_encoder(model.text_encoder, autocast_dtype or torch.float32, device)
    else:
        _move(model.text_encoder, device, weight_dtype)
    trainables = Trainables(model, config, device, autocast_dtype)
    with torch.no_grad():
        states = trainables.encode()
        trainables.separation = torch.nn.functional.cosine_similarity(states[0].flatten(), states[1].flatten(), dim=0).item()
    attach_unet_lora(model.unet, config.rank, config.lora_alpha)
    if config.text_encoder in ("lora", "qlora"):
        attach_text_encoder_lora(model.text_encoder, config.rank, config.lora_alpha)
    if config.train_token_embedding:
        trainables.token_embedding = TokenEmbedding.for_token(model.text_encoder, model.tokenizer, config.token).attach(model.text_encoder)
        table = model.text_encoder.get_input_embeddings().weight
        trainables.max_token_norm = NORM_ALLOWANCE * table.float().norm(dim=-1).mean().item()
    for param in trainables.parameters:
        param.data = param.data.float()  # LoRA weights train in fp32 even when the base runs in bf16/fp16
    return trainables


def quantize_text_encoder(text_encoder, compute_dtype: torch.dtype, device):
    """Reload the text encoder in 4-bit NF4 with double quantisation (QLoRA) through bitsandbytes."""
    from transformers import BitsAndBytesConfig, CLIPTextModel

    quantization = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=compute_dtype
    )
    with tempfile.TemporaryDirectory() as folder:
        text_encoder.save_pretrained(folder)
        quantized = CLIPTextModel.from_pretrained(folder, quantization_config=quantization, device_map=str(device))
    quantized.requires_grad_(False)
    # bitsandbytes (0.50) repacks a Linear4bit's weights for an AVX-512 BF16 inference kernel on its first
    # eval-mode, no-grad forward on such CPUs. That path is inference-only (no autograd through it: training
    # afterwards fails in `result += bias`) and breaks on layers narrower than the 64-value quantisation block
    # (tiny models). The portable dequantise-and-matmul path works on every CPU and on both, so use it always.
    from bitsandbytes.nn import Linear4bit

    for module in quantized.modules():
        if isinstance(module, Linear4bit):
            module.support_avx512bf16_for_cpu = False
    return quantized


def make_optimizer(trainables: Trainables, config: TrainConfig) -> torch.optim.AdamW:
    """AdamW; with LoRA+ the B matrices get `ratio` times the A learning rate (Hayou et al. 2024)."""
    named = [(n, p) for n, p in trainables.model.unet.named_parameters() if "lora_" in n and p.requires_grad]
    named += [(n, p) for n, p in trainables.model.text_encoder.named_parameters() if "lora_" in n and p.requires_grad]
    ratio = config.loraplus_ratio or 1.0
    groups = [
        {"params": [p for n, p in named if "lora_B" not in n], "lr": config.lr},
        {"params": [p for n, p in named if "lora_B" in n], "lr": config.lr * ratio},
    ]
    if trainables.token_embedding is not None:
        groups.append({"params": [trainables.token_embedding.vectors], "lr": config.token_lr, "weight_decay": 0.0})
    return torch.optim.AdamW(groups, lr=config.lr, weight_decay=1e-2)


@torch.no_grad()
def generate_samples(model: BaseModel, trainables: Trainables, config: TrainConfig, count: int):
    pipe = model.pipeline()
    generators = [torch.Generator().manual_seed(config.seed + i) for i in range(count)]
    with torch.autocast(trainables.device.type, dtype=trainables.autocast_dtype, enabled=trainables.autocast_dtype is not None):
        return pipe(
            [config.instance_prompt] * count, num_inference_steps=20, guidance_scale=5.0,
            height=config.resolution, width=config.resolution, generator=generators,
        ).images


def save_adapter(library: Library, model: BaseModel, trainables: Trainables, config: TrainConfig,
                 job_id: str, losses: list[float]) -> AdapterEntry:
    """Render the samples, then store the adapter file, meta and samples in the library (all or nothing).

    `store_adapter` adds the id, the time, and the rank and alpha of the saved layers to the metadata."""
    meta = {
        "name": config.name, "token": config.token, "class_noun": config.class_noun,
        "instance_prompt": config.instance_prompt, "class_prompt": config.class_prompt,
        "base_model": model.name, "fingerprint": model.fingerprint,
        "steps": config.steps, "prior_weight": config.prior_weight, "num_class_images": config.num_class_images,
        "text_encoder": config.text_encoder, "train_token_embedding": bool(config.train_token_embedding),
        "resolution": config.resolution, "lr": config.lr, "loraplus_ratio": config.loraplus_ratio,
        "seed": config.seed, "job": job_id, "final_loss": losses[-1] if losses else None,
        "prompt_similarity": round(trainables.separation, 4), "studio_version": __version__,
    }
    samples = generate_samples(model, trainables, config, SAMPLE_COUNT)
    return store_adapter(library, AdapterFile.from_tensors(trainables.tensors(), meta, config.lora_alpha), samples)
