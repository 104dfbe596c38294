"""Visual instruction tuning of a LLaVA-family model, clean or adversarial (Δ²LLaVA, arXiv 2501.09446;
Robust-LLaVA's end-to-end alignment of a robust backbone, arXiv 2502.01576).

    min_θ  E_(x, q, a)  max_{x' ∈ B(x, ε)}  −(1/|a|) Σ_t log p_θ(a_t | a_<t, q, x')      (adversarial: true)

The inner maximisation is the core's PGD (:func:`adpo.attacks.pgd`) on the answer's LM loss
(:class:`adpo.objectives.LanguageModelLoss`, labels from :meth:`adpo.lvlm.LlavaView.encode`); without
``adversarial`` the images stay clean. What trains is declared by the config: the projector
(``train_projector``), LoRA adapters on the language model's linear layers (``lora_r`` > 0, peft) and the vision
tower (``train_vision_tower``); everything else stays bit-identical. ``vision_backbone`` builds the LVLM around
another vision model with a fresh projector first (:mod:`adpo.backbones`).

A run directory and each of its checkpoints hold only what trains (``trainable.safetensors``) with the recipe that
rebuilds the model around it (``instruct_model.json``); the final run also writes ``model/``, a merged llava-hf
model (LoRA folded in) that reloads with ``LlavaForConditionalGeneration.from_pretrained``. ``adpo train instruct
export RUN`` writes the same from any run or checkpoint.

    adpo train instruct --config configs/instruct/world.yaml
    accelerate launch -m trainers.instruct --config configs/instruct/llava-1.5-7b-lora-eps4.yaml
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence


import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import Trainer, TrainingArguments
from transformers.trainer_utils import SchedulerType

import adpo
from adpo.attacks import pgd
from adpo.encoder_io import put_encoder
from adpo.errors import UsageError, parse_config
from adpo.io import atomic_directory, atomic_file, write_json_atomic
from adpo.lvlm import LlavaView
from adpo.models import load_lvlm, resolve_dtype
from adpo.objectives import LanguageModelLoss
from adpo.plugins import plugin_data_hint, plugin_default_data, plugin_model_hint, plugin_radius_hint
from adpo.preprocess import to_pixels
from adpo.runtime import (
    check_training_arguments,
    derived_seed,
    fit_precision_to_device,
    resume_checkpoint,
    write_stage_outputs,
)
from adpo.sources import ALLOW_OUTSIDE_ROOT_HELP, ImageSource, check_source, open_source
from adpo.threat import EPS_SYNTAX, ThreatArguments
from adpo.tower import VisionTower, find_projector, find_vision_tower, unreachable_tower_parameters

logger = logging.getLogger(__name__)

TRAINABLE_FILE = "trainable.safetensors"
RECIPE_FILE = "instruct_model.json"
CARD_FILE = "instruct_card.json"
EXPORT_DIRNAME = "model"
# The linear layers of Llama/Mistral/Gemma/Qwen-style decoders.
LM_LINEAR_NAMES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


# ----------------------------------------------------------------------------------------------------
# Configuration
# ----------------------------------------------------------------------------------------------------
@dataclass
class InstructConfig(TrainingArguments, ThreatArguments):
    """Visual instruction tuning options, on top of :class:`transformers.TrainingArguments`.

    Defaults follow LLaVA-1.5's fine-tuning stage with LoRA (lr 2e-4, cosine, 3 % warm-up, 1 epoch) and the
    project's training attack (ℓ∞ PGD-10, step 1/255, random start) at ε = 2/255.
    """

    model_name_or_path: str | None = field(
        default=None, metadata={"help": f"The LVLM: a llava-hf hub id or directory{plugin_model_hint('lvlm')}."})
    encoder: str | None = field(
        default=None,
        metadata={"help": "A CLIP encoder in the interchange format (e.g. runs/fare-world/encoder, or a trainer's run "
                          "directory) put into the LVLM's tower before training: FARE/TeCoA/AdPO tower + instruction tuning."})
    vision_backbone: str | None = field(
        default=None,
        metadata={"help": "Build the LVLM around this vision backbone (a ViT/SigLIP/DeiT/DINOv2/CLIP model directory or "
                          "hub id; a *ForImageClassification checkpoint gives its base) with a fresh projector, keeping "
                          "model_name_or_path's language model and chat template. Needs train_projector."})
    feature_layer: int = field(default=-2, metadata={"help": "vision_backbone: the hidden state the projector reads."})
    select_strategy: str | None = field(
        default=None, metadata={"help": "vision_backbone: 'default' (drop the CLS token) or 'full' (default: 'default' "
                                        "where the backbone has a CLS token, else 'full')."})
    train_projector: bool = field(default=True, metadata={"help": "Train the multimodal projector."})
    train_vision_tower: bool = field(
        default=False, metadata={"help": "Train the vision tower (its parameters the LLM's features depend on)."})
    lora_r: int = field(default=0, metadata={"help": "LoRA rank on the language model's linear layers; 0: no LoRA."})
    lora_alpha: int = field(default=16, metadata={"help": "LoRA alpha."})
    lora_dropout: float = field(default=0.05, metadata={"help": "LoRA dropout."})
    lora_target_modules: list[str] = field(
        default_factory=lambda: list(LM_LINEAR_NAMES),
        metadata={"help": "Names of the language model's linear layers that get LoRA adapters."})
    dataset: str | None = field(
        default=None,
        metadata={"help": "(image, question, answer) data: a saved HF dataset / hub id with one question per row and its "
                          f"answer(s) (question_column, answers_column){plugin_data_hint()}; default for a plugin's "
                          "model: the plugin's data."})
    dataset_split: str = field(default="train", metadata={"help": "Split to train on."})
    image_column: str = field(default="image", metadata={"help": "HF datasets: the image column."})
    question_column: str = field(default="question", metadata={"help": "HF datasets: the question column."})
    answers_column: str = field(
        default="answers", metadata={"help": "HF datasets: the answer (a string) or reference answers (the most "
                                             "frequent is trained on)."})
    question_suffix: str = field(
        default="", metadata={"help": "Appended to every question, e.g. ' Answer the question using a single word or "
                                      "phrase.' (LLaVA-1.5's short-answer prompt; use the evaluation's)."})
    max_train_samples: int | None = field(default=None, metadata={"help": "Use only the first N images."})
    questions_per_image: int | None = field(
        default=None, metadata={"help": "Train on at most N of each image's questions (a seeded choice); unset: all."})
    allow_outside_root: bool = field(default=False, metadata={"help": ALLOW_OUTSIDE_ROOT_HELP})
    adversarial: bool = field(
        default=False, metadata={"help": "Attack each batch's images on the answer's LM loss before the update."})
    # the attack (ThreatArguments' keys) with the project's training defaults: PGD-10, eps 2/255, step 1/255
    attack_eps: str = field(default="2/255", metadata={"help": f"Radius in [0,1] pixels: {EPS_SYNTAX}{plugin_radius_hint()}."})
    attack_step_size: str = field(default="1/255", metadata={"help": "PGD step size (same syntax as attack_eps)."})
    load_dtype: str | None = field(
        default=None, metadata={"help": "dtype of the frozen weights (default: as stored); trained ones are float32."})
    export_model: bool = field(
        default=True, metadata={"help": "At the end, write <output_dir>/model: the merged llava-hf model (LoRA folded in)."})
    trust_remote_code: bool = field(default=False, metadata={"help": "Passed to from_pretrained."})

    output_dir: str | None = field(
        default=None, metadata={"help": "Run directory: checkpoint-N/, trainable.safetensors and model/."})
    learning_rate: float = field(default=2e-4, metadata={"help": "AdamW learning rate."})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay."})
    lr_scheduler_type: SchedulerType | str = field(default="cosine", metadata={"help": "Learning-rate schedule."})
    warmup_steps: float = field(default=0.03, metadata={"help": "Warm-up steps (< 1: fraction of all steps)."})
    per_device_train_batch_size: int = field(default=16, metadata={"help": "Questions per device per micro-batch."})
    num_train_epochs: float = field(default=1.0, metadata={"help": "Epochs over the training questions."})
    logging_steps: float = field(default=10, metadata={"help": "Log every N optimiser steps."})
    save_steps: float = field(default=500, metadata={"help": "Checkpoint every N optimiser steps."})
    save_total_limit: int | None = field(default=3, metadata={"help": "Keep at most N checkpoints."})
    remove_unused_columns: bool = field(default=False, metadata={"help": "Kept False: the collator needs the images."})

    def __post_init__(self) -> None:
        if self.model_name_or_path is None:
            raise UsageError(f"model_name_or_path is required: a llava-hf model id or directory{plugin_model_hint('lvlm')}")
        if self.output_dir is None:
            raise UsageError("output_dir is required: where checkpoints and the trained weights are written")
        if not (self.train_projector or self.train_vision_tower or self.lora_r > 0):
            raise UsageError("nothing to train: set train_projector, train_vision_tower or lora_r > 0")
        if self.encoder is not None and self.vision_backbone is not None:
            raise UsageError("encoder puts a CLIP encoder into the LVLM's tower and vision_backbone replaces the tower; "
                             "set one of them")
        if self.vision_backbone is not None and not self.train_projector:
            raise UsageError("vision_backbone builds a fresh projector, which must train: set train_projector: true")
        if self.select_strategy not in (None, "default", "full"):
            raise UsageError(f"select_strategy={self.select_strategy!r}; use 'default' or 'full'")
        if self.lora_r < 0 or (self.lora_r > 0 and not self.lora_target_modules):
            raise UsageError(f"lora_r={self.lora_r} with lora_target_modules={self.lora_target_modules}; use lora_r >= 0 "
                             "and name at least one layer")
        self.check_threat()
        for key in ("max_train_samples", "questions_per_image"):
            if getattr(self, key) is not None and getattr(self, key) < 1:
                raise UsageError(f"{key}={getattr(self, key)}; must be >= 1 or unset")
        if self.dataset is None:
            self.dataset = plugin_default_data(self.model_name_or_path)
        if self.dataset is None:
            raise UsageError("dataset is required: a saved HF dataset or hub id with question_column and "
                             f"answers_column{plugin_data_hint()}")
        check_source(self.dataset, "dataset", self.dataset_split, split_key="dataset_split",
                     columns={"image_column": self.image_column, "question_column": self.question_column,
                              "answers_column": self.answers_column})
        for key in ("encoder", "vision_backbone"):
            value = getattr(self, key)
            if value and value.startswith((".", "/", "~")) and not Path(value).expanduser().exists():
                raise UsageError(f"{key}={value!r} does not exist; pass a model directory or hub id")
        check_training_arguments(self, ("load_dtype",))
        fit_precision_to_device(self, ("load_dtype",))
        super().__post_init__()

    def recipe(self) -> dict[str, Any]:
        """What rebuilds the model the trained weights go into (stored beside them)."""
        return {
            "model_name_or_path": self.model_name_or_path, "encoder": self.encoder, "vision_backbone": self.vision_backbone,
            "feature_layer": self.feature_layer, "select_strategy": self.select_strategy, "seed": self.seed,
            "lora": {"r": self.lora_r, "alpha": self.lora_alpha, "dropout": self.lora_dropout,
                     "target_modules": list(self.lora_target_modules)} if self.lora_r > 0 else None,
            "trust_remote_code": self.trust_remote_code,
        }


# ----------------------------------------------------------------------------------------------------
# The model: built from a recipe, parts declared trainable
# ----------------------------------------------------------------------------------------------------
def build_model(recipe: dict[str, Any], load_dtype: str | None = None):
    """(LVLM, processor, peft model or None) from a recipe: the base LVLM, with ``encoder`` put into its tower or
    rebuilt around ``vision_backbone`` when set, with LoRA adapters injected in place when ``lora`` is set (the LVLM
    keeps its own class and layout)."""
    model, processor = load_lvlm(recipe["model_name_or_path"], dtype=load_dtype,
                                 trust_remote_code=recipe.get("trust_remote_code", False))
    if recipe.get("encoder"):
        put_encoder(model, recipe["encoder"])  # a run directory stands for its encoder/ (load_encoder)
    if recipe.get("vision_backbone"):
        from adpo.backbones import llava_around_backbone, load_backbone

        backbone, image_processor = load_backbone(recipe["vision_backbone"], dtype=resolve_dtype(load_dtype))
        model, processor = llava_around_backbone(backbone, image_processor, model, processor,
                                                 feature_layer=recipe["feature_layer"],
                                                 select_strategy=recipe.get("select_strategy"), seed=recipe["seed"])
    peft_model = None
    if recipe.get("lora"):
        from peft import LoraConfig, get_peft_model

        lora = recipe["lora"]
        with torch.random.fork_rng(devices=[]):  # the adapters' initialisation depends on the seed alone
            torch.manual_seed(recipe["seed"])
            peft_model = get_peft_model(model, LoraConfig(
                r=lora["r"], lora_alpha=lora["alpha"], lora_dropout=lora["dropout"],
                target_modules=language_model_linears(model, lora["target_modules"])))
    return model, processor, peft_model


def language_model_linears(model: nn.Module, names: Sequence[str]) -> list[str]:
    """Full names of the language model's linear layers whose last name is in ``names`` (never the tower's, the
    projector's or the LM head)."""
    language_model = model.model.language_model
    prefix = next(n for n, m in model.named_modules() if m is language_model)
    targets = [f"{prefix}.{name}" for name, module in language_model.named_modules()
               if isinstance(module, nn.Linear) and name.rpartition(".")[2] in names]
    if not targets:
        raise UsageError(f"no linear layer of the language model is named in lora_target_modules={list(names)}; "
                         f"Llama-style decoders name theirs {LM_LINEAR_NAMES}")
    return targets


