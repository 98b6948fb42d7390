"""The DreamBooth prior-preservation loss, as a pure function."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def prior_preservation_loss(
    prediction: torch.Tensor, target: torch.Tensor, n_instance: int, prior_weight: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """L = mse(instance half) + prior_weight * mse(class half); returns (total, instance, class).

    The first `n_instance` rows of the batch are instance examples, the rest class examples
    (DreamBooth, Ruiz et al. 2023, eq. 2). With no class rows the class term is 0.
    """
    prediction, target = prediction.float(), target.float()
    instance = F.mse_loss(prediction[:n_instance], target[:n_instance])
    if prediction.shape[0] == n_instance:
        prior = torch.zeros((), device=prediction.device)
    else:
        prior = F.mse_loss(prediction[n_instance:], target[n_instance:])
    return instance + prior_weight * prior, instance.detach(), prior.detach()
