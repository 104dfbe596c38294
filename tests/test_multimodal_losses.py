"""MMCoA and ΔCLIP losses equal their formulas on hand-made cases."""

import math

import pytest
import torch

from adpo.losses.multimodal import clip_contrastive_loss, deltaclip_loss, mmcoa_loss


def _ce(logits, target):
    return -logits[target] + math.log(sum(math.exp(v) for v in logits))


def test_mmcoa_loss_is_image_term_plus_weighted_text_term():
    class_text = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    adversarial_image = torch.tensor([[1.0, 1.0]])  # cos √½ to both classes: logits s·[√½, √½]
    clean_image = torch.tensor([[3.0, 0.0]])  # cos 1 to class 0, 0 to class 1
    adversarial_prompt = torch.tensor([[-1.0, 0.0]])  # the perturbed class-0 prompt now points away: cos −1
    s, weight = 2.0, 0.5
    image_term = _ce([s * math.sqrt(0.5), s * math.sqrt(0.5)], 0)  # = log 2
    text_term = _ce([-s, 0.0], 0)  # class 0's row is the adversarial prompt, class 1's the clean one
    expected = image_term + weight * text_term
    got = mmcoa_loss(adversarial_image, clean_image, class_text, adversarial_prompt, torch.tensor([0]), s, weight)
    assert got.item() == pytest.approx(expected, rel=1e-6)
    assert image_term == pytest.approx(math.log(2))


def test_mmcoa_text_term_reaches_both_towers():
    class_text = torch.randn(3, 4, requires_grad=True)
    prompt = torch.randn(2, 4, requires_grad=True)
    clean, adversarial = torch.randn(2, 4, requires_grad=True), torch.randn(2, 4, requires_grad=True)
    mmcoa_loss(adversarial, clean, class_text, prompt, torch.tensor([2, 0]), 10.0).backward()
    assert all(t.grad is not None and t.grad.abs().sum() > 0 for t in (class_text, prompt, clean, adversarial))


def test_deltaclip_loss_is_symmetric_infonce_on_adversarial_pairs_plus_weighted_clean():
    image = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    text = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    r = math.sqrt(0.5)
    # s = 1: logits[i][j] = cos(image_i, text_j) = [[1, r], [0, r]]
    rows = (_ce([1.0, r], 0) + _ce([0.0, r], 1)) / 2
    columns = (_ce([1.0, 0.0], 0) + _ce([r, r], 1)) / 2
    adversarial = (rows + columns) / 2
    assert clip_contrastive_loss(image, text, 1.0).item() == pytest.approx(adversarial, rel=1e-6)
    assert deltaclip_loss(image, text, 1.0).item() == pytest.approx(adversarial, rel=1e-6)

    clean_image, clean_text = torch.eye(2), torch.eye(2)  # perfectly aligned: logits s·I
    clean = _ce([3.0, 0.0], 0)  # every row and column alike at s = 3
    rows3 = (_ce([3.0, 3 * r], 0) + _ce([0.0, 3 * r], 1)) / 2
    columns3 = (_ce([3.0, 0.0], 0) + _ce([3 * r, 3 * r], 1)) / 2
    got = deltaclip_loss(image, text, 3.0, clean_image, clean_text, clean_weight=0.25)
    assert got.item() == pytest.approx((rows3 + columns3) / 2 + 0.25 * clean, rel=1e-6)
    with pytest.raises(ValueError, match="clean_weight"):
        deltaclip_loss(image, text, 1.0, clean_weight=1.0)
