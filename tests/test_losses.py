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


def test_sample_weights_scale_each_rows_squared_error():
    weights = torch.tensor([1.0, 0.5, 2.0, 0.0])
    total, instance, prior = prior_preservation_loss(PREDICTION, TARGET, n_instance=2, prior_weight=1.0,
                                                     sample_weights=weights)
    # row means: instance (1+4)/2 and (0+4)/2, class (4+0)/2 and (0+4)/2
    assert instance.item() == pytest.approx((1.0 * 2.5 + 0.5 * 2.0) / 2)
    assert prior.item() == pytest.approx((2.0 * 2.0 + 0.0 * 2.0) / 2)
    ones = prior_preservation_loss(PREDICTION, TARGET, 2, 1.0, sample_weights=torch.ones(4))[0]
    assert ones.item() == pytest.approx(INSTANCE_BY_HAND + CLASS_BY_HAND)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_min_snr_weights_are_min_snr_gamma_over_snr_from_the_schedulers_alphas(prediction_type):
    from diffusers import DDPMScheduler
    from diffusers.training_utils import compute_snr

    from dreambooth_lora.losses import min_snr_weights

    scheduler = DDPMScheduler(num_train_timesteps=1000)
    timesteps = torch.tensor([0, 10, 100, 300, 500, 999])
    snr = compute_snr(scheduler, timesteps)
    alpha_bar = scheduler.alphas_cumprod[timesteps]
    assert torch.allclose(snr, alpha_bar / (1 - alpha_bar))  # SNR = alpha_bar / (1 - alpha_bar), by hand
    weights = min_snr_weights(snr, 5.0, prediction_type)
    by_hand = [min(s, 5.0) / (s if prediction_type == "epsilon" else s + 1) for s in snr.tolist()]
    assert weights.tolist() == pytest.approx(by_hand)
    if prediction_type == "epsilon":  # noisy steps (SNR <= 5) keep weight 1; clean ones are damped
        assert (weights[snr <= 5] == 1).all() and (weights[snr > 5] < 1).all()


def test_min_snr_weights_refuse_an_unknown_prediction_type():
    from dreambooth_lora.losses import min_snr_weights

    with pytest.raises(ValueError, match="sample"):
        min_snr_weights(torch.ones(2), 5.0, "sample")


def test_offset_noise_shifts_each_sample_and_channel_by_offset_times_a_seeded_normal():
    from dreambooth_lora.losses import offset_noise

    noise = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    shifted = offset_noise(noise, 0.05, torch.Generator().manual_seed(7))
    shift = shifted - noise
    # constant over the image: one value per (sample, channel), equal to 0.05 * N(0,1) from the generator
    assert torch.allclose(shift, shift[:, :, :1, :1].expand_as(shift), atol=1e-7)
    expected = 0.05 * torch.randn(3, 4, 1, 1, generator=torch.Generator().manual_seed(7))
    assert torch.allclose(shift[:, :, :1, :1], expected, atol=1e-7)
    # so each channel's mean moves by that amount, and the per-channel means spread wider than without it
    assert torch.allclose(shifted.mean(dim=(2, 3)) - noise.mean(dim=(2, 3)), expected[:, :, 0, 0], atol=1e-6)
    assert torch.equal(offset_noise(noise, 0.0, torch.Generator().manual_seed(7)), noise)


def test_the_cosine_schedule_falls_from_the_base_rate_to_zero_and_constant_stays():
    from dreambooth_lora.losses import lr_factor

    assert [lr_factor("constant", s, 10) for s in (0, 5, 9)] == [1.0, 1.0, 1.0]
    cosine = [lr_factor("cosine", s, 10) for s in range(10)]
    assert cosine[0] == 1.0 and abs(cosine[5] - 0.5) < 1e-12 and cosine[9] < 0.03
    assert all(a > b for a, b in zip(cosine, cosine[1:]))  # strictly falling


def test_the_weight_average_rate_gives_the_bias_corrected_exponential_average():
    from dreambooth_lora.losses import ema_rate

    decay, weights = 0.9, [3.0, -1.0, 4.0, 1.0, 5.0]
    average = 123.0  # the initial value never counts: step 1's rate is 1
    for step, value in enumerate(weights, start=1):
        average += ema_rate(decay, step) * (value - average)
        by_hand = sum(decay ** (step - i) * w for i, w in enumerate(weights[:step], start=1))
        by_hand /= sum(decay ** (step - i) for i in range(1, step + 1))
        assert average == pytest.approx(by_hand)
    assert ema_rate(0.0, 7) == 1.0  # off: the average is the weights
