"""The training objective as pure functions: the prior-preservation loss, min-SNR-γ weights, offset noise, the
learning-rate factor and the weight average's rate."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def prior_preservation_loss(
    prediction: torch.Tensor, target: torch.Tensor, n_instance: int, prior_weight: float,
    sample_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """L = mse(instance half) + prior_weight * mse(class half); returns (total, instance, class).

    The first `n_instance` rows of the batch are instance examples, the rest class examples
    (DreamBooth, Ruiz et al. 2023, eq. 2). With no class rows the class term is 0. `sample_weights`
    (one per row, e.g. min_snr_weights) scale each row's squared error before the means.
    """
    prediction, target = prediction.float(), target.float()
    if sample_weights is None:  # the plain means (kept as they were: unweighted runs stay bit for bit the same)
        mean = lambda rows: F.mse_loss(prediction[rows], target[rows])
    else:
        per_row = F.mse_loss(prediction, target, reduction="none").mean(dim=tuple(range(1, prediction.dim())))
        per_row = per_row * sample_weights.float().to(per_row.device)
        mean = lambda rows: per_row[rows].mean()
    instance = mean(slice(None, n_instance))
    if prediction.shape[0] == n_instance:
        prior = torch.zeros((), device=prediction.device)
    else:
        prior = mean(slice(n_instance, None))
    return instance + prior_weight * prior, instance.detach(), prior.detach()


def min_snr_weights(snr: torch.Tensor, gamma: float, prediction_type: str) -> torch.Tensor:
    """Min-SNR-γ loss weights (Hang et al. 2023): min(SNR, γ)/SNR for an epsilon target.

    A v target's loss already carries a factor SNR + 1 relative to the x0 error, so its weight is
    min(SNR, γ)/(SNR + 1) (as diffusers' train_text_to_image.py does).
    """
    clipped = torch.minimum(snr, torch.full_like(snr, gamma))
    if prediction_type == "epsilon":
        return clipped / snr
    if prediction_type == "v_prediction":
        return clipped / (snr + 1)
    raise ValueError(f"min-SNR weighting: unknown prediction type {prediction_type!r}")


def offset_noise(noise: torch.Tensor, offset: float, generator: torch.Generator) -> torch.Tensor:
    """Noise offset (Guttenberg 2023): add offset * N(0, 1) per sample and channel, constant over the image,
    so the model also learns to shift an image's mean brightness and colour."""
    shift = torch.randn(noise.shape[:2] + (1,) * (noise.dim() - 2), generator=generator, device=generator.device)
    return noise + offset * shift.to(noise.device, noise.dtype)


def lr_factor(schedule: str, step: int, total: int) -> float:
    """The learning rate of step `step` (0-based) of `total` as a share of the base rate: constant 1, or cosine from 1
    down towards 0 at the last step (Loshchilov & Hutter 2017, without restarts or warm-up). A pure function of the
    step, so a resumed run needs no scheduler state (diffusers' get_scheduler is a LambdaLR that would)."""
    if schedule == "constant" or total <= 1:
        return 1.0
    return 0.5 * (1.0 + math.cos(math.pi * min(step, total) / total))


def ema_rate(decay: float, step: int) -> float:
    """How far the weight average moves towards the weights after step `step` (1-based): (1 - d) / (1 - d^step).

    This is an exponential moving average with decay d, bias-corrected as Adam corrects its moments (Kingma & Ba
    2015): step 1 gives 1 (the average starts at the first weights, not at the initial ones), and the average is
    sum_i d^(step - i) w_i / sum_i d^(step - i) at every step. A pure function of the step, so a resumed run needs
    only the average itself."""
    return 1.0 if decay <= 0 else (1.0 - decay) / (1.0 - decay ** step)
