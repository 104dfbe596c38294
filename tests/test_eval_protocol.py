"""The evaluation protocol end to end on tiny random models (seconds each).

A random LVLM's answers are meaningless, so the VQA samples use the model's own complete clean answers
as references (clean accuracy 100 %) and the tests check what the attacks do to them.
"""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from adpo.eval.adapters import GenerativeModel, ZeroShotModel, predict_in_batches
from adpo.eval.config import EvalConfig
from adpo.eval.ensemble import attack_ensemble
import adpo.eval.ensemble as ensemble
from adpo.eval.protocol import resolve_eps, run_protocol
from adpo.eval.tasks import CaptionTask, Outcome, Sample, VQATask
from adpo.lvlm import LlavaView
from adpo.objectives import Evaluation, Objective
from adpo.testing import random_pixels, tiny_llava
from adpo.threat import ThreatModel

QUESTION = "what is in the image ?"


@pytest.fixture(scope="module")
def view():
    model, processor = tiny_llava(seed=0)
    return LlavaView(model, processor)


@pytest.fixture(scope="module")
def answered(view):
    """Images whose greedy clean answer ends with end-of-turn within the token budget, and those answers."""
    pool = random_pixels(64, seed=1)
    answers = view.generate(pool, [QUESTION] * len(pool), max_new_tokens=8)
    encoded = view.encode([QUESTION] * len(pool), answers)
    complete = view.answer_scores(pool, encoded.input_ids, encoded.attention_mask, encoded.labels).all_greedy
    keep = complete.nonzero().flatten().tolist()[:4]
    assert len(keep) >= 3, "the tiny model should finish some answers"
    return pool[keep], [answers[i] for i in keep]


def vqa_samples(answers):
    return [Sample(f"s{i}", None, QUESTION, [a]) for i, a in enumerate(answers)]


def config(**overrides):
    defaults = dict(model="tiny", data="world:test", task="vqa", attack_eps=["8/255"], attack_steps=2, precision_schedule=["float32"], batch_size=4,
                    step_check_steps=1, num_examples=2, progress=False, vqa_targets=[], max_new_tokens=8)
    defaults.update(overrides)
    return EvalConfig(**defaults)


def test_vqa_protocol_breaks_answers_and_writes_report(view, answered, tmp_path):
    pixels, answers = answered
    report = run_protocol(config(attack_eps=["2/255", "8/255"]), GenerativeModel(view, 8), vqa_samples(answers), pixels, out_dir=tmp_path)
    assert report["clean"]["exact_match"] == 1.0
    robust = {row["eps_label"]: row["metrics"]["exact_match"] for row in report["robust"]}
    assert robust["8/255"] < 1.0
    for sample in report["samples"]:
        small, large = sample["robust"]["2/255"], sample["robust"]["8/255"]
        assert large["scores"]["exact_match"] <= small["scores"]["exact_match"] <= sample["clean"]["scores"]["exact_match"]
        assert small["attacked"]  # every sample was right on the clean image, so every sample is attacked
        if small["scores"]["exact_match"] == 0:  # broken at 2/255: carried to 8/255, not attacked again
            assert large["source"] == small["source"] and large["source"].endswith("ε=2/255")
    rows = {row["eps_label"]: row for row in report["robust"]}
    assert rows["8/255"]["num_attacked"] == round(len(answers) * robust["2/255"])
    assert {c["check"] for c in report["sanity"]} == {"robust_le_clean", "monotone_in_eps", "more_steps_not_weaker", "attack_took_steps"}
    statuses = {c["check"]: c["status"] for c in report["sanity"]}
    assert statuses["robust_le_clean"] == statuses["attack_took_steps"] == "pass"
    assert all(sample["robust"]["2/255"]["steps"] >= 1 for sample in report["samples"])
    assert rows["2/255"]["gradient_steps"] == sum(sample["robust"]["2/255"]["steps"] for sample in report["samples"])
    saved = json.loads((tmp_path / "report.json").read_text())
    assert saved["num_samples"] == len(answers) and saved["step_check"]["steps"] == 1
    assert "APGD" in (tmp_path / "report.md").read_text()
    assert (tmp_path / "metric_vs_eps.png").stat().st_size > 1000
    assert report["examples"] and (tmp_path / report["examples"][0]["adversarial_image"]).exists()
    assert (tmp_path / "examples.png").stat().st_size > 1000


