"""pairs/: config validation, prompt choice, work plan and split, quantisation of adversarial images (no model)."""

from __future__ import annotations

import json

import pytest

from pairs.cli import main, parse_config
from pairs.config import PairsConfig
from adpo.prompts import PROMPT_SETS, prompts_for_image
from pairs.shards import check_or_write_manifest, plan_shards, shards_for_process


def valid_config(tmp_path, **overrides) -> PairsConfig:
    settings = dict(model_name_or_path="some/model", source=str(tmp_path), output_dir=str(tmp_path / "out"))
    settings.update(overrides)
    return PairsConfig(**settings)


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"model_name_or_path": ""}, "model_name_or_path is required"),
        ({"source": ""}, "source is required"),
        ({"attack_norm": "l1"}, "attack_norm="),
        ({"attack_eps": "two"}, "attack_eps='two' is not a number"),
        ({"attack_eps": "0"}, "outside (0, 1]"),
        ({"attack_steps": -1}, "attack_steps=-1"),
        ({"prompt_set": "nope"}, "prompt_set 'nope' is unknown"),
        ({"prompts_per_image": 2}, "prompts_per_image=2"),  # the paper set has one prompt
        ({"prompts": ["a", "a"]}, "duplicates"),
        ({"embedding": "cls"}, "embedding="),
        ({"dtype": "int8"}, "dtype="),
        ({"push_to_hub": True}, "hub_repo_id"),
        ({"batch_size": 0}, "batch_size"),
        ({"model_name_or_path": "./does/not/exist"}, "not a directory"),
        ({"source": "/does/not/exist"}, "does not exist"),
        ({"source": "captions.json"}, "does not exist"),
    ],
)
def test_validate_names_the_bad_key(tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        valid_config(tmp_path, **overrides).validate()


def test_eps_forms_and_defaults(tmp_path):
    assert valid_config(tmp_path).threat().eps == pytest.approx(2 / 255)  # the paper's default
    assert valid_config(tmp_path, attack_eps="4/255").threat().eps == pytest.approx(4 / 255)
    assert valid_config(tmp_path, attack_eps="4").threat().eps == pytest.approx(4 / 255)  # whole numbers are 255ths
    assert valid_config(tmp_path, attack_eps="0.01").threat().eps == pytest.approx(0.01)


def test_yaml_config_with_command_line_override(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(
        f"model_name_or_path: some/model\nsource: {tmp_path}\noutput_dir: {tmp_path / 'out'}\n"
        "attack_eps: 2/255\nattack_steps: 5\nprompt_set: describe\nprompts_per_image: 3\n"
    )
    config = parse_config(["--config", str(path), "--attack_steps", "7"])
    assert (config.attack_steps, config.attack_eps, config.prompts_per_image) == (7, "2/255", 3)
    config.validate()


@pytest.mark.parametrize("name", ["world", "llava15_paper"])
def test_shipped_configs_parse_and_validate(tmp_path, name):
    from pathlib import Path

    path = Path(__file__).parents[1] / "configs" / "pairs" / f"{name}.yaml"
    overrides = ["--output_dir", str(tmp_path / "out")]
    if name == "llava15_paper":  # COCO is not on the test machine: point at stand-ins
        (tmp_path / "captions.json").write_text("{}")
        overrides += ["--source", str(tmp_path / "captions.json"), "--image_root", str(tmp_path)]
    config = parse_config(["--config", str(path), *overrides])
    config.validate()
    if name == "llava15_paper":
        assert (config.threat().eps, config.attack_steps, config.attack_norm, config.prompt_list()) == (pytest.approx(2 / 255), 10, "linf", ["What is in the image?"])
    else:
        assert config.resolved_source() == "world" and config.model_name_or_path == "world:small"


def test_unknown_yaml_key_is_refused(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model_name_or_path: m\nepsilon: 2\n")
    with pytest.raises(ValueError, match="epsilon"):
        parse_config(["--config", str(path)])


def test_config_error_fails_before_any_model_loads(tmp_path, monkeypatch, capsys):
    import adpo.models

    def forbidden(*args, **kwargs):
        raise AssertionError("a model was loaded despite a config error")

    monkeypatch.setattr(adpo.models, "load_lvlm", forbidden)
    from adpo.runtime import run_as_process

    argv = ["--model_name_or_path", "m", "--source", str(tmp_path), "--output_dir", str(tmp_path / "o"), "--attack_norm", "l3"]
    assert run_as_process(lambda: main(argv)) == 2
    assert "norm='l3'" in capsys.readouterr().err


def test_prompt_choice_is_seeded_per_image_and_distinct():
    prompts = list(PROMPT_SETS["describe"])
    first = prompts_for_image(prompts, 3, seed=1, source_id="img/7.png")
    assert first == prompts_for_image(prompts, 3, seed=1, source_id="img/7.png")
    assert len({i for i, _ in first}) == 3
    choices = {tuple(prompts_for_image(prompts, 3, seed=s, source_id=f"{k}")) for s in range(3) for k in range(20)}
    assert len(choices) > 10  # seed and image both change the choice
    assert prompts_for_image(prompts, len(prompts), seed=5, source_id="x") == list(enumerate(prompts))


def test_plan_is_image_major_and_processes_split_without_overlap():
    ids = [f"img{i}" for i in range(11)]
    shards = plan_shards(ids, list(PROMPT_SETS["describe"]), 2, seed=0, images_per_shard=3)
    assert [len(s.image_positions) for s in shards] == [3, 3, 3, 2]
    items = [item for shard in shards for item in shard.items]
    assert [item.item_index for item in items] == list(range(22))
    assert [item.source_id for item in items] == [i for i in ids for _ in range(2)]
    for n in (1, 2, 3, 5):
        taken = [s.shard_index for p in range(n) for s in shards_for_process(shards, p, n)]
        assert sorted(taken) == list(range(len(shards)))


def test_duplicate_source_ids_are_refused():
    with pytest.raises(ValueError, match="'b' twice"):
        plan_shards(["a", "b", "b"], ["q"], 1, 0, 2)


def test_resume_with_changed_content_settings_is_refused(tmp_path):
    config = valid_config(tmp_path)
    manifest = {"fingerprint": config.fingerprint_hash(), "plan_digest": "p", "eps": 2 / 255, "config": config.content_fingerprint()}
    check_or_write_manifest(tmp_path, manifest, write=True)
    check_or_write_manifest(tmp_path, manifest, write=True)  # same settings: fine
    # output-only settings may change on resume
    relaxed = valid_config(tmp_path, keep_unchanged=False, progress=False)
    assert relaxed.fingerprint_hash() == config.fingerprint_hash()
    changed = valid_config(tmp_path, attack_steps=3)
    other = {**manifest, "fingerprint": changed.fingerprint_hash(), "config": changed.content_fingerprint()}
    with pytest.raises(ValueError, match="changed: attack_steps"):
        check_or_write_manifest(tmp_path, other, write=True)
    assert json.loads((tmp_path / "run.json").read_text())["config"]["attack_steps"] == 10


def test_resume_with_rebuilt_model_weights_under_the_same_name_is_refused(tmp_path):
    import os

    model_dir = tmp_path / "model"
    model_dir.mkdir()
    (model_dir / "config.json").write_text('{"model_type": "llava"}')
    (model_dir / "model.safetensors").write_bytes(b"first")
    config = valid_config(tmp_path, model_name_or_path=str(model_dir))
    manifest = {"fingerprint": config.fingerprint_hash(), "plan_digest": "p", "eps": 2 / 255, "config": config.content_fingerprint()}
    check_or_write_manifest(tmp_path, manifest, write=True)
    (model_dir / "model.safetensors").write_bytes(b"retrained")
    os.utime(model_dir / "model.safetensors", ns=(1, 1))
    rebuilt = valid_config(tmp_path, model_name_or_path=str(model_dir))
    assert rebuilt.fingerprint_hash() != manifest["fingerprint"]  # same name, other weights
    other = {**manifest, "fingerprint": rebuilt.fingerprint_hash(), "config": rebuilt.content_fingerprint()}
    with pytest.raises(ValueError, match="changed: model_weights"):
        check_or_write_manifest(tmp_path, other, write=True)




def test_the_pairs_format_is_checked_where_it_is_read(tmp_path):
    import datasets

    from adpo.errors import UsageError
    from adpo.pairs_format import FORMAT_VERSION, REQUIRED_COLUMNS, check_pairs, load_pairs, stamp

    rows = {name: ["x"] for name in REQUIRED_COLUMNS}
    stamp(datasets.Dataset.from_dict(rows)).save_to_disk(str(tmp_path / "pairs"))
    loaded = load_pairs(tmp_path / "pairs")
    assert loaded.info.version == FORMAT_VERSION and loaded.column_names == list(REQUIRED_COLUMNS)
    with pytest.raises(UsageError, match=r"lacks columns \['rejected'\]"):
        check_pairs(datasets.Dataset.from_dict({k: v for k, v in rows.items() if k != "rejected"}), "mine")
    newer = datasets.Dataset.from_dict(rows)
    newer.info.version = datasets.Version(f"{FORMAT_VERSION.major + 1}.0.0")
    with pytest.raises(UsageError, match="newer than this adpo reads"):
        check_pairs(newer, "future")
    (tmp_path / "unfinished").mkdir()
    (tmp_path / "unfinished" / "run.json").write_text("{}")
    with pytest.raises(UsageError, match="unfinished pairs run"):
        load_pairs(tmp_path / "unfinished")
