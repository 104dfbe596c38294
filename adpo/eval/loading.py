"""From an :class:`EvalConfig` to what the protocol needs: samples, pixels and a model adapter."""

from __future__ import annotations

import math
from typing import Any

import torch

from adpo.errors import UsageError
from adpo.eval.adapters import GenerativeModel, ZeroShotModel
from adpo.eval.config import EvalConfig
from adpo.eval.tasks import DEFAULT_MAX_NEW_TOKENS, Sample
from adpo.prompts import EVAL_TASK_PROMPTS


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _images_needed(config: EvalConfig) -> int:
    if config.task == "vqa":
        return math.ceil(config.num_samples / max(config.questions_per_image, 1))
    return config.num_samples


def load_samples(config: EvalConfig) -> tuple[list[Sample], list[str] | None]:
    """The evaluated samples from ``config.data`` (any :func:`adpo.sources.open_source` spec) and class names.

    VQA needs question/answer pairs (the world's records carry them); each image contributes up to
    ``questions_per_image`` questions, starting at a different question per image so that every
    question type is covered.
    """
    from adpo.plugins import data_plugin
    from adpo.sources import open_source

    if not config.data:
        raise UsageError("data is required: a saved HF dataset dir, an image folder, a COCO .json, a hub dataset id or "
                         "a plugin's data such as the bundled world's test split")

    hf_columns: dict[str, Any] = {"image_column": config.image_column}
    if config.task == "zeroshot":
        hf_columns["label_column"] = config.label_column
    if config.task == "caption":
        hf_columns["caption_column"] = config.captions_column
    if config.task == "vqa":
        hf_columns.update(question_column=config.question_column, answers_column=config.answers_column)
    source = open_source(config.data, split=config.split, n=_images_needed(config), labelled=config.task == "zeroshot",
                         image_root=config.image_root, allow_outside_root=config.allow_outside_root,
                         **({} if data_plugin(config.data) else hf_columns))
    samples: list[Sample] = []
    skipped = []
    for index in range(len(source)):
        record = source[index]
        if record.image is None:
            skipped.append(f"{record.source_id} ({record.error})")
            continue
        if config.task == "vqa":
            if not record.questions:
                raise ValueError(
                    f"{config.data}: record {record.source_id} has no questions; VQA needs a source with question/answer "
                    "pairs (the bundled world has them), or pick task: caption / targeted / zeroshot."
                )
            count = min(config.questions_per_image, len(record.questions))
            for k in range(count):
                q = (index + k) % len(record.questions)
                answers = record.answers[q]
                samples.append(Sample(f"{record.source_id}/q{q}", record.image, record.questions[q] + config.question_suffix,
                                      list(answers) if isinstance(answers, (list, tuple)) else [answers]))
        elif config.task == "caption":
            if not record.captions:
                raise ValueError(f"{config.data}: record {record.source_id} has no captions; set captions_column to the caption column.")
            samples.append(Sample(record.source_id, record.image, config.prompt or EVAL_TASK_PROMPTS["caption"], list(record.captions)))
        elif config.task == "targeted":
            samples.append(Sample(record.source_id, record.image, config.prompt or EVAL_TASK_PROMPTS["targeted"], [config.target]))
        else:
            if record.label is None:
                raise ValueError(f"{config.data}: record {record.source_id} has no label; set label_column for zero-shot evaluation.")
            samples.append(Sample(record.source_id, record.image, "", [], label=int(record.label)))
        if len(samples) >= config.num_samples:
            break
    if skipped:
        print(f"adpo eval: skipped {len(skipped)} unreadable image(s): {', '.join(skipped[:5])}")
    if not samples and skipped:
        raise ValueError(f"{config.data}: none of its images could be read ({skipped[0]}); for a COCO .json set image_root "
                         "to the folder of the image files.")
    if not samples:
        raise ValueError(f"{config.data} gave no usable samples for task {config.task!r}.")
    return samples[: config.num_samples], getattr(source, "class_names", None)


def build_generative_model(config: EvalConfig):
    """(GenerativeModel, processor) for the LVLM in ``config.model`` (with ``config.encoder`` put into its tower)."""
    from adpo.encoder_io import put_encoder
    from adpo.lvlm import LlavaView
    from adpo.models import load_lvlm

    if not config.model:
        raise UsageError(f"model is required for task {config.task!r}: a llava-hf hub id, a save_pretrained dir or a "
                         "plugin's LVLM name")
    model, processor = load_lvlm(config.model, dtype=config.dtype)
    if config.encoder:
        put_encoder(model, config.encoder)
    model = model.to(resolve_device(config.device)).eval()
    max_new_tokens = config.max_new_tokens or DEFAULT_MAX_NEW_TOKENS[config.task]
    return GenerativeModel(LlavaView(model, processor), max_new_tokens), processor


def build_zeroshot_model(config: EvalConfig, class_names: list[str]):
    """(ZeroShotModel, processor): CLIP text classifier over ``class_names``; the image side is ``config.encoder``,
    else the vision tower of the LVLM in ``config.model``, else the CLIP model's own vision tower."""
    from adpo.models import load_clip, load_lvlm, load_vision_encoder
    from adpo.tower import VisionTower, find_vision_tower
    from adpo.zeroshot import zero_shot_classifier

    if not config.clip_model:
        raise ValueError("task: zeroshot needs clip_model (a CLIPModel dir or hub id, or a plugin's CLIP such as the "
                         "bundled world's).")
    device = resolve_device(config.device)
    clip, processor = load_clip(config.clip_model)
    clip = clip.to(device).eval()
    if config.encoder:
        encoder = load_vision_encoder(config.encoder).encoder.to(device)
    elif config.model and config.model != config.clip_model:
        lvlm, _ = load_lvlm(config.model, dtype=config.dtype)
        encoder = find_vision_tower(lvlm).to(device)
    else:
        encoder = clip.vision_model
    tower = VisionTower.from_encoder(encoder, processor).to(device)
    classes = zero_shot_classifier(clip, processor, class_names, config.class_prompt)

    def embed(pixels: torch.Tensor) -> torch.Tensor:
        # The encoder's pooled CLS embedding through CLIP's visual projection into the text space.
        return clip.visual_projection(tower.pooled(pixels).to(clip.visual_projection.weight.dtype))

    logit_scale = float(clip.logit_scale.detach().exp())
    text = None
    if config.attack_modalities != ["image"]:
        from adpo.eval.multimodal import ZeroShotText

        text = ZeroShotText.from_clip(clip, processor.tokenizer, class_names, config.class_prompt)
    return ZeroShotModel(embed, classes, class_names, logit_scale, (tower, clip), device, text=text), processor


def prepare(config: EvalConfig):
    """Everything ``run_protocol`` needs: (model adapter, samples, pixels, class names)."""
    from adpo.preprocess import to_pixels

    samples, class_names = load_samples(config)
    if config.task == "zeroshot":
        model, processor = build_zeroshot_model(config, class_names or [])
    else:
        model, processor = build_generative_model(config)
    pixels = to_pixels([s.image for s in samples], processor, pad_to_square=config.pad_to_square)
    for sample in samples:
        sample.image = None  # the pixels are all the protocol needs; drop the decoded images
    return model, samples, pixels, class_names
