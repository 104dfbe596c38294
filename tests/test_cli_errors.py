"""Errors a user can act on: every stage refuses a bad config value, an unknown key, a missing input or an
unwritable output before any model loads, as one line (``adpo: error: ...``) and exit code 2; a fuzz test over
generated configs checks that validation raises nothing but a one-line UsageError."""

from __future__ import annotations

import errno
import os

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from adpo.cli import main as adpo_main
from adpo.errors import DEBUG_ENV, UsageError, parse_config
from adpo.runtime import run_as_process


@pytest.fixture
def inputs(tmp_path):
    """An image folder, a saved dataset without an image column, and a plain file (a path under it can never be
    created, even by root)."""
    from datasets import Dataset

    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(2):
        Image.new("RGB", (8, 8), (40 * i, 0, 0)).save(folder / f"{i}.png")
    Dataset.from_dict({"picture": ["a", "b"]}).save_to_disk(str(tmp_path / "no_image_column"))
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    return {"folder": str(folder), "no_image_column": str(tmp_path / "no_image_column"), "file": str(blocker),
            "out": str(tmp_path / "out")}


@pytest.fixture
def no_model(monkeypatch):
    """Every model loader of every stage fails the test: the errors must come before any of them."""
    import adpo.eval.loading
    import adpo.models
    import pairs.generate
    import trainers.adpo
    import trainers.fare
    import trainers.tecoa
    import transfer.graft

    def forbidden(*args, **kwargs):
        raise AssertionError("a model was loaded before the config was checked")

    for module, name in [(adpo.models, "load_lvlm"), (pairs.generate, "load_lvlm"), (trainers.fare, "load_encoder_for_training"),
                         (trainers.tecoa, "load_encoder_for_training"), (trainers.adpo, "load_lvlm_for_tower_training"),
                         (adpo.eval.loading, "prepare"), (transfer.graft, "load_donor")]:
        monkeypatch.setattr(module, name, forbidden)


def run_adpo(argv, capsys) -> tuple[int, str]:
    """``adpo <argv>`` as the installed command runs it: (exit code, its one error line)."""
    code = run_as_process(lambda: adpo_main(argv))
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("adpo: error:")]
    assert len(lines) == 1, lines
    return code, lines[0]


def pairs_argv(inputs, *extra):
    return ["pairs", "--model_name_or_path", "world:small", "--source", inputs["folder"], "--output_dir", inputs["out"], *extra]


def fare_argv(inputs, *extra):
    return ["train", "fare", "--model_name_or_path", "world:clip", "--dataset", inputs["folder"], "--output_dir",
            inputs["out"], "--report_to", "none", *extra]


def adpo_argv(inputs, *extra):
    return ["train", "adpo", "--model_name_or_path", "world:small", "--pair_source", "online", "--image_source",
            inputs["folder"], "--output_dir", inputs["out"], "--report_to", "none", *extra]


def eval_argv(inputs, *extra):
    return ["eval", "--model", "world:small", "--data", "world:test", "--output_dir", inputs["out"], *extra]


def transfer_argv(inputs, *extra):
    return ["transfer", "--encoder", "world:small", "--target", "world:large", "--out", inputs["out"], *extra]


def convert_argv(inputs, *extra):
    return ["transfer", "convert", "--out", inputs["out"], *extra]


