"""AdPOTrainer on a tiny random LLaVA: collator rows, loss = formulas, reference, tower-only training,
encoder export, resume, online attack, and a two-process gloo run."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from datasets import Dataset, Features, Image as ImageFeature, Value
from transformers import CLIPVisionModel

from adpo.losses.preference import aio_loss, pio_loss
from adpo.lvlm import LlavaView
from adpo.preprocess import to_uint8_images
from adpo.testing import launch_two_cpu_processes, random_pixels, tiny_llava
from adpo.tower import find_vision_tower
from trainers.adpo import AdPOConfig, AdPODataCollator, AdPOTrainer, _truncate_left_padded

QUESTIONS = ["what is in the image ?", "what color ?", "describe this picture", "what shape ?"]
CHOSEN = ["a red circle", "blue", "two small objects", "a square"]
REJECTED = ["a green star", "yellow", "no", "three triangle objects on the left"]
EPS = 4 / 255


def make_pairs(n: int = 4, seed: int = 0, ref_logps: tuple[list[float], list[float]] | None = None) -> Dataset:
    clean = random_pixels(n, 32, seed)
    noise = torch.rand(clean.shape, generator=torch.Generator().manual_seed(seed + 1)) * 2 - 1
    adv = (clean + noise * EPS).clamp(0, 1)
    columns = {
        "image": to_uint8_images(clean),
        "adv_image": to_uint8_images(adv),
        "prompt": [QUESTIONS[i % 4] for i in range(n)],
        "chosen": [CHOSEN[i % 4] for i in range(n)],
        "rejected": [REJECTED[i % 4] for i in range(n)],
    }
    features = {"image": ImageFeature(), "adv_image": ImageFeature(), "prompt": Value("string"),
                "chosen": Value("string"), "rejected": Value("string")}
    if ref_logps is not None:
        columns["ref_chosen_logps"], columns["ref_rejected_logps"] = ref_logps
        features.update(ref_chosen_logps=Value("float64"), ref_rejected_logps=Value("float64"))
    return Dataset.from_dict(columns, features=Features(features))


def make_config(tmp_path: Path, **overrides) -> AdPOConfig:
    settings = dict(
        output_dir=str(tmp_path / "run"), per_device_train_batch_size=2, max_steps=2, learning_rate=1e-3,
        bf16=False, gradient_checkpointing=False, logging_steps=1, report_to=[], save_strategy="no",
        use_cpu=True, seed=0, dataloader_num_workers=0,
    )
    settings.update(overrides)
    return AdPOConfig(**settings)


def tower_prefix(model) -> str:
    tower = find_vision_tower(model)
    return next(name for name, module in model.named_modules() if module is tower) + "."


def answer_token_logps(view: LlavaView, pixels, questions, answers):
    """Per-sample sums and per-token lists of log π(answer | image, question), via the core's LlavaView."""
    encoded = view.encode(list(questions), list(answers))
    with torch.no_grad():
        scores = view.answer_scores(pixels, encoded.input_ids, encoded.attention_mask, encoded.labels)
    per_token = [scores.token_logps[scores.sample_index == i] for i in range(len(questions))]
    return scores.sum_logps, per_token


# ----------------------------------------------------------------------------------------------------
def test_collator_puts_clean_under_chosen_and_adversarial_under_rejected(tiny):
    model, processor = tiny
    view = LlavaView(model, processor)
    pairs = make_pairs(3)
    batch = AdPODataCollator(view)([pairs[i] for i in range(3)])
    from adpo.preprocess import to_pixels

    assert torch.equal(batch["clean_pixels"], to_pixels(list(pairs["image"]), processor))
    assert torch.equal(batch["adv_pixels"], to_pixels(list(pairs["adv_image"]), processor))
    assert not torch.equal(batch["clean_pixels"], batch["adv_pixels"])
    # rows 0..B-1: prompt + chosen; rows B..2B-1: prompt + rejected — the pairs stage's tokenisation
    expected = view.encode(list(pairs["prompt"]) * 2, list(pairs["chosen"]) + list(pairs["rejected"]))
    assert batch["input_ids"].shape[0] == 6
    assert torch.equal(batch["input_ids"], expected.input_ids)
    assert torch.equal(batch["completion_mask"].bool(), expected.labels != -100)
    answer_ids = [ids[mask.bool()] for ids, mask in zip(batch["input_ids"], batch["completion_mask"])]
    decoded = processor.tokenizer.batch_decode(answer_ids, skip_special_tokens=True)
    assert [d.strip() for d in decoded] == list(pairs["chosen"]) + list(pairs["rejected"])
    assert "ref_chosen_logps" not in batch

    with_ref = make_pairs(2, ref_logps=([-1.0, -2.0], [-3.0, -4.0]))
    batch = AdPODataCollator(view)([with_ref[i] for i in range(2)])
    assert batch["ref_chosen_logps"].tolist() == [-1.0, -2.0]
    assert batch["ref_rejected_logps"].tolist() == [-3.0, -4.0]


