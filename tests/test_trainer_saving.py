"""What the trainers write: the trained encoder (fp32 master weights) and training state, never the frozen LVLM;
a whole LVLM only on request, bit-identical to the original outside the tower; GPU configs on a CPU machine."""

from __future__ import annotations

import logging
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from datasets import Dataset, Features, Image as ImageFeature, Value
from safetensors import safe_open
from safetensors.torch import load_file
from trl import TrlParser

from adpo.encoder_io import canonical_encoder_state
from adpo.models import load_lvlm
from adpo.preprocess import to_uint8_images
import adpo.runtime
from adpo.runtime import load_lvlm_for_tower_training
from adpo.testing import random_pixels, tiny_llava
from adpo.tower import find_vision_tower
from trainers import fare
from trainers.adpo import AdPOConfig, AdPOTrainer

EPS = 4 / 255


# ----------------------------------------------------------------------------------------------------
# GPU configs on a machine without one
# ----------------------------------------------------------------------------------------------------
@pytest.fixture
def no_accelerator(monkeypatch):
    monkeypatch.setattr(adpo.runtime, "has_accelerator", lambda: False)


def _runtime_warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "adpo.runtime" and r.levelno == logging.WARNING]


def test_a_bf16_adpo_config_parses_on_cpu_into_a_float32_smoke_test(tmp_path, caplog, no_accelerator):
    config = tmp_path / "gpu.yaml"
    config.write_text("model_name_or_path: some/llava\nmodel_dtype: bfloat16\nbf16: true\n"
                      f"output_dir: {tmp_path / 'run'}\nreport_to: []\n")
    with caplog.at_level(logging.WARNING):
        (args,) = TrlParser([AdPOConfig]).parse_args_and_config(["--config", str(config)])
    assert args.use_cpu and not args.bf16 and args.model_dtype == "float32"
    (warning,) = _runtime_warnings(caplog)
    assert "CPU smoke test" in warning and "bf16: false" in warning and "model_dtype: float32" in warning


def test_a_bf16_baseline_config_loads_its_lvlm_in_float32_on_cpu(tmp_path, caplog, no_accelerator):
    with caplog.at_level(logging.WARNING):
        args = fare.FareConfig(model_name_or_path="some/llava", dataset="world", output_dir=str(tmp_path),
                               bf16=True, load_dtype="float16")
    assert args.use_cpu and not args.bf16 and args.load_dtype == "float32" and args.model_dtype is None
    assert len(_runtime_warnings(caplog)) == 1


def test_use_cpu_set_by_the_config_keeps_its_precision(tmp_path, caplog, no_accelerator):
    with caplog.at_level(logging.WARNING):
        args = AdPOConfig(output_dir=str(tmp_path), model_dtype="bfloat16", bf16=True, use_cpu=True, report_to=[])
    assert args.bf16 and args.model_dtype == "bfloat16" and not _runtime_warnings(caplog)


def test_with_an_accelerator_nothing_changes(monkeypatch):
    monkeypatch.setattr(adpo.runtime, "has_accelerator", lambda: True)
    args = SimpleNamespace(use_cpu=False, bf16=True, fp16=False, bf16_full_eval=False, fp16_full_eval=False,
                           tf32=None, model_dtype="bfloat16")
    adpo.runtime.fit_precision_to_device(args, ("model_dtype",))
    assert args == SimpleNamespace(use_cpu=False, bf16=True, fp16=False, bf16_full_eval=False, fp16_full_eval=False,
                                   tf32=None, model_dtype="bfloat16")


# ----------------------------------------------------------------------------------------------------
# AdPO
# ----------------------------------------------------------------------------------------------------
def _pairs(n: int = 4) -> Dataset:
    clean = random_pixels(n, 32, 0)
    adv = (clean + (torch.rand(clean.shape, generator=torch.Generator().manual_seed(1)) * 2 - 1) * EPS).clamp(0, 1)
    words = ["a red circle", "blue", "two small objects", "a square"]
    columns = {"image": to_uint8_images(clean), "adv_image": to_uint8_images(adv),
               "prompt": ["what is in the image ?"] * n, "chosen": words[:n], "rejected": list(reversed(words[:n]))}
    features = {"image": ImageFeature(), "adv_image": ImageFeature(), "prompt": Value("string"),
                "chosen": Value("string"), "rejected": Value("string")}
    return Dataset.from_dict(columns, features=Features(features))