def test_adversarial_outputs_stay_in_the_threat_model(view, answered):
    pixels, answers = answered
    samples = vqa_samples(answers)
    model = GenerativeModel(view, 8)
    clean = [Outcome(o, s) for o, s in zip(answers, VQATask(samples, []).score(samples, answers))]
    threat = ThreatModel(eps=4 / 255)
    run = attack_ensemble(model, VQATask(samples, []), samples, pixels, clean, threat, steps=2, precision_schedule=["float32"], batch_size=4)
    for i, worst in enumerate(run.worst):
        assert worst is not None
        assert bool(threat.contains(worst.x_adv[None], pixels[i][None]))


def test_broken_samples_are_never_attacked(view, answered):
    pixels, answers = answered
    samples = vqa_samples(answers)
    samples[0].references = ["definitely not the answer"]
    task = VQATask(samples, [])
    clean = [Outcome(o, s) for o, s in zip(answers, task.score(samples, answers))]
    assert clean[0].scores["exact_match"] == 0.0
    run = attack_ensemble(GenerativeModel(view, 8), task, samples, pixels, clean, ThreatModel(eps=8 / 255), steps=2,
                          precision_schedule=["float32"], batch_size=4)
    assert run.worst[0] is None and all(w is not None for w in run.worst[1:])
    assert run.attacked == len(samples) - 1


def test_outputs_carried_from_a_smaller_epsilon_are_not_attacked_again(view, answered):
    pixels, answers = answered
    samples = vqa_samples(answers)
    task = VQATask(samples, [])
    model = GenerativeModel(view, 8)
    clean = [Outcome(o, s) for o, s in zip(answers, task.score(samples, answers))]
    small = ThreatModel(eps=2 / 255)
    broken_x = small.project(pixels[:1] + 1.0, pixels[:1])[0]  # a corner of the small ball
    carried = [Outcome("wrong", {"exact_match": 0.0, "soft_accuracy": 0.0}, broken_x, "answer#0@float32 ε=2/255")]
    carried += [None] * (len(samples) - 1)
    run = attack_ensemble(model, task, samples, pixels, clean, ThreatModel(eps=8 / 255), steps=2,
                          precision_schedule=["float32"], batch_size=4, carried=carried)
    assert run.worst[0] is carried[0]  # kept as found, its image inside the larger ball as well
    assert run.attacked == len(samples) - 1 and all(w is not None for w in run.worst[1:])
    with pytest.raises(ValueError, match="carried has 1 outcomes"):
        attack_ensemble(model, task, samples, pixels, clean, small, steps=1, precision_schedule=["float32"],
                        batch_size=4, carried=carried[:1])


def test_zero_epsilon_changes_nothing(view, answered):
    pixels, answers = answered
    zero = config(attack_steps=1, step_check_steps=0)
    zero.attack_eps = ["0"]  # set after the config's checks, which refuse eps 0 (clean accuracy is reported anyway)
    report = run_protocol(zero, GenerativeModel(view, 8), vqa_samples(answers), pixels, write=False)
    assert report["robust"][0]["metrics"]["exact_match"] == 1.0


def test_later_stages_warm_start_from_the_worst_perturbation(view, answered, monkeypatch):
    pixels, answers = answered
    calls = []
    real_apgd = ensemble.apgd

    def spy(objective, x, threat, steps, **kwargs):
        result = real_apgd(objective, x, threat, steps, **kwargs)
        calls.append((kwargs.get("init"), result.x_adv.clone()))
        return result

    monkeypatch.setattr(ensemble, "apgd", spy)
    samples = vqa_samples(answers)
    task = VQATask(samples, [])
    clean = [Outcome(o, s) for o, s in zip(answers, task.score(samples, answers))]
    # A tiny epsilon leaves samples unbroken after the first stage, so the second stage must run.
    run = attack_ensemble(GenerativeModel(view, 8), task, samples, pixels, clean, ThreatModel(eps=0.01 / 255), steps=1,
                          precision_schedule=["half", "float32"], batch_size=8)
    first_stage = [c for c in calls if c[0] is None]
    second_stage = [c for c in calls if c[0] is not None]
    assert first_stage and second_stage
    # Every second-stage start is a perturbation the first stage found (each attacked sample has a worst one).
    earlier = torch.cat([x for _, x in first_stage])
    for init, _ in second_stage:
        for row in init:
            assert any(torch.allclose(row, candidate, atol=1e-6) for candidate in earlier)
    assert run.attacked == len(samples)