def test_truncation_keeps_the_image_and_cuts_answer_ends():
    ids = torch.tensor([[0, 0, 5, 6, 7, 8], [1, 2, 3, 4, 9, 9]])
    mask = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    labels = torch.tensor([[-100, -100, -100, 6, 7, 8], [-100, -100, -100, 4, 9, 9]])
    out_ids, out_mask, out_labels = _truncate_left_padded(ids, mask, labels, 4, pad_token_id=0)
    assert out_ids.tolist() == [[5, 6, 7, 8], [1, 2, 3, 4]]
    assert out_labels.tolist() == [[-100, 6, 7, 8], [-100, -100, -100, 4]]
    assert out_mask.tolist() == [[1, 1, 1, 1], [1, 1, 1, 1]]
    with pytest.raises(ValueError, match="raise max_length"):
        _truncate_left_padded(ids, mask, labels, 3, pad_token_id=0)


def test_loss_equals_pio_plus_lambda_aio_from_the_formulas(tmp_path):
    model, processor = tiny_llava(seed=0)
    original = copy.deepcopy(model)
    pairs = make_pairs(2)
    trainer = AdPOTrainer(model, make_config(tmp_path, beta=0.5, aio_weight=0.7), pairs, processor)
    # Move the policy away from the reference so that every term is non-trivial.
    with torch.no_grad():
        for parameter in find_vision_tower(model).parameters():
            if parameter.requires_grad:
                parameter.add_(torch.randn_like(parameter) * 0.05)
    batch = trainer.data_collator([pairs[i] for i in range(2)])
    trainer.model.train()
    loss = trainer.compute_loss(trainer.model, batch)

    policy, reference = LlavaView(model, processor), LlavaView(original, processor)
    clean, adv = batch["clean_pixels"], batch["adv_pixels"]
    questions = list(pairs["prompt"])
    pi_w, _ = answer_token_logps(policy, clean, questions, list(pairs["chosen"]))
    pi_l, _ = answer_token_logps(policy, adv, questions, list(pairs["rejected"]))
    ref_w, _ = answer_token_logps(reference, clean, questions, list(pairs["chosen"]))
    ref_l, _ = answer_token_logps(reference, adv, questions, list(pairs["rejected"]))
    _, w_on_adv = answer_token_logps(policy, adv, questions, list(pairs["chosen"]))
    # PIO by hand: −log σ(β[(π_w − ref_w) − (π_l − ref_l)]), mean over pairs
    h = 0.5 * ((pi_w - ref_w) - (pi_l - ref_l))
    pio_by_hand = torch.nn.functional.softplus(-h).mean()
    # AIO by hand: −Σ_t p_t log p_t of y_w on x_adv, mean over pairs
    aio_by_hand = torch.stack([-(t.exp() * t).sum() for t in w_on_adv]).mean()
    assert (ref_w - pi_w).abs().max() > 1e-3  # the perturbation matters
    assert loss.item() == pytest.approx((pio_by_hand + 0.7 * aio_by_hand).item(), rel=1e-4, abs=1e-5)
    assert pio_loss(pi_w, pi_l, ref_w, ref_l, beta=0.5).loss.item() == pytest.approx(pio_by_hand.item(), rel=1e-6)
    mask = torch.nn.utils.rnn.pad_sequence([torch.ones_like(t) for t in w_on_adv], batch_first=True)
    padded = torch.nn.utils.rnn.pad_sequence(w_on_adv, batch_first=True)
    assert aio_loss(padded, mask).loss.item() == pytest.approx(aio_by_hand.item(), rel=1e-6)


