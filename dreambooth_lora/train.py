"""The DreamBooth-LoRA training loop: encode once, then noise, predict, loss, backward, step."""

from __future__ import annotations

import functools
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

import torch

from . import __version__
from .adapter_file import AdapterFile, store_adapter
from .adapter_types import TRAINABLE_MARKERS
from .checkpoint import load_checkpoint, save_checkpoint
from .config import TrainConfig, uses_tiny_defaults
from .errors import UserError
from .faults import fault_point
from .images import load_subject_images
from .jobs import CHECKPOINT_FILE, METER_CHECKPOINTS, METER_FILE, Jobs, phase_seconds
from .library import AdapterEntry, Library
from .identifier import IdentifierEmbedding, from_file_tensors
from .lora import (
    attach_text_encoder_lora,
    attach_unet_lora,
    ADAPTER_NAME,
    UNET_LAYERS,
    adapters_disabled,
    collect_adapter_tensors,
    lora_parameters,
)
from .losses import ema_rate, lr_factor, min_snr_weights, offset_noise, prior_preservation_loss
from .meter import Meter, meter_due
from .models import BaseModel, load_base_model
from .paths import atomic_path, prior_root
from .prior import PriorSettings, ensure_prior_images, load_prior_images
from .step_cost import cpu_threads, step_size
from .research_types import RESEARCH_TYPES, adalora_orthogonality, attach_adalora, load_trained_state, unet_lora_layers

SAMPLE_COUNT = 4
# The identifier may grow to this many times a typical word embedding's norm. On the tiny world a
# 1x cap learned little (fidelity 0.12) and no cap let it drown "on a green background"; with the
# stage-2 base, 6x beat 3x on the four hardest lambda=1 runs (fidelity 0.86 vs 0.77, background kept).
NORM_ALLOWANCE = 6.0


@dataclass(frozen=True)
class Progress:
    """One progress report: phase is preparing, class_images, training, checkpoint, saving or samples.

    The "samples" report carries the id of the adapter just added to the library (it is usable from then on).
    """

    phase: str
    step: int = 0
    total: int = 0
    loss: float | None = None
    message: str = ""
    sample: Path | None = None
    adapter_id: str | None = None


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
    # for bench/speed.py: class_images (generated), class_images_seconds, step_ends (seconds since the start of
    # run_training at the end of each step trained in this process), peak_gpu_bytes on CUDA
    timings: dict = field(default_factory=dict)
    meter: list[dict] = field(default_factory=list)  # the meter's points, when it was on
    chosen_step: int | None = None
    chosen_adapter: AdapterEntry | None = None  # with keep=both, the chosen point's adapter when it is not the final


@dataclass
class Run:
    """What the step loop needs, made once by prepare_run: components, optimizer, cached latents, RNG, progress."""

    config: TrainConfig
    model: BaseModel
    trainables: "Trainables"
    optimizer: torch.optim.Optimizer
    generator: torch.Generator
    scheduler: object
    scaler: torch.amp.GradScaler
    instance_latents: tuple
    class_latents: tuple | None
    device: torch.device
    weight_dtype: torch.dtype
    autocast_dtype: torch.dtype | None
    checkpoint_path: Path
    step: int = 0
    losses: list = field(default_factory=list)
    timings: dict = field(default_factory=lambda: {"step_ends": []})
    meter: Meter | None = None
    # --ema-decay: the moving average of trainables.parameters, in their order (None: off); saved instead of them
    ema: list[torch.Tensor] | None = None


def run_training(
    library: Library,
    job_id: str,
    prior_dir: Path | None = None,
    on_progress: Callable[[Progress], None] = lambda progress: None,
    should_stop: Callable[[], bool] = lambda: False,
    sample_every: int = 0,
) -> TrainResult:
    """Train the job's adapter from its checkpoint (if any) to the end and add it to the library (as its job's
    owner's: the worker trains every user's jobs)."""
    started, perf_started = time.time(), time.perf_counter()
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    job = Jobs(library).get(job_id)
    if job.owner != library.user:
        library = library.for_user(job.owner)
    threads = torch.get_num_threads()  # training on the CPU may pick fewer (apply_speed_levers)
    try:
        run = prepare_run(job.train_config(), job.folder, prior_dir, on_progress)
        train_steps(run, job.folder, on_progress, should_stop, sample_every, perf_started, keep=library.keep)
        return finish_run(library, run, job_id, on_progress, started, perf_started)
    finally:
        torch.set_num_threads(threads)


