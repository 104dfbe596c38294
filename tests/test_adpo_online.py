"""AdPO with online pairs (pair_source: online) on a tiny random LLaVA: what a step trains on, what changes,
resume, identical-pair masking, config refusals and a two-process gloo run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from datasets import Dataset
from transformers import CLIPVisionModel, TrainerCallback

from adpo.lvlm import LlavaView
from adpo.preprocess import to_uint8_images
from adpo.sources import open_source
from adpo.testing import launch_two_cpu_processes, random_pixels, tiny_llava
from adpo.tower import find_vision_tower
from trainers.adpo import AdPOConfig, AdPOTrainer, main, online_images, open_online_images

REPO = Path(__file__).resolve().parents[1]
PROMPTS = ["what is in the image ?", "describe this picture"]


@pytest.fixture
def image_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "images"
    folder.mkdir()
    for i, image in enumerate(to_uint8_images(random_pixels(8, 32, seed=3))):
        image.save(folder / f"{i:02d}.png")
    return folder


def online_config(tmp_path: Path, image_folder: Path, **overrides) -> AdPOConfig:
    settings = dict(
        output_dir=str(tmp_path / "run"), per_device_train_batch_size=3, max_steps=2, learning_rate=1e-3,
        bf16=False, gradient_checkpointing=False, logging_steps=1, report_to=[], save_strategy="no",
        use_cpu=True, seed=0, dataloader_num_workers=0, pair_source="online", image_source=str(image_folder),
        prompts=PROMPTS, attack_eps="8/255", attack_steps=3, max_new_tokens=5,
    )
    settings.update(overrides)
    return AdPOConfig(**settings)


def online_trainer(config: AdPOConfig, model=None, processor=None) -> AdPOTrainer:
    if model is None:
        model, processor = tiny_llava(seed=0)
    return AdPOTrainer(model, config, open_online_images(config), processor)


def first_batch(trainer: AdPOTrainer) -> dict:
    dataset = trainer.train_dataset
    return trainer.data_collator([dataset[i] for i in range(trainer.args.per_device_train_batch_size)])


def tower_state(model) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in find_vision_tower(model).state_dict().items()}


class RecordTower(TrainerCallback):
    """The tower's weights after every optimizer step."""

    def __init__(self, model):
        self.model, self.after_step = model, []

    def on_step_end(self, args, state, control, **kwargs):
        self.after_step.append(tower_state(self.model))


# ----------------------------------------------------------------------------------------------------
def test_a_step_trains_on_the_current_policys_answers_to_x_and_to_its_fresh_x_adv(tmp_path, image_folder):
    config = online_config(tmp_path, image_folder)
    trainer = online_trainer(config)
    model = trainer.accelerator.unwrap_model(trainer.model)
    # Move the tower away from the original, so "the current policy" and "the original model" differ.
    with torch.no_grad():
        for parameter in find_vision_tower(model).parameters():
            if parameter.requires_grad:
                parameter.add_(torch.randn_like(parameter) * 0.05)
    batch = first_batch(trainer)
    trainer.model.train()
    trainer.compute_loss(trainer.model, batch)
    step = trainer.online_pairs

    assert step.prompts == batch["prompts"] and torch.equal(step.clean_pixels, batch["clean_pixels"])
    assert config.threat_model().contains(step.adv_pixels, step.clean_pixels).all()
    assert (step.adv_pixels - step.clean_pixels).abs().max() > 1 / 255
    policy = LlavaView(model, trainer.processor)
    with torch.no_grad():
        assert step.chosen == policy.generate(step.clean_pixels, step.prompts, max_new_tokens=5)
        assert step.rejected == policy.generate(step.adv_pixels, step.prompts, max_new_tokens=5)
    assert step.chosen != step.rejected  # the attack changed answers, so the rows above are not one check twice
    assert model.training  # generation ran in eval mode and gave the training mode back