def declare_trainable(model: nn.Module, processor: Any, config: InstructConfig) -> list[str]:
    """Freeze everything, then unfreeze the declared parts (in float32 master weights); returns their names.

    The tower's parameters that no gradient from the LLM's features reaches (layers past the feature layer,
    the post-layernorm) stay frozen, so DDP and weight decay never meet parameters without gradients."""
    model.requires_grad_(False)
    if config.train_projector:
        find_projector(model).requires_grad_(True)
    if config.train_vision_tower:
        unreachable = set(unreachable_tower_parameters(VisionTower.from_lvlm(model, processor), uses=("llm",)))
        for name, parameter in find_vision_tower(model).named_parameters():
            parameter.requires_grad_(name not in unreachable)
    for name, parameter in model.named_parameters():
        if config.lora_r > 0 and "lora_" in name:
            parameter.requires_grad_(True)
        if parameter.requires_grad:
            parameter.data = parameter.data.float()
    return [name for name, parameter in model.named_parameters() if parameter.requires_grad]


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().float().cpu().contiguous() for name, p in model.named_parameters() if p.requires_grad}


def load_trainable(model: nn.Module, state: dict[str, torch.Tensor], names: Sequence[str] | None = None) -> None:
    """Put saved trained weights into ``model`` by name; refuses a state whose names differ from ``names`` (default:
    the parameters that require grad)."""
    parameters = dict(model.named_parameters())
    expected = set(names if names is not None else [n for n, p in parameters.items() if p.requires_grad])
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - set(parameters))
    if missing or unexpected or set(state) != expected:
        raise ValueError(f"the saved trained weights do not fit this model: missing {missing[:3]}, unexpected "
                         f"{unexpected[:3]}, extra {sorted(set(state) - expected)[:3]}; resume with the config that wrote them")
    with torch.no_grad():
        for name, value in state.items():
            parameters[name].copy_(value.to(parameters[name].dtype))