def prepare_run(config: TrainConfig, job_dir: Path, prior_dir: Path | None, on_progress) -> Run:
    """Load the model, make or reuse class images, encode every image once, attach LoRA, restore a checkpoint."""
    on_progress(Progress("preparing", message=f"loading {config.base_model}"))
    model = load_base_model(config.base_model, config.config_dir)
    image_files = sorted((job_dir / "images").iterdir())
    config = config.resolved(len(image_files), uses_tiny_defaults(model.name), model.native_resolution)
    instance_images, notes = load_subject_images(image_files, config.resolution)
    for note in notes:
        on_progress(Progress("preparing", message=note))
    device, weight_dtype, autocast_dtype = pick_precision(config)
    scheduler = model.training_scheduler()
    if scheduler.config.prediction_type not in ("epsilon", "v_prediction"):
        raise UserError(f"{config.base_model}: its scheduler predicts {scheduler.config.prediction_type!r}; "
                        "training supports epsilon and v_prediction models.")

    timings: dict = {"step_ends": []}
    class_started = time.perf_counter()
    class_images, timings["class_images"] = ensure_class_images(model, config, device, prior_dir, on_progress)
    timings["class_images_seconds"] = time.perf_counter() - class_started

    _move(model.unet, device, weight_dtype)
    model.vae.to(device)  # SD's VAE overflows in fp16; it only runs once, so fp32 is cheap
    instance_latents = encode_images(model, instance_images)
    class_latents = encode_images(model, class_images) if class_images else None
    if config.device_noise:  # the latent tables live where the noise is drawn
        instance_latents = tuple(t.to(device) for t in instance_latents)
        class_latents = tuple(t.to(device) for t in class_latents) if class_latents else None

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)  # LoRA's initial A matrices: from the run's seed, not from what ran before
        trainables = attach_trainables(model, config, device, weight_dtype, autocast_dtype)
    on_progress(Progress("preparing", message=prompt_check_message(trainables.separation, config)))
    apply_speed_levers(model, trainables, config, device, on_progress, instance_latents[0].shape[-1])
    optimizer = make_optimizer(trainables, config, device, on_progress)
    generator = torch.Generator(device if config.device_noise else "cpu").manual_seed(config.seed)
    run = Run(config, model, trainables, optimizer, generator, scheduler,
              torch.amp.GradScaler(device.type, enabled=autocast_dtype == torch.float16),
              instance_latents, class_latents, device, weight_dtype, autocast_dtype, job_dir / CHECKPOINT_FILE,
              timings=timings)
    if config.meter_every:  # its probes: the photos' latent means, and the first class images' (else the photos')
        scale = model.vae.config.scaling_factor
        run.meter = Meter.with_probes(config.meter_every, config.prior_weight, instance_latents[0].cpu() * scale,
                                      (class_latents or instance_latents)[0].cpu() * scale, scheduler,
                                      job_dir / METER_FILE, job_dir / METER_CHECKPOINTS)
    if config.ema_decay:  # the average starts at the first step's weights (losses.ema_rate gives 1 there)
        run.ema = [p.detach().clone() for p in trainables.parameters]
    if run.checkpoint_path.exists():
        extras: dict = {}
        weights, run.step, run.losses = load_checkpoint(run.checkpoint_path, optimizer, generator, extras)
        with_base_lrs(optimizer)  # a checkpoint from before the schedule has no base_lr: its rate was constant
        trainables.load_tensors(weights)
        if run.ema is not None:
            saved = [extras.get(f"ema.{i}") for i in range(len(run.ema))]
            with torch.no_grad():  # a checkpoint without the average (written with it off) starts it from here
                for average, value, param in zip(run.ema, saved, trainables.parameters):
                    average.copy_(param.detach() if value is None else value)
        on_progress(Progress("training", run.step, config.steps, run.losses[-1] if run.losses else None,
                             f"resumed at step {run.step}"))
    if run.meter is not None:
        run.meter.resume(run.step)
    return run


def apply_speed_levers(model: BaseModel, trainables: "Trainables", config: TrainConfig, device, on_progress,
                       latent_size: int) -> None:
    """The model-side speed and memory levers of the config, all switched here (the CPU threads for the steps
    too: run_training gives the process its thread count back)."""
    if device.type == "cpu":
        threads = cpu_threads(config.cpu_threads, step_size(model.unet, latent_size), torch.get_num_threads())
        torch.set_num_threads(threads)
        on_progress(Progress("preparing", message=f"training on {threads} CPU thread(s) (--cpu-threads sets it)"))
    if config.low_memory:
        model.unet.enable_gradient_checkpointing()
        if not trainables.text_encoder_trains and device.type == "cuda":
            trainables.prompt_embeddings(1, 1)  # cache the encoder states, then free the encoder's GPU memory
            if config.caption_dropout:
                trainables.empty_states()
            model.text_encoder.to("cpu")
        model.vae.to("cpu")  # its latents are cached; samples move it back
        torch.cuda.empty_cache() if device.type == "cuda" else None
    if config.channels_last:
        model.unet.to(memory_format=torch.channels_last)
    if config.compile:
        model.unet.compile()


