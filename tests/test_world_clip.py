"""WorldCLIP: tokenizer, config, contrastive loss, a training step, and the shipped weights."""

import math

import pytest
import torch

from adpo.world.clip import (
    WEIGHTS_DIR,
    WorldClipSize,
    WorldClipTrainingConfig,
    build_world_clip_config,
    build_world_processor,
    clip_training_step,
    contrastive_loss,
    _shift,
    load_world_clip,
    object_label_maps,
    patch_labels,
    save_world_clip,
    train_world_clip,
    zero_shot_accuracy,
)
from adpo.world.data import (
    CLASS_NAMES, CLASS_PROMPT_TEMPLATE, captions_for, class_index, generate_world_image, questions_for,
)
from adpo.zeroshot import zero_shot_classifier

TINY = WorldClipSize(
    vision_hidden=32, vision_layers=1, vision_heads=2, vision_intermediate=64,
    text_hidden=32, text_layers=1, text_heads=2, text_intermediate=64, projection_dim=16,
)


@pytest.fixture(scope="module")
def processor():
    return build_world_processor()


def test_tokenizer_covers_world_text_and_ends_with_eos(processor):
    tokenizer = processor.tokenizer
    texts = [CLASS_PROMPT_TEMPLATE.format(name) for name in CLASS_NAMES]
    for seed in range(50):
        world = generate_world_image(seed)
        texts += captions_for(world) + questions_for(world)[0]
    encoded = tokenizer(texts, padding=True)
    for ids, mask in zip(encoded["input_ids"], encoded["attention_mask"]):
        assert tokenizer.unk_token_id not in ids
        length = sum(mask)
        assert ids[0] == tokenizer.bos_token_id and ids[length - 1] == tokenizer.eos_token_id
    # Different class names give different token sequences (the zero-shot prompts are distinguishable).
    prompts = tokenizer([CLASS_PROMPT_TEMPLATE.format(n) for n in CLASS_NAMES])["input_ids"]
    assert len({tuple(p) for p in prompts}) == len(CLASS_NAMES)
    assert tokenizer.unk_token_id in tokenizer("a photo of a zebra")["input_ids"]


def test_config_matches_the_fixed_design(processor):
    config = build_world_clip_config(processor.tokenizer)
    vision = config.vision_config
    default = WorldClipSize()
    assert (vision.image_size, vision.patch_size, vision.hidden_size) == (64, 16, default.vision_hidden)
    assert (vision.num_hidden_layers, vision.intermediate_size) == (default.vision_layers, default.vision_intermediate)
    assert vision.hidden_act == "quick_gelu" and config.projection_dim == default.projection_dim
    # CLIP pools the text at the first EOS only when eos_token_id != 2 (the legacy argmax path).
    assert config.text_config.eos_token_id == processor.tokenizer.eos_token_id != 2
    size = processor.image_processor.crop_size
    assert (size["height"], size["width"]) == (64, 64)


def test_contrastive_loss_hand_cases():
    embeds = torch.eye(3)
    scale = torch.tensor(math.log(2.0))
    # Perfectly matched pairs: loss is the softmax cross-entropy of logits 2 on the diagonal, 0 elsewhere.
    expected = -math.log(math.exp(2) / (math.exp(2) + 2))
    assert contrastive_loss(embeds, embeds, scale).item() == pytest.approx(expected, rel=1e-5)
    # Mismatched pairs cost more than matched ones, and the logit scale sharpens the matched optimum.
    assert contrastive_loss(embeds, embeds[[1, 2, 0]], scale).item() > 1.0 + expected
    assert contrastive_loss(embeds, embeds, torch.tensor(math.log(20.0))).item() < expected


def test_contrastive_loss_ignores_masked_false_negatives():
    # Images 0 and 1 share a class: text 1 scores as high as text 0 for image 0, which is no error.
    image = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    scale = torch.tensor(math.log(2.0))
    same_class = torch.tensor([[False, True, False], [True, False, False], [False, False, False]])
    masked = contrastive_loss(image, image, scale, same_class).item()
    assert masked < contrastive_loss(image, image, scale).item()
    # Rows/columns 0 and 1 keep only themselves and class 2 (logit 0); row/column 2 keeps both class-0 items.
    kept_one, kept_two = -math.log(math.exp(2) / (math.exp(2) + 1)), -math.log(math.exp(2) / (math.exp(2) + 2))
    assert masked == pytest.approx((2 * kept_one + kept_two) / 3, rel=1e-5)