CASES = [
    # (stage argv builder, extra arguments, what the one line says)
    (adpo_argv, ["--attack_eps", "300/255"], "attack_eps='300/255' is 1.176, outside (0, 1]"),
    (adpo_argv, ["--attack_eps", "abc"], "attack_eps='abc' is not a number; write a fraction like 2/255"),
    (adpo_argv, ["--attack_eps", "-1"], "attack_eps='-1' is -1, outside (0, 1]"),
    (adpo_argv, ["--attack_steps", "-3"], "attack_steps=-3; must be >= 1"),
    (adpo_argv, ["--attack_steps", "abc"], "--attack-steps: invalid int value: 'abc'; `adpo train adpo --help` lists"),
    # a combination transformers' TrainingArguments refuses when the config is built
    (fare_argv, ["--load_best_model_at_end", "true", "--save_strategy", "steps", "--eval_strategy", "no"], "load_best_model_at_end"),
    (fare_argv, ["--learning_rate", "fast"], "--learning-rate: invalid float value: 'fast'"),
    (adpo_argv, ["--max_steps", "-5"], "max_steps=-5; use -1 to train num_train_epochs, or a number of steps >= 1"),
    (adpo_argv, ["--image_source", "no/such/images"], "image_source='no/such/images' does not exist"),
    (fare_argv, ["--attack_eps", "300/255"], "eps='300/255' is 1.176, outside (0, 1]"),
    (fare_argv, ["--attack_eps", "1.5"], "eps=1.5 is neither below 1 (pixels) nor a whole number of 255ths"),
    (fare_argv, ["--attack_steps", "-3"], "attack_steps=-3; must be >= 1"),
    (fare_argv, ["--max_steps", "-5"], "max_steps=-5"),
    (fare_argv, ["--per_device_train_batch_size", "0"], "per_device_train_batch_size=0; must be >= 1"),
    (fare_argv, ["--model_dtype", "int7"], "model_dtype: unknown dtype 'int7'; use one of"),
    (adpo_argv, ["--encoder_copy_dtype", "int7"], "encoder_copy_dtype: unknown dtype 'int7'; use one of"),
    (fare_argv, ["--dataset", "no/such/images"], "dataset='no/such/images' does not exist"),
    # a relative name that is not there looks like a hub id; offline and not cached it is refused here
    (fare_argv, ["--dataset", "my_images"], "dataset='my_images' is no local path, and the hub is offline"),
    (pairs_argv, ["--attack_eps", "1.5"], "eps=1.5 is neither below 1 (pixels) nor a whole number of 255ths; write"),
    (pairs_argv, ["--attack_steps", "0"], "steps=0; must be >= 1"),
    (pairs_argv, ["--source", "no/such/images"], "source='no/such/images' does not exist"),
    # the image-source keys pairs and AdPO's online pairs share (adpo.sources.ImageSourceArguments): one check, one line
    (pairs_argv, ["--max_images", "0"], "max_images=0; must be >= 1 or unset"),
    (adpo_argv, ["--max_images", "0"], "max_images=0; must be >= 1 or unset"),
    (pairs_argv, ["--image_root", "no/such/folder"], "image_root='no/such/folder' is not a directory"),
    (adpo_argv, ["--image_root", "no/such/folder"], "image_root='no/such/folder' is not a directory"),
    (eval_argv, ["--attack_eps", "2/255", "1.5"], "eps=1.5 is neither below 1"),
    (eval_argv, ["--attack_steps", "0"], "steps=0 must be >= 1"),
    (eval_argv, ["--data", "no/such/data"], "data='no/such/data' does not exist"),
    (transfer_argv, ["--robust_eps", "300/255", "--verify_data", "world:test"], "robust_eps='300/255' is 1.176"),
    (transfer_argv, ["--robust_steps", "0"], "robust_steps=0; must be >= 1"),
    (convert_argv, ["--from-open-clip", "absent.safetensors", "--activation", "gelu"], "'absent.safetensors' does not exist"),
]


@pytest.mark.parametrize("build, extra, message", CASES, ids=[f"{b.__name__[:-5]}:{' '.join(e)}" for b, e, _ in CASES])
def test_bad_values_exit_2_with_one_line_before_any_model_loads(build, extra, message, inputs, no_model, capsys):
    code, line = run_adpo(build(inputs, *extra), capsys)
    assert code == 2
    assert message in line and line.startswith("adpo: error: ")


def test_a_missing_column_is_named_before_the_model_loads(inputs, no_model, capsys):
    code, line = run_adpo(fare_argv(inputs, "--dataset", inputs["no_image_column"]), capsys)
    assert code == 2
    assert "has no column for image_column='image'; its columns are ['picture']: set image_column" in line


@pytest.mark.parametrize("build", [pairs_argv, fare_argv, adpo_argv, eval_argv], ids=lambda b: b.__name__[:-5])
def test_unknown_keys_exit_2_with_one_line(build, inputs, tmp_path, no_model, capsys):
    code, line = run_adpo(build(inputs, "--epsilon", "2"), capsys)
    assert code == 2 and "unknown key(s) epsilon" in line and "--help" in line
    config = tmp_path / "c.yaml"
    config.write_text("epsilon: 2\n")
    code, line = run_adpo(build(inputs, "--config", str(config)), capsys)
    assert code == 2 and "unknown key(s) epsilon" in line
    code, line = run_adpo(build(inputs, "--config", str(tmp_path / "absent.yaml")), capsys)
    assert code == 2 and "absent.yaml' is not a file" in line
    config.write_text("eps: [2/255\n")
    code, line = run_adpo(build(inputs, "--config", str(config)), capsys)
    assert code == 2 and "c.yaml' is not valid YAML: " in line
    config.write_text("- eps\n")
    code, line = run_adpo(build(inputs, "--config", str(config)), capsys)
    assert code == 2 and "must contain a YAML mapping; write one `key: value` per line" in line


