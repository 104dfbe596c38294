"""`adpo transfer` end to end on tiny models; verification, robust accuracy and projector re-alignment."""

import json

import pytest
import torch
from transformers import AutoProcessor, CLIPVisionModel, LlavaForConditionalGeneration

from adpo.encoder_io import export_encoder, load_encoder, save_encoder
from adpo.errors import UsageError
from adpo.preprocess import to_uint8_images
from adpo.testing import random_pixels, tiny_llava, tiny_vision_config
from adpo.tower import find_vision_tower
from transfer.cli import main
from transfer.graft import component_hashes
from adpo.openclip import clip_vision_model_to_openclip, load_state_dict_file, save_state_dict_file
from transfer.realign import RealignConfig, realign_projector
from transfer.verify import Sample, answer_agreement, feature_shift, robust_vqa_accuracy


def write_lvlm(model, processor, path):
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return str(path)


def image_folder(path, n=4):
    path.mkdir()
    for i, image in enumerate(to_uint8_images(random_pixels(n, seed=7))):
        image.save(path / f"{i}.png")
    return str(path)


def test_cli_grafts_verifies_and_writes_a_loadable_directory(tmp_path):
    small, small_processor = tiny_llava(seed=0, text_hidden_size=48)
    large, large_processor = tiny_llava(seed=1, text_hidden_size=64, text_layers=3)
    save_encoder(export_encoder(small), tmp_path / "encoder", small_processor.image_processor, {"method": "test"})
    target = write_lvlm(large, large_processor, tmp_path / "target")
    out = tmp_path / "grafted"
    argv = ["--encoder", str(tmp_path / "encoder"), "--target", target, "--out", str(out),
            "--verify-data", image_folder(tmp_path / "images"), "--verify-samples", "4", "--max-new-tokens", "4"]
    assert main(argv) == 0
    report = json.loads((out / "graft_report.json").read_text())
    assert report["donor"]["kind"] == "encoder directory" and report["donor"]["card"] == {"method": "test"}
    assert {c["status"] for c in report["graft"]["checks"]} == {"ok"}
    hashes = report["graft"]["parameter_hashes"]
    assert hashes["before"]["language_model"] == hashes["after"]["language_model"]
    assert hashes["before"]["vision_tower"] != hashes["after"]["vision_tower"]
    verification = report["verification"]
    # the donor encoder and the grafted tower are the same weights on the same pixels
    assert verification["tower_cosine_llm_features_min"] > 0.9999
    assert verification["num_samples"] == 4 and 0.0 <= verification["answer_agreement_exact"] <= 1.0
    assert not any("vqa_accuracy_robust" in key for key in verification)  # not asked for
    # the feature shift is measured with the target's projector on both towers, which differ here
    assert "eps=4/255" in verification["grafted_feature_shift_threat"]
    assert 0 < verification["original_feature_shift_mean"] != verification["grafted_feature_shift_mean"] > 0
    assert "Geometry checks" in (out / "graft_report.md").read_text()
    LlavaForConditionalGeneration.from_pretrained(out)
    AutoProcessor.from_pretrained(out)
    # a second run into the same directory is refused without --overwrite
    with pytest.raises(UsageError, match="already exists; pass --overwrite"):
        main(argv)


def test_cli_interpolated_graft_compares_pooled_embeddings_at_each_resolution(tmp_path):
    model, processor = tiny_llava(vision_config=tiny_vision_config(image_size=48))
    save_encoder(CLIPVisionModel(tiny_vision_config(image_size=32)), tmp_path / "encoder")  # no preprocessor config
    target = write_lvlm(model, processor, tmp_path / "target")
    argv = ["--encoder", str(tmp_path / "encoder"), "--target", target, "--out", str(tmp_path / "g"),
            "--interpolate-positions", "--verify-data", image_folder(tmp_path / "images", n=2), "--max-new-tokens", "2",
            "--feature-shift-eps", ""]
    assert main(argv) == 0
    report = json.loads((tmp_path / "g" / "graft_report.json").read_text())
    statuses = {c["name"]: c["status"] for c in report["graft"]["checks"]}
    assert statuses["image size / positions"] == "fixed" and statuses["normalisation"] == "assumed"
    assert -1.0 <= report["verification"]["tower_cosine_pooled_min"] <= 1.0
    assert "32 vs 48 px" in report["verification"]["tower_cosine_note"]
    assert not any("feature_shift" in key for key in report["verification"])  # skipped on request


