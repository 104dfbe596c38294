"""Every shipped eval config parses into an EvalConfig (the dataclass validates task, schedule, eps)."""

from pathlib import Path

import pytest
from trl import TrlParser

from adpo.eval.config import EvalConfig
from adpo.threat import parse_eps

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs" / "eval").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_eval_config_parses(path):
    (config,) = TrlParser((EvalConfig,)).parse_args_and_config(["--config", str(path)])
    assert config.steps >= 1 and config.eps
    for eps in config.eps:
        if eps != "world":
            assert 0 < parse_eps(eps) < 1


def test_configs_exist():
    assert {"world_vqa.yaml", "world_caption.yaml", "world_zeroshot.yaml", "world_targeted.yaml"} <= {p.name for p in CONFIGS}


def test_bad_config_values_name_the_key():
    with pytest.raises(ValueError, match="task="):
        EvalConfig(task="segmentation")
    with pytest.raises(ValueError, match="precision_schedule"):
        EvalConfig(precision_schedule=["fp8"])
