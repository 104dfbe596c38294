"""The real-geometry conformance suite (scripts/conformance.py, issue 24) end to end at its smallest width.

Every stage runs through the ``adpo`` CLI on random stand-ins with LLaVA-1.5's exact tower geometry (336 px and
224 px, 576 and 256 image tokens), llava-hf's template on a Llama-2-style tokenizer and a Mistral target; the
suite must pass, and its checks must catch what they are there to catch.
"""

import json
import shutil
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

from adpo.encoder_io import canonical_encoder_state

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import conformance  # noqa: E402

EXPECTED_CHECKS = {
    "pairs_square_images_in_ball",
    *(f"{check}[{model}]" for check in ("prompt_ids_equal_processor", "image_tokens", "labels_end_with_end_of_turn")
      for model in ("llava15-7b-geometry", "llava15-224-geometry", "mistral-target")),
    *(f"{check}[{run}]" for check in ("encoder_is_float32", "tower_trained")
      for run in ("adpo_stored", "adpo_online", "fare", "tecoa", "fare_224")),
    "lvlm_only_tower_changed[adpo_stored]", "lvlm_only_tower_changed[fare]",
    "graft_non_tower_bit_identical", "eval_attack_took_steps", "eval_robust_at_most_clean", "eval_sanity_checks",
}


@pytest.fixture(scope="module")
def suite(tmp_path_factory):
    out = tmp_path_factory.mktemp("conformance")
    code = conformance.main(["--out", str(out), "--width", "tiny", "--in-process"])
    return out, code, json.loads((out / "conformance.json").read_text())


def test_every_stage_runs_and_every_check_holds(suite):
    out, code, summary = suite
    failed = [c for c in summary["checks"] if not c["ok"]]
    assert code == 0 and summary["ok"], failed or summary["stages"]
    assert {c["check"] for c in summary["checks"]} == EXPECTED_CHECKS
    assert [s["stage"] for s in summary["stages"]] == conformance.ORDER
    assert all(s["returncode"] == 0 and s["seconds"] > 0 and s["peak_rss_mib"] > 0 for s in summary["stages"])


def test_the_geometry_is_llava15s(suite):
    out, _, _ = suite
    config = json.loads((out / "models" / "llava15-7b-geometry" / "config.json").read_text())
    vision = config["vision_config"]
    assert (vision["image_size"], vision["patch_size"], vision["hidden_act"]) == (336, 14, "quick_gelu")
    assert (config["vision_feature_layer"], config["vision_feature_select_strategy"]) == (-2, "default")
    assert json.loads((out / "models" / "llava15-224-geometry" / "config.json").read_text())["vision_config"]["image_size"] == 224
    assert json.loads((out / "models" / "mistral-target" / "config.json").read_text())["text_config"]["model_type"] == "mistral"


def _tensor_file(directory: Path) -> Path:
    (file,) = sorted(directory.glob("*.safetensors"))
    return file


def test_a_changed_non_tower_tensor_is_caught(suite, tmp_path):
    out, _, _ = suite
    run = tmp_path / "fare"
    shutil.copytree(out / "runs" / "fare", run)
    file = _tensor_file(run / "lvlm")
    tensors = load_file(file)
    key = next(k for k in tensors if "multi_modal_projector" in k)
    tensors[key] = tensors[key].clone()
    tensors[key].view(-1)[0] += 1e-3
    save_file(tensors, file, metadata={"format": "pt"})
    checks = []
    conformance.check_training(checks, "fare", run, out / "models" / "llava15-7b-geometry", ("llm",), lvlm=True)
    assert {c["check"]: c["ok"] for c in checks}["lvlm_only_tower_changed[fare]"] is False


def test_an_untrained_encoder_is_caught(suite, tmp_path):
    out, _, _ = suite
    run = tmp_path / "fare"
    shutil.copytree(out / "runs" / "fare", run)
    original = canonical_encoder_state(conformance.read_tensors(out / "models" / "llava15-7b-geometry"))
    file = _tensor_file(run / "encoder")
    trained = load_file(file)
    save_file({k: original[k.removeprefix("vision_model.")].float().contiguous() for k in trained}, file,
              metadata={"format": "pt"})
    checks = []
    conformance.check_training(checks, "fare", run, out / "models" / "llava15-7b-geometry", ("llm",), lvlm=False)
    assert {c["check"]: c["ok"] for c in checks}["tower_trained[fare]"] is False
