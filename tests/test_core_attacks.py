import pytest
import torch

from adpo.attacks import apgd, apgd_checkpoints, pgd
from adpo.encoder_io import export_encoder
from adpo.lvlm import LlavaView
from adpo.objectives import EmbeddingDistance, Evaluation, LanguageModelLoss, Objective, ZeroShotCrossEntropy
from adpo.testing import random_pixels, tiny_llava
from adpo.threat import ThreatModel
from adpo.tower import VisionTower


def _fare_setup(seed=0):
    model, processor = tiny_llava(seed=seed)
    tower = VisionTower.from_lvlm(model, processor)
    original = VisionTower.from_encoder(export_encoder(model), processor)
    x = random_pixels(4, seed=seed)
    objective = EmbeddingDistance(tower.pooled, original.pooled(x).detach(), modules=[model])
    return model, tower, x, objective


def test_attack_raises_objective_above_clean_and_random_noise():
    model, tower, x, objective = _fare_setup()
    threat = ThreatModel("linf", 4 / 255, step_size=1 / 255)
    result = pgd(objective, x, threat, steps=10, keep_best=True, generator=torch.Generator().manual_seed(0))
    clean = objective(x)
    noise = threat.project(x + (4 / 255) * torch.sign(torch.randn_like(x)), x)  # random corner of the ball
    assert (result.values > clean + 1e-6).all()
    assert (result.values > objective(noise).detach()).all()
    assert torch.allclose(result.values, objective(result.x_adv).detach(), rtol=1e-4, atol=1e-6)


def test_apgd_at_least_as_strong_as_pgd_on_the_same_budget():
    model, tower, x, objective = _fare_setup(seed=1)
    threat = ThreatModel("linf", 2 / 255, step_size=0.5 / 255)
    strong = apgd(objective, x, threat, steps=20, generator=torch.Generator().manual_seed(0))
    plain = pgd(objective, x, threat, steps=20, keep_best=True, generator=torch.Generator().manual_seed(0))
    assert strong.values.mean() >= plain.values.mean()


def test_attack_restores_mode_and_accumulates_no_parameter_gradients():
    model, tower, x, objective = _fare_setup()
    model.train()
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    apgd(objective, x, ThreatModel(eps=2 / 255), steps=3)
    assert model.training
    assert {name: p.requires_grad for name, p in model.named_parameters()} == flags
    assert all(p.grad is None for p in model.parameters())


def test_bf16_model_keeps_fp32_attack_state():
    model, processor = tiny_llava(dtype=torch.bfloat16)
    tower = VisionTower.from_lvlm(model, processor)
    x = random_pixels(2)
    objective = EmbeddingDistance(tower.pooled, tower.pooled(x).detach() + 1.0, modules=[model])
    threat = ThreatModel(eps=4 / 255)
    result = apgd(objective, x, threat, steps=3)
    assert result.x_adv.dtype == torch.float32 and bool(threat.contains(result.x_adv, x).all())


class CountdownObjective(Objective):
    """Succeeds for sample i once it has been evaluated more than ``budget[i]`` times."""

    per_sample_fields = ("budget", "index")

    def __init__(self, budget):
        self.budget, self.index, self.calls = budget, torch.arange(len(budget)), torch.zeros(len(budget), dtype=torch.long)

    def evaluate(self, x):
        self.calls[self.index] += 1
        return Evaluation(values=x.flatten(1).sum(1), success=self.calls[self.index] > self.budget)

    def subset(self, index):
        restricted = super().subset(index)
        restricted.calls = self.calls
        return restricted


def test_early_stop_removes_broken_samples_from_the_batch():
    budget = torch.tensor([0, 3, 100])
    objective = CountdownObjective(budget)
    result = pgd(objective, torch.rand(3, 3, 4, 4), ThreatModel(eps=0.1), steps=10)
    assert result.steps_run.tolist() == [1, 4, 10]
    assert result.success.tolist() == [True, True, False]
    assert objective.calls.tolist() == [1, 4, 10]


def test_apgd_groups_stop_every_row_of_a_broken_image_together():
    budget = torch.tensor([2, 100, 100, 5])  # rows 0, 1 attack one image, rows 2, 3 another
    grouped = apgd(CountdownObjective(budget), torch.rand(4, 3, 4, 4), ThreatModel(eps=0.1), steps=10,
                   groups=torch.tensor([7, 7, 9, 9]))
    assert grouped.success.tolist() == [True, False, False, True]
    assert grouped.steps_run.tolist() == [2, 2, 5, 5]  # the partner row stops when its image breaks
    alone = apgd(CountdownObjective(budget), torch.rand(4, 3, 4, 4), ThreatModel(eps=0.1), steps=10)
    assert alone.steps_run.tolist() == [2, 10, 10, 5]
    with pytest.raises(ValueError, match="one id per image"):
        apgd(CountdownObjective(budget), torch.rand(4, 3, 4, 4), ThreatModel(eps=0.1), steps=1, groups=torch.zeros(3))