def test_reference_at_start_equals_policy_and_stored_ref_logps_are_used(tmp_path):
    model, processor = tiny_llava(seed=0)
    view = LlavaView(model, processor)
    plain = make_pairs(2)
    batch = AdPODataCollator(view)([plain[i] for i in range(2)])
    ref_w, _ = answer_token_logps(view, batch["clean_pixels"], list(plain["prompt"]), list(plain["chosen"]))
    ref_l, _ = answer_token_logps(view, batch["adv_pixels"], list(plain["prompt"]), list(plain["rejected"]))

    # what `adpo pairs` stores (LlavaView.answer_scores on the original model), shifted by a known offset
    stored = make_pairs(2, ref_logps=((ref_w + 1.0).tolist(), (ref_l - 2.0).tolist()))
    trainer = AdPOTrainer(model, make_config(tmp_path, beta=0.1, aio_weight=0.0), stored, processor)
    trainer.model.train()
    batch = trainer.data_collator([stored[i] for i in range(2)])
    computed_w, computed_l = trainer._reference_logps(
        {}, torch.cat([batch["clean_pixels"], batch["adv_pixels"]]), batch["input_ids"], batch["attention_mask"],
        batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100),
    )
    # the trainer's own reference forward reproduces the pairs stage's log-probs
    assert torch.allclose(computed_w, ref_w, atol=1e-4) and torch.allclose(computed_l, ref_l, atol=1e-4)
    # at step 0 the policy is the reference: with the true values PIO would be log 2; the stored
    # offsets (chosen +1, rejected −2) give h = β·(−1 − 2) = −0.3
    loss = trainer.compute_loss(trainer.model, batch)
    assert loss.item() == pytest.approx(torch.nn.functional.softplus(torch.tensor(0.3)).item(), rel=1e-4)
    trainer.args.use_stored_ref_logps = False
    assert trainer.compute_loss(trainer.model, batch).item() == pytest.approx(0.693147, rel=1e-4)