def test_only_the_tower_trains_and_the_card_records_online_pairs(tmp_path, image_folder):
    config = online_config(tmp_path, image_folder)
    model, processor = tiny_llava(seed=0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    tower = find_vision_tower(model)
    prefix = next(name for name, module in model.named_modules() if module is tower) + "."
    trainer = online_trainer(config, model, processor)
    trainer.train()
    trainer.save_model(config.output_dir)

    after = trainer.accelerator.unwrap_model(trainer.model).state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items() if not k.startswith(prefix))
    changed = [k for k, v in before.items() if k.startswith(prefix) and not torch.equal(after[k], v)]
    assert changed, "two online steps left the tower as it was"
    logged = [entry for entry in trainer.state.log_history if "online/identical_rate" in entry]
    assert len(logged) == 2
    assert all(0 <= e["online/identical_rate"] <= 1 and 0 < e["online/generation_share"] < 1 for e in logged)
    assert all(e["online/changed_rate"] == pytest.approx(1 - e["online/identical_rate"]) for e in logged)
    card = json.loads((Path(config.output_dir) / "encoder" / "adpo_card.json").read_text())
    assert card["pair_source"] == "online" and card["adv_source"] == "online"
    assert card["online_pairs"]["prompts"] == PROMPTS and card["dataset"] == str(image_folder)


def test_resume_with_sampled_answers_equals_an_uninterrupted_run(tmp_path, image_folder):
    def run(output: str, resume: str | None = None) -> dict[str, torch.Tensor]:
        config = online_config(tmp_path, image_folder, output_dir=str(tmp_path / output), max_steps=4,
                               save_strategy="steps", save_steps=2, per_device_train_batch_size=2,
                               do_sample=True, temperature=1.5)
        trainer = online_trainer(config)
        trainer.train(resume_from_checkpoint=resume)
        return trainer.trained_encoder().state_dict()

    uninterrupted = run("full")
    checkpoint = tmp_path / "full" / "checkpoint-2"
    at_step_2 = CLIPVisionModel.from_pretrained(checkpoint / "encoder").state_dict()
    resumed = run("resumed", resume=str(checkpoint))
    for name, value in uninterrupted.items():
        assert torch.equal(resumed[name], value), f"{name} differs after resume"
    assert any(not torch.equal(value, at_step_2[name]) for name, value in uninterrupted.items())


def test_sampling_is_seeded_per_step_and_leaves_the_global_generator_alone(tmp_path, image_folder):
    trainer = online_trainer(online_config(tmp_path, image_folder, do_sample=True, temperature=2.0, max_new_tokens=8))
    pixels = first_batch(trainer)["clean_pixels"]
    state = torch.get_rng_state()
    first = trainer._generate(pixels, PROMPTS[:1] * 3, seed=11)
    assert torch.equal(torch.get_rng_state(), state)
    assert trainer._generate(pixels, PROMPTS[:1] * 3, seed=11) == first
    assert any(trainer._generate(pixels, PROMPTS[:1] * 3, seed=s) != first for s in (12, 13, 14))


def move_away_from_reference(trainer: AdPOTrainer) -> None:
    """Perturb the policy tower by the same seeded noise every time, and put the model in training mode."""
    torch.manual_seed(0)
    with torch.no_grad():
        for parameter in find_vision_tower(trainer.accelerator.unwrap_model(trainer.model)).parameters():
            if parameter.requires_grad:
                parameter.add_(torch.randn_like(parameter) * 0.05)
    trainer.model.train()


def with_identical_rows(trainer: AdPOTrainer, rows_of_call) -> None:
    """Make the rejected answer equal the chosen one in exactly the given rows (``rows_of_call(call) -> rows``)
    and differ from it in the others, keeping the policy's own answers where they already do."""
    generate, calls = trainer._generate, []

    def patched(pixels, prompts, seed):
        answers = generate(pixels, prompts, seed)
        batch = len(prompts) // 2
        identical = rows_of_call(len(calls))
        for row in range(batch):
            if row in identical:
                answers[batch + row] = answers[row]
            elif answers[batch + row] == answers[row]:
                answers[batch + row] = answers[row] + " no"
        calls.append(answers)
        return answers

    trainer._generate = patched


