"""ΔCLIP (arXiv 2501.09446): adversarial contrastive vision-language pre-training of a CLIPModel, from scratch (any HF
CLIPModel config) or from a checkpoint.

    min_θ,φ  E_batch  InfoNCE(f_θ(x'), g_φ(t'))  +  w · InfoNCE(f_θ(x), g_φ(t))

InfoNCE is CLIP's symmetric in-batch contrastive loss with the model's learned logit scale (clamped to ≤ 100, as CLIP
does); pairs whose texts are identical are left out of each other's softmax. x'_i maximises image i's image-to-text
cross-entropy against the batch's clean texts (PGD in the ℓp ball); t'_i maximises text i's text-to-image
cross-entropy against the batch's clean images, within k token substitutions (the core's HotFlip text attack;
``text_protected_words`` are never edited nor put in, so an attack cannot make a caption false). w =
``clean_loss_weight`` (0: the adversarial loss alone). The texts are one caption per image, drawn each time the
image is seen, or with ``class_prompt_probability`` the class prompt of a labelled image.

    adpo train deltaclip --config configs/deltaclip/world.yaml
    accelerate launch -m trainers.deltaclip --config configs/deltaclip/world-gpu.yaml
"""

from __future__ import annotations

import math
import random
import sys
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
from transformers import TrainerCallback

from adpo.errors import UsageError, parse_config
from adpo.losses.multimodal import deltaclip_loss
from adpo.objectives import ZeroShotCrossEntropy
from adpo.plugins import data_plugin
from adpo.preprocess import image_processor_of, to_pixels
from adpo.sources import ImageRecord, ImageSource, open_source
from adpo.text_attacks import TextRetrievalCrossEntropy
from trainers.clip_trainer import (
    ClipAdversarialTrainer,
    ClipPixelModel,
    ClipTrainingConfig,
    build_clip_pixel_model,
    load_clip_for_training,
)
from trainers.encoder_trainer import train_and_save

MAX_LOGIT_SCALE = 100.0


@dataclass
class DeltaClipConfig(ClipTrainingConfig):
    """ΔCLIP options on top of :class:`ClipTrainingConfig`."""

    from_scratch: bool = field(default=False, metadata={"help": "Initialise a fresh CLIPModel from model_name_or_path's "
                                                                "config (seeded) instead of loading its weights."})
    caption_column: str = field(default="captions", metadata={"help": "HF datasets: the caption column (a string or a list)."})
    class_prompt_probability: float = field(default=0.0, metadata={"help": "Use the class prompt instead of a caption with "
                                                                           "this probability (labelled images only)."})
    class_prompt_template: str = field(default="a photo of a {}", metadata={"help": "The class prompt; {} = class name."})
    text_protected_words: list[str] = field(default_factory=list, metadata={"help": "Words the text attack never edits "
                                                                                    "or puts in (the captions' content words)."})
    clean_loss_weight: float = field(default=0.0, metadata={"help": "w: weight of CLIP's loss on the clean pairs."})

    def __post_init__(self) -> None:
        if not 0.0 <= self.class_prompt_probability <= 1.0:
            raise UsageError(f"class_prompt_probability={self.class_prompt_probability} must be in [0, 1]")
        if self.clean_loss_weight < 0:
            raise UsageError(f"clean_loss_weight={self.clean_loss_weight} must be >= 0")
        super().__post_init__()


def load_caption_images(config: DeltaClipConfig) -> ImageSource:
    labelled = config.class_prompt_probability > 0
    columns = {} if data_plugin(config.dataset) else {"image_column": config.image_column, "caption_column": config.caption_column,
                                   **({"label_column": config.label_column} if labelled else {})}
    source = open_source(config.dataset, split=config.dataset_split, n=config.max_train_samples, labelled=labelled,
                         allow_outside_root=config.allow_outside_root, **columns)
    if len(source) == 0:
        raise ValueError(f"dataset {config.dataset!r} (split {config.dataset_split!r}) holds no images")
    return source


@dataclass
class CaptionCollator:
    """Image records -> ``pixel_values`` in [0, 1] and one tokenised text per image: a caption drawn at random, or
    with ``class_prompt_probability`` the class prompt. Unreadable images and images without text are dropped."""

    image_processor: Any
    tokenizer: Any
    seed: int = 0
    class_names: Sequence[str] | None = None
    class_prompt_template: str = "a photo of a {}"
    class_prompt_probability: float = 0.0

    def __post_init__(self) -> None:
        self.random = random.Random(self.seed)

    def text_of(self, record: ImageRecord) -> str | None:
        if self.class_names and record.label is not None and self.random.random() < self.class_prompt_probability:
            return self.class_prompt_template.format(self.class_names[record.label])
        return self.random.choice(record.captions) if record.captions else None

    def __call__(self, records: Sequence[ImageRecord]) -> dict[str, torch.Tensor]:
        pairs = [(record.image, self.text_of(record)) for record in records if record.image is not None]
        pairs = [(image, text) for image, text in pairs if text]
        if not pairs:
            raise ValueError(f"no readable image with a caption in a batch of {len(records)}; set caption_column")
        limit = min(getattr(self.tokenizer, "model_max_length", 77), 77)
        encoded = self.tokenizer([text for _, text in pairs], padding=True, truncation=True, max_length=limit,
                                 return_tensors="pt")
        return {"pixel_values": to_pixels([image for image, _ in pairs], self.image_processor),
                "input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"]}


