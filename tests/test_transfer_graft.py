"""Grafting on tiny random LLaVA models: exactness, geometry refusals, explicit fixes, saved directories."""

import copy
import json

import pytest
import torch
from transformers import AutoProcessor, CLIPVisionModel, LlavaForConditionalGeneration

from adpo.encoder_io import export_encoder, save_encoder
from adpo.lvlm import LlavaView
from adpo.testing import random_pixels, tiny_image_processor, tiny_llava, tiny_vision_config
from adpo.tower import VisionTower, find_vision_tower
from transfer.geometry import GeometryMismatch, GraftOptions, fold_normalisation, interpolate_position_embedding
from transfer.graft import Donor, component_hashes, graft_encoder, load_donor, save_grafted

QUESTIONS = ["what color is the circle ?", "what shape is on the left ?"]


def small_and_large(vision_config=None):
    small = tiny_llava(seed=0, text_hidden_size=48, text_layers=2, vision_config=vision_config)
    large = tiny_llava(seed=1, text_hidden_size=64, text_layers=3, vision_config=vision_config)
    return small, large


def donor_from(model, processor) -> Donor:
    image_processor = processor.image_processor
    return Donor(export_encoder(model), list(image_processor.image_mean), list(image_processor.image_std), image_processor,
                 {"source": "test"})


def donor_with(config_changes=None, mean=None, std=None, seed=5) -> Donor:
    vision = tiny_vision_config()
    for key, value in (config_changes or {}).items():
        setattr(vision, key, value)
    torch.manual_seed(seed)
    processor = tiny_image_processor(vision.image_size)
    return Donor(CLIPVisionModel(vision).eval(), mean or list(processor.image_mean), std or list(processor.image_std),
                 processor, {"source": "test"})


def logits(model, processor, pixels):
    view = LlavaView(model, processor)
    encoded = view.encode(QUESTIONS)
    with torch.no_grad():
        return model(input_ids=encoded.input_ids, attention_mask=encoded.attention_mask,
                     pixel_values=view.tower.normalize(pixels)).logits


def test_identity_graft_reproduces_outputs_bit_for_bit(tmp_path):
    model, processor = tiny_llava(seed=3)
    original = copy.deepcopy(model)
    pixels = random_pixels(2)
    outcome = graft_encoder(model, processor, donor_from(original, processor))
    assert outcome.hashes_before == outcome.hashes_after  # nothing changed at all
    assert torch.equal(logits(model, processor, pixels), logits(original, processor, pixels))
    save_grafted(model, processor, tmp_path / "out", {"graft": outcome.to_dict()})
    reloaded = LlavaForConditionalGeneration.from_pretrained(tmp_path / "out").eval()
    reloaded_processor = AutoProcessor.from_pretrained(tmp_path / "out")
    assert torch.equal(logits(reloaded, reloaded_processor, pixels), logits(original, processor, pixels))
    view, original_view = LlavaView(reloaded, reloaded_processor), LlavaView(original, processor)
    assert view.generate(pixels, QUESTIONS, max_new_tokens=6) == original_view.generate(pixels, QUESTIONS, max_new_tokens=6)


def test_small_encoder_grafted_into_large_loads_and_generates(tmp_path):
    (small, small_processor), (large, large_processor) = small_and_large()
    before = component_hashes(large)
    outcome = graft_encoder(large, large_processor, donor_from(small, small_processor))
    assert outcome.hashes_after["vision_tower"] != before["vision_tower"]
    assert outcome.hashes_after["language_model"] == before["language_model"]
    assert outcome.hashes_after["projector"] == before["projector"]
    assert outcome.hashes_after["vision_tower"] == outcome.donor_prepared_sha256 == component_hashes(small)["vision_tower"]
    out = save_grafted(large, large_processor, tmp_path / "grafted", {"graft": outcome.to_dict()})
    assert (out / "graft_report.json").is_file() and (out / "graft_report.md").is_file()
    reloaded = LlavaForConditionalGeneration.from_pretrained(out).eval()
    processor = AutoProcessor.from_pretrained(out)
    small_tower = find_vision_tower(small).state_dict()
    for key, value in find_vision_tower(reloaded).state_dict().items():
        assert torch.equal(value, small_tower[key]), key
    assert reloaded.config.text_config.hidden_size == 64  # the large LLM kept
    # the saved directory answers exactly as the grafted model in memory
    pixels = random_pixels(2)
    answers = LlavaView(reloaded, processor).generate(pixels, QUESTIONS, max_new_tokens=4)
    assert answers == LlavaView(large.eval(), large_processor).generate(pixels, QUESTIONS, max_new_tokens=4)
    assert all(answers)
    assert not list(tmp_path.glob(".grafted.*"))  # no staging leftovers
    assert out.stat().st_mode & 0o044 and (out / "model.safetensors").stat().st_mode & 0o044  # readable by others


MISMATCHES = [
    ({"hidden_size": 48, "intermediate_size": 64}, "hidden size"),
    ({"intermediate_size": 96}, "MLP width"),
    ({"num_attention_heads": 2}, "attention heads"),
    # a patch size cannot change alone: the same grid then means another image size
    ({"patch_size": 4, "image_size": 16}, "patch size"),
    ({"num_hidden_layers": 2}, "layers"),
    ({"image_size": 48}, "image size / positions"),
    ({"hidden_act": "gelu"}, "activation"),
    ({"layer_norm_eps": 1e-6}, "layer-norm eps"),
]