def test_identical_pairs_drop_leaves_them_out_of_pio_but_not_out_of_aio(tmp_path, image_folder):
    def loss_of(identical_pairs: str, identical: list[int], aio_weight: float) -> float:
        # A fresh trainer each time: the same seeds, hence the same x_adv and answers for the same batch.
        trainer = online_trainer(online_config(tmp_path, image_folder, identical_pairs=identical_pairs,
                                               aio_weight=aio_weight))
        with_identical_rows(trainer, lambda call: identical)
        move_away_from_reference(trainer)  # so that each pair's PIO differs from log 2
        return trainer.compute_loss(trainer.model, first_batch(trainer)).item()

    dropped = loss_of("drop", identical=[0], aio_weight=0.0)
    # each distinct row's own PIO: the batch with every other row dropped
    row_1, row_2 = loss_of("drop", identical=[0, 2], aio_weight=0.0), loss_of("drop", identical=[0, 1], aio_weight=0.0)
    assert dropped == pytest.approx((row_1 + row_2) / 2, rel=1e-5)
    assert row_1 != pytest.approx(row_2, rel=1e-3)
    assert abs(loss_of("keep", identical=[0], aio_weight=0.0) - dropped) > 1e-5  # under keep, row 0 counts
    # AIO scores every image, row 0 included: its share of the loss does not depend on which pairs were dropped
    aio_share = loss_of("drop", identical=[0], aio_weight=1.0) - dropped
    assert aio_share == pytest.approx(loss_of("drop", identical=[0, 1], aio_weight=1.0) - row_2, rel=1e-4)
    assert aio_share == pytest.approx(loss_of("keep", identical=[0], aio_weight=1.0)
                                      - loss_of("keep", identical=[0], aio_weight=0.0), rel=1e-4)


def test_the_anchor_adds_mu_times_the_relative_clean_drift_and_trains_the_tower(tmp_path, image_folder):
    def trainer_away_from_reference(anchor_weight: float) -> AdPOTrainer:
        trainer = online_trainer(online_config(tmp_path, image_folder, anchor_weight=anchor_weight))
        move_away_from_reference(trainer)  # so that the clean drift is not zero
        return trainer

    plain, anchored = trainer_away_from_reference(0.0), trainer_away_from_reference(2.5)
    batch = first_batch(anchored)
    with torch.no_grad():
        policy = anchored.view.tower.embed(batch["clean_pixels"], "llm")
        with anchored._reference() as (_, reference_view):
            original = reference_view.embed(batch["clean_pixels"], "llm")
    expected = ((policy - original).pow(2).flatten(1).sum(1) / original.pow(2).flatten(1).sum(1)).mean()
    assert expected > 0
    loss = anchored.compute_loss(anchored.model, batch)
    assert loss.item() - plain.compute_loss(plain.model, first_batch(plain)).item() == pytest.approx(
        2.5 * expected.item(), rel=1e-4)
    assert anchored._metrics["train"]["anchor"][-1] == pytest.approx(expected.item(), rel=1e-4)
    loss.backward()
    tower = find_vision_tower(anchored.accelerator.unwrap_model(anchored.model))
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in tower.parameters())


def test_a_step_where_every_pair_is_identical_and_no_aio_leaves_the_weights_alone(tmp_path, image_folder):
    # Weight decay and AdamW's momentum from step 1 would move the weights on a zero gradient.
    config = online_config(tmp_path, image_folder, identical_pairs="drop", max_steps=2, weight_decay=0.1,
                           aio_weight=0.0)
    trainer = online_trainer(config)
    with_identical_rows(trainer, lambda call: [] if call == 0 else [0, 1, 2])
    recorder = RecordTower(trainer.accelerator.unwrap_model(trainer.model))
    trainer.add_callback(recorder)
    original = tower_state(trainer.accelerator.unwrap_model(trainer.model))
    trainer.train()

    step_1, step_2 = recorder.after_step
    assert any(not torch.equal(step_1[k], original[k]) for k in original)
    assert all(torch.equal(step_2[k], step_1[k]) for k in step_1)
    logged = [entry for entry in trainer.state.log_history if "online/identical_rate" in entry]
    assert logged[1]["online/identical_rate"] == 1.0 and logged[1]["loss"] == 0.0


