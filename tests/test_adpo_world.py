"""AdPO on the bundled world's small LVLM: a few steps on real pairs (clean answer vs answer on a
FARE-attacked image) train the tower only and raise the clean-chosen vs adversarial-rejected margin."""

from __future__ import annotations

import pytest
import torch
from datasets import Dataset, Features, Image as ImageFeature, Value

from adpo.attacks import pgd
from adpo.lvlm import LlavaView
from adpo.models import load_lvlm
from adpo.objectives import EmbeddingDistance
from adpo.preprocess import to_pixels, to_uint8_images
from adpo.threat import ThreatModel
from adpo.tower import find_vision_tower

pytestmark = pytest.mark.world


def world_pairs(view: LlavaView, n: int, eps: float) -> Dataset:
    """Pairs made the way `adpo pairs` makes them (PGD on the FARE objective, greedy answers)."""
    from adpo.world import load_world_dataset

    images = list(load_world_dataset("train", n=n, progress=False)["image"])
    clean = to_pixels(images, view.processor)
    with torch.no_grad():
        reference = view.tower.embed(clean, "llm")
    objective = EmbeddingDistance(lambda x: view.tower.embed(x, "llm"), reference, modules=(view.tower,))
    adv = pgd(objective, clean, ThreatModel(eps=eps), steps=10, generator=torch.Generator().manual_seed(0)).x_adv
    adv_images, clean_images = to_uint8_images(adv), to_uint8_images(clean)
    questions = ["What is in the image?"] * n
    chosen = view.generate(to_pixels(clean_images, view.processor), questions, max_new_tokens=8)
    rejected = view.generate(to_pixels(adv_images, view.processor), questions, max_new_tokens=8)
    return Dataset.from_dict(
        {"image": clean_images, "adv_image": adv_images, "prompt": questions, "chosen": chosen, "rejected": rejected},
        features=Features({"image": ImageFeature(), "adv_image": ImageFeature(), "prompt": Value("string"),
                           "chosen": Value("string"), "rejected": Value("string")}),
    )


def test_adpo_trains_the_world_tower_only(tmp_path):
    from adpo.world import world_config
    from trainers.adpo import AdPOConfig, AdPOTrainer

    model, processor = load_lvlm("world:small")
    view = LlavaView(model, processor)
    pairs = world_pairs(view, n=4, eps=float(world_config()["working_eps"]))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    tower = find_vision_tower(model)
    prefix = next(name for name, module in model.named_modules() if module is tower) + "."
    config = AdPOConfig(
        output_dir=str(tmp_path / "run"), per_device_train_batch_size=2, max_steps=3, learning_rate=1e-4,
        bf16=False, gradient_checkpointing=False, logging_steps=1, report_to=[], save_strategy="no", use_cpu=True,
    )
    trainer = AdPOTrainer(model, config, pairs, processor)
    trainer.train()
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items() if not k.startswith(prefix))
    assert any(not torch.equal(after[k], v) for k, v in before.items() if k.startswith(prefix))
    logs = [entry for entry in trainer.state.log_history if "pio" in entry]
    assert all(torch.isfinite(torch.tensor(entry["loss"])) for entry in logs)
    assert logs[0]["rewards/margins"] == pytest.approx(0.0, abs=1e-4)  # policy = reference at step 1
    assert logs[-1]["drift/clean_embedding"] > 0