class InstructModel(nn.Module):
    """What the Trainer wraps (DDP, ...): pixels in [0, 1] and encoded prompts in, the token-mean NLL of the answers
    out. The LM head runs only at answer positions (:meth:`adpo.lvlm.LlavaView.answer_scores`)."""

    def __init__(self, lvlm: nn.Module, processor: Any):
        super().__init__()
        self.lvlm = lvlm
        self.view = LlavaView(lvlm, processor)

    def forward(self, pixel_values, input_ids, attention_mask, labels):
        scores = self.view.answer_scores(pixel_values, input_ids, attention_mask, labels)
        return -scores.token_logps.mean()


# ----------------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------------
def reference_answer(answers: str | Sequence[str]) -> str:
    """The answer trained on: the answer itself, or the most frequent reference (the first among ties)."""
    if isinstance(answers, str):
        return answers
    return Counter(answers).most_common(1)[0][0]


class InstructExamples(torch.utils.data.Dataset):
    """One example per (image, question): the source's images with their questions and answers."""

    def __init__(self, source: ImageSource, questions_per_image: int | None = None, seed: int = 0, question_suffix: str = ""):
        self.source, self.question_suffix = source, question_suffix
        counts = _question_counts(source)
        self.index: list[tuple[int, int]] = []
        for image, count in enumerate(counts):
            chosen = list(range(count))
            if questions_per_image is not None and count > questions_per_image:
                chosen = sorted(random.Random(f"{seed}/{image}").sample(chosen, questions_per_image))
            self.index += [(image, q) for q in chosen]

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int) -> dict[str, Any]:
        image, q = self.index[i]
        record = self.source[image]
        return {"image": record.image, "question": record.questions[q] + self.question_suffix, "answer": reference_answer(record.answers[q]),
                "source_id": record.source_id, "error": record.error}