WRONG_KINDS = [(pairs_argv, "steps: [1, 2]\n", "steps=[1, 2] in"), (fare_argv, "attack_steps: 2.5\n", "expected a whole number, got a float"),
               (adpo_argv, "attack_steps: {a: 1}\n", "expected a whole number, got a dict"),
               (adpo_argv, "learning_rate: true\n", "expected a number, got a bool"),
               (eval_argv, "attack_steps: [10]\n", "expected a whole number, got a list")]


@pytest.mark.parametrize("build, content, message", WRONG_KINDS, ids=[c.strip() for _, c, _ in WRONG_KINDS])
def test_a_yaml_value_of_the_wrong_kind_is_named_in_one_line(build, content, message, inputs, tmp_path, no_model, capsys):
    config = tmp_path / "kinds.yaml"
    config.write_text(content)
    code, line = run_adpo(build(inputs, "--config", str(config)), capsys)
    assert code == 2 and message in line and "kinds.yaml" in line


OUTPUT_KEYS = [(pairs_argv, "output_dir"), (fare_argv, "output_dir"), (adpo_argv, "output_dir"), (eval_argv, "output_dir"),
               (transfer_argv, "out")]


@pytest.mark.parametrize("build, key", OUTPUT_KEYS, ids=[b.__name__[:-5] for b, _ in OUTPUT_KEYS])
def test_an_output_that_cannot_be_written_is_named(build, key, inputs, tmp_path, no_model, capsys):
    # under a plain file: no one, root included, can create it
    under_file = os.path.join(inputs["file"], "run")
    code, line = run_adpo([*build(inputs), f"--{key}", under_file], capsys)
    assert code == 2 and f"{key}='{under_file}' cannot be created: {inputs['file']} is a file" in line
    if os.geteuid() == 0:
        return  # root writes into a read-only directory anyway
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    try:
        code, line = run_adpo([*build(inputs), f"--{key}", str(locked / "run")], capsys)
    finally:
        locked.chmod(0o700)
    assert code == 2 and f"{key}='{locked / 'run'}' is not writable" in line


def test_debug_keeps_the_traceback(inputs, no_model, monkeypatch):
    monkeypatch.setenv(DEBUG_ENV, "1")
    with pytest.raises(UsageError, match="attack_steps=-3"):
        run_as_process(lambda: adpo_main(adpo_argv(inputs, "--attack_steps", "-3")))


def test_adpo_debug_flag_sets_the_debug_variable(inputs, no_model, monkeypatch):
    monkeypatch.setenv(DEBUG_ENV, "0")  # restored after the test: `adpo --debug` sets it for the whole process
    with pytest.raises(UsageError, match="steps=0"):
        run_as_process(lambda: adpo_main(["--debug", *pairs_argv(inputs, "--attack_steps", "0")]))


def test_disk_full_is_one_line_and_a_bug_keeps_its_traceback(capsys):
    def disk_full():
        raise OSError(errno.ENOSPC, "No space left on device", "/data/run/shard-3.parquet")

    assert run_as_process(disk_full) == 1
    assert capsys.readouterr().err == ("adpo: error: No space left on device (/data/run/shard-3.parquet); free some space\n")

    def bug():
        raise KeyError("not the user's fault")

    with pytest.raises(KeyError):
        run_as_process(bug)


# ----------------------------------------------------------------------------------------------------
# Fuzz: generated configs either validate or raise a one-line UsageError, never anything else
# ----------------------------------------------------------------------------------------------------
RADII = st.one_of(st.sampled_from(["2/255", "300/255", "abc", "-1", "1.5", "0", "world", "0.01", "4", "1/0", "nan", "",
                                   "2/x", "255/255", "1e-3", "inf"]),
                  st.floats(allow_nan=True, allow_infinity=True).map(repr), st.integers(-300, 300).map(str))
