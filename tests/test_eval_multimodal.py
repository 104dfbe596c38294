"""Zero-shot evaluation under image-only, text-only and joint attacks, side by side (WorldCLIP, a few samples)."""

from __future__ import annotations

import json

import pytest

from adpo.errors import UsageError
from adpo.eval.config import EvalConfig
from adpo.world.data import CLASS_NAMES, CLASS_PROMPT_TEMPLATE


def test_text_and_joint_rows_beside_the_image_rows(tmp_path):
    from adpo.eval.cli import main

    out = tmp_path / "eval"
    assert main(["--task", "zeroshot", "--clip_model", "world:clip", "--model", "world:clip", "--data", "world:test",
                 "--num_samples", "4", "--attack_eps", "8/255", "--attack_steps", "2", "--zeroshot_target_classes", "0",
                 "--precision_schedule", "float32", "--step_check_steps", "0", "--num_examples", "0",
                 "--attack_modalities", "image", "text", "joint", "--text_max_substitutions", "2",
                 "--output_dir", str(out), "--progress", "false"]) == 0
    report = json.loads((out / "report.json").read_text())
    section = report["multimodal"]
    assert set(section["accuracy"]) == {"text", "joint 8/255"}
    image = {s["id"]: s["robust"]["8/255"]["scores"]["accuracy"] > 0 for s in report["samples"]}
    clean = {s["id"]: s["clean"]["scores"]["accuracy"] > 0 for s in report["samples"]}
    for row in section["samples"]["joint 8/255"]:
        assert not row["robust"] or image[row["id"]]  # joint starts from the image attack's worst image
    for row, sample in zip(section["samples"]["text"], report["samples"]):
        assert not row["robust"] or clean[row["id"]]
        if row["adversarial_prompt"] is None:
            continue
        original = CLASS_PROMPT_TEMPLATE.format(CLASS_NAMES[sample["label"]]).split()
        perturbed = row["adversarial_prompt"].split()
        assert len(perturbed) == len(original)  # word-level tokenizer: one token per word
        assert sum(a != b for a, b in zip(original, perturbed)) <= 2
        assert perturbed[-2:] == original[-2:]  # the class name is protected
    assert "| clean | text | image 8/255 | joint 8/255 |" in (out / "report.md").read_text()


@pytest.mark.parametrize("options, message", [
    ({"task": "vqa", "attack_modalities": ["image", "text"]}, "need task: zeroshot"),
    ({"task": "zeroshot", "attack_modalities": ["text"]}, "must list image"),
    ({"task": "zeroshot", "attack_modalities": ["image", "audio"]}, "must list image"),
    ({"task": "zeroshot", "attack_modalities": ["image", "text"], "text_max_substitutions": 0}, "text_max_substitutions=0"),
])
def test_bad_attack_settings_are_usage_errors(tmp_path, options, message):
    with pytest.raises(UsageError, match=message):
        EvalConfig(output_dir=str(tmp_path), **options)