def test_cli_check_only_reports_mismatch_with_exit_code(tmp_path, capsys):
    model, processor = tiny_llava()
    encoder = CLIPVisionModel(tiny_vision_config(layers=2))
    save_encoder(encoder, tmp_path / "encoder", processor.image_processor)
    target = write_lvlm(model, processor, tmp_path / "target")
    code = main(["--encoder", str(tmp_path / "encoder"), "--target", target, "--out", str(tmp_path / "o"), "--check-only"])
    assert code == 1
    assert "[mismatch] layers: donor 2 | target 3" in capsys.readouterr().out
    assert not (tmp_path / "o").exists()


def test_convert_round_trip_and_open_clip_donor(tmp_path):
    encoder = CLIPVisionModel(tiny_vision_config()).eval()
    state = clip_vision_model_to_openclip(encoder)
    save_state_dict_file(state, tmp_path / "visual.safetensors")
    assert main(["convert", "--from-open-clip", str(tmp_path / "visual.safetensors"), "--activation", "quick_gelu",
                 "--num-attention-heads", "4", "--openai-normalisation", "--out", str(tmp_path / "enc")]) == 0
    assert torch.equal(load_encoder(tmp_path / "enc").embeddings.position_embedding.weight,
                       encoder.embeddings.position_embedding.weight)
    assert main(["convert", "--to-open-clip", str(tmp_path / "enc"), "--out", str(tmp_path / "back.safetensors")]) == 0
    back = load_state_dict_file(tmp_path / "back.safetensors")
    assert set(back) == set(state) and all(torch.equal(back[k], state[k]) for k in state)
    # an open_clip file grafts directly, once its activation is stated
    model, processor = tiny_llava()
    target = write_lvlm(model, processor, tmp_path / "target")
    base = ["--encoder", str(tmp_path / "visual.safetensors"), "--target", target, "--out", str(tmp_path / "g")]
    with pytest.raises(UsageError, match="--activation"):
        main(base)
    assert main(base + ["--activation", "quick_gelu", "--num-attention-heads", "4"]) == 0
    grafted = LlavaForConditionalGeneration.from_pretrained(tmp_path / "g")
    assert torch.equal(find_vision_tower(grafted).embeddings.patch_embedding.weight, encoder.embeddings.patch_embedding.weight)


def test_cli_realignment_is_saved_and_reported_separately(tmp_path):
    model, processor = tiny_llava(seed=6)
    target = write_lvlm(model, processor, tmp_path / "target")
    images = image_folder(tmp_path / "images", n=4)
    coco = {"images": [{"id": i, "file_name": f"{i}.png"} for i in range(4)],
            "annotations": [{"image_id": i, "caption": "a red circle on the left"} for i in range(4)]}
    (tmp_path / "images" / "captions.json").write_text(json.dumps(coco))
    argv = ["--encoder", target, "--target", target, "--out", str(tmp_path / "plain"), "--verify-data", images,
            "--verify-samples", "2", "--max-new-tokens", "2", "--realign-out", str(tmp_path / "realigned"),
            "--realign-data", str(tmp_path / "images" / "captions.json"), "--realign-steps", "3", "--realign-batch-size", "2"]
    assert main(argv) == 0
    plain = json.loads((tmp_path / "plain" / "graft_report.json").read_text())
    realigned = json.loads((tmp_path / "realigned" / "graft_report.json").read_text())
    assert "realignment" not in plain and plain["verification"]["answer_agreement_exact"] == 1.0  # identity graft
    assert plain["verification"]["grafted_feature_shift_mean"] == plain["verification"]["original_feature_shift_mean"]
    assert realigned["realignment"]["steps"] == 3 and "answer_agreement_exact" in realigned["realignment"]
    assert realigned["verification"] == plain["verification"]
    assert "Projector re-alignment" in (tmp_path / "realigned" / "graft_report.md").read_text()
    plain_model = LlavaForConditionalGeneration.from_pretrained(tmp_path / "plain")
    realigned_model = LlavaForConditionalGeneration.from_pretrained(tmp_path / "realigned")
    assert component_hashes(plain_model)["language_model"] == component_hashes(realigned_model)["language_model"]
    assert component_hashes(plain_model)["projector"] != component_hashes(realigned_model)["projector"]


def test_answer_agreement_and_accuracies():
    samples = [Sample(None, "q", ["red"]), Sample(None, "q", ["blue"]), Sample(None, "q", None)]
    result = answer_agreement(["red", "Blue.", "x"], ["red", "blue", "y"], samples)
    assert result["answer_agreement_exact"] == 1 / 3 and result["answer_agreement_normalised"] == 2 / 3
    assert result["vqa_accuracy_original"] == 1.0 and result["vqa_accuracy_grafted"] == 1.0


