import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from adpo.attacks import apgd, pgd
from adpo.objectives import Evaluation, Objective
from adpo.threat import ThreatModel, check_images, parse_eps


class LinearObjective(Objective):
    """f(x) = <w, x> per sample: a fixed direction, so the attack's optimum is known."""

    per_sample_fields = ("weights",)

    def __init__(self, weights):
        self.weights = weights

    def evaluate(self, x):
        return Evaluation(values=(x * self.weights).flatten(1).sum(1))


@settings(max_examples=40, deadline=None)
@given(
    norm=st.sampled_from(["linf", "l2"]),
    eps=st.floats(min_value=0.0, max_value=0.5),
    steps=st.integers(min_value=0, max_value=4),
    batch=st.integers(min_value=1, max_value=3),
    size=st.integers(min_value=1, max_value=6),
    attack=st.sampled_from(["pgd", "apgd", "pgd-momentum"]),
    seed=st.integers(min_value=0, max_value=2**16),
)
def test_adversarial_images_stay_in_ball_and_box(norm, eps, steps, batch, size, attack, seed):
    generator = torch.Generator().manual_seed(seed)
    x = torch.rand(batch, 3, size, size, generator=generator)
    threat = ThreatModel(norm=norm, eps=eps)
    objective = LinearObjective(torch.randn(batch, 3, size, size, generator=generator))
    if attack == "apgd":
        result = apgd(objective, x, threat, steps, generator=generator)
    else:
        result = pgd(objective, x, threat, steps, momentum=0.9 if attack == "pgd-momentum" else 0.0, generator=generator)
    assert bool(threat.contains(result.x_adv, x).all())
    assert result.x_adv.min() >= 0 and result.x_adv.max() <= 1
    assert result.x_adv.dtype == torch.float32


def test_linf_pgd_reaches_the_known_optimum():
    # For a linear objective the l_inf optimum is x + eps*sign(w), clipped to the box.
    x = torch.full((2, 3, 4, 4), 0.5)
    weights = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    threat = ThreatModel("linf", 4 / 255, step_size=1 / 255, random_start=False)
    result = pgd(LinearObjective(weights), x, threat, steps=8)
    assert torch.allclose(result.x_adv, x + 4 / 255 * weights.sign(), atol=1e-6)


def test_l2_projection_is_exact_on_the_sphere():
    x = torch.full((1, 3, 8, 8), 0.5)
    threat = ThreatModel("l2", 0.3)
    far = x + torch.randn_like(x)
    projected = threat.project(far, x)
    assert math.isclose(float(threat.distance(projected, x)), 0.3, rel_tol=1e-5) or float(threat.distance(projected, x)) < 0.3


@pytest.mark.parametrize(
    "kwargs, message",
    [({"eps": -0.1}, "eps must be"), ({"norm": "l1"}, "unknown norm"), ({"step_size": 0.0}, "step_size must be")],
)
def test_bad_threat_models_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ThreatModel(**kwargs)


@pytest.mark.parametrize(
    "images, message",
    [
        (torch.rand(3, 8, 8), "shape \\[B, C, H, W\\]"),
        (torch.rand(1, 3, 8, 8) * 2, "pixel space \\[0, 1\\]"),
        (torch.randint(0, 255, (1, 3, 8, 8)), "float tensor"),
    ],
)
def test_bad_images_are_refused(images, message):
    with pytest.raises(ValueError, match=message):
        check_images(images)
    with pytest.raises(ValueError, match=message):
        pgd(LinearObjective(torch.ones(1, 3, 8, 8)), images, ThreatModel(), 1)


def test_parse_eps_accepts_fractions_and_255ths():
    assert parse_eps("2/255") == pytest.approx(2 / 255)
    assert parse_eps(4) == pytest.approx(4 / 255)
    assert parse_eps(0.01) == pytest.approx(0.01)


def test_parse_eps_world_is_the_working_eps_in_world_yaml():
    from adpo.world import world_config

    assert parse_eps(" World ") == float(world_config()["working_eps"]) > 0


@pytest.mark.parametrize("norm, eps", [("linf", 2 / 255), ("linf", 2.5 / 255), ("l2", 0.1), ("l2", 0.5)])
def test_quantized_adversarial_images_stay_in_the_ball_on_the_uint8_grid(norm, eps):
    threat = ThreatModel(norm=norm, eps=eps)
    generator = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (6, 3, 8, 8), generator=generator).float() / 255
    # points on the sphere's surface are the hard case for rounding
    direction = torch.randn(x.shape, generator=generator)
    if norm == "linf":
        x_adv = threat.project(x + direction.sign() * eps, x)
    else:
        x_adv = threat.project(x + direction / direction.flatten(1).norm(dim=1).view(-1, 1, 1, 1) * eps, x)
    stored = threat.quantize(x_adv, x)
    assert torch.equal(stored * 255, (stored * 255).round())
    assert bool(threat.contains(stored, x).all())
    assert (stored - x_adv).abs().max() <= 1 / 255 + 1e-6


def test_old_attack_keys_are_read_with_a_warning_naming_the_new_one(tmp_path):
    from adpo.errors import UsageError, parse_config
    from adpo.eval.config import EvalConfig
    from pairs.config import PairsConfig

    config = tmp_path / "eval.yaml"
    config.write_text('eps: ["4/255"]\nnorm: l2\n')
    common = ["--config", str(config), "--model", "m", "--data", str(tmp_path), "--output_dir", str(tmp_path / "out")]
    with pytest.warns(FutureWarning, match="'eps' is deprecated; write 'attack_eps'"):
        (parsed,) = parse_config([EvalConfig], [*common, "--steps=3"])
    assert (parsed.attack_eps, parsed.attack_norm, parsed.attack_steps) == (["4/255"], "l2", 3)
    config.write_text('eps: ["4/255"]\nattack_eps: ["2/255"]\n')
    with pytest.raises(UsageError, match="'eps' and 'attack_eps' are the same setting; keep only 'attack_eps'"):
        parse_config([EvalConfig], common)
    # every stage reads the same keys, declared once
    from adpo.threat import ThreatArguments
    from trainers.adpo import AdPOConfig
    from trainers.encoder_trainer import EncoderTrainingConfig

    for stage in (PairsConfig, AdPOConfig, EncoderTrainingConfig):
        assert issubclass(stage, ThreatArguments)
