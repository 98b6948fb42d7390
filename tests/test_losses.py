"""The prior-preservation loss against a hand computation."""

from __future__ import annotations

import pytest
import torch

from dreambooth_lora.losses import prior_preservation_loss

# Two instance rows then two class rows, two values each; numbers chosen so each mean is easy by hand.
PREDICTION = torch.tensor([[1.0, 2.0], [3.0, 4.0], [0.0, 0.0], [1.0, -1.0]])
TARGET = torch.tensor([[0.0, 0.0], [3.0, 2.0], [2.0, 0.0], [1.0, 1.0]])
# instance: squared errors 1, 4, 0, 4 -> mean 9/4; class: 4, 0, 0, 4 -> mean 8/4
INSTANCE_BY_HAND = 9 / 4
CLASS_BY_HAND = 8 / 4


@pytest.mark.parametrize("weight", [0.0, 1.0, 0.5])
def test_prior_loss_matches_hand_computation(weight):
    total, instance, prior = prior_preservation_loss(PREDICTION, TARGET, n_instance=2, prior_weight=weight)
    assert instance.item() == pytest.approx(INSTANCE_BY_HAND)
    assert prior.item() == pytest.approx(CLASS_BY_HAND)
    assert total.item() == pytest.approx(INSTANCE_BY_HAND + weight * CLASS_BY_HAND)


def test_without_class_rows_the_prior_term_is_zero():
    total, instance, prior = prior_preservation_loss(PREDICTION[:2], TARGET[:2], n_instance=2, prior_weight=1.0)
    assert prior.item() == 0.0
    assert total.item() == pytest.approx(INSTANCE_BY_HAND) == instance.item()


def test_gradient_flows_to_both_halves_scaled_by_weight():
    prediction = PREDICTION.clone().requires_grad_(True)
    total, _, _ = prior_preservation_loss(prediction, TARGET, n_instance=2, prior_weight=0.5)
    total.backward()
    # d/dp mean((p-t)^2) over 4 values = (p-t)/2; the class half carries the factor 0.5 too
    expected = torch.cat([(PREDICTION[:2] - TARGET[:2]) / 2, 0.5 * (PREDICTION[2:] - TARGET[2:]) / 2])
    assert torch.allclose(prediction.grad, expected)


def test_half_precision_inputs_give_an_fp32_loss():
    total, _, _ = prior_preservation_loss(PREDICTION.half(), TARGET.half(), n_instance=2, prior_weight=1.0)
    assert total.dtype == torch.float32
    assert total.item() == pytest.approx(INSTANCE_BY_HAND + CLASS_BY_HAND)