def _stored_llava(root: Path, dtype: torch.dtype) -> Path:
    model, processor = tiny_llava(seed=0)
    model.to(dtype).save_pretrained(root / "llava")
    processor.save_pretrained(root / "llava")
    return root / "llava"


def _adpo_trainer(tmp_path: Path, model_path: Path, model_dtype: str, **overrides) -> AdPOTrainer:
    settings = dict(
        model_name_or_path=str(model_path), model_dtype=model_dtype, output_dir=str(tmp_path / "run"),
        per_device_train_batch_size=2, max_steps=2, learning_rate=1e-3, bf16=model_dtype == "bfloat16",
        gradient_checkpointing=False, logging_steps=1, report_to=[], save_strategy="steps", save_steps=2,
        use_cpu=True, seed=0, dataloader_num_workers=0, adv_source="stored",
    )
    settings.update(overrides)
    args = AdPOConfig(**settings)
    model, processor = load_lvlm_for_tower_training(str(model_path), model_dtype)  # as build_trainer loads it
    return AdPOTrainer(model, args, _pairs(), processor)


def _tensor_files(directory: Path) -> dict[Path, list[str]]:
    files = {}
    for path in directory.rglob("*.safetensors"):
        with safe_open(str(path), "pt") as handle:
            files[path.relative_to(directory)] = list(handle.keys())
    return files


@pytest.mark.parametrize("tune", ["full", "lora"])
def test_an_adpo_checkpoint_holds_the_tower_and_training_state_not_the_lvlm(tmp_path, tune):
    trainer = _adpo_trainer(tmp_path, _stored_llava(tmp_path, torch.float32), "float32", tune=tune, lora_r=4)
    trainer.train()
    checkpoint = tmp_path / "run" / "checkpoint-2"
    for name in ("optimizer.pt", "scheduler.pt", "trainer_state.json", "encoder/config.json"):
        assert (checkpoint / name).is_file(), name
    files = _tensor_files(checkpoint)
    assert not [f"{path}: {key}" for path, keys in files.items() for key in keys
                if any(part in key for part in ("language_model", "lm_head", "multi_modal_projector"))]
    expected = {Path("encoder/model.safetensors")} | ({Path("adapter_model.safetensors")} if tune == "lora" else set())
    assert set(files) == expected
    # the tower, at most the Adam moments of as many parameters again, and small files (state, RNG, card)
    tower_bytes = (checkpoint / "encoder" / "model.safetensors").stat().st_size
    total_bytes = sum(path.stat().st_size for path in checkpoint.rglob("*") if path.is_file())
    assert total_bytes <= 3 * tower_bytes + 256 * 1024


@pytest.mark.parametrize("stored, tune", [(torch.float32, "full"), (torch.bfloat16, "full"), (torch.float32, "lora")])
def test_adpo_in_bf16_exports_fp32_master_weights_and_an_lvlm_bit_identical_outside_the_tower(tmp_path, stored, tune):
    model_path = _stored_llava(tmp_path, stored)
    trainer = _adpo_trainer(tmp_path, model_path, "bfloat16", save_strategy="no", save_lvlm=True,
                            encoder_copy_dtype="float16", tune=tune, lora_r=4)
    trainer.train()
    trainer.save_model()
    out = tmp_path / "run"
    assert not (out / "model.safetensors").exists()

    masters = canonical_encoder_state(trainer.trained_encoder().state_dict())  # LoRA merged into fp32 masters
    if tune == "full":  # the live tower is the master copy itself
        live = find_vision_tower(trainer.model).state_dict()
        assert all(torch.equal(value.cpu(), masters[key]) for key, value in canonical_encoder_state(live).items())
    exported = canonical_encoder_state(load_file(str(out / "encoder" / "model.safetensors")))
    assert {v.dtype for v in exported.values()} == {torch.float32}
    assert exported.keys() == masters.keys() and all(torch.equal(exported[k], masters[k]) for k in masters)
    copied = canonical_encoder_state(load_file(str(out / "encoder-float16" / "model.safetensors")))
    assert all(copied[k].dtype == torch.float16 and torch.equal(copied[k], masters[k].half()) for k in masters)

    original, _ = load_lvlm(str(model_path))
    saved, _ = load_lvlm(str(out / "lvlm"))
    original_state, saved_state = original.state_dict(), saved.state_dict()
    assert saved_state.keys() == original_state.keys()
    prefix = next(name for name, module in saved.named_modules() if module is find_vision_tower(saved)) + "."
    trained = set()
    for key, value in original_state.items():
        if key.startswith(prefix):  # the trained tower, in the stored dtype
            assert torch.equal(saved_state[key], masters[canonical_encoder_state({key: value}).popitem()[0]].to(stored))
            if not torch.equal(saved_state[key], value):
                trained.add(canonical_encoder_state({key: value}).popitem()[0])
        else:
            assert saved_state[key].dtype == stored and torch.equal(saved_state[key], value), f"{key} changed"
    assert trained, "training did not move the tower"
    # the master weights started from the stored values, not from their bf16 rounding: frozen tower tensors stay
    if tune == "full":
        assert not trained & set(trainer.freeze_report.frozen_unreachable)


