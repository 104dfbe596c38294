"""MMCoA on a tiny random CLIP: both towers train (or only the image tower), what is written, LoRA, resume, and the
saved tower grafted into the world's large LVLM."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from transformers import CLIPModel, CLIPVisionModel, TrainerCallback

from adpo.errors import UsageError
from adpo.encoder_io import canonical_encoder_state
from adpo.world.clip import WorldClipSize, build_world_clip_config, build_world_processor, build_world_tokenizer
from trainers import mmcoa

CLASSES = ["red circle", "blue square", "green star"]
TINY = WorldClipSize(vision_hidden=32, vision_layers=2, vision_heads=4, vision_intermediate=64, text_hidden=32,
                     text_layers=1, text_heads=4, text_intermediate=64, projection_dim=16)


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("mmcoa")
    torch.manual_seed(0)
    CLIPModel(build_world_clip_config(build_world_tokenizer(), TINY)).save_pretrained(root / "clip")
    build_world_processor().save_pretrained(root / "clip")
    rng = np.random.default_rng(0)
    for label, name in enumerate(CLASSES):
        (root / "images" / name).mkdir(parents=True)
        for i in range(4):
            array = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
            array[16:32, 16:32] = 60 * (label + 1)
            Image.fromarray(array).save(root / "images" / name / f"{i}.png")
    return root


def _config(assets, out: Path, **overrides) -> mmcoa.MmcoaConfig:
    options = dict(
        model_name_or_path=str(assets / "clip"), dataset=str(assets / "images"), output_dir=str(out),
        per_device_train_batch_size=4, max_steps=2, attack_steps=2, attack_eps="8/255", attack_step_size="4/255",
        text_max_substitutions=2, text_shortlist=8, learning_rate=1e-3, warmup_steps=0, save_strategy="no",
        logging_steps=1, use_cpu=True, disable_tqdm=True, seed=0,
    )
    options.update(overrides)
    return mmcoa.MmcoaConfig(**options)


def _clip_weights(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path / "model.safetensors"))


def _changed(before: dict, after: dict, prefix: str) -> set[str]:
    return {k for k in before if k.startswith(prefix) and not torch.equal(before[k], after[k])}


def _train(config) -> mmcoa.MmcoaTrainer:
    trainer = mmcoa.build_trainer(config)
    trainer.train()
    trainer.save_model()
    return trainer


def test_both_towers_change_and_the_run_writes_the_encoder_and_the_whole_clip(assets, tmp_path):
    _train(_config(assets, tmp_path / "run"))
    original, trained = _clip_weights(assets / "clip"), _clip_weights(tmp_path / "run" / "clip")
    assert _changed(original, trained, "vision_model."), "the image tower did not train"
    assert _changed(original, trained, "text_model."), "the text tower did not train"
    assert torch.equal(original["logit_scale"], trained["logit_scale"])  # MMCoA's scale is fixed

    encoder = CLIPVisionModel.from_pretrained(tmp_path / "run" / "encoder")  # the interchange format
    exported = canonical_encoder_state(encoder.state_dict())
    tower = canonical_encoder_state({k: v for k, v in trained.items() if k.startswith("vision_model.")})
    assert set(exported) == set(tower)
    for key, value in exported.items():
        assert torch.equal(value, tower[key]), f"encoder/ differs from clip/'s vision tower at {key}"
    card = json.loads((tmp_path / "run" / "encoder" / "adpo_card.json").read_text())
    assert card["method"] == "mmcoa" and card["towers_trained"] == "image and text"
    assert card["text_attack"]["max_substitutions"] == 2 and card["num_classes"] == 3
    assert CLIPModel.from_pretrained(tmp_path / "run" / "clip") is not None
    declared = json.loads((tmp_path / "run" / "adpo_outputs.json").read_text())
    assert declared == {"encoder": "encoder", "clip": "clip"}  # what adpo run reads


def test_frozen_text_tower_leaves_every_text_weight_bit_identical(assets, tmp_path):
    _train(_config(assets, tmp_path / "run", freeze_text_tower=True))
    original, trained = _clip_weights(assets / "clip"), _clip_weights(tmp_path / "run" / "clip")
    assert _changed(original, trained, "vision_model.")
    assert not _changed(original, trained, "text_model.")
    assert not _changed(original, trained, "text_projection.")
    assert torch.equal(original["logit_scale"], trained["logit_scale"])


def test_lora_trains_adapters_and_exports_merged_towers(assets, tmp_path):
    trainer = _train(_config(assets, tmp_path / "run", lora_rank=4, learning_rate=1e-2))
    trainable = [n for n, p in trainer.model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    original, trained = _clip_weights(assets / "clip"), _clip_weights(tmp_path / "run" / "clip")
    assert set(trained) == set(original)  # merged: no adapter keys in clip/
    assert _changed(original, trained, "vision_model.") and _changed(original, trained, "text_model.")
    assert (tmp_path / "run" / "adapter" / "adapter_model.safetensors").is_file()


class _StopAt(TrainerCallback):
    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        control.should_training_stop = state.global_step >= self.step
        return control


def test_resume_reproduces_the_uninterrupted_run(assets, tmp_path):
    common = dict(max_steps=2, save_strategy="steps", save_steps=1, per_device_train_batch_size=3, attack_steps=1,
                  text_max_substitutions=1)
    _train(_config(assets, tmp_path / "full", **common))
    cut = mmcoa.build_trainer(_config(assets, tmp_path / "cut", **common))
    cut.add_callback(_StopAt(1))
    cut.train()
    resumed = mmcoa.build_trainer(_config(assets, tmp_path / "cut", resume_from_checkpoint="last", **common))
    from trainers.encoder_trainer import train_and_save

    train_and_save(resumed)
    full, cut = _clip_weights(tmp_path / "full" / "clip"), _clip_weights(tmp_path / "cut" / "clip")
    for key in full:
        assert torch.allclose(full[key], cut[key], atol=1e-6), key


@pytest.mark.parametrize("options, message", [
    ({"text_max_substitutions": 0}, "text_max_substitutions=0"),
    ({"text_candidates": "bert"}, "candidates='bert'"),
    ({"model_name_or_path": "world:small"}, "is not a CLIPModel"),
    ({"class_prompt_template": "a photo"}, "needs a {}"),
])
def test_bad_settings_are_refused_before_any_model_loads(assets, tmp_path, options, message):
    with pytest.raises(UsageError, match=message):
        _config(assets, tmp_path / "run", **options)


@pytest.mark.world
def test_world_config_tower_loads_as_clip_vision_model_and_grafts_into_world_large(tmp_path):
    from trl import TrlParser

    from adpo.world import load_world_lvlm
    from transfer.graft import graft_encoder, load_donor
    from transfer.verify import generate_answers, load_samples

    repo = Path(__file__).resolve().parents[1]
    (config,) = TrlParser([mmcoa.MmcoaConfig]).parse_args_and_config([
        "--config", str(repo / "configs" / "mmcoa" / "world.yaml"), "--output_dir", str(tmp_path / "run"),
        "--max_train_samples", "8", "--per_device_train_batch_size", "4", "--max_steps", "1", "--attack_steps", "1",
        "--save_strategy", "no", "--use_cpu", "true",
    ])
    _train(config)
    encoder = CLIPVisionModel.from_pretrained(tmp_path / "run" / "encoder")
    assert encoder.config.image_size == 64
    large, processor = load_world_lvlm("large")
    outcome = graft_encoder(large, processor, load_donor(tmp_path / "run"))
    assert outcome.hashes_before["language_model"] == outcome.hashes_after["language_model"]
    assert outcome.hashes_before != outcome.hashes_after  # the trained tower went in
    answers = generate_answers(large, processor, load_samples("world:test", 4), max_new_tokens=4, batch_size=4)
    assert len(answers) == 4


@pytest.mark.parametrize("name", ["clip-vit-l14-224.yaml", "clip-vit-l14-336.yaml", "world.yaml"])
def test_shipped_configs_parse(name):
    from trl import TrlParser

    configs = Path(__file__).resolve().parents[1] / "configs"
    stand_in = [] if name == "world.yaml" else ["--dataset", str(configs)]  # the hub dataset is not here offline
    (config,) = TrlParser([mmcoa.MmcoaConfig]).parse_args_and_config(
        ["--config", str(configs / "mmcoa" / name), "--use_cpu", "true", *stand_in])
    assert config.text_threat.max_substitutions == 1 and not config.freeze_text_tower
    if name != "world.yaml":
        assert config.threat_model().eps == pytest.approx(2 / 255) and config.learning_rate == pytest.approx(1e-5)
        assert config.per_device_train_batch_size * config.gradient_accumulation_steps == 128
