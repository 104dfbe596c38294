"""adpo train instruct: (adversarial) visual instruction tuning on tiny models."""

from __future__ import annotations

import json

import datasets
import pytest
import torch
from transformers import LlavaForConditionalGeneration

from adpo.errors import UsageError
from adpo.lvlm import LlavaView
from adpo.models import load_lvlm
from adpo.preprocess import to_uint8_images
from adpo.runtime import stage_output
from adpo.testing import launch_two_cpu_processes, random_pixels, tiny_llava
from trainers import instruct

EPS = 4 / 255


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """A tiny LLaVA saved as a llava-hf directory and a saved HF VQA dataset of 8 images with one-word answers."""
    root = tmp_path_factory.mktemp("instruct")
    model, processor = tiny_llava(seed=0)
    model.save_pretrained(root / "lvlm")
    processor.save_pretrained(root / "lvlm")
    words = ["red", "blue", "green", "yellow"]
    images = to_uint8_images(random_pixels(8, seed=3))
    datasets.Dataset.from_dict(
        {"image": images, "question": ["what color is it ?"] * 8, "answers": [[words[i % 4]] * 3 for i in range(8)]},
        features=datasets.Features({"image": datasets.Image(), "question": datasets.Value("string"),
                                    "answers": datasets.Sequence(datasets.Value("string"))}),
    ).save_to_disk(root / "vqa")
    return {"lvlm": str(root / "lvlm"), "vqa": str(root / "vqa")}


def config(assets, tmp_path, *extra: str) -> instruct.InstructConfig:
    (parsed,) = instruct.parse_config([instruct.InstructConfig], [
        "--model_name_or_path", assets["lvlm"], "--dataset", assets["vqa"], "--output_dir", str(tmp_path / "run"),
        "--per_device_train_batch_size", "4", "--max_steps", "2", "--learning_rate", "0.05", "--warmup_steps", "0",
        "--save_strategy", "no", "--use_cpu", "true", "--disable_tqdm", "true", "--report_to", "none",
        "--attack_steps", "2", "--attack_eps", "4/255", *extra])
    return parsed


def test_adversarial_steps_train_on_images_inside_the_ball_that_differ_from_the_clean_ones(assets, tmp_path, monkeypatch):
    seen = []
    attacked = []
    real_pgd = instruct.pgd

    def recording_pgd(objective, x, threat, steps, **kwargs):
        result = real_pgd(objective, x, threat, steps, **kwargs)
        attacked.append(x.clone())
        return result

    real_forward = instruct.InstructModel.forward

    def recording_forward(self, pixel_values, *args):
        seen.append(pixel_values.detach().clone())
        return real_forward(self, pixel_values, *args)

    monkeypatch.setattr(instruct, "pgd", recording_pgd)
    monkeypatch.setattr(instruct.InstructModel, "forward", recording_forward)
    trainer = instruct.build_trainer(config(assets, tmp_path, "--adversarial", "true"))
    trainer.train()
    assert len(attacked) == len(seen) == 2  # one attack per step, and the update saw its output
    for clean, trained_on in zip(attacked, seen):
        distance = (trained_on - clean).abs().flatten(1).amax(dim=1)
        assert bool((distance <= EPS + 1e-6).all()) and bool((distance > 0).all())
        assert trained_on.min() >= 0 and trained_on.max() <= 1


def _changed(before: dict, model: torch.nn.Module) -> set[str]:
    return {name for name, value in model.state_dict().items() if name in before and not torch.equal(value, before[name])}


@pytest.mark.parametrize("parts, flags", [
    ("projector", []),
    ("projector+lora", ["--lora_r", "4"]),
    ("tower", ["--train_projector", "false", "--train_vision_tower", "true"]),
])
def test_only_the_declared_parts_change(assets, tmp_path, parts, flags):
    trainer = instruct.build_trainer(config(assets, tmp_path, "--adversarial", "true", "--export_model", "false", *flags))
    lvlm = trainer.model.lvlm
    before = {name: value.detach().clone() for name, value in lvlm.state_dict().items()}
    instruct.train_and_save(trainer)
    changed = _changed(before, lvlm)
    projector = {n for n in changed if ".multi_modal_projector." in n}
    lora = {n for n in changed if "lora_" in n}
    tower = {n for n in changed if ".vision_tower." in n}
    assert changed == projector | lora | tower  # the LM's own weights, embeddings and LM head are bit-identical
    assert bool(projector) == ("projector" in parts)
    assert bool(lora) == ("lora" in parts)
    assert bool(tower) == ("tower" in parts)
    if parts == "tower":  # layers past the feature layer (-2) get no gradient and stay put
        assert not any(".encoder.layers.2." in n or "post_layernorm" in n for n in tower)
    saved = instruct.load_file(tmp_path / "run" / instruct.TRAINABLE_FILE)
    assert set(saved) == set(trainer.trainable)  # the run holds only what trains
    assert all(name in dict(lvlm.named_parameters()) for name in saved)


