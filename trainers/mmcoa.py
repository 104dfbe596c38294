"""MMCoA (Zhou et al. 2024, arXiv 2404.19287): multimodal contrastive adversarial fine-tuning of both CLIP towers.

    min_θ,φ  E_(x,y)  CE(s · cos(f_θ(x'), g_φ(t_c))_c, y)  +  λ · CE(s · cos(f_θ(x), g_φ(t_c | t'_y))_c, y)

x' maximises the first term in the ℓp ball (PGD, TeCoA's attack); t'_y maximises the second among the texts within
k token substitutions of the true class's prompt t_y ("a photo of a {class}"; the class names' words are protected:
never edited, never put in), by the core's HotFlip attack; t_c | t'_y
is the class prompts with t_y replaced by t'_y. So adversarial images are aligned with clean texts and adversarial
texts with clean images, and both towers train (``freeze_text_tower: true`` trains the image tower only;
``lora_rank`` > 0 trains LoRA adapters instead of every weight). The two attacks are independent (each term holds
one adversarial input), so each step runs the image attack, then the text attack on the clean images. s is the CLIP
model's logit scale, fixed (``logit_scale`` overrides it). Needs labelled images and class names, as TeCoA does.

    adpo train mmcoa --config configs/mmcoa/world.yaml
    accelerate launch -m trainers.mmcoa --config configs/mmcoa/clip-vit-l14-224.yaml
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Any

import torch

from adpo.errors import UsageError, parse_config
from adpo.losses.multimodal import mmcoa_loss
from adpo.objectives import ZeroShotCrossEntropy
from adpo.text_attacks import ZeroShotTextCrossEntropy
from trainers.clip_trainer import (
    ClipAdversarialTrainer,
    ClipPixelModel,
    ClipTrainingConfig,
    build_clip_pixel_model,
    load_clip_for_training,
)
from trainers.encoder_trainer import load_training_images, train_and_save

MMCOA_PROMPT_TEMPLATE = "a photo of a {}"


@dataclass
class MmcoaConfig(ClipTrainingConfig):
    """MMCoA options on top of :class:`ClipTrainingConfig`."""

    needs_labels = True

    class_prompt_template: str = field(default=MMCOA_PROMPT_TEMPLATE, metadata={"help": "Prompt per class; {} = name."})
    class_names: list[str] | None = field(default=None, metadata={"help": "Class names in label order (default: the dataset's)."})
    logit_scale: float | None = field(default=None, metadata={"help": "Inverse temperature s (default: the CLIP model's)."})
    text_loss_weight: float = field(default=1.0, metadata={"help": "λ: weight of the clean-image / adversarial-text term."})

    def __post_init__(self) -> None:
        if "{}" not in self.class_prompt_template:
            raise UsageError(f"class_prompt_template={self.class_prompt_template!r} needs a {{}} for the class name")
        if self.text_loss_weight < 0:
            raise UsageError(f"text_loss_weight={self.text_loss_weight} must be >= 0")
        super().__post_init__()


class MmcoaTrainer(ClipAdversarialTrainer):
    method = "mmcoa"
    needs_labels = True
    objective_description = (
        "min E_(x,y) CE(s cos(f(x'), g(t_c)), y) + lambda CE(s cos(f(x), g(t_c with t_y -> t'_y)), y); x' by PGD on "
        "the first term, t'_y (<= k token substitutions of the class prompt) by HotFlip on the second"
    )

    def __init__(self, model: ClipPixelModel, args: MmcoaConfig, class_names: list[str], logit_scale: float, **kwargs: Any):
        super().__init__(model=model, args=args, protected_words=class_names, **kwargs)
        self.class_names = list(class_names)
        self.logit_scale = float(logit_scale)
        prompts = [args.class_prompt_template.format(name) for name in self.class_names]
        encoded = self.tokenizer_for_text(prompts, padding=True, truncation=True, return_tensors="pt")
        self.class_ids, self.class_mask = encoded["input_ids"], encoded["attention_mask"]

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        module = self.accelerator.unwrap_model(model)
        pixels, labels = inputs["pixel_values"], inputs["labels"]
        class_ids, class_mask = self.class_ids.to(pixels.device), self.class_mask.to(pixels.device)
        with torch.no_grad():
            class_text = module.text_features(class_ids, class_mask)
            clean_image = module.image_features(pixels)
        image_objective = ZeroShotCrossEntropy(module.image_features, class_text, labels, self.logit_scale, modules=(module,))
        x_adv = self.attack(module, inputs, {"objective": image_objective}).x_adv
        text_objective = ZeroShotTextCrossEntropy(module.text_features, module.token_embedding, clean_image, class_text,
                                                  labels, self.logit_scale, modules=(module,))
        prompt_ids, prompt_mask = class_ids[labels], class_mask[labels]
        adversarial_ids = self.attack_text(text_objective, prompt_ids, prompt_mask).input_ids
        # One pass through the (possibly distributed) wrapper, so gradients synchronise.
        image, text, _ = model(torch.cat([x_adv, pixels]), torch.cat([class_ids, adversarial_ids]),
                               torch.cat([class_mask, prompt_mask]))
        batch, classes = pixels.shape[0], class_ids.shape[0]
        loss = mmcoa_loss(image[:batch], image[batch:], text[:classes], text[classes:], labels, self.logit_scale,
                          self.args.text_loss_weight)
        return (loss, image) if return_outputs else loss

    def attack_objective(self, module, inputs, context):
        return context["objective"]

    def card(self) -> dict:
        return {**super().card(), "class_prompt_template": self.args.class_prompt_template,
                "num_classes": len(self.class_names), "logit_scale": self.logit_scale,
                "text_loss_weight": self.args.text_loss_weight}


def build_trainer(config: MmcoaConfig, train_dataset=None) -> MmcoaTrainer:
    loaded = load_clip_for_training(config)
    if train_dataset is None:
        train_dataset = load_training_images(config, need_labels=True)
    class_names = config.class_names or getattr(train_dataset, "class_names", None)
    if not class_names:
        raise ValueError("no class names: set class_names in the config (label order) or use a labelled dataset")
    logit_scale = config.logit_scale if config.logit_scale is not None else float(loaded.clip.logit_scale.detach().exp())
    model = build_clip_pixel_model(config, loaded, train_logit_scale=False)
    return MmcoaTrainer(model, config, class_names=list(class_names), logit_scale=logit_scale,
                        train_dataset=train_dataset, processor=loaded.processor, source=loaded.source)


def main(argv: list[str] | None = None) -> int:
    (config,) = parse_config([MmcoaConfig], argv, prog="adpo train mmcoa")
    out = train_and_save(build_trainer(config))
    print(f"MMCoA image tower written to {out}; the whole CLIP model to {out.parent / 'clip'}")
    return 0


if __name__ == "__main__":
    from adpo.runtime import run_as_process

    sys.exit(run_as_process(main))