def test_robust_accuracy_never_exceeds_clean():
    model, processor = tiny_llava(seed=4)
    images = to_uint8_images(random_pixels(2, seed=3))
    samples = [Sample(image, "what color is the circle ?", ["red"]) for image in images]
    result = robust_vqa_accuracy(model, processor, samples, "8/255", steps=2, max_new_tokens=2)
    assert result["num_samples"] == 2
    assert 0.0 <= result["vqa_accuracy_robust"] <= result["vqa_accuracy_clean"] <= 1.0


def test_feature_shift_grows_with_eps_and_vanishes_for_an_encoder_that_ignores_its_input():
    model, processor = tiny_llava(seed=6)
    images = to_uint8_images(random_pixels(3, seed=2))
    small = feature_shift(model, processor, images, "2/255", steps=3)
    large = feature_shift(model, processor, images, "16/255", steps=3)
    assert 0 < small["feature_shift_mean"] < large["feature_shift_mean"]
    assert small["feature_shift_max"] >= small["feature_shift_mean"] and "linf eps=2/255" in small["feature_shift_threat"]
    assert feature_shift(model, processor, images, "2/255", steps=3) == small  # seeded
    before = component_hashes(model)
    with torch.no_grad():  # without patch weights every image embeds as the same position and class tokens
        find_vision_tower(model).embeddings.patch_embedding.weight.zero_()
    blind = feature_shift(model, processor, images, "16/255", steps=3)
    assert blind["feature_shift_mean"] == 0.0
    assert component_hashes(model)["projector"] == before["projector"]  # the attack trains nothing


def test_realign_trains_only_the_projector_and_lowers_caption_loss():
    model, processor = tiny_llava(seed=5)
    images = to_uint8_images(random_pixels(4, seed=9))
    samples = [Sample(image, "q", None, "a red circle on the left") for image in images]
    before = component_hashes(model)
    stats = realign_projector(model, processor, samples, RealignConfig(steps=20, learning_rate=1e-2, batch_size=4))
    after = component_hashes(model)
    assert after["projector"] != before["projector"]
    assert after["vision_tower"] == before["vision_tower"] and after["language_model"] == before["language_model"]
    assert stats["caption_loss_last"] < stats["caption_loss_first"]
    assert all(p.requires_grad for p in model.parameters())  # requires_grad flags restored as they were


def test_cli_robust_check_runs_on_a_saved_vqa_dataset(tmp_path):
    import datasets

    from adpo.lvlm import LlavaView

    model, processor = tiny_llava(seed=2)
    target = write_lvlm(model, processor, tmp_path / "target")
    pixels = random_pixels(2, seed=5)
    # The model's own answers as references (VQAv2's answer dicts), so clean accuracy is known.
    own = LlavaView(model, processor).generate(pixels, ["what color is the circle ?"] * 2, max_new_tokens=4)
    rows = {"image": to_uint8_images(pixels), "query": ["what color is the circle"] * 2,
            "refs": [[{"answer": answer, "answer_confidence": "yes"}] * 4 for answer in own]}
    datasets.Dataset.from_dict(rows).save_to_disk(str(tmp_path / "vqa"))
    argv = ["--encoder", target, "--target", target, "--out", str(tmp_path / "g"), "--verify-data", str(tmp_path / "vqa"),
            "--verify-samples", "2", "--max-new-tokens", "4", "--feature-shift-eps", "", "--robust-eps", "8/255",
            "--robust-steps", "1"]
    # Without the columns the dataset has no reference answers: refused before any model loads.
    with pytest.raises(UsageError, match="set question_column and answers_column"):
        main(argv)
    with pytest.raises(UsageError, match="set both"):
        main(argv + ["--question-column", "query"])
    assert main(argv + ["--question-column", "query", "--answers-column", "refs", "--question-suffix", " ?"]) == 0
    verification = json.loads((tmp_path / "g" / "graft_report.json").read_text())["verification"]
    assert verification["vqa_accuracy_original"] == 1.0  # the questions, suffix included, are the ones answered above
    assert verification["original_num_samples"] == verification["grafted_num_samples"] == 2
    assert 0.0 <= verification["grafted_vqa_accuracy_robust"] <= verification["grafted_vqa_accuracy_clean"] == 1.0


def test_shipped_transfer_configs_parse():
    from pathlib import Path

    from trl import TrlParser

    from transfer.cli import TransferConfig

    configs = sorted((Path(__file__).resolve().parents[1] / "configs" / "transfer").glob("*.yaml"))
    assert len(configs) >= 3
    for path in configs:
        (config,) = TrlParser([TransferConfig]).parse_args_and_config(["--config", str(path)])
        # a robust check needs reference answers: the world's, or named VQA columns of a saved dataset
        if config.robust_eps:
            assert config.verify_data.startswith("world") or (config.question_column and config.answers_column), path.name