def test_prompts_come_from_the_set_or_from_the_sources_questions(tmp_path, image_folder):
    rows = online_images(open_source(str(image_folder)), PROMPTS, seed=0)
    assert {rows[i]["prompt"] for i in range(len(rows))} == set(PROMPTS)  # one per image, chosen with the seed
    assert [rows[i]["prompt"] for i in range(len(rows))] == [rows[i]["prompt"] for i in range(len(rows))]

    questions = [f"what color {i} ?" for i in range(4)]
    Dataset.from_dict({"image": to_uint8_images(random_pixels(4, 32, seed=1)), "question": questions}).save_to_disk(
        str(tmp_path / "hf"))
    config = online_config(tmp_path, image_folder, image_source=str(tmp_path / "hf"), prompts=None,
                           use_source_questions=True, question_column="question")
    rows = open_online_images(config)
    assert [rows[i]["prompt"] for i in range(4)] == questions
    no_questions = online_config(tmp_path, image_folder, prompts=None, use_source_questions=True)
    with pytest.raises(ValueError, match="has no questions"):
        open_online_images(no_questions)


def test_the_collator_reads_images_as_the_other_stages_do_and_skips_unreadable_ones(tiny):
    from PIL import Image

    from adpo.preprocess import to_pixels
    from trainers.adpo import OnlineImageCollator

    _, processor = tiny
    wide = Image.new("RGB", (48, 24), (200, 30, 30))
    rows = [{"image": wide, "prompt": "what color ?"},
            {"image": None, "prompt": "what shape ?", "source_id": "7.png", "error": "truncated file"}]
    for pad in (False, True):
        batch = OnlineImageCollator(processor, pad_to_square=pad)(rows)
        assert batch["prompts"] == ["what color ?"]
        assert torch.equal(batch["clean_pixels"], to_pixels([wide], processor, pad_to_square=pad))
    assert not torch.equal(OnlineImageCollator(processor, True)(rows)["clean_pixels"],
                           OnlineImageCollator(processor, False)(rows)["clean_pixels"])
    with pytest.raises(ValueError, match="7.png"):
        OnlineImageCollator(processor)(rows[1:])


def test_bad_online_settings_are_refused_before_any_model_loads(tmp_path, image_folder, monkeypatch):
    def no_model(*args, **kwargs):
        raise AssertionError("a model was loaded before the config was checked")

    monkeypatch.setattr("trainers.adpo.load_lvlm_for_tower_training", no_model)
    common = ["--model_name_or_path", "world:small", "--output_dir", str(tmp_path / "out"), "--report_to", "none", "--bf16", "false"]
    # a stored y_l was written for the stored x_adv: scoring it on a new image is refused
    with pytest.raises(ValueError, match="set pair_source: online") as refused:
        main([*common, "--dataset_path", str(tmp_path), "--adv_source", "online"])
    assert "\n" not in str(refused.value)
    with pytest.raises(ValueError, match="needs image_source"):
        main([*common, "--pair_source", "online"])
    with pytest.raises(ValueError, match="identical_pairs"):
        main([*common, "--pair_source", "online", "--image_source", str(image_folder), "--identical_pairs", "skip"])
    with pytest.raises(ValueError, match="prompts_file"):
        main([*common, "--pair_source", "online", "--image_source", str(image_folder), "--prompts_file", "absent.txt"])
    with pytest.raises(ValueError, match="does not exist"):
        main([*common, "--pair_source", "online", "--image_source", str(tmp_path / "absent")])
    with pytest.raises(ValueError, match="remove adv_source"):
        main([*common, "--pair_source", "online", "--image_source", str(image_folder), "--adv_source", "stored"])
    with pytest.raises(ValueError, match="anchor_weight must be >= 0"):
        main([*common, "--pair_source", "online", "--image_source", str(image_folder), "--anchor_weight", "-1"])
    coco = tmp_path / "captions.json"
    coco.write_text(json.dumps({"images": [{"id": 3, "file_name": "../../etc/passwd.png"}]}))
    with pytest.raises(ValueError, match="image id 3: image path '../../etc/passwd.png' leads outside"):
        main([*common, "--pair_source", "online", "--image_source", str(coco)])