def _batch(processor, n=8):
    worlds = [generate_world_image(seed, n_objects=1) for seed in range(n)]
    pixels = processor.image_processor(images=[w.image for w in worlds], return_tensors="pt")["pixel_values"]
    texts = [CLASS_PROMPT_TEMPLATE.format(f"{w.objects[0].color} {w.objects[0].shape}") for w in worlds]
    encoded = processor.tokenizer(texts, padding=True, return_tensors="pt")
    return pixels, encoded["input_ids"], encoded["attention_mask"]


def test_tiny_training_steps_decrease_the_contrastive_loss(processor):
    from transformers import CLIPModel

    torch.manual_seed(0)
    model = CLIPModel(build_world_clip_config(processor.tokenizer, TINY))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    pixels, ids, mask = _batch(processor)
    losses = [clip_training_step(model, optimizer, pixels, ids, mask) for _ in range(15)]
    assert losses[-1] < 0.7 * losses[0]


def test_patch_targets_hand_case():
    background = len(CLASS_NAMES)
    # One circle of radius 8 centred in the top-left 16x16 patch, a second one spanning four patches.
    objects = [[
        {"shape": "circle", "color": "red", "size": 8.0, "x": 8.0, "y": 8.0},
        {"shape": "star", "color": "blue", "size": 6.0, "x": 48.0, "y": 48.0},
    ]]
    maps = object_label_maps(objects)
    assert maps.shape == (1, 64, 64)
    assert maps[0, 8, 8] == class_index("red", "circle") and maps[0, 48, 48] == class_index("blue", "star")
    assert maps[0, 30, 30] == background
    labels = patch_labels(maps, patch_size=16)
    expected = torch.full((16,), background)
    expected[0] = class_index("red", "circle")
    # The star centred on the corner shared by patches 10, 11, 14 and 15 covers ~11 % of each (above the 10 % bar).
    expected[[10, 11, 14, 15]] = class_index("blue", "star")
    assert torch.equal(labels[0], expected)
    # A higher coverage bar leaves the star's quarter-patches to the background.
    assert (patch_labels(maps, patch_size=16, min_cover=0.5)[0] != background).sum() == 1


def test_shift_moves_label_maps_with_the_pixels():
    pixels = torch.arange(2 * 3 * 8 * 8, dtype=torch.float32).view(2, 3, 8, 8)
    maps = torch.arange(2 * 8 * 8).view(2, 8, 8) % 49
    shifted, shifted_maps = _shift(pixels, 2, torch.Generator().manual_seed(3), maps)
    # The same translation: every pixel's channel-0 value still lines up with its label.
    lookup = {(b, int(v)): int(m) for b in range(2) for v, m in zip(pixels[b, 0].flatten(), maps[b].flatten())}
    for b in range(2):
        for v, m in zip(shifted[b, 0].flatten(), shifted_maps[b].flatten()):
            assert lookup[(b, int(v))] == int(m)
    assert shifted_maps.dtype == torch.long and not torch.equal(shifted, pixels)


def test_training_step_with_patch_head_updates_tower_and_head(processor):
    from transformers import CLIPModel

    torch.manual_seed(0)
    model = CLIPModel(build_world_clip_config(processor.tokenizer, TINY))
    head = torch.nn.Linear(TINY.vision_hidden, len(CLASS_NAMES) + 1)
    optimizer = torch.optim.AdamW(list(model.parameters()) + list(head.parameters()), lr=3e-3)
    pixels, ids, mask = _batch(processor)
    targets = torch.randint(0, len(CLASS_NAMES) + 1, (len(pixels), 16), generator=torch.Generator().manual_seed(0))
    head_before = head.weight.detach().clone()
    patch_before = model.vision_model.embeddings.patch_embedding.weight.detach().clone()
    with_patch = clip_training_step(model, optimizer, pixels, ids, mask, patch_head=head, patch_targets=targets)
    assert not torch.equal(head.weight, head_before)
    assert not torch.equal(model.vision_model.embeddings.patch_embedding.weight, patch_before)
    # The reported loss includes the patch term: ~log(49) on top of the contrastive loss at initialisation.
    without = clip_training_step(model, optimizer, pixels, ids, mask)
    assert with_patch - without > 0.5 * math.log(len(CLASS_NAMES) + 1)


