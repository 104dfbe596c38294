import numpy as np
import pytest
import torch
from PIL import Image
from transformers import CLIPVisionModel, LlamaConfig, LlamaForCausalLM

from adpo.encoder_io import canonical_encoder_state, export_encoder, load_encoder, put_encoder, save_encoder
from adpo.lvlm import LlavaView
from adpo.models import load_lvlm
from adpo.preprocess import load_rgb, to_pixels
from adpo.testing import random_pixels, tiny_llava, tiny_vision_config
from adpo.tower import VisionTower, find_projector, find_vision_tower, freeze_for_tower_training


def test_tower_features_equal_the_models_own_image_features(tiny):
    model, processor = tiny
    view = LlavaView(model, processor)
    x = random_pixels(3)
    own = model.model.get_image_features(pixel_values=view.tower.normalize(x)).pooler_output
    ours = model.model.multi_modal_projector(view.tower.features(x))
    assert torch.equal(ours, torch.stack(list(own)))


def test_answer_scores_match_the_models_own_loss(tiny):
    model, processor = tiny
    view = LlavaView(model, processor)
    x = random_pixels(2)
    encoded = view.encode(["what color is it ?", "describe the image"], ["red", "a red circle"])
    scores = view.answer_scores(x, encoded.input_ids, encoded.attention_mask, encoded.labels)
    reference = model(input_ids=encoded.input_ids, attention_mask=encoded.attention_mask, pixel_values=view.tower.normalize(x), labels=encoded.labels).loss
    assert torch.allclose(-scores.sum_logps.sum() / scores.num_tokens.sum(), reference, atol=1e-5)
    assert scores.num_tokens.tolist() == [2.0, 4.0]  # answer words + the end-of-turn token


def test_preprocessing_matches_the_processor_up_to_normalisation(tiny):
    _, processor = tiny
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (47, 61, 3), dtype=np.uint8)), Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8))]
    pixels = to_pixels(images, processor)
    normalised = processor.image_processor(images=images, return_tensors="pt")["pixel_values"]
    mean = torch.tensor(processor.image_processor.image_mean).view(1, 3, 1, 1)
    std = torch.tensor(processor.image_processor.image_std).view(1, 3, 1, 1)
    assert pixels.shape == (2, 3, 32, 32)
    # Up to the snap to the 8-bit grid (a no-op for PIL-backed processors; torchvision-backed ones resize in float).
    assert torch.allclose((pixels - mean) / std, normalised, atol=0.5 / 255 / min(processor.image_processor.image_std) + 1e-5)
    assert torch.equal((pixels * 255).round() / 255, pixels)  # k/255 exactly: PNG round trips are lossless


def test_preprocessing_snaps_float_resizes_to_the_8bit_grid(tiny, monkeypatch):
    _, processor = tiny
    image_processor = processor.image_processor
    original = type(image_processor).__call__

    def float_resize(self, *args, **kwargs):  # what a torchvision-backed processor returns: off-grid floats
        out = original(self, *args, **kwargs)
        out["pixel_values"] = out["pixel_values"] + 0.3 / 255
        return out

    monkeypatch.setattr(type(image_processor), "__call__", float_resize)
    image = Image.fromarray(np.random.default_rng(1).integers(0, 255, (32, 32, 3), dtype=np.uint8))
    pixels = to_pixels([image], processor)
    exact = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255).permute(2, 0, 1)[None]
    assert torch.equal(pixels, (exact * 255).round() / 255)


@pytest.mark.parametrize("mode", ["L", "LA", "RGBA", "CMYK", "P", "I;16"])
def test_image_modes_are_converted_to_rgb(mode, tmp_path):
    image = Image.new("RGB", (9, 7), (200, 30, 60)).convert(mode)
    path = tmp_path / f"image.{'tiff' if mode in ('CMYK', 'I;16') else 'png'}"
    image.save(path)
    assert load_rgb(path).mode == "RGB" and load_rgb(path).size == (9, 7)


def test_tower_only_training_changes_only_the_tower(tiny):
    model, processor = tiny
    report = freeze_for_tower_training(model, processor)
    assert "post_layernorm.weight" in report.frozen_unreachable
    assert any(name.startswith("encoder.layers.2.") for name in report.frozen_unreachable)  # after layer -2
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    view = LlavaView(model, processor)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=1e-4)
    model.train()
    encoded = view.encode(["what color is it ?"] * 2, ["red", "blue"])
    scores = view.answer_scores(random_pixels(2), encoded.input_ids, encoded.attention_mask, encoded.labels)
    (-scores.sum_logps.mean()).backward()
    optimizer.step()
    for name, parameter in model.named_parameters():
        tower_name = name.removeprefix("model.vision_tower.")
        if name.startswith("model.vision_tower.") and tower_name not in report.frozen_unreachable:
            assert not torch.equal(parameter, before[name]), f"{name} should have changed"
        else:
            assert torch.equal(parameter, before[name]), f"{name} must stay bit-identical"


def test_pooled_objective_keeps_post_layernorm_trainable(tiny):
    model, processor = tiny
    report = freeze_for_tower_training(model, processor, uses=("pooled",))
    assert report.frozen_unreachable == []


