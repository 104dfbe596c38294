"""adpo run with LVLM-level defences: instruct methods are scored as tuned LVLMs on their own size, a classifier feeds
them, and a second (targeted) evaluation gets its own report."""

from pathlib import Path

import pytest
import yaml

from adpo import pipeline, runtime
from adpo.errors import UsageError
from adpo.runtime import write_stage_outputs


@pytest.fixture(autouse=True)
def declared_outputs(monkeypatch):
    """Stages faked by these tests write nothing: a trained encoder is where every trainer declares it."""
    monkeypatch.setattr(runtime, "stage_output", lambda directory, name: Path(directory) / name)


def _write(tmp_path, content):
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump(content))
    return path


def _config(tmp_path):
    return {
        "output_dir": str(tmp_path / "out"), "methods": ["fare", "robust_vit", "fare_advit", "rvit_large"],
        "small_model": "world:small", "large_model": "world:large",
        "train_eps": "8/255", "train_images": 32, "versus": [["fare_advit", "fare"]],
        "train": {
            "fare": {"overrides": {"max_steps": 1}},
            "robust_vit": {"trainer": "classifier"},
            "fare_advit": {"trainer": "instruct", "inputs": {"encoder": "fare"}},
            "rvit_large": {"trainer": "instruct", "size": "large", "inputs": {"vision_backbone": "robust_vit"}},
        },
        "eval": {"overrides": {"num_samples": 2}},
        "eval_targeted": {"config": "configs/eval/world_targeted.yaml", "overrides": {"num_samples": 2}},
    }


def test_instruct_and_classifier_methods_get_their_stages_inputs_and_reports(tmp_path, monkeypatch):
    calls = []

    def stage_declaring_its_outputs(argv):
        calls.append(argv)
        if argv[0] == "train":  # what a trainer declares: the pipeline reads its inputs from there, not by convention
            run = yaml.safe_load(Path(argv[argv.index("--config") + 1]).read_text())["output_dir"]
            outputs = {name: Path(run, name) for name in ("encoder", "classifier", "model")}
            for path in outputs.values():
                path.mkdir(parents=True)
            write_stage_outputs(run, **outputs)

    monkeypatch.setattr(pipeline, "_adpo", stage_declaring_its_outputs)
    pipeline.run_pipeline(pipeline.PipelineConfig.from_yaml(_write(tmp_path, _config(tmp_path))))
    out = tmp_path / "out"
    stage = lambda *parts: yaml.safe_load(out.joinpath(*parts, "stage_config.yaml").read_text())  # noqa: E731
    commands = [tuple(argv[:2]) for argv in calls]
    assert commands[:4] == [("train", "fare"), ("train", "classifier"), ("train", "instruct"), ("train", "instruct")]
    assert commands.count(("transfer", "--config")) == 1  # only the encoder is grafted
    advit, rvit = stage("train", "fare_advit"), stage("train", "rvit_large")
    assert advit["encoder"] == str(out / "train/fare/run/encoder") and advit["model_name_or_path"] == "world:small"
    assert advit["attack_eps"] == "8/255" and advit["max_train_samples"] == 32
    assert rvit["vision_backbone"] == str(out / "train/robust_vit/run/classifier") and rvit["model_name_or_path"] == "world:large"
    assert "max_train_samples" not in stage("train", "robust_vit")  # its pretraining is not the LVLMs' budget
    # a tuned LVLM is scored as exported, on its own size only; the classifier is not an LVLM
    assert sorted(p.name for p in (out / "eval").iterdir()) == [
        "large-fare", "large-original", "large-rvit_large", "small-fare", "small-fare_advit", "small-original"]
    assert stage("eval", "small-fare_advit")["model"] == str(out / "train/fare_advit/run/model")
    assert stage("eval-targeted", "large-rvit_large")["task"] == "targeted"
    reports = [argv for argv in calls if argv[:2] == ["eval", "compare"]]
    assert len(reports) == 2 and all("/eval-targeted/" in arg for arg in reports[1][2 : reports[1].index("--names")])
    versus = [reports[0][i + 1 : i + 3] for i, arg in enumerate(reports[0]) if arg == "--versus"]
    assert versus == [["fare_advit (small)", "fare (small)"]]  # fare_advit has no large model


@pytest.mark.parametrize("change, message", [
    ({"size": "huge"}, "size is small or large"),
    ({"inputs": {"tokenizer": "fare"}}, "inputs maps"),
    ({"inputs": {"encoder": "tecoa"}}, "unknown methods"),
])
def test_bad_instruct_entries_are_refused(tmp_path, change, message):
    content = _config(tmp_path)
    content["train"]["fare_advit"].update(change)
    with pytest.raises(UsageError, match=message):
        pipeline.PipelineConfig.from_yaml(_write(tmp_path, content))


def test_the_shipped_world_study_parses():
    config = pipeline.PipelineConfig.from_yaml(Path(__file__).resolve().parents[1] / "configs" / "world_instruct.yaml")
    names = [stage.name for stage in pipeline.build_stages(config)]
    assert names[-1] == "report-targeted" and "eval-large-rvit_large" in names and "transfer-rvit" not in names


def test_without_the_large_lvlm_its_instruct_methods_do_not_train(tmp_path, monkeypatch):
    monkeypatch.setattr(pipeline, "_adpo", lambda argv: None)
    content = _config(tmp_path) | {"eval_large": False}
    names = [stage.name for stage in pipeline.build_stages(pipeline.PipelineConfig.from_yaml(_write(tmp_path, content)))]
    assert "train-fare_advit" in names and not any("rvit_large" in name or "large" in name for name in names)