def training_step(run: Run) -> torch.Tensor:
    """One DreamBooth step: instance and class examples in the same forward pass; returns the loss, unread."""
    model, generator, scheduler = run.model, run.generator, run.scheduler
    latents, n_instance = sample_latents(run.instance_latents, run.class_latents, run.config.batch_size, generator,
                                         run.config.prior_batch_size, run.config.contrast_rows)
    latents = latents.to(run.device) * model.vae.config.scaling_factor
    noise = torch.randn(latents.shape, generator=generator, device=generator.device).to(run.device)
    if run.config.noise_offset:  # drawn only when on, so runs without it keep their random stream
        noise = offset_noise(noise, run.config.noise_offset, generator)
    timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (latents.shape[0],), generator=generator,
                              device=generator.device).to(run.device)
    noisy = scheduler.add_noise(latents, noise, timesteps)
    if run.config.channels_last:
        noisy = noisy.contiguous(memory_format=torch.channels_last)
    dropped = None
    if run.config.caption_dropout:  # drawn only when on, so runs without it keep their random stream
        dropped = torch.rand(n_instance, generator=generator, device=generator.device) < run.config.caption_dropout
    hidden = run.trainables.prompt_embeddings(n_instance, latents.shape[0] - n_instance, dropped)
    frozen = frozen_class_predictions(run, noisy, timesteps, hidden, n_instance) if run.config.prior_target == "frozen" else None
    with torch.autocast(run.device.type, dtype=run.autocast_dtype, enabled=run.autocast_dtype is not None):
        prediction = model.unet(noisy.to(run.weight_dtype), timesteps, hidden.to(run.weight_dtype)).sample
    target = noise if scheduler.config.prediction_type == "epsilon" else scheduler.get_velocity(latents, noise, timesteps)
    if frozen is not None:
        target = torch.cat([target[:n_instance], frozen.to(target.dtype)])
    weights = None
    if run.config.snr_gamma:
        from diffusers.training_utils import compute_snr

        weights = min_snr_weights(compute_snr(scheduler, timesteps), run.config.snr_gamma, scheduler.config.prediction_type)
    loss, _, _ = prior_preservation_loss(prediction, target, n_instance, run.config.prior_weight, weights)
    if run.trainables.allocator is not None:  # AdaLoRA: its orthogonality term (research_types.py)
        loss = loss + adalora_orthogonality(model.unet)
    run.scaler.scale(loss).backward()  # the scaler is a pass-through unless the run is fp16
    run.scaler.unscale_(run.optimizer)
    fault_point("step")  # mid-step: gradients computed, weights not yet updated
    torch.nn.utils.clip_grad_norm_(run.trainables.parameters, 1.0)
    factor = lr_factor(run.config.lr_schedule, run.step, run.config.steps)
    for group in run.optimizer.param_groups:
        group["lr"] = group["base_lr"] * factor
    run.scaler.step(run.optimizer)
    run.scaler.update()
    if run.trainables.allocator is not None:  # AdaLoRA moves its rank budget from this step's gradients
        run.trainables.allocator.update_and_allocate(run.step)
    run.optimizer.zero_grad(set_to_none=True)
    run.trainables.after_step()
    if run.ema is not None:  # after the identifier's norm cap: the average of capped rows stays within the cap
        with torch.no_grad():
            torch._foreach_lerp_(run.ema, run.trainables.parameters, ema_rate(run.config.ema_decay, run.step + 1))
    return loss.detach()


def frozen_class_predictions(run: Run, noisy: torch.Tensor, timesteps: torch.Tensor, hidden: torch.Tensor,
                             n_instance: int) -> torch.Tensor | None:
    """The frozen base model's predictions for the batch's class-prompt rows, the class images' and the contrast rows'
    (every adapter off, no gradient): their target with --prior-target frozen; None when the batch has none.

    The noise target pulls the class rows towards E[noise | noisy latent], which the base model's prediction
    estimates (the class images are its own); this target is that estimate itself, without the drawn noise's variance.
    With a frozen text encoder the class rows' states are already the base model's (an identifier touches only its
    own word, and the class prompt has none); with an encoder LoRA they are encoded again with it off."""
    if noisy.shape[0] == n_instance:
        return None
    model = run.model
    with torch.no_grad(), adapters_disabled(model.unet, model.text_encoder):
        states = hidden[n_instance:] if run.config.text_encoder == "none" else \
            run.trainables.prompt_embeddings(0, noisy.shape[0] - n_instance)
        with torch.autocast(run.device.type, dtype=run.autocast_dtype, enabled=run.autocast_dtype is not None):
            return model.unet(noisy[n_instance:].to(run.weight_dtype), timesteps[n_instance:],
                              states.detach().to(run.weight_dtype)).sample