def test_encoder_export_put_and_save_round_trip(tiny, tmp_path):
    model, processor = tiny
    encoder = export_encoder(model)
    assert isinstance(encoder, CLIPVisionModel)
    other, _ = tiny_llava(seed=1)
    assert not torch.equal(find_vision_tower(other).embeddings.patch_embedding.weight, encoder.embeddings.patch_embedding.weight)
    put_encoder(other, encoder)
    for key, value in canonical_encoder_state(model.state_dict()).items():
        assert torch.equal(find_vision_tower(other).state_dict()[key], value)
    out = save_encoder(encoder, tmp_path / "encoder", processor, card={"method": "test"})
    assert (out / "model.safetensors").exists() and (out / "preprocessor_config.json").exists() and (out / "README.md").exists()
    reloaded = load_encoder(out)
    assert all(torch.equal(reloaded.state_dict()[k], v) for k, v in encoder.state_dict().items())


def test_canonical_state_accepts_old_and_llava_layouts(tiny):
    model, _ = tiny
    canonical = canonical_encoder_state(find_vision_tower(model).state_dict())
    old_layout = {"vision_model." + k: v for k, v in canonical.items()} | {"vision_model.embeddings.position_ids": torch.arange(17)}
    llava_layout = dict(model.state_dict())
    assert canonical_encoder_state(old_layout).keys() == canonical.keys()
    assert canonical_encoder_state(llava_layout).keys() == canonical.keys()


def test_mismatched_encoder_is_refused_with_its_keys(tiny):
    model, _ = tiny
    wrong = CLIPVisionModel(tiny_vision_config(hidden_size=64))
    with pytest.raises(ValueError, match="shape mismatches"):
        put_encoder(model, wrong)


def test_model_without_vision_tower_is_refused():
    language_only = LlamaForCausalLM(LlamaConfig(vocab_size=10, hidden_size=8, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2))
    with pytest.raises(ValueError, match="has no vision tower"):
        find_vision_tower(language_only)


def test_projector_is_found_in_llava_and_refused_elsewhere(tiny):
    model, _ = tiny
    assert find_projector(model) is model.model.multi_modal_projector
    with pytest.raises(ValueError, match="has no multi_modal_projector"):
        find_projector(CLIPVisionModel(tiny_vision_config()))


def test_wrong_resolution_is_refused(tiny):
    model, processor = tiny
    with pytest.raises(ValueError, match="to_pixels"):
        VisionTower.from_lvlm(model, processor).pooled(torch.rand(1, 3, 16, 16))


def test_generation_matches_greedy_scores(tiny):
    model, processor = tiny
    view = LlavaView(model, processor)
    x = random_pixels(2, seed=5)
    questions = ["what is in the image ?"] * 2
    answers = view.generate(x, questions, max_new_tokens=3)
    # Teacher-forced on its own answer, the model's argmax at each answer position is the generated token.
    encoded = view.encode(questions, answers)
    with torch.no_grad():
        logits = model(input_ids=encoded.input_ids, attention_mask=encoded.attention_mask,
                       pixel_values=view.tower.normalize(x)).logits
    predicted, targets = logits[:, :-1].argmax(dim=-1), encoded.labels[:, 1:]
    for row in range(len(answers)):
        # the answer's tokens; the end-of-turn label after a length-capped answer was never generated
        positions = (targets[row] != -100).nonzero().flatten()[:-1]
        assert positions.numel() > 0, f"empty answer {answers[row]!r}"
        assert torch.equal(predicted[row, positions], targets[row, positions]), answers[row]


def test_an_encoder_checkpoint_with_missing_weights_is_refused(tiny, tmp_path):
    from safetensors.torch import load_file, save_file

    model, processor = tiny
    out = save_encoder(export_encoder(model), tmp_path / "encoder", processor)
    weights = load_file(out / "model.safetensors")
    weights.pop(next(k for k in weights if "patch_embedding" in k))
    save_file(weights, out / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match="missing"):
        load_encoder(out)


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_a_corrupt_encoder_file_is_named_with_how_to_recreate_it(tiny, tmp_path, damage):
    model, processor = tiny
    out = save_encoder(export_encoder(model), tmp_path / "encoder", processor)
    weights = out / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2] if damage == "truncated" else b"not a safetensors file" * 10)
    for load in (lambda: load_encoder(out), lambda: put_encoder(model, out)):
        with pytest.raises(ValueError, match="model.safetensors is corrupt or truncated") as refused:
            load()
        message = str(refused.value)
        assert "\n" not in message and str(weights) in message and "re-running the training or export" in message


def test_a_corrupt_lvlm_file_is_named_before_transformers_reads_it(tiny, tmp_path):
    model, processor = tiny
    model.save_pretrained(tmp_path / "lvlm")
    processor.save_pretrained(tmp_path / "lvlm")
    weights = tmp_path / "lvlm" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(ValueError, match="model.safetensors is corrupt or truncated") as refused:
        load_lvlm(str(tmp_path / "lvlm"))
    assert str(weights) in str(refused.value)


def test_a_training_run_directory_stands_for_its_encoder(tiny, tmp_path):
    from adpo.encoder_io import encoder_location

    model, processor = tiny
    run = tmp_path / "run"
    save_encoder(export_encoder(model), run / "encoder", processor)
    assert encoder_location(run) == str(run / "encoder")
    assert encoder_location(run / "encoder") == str(run / "encoder")
    assert encoder_location("openai/clip-vit-large-patch14") == "openai/clip-vit-large-patch14"
    loaded = load_encoder(run)
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), export_encoder(model).state_dict().values()))
