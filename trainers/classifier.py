"""Adversarial training of a ViT image classifier (Madry et al., 2018): a robust non-CLIP backbone for
``adpo train instruct --vision_backbone`` (Robust-LLaVA, arXiv 2502.01576, aligns large robust classifiers so).

    min_θ  E_(x, y)  max_{x' ∈ B(x, ε)}  CE(f_θ(x'), y)

The inner maximisation is the core's PGD (:func:`adpo.attacks.pgd`) on the same cross-entropy, inside one
:class:`adpo.threat.ThreatModel`; pixels are in [0, 1] and normalised inside the model. The classifier is built
from the config's size (``model_name_or_path`` unset) or fine-tuned from a ``ViTForImageClassification``. The run
directory and each checkpoint hold it under ``classifier/`` (``save_pretrained`` with its image processor and a
card); with ``eval_samples`` the card also records clean and APGD accuracy on ``eval_split``.

    adpo train classifier --config configs/classifier/world.yaml
"""

from __future__ import annotations

import json
import logging
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence


import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm
from transformers import Trainer, TrainingArguments, ViTConfig, ViTForImageClassification, ViTImageProcessor
from transformers.trainer_utils import SchedulerType

import adpo
from adpo.attacks import apgd, pgd
from adpo.errors import UsageError, parse_config
from adpo.io import atomic_directory
from adpo.objectives import Evaluation, Objective
from adpo.plugins import plugin_data_hint, plugin_radius_hint
from adpo.preprocess import to_pixels
from adpo.runtime import (
    check_training_arguments,
    derived_seed,
    fit_precision_to_device,
    resume_checkpoint,
    write_stage_outputs,
)
from adpo.sources import ALLOW_OUTSIDE_ROOT_HELP, check_source, open_source
from adpo.threat import EPS_SYNTAX, ThreatArguments, ThreatModel
from trainers.encoder_trainer import PixelCollator

logger = logging.getLogger(__name__)

CLASSIFIER_DIRNAME = "classifier"
CARD_FILE = "adpo_card.json"


@dataclass
class ClassifierConfig(TrainingArguments, ThreatArguments):
    """Options on top of :class:`transformers.TrainingArguments`; the default size is a ViT-Tiny-like model for the
    bundled world's 64-pixel images (16 patch tokens, as WorldCLIP's tower)."""

    model_name_or_path: str | None = field(
        default=None, metadata={"help": "A ViTForImageClassification to fine-tune; unset: a new ViT of the size below."})
    image_size: int = field(default=64, metadata={"help": "New ViT: input resolution."})
    patch_size: int = field(default=16, metadata={"help": "New ViT: patch size."})
    hidden_size: int = field(default=192, metadata={"help": "New ViT: width."})
    num_hidden_layers: int = field(default=6, metadata={"help": "New ViT: depth."})
    num_attention_heads: int = field(default=3, metadata={"help": "New ViT: heads."})
    dataset: str | None = field(default=None, metadata={"help": "Labelled images (required): a class-per-folder image "
                                                                   f"folder, a saved HF dataset or a hub id{plugin_data_hint()}."})
    dataset_split: str = field(default="train", metadata={"help": "Split to train on."})
    image_column: str = field(default="image", metadata={"help": "Column holding the images."})
    label_column: str = field(default="label", metadata={"help": "Column holding class indices."})
    max_train_samples: int | None = field(default=None, metadata={"help": "Use only the first N images."})
    allow_outside_root: bool = field(default=False, metadata={"help": ALLOW_OUTSIDE_ROOT_HELP})
    adversarial: bool = field(default=True, metadata={"help": "Train on PGD images (false: clean training)."})
    # the attack (ThreatArguments' keys), at 4/255 by default (as the robust ImageNet classifiers Robust-LLaVA uses)
    attack_eps: str = field(default="4/255", metadata={"help": f"Radius in [0,1] pixels: {EPS_SYNTAX}{plugin_radius_hint()}."})
    attack_step_size: str = field(default="2/255", metadata={"help": "PGD step size (same syntax as attack_eps)."})
    eval_split: str = field(default="val", metadata={"help": "Split for the final clean / robust accuracy."})
    eval_samples: int = field(default=0, metadata={"help": "Images of eval_split scored at the end (APGD); 0: none."})
    eval_attack_steps: int = field(default=50, metadata={"help": "APGD steps of the final robust accuracy."})

    output_dir: str | None = field(default=None, metadata={"help": "Run directory: checkpoint-N/ and classifier/."})
    learning_rate: float = field(default=1e-3, metadata={"help": "AdamW learning rate."})
    weight_decay: float = field(default=0.05, metadata={"help": "AdamW weight decay."})
    lr_scheduler_type: SchedulerType | str = field(default="cosine", metadata={"help": "Learning-rate schedule."})
    warmup_steps: float = field(default=0.05, metadata={"help": "Warm-up steps (< 1: fraction of all steps)."})
    per_device_train_batch_size: int = field(default=64, metadata={"help": "Images per device per micro-batch."})
    num_train_epochs: float = field(default=10.0, metadata={"help": "Epochs over the training images."})
    logging_steps: float = field(default=20, metadata={"help": "Log every N optimiser steps."})
    save_steps: float = field(default=200, metadata={"help": "Checkpoint every N optimiser steps."})
    save_total_limit: int | None = field(default=2, metadata={"help": "Keep at most N checkpoints."})
    remove_unused_columns: bool = field(default=False, metadata={"help": "Kept False: the collator needs the images."})

    def __post_init__(self) -> None:
        if self.output_dir is None:
            raise UsageError("output_dir is required: where checkpoints and the classifier are written")
        self.check_threat()
        for key in ("eval_attack_steps", "image_size", "patch_size", "hidden_size",
                    "num_hidden_layers", "num_attention_heads"):
            if getattr(self, key) < 1:
                raise UsageError(f"{key}={getattr(self, key)}; must be >= 1")
        if self.image_size % self.patch_size or self.hidden_size % self.num_attention_heads:
            raise UsageError(f"image_size={self.image_size} must be a multiple of patch_size={self.patch_size} and "
                             f"hidden_size={self.hidden_size} of num_attention_heads={self.num_attention_heads}")
        if self.eval_samples < 0:
            raise UsageError(f"eval_samples={self.eval_samples}; must be >= 0")
        if self.dataset is None:
            raise UsageError(f"dataset is required: a class-per-folder image folder, a saved HF dataset or a hub id"
                             f"{plugin_data_hint()}")
        check_source(self.dataset, "dataset", self.dataset_split, split_key="dataset_split",
                     columns={"image_column": self.image_column, "label_column": self.label_column})
        check_training_arguments(self)
        fit_precision_to_device(self, ())
        super().__post_init__()