def test_export_reloads_as_llava_and_gives_the_same_outputs(assets, tmp_path):
    trainer = instruct.build_trainer(config(assets, tmp_path, "--lora_r", "4", "--save_strategy", "steps",
                                            "--save_steps", "1"))
    trainer.train()
    trainer.save_model()
    exported = tmp_path / "run" / instruct.EXPORT_DIRNAME
    assert stage_output(tmp_path / "run", "model") == exported  # declared where adpo run reads it
    reloaded, processor = load_lvlm(str(exported))
    assert type(reloaded) is LlavaForConditionalGeneration
    assert not any("lora" in name for name in reloaded.state_dict())  # merged
    live = trainer.model.lvlm.eval()
    view = LlavaView(live, processor)
    encoded = view.encode(["what color is it ?"] * 2, ["red", "blue"])
    x = random_pixels(2, seed=5)
    with torch.no_grad():
        ours = live(input_ids=encoded.input_ids, attention_mask=encoded.attention_mask, pixel_values=view.tower.normalize(x)).logits
        theirs = reloaded(input_ids=encoded.input_ids, attention_mask=encoded.attention_mask, pixel_values=view.tower.normalize(x)).logits
    assert torch.allclose(ours, theirs, atol=1e-5)
    # the export subcommand writes the same model from the last checkpoint
    assert instruct.main(["export", str(tmp_path / "run" / "checkpoint-2"), "--out", str(tmp_path / "from-checkpoint")]) == 0
    again, _ = load_lvlm(str(tmp_path / "from-checkpoint"))
    for name, value in reloaded.state_dict().items():
        assert torch.equal(value, again.state_dict()[name]), name


def test_resume_ends_with_the_weights_of_an_uninterrupted_run(assets, tmp_path):
    flags = ["--adversarial", "true", "--lora_r", "4", "--max_steps", "3", "--save_strategy", "steps", "--save_steps", "2",
             "--export_model", "false"]
    full = instruct.build_trainer(config(assets, tmp_path / "full", *flags))
    instruct.train_and_save(full)
    instruct.train_and_save(instruct.build_trainer(config(
        assets, tmp_path, *flags, "--output_dir", str(tmp_path / "resumed"),
        "--resume_from_checkpoint", str(tmp_path / "full" / "run" / "checkpoint-2"))))
    one, two = instruct.load_file(tmp_path / "full" / "run" / instruct.TRAINABLE_FILE), instruct.load_file(tmp_path / "resumed" / instruct.TRAINABLE_FILE)
    for name, value in one.items():
        assert torch.allclose(value, two[name], atol=1e-6), name


@pytest.mark.parametrize("flags, message", [
    (["--train_projector", "false"], "nothing to train"),
    (["--attack_eps", "300/255"], "attack_eps="),
    (["--attack_steps", "0"], "attack_steps"),
    (["--vision_backbone", "./no/such/dir"], "vision_backbone"),
])
def test_bad_configs_are_refused_before_any_model_loads(assets, tmp_path, flags, message):
    with pytest.raises(UsageError, match=message):
        config(assets, tmp_path, *flags)


def test_the_data_defaults_to_a_plugin_models_own_and_is_required_otherwise(assets, tmp_path):
    argv = ["--output_dir", str(tmp_path / "run"), "--use_cpu", "true", "--report_to", "none"]
    (world,) = instruct.parse_config([instruct.InstructConfig], ["--model_name_or_path", "world:small", *argv])
    assert world.dataset == "world"
    with pytest.raises(UsageError, match="dataset is required: a saved HF dataset or hub id with question_column"):
        instruct.parse_config([instruct.InstructConfig], ["--model_name_or_path", assets["lvlm"], *argv])


