"""ΔCLIP on a tiny CLIP with the world's captions: from scratch or from a checkpoint, what changes, what is written."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import CLIPModel, CLIPVisionModel

from adpo.errors import UsageError
from adpo.world.clip import WorldClipSize, build_world_clip_config, build_world_processor, build_world_tokenizer
from trainers import deltaclip

TINY = WorldClipSize(vision_hidden=32, vision_layers=2, vision_heads=4, vision_intermediate=64, text_hidden=32,
                     text_layers=1, text_heads=4, text_intermediate=64, projection_dim=16)


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("deltaclip")
    torch.manual_seed(123)  # not the runs' seed: a fresh initialisation with seed 0 must differ from these weights
    CLIPModel(build_world_clip_config(build_world_tokenizer(), TINY)).save_pretrained(root)
    build_world_processor().save_pretrained(root)
    return root


def _config(clip_dir, out: Path, **overrides) -> deltaclip.DeltaClipConfig:
    options = dict(
        model_name_or_path=str(clip_dir), dataset="world", max_train_samples=8, output_dir=str(out),
        per_device_train_batch_size=4, max_steps=2, attack_steps=2, attack_eps="8/255", attack_step_size="4/255",
        text_max_substitutions=1, text_shortlist=8, class_prompt_probability=0.5, clean_loss_weight=1.0,
        learning_rate=1e-3, warmup_steps=0, save_strategy="no", logging_steps=1, use_cpu=True, disable_tqdm=True,
        seed=0, text_protected_words=["red", "green", "blue", "circle", "square"],
    )
    options.update(overrides)
    return deltaclip.DeltaClipConfig(**options)


def _changed(before: dict, after: dict, prefix: str) -> set[str]:
    return {k for k in before if k.startswith(prefix) and not torch.equal(before[k], after[k])}


@pytest.mark.parametrize("from_scratch", [False, True])
def test_both_towers_and_the_temperature_train_and_the_run_writes_encoder_and_clip(clip_dir, tmp_path, from_scratch):
    config = _config(clip_dir, tmp_path / "run", from_scratch=from_scratch)
    trainer = deltaclip.build_trainer(config)
    start = {k: v.detach().clone() for k, v in trainer.model.base.state_dict().items()}
    checkpoint = load_file(str(clip_dir / "model.safetensors"))
    differs_from_checkpoint = _changed(checkpoint, start, "vision_model.")
    assert bool(differs_from_checkpoint) == from_scratch  # from scratch: a fresh initialisation, not the weights
    trainer.train()
    trainer.save_model()
    trained = load_file(str(tmp_path / "run" / "clip" / "model.safetensors"))
    assert _changed(start, trained, "vision_model.") and _changed(start, trained, "text_model.")
    assert not torch.equal(start["logit_scale"], trained["logit_scale"])  # the temperature is learned
    assert float(trained["logit_scale"]) <= math.log(100) + 1e-6
    encoder = CLIPVisionModel.from_pretrained(tmp_path / "run" / "encoder")
    assert encoder.config.image_size == 64
    card = json.loads((tmp_path / "run" / "encoder" / "adpo_card.json").read_text())
    assert card["method"] == "deltaclip" and card["from_scratch"] is from_scratch
    assert card["text_attack"]["protected_words"][:2] == ["red", "green"]


def test_captions_and_class_prompts_are_drawn_per_image():
    from adpo.sources import ImageRecord

    collator = deltaclip.CaptionCollator(build_world_processor().image_processor, build_world_tokenizer(), seed=0,
                                         class_names=["red circle"], class_prompt_probability=0.5)
    record = ImageRecord("x", None, label=0, captions=["a red circle on a plain background"])
    texts = {collator.text_of(record) for _ in range(40)}
    assert texts == {"a photo of a red circle", "a red circle on a plain background"}


@pytest.mark.parametrize("options, message", [
    ({"class_prompt_probability": 1.5}, "class_prompt_probability=1.5"),
    ({"clean_loss_weight": -1.0}, "clean_loss_weight=-1.0"),
    ({"dataset": "world:train@1,1"}, "name each seed once"),
    ({"dataset": "world:tain@0-3"}, "no split 'tain'"),
    ({"text_beam_width": 0}, "text_beam_width=0"),
])
def test_bad_settings_are_refused_before_any_model_loads(clip_dir, tmp_path, options, message):
    with pytest.raises(UsageError, match=message):
        _config(clip_dir, tmp_path / "run", **options)


@pytest.mark.parametrize("name", ["world.yaml", "world-gpu.yaml", "clip-vit-l14-336.yaml"])
def test_shipped_configs_parse(name):
    from trl import TrlParser

    configs = Path(__file__).resolve().parents[1] / "configs"
    stand_in = [] if name.startswith("world") else ["--dataset", str(configs)]  # COCO is not here offline
    (config,) = TrlParser([deltaclip.DeltaClipConfig]).parse_args_and_config(
        ["--config", str(configs / "deltaclip" / name), "--use_cpu", "true", *stand_in])
    assert config.from_scratch is (name == "world-gpu.yaml") and config.text_threat.max_substitutions == 1
    if name.startswith("world"):
        assert "red" in config.text_protected_words
    else:
        assert config.threat_model().eps == pytest.approx(2 / 255) and config.learning_rate == pytest.approx(1e-5)
        assert config.per_device_train_batch_size * config.gradient_accumulation_steps == 128