class _ClampLogitScale(TrainerCallback):
    """CLIP's cap on the learned temperature: logit_scale ≤ log 100 after every optimiser step."""

    def __init__(self, model: ClipPixelModel):
        self.model = model

    def on_step_end(self, args, state, control, **kwargs):
        with torch.no_grad():
            self.model.base.logit_scale.clamp_(0, math.log(MAX_LOGIT_SCALE))
        return control


class DeltaClipTrainer(ClipAdversarialTrainer):
    method = "deltaclip"
    objective_description = (
        "min InfoNCE(f(x'), g(t')) + w InfoNCE(f(x), g(t)) (CLIP's symmetric in-batch loss, learned scale); x' by PGD "
        "on image-to-text CE against the clean texts, t' (<= k token substitutions) by HotFlip on text-to-image CE "
        "against the clean images"
    )

    def __init__(self, model: ClipPixelModel, args: DeltaClipConfig, **kwargs: Any):
        super().__init__(model=model, args=args, protected_words=args.text_protected_words, **kwargs)
        self.add_callback(_ClampLogitScale(model))

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        module = self.accelerator.unwrap_model(model)
        pixels, ids, mask = inputs["pixel_values"], inputs["input_ids"], inputs["attention_mask"]
        batch = pixels.shape[0]
        pairs = torch.arange(batch, device=pixels.device)
        with torch.no_grad():
            clean_text = module.text_features(ids, mask)
            clean_image = module.image_features(pixels)
            scale = float(module.base.logit_scale.exp())
        image_objective = ZeroShotCrossEntropy(module.image_features, clean_text, pairs, scale, modules=(module,))
        x_adv = self.attack(module, inputs, {"objective": image_objective}).x_adv
        text_objective = TextRetrievalCrossEntropy(module.text_features, module.token_embedding, clean_image, pairs, scale,
                                                   modules=(module,))
        adversarial_ids = self.attack_text(text_objective, ids, mask).input_ids
        image, text, learned_scale = model(torch.cat([x_adv, pixels]), torch.cat([adversarial_ids, ids]),
                                           torch.cat([mask, mask]))
        # Identical texts (two images with one class prompt) are not negatives of each other.
        same_text = (ids[:, None] == ids[None]).all(dim=-1) & ~torch.eye(batch, dtype=torch.bool, device=ids.device)
        loss = deltaclip_loss(image[:batch], text[:batch], learned_scale, image[batch:], text[batch:],
                              self.args.clean_loss_weight, ignore=same_text)
        return (loss, image) if return_outputs else loss

    def attack_objective(self, module, inputs, context):
        return context["objective"]

    def card(self) -> dict:
        args = self.args
        return {**super().card(), "from_scratch": args.from_scratch, "clean_loss_weight": args.clean_loss_weight,
                "class_prompt_probability": args.class_prompt_probability,
                "logit_scale": float(self.accelerator.unwrap_model(self.model).base.logit_scale.detach().exp())}


def build_trainer(config: DeltaClipConfig, train_dataset=None) -> DeltaClipTrainer:
    loaded = load_clip_for_training(config, from_scratch=config.from_scratch)
    if train_dataset is None:
        train_dataset = load_caption_images(config)
    model = build_clip_pixel_model(config, loaded, train_logit_scale=True)
    collator = CaptionCollator(image_processor_of(loaded.processor), loaded.processor.tokenizer, seed=config.seed,
                               class_names=getattr(train_dataset, "class_names", None),
                               class_prompt_template=config.class_prompt_template,
                               class_prompt_probability=config.class_prompt_probability)
    return DeltaClipTrainer(model, config, train_dataset=train_dataset, processor=loaded.processor,
                            source=loaded.source, data_collator=collator)


def main(argv: list[str] | None = None) -> int:
    (config,) = parse_config([DeltaClipConfig], argv, prog="adpo train deltaclip")
    out = train_and_save(build_trainer(config))
    print(f"ΔCLIP image tower written to {out}; the whole CLIP model to {out.parent / 'clip'}")
    return 0


if __name__ == "__main__":
    from adpo.runtime import run_as_process

    sys.exit(run_as_process(main))
