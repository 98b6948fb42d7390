"""The training meter: at fixed points of a run, (a) the instance photos' denoising loss on fixed probes and
(b) the prior drift, how far the adapted UNet's class-prompt predictions have moved from the frozen model's;
an adapter checkpoint at each point, and the rule that picks the best one (docs/DESIGN.md, "The meter and the
objective options").

No photo is withheld (there are only 3-5), so (a) is a training-set loss measured the same way at every point:
each photo at METER_TIMESTEPS fixed timesteps with noise seeded per photo. The maths is in pure functions;
`Meter.measure` runs the UNet it is given on the probes, and train.py calls it every K steps.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from .lora import adapters_disabled
from .paths import atomic_path

METER_TIMESTEPS = 8  # per instance photo
CLASS_PROBES = 8  # fixed noisy class latents for the drift (fewer when the run has fewer)
PROBE_SEED = 31_337  # photo i's noise is seeded PROBE_SEED + i, class latent j's PROBE_SEED + CLASS_SEED_OFFSET + j
CLASS_SEED_OFFSET = 100_000
RULE = ("the point with the lowest instance_loss + prior_weight × prior_drift (the DreamBooth objective on the "
        "fixed probes, the frozen model's class predictions standing for the prior's target); ties go to the earlier step")


@dataclass(frozen=True)
class MeterPoint:
    step: int
    instance_loss: float
    prior_drift: float

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Probe:
    """Fixed noisy latents, their timesteps and the training target (noise, or velocity for v-prediction)."""

    noisy: torch.Tensor
    timesteps: torch.Tensor
    target: torch.Tensor


def probe_timesteps(num_train_timesteps: int, count: int = METER_TIMESTEPS) -> torch.Tensor:
    """`count` timesteps at the middles of equal slices of the schedule (62, 187, ..., 937 of 1000)."""
    return ((torch.arange(count) + 0.5) * num_train_timesteps / count).long()


def _probe(latents: torch.Tensor, timesteps: torch.Tensor, seeds: list[int], scheduler) -> Probe:
    """Row r: latents[r] noised at timesteps[r] with noise from seeds[r]."""
    noise = torch.stack([torch.randn(latents.shape[1:], generator=torch.Generator().manual_seed(seed)) for seed in seeds])
    noisy = scheduler.add_noise(latents, noise, timesteps)
    if scheduler.config.prediction_type == "v_prediction":
        return Probe(noisy, timesteps, scheduler.get_velocity(latents, noise, timesteps))
    return Probe(noisy, timesteps, noise)


def instance_probe(latents: torch.Tensor, scheduler) -> Probe:
    """Every photo (scaled VAE mean) at each of the METER_TIMESTEPS timesteps; one noise per photo, seeded by its index."""
    steps = probe_timesteps(scheduler.config.num_train_timesteps)
    photos = latents.shape[0]
    rows = latents.float().repeat_interleave(len(steps), dim=0)
    noise_seeds = [PROBE_SEED + photo for photo in range(photos) for _ in steps]
    return _probe(rows, steps.repeat(photos), noise_seeds, scheduler)


def class_probe(latents: torch.Tensor, scheduler) -> Probe:
    """The first CLASS_PROBES class latents, latent j at the j-th probe timestep (cycling), each with its own noise."""
    rows = latents[:CLASS_PROBES].float()
    steps = probe_timesteps(scheduler.config.num_train_timesteps)
    timesteps = steps[torch.arange(rows.shape[0]) % len(steps)]
    return _probe(rows, timesteps, [PROBE_SEED + CLASS_SEED_OFFSET + j for j in range(rows.shape[0])], scheduler)


def probe_predictions(unet, probe: Probe, states: torch.Tensor, device, weight_dtype, autocast_dtype,
                      chunk: int = 16) -> torch.Tensor:
    """The UNet's predictions for a probe's rows under one prompt's encoder states, in chunks, returned on the CPU."""
    outputs = []
    for start in range(0, probe.noisy.shape[0], chunk):
        noisy = probe.noisy[start : start + chunk].to(device, weight_dtype)
        hidden = states.expand(noisy.shape[0], -1, -1).to(device, weight_dtype)
        with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            prediction = unet(noisy, probe.timesteps[start : start + chunk].to(device), hidden).sample
        outputs.append(prediction.float().cpu())
    return torch.cat(outputs)


def instance_loss(prediction: torch.Tensor, target: torch.Tensor) -> float:
    return F.mse_loss(prediction.float(), target.float()).item()


