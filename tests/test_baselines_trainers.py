"""FARE, TeCoA and Sim-CLIP trainers on tiny random models: what changes, what is written, resume."""

from __future__ import annotations

import copy
import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from transformers import CLIPModel, CLIPVisionModel, TrainerCallback

from adpo.encoder_io import canonical_encoder_state
from adpo.runtime import resume_checkpoint
from adpo.testing import launch_two_cpu_processes, tiny_image_processor, tiny_llava, tiny_vision_config
from adpo.threat import parse_eps
from adpo.world.clip import WorldClipSize, build_world_clip_config, build_world_processor, build_world_tokenizer
from trainers import fare, simclip, tecoa

CLASSES = ["red circle", "blue square", "green star"]


def _write_images(root: Path, size: int, per_class: int = 4) -> Path:
    rng = np.random.default_rng(0)
    for label, name in enumerate(CLASSES):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            array = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
            array[size // 4 : size // 2, size // 4 : size // 2] = 60 * (label + 1)
            Image.fromarray(array).save(root / name / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("baselines")
    torch.manual_seed(0)
    vision = CLIPVisionModel(tiny_vision_config())
    vision.save_pretrained(root / "vision")
    tiny_image_processor().save_pretrained(root / "vision")

    tokenizer = build_world_tokenizer()
    size = WorldClipSize(vision_hidden=32, vision_layers=2, vision_heads=4, vision_intermediate=64, text_hidden=32,
                         text_layers=1, text_heads=4, text_intermediate=64, projection_dim=16)
    clip = CLIPModel(build_world_clip_config(tokenizer, size))
    clip.save_pretrained(root / "clip")
    build_world_processor().save_pretrained(root / "clip")

    llava, processor = tiny_llava(seed=1)
    llava.save_pretrained(root / "llava")
    processor.save_pretrained(root / "llava")
    return {
        "root": root,
        "vision": root / "vision",
        "clip": root / "clip",
        "llava": root / "llava",
        "images32": _write_images(root / "images32", 32),
        "images64": _write_images(root / "images64", 64),
    }


def _config(cls, assets, out: Path, model: str, images: str, **overrides):
    options = dict(
        model_name_or_path=str(assets[model]), dataset=str(assets[images]), output_dir=str(out),
        per_device_train_batch_size=4, max_steps=2, attack_steps=2, attack_eps="8/255", attack_step_size="4/255",
        learning_rate=1e-3, warmup_steps=0, save_strategy="no", logging_steps=1, use_cpu=True,
        disable_tqdm=True, seed=0,
    )
    options.update(overrides)
    return cls(**options)


def _weights(path: Path) -> dict[str, torch.Tensor]:
    """An encoder's weights: a CLIP model directory, or a run / checkpoint directory holding encoder/."""
    if (path / "encoder").is_dir():
        path = path / "encoder"
    return canonical_encoder_state(load_file(str(path / "model.safetensors")))


def _changed(before: dict, after: dict) -> set[str]:
    return {k for k in before if not torch.equal(before[k], after[k])}


def test_fare_on_a_standalone_encoder_changes_only_the_encoder_and_writes_the_interchange_format(assets, tmp_path):
    trainer = fare.build_trainer(_config(fare.FareConfig, assets, tmp_path / "run", "vision", "images32"))
    trainable = {id(p) for p in trainer.model.encoder.parameters() if p.requires_grad}
    optimised = {id(p) for group in trainer.create_optimizer().param_groups for p in group["params"]}
    assert optimised == trainable and trainable
    trainer.train()
    trainer.save_model()

    out = tmp_path / "run" / "encoder"
    assert json.loads((tmp_path / "run" / "adpo_outputs.json").read_text()) == {"encoder": "encoder"}  # declared
    reloaded = CLIPVisionModel.from_pretrained(out)  # the interchange format: a CLIPVisionModel directory
    assert isinstance(reloaded, CLIPVisionModel)
    assert (out / "preprocessor_config.json").exists()
    card = json.loads((out / "adpo_card.json").read_text())
    assert card["method"] == "fare" and card["embedding"] == "pooled"
    assert card["eps"] == pytest.approx(8 / 255) and card["attack"]["steps"] == 2
    assert card["optimizer_steps"] == 2 and card["base_kind"] == "clip_vision_model"
    changed = _changed(_weights(assets["vision"]), _weights(out))
    assert changed, "training did not move the encoder"
    # the frozen reference is still the original encoder
    original = _weights(assets["vision"])
    assert all(torch.equal(v, original["vision_model." + k] if "vision_model." + k in original else original[k])
               for k, v in canonical_encoder_state(trainer.original.encoder.state_dict()).items())


def test_tower_inside_an_lvlm_trains_to_the_same_format_and_unreachable_parameters_stay(assets, tmp_path):
    config = _config(fare.FareConfig, assets, tmp_path / "run", "llava", "images32", embedding="llm")
    trainer = fare.build_trainer(config)
    trainer.train()
    trainer.save_model()
    card = json.loads((tmp_path / "run" / "encoder" / "adpo_card.json").read_text())
    assert card["base_kind"] == "lvlm" and card["feature_layer"] == -2 and card["select_strategy"] == "default"

    from transformers import LlavaForConditionalGeneration

    original = canonical_encoder_state(LlavaForConditionalGeneration.from_pretrained(assets["llava"]).state_dict())
    trained = _weights(tmp_path / "run")
    assert set(original) == set(trained)
    changed = _changed(original, trained)
    assert changed
    # layer -2 features never see the last block or the post-layernorm: those must not move
    last = tiny_vision_config().num_hidden_layers - 1
    assert not any(k.startswith(("post_layernorm", f"encoder.layers.{last}.")) for k in changed)


def test_fare_with_zero_radius_has_zero_first_loss_and_an_attack_raises_it(assets, tmp_path):
    losses = {}
    for eps in ("0", "8/255"):
        trainer = fare.build_trainer(
            _config(fare.FareConfig, assets, tmp_path / eps.replace("/", "_"), "vision", "images32", max_steps=1)
        )
        # a config refuses eps 0 (no attack is not adversarial training): the trainer's threat model is set directly
        trainer.threat = dataclasses.replace(trainer.threat, eps=parse_eps(eps))
        batch = next(iter(trainer.get_train_dataloader()))
        losses[eps] = float(trainer.compute_loss(trainer.model, batch).detach())
    # at step 0 phi_theta = phi_orig, so only the perturbation can make the FARE loss positive
    assert losses["0"] == pytest.approx(0.0, abs=1e-8)
    assert losses["8/255"] > 1e-4


class _StopAt(TrainerCallback):
    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= self.step:
            control.should_training_stop = True
        return control


def test_resume_equals_uninterrupted(assets, tmp_path):
    # the machinery is shared by the three methods; FARE exercises it (frozen reference + attack seeding)
    module, config_class = fare, fare.FareConfig
    common = dict(max_steps=4, save_strategy="steps", save_steps=2, per_device_train_batch_size=3)
    straight = module.build_trainer(_config(config_class, assets, tmp_path / "straight", "vision", "images32", **common))
    straight.train()

    interrupted = module.build_trainer(_config(config_class, assets, tmp_path / "resumed", "vision", "images32", **common))
    interrupted.add_callback(_StopAt(2))
    interrupted.train()
    assert (tmp_path / "resumed" / "checkpoint-2" / "encoder" / "adpo_card.json").exists()
    assert interrupted.state.global_step == 2

    resumed = module.build_trainer(
        _config(config_class, assets, tmp_path / "resumed", "vision", "images32", resume_from_checkpoint="last", **common)
    )
    from trainers.encoder_trainer import train_and_save

    train_and_save(resumed)
    assert resumed.state.global_step == 4
    a = straight.model.encoder.state_dict()
    b = resumed.model.encoder.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a), "resumed weights differ from the uninterrupted run"
    assert _changed(_weights(tmp_path / "resumed" / "checkpoint-2"), _weights(tmp_path / "resumed"))


def test_tecoa_trains_the_encoder_against_frozen_class_prompts(assets, tmp_path):
    config = _config(tecoa.TecoaConfig, assets, tmp_path / "run", "clip", "images64")
    trainer = tecoa.build_trainer(config)
    assert trainer.class_names == sorted(CLASSES)  # from the class sub-folders
    assert trainer.class_embeddings.shape == (3, 16)
    head_before = trainer.model.head.weight.detach().clone()
    batch = next(iter(trainer.get_train_dataloader()))
    assert batch["labels"].tolist() and set(batch["labels"].tolist()) <= {0, 1, 2}
    trainer.train()
    trainer.save_model()
    assert torch.equal(trainer.model.head.weight, head_before)  # the visual projection is frozen
    card = json.loads((tmp_path / "run" / "encoder" / "adpo_card.json").read_text())
    assert card["method"] == "tecoa" and card["num_classes"] == 3
    assert card["class_prompt_template"] == "This is a photo of a {}"
    clip = CLIPModel.from_pretrained(assets["clip"])
    original = canonical_encoder_state(clip.vision_model.state_dict())
    assert _changed(original, _weights(tmp_path / "run"))


def test_tecoa_warns_only_when_the_text_towers_clip_weights_really_differ(assets, caplog):
    import logging
    from types import SimpleNamespace

    clip = CLIPModel.from_pretrained(assets["clip"])
    # an LVLM stored in fp16 holds the CLIP tower rounded to fp16, loaded in fp16 or cast to fp32
    for dtype in (torch.float16, torch.float32):
        rounded = copy.deepcopy(clip.vision_model).half().to(dtype)
        with caplog.at_level(logging.WARNING, logger="trainers.tecoa"):
            tecoa._warn_if_different_vision_weights(clip, SimpleNamespace(encoder=rounded))
        assert not caplog.records, f"false warning for an fp16-rounded tower loaded in {dtype}"
    other = copy.deepcopy(clip.vision_model)
    with torch.no_grad():
        other.embeddings.patch_embedding.weight.add_(1e-2)
    with caplog.at_level(logging.WARNING, logger="trainers.tecoa"):
        tecoa._warn_if_different_vision_weights(clip, SimpleNamespace(encoder=other))
    assert "differ" in caplog.text


def test_tecoa_attack_raises_the_cross_entropy(assets, tmp_path):
    trainer = tecoa.build_trainer(_config(tecoa.TecoaConfig, assets, tmp_path / "run", "clip", "images64",
                                          attack_steps=5, attack_eps="16/255"))
    batch = next(iter(trainer.get_train_dataloader()))
    module = trainer.model
    context = trainer.prepare_batch(module, batch)
    objective = trainer.attack_objective(module, batch, context)
    x_adv = trainer.attack(module, batch, context).x_adv
    with torch.no_grad():
        assert objective(x_adv).mean() > objective(batch["pixel_values"]).mean()
    assert bool(trainer.threat.contains(x_adv, batch["pixel_values"]).all())


def test_tecoa_refuses_an_encoder_without_text_tower_and_token_features(assets, tmp_path):
    with pytest.raises(ValueError, match="text_model_name_or_path"):
        tecoa.build_trainer(_config(tecoa.TecoaConfig, assets, tmp_path / "run", "vision", "images32"))
    with pytest.raises(ValueError, match="embedding: pooled"):
        _config(tecoa.TecoaConfig, assets, tmp_path / "run", "clip", "images64", embedding="llm")


def test_simclip_trains_and_records_its_method(assets, tmp_path):
    trainer = simclip.build_trainer(_config(simclip.SimClipConfig, assets, tmp_path / "run", "vision", "images32"))
    trainer.train()
    trainer.save_model()
    card = json.loads((tmp_path / "run" / "encoder" / "adpo_card.json").read_text())
    assert card["method"] == "simclip"
    assert _changed(_weights(assets["vision"]), _weights(tmp_path / "run"))


def test_main_runs_from_a_yaml_config_with_command_line_overrides(assets, tmp_path):
    config_file = tmp_path / "fare.yaml"
    config_file.write_text(
        f"model_name_or_path: {assets['vision']}\ndataset: {assets['images32']}\noutput_dir: {tmp_path / 'run'}\n"
        "eps: 4/255\nattack_steps: 1\nper_device_train_batch_size: 4\nmax_steps: 1\nsave_strategy: 'no'\n"
        "use_cpu: true\ndisable_tqdm: true\n"
    )
    assert fare.main(["--config", str(config_file), "--attack_steps", "2"]) == 0
    card = json.loads((tmp_path / "run" / "encoder" / "adpo_card.json").read_text())
    assert card["attack"]["steps"] == 2 and card["eps"] == pytest.approx(4 / 255)


def test_resume_from_checkpoint_values(tmp_path):
    for nothing in (None, False, "false", "none"):
        assert resume_checkpoint(nothing, tmp_path) is None
    for newest in (True, "true", "last", "auto"):
        assert resume_checkpoint(newest, tmp_path) is None  # no checkpoint yet: from scratch
    (tmp_path / "checkpoint-3").mkdir()
    (tmp_path / "checkpoint-3" / "trainer_state.json").write_text("{}")
    assert resume_checkpoint("last", tmp_path) == str(tmp_path / "checkpoint-3")
    assert resume_checkpoint("out/checkpoint-2", tmp_path) == "out/checkpoint-2"


@pytest.mark.distributed
def test_two_process_gloo_run_equals_one_process_with_the_global_batch(assets, tmp_path):
    config = tmp_path / "tecoa.yaml"
    # Deterministic on purpose: no random start (TeCoA's cross-entropy has a gradient at the clean image, unlike
    # FARE's distance), an l2 attack and SGD, so no sign step turns round-off between batch sizes into a flip.
    config.write_text(
        f"model_name_or_path: {assets['clip']}\ndataset: {assets['images64']}\noutput_dir: {tmp_path / 'ddp'}\n"
        "per_device_train_batch_size: 2\nmax_steps: 2\noptim: sgd\nlearning_rate: 0.01\nwarmup_steps: 0\n"
        "attack_steps: 2\nnorm: l2\neps: '0.5'\nattack_step_size: '0.25'\nattack_momentum: 0\n"
        "attack_random_start: false\nsave_strategy: 'no'\ndisable_tqdm: true\n"
    )
    result = launch_two_cpu_processes("trainers.tecoa", config, cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    card = json.loads((tmp_path / "ddp" / "encoder" / "adpo_card.json").read_text())
    assert card["optimizer_steps"] == 2 and card["effective_batch_size"] == 4  # two processes really ran

    assert tecoa.main(["--config", str(config), "--per_device_train_batch_size", "4",
                       "--output_dir", str(tmp_path / "one"), "--use_cpu", "true"]) == 0
    ddp, one = _weights(tmp_path / "ddp"), _weights(tmp_path / "one")
    original = canonical_encoder_state(CLIPModel.from_pretrained(assets["clip"]).vision_model.state_dict())
    assert _changed(original, ddp)
    for name, value in one.items():
        assert torch.allclose(ddp[name], value, atol=1e-6), f"{name}: DDP run differs from the single-process run"


@pytest.mark.world
@pytest.mark.parametrize("module, config_class", [(fare, fare.FareConfig), (tecoa, tecoa.TecoaConfig)])
def test_world_configs_train_worldclip(tmp_path, module, config_class):
    from trl import TrlParser

    from adpo.world import CLASS_NAMES

    repo = Path(__file__).resolve().parents[1]
    (config,) = TrlParser([config_class]).parse_args_and_config([
        "--config", str(repo / "configs" / module.__name__.split(".")[-1] / "world.yaml"),
        "--output_dir", str(tmp_path / "run"), "--max_train_samples", "8", "--per_device_train_batch_size", "4",
        "--max_steps", "1", "--attack_steps", "1", "--save_strategy", "no", "--use_cpu", "true",
    ])
    trainer = module.build_trainer(config)
    if module is tecoa:
        assert trainer.class_names == list(CLASS_NAMES)
    trainer.train()
    trainer.save_model()
    card = json.loads((tmp_path / "run" / "encoder" / "adpo_card.json").read_text())
    assert card["base_model"] == "world:clip" and card["optimizer_steps"] == 1
    assert CLIPVisionModel.from_pretrained(tmp_path / "run" / "encoder").config.image_size == 64


def test_resume_last_skips_a_checkpoint_whose_save_was_cut_short(assets, tmp_path, caplog):
    from trainers.encoder_trainer import train_and_save

    common = dict(max_steps=4, save_strategy="steps", save_steps=2, per_device_train_batch_size=3)
    fare.build_trainer(_config(fare.FareConfig, assets, tmp_path / "run", "vision", "images32", **common)).train()
    (tmp_path / "run" / "checkpoint-4" / "encoder" / "model.safetensors").write_bytes(b"")  # killed while saving

    resumed = fare.build_trainer(
        _config(fare.FareConfig, assets, tmp_path / "run", "vision", "images32", resume_from_checkpoint="last", **common)
    )
    chosen = []
    train = resumed.train
    resumed.train = lambda resume_from_checkpoint=None, **kwargs: chosen.append(resume_from_checkpoint) or train(
        resume_from_checkpoint=resume_from_checkpoint, **kwargs)
    with caplog.at_level("WARNING", logger="adpo.runtime"):
        train_and_save(resumed)
    assert chosen == [str(tmp_path / "run" / "checkpoint-2")]
    assert resumed.state.global_step == 4 and "checkpoint-4: incomplete checkpoint" in caplog.text