@pytest.mark.distributed
def test_two_process_gloo_run_with_online_pairs_trains(tmp_path, image_folder):
    model, processor = tiny_llava(seed=0)
    model.save_pretrained(tmp_path / "model")
    processor.save_pretrained(tmp_path / "model")
    config = tmp_path / "adpo.yaml"
    config.write_text(
        f"model_name_or_path: {tmp_path / 'model'}\npair_source: online\nimage_source: {image_folder}\n"
        f"output_dir: {tmp_path / 'ddp'}\nper_device_train_batch_size: 2\nmax_steps: 2\nlearning_rate: 0.001\n"
        "attack_steps: 2\nmax_new_tokens: 4\nidentical_pairs: drop\n"
        "bf16: false\ngradient_checkpointing: false\nlogging_steps: 1\nreport_to: []\nsave_strategy: 'no'\n"
    )
    result = launch_two_cpu_processes("trainers.adpo", config, cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    card = json.loads((tmp_path / "ddp" / "encoder" / "adpo_card.json").read_text())
    assert card["global_step"] == 2 and card["effective_batch_size"] == 4  # two processes really ran
    assert card["pair_source"] == "online" and "online/identical_rate" in card["last_train_log"]
    trained = CLIPVisionModel.from_pretrained(tmp_path / "ddp" / "encoder").state_dict()
    original = find_vision_tower(model).state_dict()
    assert any(not torch.equal(v, original[k]) for k, v in trained.items())


def parse_adpo_config(name: str, *overrides: str) -> AdPOConfig:
    from trl import TrlParser

    (config,) = TrlParser([AdPOConfig]).parse_args_and_config(["--config", str(REPO / "configs" / "adpo" / name), *overrides])
    return config


def test_the_paper_config_is_the_papers_recipe_and_the_others_say_what_they_are(tmp_path, image_folder):
    with pytest.raises(ValueError, match="image_source='data/imagenet/train' does not exist"):
        parse_adpo_config("paper.yaml")  # before any model loads: the folder must be there
    paper = parse_adpo_config("paper.yaml", "--image_source", str(image_folder), "--output_dir", str(tmp_path))
    assert (paper.pair_source, paper.adv_source, paper.prompt_list()) == ("online", "online", ["What is in the image?"])
    assert (paper.attack_norm, paper.attack_eps, paper.attack_steps, paper.attack_embedding) == ("linf", "2/255", 10, "pooled")
    assert (paper.beta, paper.aio_weight, list(paper.loss_type), paper.tune) == (0.1, 1.0, ["sigmoid"], "full")
    assert (paper.optim, paper.learning_rate, paper.weight_decay, paper.num_train_epochs) == ("adamw_torch", 1e-5, 1e-4, 2)
    assert paper.per_device_train_batch_size * paper.gradient_accumulation_steps == 128
    assert not paper.do_sample and paper.identical_pairs == "keep"

    with pytest.raises(ValueError, match="dataset_path='runs/pairs/llava15_paper' does not exist"):
        parse_adpo_config("llava15_stored_pairs.yaml", "--output_dir", str(tmp_path))  # `adpo pairs` writes it first
    stored = parse_adpo_config("llava15_stored_pairs.yaml", "--output_dir", str(tmp_path), "--dataset_path", str(tmp_path))
    assert (stored.pair_source, stored.adv_source, stored.model_name_or_path) == ("stored", "stored", "llava-hf/llava-1.5-7b-hf")
    world = parse_adpo_config("world.yaml", "--output_dir", str(tmp_path), "--num_train_epochs", "4", "--save_steps", "1000")
    assert (world.pair_source, world.image_source, world.max_images) == ("online", "world", 512)
    assert world.num_train_epochs == 4 and world.save_steps == 1000  # the keys the quickstart overrides