def prior_drift(adapted: torch.Tensor, frozen: torch.Tensor) -> float:
    """Mean squared difference between the adapted and the frozen model's predictions on the same inputs."""
    return F.mse_loss(adapted.float(), frozen.float()).item()


def choose_step(points: list[MeterPoint], prior_weight: float) -> int:
    """The step RULE picks."""
    if not points:
        raise ValueError("choose_step: no meter points")
    return min(points, key=lambda p: (p.instance_loss + prior_weight * p.prior_drift, p.step)).step


def meter_due(step: int, every: int, total: int) -> bool:
    """Every `every` steps and at the last step (so the final weights are always a candidate); never at step 0."""
    return bool(every) and step > 0 and (step % every == 0 or step == total)


@dataclass
class Meter:
    """A run's probes, the points measured so far and the adapter tensors at each, kept in the job folder.

    The record (`record_path`, JSON) is what `jobs show --json` reports: {"meter": [points], "chosen_step",
    "rule", "chosen_adapter_id"}; the tensors are `<tensor_dir>/step-NNNNN.safetensors`.
    """

    every: int
    prior_weight: float
    instance: Probe
    klass: Probe
    record_path: Path
    tensor_dir: Path
    points: list[MeterPoint] = field(default_factory=list)
    frozen_class: torch.Tensor | None = None  # the frozen model's class predictions, measured once

    @classmethod
    def with_probes(cls, every: int, prior_weight: float, instance_latents: torch.Tensor, class_latents: torch.Tensor,
                    scheduler, record_path: Path, tensor_dir: Path) -> "Meter":
        """A meter whose probes are built from these (scaled) latents; the class ones may be the photos'."""
        return cls(every, prior_weight, instance_probe(instance_latents, scheduler), class_probe(class_latents, scheduler),
                   record_path, tensor_dir)

    @torch.no_grad()
    def measure(self, step: int, unet, text_encoder, trainables, device, weight_dtype, autocast_dtype) -> MeterPoint:
        """One point: the instance probe under the instance prompt, the class probe under the class prompt, adapted
        and (once) frozen. `trainables.prompt_embeddings(n_instance, n_class)` gives the encoder states."""
        predict = lambda probe, states: probe_predictions(unet, probe, states, device, weight_dtype, autocast_dtype)
        if self.frozen_class is None:
            with adapters_disabled(unet, text_encoder):
                self.frozen_class = predict(self.klass, trainables.prompt_embeddings(0, 1))
        states = trainables.prompt_embeddings(1, 1)
        instance = predict(self.instance, states[0:1])
        adapted_class = predict(self.klass, states[1:2])
        return MeterPoint(step, float(f"{instance_loss(instance, self.instance.target):.6g}"),
                          float(f"{prior_drift(adapted_class, self.frozen_class):.6g}"))

    def resume(self, step: int) -> None:
        """Keep the recorded points up to `step` (the checkpoint's) whose tensors exist; later ones are measured again."""
        if not self.record_path.exists():
            return
        recorded = json.loads(self.record_path.read_text()).get("meter", [])
        self.points = [MeterPoint(**p) for p in recorded if p["step"] <= step and self.tensor_file(p["step"]).exists()]

    def tensor_file(self, step: int) -> Path:
        return self.tensor_dir / f"step-{step:05d}.safetensors"

    def add(self, point: MeterPoint, tensors: dict[str, torch.Tensor]) -> None:
        """Keep the adapter tensors of this point, then record it (tensors first: a recorded point has its file)."""
        with atomic_path(self.tensor_file(point.step)) as tmp:
            save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp))
        self.points = [p for p in self.points if p.step != point.step] + [point]
        self.write()

    def chosen_step(self) -> int:
        return choose_step(self.points, self.prior_weight)

    def tensors_at(self, step: int) -> dict[str, torch.Tensor]:
        return load_file(str(self.tensor_file(step)))

    def write(self, chosen_adapter_id: str | None = None) -> None:
        record = {"meter": [p.to_dict() for p in self.points], "every": self.every, "rule": RULE,
                  "chosen_step": self.chosen_step() if self.points else None}
        if chosen_adapter_id:
            record["chosen_adapter_id"] = chosen_adapter_id
        with atomic_path(self.record_path) as tmp:
            tmp.write_text(json.dumps(record))

    def drop_tensors(self) -> None:
        """Once the adapter(s) are in the library the per-point tensors have no further use."""
        for point in self.points:
            self.tensor_file(point.step).unlink(missing_ok=True)
        if self.tensor_dir.is_dir() and not any(self.tensor_dir.iterdir()):
            self.tensor_dir.rmdir()
