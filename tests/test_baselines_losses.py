"""FARE, TeCoA and Sim-CLIP losses against hand-computed values."""

import math

import pytest
import torch

from adpo.losses.encoder import fare_loss, relative_drift_loss, simclip_loss, tecoa_loss


def test_fare_is_squared_l2_summed_over_dims_and_averaged_over_batch():
    adversarial = torch.tensor([[1.0, 2.0], [0.0, 0.0]], requires_grad=True)
    original = torch.tensor([[0.0, 0.0], [3.0, 4.0]], requires_grad=True)
    # sample 0: 1 + 4 = 5; sample 1: 9 + 16 = 25; mean 15
    loss = fare_loss(adversarial, original)
    assert loss.item() == pytest.approx(15.0)
    assert fare_loss(adversarial, original, reduction="none").tolist() == pytest.approx([5.0, 25.0])
    loss.backward()
    # d/da mean_b ||a_b - o_b||^2 = 2 (a - o) / B; the original embedding is a constant
    assert torch.allclose(adversarial.grad, (adversarial - original).detach())
    assert original.grad is None


def test_fare_sums_over_tokens_too_and_is_not_normalised():
    adversarial = torch.zeros(1, 3, 2)
    original = torch.full((1, 3, 2), 10.0)
    assert fare_loss(adversarial, original).item() == pytest.approx(6 * 100.0)


def test_fare_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="same embedding kind"):
        fare_loss(torch.zeros(2, 4), torch.zeros(2, 3, 4))


def test_tecoa_is_cross_entropy_of_scaled_cosine():
    text = torch.tensor([[1.0, 0.0], [0.0, 2.0]])  # text norms must not matter
    image = torch.tensor([[3.0, 0.0], [1.0, 1.0]])
    labels = torch.tensor([0, 1])
    per_sample = tecoa_loss(image, text, labels, logit_scale=10.0, reduction="none")
    # sample 0: cosines (1, 0) -> logits (10, 0), label 0 -> log(1 + e^-10)
    # sample 1: cosines (1/sqrt2, 1/sqrt2) -> equal logits -> log 2
    assert per_sample.tolist() == pytest.approx([math.log1p(math.exp(-10.0)), math.log(2.0)], rel=1e-5, abs=1e-6)
    assert tecoa_loss(image, text, labels, logit_scale=10.0).item() == pytest.approx(per_sample.mean().item())


def test_tecoa_temperature_sharpens_and_wrong_label_costs_more():
    text = torch.eye(2)
    image = torch.tensor([[2.0, 1.0]])
    right, wrong = torch.tensor([0]), torch.tensor([1])
    cos0, cos1 = 2 / math.sqrt(5), 1 / math.sqrt(5)
    for scale in (1.0, 100.0):
        expected_right = math.log1p(math.exp(-scale * (cos0 - cos1)))
        assert tecoa_loss(image, text, right, scale).item() == pytest.approx(expected_right, rel=1e-5, abs=1e-8)
        assert tecoa_loss(image, text, wrong, scale).item() == pytest.approx(
            expected_right + scale * (cos0 - cos1), rel=1e-5
        )


def test_tecoa_rejects_token_features_and_unprojected_width():
    with pytest.raises(ValueError, match="pooled"):
        tecoa_loss(torch.zeros(2, 3, 4), torch.zeros(5, 4), torch.zeros(2, dtype=torch.long), 100.0)
    with pytest.raises(ValueError, match="visual_projection"):
        tecoa_loss(torch.zeros(2, 8), torch.zeros(5, 4), torch.zeros(2, dtype=torch.long), 100.0)


def test_simclip_is_one_minus_cosine_with_stop_gradient_on_clean_branch():
    adversarial = torch.tensor([[1.0, 0.0], [1.0, 1.0], [1.0, 0.0]], requires_grad=True)
    clean = torch.tensor([[0.0, 1.0], [2.0, 2.0], [-3.0, 0.0]], requires_grad=True)
    assert simclip_loss(adversarial, clean, reduction="none").tolist() == pytest.approx([1.0, 0.0, 2.0], abs=1e-6)
    loss = simclip_loss(adversarial, clean)
    assert loss.item() == pytest.approx(1.0)
    loss.backward()
    assert clean.grad is None
    assert adversarial.grad is not None and adversarial.grad.abs().sum() > 0


def test_simclip_averages_per_token_cosine():
    adversarial = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])
    clean = torch.tensor([[[1.0, 0.0], [1.0, 0.0]]])
    # token 0 identical (0), token 1 orthogonal (1): mean 0.5
    assert simclip_loss(adversarial, clean).item() == pytest.approx(0.5)


def test_unknown_reduction_is_refused():
    with pytest.raises(ValueError, match="reduction"):
        fare_loss(torch.zeros(1, 2), torch.zeros(1, 2), reduction="sum")


def test_relative_drift_is_fares_distance_over_the_original_squared_norm():
    policy = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
    original = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    # rows: |(1, 0)|^2 / 1 = 1 and |(0, -1)|^2 / 4 = 0.25
    assert relative_drift_loss(policy, original, reduction="none").tolist() == pytest.approx([1.0, 0.25])
    assert relative_drift_loss(policy, original).item() == pytest.approx(0.625)
    # scale-free: both embeddings ten times larger give the same value
    assert relative_drift_loss(10 * policy, 10 * original).item() == pytest.approx(0.625)