# ----------------------------------------------------------------------------------------------------
# The encoder trainers
# ----------------------------------------------------------------------------------------------------
def _image_folder(tmp_path: Path, n: int) -> str:
    images = tmp_path / "images" / "shapes"
    images.mkdir(parents=True)
    for i, image in enumerate(to_uint8_images(random_pixels(n, 32, 3))):
        image.save(images / f"{i}.png")
    return str(images.parent)


def test_a_baseline_with_load_dtype_float16_trains_and_exports_fp32_master_weights(tmp_path):
    model_path = _stored_llava(tmp_path, torch.float16)
    args = fare.FareConfig(
        model_name_or_path=str(model_path), load_dtype="float16", dataset=_image_folder(tmp_path, 4),
        output_dir=str(tmp_path / "run"), embedding="llm", per_device_train_batch_size=2, max_steps=2, attack_steps=1,
        attack_eps="8/255", attack_step_size="4/255", learning_rate=1e-3, warmup_steps=0, save_strategy="steps",
        save_steps=2, use_cpu=True, disable_tqdm=True, seed=0, save_lvlm=True,
    )
    trainer = fare.build_trainer(args)
    assert {p.dtype for p in trainer.model.encoder.parameters()} == {torch.float32}
    trainer.train()
    trainer.save_model()
    out = tmp_path / "run"
    masters = canonical_encoder_state({k: v.detach() for k, v in trainer.model.encoder.state_dict().items()})
    for directory in (out / "encoder", out / "checkpoint-2" / "encoder"):
        exported = canonical_encoder_state(load_file(str(directory / "model.safetensors")))
        assert all(exported[k].dtype == torch.float32 and torch.equal(exported[k], masters[k]) for k in masters)
    assert set(_tensor_files(out / "checkpoint-2")) == {Path("encoder/model.safetensors")}

    original, _ = load_lvlm(str(model_path))
    saved, _ = load_lvlm(str(out / "lvlm"))
    tower = next(name for name, module in saved.named_modules() if module is find_vision_tower(saved)) + "."
    saved_state = saved.state_dict()
    changed = {key for key, value in original.state_dict().items() if not torch.equal(saved_state[key], value)}
    assert changed and all(key.startswith(tower) for key in changed)
    assert {value.dtype for value in saved_state.values() if value.is_floating_point()} == {torch.float16}


def test_a_baseline_trained_in_bf16_still_writes_a_float32_encoder(tmp_path):
    from transformers import CLIPVisionModel

    from adpo.testing import tiny_image_processor, tiny_vision_config

    CLIPVisionModel(tiny_vision_config()).save_pretrained(tmp_path / "vision")
    tiny_image_processor().save_pretrained(tmp_path / "vision")
    args = fare.FareConfig(
        model_name_or_path=str(tmp_path / "vision"), model_dtype="bfloat16", dataset=_image_folder(tmp_path, 2),
        output_dir=str(tmp_path / "run"), per_device_train_batch_size=2, max_steps=1, attack_steps=1,
        learning_rate=1e-2, warmup_steps=0, save_strategy="no", use_cpu=True, disable_tqdm=True, seed=0,
    )
    trainer = fare.build_trainer(args)
    trainer.train()
    trainer.save_model()
    weights = canonical_encoder_state({k: v.detach() for k, v in trainer.model.encoder.state_dict().items()})
    assert {v.dtype for v in weights.values()} == {torch.bfloat16}
    exported = canonical_encoder_state(load_file(str(tmp_path / "run" / "encoder" / "model.safetensors")))
    assert all(exported[k].dtype == torch.float32 and torch.equal(exported[k], weights[k].float()) for k in weights)