class PixelClassifier(nn.Module):
    """Pixels in [0, 1] -> logits; the image processor's normalisation inside."""

    def __init__(self, classifier: ViTForImageClassification, image_processor: Any):
        super().__init__()
        self.classifier = classifier
        self.image_processor = image_processor
        self.register_buffer("mean", torch.tensor(image_processor.image_mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(image_processor.image_std).view(1, -1, 1, 1), persistent=False)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.classifier(pixel_values=(pixel_values - self.mean) / self.std).logits


class ClassifierCrossEntropy(Objective):
    """CE of a classifier's logits for the true labels (maximised); success when the prediction is wrong."""

    per_sample_fields = ("labels",)

    def __init__(self, model: PixelClassifier, labels: torch.Tensor):
        self.model, self.labels = model, labels

    def modules(self) -> Sequence[nn.Module]:
        return (self.model,)

    def evaluate(self, x: torch.Tensor) -> Evaluation:
        logits = self.model(x).float()
        return Evaluation(values=F.cross_entropy(logits, self.labels, reduction="none"),
                          success=logits.argmax(dim=-1) != self.labels)


def build_classifier(config: ClassifierConfig, class_names: Sequence[str]) -> PixelClassifier:
    labels = {"id2label": dict(enumerate(class_names)), "label2id": {name: i for i, name in enumerate(class_names)}}
    if config.model_name_or_path:
        classifier = ViTForImageClassification.from_pretrained(config.model_name_or_path, num_labels=len(class_names),
                                                               ignore_mismatched_sizes=True, **labels)
        processor = ViTImageProcessor.from_pretrained(config.model_name_or_path)
    else:
        vit = ViTConfig(image_size=config.image_size, patch_size=config.patch_size, hidden_size=config.hidden_size,
                        num_hidden_layers=config.num_hidden_layers, num_attention_heads=config.num_attention_heads,
                        intermediate_size=4 * config.hidden_size, num_labels=len(class_names), **labels)
        torch.manual_seed(config.seed)
        classifier = ViTForImageClassification(vit)
        processor = ViTImageProcessor(size={"height": config.image_size, "width": config.image_size},
                                      image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5])
    return PixelClassifier(classifier, processor)