STEPS = st.integers(-5, 12)
NORM_NAMES = st.sampled_from(["linf", "l2", "l1"])


def options(**values) -> list[str]:
    """``--key=value`` arguments (the ``=`` form, so a value may start with '-')."""
    return [f"--{key}={value}" for key, value in values.items()]


@pytest.fixture(scope="module")
def places(tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz")
    (root / "images").mkdir()
    Image.new("RGB", (8, 8)).save(root / "images" / "0.png")
    (root / "file").write_text("x")
    return {"root": root, "source": [str(root / "images"), "world", str(root / "missing" / "images"), "no_such_hub_name"],
            "out": [str(root / "out"), str(root / "file" / "out")]}


def check(dataclass_types, argv, validate=None):
    try:
        (config,) = parse_config(dataclass_types, argv, prog="adpo")
        if validate is not None:
            validate(config)
    except UsageError as error:
        assert "\n" not in str(error) and str(error).strip()


FUZZ = settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


@FUZZ
@given(data=st.data())
def test_fuzz_pairs_configs(places, data):
    from pairs.config import PairsConfig

    argv = options(model_name_or_path=data.draw(st.sampled_from(["world:small", "./missing-model", ""])),
                   source=data.draw(st.sampled_from(places["source"])), output_dir=data.draw(st.sampled_from(places["out"])),
                   attack_eps=data.draw(RADII), attack_steps=data.draw(STEPS), attack_norm=data.draw(NORM_NAMES), batch_size=data.draw(STEPS),
                   max_new_tokens=data.draw(STEPS), prompts_per_image=data.draw(st.integers(-1, 3)))
    if data.draw(st.booleans()):
        argv += options(attack_step_size=data.draw(RADII))
    check([PairsConfig], argv, PairsConfig.validate)


@FUZZ
@given(data=st.data())
def test_fuzz_fare_configs(places, data):
    from trainers.fare import FareConfig

    argv = options(model_name_or_path="world:clip", dataset=data.draw(st.sampled_from(places["source"])),
                   output_dir=data.draw(st.sampled_from(places["out"])), report_to="none", use_cpu="true",
                   eps=data.draw(RADII), attack_step_size=data.draw(RADII), attack_steps=data.draw(STEPS),
                   max_steps=data.draw(STEPS), attack_norm=data.draw(NORM_NAMES), per_device_train_batch_size=data.draw(STEPS))
    check([FareConfig], argv)


@FUZZ
@given(data=st.data())
def test_fuzz_adpo_configs(places, data):
    from trainers.adpo import AdPOConfig

    argv = options(model_name_or_path="world:small", output_dir=data.draw(st.sampled_from(places["out"])), report_to="none",
                   use_cpu="true", attack_eps=data.draw(RADII), attack_steps=data.draw(STEPS), max_steps=data.draw(STEPS),
                   attack_norm=data.draw(NORM_NAMES), max_new_tokens=data.draw(STEPS),
                   gradient_accumulation_steps=data.draw(STEPS))
    if data.draw(st.booleans()):
        argv += options(pair_source="online", image_source=data.draw(st.sampled_from(places["source"])))
    else:
        argv += options(dataset_path=data.draw(st.sampled_from(places["source"])))
    if data.draw(st.booleans()):
        argv += options(attack_step_size=data.draw(RADII))
    check([AdPOConfig], argv)


@FUZZ
@given(data=st.data())
def test_fuzz_eval_configs(places, data):
    from adpo.eval.config import EvalConfig

    # a list of epsilons goes through a YAML file, as users write it (on a command line a value may start with '-')
    config = places["root"] / "eval.yaml"
    config.write_text(yaml.safe_dump({"attack_eps": data.draw(st.lists(RADII, min_size=1, max_size=3))}))
    argv = ["--config", str(config), *options(
        model="world:small", data=data.draw(st.sampled_from(places["source"] + ["world:test"])),
        output_dir=data.draw(st.sampled_from(places["out"])), task=data.draw(st.sampled_from(["vqa", "caption", "seg"])),
        attack_steps=data.draw(STEPS), num_samples=data.draw(STEPS), step_check_steps=data.draw(STEPS), attack_norm=data.draw(NORM_NAMES))]
    check([EvalConfig], argv)
