"""`adpo eval` on the bundled world's small LVLM (small sizes; marked world)."""

import json

import pytest

pytestmark = pytest.mark.world


def test_world_small_vqa_is_broken_at_the_working_eps(tmp_path):
    from adpo.eval.cli import main

    out = tmp_path / "world_vqa"
    # APGD-50 on 16 questions, nearer the definition of the working eps (adpo world eval: APGD-50 on 48, where 2
    # survive). On 8 questions one survivor is already 12.5 %, and one of the first 8 survives even APGD-50.
    argv = ["--config", "configs/eval/world_vqa.yaml", "--attack_eps", "world", "--num_samples", "16", "--attack_steps", "50",
            "--precision_schedule", "float32", "--vqa_targets", "Maybe", "--step_check_steps", "2", "--num_examples", "2",
            "--output_dir", str(out), "--no_progress"]
    assert main(argv) == 0
    report = json.loads((out / "report.json").read_text())
    robust = report["robust"][0]["metrics"]["exact_match"]
    # The undefended model is the world's reference point: its working epsilon is where VQA falls to <= 10 %.
    assert robust <= 0.10, f"undefended world-small kept {robust:.0%} VQA accuracy at the working eps"
    for sample in report["samples"]:
        for entry in sample["robust"].values():
            assert entry["scores"]["exact_match"] <= sample["clean"]["scores"]["exact_match"]
    statuses = {check["check"]: check["status"] for check in report["sanity"]}
    assert statuses["robust_le_clean"] != "fail"
    # On the world's real chat template the attack takes a gradient step on every clean-correct question.
    assert statuses["attack_took_steps"] == "pass", report["sanity"]
    assert (out / "metric_vs_eps.png").stat().st_size > 1000
    if report["examples"]:
        assert (out / "examples.png").stat().st_size > 1000