def test_a_source_without_questions_is_refused(assets, tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    to_uint8_images(random_pixels(1))[0].save(folder / "a.png")
    with pytest.raises(UsageError, match="holds no questions"):
        instruct.load_examples(config(assets, tmp_path, "--dataset", str(folder)))


def test_world_examples_cover_each_images_questions_and_reference_answers():
    assert instruct.reference_answer(["two", "2", "two"]) == "two"
    examples = instruct.InstructExamples(instruct.open_source("world", split="val", n=3), questions_per_image=2)
    assert len(examples) == 6 and [i for i, _ in examples.index] == [0, 0, 1, 1, 2, 2]
    example = examples[0]
    assert example["question"].endswith("?") and example["answer"]


@pytest.mark.distributed
def test_two_process_gloo_run_equals_one_process_with_the_global_batch(assets, tmp_path):
    path = tmp_path / "instruct.yaml"
    # Deterministic on purpose: no random start, an l2 attack and SGD; every answer has the same number of tokens,
    # so the mean of the two processes' token means is the global token mean.
    path.write_text(
        f"model_name_or_path: {assets['lvlm']}\ndataset: {assets['vqa']}\noutput_dir: {tmp_path / 'ddp'}\n"
        "per_device_train_batch_size: 2\nmax_steps: 2\noptim: sgd\nlearning_rate: 0.05\nwarmup_steps: 0\n"
        "lora_r: 4\nlora_dropout: 0\nadversarial: true\nattack_norm: l2\nattack_eps: '0.5'\nattack_step_size: '0.25'\n"
        "attack_steps: 2\nattack_random_start: false\nsave_strategy: 'no'\ndisable_tqdm: true\nreport_to: none\n"
        "export_model: false\n"
    )
    result = launch_two_cpu_processes("trainers.instruct", path, cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    card = json.loads((tmp_path / "ddp" / instruct.CARD_FILE).read_text())
    assert card["optimizer_steps"] == 2 and card["effective_batch_size"] == 4  # two processes really ran
    assert instruct.main(["--config", str(path), "--per_device_train_batch_size", "4",
                          "--output_dir", str(tmp_path / "one"), "--use_cpu", "true"]) == 0
    ddp = instruct.load_file(tmp_path / "ddp" / instruct.TRAINABLE_FILE)
    one = instruct.load_file(tmp_path / "one" / instruct.TRAINABLE_FILE)
    assert any(name.endswith("lora_B.default.weight") and bool(value.abs().sum() > 0) for name, value in ddp.items())
    for name, value in one.items():
        assert torch.allclose(ddp[name], value, atol=1e-6), f"{name}: DDP run differs from the single-process run"


@pytest.mark.parametrize("name", ["world", "world-adversarial", "world-robust-vit", "llava-1.5-7b-lora-eps2",
                                  "llava-1.5-7b-lora-eps4"])
def test_shipped_configs_parse(name, tmp_path):
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "configs" / "instruct" / f"{name}.yaml"
    (parsed,) = instruct.parse_config([instruct.InstructConfig], [
        "--config", str(path), "--dataset", "world", "--output_dir", str(tmp_path)])
    assert parsed.train_projector and parsed.lora_r > 0
    if name.startswith("llava"):
        assert parsed.adversarial and parsed.threat_model().eps == pytest.approx(int(name[-1]) / 255)


def test_an_encoder_is_put_into_the_tower_before_training(assets, tmp_path):
    from adpo.encoder_io import canonical_encoder_state, export_encoder, save_encoder
    from adpo.tower import find_vision_tower

    other, processor = tiny_llava(seed=7)
    save_encoder(export_encoder(other), tmp_path / "fare" / "encoder", processor)
    trainer = instruct.build_trainer(config(assets, tmp_path, "--encoder", str(tmp_path / "fare")))
    tower = canonical_encoder_state(find_vision_tower(trainer.model.lvlm).state_dict())
    for name, value in canonical_encoder_state(find_vision_tower(other).state_dict()).items():
        assert torch.equal(tower[name], value), name
    assert json.loads(json.dumps(trainer.args.recipe()))["encoder"] == str(tmp_path / "fare")


@pytest.mark.world
@pytest.mark.slow
def test_world_adversarial_config_trains_and_exports_a_model_the_evaluation_loads(tmp_path):
    from pathlib import Path

    from adpo.eval.cli import main as eval_main

    config_path = Path(__file__).resolve().parents[1] / "configs" / "instruct" / "world-adversarial.yaml"
    assert instruct.main(["--config", str(config_path), "--output_dir", str(tmp_path / "run"), "--max_train_samples", "8",
                          "--per_device_train_batch_size", "4", "--max_steps", "2", "--attack_steps", "1",
                          "--report_to", "none", "--disable_tqdm", "true"]) == 0
    card = json.loads((tmp_path / "run" / instruct.CARD_FILE).read_text())
    assert card["threat_model"].startswith("linf") and card["optimizer_steps"] == 2
    assert eval_main(["--model", str(tmp_path / "run" / "model"), "--task", "vqa", "--num_samples", "2", "--attack_eps", "world",
                      "--attack_steps", "1", "--output_dir", str(tmp_path / "eval")]) == 0