@pytest.mark.parametrize("changes,name", MISMATCHES, ids=[name for _, name in MISMATCHES])
def test_each_mismatch_is_refused_with_its_own_message(changes, name):
    model, processor = tiny_llava()
    before = component_hashes(model)
    with pytest.raises(GeometryMismatch) as error:
        graft_encoder(model, processor, donor_with(changes))
    lines = [line for line in str(error.value).splitlines() if line.startswith("  - ")]
    expected = [name, "image size / positions"] if name == "patch size" else [name]
    assert [line.split(":")[0].strip("- ") for line in lines] == expected  # exactly these mismatches
    assert component_hashes(model) == before  # refused before anything changed


def test_normalisation_mismatch_is_refused_then_folded_exactly():
    model, processor = tiny_llava()
    donor = donor_with(mean=[0.5, 0.5, 0.5], std=[0.25, 0.2, 0.3])
    with pytest.raises(GeometryMismatch, match="normalisation.*--fold-normalisation"):
        graft_encoder(model, processor, donor)
    graft_encoder(model, processor, donor, GraftOptions(fold_normalisation=True))
    pixels = random_pixels(2)
    donor_tower = VisionTower(donor.encoder, donor.image_mean, donor.image_std, 32)
    grafted_tower = VisionTower.from_lvlm(model, processor)  # the target's processor constants, unchanged
    with torch.no_grad():
        expected, got = donor_tower(pixels), grafted_tower(pixels)
    torch.testing.assert_close(got.llm_features, expected.llm_features, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got.pooled, expected.pooled, atol=1e-5, rtol=1e-5)


def test_fold_normalisation_is_identity_for_equal_constants():
    patch, positions = torch.randn(8, 3, 4, 4), torch.randn(5, 8)
    new_patch, new_positions = fold_normalisation(patch, positions, [0.4] * 3, [0.2] * 3, [0.4] * 3, [0.2] * 3)
    assert torch.equal(new_patch, patch) and torch.equal(new_positions, positions)


def test_position_interpolation_fix():
    vision_large_images = tiny_vision_config(image_size=48)  # 6x6 grid; the donor has 4x4
    model, processor = tiny_llava(vision_config=vision_large_images)
    donor = donor_with()
    with pytest.raises(GeometryMismatch, match="--interpolate-positions"):
        graft_encoder(model, processor, donor)
    outcome = graft_encoder(model, processor, donor, GraftOptions(interpolate_positions=True))
    assert "image size / positions" in outcome.geometry.fixed
    positions = find_vision_tower(model).embeddings.position_embedding.weight
    donor_positions = donor.encoder.embeddings.position_embedding.weight
    assert positions.shape == (37, 32)
    assert torch.equal(positions[0], donor_positions[0])  # CLS position kept
    answers = LlavaView(model, processor).generate(random_pixels(1, image_size=48), QUESTIONS[:1], max_new_tokens=3)
    assert len(answers) == 1


def test_interpolating_a_grid_onto_itself_and_a_constant_field():
    weight = torch.randn(17, 8)
    assert torch.equal(interpolate_position_embedding(weight, 4), weight)
    constant = torch.cat([torch.randn(1, 8), torch.ones(16, 8) * 0.7])
    resized = interpolate_position_embedding(constant, 6)
    torch.testing.assert_close(resized[1:], torch.full((36, 8), 0.7))


def test_adopting_the_donor_activation_changes_modules_and_saved_config(tmp_path):
    model, processor = tiny_llava()
    donor = donor_with({"hidden_act": "gelu"})
    graft_encoder(model, processor, donor, GraftOptions(adopt_donor_activation=True))
    pixels = random_pixels(2)
    donor_tower = VisionTower(donor.encoder, donor.image_mean, donor.image_std, 32)
    with torch.no_grad():
        torch.testing.assert_close(VisionTower.from_lvlm(model, processor)(pixels).llm_features,
                                   donor_tower(pixels).llm_features, atol=1e-5, rtol=1e-5)
    save_grafted(model, processor, tmp_path / "out", {})
    saved = json.loads((tmp_path / "out" / "config.json").read_text())
    assert saved["vision_config"]["hidden_act"] == "gelu"


def test_save_refuses_existing_output_unless_overwrite(tmp_path):
    model, processor = tiny_llava()
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("x")
    with pytest.raises(FileExistsError, match="--overwrite"):
        save_grafted(model, processor, tmp_path / "out", {})
    save_grafted(model, processor, tmp_path / "out", {}, overwrite=True)
    assert not (tmp_path / "out" / "keep.txt").exists() and (tmp_path / "out" / "config.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_load_donor_from_encoder_directory_and_lvlm_directory(tmp_path):
    model, processor = tiny_llava(seed=2)
    save_encoder(export_encoder(model), tmp_path / "encoder", processor.image_processor, {"method": "test"})
    donor = load_donor(tmp_path / "encoder")
    assert donor.source["kind"] == "encoder directory" and donor.source["card"] == {"method": "test"}
    assert donor.image_mean == list(processor.image_processor.image_mean)
    model.save_pretrained(tmp_path / "lvlm")
    processor.save_pretrained(tmp_path / "lvlm")
    from_lvlm = load_donor(tmp_path / "lvlm")
    assert from_lvlm.source["kind"] == "lvlm tower"
    assert from_lvlm.source["parameters_sha256"] == donor.source["parameters_sha256"]