@pytest.mark.parametrize("tune", ["full", "lora"])
def test_only_the_tower_trains_and_the_encoder_is_exported(tmp_path, tune):
    model, processor = tiny_llava(seed=0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    prefix = tower_prefix(model)
    trainer = AdPOTrainer(model, make_config(tmp_path, tune=tune, lora_r=4), make_pairs(4), processor)
    trainer.train()
    trainer.save_model(trainer.args.output_dir)

    base = trainer.accelerator.unwrap_model(trainer.model)
    if tune == "lora":
        base = base.get_base_model()
    after = {k.replace(".base_layer", ""): v for k, v in base.state_dict().items() if "lora_" not in k}
    for name, value in before.items():
        if not name.startswith(prefix) or tune == "lora":  # LoRA leaves every base weight untouched
            assert torch.equal(after[name], value), f"{name} changed"
    encoder = CLIPVisionModel.from_pretrained(Path(trainer.args.output_dir) / "encoder")
    exported = encoder.state_dict()
    original = {k[len(prefix):]: v for k, v in before.items() if k.startswith(prefix)}
    changed = [k for k in exported if not torch.equal(exported[k], original[k])]
    assert changed, "training did not change the encoder"
    # layers the LLM's features never reach stay as they were
    unreachable = trainer.freeze_report.frozen_unreachable if trainer.freeze_report else []
    assert all(torch.equal(exported[k], original[k]) for k in unreachable)
    if tune == "full":
        assert "post_layernorm.weight" in unreachable and "encoder.layers.2.mlp.fc2.weight" in unreachable
        assert all(torch.equal(exported[k], after[prefix + k]) for k in exported)
    else:  # the exported encoder is the merged LoRA tower: same features as the adapted policy
        pixels = random_pixels(2, 32, seed=5)
        policy = trainer.view.tower.features(pixels)
        trainer.view.tower.encoder = encoder
        assert torch.allclose(trainer.view.tower.features(pixels), policy, atol=1e-5)
    card = json.loads((Path(trainer.args.output_dir) / "encoder" / "adpo_card.json").read_text())
    assert card["tune"] == tune and card["global_step"] == 2 and "pio" in card["last_train_log"]
    assert (Path(trainer.args.output_dir) / "encoder" / "preprocessor_config.json").exists()


@pytest.mark.parametrize("tune", ["full", "lora"])
def test_resume_from_checkpoint_equals_uninterrupted_run(tmp_path, tune):
    def run(output: str, resume: str | None = None) -> dict:
        model, processor = tiny_llava(seed=0)
        config = make_config(tmp_path, output_dir=str(tmp_path / output), max_steps=4, save_strategy="steps",
                             save_steps=2, tune=tune, lora_r=4)
        trainer = AdPOTrainer(model, config, make_pairs(8), processor)
        trainer.train(resume_from_checkpoint=resume)
        return trainer.trained_encoder().state_dict()

    uninterrupted = run("full")
    checkpoint = tmp_path / "full" / "checkpoint-2"
    at_step_2 = CLIPVisionModel.from_pretrained(checkpoint / "encoder").state_dict()
    resumed = run("resumed", resume=str(checkpoint))
    for name, value in uninterrupted.items():
        assert torch.allclose(resumed[name], value, atol=1e-6), f"{name} differs after resume"
    # steps 3-4 moved the encoder, so the comparison is not vacuous
    assert any(not torch.allclose(value, at_step_2[name], atol=1e-6) for name, value in uninterrupted.items())


def test_online_adversarial_images_lie_in_the_ball_and_evaluation_logs_metrics(tmp_path):
    model, processor = tiny_llava(seed=0)
    config = make_config(tmp_path, attack_eps="4/255", attack_steps=3, max_steps=1)
    pairs = make_pairs(2)
    trainer = AdPOTrainer(model, config, pairs, processor)
    clean = trainer.data_collator([pairs[i] for i in range(2)])["clean_pixels"]
    adv = trainer._online_adversarial(clean, seed=0)
    assert config.threat_model().contains(adv, clean).all()
    assert (adv - clean).abs().max() > 1 / 255
    trainer.train()
    assert trainer.state.global_step == 1
    metrics = trainer.evaluate(make_pairs(2, seed=3))
    assert {"eval_loss", "eval_pio", "eval_rewards/margins", "eval_drift/clean_embedding"} <= set(metrics)


def test_config_errors_name_the_fix(tmp_path):
    with pytest.raises(ValueError, match="adv_source"):
        make_config(tmp_path, adv_source="cached")
    with pytest.raises(ValueError, match="no PIO form"):
        make_config(tmp_path, loss_type=["aot"])
    with pytest.raises(ValueError, match="precompute_ref_log_probs"):
        make_config(tmp_path, precompute_ref_log_probs=True)
    model, processor = tiny_llava(seed=0)
    with pytest.raises(ValueError, match="lacks columns"):
        AdPOTrainer(model, make_config(tmp_path), make_pairs(2).remove_columns("adv_image"), processor)


@pytest.mark.distributed
def test_two_process_gloo_run_equals_one_process_with_the_global_batch(tmp_path):
    model, processor = tiny_llava(seed=0)
    model.save_pretrained(tmp_path / "model")
    processor.save_pretrained(tmp_path / "model")
    make_pairs(8).save_to_disk(str(tmp_path / "pairs"))
    config = tmp_path / "adpo.yaml"
    config.write_text(
        f"model_name_or_path: {tmp_path / 'model'}\ndataset_path: {tmp_path / 'pairs'}\n"
        f"output_dir: {tmp_path / 'ddp'}\nper_device_train_batch_size: 2\nmax_steps: 2\nlearning_rate: 0.001\n"
        "bf16: false\ngradient_checkpointing: false\nlogging_steps: 1\nreport_to: []\nsave_strategy: 'no'\n"
    )
    result = launch_two_cpu_processes("trainers.adpo", config, cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    card = json.loads((tmp_path / "ddp" / "encoder" / "adpo_card.json").read_text())
    assert card["global_step"] == 2 and card["effective_batch_size"] == 4  # two processes really ran

    # DDP averages the two processes' gradients: the result equals one process with the global batch of 4
    from trainers.adpo import main

    assert main(["--config", str(config), "--per_device_train_batch_size", "4", "--output_dir", str(tmp_path / "one"),
                 "--use_cpu", "true"]) == 0
    ddp = CLIPVisionModel.from_pretrained(tmp_path / "ddp" / "encoder").state_dict()
    one = CLIPVisionModel.from_pretrained(tmp_path / "one" / "encoder").state_dict()
    original = find_vision_tower(model).state_dict()
    assert any(not torch.equal(v, original[k]) for k, v in ddp.items())
    for name, value in one.items():
        assert torch.allclose(ddp[name], value, atol=1e-5), f"{name}: DDP run differs from the single-process run"