def train_steps(run: Run, job_dir: Path, on_progress, should_stop, sample_every: int, perf_started: float,
                keep: Callable = lambda *paths: None) -> None:
    """Step to config.steps; losses are read every loss_every steps (reading one makes the host wait).
    `keep(*paths)` puts each checkpoint (and the meter's record) and sample in the store (Library.keep)."""
    config, pending = run.config, []
    every = config.loss_every or (10 if run.device.type == "cuda" else 1)  # on CPU reading it costs nothing

    def read_losses() -> None:
        if pending:
            run.losses.extend(round(v, 6) for v in torch.stack(pending).float().tolist())
            pending.clear()

    last_checkpoint, checkpointed_step = time.monotonic(), run.step

    def checkpoint() -> None:
        nonlocal last_checkpoint, checkpointed_step
        read_losses()
        on_progress(Progress("checkpoint", run.step, config.steps))
        extras = {f"ema.{i}": average for i, average in enumerate(run.ema or ())}
        save_checkpoint(run.checkpoint_path, run.trainables.tensors(), run.optimizer, run.generator, run.step, run.losses,
                        extras)
        keep(*(path for path in (job_dir / METER_CHECKPOINTS, job_dir / METER_FILE) if path.exists()), run.checkpoint_path)
        last_checkpoint, checkpointed_step = time.monotonic(), run.step

    def checkpoint_due() -> bool:
        """Every checkpoint_every steps or checkpoint_seconds, whichever comes first; never at the last step."""
        by_steps = config.checkpoint_every and run.step % config.checkpoint_every == 0
        by_time = config.checkpoint_seconds and time.monotonic() - last_checkpoint >= config.checkpoint_seconds
        return bool(by_steps or by_time) and run.step < config.steps

    run.model.unet.train()
    try:
        while run.step < config.steps:
            if should_stop():
                raise KeyboardInterrupt
            pending.append(training_step(run))
            run.step += 1
            if len(pending) >= every or run.step == config.steps:
                read_losses()
            on_progress(Progress("training", run.step, config.steps, None if pending else run.losses[-1]))
            run.timings["step_ends"].append(time.perf_counter() - perf_started)
            if run.meter is not None and meter_due(run.step, config.meter_every, config.steps):
                record_meter_point(run, on_progress)
            if checkpoint_due():
                checkpoint()
                on_progress(Progress("training", run.step, config.steps, run.losses[-1]))  # written: training again
            if sample_every and run.step % sample_every == 0 and run.step < config.steps:
                read_losses()
                (job_dir / "samples").mkdir(exist_ok=True)
                prompts = config.prompts_to_sample  # one image per prompt: step-00050.png, step-00050-1.png, ...
                for index, image in enumerate(generate_samples(run.model, run.trainables, config, list(prompts))):
                    sample = job_dir / "samples" / f"step-{run.step:05d}{f'-{index}' if index else ''}.png"
                    image.save(sample)
                keep(job_dir / "samples")
                on_progress(Progress("training", run.step, config.steps, run.losses[-1], sample=sample))
    except KeyboardInterrupt:
        checkpoint()
        raise TrainingStopped(job_dir.name, run.step) from None
    if checkpointed_step != run.step:
        checkpoint()  # a crash while saving resumes here, with no step lost
    run.model.unet.eval()


def record_meter_point(run: Run, on_progress) -> None:
    point = run.meter.measure(run.step, run.model.unet, run.model.text_encoder, run.trainables, run.device,
                              run.weight_dtype, run.autocast_dtype)
    run.meter.add(point, run.trainables.tensors())
    on_progress(Progress("training", run.step, run.config.steps, run.losses[-1] if run.losses else None,
                         f"meter at step {point.step}: instance loss {point.instance_loss:.4f}, "
                         f"prior drift {point.prior_drift:.3g}"))