def test_save_then_load_round_trip(processor, tmp_path):
    from transformers import CLIPModel

    torch.manual_seed(0)
    model = CLIPModel(build_world_clip_config(processor.tokenizer, TINY)).eval()
    save_world_clip(model, processor, tmp_path / "clip", record={"note": "test"})
    loaded, loaded_processor = load_world_clip(tmp_path / "clip")
    assert next(loaded.parameters()).dtype == torch.float32
    assert (tmp_path / "clip" / "training.json").exists()
    classifier = zero_shot_classifier(loaded, loaded_processor, CLASS_NAMES)
    reference = zero_shot_classifier(model.half().float(), processor, CLASS_NAMES)
    assert classifier.shape == (len(CLASS_NAMES), TINY.projection_dim)
    torch.testing.assert_close(classifier.norm(dim=-1), torch.ones(len(CLASS_NAMES)))
    torch.testing.assert_close(classifier, reference, atol=2e-3, rtol=0)
    with pytest.raises(FileNotFoundError, match="adpo world build"):
        load_world_clip(tmp_path / "missing")


def test_shipped_weights_load():
    if not (WEIGHTS_DIR / "config.json").exists():
        pytest.fail(f"shipped WorldCLIP weights are missing from {WEIGHTS_DIR}; run `adpo world build`")
    model, processor = load_world_clip()
    assert next(model.parameters()).dtype == torch.float32 and not model.training
    assert model.config.vision_config.image_size == 64
    classifier = zero_shot_classifier(model, processor, CLASS_NAMES)
    assert classifier.shape == (len(CLASS_NAMES), model.config.projection_dim)
    assert torch.allclose(classifier.norm(dim=1), torch.ones(len(CLASS_NAMES)), atol=1e-5)
    # row c is class c's prompt, and no two classes' prompts collapse onto one direction
    last = len(CLASS_NAMES) - 1
    assert torch.allclose(zero_shot_classifier(model, processor, [CLASS_NAMES[last]])[0], classifier[last], atol=1e-5)
    similarity = classifier @ classifier.T - 2 * torch.eye(len(CLASS_NAMES))
    assert similarity.max() < 0.99
    size_mb = sum(p.stat().st_size for p in WEIGHTS_DIR.iterdir()) / 2**20
    assert size_mb < 20


def test_shipped_weights_follow_the_default_recipe():
    """`adpo world build` trains with the default config: the shipped record must be that config (where and how
    fast it ran aside), else a rebuild would not reproduce the shipped tower."""
    import json
    from dataclasses import asdict

    recorded = json.loads((WEIGHTS_DIR / "training.json").read_text())["training"]
    runtime_only = {"device", "threads", "best_val_dir"}
    default = {k: v for k, v in asdict(WorldClipTrainingConfig()).items() if k not in runtime_only}
    assert {k: recorded.get(k) for k in default} == default


@pytest.mark.parametrize("extra_train_seeds", [[1, 3], [1, 2, 1]])
def test_train_seeds_must_not_repeat(tmp_path, extra_train_seeds):
    config = WorldClipTrainingConfig(data_seed=3, extra_train_seeds=extra_train_seeds)
    with pytest.raises(ValueError, match="name a seed twice"):
        train_world_clip(tmp_path / "clip", config=config, progress=False)
    assert not (tmp_path / "clip").exists()


@pytest.mark.world
def test_shipped_weights_zero_shot_accuracy(tmp_path, monkeypatch):
    from adpo.world.data import load_world_dataset

    monkeypatch.setenv("ADPO_CACHE", str(tmp_path))
    model, processor = load_world_clip()
    accuracy = zero_shot_accuracy(model, processor, load_world_dataset("test", n=64, progress=False))
    assert accuracy >= 0.85
