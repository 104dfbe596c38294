"""pairs/ on the bundled world's small LVLM (real LM; marked `world`)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from adpo.threat import ThreatModel
from pairs import FEATURES, load_pairs
from pairs.cli import parse_config
from pairs.generate import run


@pytest.mark.world
def test_world_pairs_use_the_world_eps_and_stay_in_its_ball(tmp_path):
    from adpo.world import world_config

    config = parse_config([
        "--config", str(Path(__file__).parents[1] / "configs" / "pairs" / "world.yaml"), "--output_dir", str(tmp_path / "out"), "--max_images", "4",
        "--prompts_per_image", "1", "--attack_steps", "2", "--max_new_tokens", "6", "--batch_size", "4", "--progress", "false",
    ])
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        summary = run(config)
    finally:
        torch.set_num_threads(previous)
    dataset = load_pairs(tmp_path / "out")
    eps = float(world_config()["working_eps"])
    assert len(dataset) == 4 and set(FEATURES) <= set(dataset.column_names)
    assert summary["attack"]["eps"] == pytest.approx(eps) and dataset[0]["model_id"] == "world:small"
    threat = ThreatModel("linf", eps)
    for row in dataset:
        clean, adv = (torch.from_numpy(np.asarray(row[c], dtype=np.float32) / 255).permute(2, 0, 1)[None] for c in ("image", "adv_image"))
        assert clean.shape[-1] == world_config()["image_size"]
        assert bool(threat.contains(adv, clean).all()) and bool((adv != clean).any())
        assert row["ref_chosen_logps"] < 0 and row["ref_rejected_logps"] < 0