def finish_run(library: Library, run: Run, job_id: str, on_progress, started: float, perf_started: float) -> TrainResult:
    """Put the adapter in the library (with the meter: per --keep, the final weights, the chosen point's or
    both), then make its sample images (off the path to a usable adapter)."""
    config, meter = run.config, run.meter
    on_progress(Progress("saving", run.step, config.steps, run.losses[-1] if run.losses else None))
    chosen, final_tensors = None, None
    if meter is not None:
        if not meter.points or meter.points[-1].step != run.step:  # resumed after the last point was measured
            record_meter_point(run, on_progress)
        chosen = meter.chosen_step()
        on_progress(Progress("saving", run.step, config.steps, message=f"meter chose step {chosen} of {run.step} "
                             f"(keep {config.keep})"))
    if run.ema is not None:  # the average is what is saved (and sampled); config.keep is "final" (config.py)
        with torch.no_grad():
            for param, average in zip(run.trainables.parameters, run.ema):
                param.copy_(average)
    if chosen is not None and chosen != run.step and config.keep in ("best", "both"):
        final_tensors = run.trainables.tensors()
    if config.keep == "best" and final_tensors is not None:
        run.trainables.load_tensors(meter.tensors_at(chosen))
    meter_meta = {} if meter is None else {"chosen_step": chosen,
                                           "weights_step": chosen if config.keep == "best" else run.step}
    jobs = Jobs(library)
    training_seconds = sum(phase_seconds(jobs.phases(job_id), time.time()).values())  # every run, resumed ones too
    photos = sorted((jobs.folder(job_id) / "images").iterdir())
    entry = save_adapter(library, run.model, run.trainables, config, job_id, run.losses, meter_meta, training_seconds, photos)
    chosen_entry = None
    if config.keep == "both" and final_tensors is not None:
        run.trainables.load_tensors(meter.tensors_at(chosen))
        chosen_config = replace(config, name=library.free_name(f"{entry.name}-step{chosen}"))
        chosen_entry = save_adapter(library, run.model, run.trainables, chosen_config, job_id, run.losses,
                                    {"chosen_step": chosen, "weights_step": chosen}, training_seconds, photos)
    run.timings["adapter_saved"] = time.perf_counter() - perf_started
    # Recorded on the job before the checkpoint goes: a crash from here on leaves a job that reads its adapter.
    on_progress(Progress("samples", run.step, config.steps, message=f"saved adapter {entry.name}"
                         + (f" and {chosen_entry.name} (step {chosen})" if chosen_entry else ""), adapter_id=entry.id))
    if meter is not None:
        meter.write(chosen_entry.id if chosen_entry else None)
        meter.drop_tensors()
    run.checkpoint_path.unlink(missing_ok=True)  # the adapter is saved; the checkpoint has no further use
    if chosen_entry is not None and config.samples:
        write_samples(chosen_entry, run.model, run.trainables, config)  # the chosen point's weights are loaded
        library.keep(chosen_entry.folder / "samples")
        run.trainables.load_tensors(final_tensors)
    if config.samples:
        write_samples(entry, run.model, run.trainables, config)
        library.keep(entry.folder / "samples")
    if run.device.type == "cuda":
        run.timings["peak_gpu_bytes"] = torch.cuda.max_memory_allocated()
    return TrainResult(entry, job_id, run.losses, time.time() - started, run.timings,
                       [p.to_dict() for p in meter.points] if meter else [], chosen, chosen_entry)


def ensure_class_images(model: BaseModel, config: TrainConfig, device, prior_dir: Path | None,
                        on_progress: Callable[[Progress], None] = lambda progress: None) -> list:
    """The run's class-prior images from the cache, generating the missing ones (also how many); none when priors are off."""
    if config.prior_weight <= 0 or config.num_class_images <= 0:
        return [], 0
    settings = PriorSettings(prompt=config.class_prompt, resolution=config.resolution)
    report = lambda done, total: on_progress(Progress("class_images", done, total))
    _, weight_dtype, autocast_dtype = pick_precision(config)
    _move(model.unet, device, weight_dtype), _move(model.text_encoder, device, weight_dtype), model.vae.to(device)
    batch = config.class_batch_size or (32 if device.type == "cuda" else 8)
    # autocast lets the bf16/fp16 UNet hand its latents to the fp32 VAE (fp16 overflows in SD's VAE)
    with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
        paths, generated = ensure_prior_images(model, settings, config.num_class_images, prior_root(prior_dir),
                                               batch_size=batch, on_progress=report)
    return load_prior_images(paths), generated


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
        pixels = torch.stack([image_to_tensor(image) for image in images[start : start + 16]]).to(model.vae.device)
        dist = model.vae.encode(pixels).latent_dist
        means.append(dist.mean.float().cpu())
        stds.append(dist.std.float().cpu())
    return torch.cat(means), torch.cat(stds)


def image_to_tensor(image) -> torch.Tensor:
    array = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8).reshape(image.height, image.width, 3)
    return array.permute(2, 0, 1).float() / 127.5 - 1.0


