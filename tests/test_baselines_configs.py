"""Every shipped FARE / TeCoA / Sim-CLIP config parses into its dataclass with the published recipe."""

from pathlib import Path

import pytest
from transformers.trainer_utils import SchedulerType
from trl import TrlParser

from trainers.fare import FareConfig
from trainers.simclip import SimClipConfig
from trainers.tecoa import TecoaConfig

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
CLASSES = {"fare": FareConfig, "tecoa": TecoaConfig, "simclip": SimClipConfig}
PAPER = [(m, p) for m in CLASSES for p in sorted((CONFIGS / m).glob("*.yaml")) if p.stem != "world"]


def _parse(method: str, path: Path, *extra: str):
    # the paper configs' hub datasets are not on the (offline) test machine, and a config refuses what it cannot
    # read: a folder stands in for them
    stand_in = [] if path.stem == "world" else ["--dataset", str(CONFIGS)]
    (config,) = TrlParser([CLASSES[method]]).parse_args_and_config(["--config", str(path), "--use_cpu", "true", *stand_in, *extra])
    return config


@pytest.mark.parametrize("method, path", PAPER, ids=[f"{m}/{p.name}" for m, p in PAPER])
def test_paper_configs_follow_the_published_recipe(method, path):
    config = _parse(method, path)
    eps = config.threat_model().eps * 255
    assert round(eps, 6) in (2.0, 4.0) and f"eps{round(eps)}" in path.stem
    assert config.attack_steps == 10 and config.threat_model().alpha == pytest.approx(1 / 255)
    assert config.learning_rate == pytest.approx(1e-5) and config.weight_decay == pytest.approx(1e-4)
    assert SchedulerType(config.lr_scheduler_type) == SchedulerType.COSINE and 0 < config.warmup_steps < 1
    assert config.per_device_train_batch_size * config.gradient_accumulation_steps == 128
    if method == "tecoa":
        assert config.text_model_name_or_path and config.class_prompt_template == "This is a photo of a {}"


def test_every_method_ships_eps_2_and_4_for_clip_and_llava():
    for method in CLASSES:
        names = {p.name for p in (CONFIGS / method).glob("*.yaml")}
        for eps in (2, 4):
            assert {f"clip-vit-l14-336-eps{eps}.yaml", f"llava-1.5-7b-eps{eps}.yaml"} <= names


def test_command_line_overrides_the_file():
    config = _parse("fare", CONFIGS / "fare" / "clip-vit-l14-336-eps2.yaml", "--attack_eps", "4/255", "--embedding", "llm")
    assert config.threat_model().eps == pytest.approx(4 / 255) and config.embedding == "llm"


def test_bad_values_are_named():
    with pytest.raises(ValueError, match="embedding"):
        _parse("fare", CONFIGS / "fare" / "clip-vit-l14-336-eps2.yaml", "--embedding", "cls")


@pytest.mark.parametrize("method", sorted(CLASSES))
def test_world_configs_use_the_world_eps_and_the_world_clip(method):
    from adpo.world import world_config

    config = _parse(method, CONFIGS / method / "world.yaml")
    assert config.threat_model().eps == pytest.approx(float(world_config()["working_eps"]))
    assert config.model_name_or_path == "world:clip" and config.dataset == "world"
    assert config.attack_steps == 10 and config.threat_model().alpha == pytest.approx(1 / 255)
    if method == "tecoa":
        assert config.text_model_name_or_path == "world:clip" and config.class_prompt_template == "a photo of a {}"


@pytest.mark.parametrize("method, path", PAPER, ids=[f"{m}/{p.name}" for m, p in PAPER])
def test_gpu_configs_run_unedited_as_a_float32_smoke_test_without_a_gpu(method, path, monkeypatch):
    import adpo.runtime

    monkeypatch.setattr(adpo.runtime, "has_accelerator", lambda: False)
    for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):  # else the config refuses its hub dataset, not cached here
        monkeypatch.setenv(name, "0")
    (config,) = TrlParser([CLASSES[method]]).parse_args_and_config(["--config", str(path)])
    assert config.use_cpu and not config.bf16 and not config.fp16
    assert config.model_dtype in (None, "float32") and config.load_dtype in (None, "float32")
