"""PIO and AIO against values computed by hand."""

import math

import pytest
import torch

from adpo.losses.preference import PIO_LOSS_TYPES, aio_loss, pio_loss, sequence_logps


def test_pio_sigmoid_hand_case():
    # pair 0: chosen log-ratio −1−(−2)=1, rejected log-ratio −3−(−2)=−1 → h = 0.5·(1−(−1)) = 1
    # pair 1: chosen log-ratio 0, rejected log-ratio 2 → h = 0.5·(0−2) = −1
    out = pio_loss(
        torch.tensor([-1.0, -4.0]),
        torch.tensor([-3.0, -1.0]),
        torch.tensor([-2.0, -4.0]),
        torch.tensor([-2.0, -3.0]),
        beta=0.5,
    )
    expected = [math.log1p(math.exp(-1.0)), math.log1p(math.exp(1.0))]
    assert out.per_pair.tolist() == pytest.approx(expected, rel=1e-6)
    assert out.loss.item() == pytest.approx(sum(expected) / 2, rel=1e-6)
    assert out.chosen_rewards.tolist() == pytest.approx([0.5, 0.0])
    assert out.rejected_rewards.tolist() == pytest.approx([-0.5, 1.0])


def test_pio_gradient_raises_chosen_lowers_rejected():
    chosen = torch.tensor([-2.0], requires_grad=True)
    rejected = torch.tensor([-2.0], requires_grad=True)
    pio_loss(chosen, rejected, torch.tensor([-2.0]), torch.tensor([-2.0]), beta=0.1).loss.backward()
    # at h = 0: d/dchosen −log σ(β·Δ) = −β·σ(−0) = −0.05, d/drejected = +0.05
    assert chosen.grad.item() == pytest.approx(-0.05)
    assert rejected.grad.item() == pytest.approx(0.05)


def test_pio_other_shapes_hand_values():
    args = (torch.tensor([-1.0]), torch.tensor([-3.0]), torch.tensor([-2.0]), torch.tensor([-2.0]))
    # h = β·Δ = 0.5·2 = 1
    assert pio_loss(*args, beta=0.5, loss_type="hinge").loss.item() == pytest.approx(0.0)
    assert pio_loss(*args, beta=0.25, loss_type="hinge").loss.item() == pytest.approx(0.5)
    # ipo with lengths 2 and 4: Δ_norm = 1/2 − (−1)/4 = 0.75; (0.75 − 1/(2·0.5))² = 0.0625
    ipo = pio_loss(
        *args, beta=0.5, loss_type="ipo", chosen_lengths=torch.tensor([2.0]), rejected_lengths=torch.tensor([4.0])
    )
    assert ipo.loss.item() == pytest.approx(0.0625)
    # robust with ε = 0.1: (−0.9·log σ(1) + 0.1·log σ(−1)) / 0.8
    robust = pio_loss(*args, beta=0.5, loss_type="robust", label_smoothing=0.1).loss.item()
    log_sig = lambda v: -math.log1p(math.exp(-v))  # noqa: E731
    assert robust == pytest.approx((-0.9 * log_sig(1.0) + 0.1 * log_sig(-1.0)) / 0.8, rel=1e-6)
    # bco_pair: −log σ(0.5·1) − log σ(−0.5·(−1))
    assert pio_loss(*args, beta=0.5, loss_type="bco_pair").loss.item() == pytest.approx(-2 * log_sig(0.5), rel=1e-6)


@pytest.mark.parametrize("loss_type", PIO_LOSS_TYPES)
def test_every_pio_shape_is_finite_and_differentiable(loss_type):
    chosen = torch.tensor([-1.0, -2.0], requires_grad=True)
    out = pio_loss(
        chosen,
        torch.tensor([-3.0, -1.5]),
        torch.tensor([-1.5, -2.5]),
        torch.tensor([-2.0, -1.0]),
        beta=0.1,
        loss_type=loss_type,
        label_smoothing=0.1,
        chosen_lengths=torch.tensor([3.0, 2.0]),
        rejected_lengths=torch.tensor([2.0, 5.0]),
    )
    out.loss.backward()
    assert torch.isfinite(out.loss) and torch.isfinite(chosen.grad).all()


def test_pio_rejects_unknown_shape_and_missing_lengths():
    t = torch.zeros(1)
    with pytest.raises(ValueError, match="unknown PIO loss_type"):
        pio_loss(t, t, t, t, loss_type="aot")
    with pytest.raises(ValueError, match="chosen_lengths"):
        pio_loss(t, t, t, t, loss_type="ipo")


def test_aio_hand_case_and_stop_gradient():
    # sample 0: tokens with p = 0.5, 0.25 and one padded position; sample 1: p = 1.0, 0.5
    logps = torch.log(torch.tensor([[0.5, 0.25, 0.9], [1.0, 0.5, 0.3]])).requires_grad_(True)
    mask = torch.tensor([[1, 1, 0], [1, 1, 0]])
    out = aio_loss(logps, mask)
    s0 = -(0.5 * math.log(0.5) + 0.25 * math.log(0.25))
    s1 = -(1.0 * 0.0 + 0.5 * math.log(0.5))
    assert out.per_sample.tolist() == pytest.approx([s0, s1], rel=1e-6)
    assert out.loss.item() == pytest.approx((s0 + s1) / 2, rel=1e-6)
    out.loss.backward()
    # the weight is detached: d/dlog p_t = −p_t / B on answer tokens, 0 on padding
    expected_grad = torch.tensor([[-0.25, -0.125, 0.0], [-0.5, -0.25, 0.0]])
    assert torch.allclose(logps.grad, expected_grad)


def test_sequence_logps_sums_answer_tokens_only():
    logps = torch.tensor([[-1.0, -2.0, -7.0]])
    assert sequence_logps(logps, torch.tensor([[1, 1, 0]])).item() == pytest.approx(-3.0)
    with pytest.raises(ValueError, match="must match"):
        sequence_logps(logps, torch.ones(1, 2))