def sample_latents(instance, prior, batch: int, generator: torch.Generator,
                   prior_batch: int | None = None, contrast: int = 0) -> tuple[torch.Tensor, int]:
    """Draw `batch` instance latents and, with priors, `prior_batch` class latents (default `batch`) and `contrast`
    more instance latents; instance rows first, every row after them is under the class prompt. The loss averages
    each part on its own (losses.prior_preservation_loss), so more class rows weigh the prior no more: they sample
    the class more densely at each step. The contrast rows (--contrast-rows, with --prior-target frozen) are the
    subject's own photos under the class prompt, trained towards the frozen model's prediction: the class word
    without the identifier must not draw the subject even from the subject's own noisy latents."""
    parts = [(instance, batch)]
    if prior is not None:
        parts += [(prior, prior_batch or batch)] + ([(instance, contrast)] if contrast else [])
    drawn = []
    for (mean, std), rows in parts:
        index = torch.randint(0, mean.shape[0], (rows,), generator=generator, device=generator.device).to(mean.device)
        noise = torch.randn(mean[index].shape, generator=generator, device=generator.device).to(mean.device)
        drawn.append(mean[index] + std[index] * noise)
    return torch.cat(drawn), batch


class Trainables:
    """What learns in a run (UNet LoRA, optional text-encoder LoRA, optional identifier embedding)."""

    def __init__(self, model: BaseModel, config: TrainConfig, device, autocast_dtype, identifier: IdentifierEmbedding | None):
        self.model, self.config, self.device, self.autocast_dtype = model, config, device, autocast_dtype
        self.identifier = identifier  # its tokenizer is model.tokenizer for the run (attach_trainables)
        self.prompt_ids = self.token_ids([config.instance_prompt, config.class_prompt])
        self.cached: torch.Tensor | None = None
        self.cached_empty: torch.Tensor | None = None
        self.separation = 0.0
        self.max_token_norm = 0.0  # set with the identifier embedding: NORM_ALLOWANCE x a typical word's norm
        self.allocator = None  # AdaLoRA's PEFT tuner (update_and_allocate after each optimizer step); None otherwise

    @property
    def text_encoder_trains(self) -> bool:
        return self.config.text_encoder != "none" or self.identifier is not None

    @functools.cached_property
    def parameters(self) -> list[torch.nn.Parameter]:
        """The trained tensors, listed once, on first use (attach_trainables, after every adapter is attached):
        walking the models' named parameters for them took 4 ms a step (CPU, sd15-toy)."""
        params = lora_parameters(self.model.unet) + lora_parameters(self.model.text_encoder)
        return params + ([self.identifier.vectors] if self.identifier else [])

    def after_step(self) -> None:
        if self.identifier is not None:
            self.identifier.clamp_norm(self.max_token_norm)

    def token_ids(self, texts: list[str]) -> torch.Tensor:
        tokenizer = self.model.tokenizer
        return tokenizer(texts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                         return_tensors="pt").input_ids.to(self.device)

    def encode(self, ids: torch.Tensor | None = None) -> torch.Tensor:
        """The encoder states of `ids` (default: the instance and class prompts)."""
        with torch.autocast(self.device.type, dtype=self.autocast_dtype, enabled=self.autocast_dtype is not None):
            return self.model.text_encoder(self.prompt_ids if ids is None else ids)[0].float()

    def prompt_embeddings(self, n_instance: int, n_class: int, dropped: torch.Tensor | None = None) -> torch.Tensor:
        """Encoder states for the batch rows: cached when nothing in the text encoder learns. `dropped` (a bool per
        instance row) puts those instance rows under the empty prompt (--caption-dropout)."""
        if self.text_encoder_trains:
            both = self.encode()
        else:
            if self.cached is None:
                with torch.no_grad():
                    self.cached = self.encode()
            both = self.cached
        instance = both[0:1].expand(n_instance, -1, -1)
        if dropped is not None:  # no host read of the draws: the empty states are cached after the first step
            instance = torch.where(dropped.to(instance.device)[:, None, None], self.empty_states(), instance)
        return torch.cat([instance, both[1:2].expand(n_class, -1, -1)])

    def empty_states(self) -> torch.Tensor:
        """The empty prompt's encoder states (guidance's unconditional branch) as the base encoder gives them, every
        encoder LoRA off and no gradient: the UNet learns the subject under them, the encoder never rewrites the
        empty prompt that every generation is guided against (with it trained too, the ball's plain images under an
        encoder LoRA moved further from the base model's, 0.341 against 0.206: README "Quality"). Encoded on their
        own, once, so the other prompts' states stay what they were without caption dropout; the identifier is not in
        the empty prompt, so its row changes nothing here."""
        if self.cached_empty is None:
            with torch.no_grad(), adapters_disabled(self.model.unet, self.model.text_encoder):
                self.cached_empty = self.encode(self.token_ids([""]))
        return self.cached_empty

    def tensors(self) -> dict[str, torch.Tensor]:
        te = self.model.text_encoder if self.config.text_encoder != "none" else None
        return collect_adapter_tensors(self.model.unet, te, self.identifier)

    def load_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        from peft import set_peft_model_state_dict

        strip = lambda prefix: {k.removeprefix(prefix): v for k, v in tensors.items() if k.startswith(prefix)}
        if self.config.adapter_type in RESEARCH_TYPES:
            load_trained_state(self.model.unet, self.config.adapter_type, tensors)
        else:
            set_peft_model_state_dict(self.model.unet, strip("unet."), adapter_name="default")
        if self.config.text_encoder != "none":
            set_peft_model_state_dict(self.model.text_encoder, strip("text_encoder."), adapter_name="default")
        if self.identifier is not None:
            self.identifier.load(from_file_tensors(tensors, self.config.token))