def _greedy_continuation(view, x, question, new_tokens=3):
    """Prompt ids followed by the model's own greedy tokens, with labels on those tokens."""
    encoded = view.encode([question] * x.shape[0])
    with torch.no_grad():
        output = view.model.generate(
            input_ids=encoded.input_ids, attention_mask=encoded.attention_mask, pixel_values=view.tower.normalize(x),
            max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
        )
    labels = output.clone()
    labels[:, : encoded.input_ids.shape[1]] = -100
    return output, torch.ones_like(output), labels


def test_language_model_objective_untargeted_and_targeted():
    model, processor = tiny_llava(seed=3)
    view = LlavaView(model, processor)
    x = random_pixels(2, seed=3)
    input_ids, attention_mask, labels = _greedy_continuation(view, x, "what color is it ?")
    # The model's own greedy tokens are greedy by definition: untargeted success is False at the start...
    objective = LanguageModelLoss(view, input_ids, attention_mask, labels)
    assert not bool(objective.evaluate(x).success.any())
    # ...and targeted success (pull these tokens in) is already True.
    targeted = LanguageModelLoss(view, input_ids, attention_mask, labels, targeted=True)
    assert bool(targeted.evaluate(x).success.all())
    # Per-row flags: untargeted and targeted rows side by side equal the two objectives row by row.
    mixed = LanguageModelLoss(view, input_ids, attention_mask, labels, targeted=torch.tensor([False, True]))
    together, apart = mixed.evaluate(x), [objective.evaluate(x), targeted.evaluate(x)]
    torch.testing.assert_close(together.values, torch.stack([apart[0].values[0], apart[1].values[1]]))
    assert together.success.tolist() == [bool(apart[0].success[0]), bool(apart[1].success[1])]
    assert mixed.subset(torch.tensor([1])).targeted.tolist() == [True]
    result = apgd(objective, x, ThreatModel(eps=16 / 255), steps=10, generator=torch.Generator().manual_seed(0))
    assert (result.values >= objective(x).detach() - 1e-6).all()
    # Success must mean what it says: greedy decoding on the adversarial image leaves the reference tokens.
    for i in torch.nonzero(result.success).flatten().tolist():
        with torch.no_grad():
            regenerated, _, _ = _greedy_continuation(view, result.x_adv[i : i + 1], "what color is it ?")
        assert not torch.equal(regenerated[0], input_ids[i])


def test_zero_shot_objective_success_means_misclassified():
    model, tower, x, _ = _fare_setup()
    classes = torch.randn(5, tower.encoder.config.hidden_size)
    with torch.no_grad():
        predicted = (torch.nn.functional.normalize(tower.pooled(x), dim=-1) @ torch.nn.functional.normalize(classes, dim=-1).T).argmax(1)
    objective = ZeroShotCrossEntropy(tower.pooled, classes, predicted, modules=[model])
    assert not bool(objective.evaluate(x).success.any())
    # A target label of -1 leaves that row untargeted; the others pull toward their class.
    targets = (predicted + 1) % 5
    targets[0] = -1
    mixed = ZeroShotCrossEntropy(tower.pooled, classes, predicted, target_labels=targets, modules=[model]).evaluate(x)
    toward = ZeroShotCrossEntropy(tower.pooled, classes, predicted, target_labels=(predicted + 1) % 5).evaluate(x)
    plain = objective.evaluate(x)
    torch.testing.assert_close(mixed.values, torch.cat([plain.values[:1], toward.values[1:]]))
    assert mixed.success.tolist() == plain.success[:1].tolist() + toward.success[1:].tolist()
    result = apgd(objective, x, ThreatModel(eps=32 / 255), steps=20)
    assert bool(result.success.any())
    with torch.no_grad():
        assert (objective.logits(result.x_adv).argmax(1)[result.success] != predicted[result.success]).all()


def test_apgd_checkpoints_follow_the_paper_schedule():
    assert apgd_checkpoints(100) == [22, 41, 57, 70, 80, 87, 93, 99]
