import json
from pathlib import Path

import pytest
import yaml

from adpo import pipeline, runtime
from adpo.runtime import write_stage_outputs
from adpo.threat import DEPRECATED_THREAT_KEYS


STAGE_OUTPUT = runtime.stage_output


@pytest.fixture(autouse=True)
def declared_outputs(monkeypatch):
    """Stages faked by these tests write nothing: a trained encoder is where every trainer declares it."""
    monkeypatch.setattr(runtime, "stage_output", lambda directory, name: Path(directory) / name)
    monkeypatch.setattr(pipeline, "_declares_outputs", lambda directory: True)


def run_stages_in_process(monkeypatch):
    """Run each stage in this process (production starts a process per stage), so a test can reach into it."""
    from adpo.cli import main

    def in_process(argv):
        code = main(argv)
        if code:
            raise pipeline.StageFailed(argv, code)

    monkeypatch.setattr(pipeline, "_adpo", in_process)


def _config(tmp_path, methods=("fare", "adpo"), eval_samples=2):
    content = {
        "output_dir": str(tmp_path / "out"),
        "small_model": "world:small",
        "large_model": "world:large",
        "methods": list(methods),
        "pairs": {"overrides": {"max_images": 4}},
        "train": {m: {"overrides": {"max_steps": 1}} for m in methods},
        "eval": {"overrides": {"num_samples": eval_samples}},
    }
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump(content))
    return pipeline.PipelineConfig.from_yaml(path)