def attach_trainables(model: BaseModel, config: TrainConfig, device, weight_dtype, autocast_dtype) -> Trainables:
    """Put LoRA on the UNet (and text encoder per its mode) and the identifier embedding if asked."""
    if config.text_encoder == "qlora":
        model.text_encoder = quantize_text_encoder(model.text_encoder, autocast_dtype or torch.float32, device)
    else:
        _move(model.text_encoder, device, weight_dtype)
    identifier = None
    if config.train_token_embedding:  # a token of its own, one new row (identifier.py); the run's prompts know it
        identifier = IdentifierEmbedding.new(model.text_encoder, model.tokenizer, config.token).attach(model.text_encoder)
        model.tokenizer = identifier.tokenizer
    trainables = Trainables(model, config, device, autocast_dtype, identifier)
    with torch.no_grad():
        states = trainables.encode()
        trainables.separation = torch.nn.functional.cosine_similarity(states[0].flatten(), states[1].flatten(), dim=0).item()
    if config.adapter_type == "adalora":
        trainables.allocator = attach_adalora(model.unet, config.rank, config.lora_alpha, config.steps,
                                              UNET_LAYERS[config.unet_layers])
    else:
        attach_unet_lora(model.unet, config.rank, config.lora_alpha, config.adapter_type, config.qr_energy,
                         UNET_LAYERS[config.unet_layers])
    if config.text_encoder in ("lora", "qlora"):
        attach_text_encoder_lora(model.text_encoder, config.rank, config.lora_alpha)
    if identifier is not None:
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
    # (tiny models). The portable dequantise-and-matmul path works on every CPU, so use it always
    # (docs/DESIGN.md, "QLoRA adapters").
    from bitsandbytes.nn import Linear4bit

    for module in quantized.modules():
        if isinstance(module, Linear4bit):
            module.support_avx512bf16_for_cpu = False
    return quantized


def make_optimizer(trainables: Trainables, config: TrainConfig, device=torch.device("cpu"),
                   on_progress: Callable[[Progress], None] = lambda progress: None) -> torch.optim.Optimizer:
    """AdamW (8-bit with --low-memory on CUDA, else fused); with LoRA+ the B matrices get `ratio` times the A
    learning rate (Hayou et al. 2024)."""
    trained = lambda n, p: any(m in n for m in TRAINABLE_MARKERS) and p.requires_grad
    named = [(n, p) for n, p in trainables.model.unet.named_parameters() if trained(n, p)]
    named += [(n, p) for n, p in trainables.model.text_encoder.named_parameters() if trained(n, p)]
    ratio = config.loraplus_ratio or 1.0
    groups = [
        {"params": [p for n, p in named if "lora_B" not in n], "lr": config.lr},
        {"params": [p for n, p in named if "lora_B" in n], "lr": config.lr * ratio},
    ]
    if trainables.identifier is not None:
        groups.append({"params": [trainables.identifier.vectors], "lr": config.token_lr, "weight_decay": 0.0})
    if config.low_memory and device.type == "cuda":
        try:
            import bitsandbytes

            return with_base_lrs(bitsandbytes.optim.AdamW8bit(groups, lr=config.lr, weight_decay=1e-2))
        except ImportError:
            on_progress(Progress("preparing", message="--low-memory: bitsandbytes is not installed, so AdamW keeps "
                                                      "32-bit state (LoRA's optimizer state is small either way)."))
    # Fused on CPU too: one kernel for all tensors instead of ~10 ops per tensor (7.6 -> 1.3 ms a step for sd15-toy's
    # 256 LoRA tensors on 2 cores). Other devices keep PyTorch's default.
    fused = config.fused_adam and device.type in ("cuda", "cpu")
    return with_base_lrs(torch.optim.AdamW(groups, lr=config.lr, weight_decay=1e-2, fused=fused or None))


