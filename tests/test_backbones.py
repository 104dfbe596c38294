"""LLaVA models around non-CLIP vision backbones (adpo/backbones.py) and the robust classifier trainer."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import (
    ConvNextConfig,
    ConvNextModel,
    SiglipVisionConfig,
    SiglipVisionModel,
    ViTConfig,
    ViTImageProcessor,
    ViTModel,
)

from adpo.backbones import llava_around_backbone, load_backbone
from adpo.errors import UsageError
from adpo.lvlm import LlavaView
from adpo.tower import find_projector
from adpo.preprocess import to_pixels, to_uint8_images
from adpo.runtime import stage_output
from adpo.testing import random_pixels, tiny_llava
from trainers import classifier, instruct

SIZES = dict(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)
PROCESSOR = dict(size={"height": 32, "width": 32}, image_mean=[0.5, 0.4, 0.3], image_std=[0.2, 0.25, 0.3])


def backbone(kind: str):
    torch.manual_seed(1)
    if kind == "vit":
        return ViTModel(ViTConfig(**SIZES)).eval()
    return SiglipVisionModel(SiglipVisionConfig(**SIZES)).eval()


@pytest.mark.parametrize("kind, strategy, tokens", [("vit", "default", 16), ("vit", "full", 17), ("siglip", None, 16)])
def test_an_lvlm_around_a_non_clip_backbone_passes_the_pixel_space_checks(kind, strategy, tokens):
    base, base_processor = tiny_llava(seed=0)
    model, processor = llava_around_backbone(backbone(kind), ViTImageProcessor(**PROCESSOR), base, base_processor,
                                             select_strategy=strategy)
    view = LlavaView(model, processor)
    assert view.tower.num_image_tokens() == tokens
    x = random_pixels(2, seed=2)
    images = to_uint8_images(x)
    assert torch.equal(to_pixels(images, processor), x)
    # adpo's features are what the model's own image path feeds the projector
    own = model.model.get_image_features(pixel_values=view.tower.normalize(x)).pooler_output
    assert torch.equal(find_projector(model)(view.tower.features(x)), torch.stack(list(own)))
    # the prompt's ids are the processor's, and adpo's pixel-space forward is the model's forward on processor inputs
    questions = ["what color is it ?", "what shape is it ?"]
    inputs = processor(images=images, text=[view.format_prompt(q) for q in questions], return_tensors="pt", padding=True)
    encoded = view.encode(questions)
    assert torch.equal(inputs["input_ids"], encoded.input_ids)
    with torch.no_grad():
        theirs = model(**inputs).logits
        ours = model(input_ids=encoded.input_ids, attention_mask=encoded.attention_mask,
                     pixel_values=view.tower.normalize(x)).logits
    assert torch.allclose(ours, theirs, atol=1e-5)
    # teacher-forced answer scores equal the model's own loss
    encoded = view.encode(questions, ["red", "a red circle"])
    scores = view.answer_scores(x, encoded.input_ids, encoded.attention_mask, encoded.labels)
    loss = model(input_ids=encoded.input_ids, attention_mask=encoded.attention_mask,
                 pixel_values=view.tower.normalize(x), labels=encoded.labels).loss
    assert torch.allclose(-scores.sum_logps.sum() / scores.num_tokens.sum(), loss, atol=1e-5)


def test_a_feature_map_backbone_is_refused():
    convnext = ConvNextModel(ConvNextConfig(num_channels=3, num_stages=2, hidden_sizes=[8, 16], depths=[1, 1], image_size=32)).eval()
    base, base_processor = tiny_llava()
    with pytest.raises(UsageError, match="feature maps"):
        llava_around_backbone(convnext, ViTImageProcessor(**PROCESSOR), base, base_processor)


def test_siglip_has_no_cls_token_for_the_default_strategy():
    base, base_processor = tiny_llava()
    with pytest.raises(UsageError, match="no CLS token"):
        llava_around_backbone(backbone("siglip"), ViTImageProcessor(**PROCESSOR), base, base_processor,
                              select_strategy="default")


def test_a_robust_classifier_is_aligned_end_to_end(tmp_path):
    """adpo train classifier (adversarial, tiny) -> adpo train instruct --vision_backbone: a fresh projector trains,
    the classifier's tower and the LM stay as they were, and the export reloads."""
    run = tmp_path / "classifier"
    assert classifier.main([
        "--output_dir", str(run), "--dataset", "world", "--max_train_samples", "8", "--image_size", "64",
        "--patch_size", "16", "--hidden_size", "32", "--num_hidden_layers", "2", "--num_attention_heads", "2",
        "--per_device_train_batch_size", "4", "--max_steps", "2", "--attack_steps", "2", "--eval_samples", "4",
        "--eval_attack_steps", "2", "--save_strategy", "no", "--use_cpu", "true", "--report_to", "none",
        "--disable_tqdm", "true"]) == 0
    card = json.loads((run / "classifier" / classifier.CARD_FILE).read_text())
    assert card["optimizer_steps"] == 2 and 0 <= card["robust_accuracy"] <= card["clean_accuracy"] <= 1
    assert stage_output(run, "classifier") == run / "classifier"  # declared where adpo run reads it
    vit, _ = load_backbone(str(run / "classifier"))
    assert isinstance(vit, ViTModel)

    base, base_processor = tiny_llava(seed=0)
    base.save_pretrained(tmp_path / "lvlm")
    base_processor.save_pretrained(tmp_path / "lvlm")
    (config,) = instruct.parse_config([instruct.InstructConfig], [
        "--model_name_or_path", str(tmp_path / "lvlm"), "--vision_backbone", str(run / "classifier"),
        "--dataset", "world", "--max_train_samples", "4", "--questions_per_image", "1",
        "--output_dir", str(tmp_path / "aligned"), "--per_device_train_batch_size", "2", "--max_steps", "2",
        "--learning_rate", "0.01", "--save_strategy", "no", "--use_cpu", "true", "--report_to", "none",
        "--disable_tqdm", "true"])
    trainer = instruct.build_trainer(config)
    lvlm = trainer.model.lvlm
    before = {name: value.detach().clone() for name, value in lvlm.state_dict().items()}
    instruct.train_and_save(trainer)
    changed = {name for name, value in lvlm.state_dict().items() if not torch.equal(value, before[name])}
    assert changed and all(".multi_modal_projector." in name for name in changed)
    assert torch.equal(lvlm.model.vision_tower.embeddings.patch_embeddings.projection.weight,
                       vit.embeddings.patch_embeddings.projection.weight)
    assert stage_output(tmp_path / "aligned", "model") == tmp_path / "aligned" / instruct.EXPORT_DIRNAME
    exported = instruct.load_lvlm(str(tmp_path / "aligned" / instruct.EXPORT_DIRNAME))[0]
    for name, value in lvlm.state_dict().items():
        assert torch.equal(value, exported.state_dict()[name]), name


def test_the_classifier_needs_its_labelled_images(tmp_path):
    with pytest.raises(UsageError, match="dataset is required: a class-per-folder image folder"):
        classifier.parse_config([classifier.ClassifierConfig], ["--output_dir", str(tmp_path), "--use_cpu", "true"])