def test_stage_order_and_generated_configs(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(pipeline, "_adpo", lambda argv: calls.append(argv))
    config = _config(tmp_path)
    pipeline.run_pipeline(config)
    commands = [tuple(argv[:2]) for argv in calls]
    assert commands[0] == ("pairs", "--config")
    assert commands[1:3] == [("train", "fare"), ("train", "adpo")]
    assert commands[3:5] == [("transfer", "--config")] * 2
    assert commands[-1] == ("eval", "compare")
    assert len([c for c in commands if c == ("eval", "--config")]) == 6  # {original, fare, adpo} x {small, large}
    adpo_config = yaml.safe_load((tmp_path / "out/train/adpo/stage_config.yaml").read_text())
    assert adpo_config["dataset_path"].endswith("pairs/run/dataset") and adpo_config["max_steps"] == 1
    large_adpo = yaml.safe_load((tmp_path / "out/eval/large-adpo/stage_config.yaml").read_text())
    assert large_adpo["model"].endswith("transfer/adpo/model") and large_adpo["num_samples"] == 2


def test_report_compares_each_encoder_with_the_undefended_model_of_its_own_lvlm(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(pipeline, "_adpo", lambda argv: calls.append(argv))
    pipeline.run_pipeline(_config(tmp_path))
    compare = calls[-1]
    directories = compare[2 : compare.index("--names")]
    names = compare[compare.index("--names") + 1 : compare.index("--baseline")]
    # the row labels are the names the eval stages gave their reports, in the same order
    stage_names = [yaml.safe_load((tmp_path / "out/eval" / d.split("/")[-2] / "stage_config.yaml").read_text())["name"] for d in directories]
    assert names == stage_names == ["original (small)", "fare (small)", "adpo (small)", "original (large)", "fare (large)", "adpo (large)"]
    baselines = [compare[i + 1] for i, arg in enumerate(compare) if arg == "--baseline"]
    assert baselines == ["original (small)", "original (large)"]


def test_report_adds_the_transfer_stage_feature_shift_of_each_encoder(tmp_path, monkeypatch):
    shifts = {"fare": 0.3, "adpo": 0.6}

    def fake_adpo(argv):
        if argv[0] == "transfer":
            stage = yaml.safe_load(open(argv[argv.index("--config") + 1]))
            method = stage["encoder"].split("/train/")[1].split("/")[0]
            model_dir = Path(stage["out"])
            model_dir.mkdir(parents=True)
            verification = {"num_samples": 16, "original_feature_shift_mean": 0.6, "original_feature_shift_max": 1.0,
                            "grafted_feature_shift_threat": "linf eps=4/255", "grafted_feature_shift_mean": shifts[method],
                            "grafted_feature_shift_max": 2 * shifts[method]}
            (model_dir / "graft_report.json").write_text(json.dumps({"verification": verification}))
        elif argv[:2] == ["eval", "compare"]:
            (Path(argv[argv.index("--out") + 1]) / "compare.md").write_text("# compare\n")

    monkeypatch.setattr(pipeline, "_adpo", fake_adpo)
    report = pipeline.run_pipeline(_config(tmp_path))
    text = (report / "compare.md").read_text()
    assert text.startswith("# compare\n") and "16 verification images (linf eps=4/255)" in text
    assert text.endswith("| original | 0.600 | 1.000 |\n| fare | 0.300 | 0.600 |\n| adpo | 0.600 | 1.200 |\n")
    table = json.loads((report / "feature_shift.json").read_text())
    assert table["num_images"] == 16 and table["shift"]["fare"] == {"mean": 0.3, "max": 0.6}


def test_rerun_skips_finished_stages_and_resumes_after_a_crash(tmp_path, monkeypatch):
    calls = []

    def crash_in_adpo(argv):
        calls.append(argv[:2])
        if argv[:2] == ["train", "adpo"]:
            raise RuntimeError("killed")

    monkeypatch.setattr(pipeline, "_adpo", crash_in_adpo)
    config = _config(tmp_path)
    with pytest.raises(RuntimeError, match="killed"):
        pipeline.run_pipeline(config)
    assert calls == [["pairs", "--config"], ["train", "fare"], ["train", "adpo"]]
    calls.clear()
    monkeypatch.setattr(pipeline, "_adpo", lambda argv: calls.append(argv[:2]))
    pipeline.run_pipeline(config)
    assert calls[0] == ["train", "adpo"]  # pairs and fare were not redone
    assert ["pairs", "--config"] not in calls and ["train", "fare"] not in calls
    calls.clear()
    pipeline.run_pipeline(config)
    assert calls == []
    pipeline.run_pipeline(config, force_stages=("train-fare",))
    # the stages that read FARE's encoder are redone with it; nothing else is
    assert calls == [["train", "fare"], ["transfer", "--config"], ["eval", "--config"], ["eval", "--config"], ["eval", "compare"]]
    assert json.loads((tmp_path / "out/eval/large-fare/STAGE_DONE.json").read_text())["inputs"] == {
        "transfer-fare": json.loads((tmp_path / "out/transfer/fare/STAGE_DONE.json").read_text())["run_id"]}


def test_forced_stage_starts_from_an_empty_directory(tmp_path, monkeypatch):
    seen = {}

    def record(argv):
        if argv[:2] == ["train", "fare"]:
            seen["stale"] = (tmp_path / "out/train/fare/run/checkpoint-8").exists()

    monkeypatch.setattr(pipeline, "_adpo", record)
    config = _config(tmp_path)
    pipeline.run_pipeline(config)
    stale = tmp_path / "out/train/fare/run/checkpoint-8"
    stale.mkdir(parents=True)  # e.g. left by a run with other settings: a forced stage must not resume it
    pipeline.run_pipeline(config, force_stages=("train-fare",))
    assert seen["stale"] is False and not stale.exists()
    assert (tmp_path / "out/train/fare/STAGE_DONE.json").exists()
    stale.mkdir(parents=True)
    pipeline.run_pipeline(config)  # not forced: finished stages and their files are left alone
    assert stale.exists()


def _stage_of(argv):
    """The stage directory an ``adpo`` call of the pipeline works in (from its --config path)."""
    return Path(argv[argv.index("--config") + 1]).parent.name if "--config" in argv else "report"


def test_a_changed_setting_redoes_the_stages_it_reaches_and_says_why(tmp_path, monkeypatch, capsys):
    ran = []
    monkeypatch.setattr(pipeline, "_adpo", lambda argv: ran.append(_stage_of(argv)))
    pipeline.run_pipeline(_config(tmp_path))
    transfer_record = (tmp_path / "out/transfer/adpo/STAGE_DONE.json").read_text()
    ran.clear()
    capsys.readouterr()
    report = pipeline.run_pipeline(_config(tmp_path, eval_samples=3))
    # only the evaluations changed: the six eval stages and the report that reads them run again
    assert ran == ["small-original", "small-fare", "small-adpo", "large-original", "large-fare", "large-adpo", "report"]
    assert "eval-small-fare: redoing from scratch, its settings changed (num_samples: 2 -> 3)" in capsys.readouterr().out
    assert (tmp_path / "out/transfer/adpo/STAGE_DONE.json").read_text() == transfer_record
    assert yaml.safe_load((tmp_path / "out/eval/small-fare/stage_config.yaml").read_text())["num_samples"] == 3
    assert report == tmp_path / "out/report"
    ran.clear()
    pipeline.run_pipeline(_config(tmp_path, eval_samples=3))
    assert ran == []


def test_a_run_recorded_under_the_old_attack_key_names_is_not_redone(tmp_path, monkeypatch):
    ran = []
    monkeypatch.setattr(pipeline, "_adpo", lambda argv: ran.append(_stage_of(argv)))
    config = _config(tmp_path)
    config.train["fare"].overrides.update(attack_eps="4/255", attack_steps=3)
    pipeline.run_pipeline(config)
    for done in (tmp_path / "out").rglob("STAGE_DONE.json"):  # as adpo wrote them before eps/steps were renamed
        record = json.loads(done.read_text())
        record["settings"] = {{v: k for k, v in DEPRECATED_THREAT_KEYS.items()}.get(key, key): value
                              for key, value in record["settings"].items()}
        done.write_text(json.dumps(record))
    assert {"eps", "steps"} <= json.loads((tmp_path / "out/train/fare/STAGE_DONE.json").read_text())["settings"].keys()
    ran.clear()
    pipeline.run_pipeline(config)
    assert ran == []


def test_new_weights_behind_a_model_name_redo_the_stages_that_load_it(tmp_path, monkeypatch):
    import adpo.models

    weights = {"world:small": "world-1", "world:large": "world-1"}
    monkeypatch.setattr(adpo.models, "model_identity", lambda name: weights[name])
    monkeypatch.setattr(pipeline, "_adpo", lambda argv: None)
    config = _config(tmp_path)
    pipeline.run_pipeline(config)
    weights["world:large"] = "world-2"  # e.g. the large world LVLM rebuilt under the same name
    states = dict((stage.name, state) for stage, state in pipeline.stage_states(config))
    large = ["transfer-fare", "transfer-adpo", "eval-large-original"]
    assert all(states[name] == "redo: the weights behind world:large changed" for name in large)
    assert states["eval-large-fare"] == "redo: its input stage transfer-fare is redone"
    assert all(states[name] == "done" for name in ["pairs", "train-fare", "train-adpo", "eval-small-original", "eval-small-adpo"])


def test_the_same_output_directory_spelled_otherwise_or_moved_redoes_nothing(tmp_path, monkeypatch):
    ran = []
    monkeypatch.setattr(pipeline, "_adpo", lambda argv: ran.append(argv))
    monkeypatch.chdir(tmp_path)
    config = _config(tmp_path)
    config.output_dir = "out"
    pipeline.run_pipeline(config)
    assert len(ran) == 12
    config.output_dir = str(tmp_path / "out")
    pipeline.run_pipeline(config)
    (tmp_path / "out").rename(tmp_path / "moved")
    config.output_dir = "moved"
    pipeline.run_pipeline(config)
    assert len(ran) == 12


def test_a_stage_killed_half_way_resumes_only_under_the_same_settings(tmp_path, monkeypatch):
    seen = []

    def killed_in_eval(argv):
        if argv[0] == "eval" and _stage_of(argv) == "small-fare":
            left = tmp_path / "out/eval/small-fare/report/partial"
            seen.append(left.exists())
            left.parent.mkdir(parents=True, exist_ok=True)
            left.touch()
            raise RuntimeError("killed")

    monkeypatch.setattr(pipeline, "_adpo", killed_in_eval)
    for samples in (2, 2, 3):
        with pytest.raises(RuntimeError, match="killed"):
            pipeline.run_pipeline(_config(tmp_path, eval_samples=samples))
    # first run: nothing to resume; rerun with the same settings: resumes what was left; changed settings: a fresh start
    assert seen == [False, True, False]
    assert [state for _, state in pipeline.stage_states(_config(tmp_path, eval_samples=3))][5:8] == ["done", "resumes", "to do"]


def test_list_says_what_a_rerun_would_do(tmp_path, monkeypatch):
    monkeypatch.setattr(pipeline, "_adpo", lambda argv: None)
    config = _config(tmp_path)
    assert {state for _, state in pipeline.stage_states(config)} == {"to do"}
    pipeline.run_pipeline(config)
    assert {state for _, state in pipeline.stage_states(config)} == {"done"}
    config.train["fare"].overrides["max_steps"] = 5
    states = dict((stage.name, state) for stage, state in pipeline.stage_states(config))
    assert states["train-fare"] == "redo: its settings changed (max_steps: 1 -> 5)"
    assert states["transfer-fare"] == states["eval-small-fare"] == "redo: its input stage train-fare is redone"
    assert states["report"].startswith("redo: its input stage eval-") and states["train-adpo"] == "done"
    marker = tmp_path / "out/pairs/STAGE_DONE.json"
    marker.write_text(json.dumps({"stage": "pairs", "seconds": 1.0}))  # left by an adpo before settings were recorded
    assert dict((stage.name, state) for stage, state in pipeline.stage_states(config))["pairs"] == (
        "redo: it was run by an older adpo that did not record all it ran with")


def test_a_training_run_that_declares_no_outputs_is_redone(tmp_path, monkeypatch):
    monkeypatch.setattr(pipeline, "_adpo", lambda argv: None)
    monkeypatch.setattr(pipeline, "_declares_outputs", lambda directory: (directory / "adpo_outputs.json").is_file())
    config = _config(tmp_path)
    pipeline.run_pipeline(config)
    for method in ("fare", "adpo"):
        (tmp_path / f"out/train/{method}/run/encoder").mkdir(parents=True)
        write_stage_outputs(tmp_path / f"out/train/{method}/run", encoder=tmp_path / f"out/train/{method}/run/encoder")
    (tmp_path / "out/pairs/run/dataset").mkdir(parents=True)
    write_stage_outputs(tmp_path / "out/pairs/run", dataset=tmp_path / "out/pairs/run/dataset")
    (tmp_path / "out/train/fare/run/adpo_outputs.json").unlink()  # as an adpo before outputs were declared left it
    states = dict((stage.name, state) for stage, state in pipeline.stage_states(config))
    assert states["train-fare"] == ("redo: it finished under an older adpo that did not declare its outputs "
                                    f"({tmp_path / 'out/train/fare/run/adpo_outputs.json'})")
    assert states["transfer-fare"] == "redo: its input stage train-fare is redone" and states["train-adpo"] == "done"


def test_bad_pipeline_configs_name_the_problem(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({"output_dir": "x", "methodz": ["adpo"]}))
    with pytest.raises(ValueError, match="unknown keys \\['methodz'\\]"):
        pipeline.PipelineConfig.from_yaml(path)
    path.write_text(yaml.safe_dump({"methods": ["adpo"]}))
    with pytest.raises(ValueError, match="no 'train.<method>' entry"):
        pipeline.PipelineConfig.from_yaml(path)


def _study_config(tmp_path, **top):
    content = {
        "output_dir": str(tmp_path / "out"),
        "small_model": "world:small", "large_model": "world:large", "methods": ["fare", "tecoa", "adpo"],
        "eps": "4/255",
        "train_eps": "8/255",
        "train_images": 48,
        "versus": [["adpo", "fare"]],
        "train": {"fare": {"overrides": {"max_steps": 1}}, "tecoa": {"overrides": {"max_steps": 1}},
                  "adpo": {"overrides": {"pair_source": "online", "image_source": "world", "max_steps": 1}}},
        "eval": {"overrides": {"num_samples": 2}},
        **top,
    }
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(content))
    return path


def test_online_adpo_needs_no_pairs_stage_and_every_method_gets_one_budget_and_eps(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(pipeline, "_adpo", lambda argv: calls.append(argv))
    pipeline.run_pipeline(pipeline.PipelineConfig.from_yaml(_study_config(tmp_path)))
    assert ("pairs", "--config") not in [tuple(argv[:2]) for argv in calls]
    trained = {m: yaml.safe_load((tmp_path / f"out/train/{m}/stage_config.yaml").read_text()) for m in ("fare", "tecoa", "adpo")}
    assert "dataset_path" not in trained["adpo"] and trained["adpo"]["max_images"] == 48
    assert trained["adpo"]["attack_eps"] == "8/255"
    assert trained["fare"]["max_train_samples"] == trained["tecoa"]["max_train_samples"] == 48
    assert trained["fare"]["attack_eps"] == trained["tecoa"]["attack_eps"] == "8/255"
    # the evaluation keeps its own eps
    assert yaml.safe_load((tmp_path / "out/eval/small-adpo/stage_config.yaml").read_text())["attack_eps"] == ["4/255"]
    compare = calls[-1]
    versus = [compare[i + 1 : i + 3] for i, arg in enumerate(compare) if arg == "--versus"]
    assert versus == [["adpo (small)", "fare (small)"], ["adpo (large)", "fare (large)"]]


def test_a_training_stage_resumes_from_its_checkpoints_without_recording_it(tmp_path, monkeypatch):
    monkeypatch.setattr(pipeline, "_adpo", lambda argv: None)
    pipeline.run_pipeline(_config(tmp_path))
    written = yaml.safe_load((tmp_path / "out/train/fare/stage_config.yaml").read_text())
    assert written["resume_from_checkpoint"] == "last"
    recorded = json.loads((tmp_path / "out/train/fare/STAGE_DONE.json").read_text())["settings"]
    assert "resume_from_checkpoint" not in recorded


def test_set_overrides_top_level_keys_and_refuses_others(tmp_path, monkeypatch, capsys):
    seen = {}
    monkeypatch.setattr(pipeline, "run_pipeline", lambda config, **kwargs: seen.setdefault("config", config))
    path = _study_config(tmp_path)
    assert pipeline.main(["--config", str(path), "--set", "train_eps=4/255", "--set", "train_images=96"]) == 0
    assert seen["config"].train_eps == "4/255" and seen["config"].train_images == 96
    with pytest.raises(SystemExit):
        pipeline.main(["--config", str(path), "--set", "methods=[adpo]"])
    assert "--set 'methods=[adpo]'" in capsys.readouterr().err


def test_a_variant_method_runs_its_trainer_with_its_own_overrides_and_directories(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(pipeline, "_adpo", lambda argv: calls.append(argv))
    content = {
        "output_dir": str(tmp_path / "out"), "small_model": "world:small", "large_model": "world:large",
        "methods": ["fare", "adpo", "adpo_anchor"], "versus": [["adpo_anchor", "adpo"]],
        "train": {"fare": {"overrides": {"max_steps": 1}},
                  "adpo": {"overrides": {"max_steps": 1, "pair_source": "online"}},
                  "adpo_anchor": {"trainer": "adpo", "overrides": {"max_steps": 1, "pair_source": "online", "anchor_weight": 10}}},
    }
    path = tmp_path / "variants.yaml"
    path.write_text(yaml.safe_dump(content))
    pipeline.run_pipeline(pipeline.PipelineConfig.from_yaml(path))
    commands = [tuple(argv[:2]) for argv in calls]
    assert ("pairs", "--config") not in commands  # both AdPO methods make their pairs online
    assert commands[:3] == [("train", "fare"), ("train", "adpo"), ("train", "adpo")]
    anchored = yaml.safe_load((tmp_path / "out/train/adpo_anchor/stage_config.yaml").read_text())
    assert anchored["anchor_weight"] == 10 and anchored["output_dir"].endswith("train/adpo_anchor/run")
    assert "anchor_weight" not in yaml.safe_load((tmp_path / "out/train/adpo/stage_config.yaml").read_text())
    compare = calls[-1]
    versus = [compare[i + 1 : i + 3] for i, arg in enumerate(compare) if arg == "--versus"]
    assert versus == [["adpo_anchor (small)", "adpo (small)"], ["adpo_anchor (large)", "adpo (large)"]]
    # a variant of an unknown trainer, or a name that cannot be a directory, is refused
    content["train"]["adpo_anchor"]["trainer"] = "dpo"
    path.write_text(yaml.safe_dump(content))
    with pytest.raises(ValueError, match="unknown methods"):
        pipeline.PipelineConfig.from_yaml(path)
    content["methods"], content["train"]["../x"] = ["../x"], {"trainer": "fare"}
    content["versus"] = []
    path.write_text(yaml.safe_dump(content))
    with pytest.raises(ValueError, match="name directories"):
        pipeline.PipelineConfig.from_yaml(path)


def test_versus_must_name_methods_of_the_run(tmp_path):
    with pytest.raises(ValueError, match="versus"):
        pipeline.PipelineConfig.from_yaml(_study_config(tmp_path, versus=[["adpo", "simclip"]]))


def test_the_world_study_reuses_its_validation_phase_trainings(tmp_path):
    """configs/world_study.yaml and the remedy's validation (world_study_anchor_val.yaml), run in a directory of
    configs/world_study_val.yaml, train nothing that ran there: a training stage of the same name has the same
    settings in every phase, and the small-LVLM validation scores are reused by the remedy's phase."""
    root = Path(__file__).resolve().parent.parent / "configs"
    stages = {}
    for name in ("world_study", "world_study_val", "world_study_anchor_val"):
        config = pipeline.PipelineConfig.from_yaml(root / f"{name}.yaml")
        config.output_dir = str(tmp_path / "eps8")
        stages[name] = {s.name: s for s in pipeline.build_stages(config)}
    assert [n for n in stages["world_study_val"] if n.startswith("train-")] == ["train-fare", "train-tecoa", "train-adpo"]
    for phase in ("world_study", "world_study_anchor_val"):
        for name, stage in stages[phase].items():
            if name.startswith("train-") and name in stages["world_study_val"]:
                assert stage.settings == stages["world_study_val"][name].settings, (phase, name)
    for name in ("eval-small-original", "eval-small-adpo"):
        assert stages["world_study_anchor_val"][name].settings == stages["world_study_val"][name].settings
    adpo = stages["world_study"]["train-adpo"].settings
    fare = stages["world_study"]["train-fare"].settings
    assert adpo["max_images"] == fare["max_train_samples"] == 512
    assert adpo["num_train_epochs"] == fare["num_train_epochs"] == stages["world_study"]["train-tecoa"].settings["num_train_epochs"]
    assert adpo["attack_eps"] == fare["attack_eps"] == "8/255"
    # the remedy differs from the paper's AdPO in its anchor only
    anchored = dict(stages["world_study_anchor_val"]["train-adpo_anchor"].settings)
    assert anchored.pop("anchor_weight") == 10 and anchored.pop("output_dir").endswith("adpo_anchor/run")
    assert anchored == {k: v for k, v in adpo.items() if k != "output_dir"}
    assert stages["world_study"]["eval-small-adpo"].settings["data"] == "world:test"
    assert stages["world_study_val"]["eval-small-adpo"].settings["data"] == "world:val"
    assert stages["world_study_anchor_val"]["eval-large-adpo_anchor"].settings["data"] == "world:val"
    assert "transfer-adpo" not in stages["world_study_val"]


@pytest.mark.world
def test_adpo_run_killed_in_training_resumes_from_its_checkpoint_without_repeating_steps(tmp_path, monkeypatch):
    """A real FARE stage killed after its step-2 checkpoint: the rerun goes on from step 2, runs each remaining step
    once, and ends with the encoder an uninterrupted run writes."""
    import torch
    from safetensors.torch import load_file

    from trainers.encoder_trainer import EncoderAdversarialTrainer

    started_at, kill = [], {"armed": True}
    training_step = EncoderAdversarialTrainer.training_step

    def recorded_step(self, *args, **kwargs):
        started_at.append(self.state.global_step)
        if kill["armed"] and self.state.global_step == 2:  # right after the step-2 checkpoint
            kill["armed"] = False
            raise KeyboardInterrupt("killed")  # what Ctrl-C raises; the pipeline does not catch it
        return training_step(self, *args, **kwargs)

    monkeypatch.setattr(EncoderAdversarialTrainer, "training_step", recorded_step)

    def config_in(name: str) -> pipeline.PipelineConfig:
        content = {
            "output_dir": str(tmp_path / name), "small_model": "world:small", "large_model": "world:large",
            "methods": ["fare"], "eval_large": False,
            "train": {"fare": {"config": "configs/fare/world.yaml", "overrides": {
                "max_steps": 4, "save_steps": 2, "save_total_limit": 2, "per_device_train_batch_size": 2,
                "max_train_samples": 8, "attack_steps": 2, "logging_steps": 1, "report_to": "none"}}},
        }
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(content))
        return pipeline.PipelineConfig.from_yaml(path)

    run_stages_in_process(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        pipeline.run_pipeline(config_in("killed"), only=("train-fare",))
    assert started_at == [0, 1, 2]
    started_at.clear()
    pipeline.run_pipeline(config_in("killed"), only=("train-fare",))
    assert started_at == [2, 3], "the rerun did not go on from the step-2 checkpoint"
    pipeline.run_pipeline(config_in("uninterrupted"), only=("train-fare",))
    resumed, uninterrupted = (load_file(tmp_path / name / "train/fare/run/encoder/model.safetensors")
                              for name in ("killed", "uninterrupted"))
    assert resumed.keys() == uninterrupted.keys()
    assert all(torch.equal(resumed[key], uninterrupted[key]) for key in resumed)


def test_a_bad_pipeline_config_exits_2_in_one_line(tmp_path, capsys):
    from adpo.runtime import run_as_process

    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("methods: [fare\n")
    unknown = tmp_path / "unknown.yaml"
    unknown.write_text("methodz: [fare]\n")
    for path, message in ((tmp_path / "absent.yaml", "does not exist"), (bad_yaml, "not valid YAML"),
                          (unknown, "unknown keys ['methodz']")):
        assert run_as_process(lambda: pipeline.main(["--config", str(path)])) == 2
        error = capsys.readouterr().err
        assert error.startswith("adpo: error: ") and message in error and error.count("\n") == 1


def test_each_stage_runs_as_its_own_process_and_a_failed_one_stops_the_run_with_its_code(tmp_path, capfd):
    content = {"output_dir": str(tmp_path / "out"), "small_model": "world:small", "large_model": "world:large",
               "methods": ["fare"], "eval_large": False,
               "train": {"fare": {"config": "configs/fare/world.yaml", "overrides": {"attack_steps": 0}}}}
    path = tmp_path / "failing.yaml"
    path.write_text(yaml.safe_dump(content))
    assert pipeline.main(["--config", str(path), "--only", "train-fare"]) == 2
    error = capfd.readouterr().err
    assert "adpo: error: " in error and "attack_steps=0; must be >= 1" in error  # printed by the stage's process
    assert "adpo run: `adpo train fare --config" in error and "Run the same command again" in error


def test_a_trainer_declares_its_outputs_where_the_pipeline_reads_them(tmp_path):
    from adpo.runtime import STAGE_OUTPUTS

    stage_output = STAGE_OUTPUT  # the real one: the fixture stands in for it in the other tests
    (tmp_path / "encoder").mkdir()
    (tmp_path / "lvlm").mkdir()
    with pytest.raises(FileNotFoundError, match="that do not exist: encoder=encoder"):
        write_stage_outputs(tmp_path, encoder="encoder")  # a bare name is the working directory's, not output_dir's
    write_stage_outputs(tmp_path, encoder=tmp_path / "encoder", lvlm=tmp_path / "lvlm")
    assert json.loads((tmp_path / STAGE_OUTPUTS).read_text()) == {"encoder": "encoder", "lvlm": "lvlm"}
    assert stage_output(tmp_path, "encoder") == tmp_path / "encoder"
    with pytest.raises(ValueError, match="declares no 'report' output; it has \\['encoder', 'lvlm'\\]"):
        stage_output(tmp_path, "report")
    (tmp_path / "lvlm").rmdir()
    with pytest.raises(ValueError, match="declares its 'lvlm' output at .*lvlm, which does not exist"):
        stage_output(tmp_path, "lvlm")