def test_caption_protocol_scores_cider(view, answered, tmp_path):
    pixels, answers = answered
    samples = [Sample(f"c{i}", None, QUESTION, [a, "a red circle on the left"]) for i, a in enumerate(answers)]
    report = run_protocol(config(task="caption", attack_steps=1, step_check_steps=0, num_examples=0), GenerativeModel(view, 8), samples, pixels, out_dir=tmp_path)
    assert report["primary_metric"] == "cider" and set(report["clean"]) == {"cider", "bleu4", "rouge_l"}
    assert report["clean"]["cider"] > 0
    for sample in report["samples"]:
        assert sample["robust"]["8/255"]["scores"]["cider"] <= sample["clean"]["scores"]["cider"] + 1e-9
    # one attack pass per reference caption, each run to the end (a caption has no single answer to stop at)
    passes = CaptionTask(samples, 0.1).passes(samples[0])
    assert [p.text for p in passes] == samples[0].references
    assert not any(p.early_stop for p in passes)


def test_targeted_protocol_reports_target_avoided(view, answered):
    pixels, answers = answered
    samples = [Sample(f"t{i}", None, QUESTION, ["maybe"]) for i in range(len(answers))]
    report = run_protocol(config(task="targeted", target="maybe", attack_steps=2, step_check_steps=0), GenerativeModel(view, 8), samples, pixels, write=False)
    assert report["primary_metric"] == "target_avoided"
    assert 0.0 <= report["robust"][0]["metrics"]["target_avoided"] <= report["clean"]["target_avoided"]


def tiny_zero_shot_model():
    from transformers import CLIPVisionConfig, CLIPVisionModel

    from adpo.tower import VisionTower
    from adpo.testing import tiny_image_processor

    torch.manual_seed(0)
    encoder = CLIPVisionModel(CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                               image_size=32, patch_size=8)).eval()
    tower = VisionTower.from_encoder(encoder, tiny_image_processor())
    class_embeddings = torch.randn(5, 32)
    return ZeroShotModel(tower.pooled, class_embeddings, [f"class{i}" for i in range(5)], 100.0, (tower,), torch.device("cpu"))


def test_zero_shot_protocol_runs_ce_and_targeted_passes():
    model = tiny_zero_shot_model()
    pixels = random_pixels(6, seed=3)
    predicted = model.logits(pixels).argmax(dim=-1).tolist()
    samples = [Sample(f"z{i}", None, "", [], label=label) for i, label in enumerate(predicted)]
    report = run_protocol(config(task="zeroshot", attack_steps=5, zeroshot_target_classes=2), model, samples, pixels,
                          class_names=model.class_names, write=False)
    assert report["clean"]["accuracy"] == 1.0
    assert report["robust"][0]["metrics"]["accuracy"] <= 1.0
    assert set(report["protocol"]["passes"]) == {"ce", "target#0", "target#1"}
    assert all(len(s.target_labels) == 2 and s.label not in s.target_labels for s in samples)


def test_resolve_eps_labels_and_order():
    assert resolve_eps(["4/255", "2", 0.5 / 255]) == [(0.5 / 255, "0.5/255"), (2 / 255, "2/255"), (4 / 255, "4/255")]
    assert resolve_eps([0.01568627]) == [(0.01568627, "4/255")]  # a rounded 4/255 still reads as 4/255


def test_predictions_do_not_depend_on_batch_size(view, answered):
    pixels, answers = answered
    samples = vqa_samples(answers)
    model = GenerativeModel(view, 8)
    assert predict_in_batches(model, pixels, samples, 1) == predict_in_batches(model, pixels, samples, 4) == answers