def _question_counts(source: ImageSource) -> list[int]:
    """Questions per image, read without decoding any image."""
    counts = source.question_counts()
    if counts is None:
        raise UsageError(f"{source.name} holds no questions; instruction tuning needs a HF dataset with question_column "
                         f"and answers_column{plugin_data_hint()} with questions")
    return counts


@dataclass
class InstructCollator:
    """Examples -> pixels in [0, 1] at the model's resolution and the prompts encoded with answer labels."""

    view: LlavaView
    processor: Any

    def __call__(self, examples: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        readable = [example for example in examples if example["image"] is not None]
        for example in examples:
            if example["image"] is None:
                logger.warning("skipping unreadable image %s: %s", example["source_id"], example["error"])
        if not readable:
            raise ValueError(f"no readable image in a batch of {len(examples)}")
        encoded = self.view.encode([e["question"] for e in readable], [e["answer"] for e in readable])
        return {"pixel_values": to_pixels([e["image"] for e in readable], self.processor),
                "input_ids": encoded.input_ids, "attention_mask": encoded.attention_mask, "labels": encoded.labels}


def load_examples(config: InstructConfig) -> InstructExamples:
    source = open_source(config.dataset, split=config.dataset_split, n=config.max_train_samples,
                         image_column=config.image_column, question_column=config.question_column,
                         answers_column=config.answers_column, allow_outside_root=config.allow_outside_root)
    examples = InstructExamples(source, config.questions_per_image, config.seed, config.question_suffix)
    if len(examples) == 0:
        raise UsageError(f"dataset {config.dataset!r} (split {config.dataset_split!r}) holds no questions")
    return examples


# ----------------------------------------------------------------------------------------------------
# The trainer
# ----------------------------------------------------------------------------------------------------
class InstructTrainer(Trainer):
    """A Trainer whose loss is "PGD on the answer's LM loss (when adversarial), then that loss on the attacked
    images". The attack's random start is seeded from (seed, step, micro-batch, process), so a resumed run draws
    the same starts as an uninterrupted one."""

    def __init__(self, model: InstructModel, args: InstructConfig, processor: Any, trainable: Sequence[str], **kwargs):
        kwargs.setdefault("data_collator", InstructCollator(model.view, processor))
        super().__init__(model=model, args=args, **kwargs)
        self.processor = processor
        self.trainable = list(trainable)
        self.threat = args.threat_model()
        self._micro_step = (-1, 0)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        module: InstructModel = self.accelerator.unwrap_model(model)
        pixels = inputs["pixel_values"]
        if self.args.adversarial:
            objective = LanguageModelLoss(module.view, inputs["input_ids"], inputs["attention_mask"], inputs["labels"])
            pixels = pgd(objective, pixels, self.threat, self.args.attack_steps, momentum=self.args.attack_momentum,
                         early_stop=False, generator=self._attack_generator(pixels.device)).x_adv
        loss = model(pixels, inputs["input_ids"], inputs["attention_mask"], inputs["labels"])
        return (loss, None) if return_outputs else loss

    def _attack_generator(self, device: torch.device) -> torch.Generator:
        step, micro = self._micro_step
        micro = micro + 1 if step == self.state.global_step else 0
        self._micro_step = (self.state.global_step, micro)
        seed = derived_seed(self.args.seed, self.state.global_step, micro, self.args.process_index, separator="/")
        return torch.Generator(device=device).manual_seed(seed)

    def card(self) -> dict[str, Any]:
        args = self.args
        return {
            "method": "adversarial instruction tuning" if args.adversarial else "instruction tuning",
            **args.recipe(),
            "trained": {"projector": args.train_projector, "vision_tower": args.train_vision_tower,
                        "lora": args.lora_r > 0},
            "trainable_parameters": sum(p.numel() for p in self.model.parameters() if p.requires_grad),
            "threat_model": self.threat.describe() if args.adversarial else None,
            "attack": {"name": "pgd", "steps": args.attack_steps, "step_size": self.threat.alpha,
                       "momentum": args.attack_momentum, "random_start": args.attack_random_start} if args.adversarial else None,
            "learning_rate": args.learning_rate,
            "effective_batch_size": args.per_device_train_batch_size * args.gradient_accumulation_steps * max(1, args.world_size),
            "optimizer_steps": self.state.global_step,
            "dataset": args.dataset, "dataset_split": args.dataset_split,
            "train_questions": len(self.train_dataset) if self.train_dataset is not None else None,
            "adpo_version": adpo.__version__,
        }

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        super().save_model(output_dir, _internal_call)
        if not _internal_call and self.args.should_save and self.args.export_model:
            out = Path(output_dir if output_dir is not None else self.args.output_dir)
            export_run(out, out / EXPORT_DIRNAME)  # frozen weights as stored: a bf16 load_dtype would round fp16 ones
            write_stage_outputs(out, model=out / EXPORT_DIRNAME)

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        """What trains, not the model: ``trainable.safetensors`` with the recipe and a card."""
        output_dir = Path(output_dir if output_dir is not None else self.args.output_dir)
        if not self.args.should_save:
            return
        module: InstructModel = self.accelerator.unwrap_model(self.model)
        state = trainable_state(module.lvlm)
        output_dir.mkdir(parents=True, exist_ok=True)
        with atomic_file(output_dir / TRAINABLE_FILE) as temporary:
            save_file(state, os.fspath(temporary), metadata={"format": "pt"})
        write_json_atomic(output_dir / RECIPE_FILE, self.args.recipe())
        write_json_atomic(output_dir / CARD_FILE, self.card())
        torch.save(self.args, output_dir / "training_args.bin")

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
        module: InstructModel = self.accelerator.unwrap_model(model if model is not None else self.model)
        load_trainable(module.lvlm, load_file(Path(resume_from_checkpoint) / TRAINABLE_FILE), self.trainable)

    def _load_best_model(self) -> None:
        self._load_from_checkpoint(self.state.best_model_checkpoint)


# ----------------------------------------------------------------------------------------------------
# Export: a merged llava-hf model
# ----------------------------------------------------------------------------------------------------
def export_run(run: str | os.PathLike, out: str | os.PathLike, load_dtype: str | None = None) -> Path:
    """Write the model a run or checkpoint directory stands for as a llava-hf directory (LoRA merged): the recipe's
    base rebuilt in ``load_dtype`` (default: as stored), the trained weights put in, ``save_pretrained``."""
    run = Path(run)
    for name in (RECIPE_FILE, TRAINABLE_FILE):
        if not (run / name).is_file():
            raise UsageError(f"{run} holds no {name}; pass a run or checkpoint directory written by adpo train instruct")
    recipe = json.loads((run / RECIPE_FILE).read_text())
    model, processor, peft_model = build_model(recipe, load_dtype)
    state = load_file(run / TRAINABLE_FILE)
    load_trainable(model, state, names=list(state))
    merged = peft_model.merge_and_unload() if peft_model is not None else model
    with atomic_directory(out) as staging:
        merged.save_pretrained(staging, safe_serialization=True)
        processor.save_pretrained(staging)
    return Path(out)


# ----------------------------------------------------------------------------------------------------
# Entry point
# ----------------------------------------------------------------------------------------------------
def build_trainer(config: InstructConfig, train_dataset=None) -> InstructTrainer:
    model, processor, _ = build_model(config.recipe(), config.load_dtype)
    trainable = declare_trainable(model, processor, config)
    module = InstructModel(model, processor)
    if train_dataset is None:
        train_dataset = load_examples(config)
    return InstructTrainer(module, config, processor, trainable, train_dataset=train_dataset)


def train_and_save(trainer: InstructTrainer) -> Path:
    trainer.train(resume_from_checkpoint=resume_checkpoint(trainer.args.resume_from_checkpoint, trainer.args.output_dir))
    trainer.save_model()
    return Path(trainer.args.output_dir)


def export_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="adpo train instruct export",
                                     description="Write a run or checkpoint of adpo train instruct as a merged llava-hf "
                                                 "model directory (LoRA folded in) that from_pretrained reloads.")
    parser.add_argument("run", help="a run directory or one of its checkpoint-N directories")
    parser.add_argument("--out", help="output directory (default: <run>/model)")
    parser.add_argument("--dtype", help="dtype of the frozen weights (default: as stored)")
    args = parser.parse_args(argv)
    out = export_run(args.run, args.out or Path(args.run) / EXPORT_DIRNAME, args.dtype)
    print(f"merged model written to {out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "export":
        return export_main(argv[1:])
    (config,) = parse_config([InstructConfig], argv, prog="adpo train instruct")
    out = train_and_save(build_trainer(config))
    print(f"trained weights written to {out / TRAINABLE_FILE}" + (f"; merged model in {out / EXPORT_DIRNAME}" if config.export_model else ""))
    return 0


if __name__ == "__main__":
    from adpo.runtime import run_as_process

    sys.exit(run_as_process(main))