class ClassifierTrainer(Trainer):
    """PGD on the cross-entropy, then the cross-entropy on the attacked images; the attack's random start is seeded
    from (seed, step, micro-batch, process) as in the other trainers."""

    def __init__(self, model: PixelClassifier, args: ClassifierConfig, **kwargs):
        kwargs.setdefault("data_collator", PixelCollator(model.image_processor, with_labels=True))
        super().__init__(model=model, args=args, **kwargs)
        self.threat = args.threat_model()
        self._micro_step = (-1, 0)
        self.scores: dict[str, Any] = {}

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        module: PixelClassifier = self.accelerator.unwrap_model(model)
        pixels, labels = inputs["pixel_values"], inputs["labels"]
        if self.args.adversarial:
            step, micro = self._micro_step
            micro = micro + 1 if step == self.state.global_step else 0
            self._micro_step = (self.state.global_step, micro)
            seed = derived_seed(self.args.seed, self.state.global_step, micro, self.args.process_index, separator="/")
            generator = torch.Generator(device=pixels.device).manual_seed(seed)
            pixels = pgd(ClassifierCrossEntropy(module, labels), pixels, self.threat, self.args.attack_steps,
                         early_stop=False, generator=generator).x_adv
        logits = model(pixels)
        loss = F.cross_entropy(logits.float(), labels)
        return (loss, logits) if return_outputs else loss

    def card(self) -> dict[str, Any]:
        args = self.args
        return {
            "method": "adversarial training (PGD)" if args.adversarial else "clean training",
            "base_model": args.model_name_or_path, "threat_model": self.threat.describe() if args.adversarial else None,
            "attack": {"name": "pgd", "steps": args.attack_steps, "step_size": self.threat.alpha} if args.adversarial else None,
            "optimizer_steps": self.state.global_step, "learning_rate": args.learning_rate,
            "effective_batch_size": args.per_device_train_batch_size * args.gradient_accumulation_steps * max(1, args.world_size),
            "dataset": args.dataset, "dataset_split": args.dataset_split, "seed": args.seed,
            **self.scores, "adpo_version": adpo.__version__,
        }

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        output_dir = Path(output_dir if output_dir is not None else self.args.output_dir)
        if not self.args.should_save:
            return
        module: PixelClassifier = self.accelerator.unwrap_model(self.model)
        with atomic_directory(output_dir / CLASSIFIER_DIRNAME) as staging:
            module.classifier.save_pretrained(staging, safe_serialization=True)
            module.image_processor.save_pretrained(staging)
            (staging / CARD_FILE).write_text(json.dumps(self.card(), indent=2, sort_keys=True, default=str))
        torch.save(self.args, os.path.join(output_dir, "training_args.bin"))

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
        module: PixelClassifier = self.accelerator.unwrap_model(model if model is not None else self.model)
        trained = ViTForImageClassification.from_pretrained(Path(resume_from_checkpoint) / CLASSIFIER_DIRNAME)
        module.classifier.load_state_dict(trained.state_dict())


def accuracy(model: PixelClassifier, source, threat: ThreatModel, steps: int, batch_size: int = 100) -> dict[str, float]:
    """Clean accuracy and robust accuracy under APGD-``steps`` on the cross-entropy, over ``source``."""
    model.eval()
    device = next(model.parameters()).device
    clean = robust = 0
    for start in tqdm(range(0, len(source), batch_size), desc="classifier accuracy", leave=False):
        records = [source[i] for i in range(start, min(start + batch_size, len(source)))]
        x = to_pixels([r.image for r in records], model.image_processor).to(device)
        labels = torch.tensor([r.label for r in records], device=device)
        with torch.no_grad():
            clean += int((model(x).argmax(-1) == labels).sum())
        result = apgd(ClassifierCrossEntropy(model, labels), x, threat, steps)
        robust += int((~result.success).sum())
    return {"clean_accuracy": clean / len(source), "robust_accuracy": robust / len(source)}


def main(argv: list[str] | None = None) -> int:
    (config,) = parse_config([ClassifierConfig], argv, prog="adpo train classifier")
    source = open_source(config.dataset, split=config.dataset_split, n=config.max_train_samples, labelled=True,
                         image_column=config.image_column, label_column=config.label_column,
                         allow_outside_root=config.allow_outside_root)
    if not source.class_names:
        raise UsageError(f"dataset {config.dataset!r} has no class labels; use a class-per-folder image folder or a HF "
                         f"dataset with label_column{plugin_data_hint()}")
    trainer = ClassifierTrainer(build_classifier(config, source.class_names), config, train_dataset=source)
    trainer.train(resume_from_checkpoint=resume_checkpoint(config.resume_from_checkpoint, config.output_dir))
    if config.eval_samples:
        held_out = open_source(config.dataset, split=config.eval_split, n=config.eval_samples, labelled=True,
                               image_column=config.image_column, label_column=config.label_column,
                               allow_outside_root=config.allow_outside_root)
        trainer.scores = {"eval_split": config.eval_split, "eval_samples": len(held_out),
                          "eval_attack": f"apgd-{config.eval_attack_steps}",
                          **accuracy(trainer.accelerator.unwrap_model(trainer.model), held_out, config.threat_model(),
                                     config.eval_attack_steps)}
        print(json.dumps(trainer.scores))
    trainer.save_model()
    if trainer.args.should_save:
        write_stage_outputs(config.output_dir, classifier=Path(config.output_dir) / CLASSIFIER_DIRNAME)
    print(f"classifier written to {Path(config.output_dir) / CLASSIFIER_DIRNAME}")
    return 0


if __name__ == "__main__":
    from adpo.runtime import run_as_process

    sys.exit(run_as_process(main))