def test_cli_end_to_end_and_compare(tmp_path):
    from adpo.eval.cli import main

    model, processor = tiny_llava(seed=0)
    model.save_pretrained(tmp_path / "model")
    processor.save_pretrained(tmp_path / "model")
    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for i in range(2):
        Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(images / f"img{i}.png")
    yaml_path = tmp_path / "eval.yaml"
    yaml_path.write_text(
        f"model: {tmp_path / 'model'}\ntask: targeted\ntarget: maybe\ndata: {images}\nnum_samples: 2\neps: ['4/255', '8/255']\n"
        f"attack_steps: 1\nprecision_schedule: [float32]\nstep_check_steps: 1\nbatch_size: 2\nmax_new_tokens: 4\noutput_dir: {tmp_path / 'run_a'}\n"
    )
    assert main(["--config", str(yaml_path)]) == 0
    assert main(["--config", str(yaml_path), "--output_dir", str(tmp_path / "run_b"), "--name", "second", "--seed", "1"]) == 0
    report = json.loads((tmp_path / "run_a" / "report.json").read_text())
    assert report["num_samples"] == 2 and [r["eps_label"] for r in report["robust"]] == ["4/255", "8/255"]
    assert main(["compare", str(tmp_path / "run_a"), str(tmp_path / "run_b"), "--out", str(tmp_path / "cmp")]) == 0
    table = (tmp_path / "cmp" / "compare.md").read_text()
    assert "| second |" in table and (tmp_path / "cmp" / "compare_metric_vs_eps.png").exists()


def test_vqa_passes_per_distinct_answer_and_targets():
    several = Sample("a", None, "q", ["Red", "red.", "blue", "red"])
    single = Sample("b", None, "q", ["maybe"])
    task = VQATask([several, single], ["Maybe", "Word"])
    assert task.primary == "soft_accuracy"
    passes = task.passes(several)
    assert [(p.key, p.text, p.targeted, p.early_stop) for p in passes] == [
        ("answer#0", "Red", False, False), ("answer#1", "blue", False, False),
        ("target:Maybe", "Maybe", True, True), ("target:Word", "Word", True, True),
    ]
    # A target equal to the reference answer cannot break the sample: skipped.
    assert [(p.key, p.early_stop) for p in task.passes(single)] == [("answer#0", True), ("target:Word", True)]


def test_cli_zeroshot_with_a_clip_model_and_hf_dataset(tmp_path):
    import datasets
    from transformers import CLIPConfig, CLIPModel, CLIPProcessor

    from adpo.eval.cli import main
    from adpo.testing import tiny_image_processor, tiny_tokenizer

    tokenizer = tiny_tokenizer()
    config = CLIPConfig(
        text_config=dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         max_position_embeddings=16, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, bos_token_id=None),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=32, patch_size=8),
        projection_dim=16,
    )
    torch.manual_seed(0)
    CLIPModel(config).save_pretrained(tmp_path / "clip")
    CLIPProcessor(image_processor=tiny_image_processor(), tokenizer=tokenizer).save_pretrained(tmp_path / "clip")
    rng = np.random.default_rng(0)
    names = ["red circle", "blue square", "green star"]
    rows = {"image": [Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)) for _ in range(4)], "label": [0, 1, 2, 0]}
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=names)})
    datasets.Dataset.from_dict(rows, features=features).save_to_disk(str(tmp_path / "data"))
    argv = ["--task", "zeroshot", "--model", str(tmp_path / "clip"), "--clip_model", str(tmp_path / "clip"), "--data", str(tmp_path / "data"),
            "--num_samples", "4", "--attack_eps", "8/255", "--attack_steps", "2", "--precision_schedule", "float32", "--step_check_steps", "0",
            "--zeroshot_target_classes", "1", "--output_dir", str(tmp_path / "out"), "--no_progress"]
    assert main(argv) == 0
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["task"] == "zeroshot" and report["num_samples"] == 4
    assert report["robust"][0]["metrics"]["accuracy"] <= report["clean"]["accuracy"]
    assert set(report["protocol"]["passes"]) == {"ce", "target#0"}