def with_base_lrs(optimizer):
    """Each group's own rate kept as `base_lr` (it travels in the checkpoint's optimizer state): the schedule scales it."""
    for group in optimizer.param_groups:
        group.setdefault("base_lr", group["lr"])
    return optimizer


def write_samples(entry: AdapterEntry, model: BaseModel, trainables: Trainables, config: TrainConfig) -> None:
    """The adapter's sample images, written into its library folder once the adapter is there."""
    folder = entry.folder / "samples"
    folder.mkdir(exist_ok=True)
    prompts = config.prompts_to_sample
    for index, image in enumerate(generate_samples(model, trainables, config, [prompts[i % len(prompts)] for i in range(SAMPLE_COUNT)])):
        with atomic_path(folder / f"{index}.png") as tmp:
            image.save(tmp, format="PNG")


@torch.no_grad()
def generate_samples(model: BaseModel, trainables: Trainables, config: TrainConfig, prompts: list[str]):
    """One image per prompt, image i at seed config.seed + i."""
    model.vae.to(trainables.device), model.text_encoder.to(trainables.device)  # back, if --low-memory moved them
    pipe = model.pipeline()
    generators = [torch.Generator().manual_seed(config.seed + i) for i in range(len(prompts))]
    with torch.autocast(trainables.device.type, dtype=trainables.autocast_dtype, enabled=trainables.autocast_dtype is not None):
        return pipe(
            prompts, num_inference_steps=20, guidance_scale=5.0,
            height=config.resolution, width=config.resolution, generator=generators,
        ).images


def save_adapter(library: Library, model: BaseModel, trainables: Trainables, config: TrainConfig,
                 job_id: str, losses: list[float], extra_meta: dict | None = None, training_seconds: float | None = None,
                 photos=()) -> AdapterEntry:
    """Store the adapter file, meta and training photos in the library (all or nothing); samples follow (write_samples).

    `store_adapter` adds the id, the time, and the rank and alpha of the saved layers to the metadata."""
    meta = {
        "name": config.name, "token": config.token, "class_noun": config.class_noun,
        "instance_prompt": config.instance_prompt, "class_prompt": config.class_prompt,
        "base_model": model.name, "fingerprint": model.fingerprint,
        "steps": config.steps, "prior_weight": config.prior_weight, "num_class_images": config.num_class_images,
        "text_encoder": config.text_encoder, "train_token_embedding": bool(config.train_token_embedding),
        "adapter_type": config.adapter_type,
        "resolution": config.resolution, "lr": config.lr, "loraplus_ratio": config.loraplus_ratio,
        "seed": config.seed, "job": job_id, "final_loss": losses[-1] if losses else None,
        "batch_size": config.batch_size, "prior_batch_size": config.prior_batch_size,
        "prior_target": config.prior_target, "contrast_rows": config.contrast_rows, "num_images": len(photos) or None,
        "unet_layers": config.unet_layers, "caption_dropout": config.caption_dropout,
        "training_seconds": round(training_seconds, 1) if training_seconds is not None else None,
        "sample_prompts": list(config.prompts_to_sample),
        "prompt_similarity": round(trainables.separation, 4), "studio_version": __version__,
        "snr_gamma": config.snr_gamma, "noise_offset": config.noise_offset, "lr_schedule": config.lr_schedule,
        "ema_decay": config.ema_decay, **(extra_meta or {}),
    }
    tensors = trainables.tensors()
    if config.adapter_type not in RESEARCH_TYPES:
        return store_adapter(library, AdapterFile.from_tensors(tensors, meta, config.lora_alpha, config.rank), photos=photos)
    # qrlora/vera: the UNet layers stored as their exact LoRA factors; the type and the count of learned values
    # (lambdas or vectors, not the factors' size) recorded in the metadata (research_types.py)
    meta["trainable_params"] = sum(p.numel() for p in trainables.parameters)
    adapter = AdapterFile.from_tensors({k: v for k, v in tensors.items() if not k.startswith("unet.")}, meta,
                                       config.lora_alpha, config.rank)
    adapter.layers.update(unet_lora_layers(model.unet, config.adapter_type, ADAPTER_NAME))
    return store_adapter(library, adapter, photos=photos)