@pytest.mark.parametrize("name", ["paper.yaml", "llava15_stored_pairs.yaml"])
def test_the_gpu_adpo_configs_parse_unedited_without_a_gpu(name, no_accelerator, tmp_path):
    path = Path(__file__).resolve().parents[1] / "configs" / "adpo" / name
    # paper.yaml's image folder is a placeholder the user points at their images, and the stored pairs are written
    # by `adpo pairs` first; they must exist to parse
    inputs = ["--image_source", str(tmp_path)] if name == "paper.yaml" else ["--dataset_path", str(tmp_path)]
    (args,) = TrlParser([AdPOConfig]).parse_args_and_config(["--config", str(path), *inputs])
    assert args.use_cpu and not args.bf16 and args.model_dtype == "float32"


def test_save_lvlm_on_a_standalone_clip_is_refused_before_it_loads(tmp_path, monkeypatch):
    from transformers import CLIPVisionModel

    from adpo.testing import tiny_vision_config

    CLIPVisionModel(tiny_vision_config()).save_pretrained(tmp_path / "vision")
    monkeypatch.setattr(CLIPVisionModel, "from_pretrained", lambda *a, **k: pytest.fail("the model was loaded"))
    args = fare.FareConfig(model_name_or_path=str(tmp_path / "vision"), dataset="world",
                           output_dir=str(tmp_path / "run"), use_cpu=True, save_lvlm=True)
    with pytest.raises(ValueError, match="save_lvlm: false"):
        fare.build_trainer(args)


# ----------------------------------------------------------------------------------------------------
# resume_from_checkpoint: last
# ----------------------------------------------------------------------------------------------------
def _fake_checkpoint(output_dir: Path, step: int) -> Path:
    checkpoint = output_dir / f"checkpoint-{step}"
    (checkpoint / "encoder").mkdir(parents=True)
    (checkpoint / "encoder" / "model.safetensors").write_bytes(b"weights")
    (checkpoint / "encoder" / "config.json").write_text("{}")
    (checkpoint / "trainer_state.json").write_text("{}")
    return checkpoint


@pytest.mark.parametrize("cut_short", ["empty weights", "no trainer state"])
def test_last_checkpoint_is_the_newest_complete_one(tmp_path, caplog, cut_short):
    older, newer = _fake_checkpoint(tmp_path, 9), _fake_checkpoint(tmp_path, 10)
    assert adpo.runtime.last_complete_checkpoint(tmp_path) == str(newer)  # numeric order: 10 after 9
    if cut_short == "empty weights":
        (newer / "encoder" / "model.safetensors").write_bytes(b"")
    else:
        (newer / "trainer_state.json").unlink()
    with caplog.at_level(logging.WARNING, logger="adpo.runtime"):
        assert adpo.runtime.last_complete_checkpoint(tmp_path) == str(older)
    assert "checkpoint-10: incomplete checkpoint" in caplog.text
    assert ("encoder/model.safetensors" if cut_short == "empty weights" else "trainer_state.json") in caplog.text
    (older / "trainer_state.json").unlink()
    assert adpo.runtime.last_complete_checkpoint(tmp_path) is None
    assert adpo.runtime.last_complete_checkpoint(tmp_path / "never-written") is None


def test_adpo_resumes_last_from_the_newest_complete_checkpoint(tmp_path, monkeypatch):
    import trainers.adpo

    older, newer = _fake_checkpoint(tmp_path, 2), _fake_checkpoint(tmp_path, 4)
    (newer / "trainer_state.json").unlink()  # killed before the Trainer wrote its state
    chosen = []
    stub = SimpleNamespace(train=lambda resume_from_checkpoint: chosen.append(resume_from_checkpoint),
                           save_model=lambda output_dir: None, accelerator=SimpleNamespace(is_main_process=False))
    monkeypatch.setattr(trainers.adpo, "build_trainer", lambda args: stub)
    trainers.adpo.main(["--model_name_or_path", "world:small", "--output_dir", str(tmp_path), "--resume_from_checkpoint",
                        "last", "--report_to", "none", "--bf16", "false"])
    assert chosen == [str(older)]