def test_half_precision_is_fp32_on_cpu_and_bf16_only_when_asked():
    cpu = torch.device("cpu")
    with ensemble.precision_context("half", cpu):
        assert not torch.is_autocast_enabled("cpu")
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.float32
    with ensemble.precision_context("bfloat16", cpu):
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.bfloat16


def test_side_by_side_passes_pack_whole_samples_and_split_only_oversized_ones():
    rows = [(0, "a"), (0, "t"), (1, "a"), (1, "t"), (2, "a"), (2, "t")]
    assert ensemble._pack_by_sample(rows, 4) == [rows[:4], rows[4:]]
    assert ensemble._pack_by_sample(rows, 3) == [rows[:2], rows[2:4], rows[4:]]  # never a sample across chunks
    # Batch size 1 is the per-sample loop: each pass alone, in order (a broken sample skips the rest).
    assert ensemble._pack_by_sample(rows, 1) == [[row] for row in rows]
    assert ensemble._pack_by_sample([(0, "a"), (0, "t"), (0, "u"), (1, "a")], 2) == [[(0, "a"), (0, "t")], [(0, "u"), (1, "a")]]


class BrokenAtStart(Objective):
    """Calls every row broken wherever it looks, as the LM loss did when a label token was never the greedy choice."""

    def evaluate(self, x):
        return Evaluation(values=x.flatten(1).sum(dim=1), success=torch.ones(x.shape[0], dtype=torch.bool))


class AlwaysRight:
    """Answers every question with its first reference, attacked or not, and attacks with :class:`BrokenAtStart`."""

    device = torch.device("cpu")

    def predict(self, pixels, samples):
        return [s.references[0] for s in samples]

    def objective(self, samples, passes):
        return BrokenAtStart()


def test_an_attack_that_takes_no_step_on_a_clean_correct_sample_fails_the_report(tmp_path):
    samples = [Sample(f"s{i}", None, QUESTION, ["red"]) for i in range(3)]
    report = run_protocol(config(attack_eps=["2/255", "8/255"], step_check_steps=0, num_examples=0), AlwaysRight(), samples,
                          random_pixels(3, seed=0), out_dir=tmp_path)
    assert report["robust"][0]["metrics"]["exact_match"] == 1.0  # the robust score falls back to the clean one
    assert all(sample["robust"][label]["steps"] == 0 for sample in report["samples"] for label in ("2/255", "8/255"))
    assert [r["gradient_steps"] for r in report["robust"]] == [0, 0]
    check = next(c for c in report["sanity"] if c["check"] == "attack_took_steps")
    assert check["status"] == "fail" and "s0@2/255" in check["detail"]
    assert "**FAIL** `attack_took_steps`" in (tmp_path / "report.md").read_text()
    saved = json.loads((tmp_path / "report.json").read_text())
    assert saved["samples"][0]["robust"]["8/255"]["steps"] == 0 and not saved["samples"][0]["clean"]["broken"]


def test_vqa_pass_attacks_the_clean_answer_as_the_model_spelled_it():
    sample = Sample("a", None, "q", ["red", "Red", "blue"])
    task = VQATask([sample], [])
    assert [p.text for p in task.passes(sample)] == ["red", "blue"]
    assert [p.text for p in task.passes(sample, clean_output="Red.")] == ["Red.", "blue"]
    assert [p.text for p in task.passes(sample, clean_output="green")] == ["red", "blue"]  # wrong: references as given


def test_references_spelled_unlike_the_clean_answer_are_still_attacked(view, answered):
    pixels, answers = answered
    # Scored as the same answers (VQA normalisation ignores case and the full stop), but tokenised differently.
    samples = [Sample(f"s{i}", None, QUESTION, [a.upper() + "."]) for i, a in enumerate(answers)]
    task = VQATask(samples, [])
    clean = [Outcome(o, s) for o, s in zip(answers, task.score(samples, answers))]
    assert all(c.scores["exact_match"] == 1.0 for c in clean)
    run = attack_ensemble(GenerativeModel(view, 8), task, samples, pixels, clean, ThreatModel(eps=8 / 255), steps=2,
                          precision_schedule=["float32"], batch_size=4)
    assert all(steps >= 1 for steps in run.steps), run.steps
