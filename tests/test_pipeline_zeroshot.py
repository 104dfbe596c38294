"""`adpo run`'s zero-shot stages (image, text and joint attacks) and their side-by-side comparison."""

import json
from pathlib import Path

import pytest
import yaml

from adpo import pipeline
from adpo.pipeline_zeroshot import multimodal_comparison, multimodal_markdown


def _config(tmp_path, methods=("fare", "mmcoa")):
    content = {
        "output_dir": str(tmp_path / "out"), "small_model": "world:small", "large_model": "world:large",
        "methods": list(methods), "train_images": 16,
        "train": {m: {"overrides": {"max_steps": 1}} for m in methods},
        "eval": {"overrides": {"num_samples": 2}},
        "eval_zeroshot": {"config": "configs/eval/world_zeroshot.yaml",
                          "overrides": {"num_samples": 4, "attack_modalities": ["image", "text", "joint"]}},
    }
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump(content))
    return pipeline.PipelineConfig.from_yaml(path)


def test_zeroshot_stages_follow_training_and_judge_each_model_with_its_own_text_tower(tmp_path):
    stages = {stage.name: stage for stage in pipeline.build_stages(_config(tmp_path))}
    names = list(stages)
    assert names[:2] == ["train-fare", "train-mmcoa"]
    assert names[2:6] == ["zeroshot-original", "zeroshot-fare", "zeroshot-mmcoa", "report-zeroshot"]
    original, fare, mmcoa = (stages[f"zeroshot-{m}"].settings for m in ("original", "fare", "mmcoa"))
    assert original["clip_model"] == original["model"] == "world:clip" and original["encoder"] is None
    assert fare["clip_model"] == fare["model"] == "world:clip" and fare["encoder"].endswith("train/fare/run")
    assert mmcoa["clip_model"] == mmcoa["model"] and mmcoa["clip_model"].endswith("train/mmcoa/run/clip")
    assert mmcoa["encoder"] is None and mmcoa["task"] == "zeroshot" and mmcoa["num_samples"] == 4
    assert stages["zeroshot-mmcoa"].inputs == ("train-mmcoa",)
    train = stages["train-mmcoa"].settings
    assert train["max_train_samples"] == 16  # one data budget for every method


def _report(path: Path, clean, image, text, joint):
    samples = [{"id": str(i), "clean": {"scores": {"accuracy": float(c)}},
                "robust": {"8/255": {"scores": {"accuracy": float(r)}}}} for i, (c, r) in enumerate(zip(clean, image))]
    report = {"samples": samples, "robust": [{"eps_label": "8/255"}], "multimodal": {"samples": {
        "text": [{"id": str(i), "robust": bool(t)} for i, t in enumerate(text)],
        "joint 8/255": [{"id": str(i), "robust": bool(j)} for i, j in enumerate(joint)]}}}
    path.mkdir(parents=True)
    (path / "report.json").write_text(json.dumps(report))
    return path


def test_multimodal_comparison_counts_paired_changes_with_the_sign_test(tmp_path):
    base = _report(tmp_path / "a", [1, 1, 1, 1], [0, 0, 0, 1], [1, 0, 1, 1], [0, 0, 0, 0])
    other = _report(tmp_path / "b", [1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 0], [1, 1, 1, 0])
    table = multimodal_comparison([base, other], ["original", "mmcoa"])
    row = table["rows"][1]
    assert row["accuracy"] == {"clean": 0.75, "text": 0.75, "image 8/255": 0.5, "joint 8/255": 0.75}
    assert row["versus_first"]["image 8/255"]["gained"] == 2 and row["versus_first"]["image 8/255"]["lost"] == 1
    assert row["versus_first"]["joint 8/255"] == {"gained": 3, "lost": 0, "p": pytest.approx(0.25)}
    assert "| mmcoa | 75.0 | 75.0 | 50.0 | 75.0 |" in multimodal_markdown(table)


def test_the_shipped_study_config_parses():
    root = Path(__file__).resolve().parents[1]
    config = pipeline.PipelineConfig.from_yaml(root / "configs" / "world_study_multimodal.yaml")
    assert config.methods == ["fare", "tecoa", "simclip", "mmcoa", "deltaclip"] and config.train_images == 512
    assert config.eval_zeroshot.overrides["attack_modalities"] == ["image", "text", "joint"]


def test_each_method_is_judged_with_what_its_run_declared(tmp_path, monkeypatch):
    from adpo.runtime import write_stage_outputs

    stages = {stage.name: stage for stage in pipeline.build_stages(_config(tmp_path))}
    fare_run, mmcoa_run = tmp_path / "out" / "train" / "fare" / "run", tmp_path / "out" / "train" / "mmcoa" / "run"
    for path in (fare_run / "encoder", mmcoa_run / "encoder", mmcoa_run / "clip"):
        path.mkdir(parents=True)
    write_stage_outputs(fare_run, encoder=fare_run / "encoder")
    write_stage_outputs(mmcoa_run, encoder=mmcoa_run / "encoder", clip=mmcoa_run / "clip")
    calls = []
    monkeypatch.setattr(pipeline, "_adpo", lambda argv: calls.append(argv))
    stages["zeroshot-fare"].run()
    stages["zeroshot-mmcoa"].run()
    fare = yaml.safe_load((tmp_path / "out" / "eval_zeroshot" / "fare" / "stage_config.yaml").read_text())
    mmcoa = yaml.safe_load((tmp_path / "out" / "eval_zeroshot" / "mmcoa" / "stage_config.yaml").read_text())
    assert fare["encoder"] == str(fare_run / "encoder") and fare["clip_model"] == "world:clip"
    assert mmcoa["clip_model"] == mmcoa["model"] == str(mmcoa_run / "clip") and mmcoa["encoder"] is None
    assert [argv[0] for argv in calls] == ["eval", "eval"]
