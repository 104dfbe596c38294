"""Shared machinery of the encoder-only adversarial fine-tuning baselines (FARE, TeCoA, Sim-CLIP).

Each baseline is a :class:`transformers.Trainer` whose ``compute_loss`` first runs the inner attack
(:func:`adpo.attacks.pgd` on the method's own objective, inside one :class:`adpo.threat.ThreatModel`)
and then the method's loss (:mod:`adpo.losses.encoder`) on the adversarial images. The Trainer
brings checkpoints, resume, gradient accumulation, mixed precision and accelerate (DDP, DeepSpeed,
FSDP) for free.

What is trained is always a CLIP vision encoder, whether it was given standalone (a
``CLIPVisionModel`` or ``CLIPModel`` directory / hub id, a plugin's CLIP model) or taken out of an LVLM
(``llava-hf/...``, a plugin's LVLM): the LVLM's tower is copied out as a ``CLIPVisionModel`` with the
LVLM's feature layer and CLS strategy, and the language model is dropped (none of these objectives
uses it). Every checkpoint and the final result hold the trained encoder in the interchange format
under ``encoder/`` (:func:`adpo.encoder_io.save_encoder`: a float32 ``CLIPVisionModel`` directory plus a card
saying how it was trained), so any of them drops into ``adpo transfer`` and ``adpo eval``; checkpoints add
the Trainer's optimizer, scheduler, RNG and trainer state. The encoder trains in float32 (master weights;
``bf16``/``fp16`` autocast the matmuls) unless ``model_dtype`` says otherwise.
"""

from __future__ import annotations

import copy
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Sequence

import torch
from torch import nn
from transformers import CLIPVisionModel, Trainer, TrainingArguments
from transformers.trainer_utils import SchedulerType

import adpo
from adpo.attacks import AttackResult, pgd
from adpo.encoder_io import canonical_encoder_state, load_encoder, put_encoder, save_encoder
from adpo.errors import UsageError
from adpo.models import (
    CLIP_MODEL_TYPES,
    ENCODER_MODEL_TYPES,
    LoadedEncoder,
    load_vision_encoder,
    model_type_of,
    resolve_dtype,
)
from adpo.objectives import Objective
from adpo.plugins import plugin_data_hint, plugin_model_hint, plugin_radius_hint
from adpo.preprocess import to_pixels
from adpo.runtime import (
    ENCODER_DIRNAME,
    check_training_arguments,
    checkpoint_encoder_dir,
    derived_seed,
    fit_precision_to_device,
    resume_checkpoint,
    write_requested_exports,
)
from adpo.sources import ALLOW_OUTSIDE_ROOT_HELP, ImageRecord, ImageSource, check_source, open_source
from adpo.threat import EPS_SYNTAX, ThreatArguments
from adpo.tower import VisionTower, unreachable_tower_parameters

logger = logging.getLogger(__name__)

EMBEDDINGS = ("pooled", "llm")


# ----------------------------------------------------------------------------------------------------
# Configuration
# ----------------------------------------------------------------------------------------------------
@dataclass
class EncoderTrainingConfig(TrainingArguments, ThreatArguments):
    """Options shared by FARE, TeCoA and Sim-CLIP, on top of :class:`transformers.TrainingArguments`.

    Defaults follow the published recipe (FARE, Schlarmann et al. 2024; TeCoA, Mao et al. 2023):
    ℓ∞ ε = 2/255, PGD-10 with step 1/255, AdamW lr 1e-5, weight decay 1e-4, cosine schedule with 7 %
    warm-up, effective batch 128 (per-device batch × gradient accumulation × processes).
    """

    needs_labels: ClassVar[bool] = False  # the dataset must hold label_column (TeCoA)

    model_name_or_path: str | None = field(
        default=None,
        metadata={"help": "The encoder to train: a CLIPVisionModel or CLIPModel dir/hub id, or an LVLM (llava-hf/...) "
                          f"whose vision tower is trained{plugin_model_hint()}."},
    )
    embedding: str = field(
        default="pooled",
        metadata={"help": "Embedding the loss and the attack use: 'pooled' (post-layernorm CLS, as published) or "
                          "'llm' (the feature-layer patch tokens the LLM consumes)."},
    )
    feature_layer: int | None = field(
        default=None, metadata={"help": "Hidden-state index of the LLM features (default: the LVLM's, else -2)."}
    )
    select_strategy: str | None = field(
        default=None, metadata={"help": "'default' drops the CLS token, 'full' keeps it (default: the LVLM's)."}
    )
    dataset: str | None = field(
        default=None,
        metadata={"help": "Training images: an image folder (class sub-folders give labels), a saved HF dataset "
                          f"directory or a hub dataset id{plugin_data_hint()}."},
    )
    dataset_split: str = field(default="train", metadata={"help": "Split to train on."})
    image_column: str = field(default="image", metadata={"help": "Column holding the images."})
    label_column: str = field(default="label", metadata={"help": "Column holding class indices (TeCoA)."})
    max_train_samples: int | None = field(default=None, metadata={"help": "Use only the first N images."})
    allow_outside_root: bool = field(default=False, metadata={"help": ALLOW_OUTSIDE_ROOT_HELP})
    # the attack (ThreatArguments' keys), with the published recipe's defaults: PGD-10, ε 2/255, step 1/255, and the
    # momentum of FARE's training code
    attack_eps: str = field(default="2/255", metadata={"help": f"Radius in [0,1] pixels: {EPS_SYNTAX}{plugin_radius_hint()}."})
    attack_step_size: str = field(default="1/255", metadata={"help": "PGD step size (same syntax as attack_eps)."})
    attack_momentum: float = field(
        default=0.9, metadata={"help": "PGD momentum on mean-|g|-normalised gradients (FARE's training code); 0 = plain."}
    )
    model_dtype: str | None = field(
        default=None,
        metadata={"help": "dtype of the trained encoder's weights: float32 master weights if unset (use bf16: true "
                          "for mixed precision); a half dtype trains in it directly."},
    )
    load_dtype: str | None = field(
        default=None,
        metadata={"help": "dtype an LVLM is loaded in before its tower is copied out (default: as stored, which is "
                          "exact; a narrower dtype rounds the tower, frozen tensors included)."},
    )
    save_lvlm: bool = field(
        default=False,
        metadata={"help": "Also write <output_dir>/lvlm: the original LVLM, loaded as stored, with the trained tower "
                          "put in (every other tensor bit-identical). Needs an LVLM as model_name_or_path."},
    )
    encoder_copy_dtype: str | None = field(
        default=None,
        metadata={"help": "Also write <output_dir>/encoder-<dtype>: the trained encoder cast to this dtype "
                          "(e.g. float16); encoder/ stays float32."},
    )
    trust_remote_code: bool = field(default=False, metadata={"help": "Passed to from_pretrained."})

    # TrainingArguments defaults replaced by the published recipe
    output_dir: str | None = field(
        default=None, metadata={"help": "Run directory: checkpoint-N/ and the final encoder in <output_dir>/encoder."}
    )
    learning_rate: float = field(default=1e-5, metadata={"help": "AdamW learning rate."})
    weight_decay: float = field(default=1e-4, metadata={"help": "AdamW weight decay."})
    lr_scheduler_type: SchedulerType | str = field(default="cosine", metadata={"help": "Learning-rate schedule."})
    warmup_steps: float = field(default=0.07, metadata={"help": "Warm-up steps (< 1: fraction of all steps)."})
    per_device_train_batch_size: int = field(default=128, metadata={"help": "Images per device per micro-batch."})
    num_train_epochs: float = field(default=2.0, metadata={"help": "Epochs over the training images."})
    logging_steps: float = field(default=10, metadata={"help": "Log every N optimiser steps."})
    save_steps: float = field(default=500, metadata={"help": "Checkpoint every N optimiser steps."})
    save_total_limit: int | None = field(default=3, metadata={"help": "Keep at most N checkpoints."})
    remove_unused_columns: bool = field(default=False, metadata={"help": "Kept False: the collator needs the images."})

    def __post_init__(self) -> None:
        # Every check runs here, when the config is parsed: a bad value fails before any model loads.
        if self.model_name_or_path is None:
            raise UsageError(f"model_name_or_path is required: a CLIP vision model or an LVLM id/dir{plugin_model_hint()}")
        if self.dataset is None:
            raise UsageError(f"dataset is required: an image folder, a saved HF dataset dir or a hub id{plugin_data_hint()}")
        if self.output_dir is None:
            raise UsageError("output_dir is required: where checkpoints and the final encoder are written")
        if self.embedding not in EMBEDDINGS:
            raise UsageError(f"embedding must be one of {EMBEDDINGS}, got {self.embedding!r}")
        self.check_threat()
        if self.max_train_samples is not None and self.max_train_samples < 1:
            raise UsageError(f"max_train_samples={self.max_train_samples}; must be >= 1 or unset")
        check_source(self.dataset, "dataset", self.dataset_split, split_key="dataset_split",
                     columns={"image_column": self.image_column, "label_column": self.label_column if self.needs_labels else None})
        check_training_arguments(self, ("model_dtype", "load_dtype", "encoder_copy_dtype"))
        fit_precision_to_device(self, ("model_dtype", "load_dtype"))
        super().__post_init__()

    @property
    def effective_batch_size(self) -> int:
        return self.per_device_train_batch_size * self.gradient_accumulation_steps * max(1, self.world_size)


# ----------------------------------------------------------------------------------------------------
# The trainable module
# ----------------------------------------------------------------------------------------------------
class TowerEmbedding(nn.Module):
    """Pixels in [0, 1] -> the embedding a method trains on: the tower's pooled embedding or its LLM
    features, optionally followed by a frozen head (TeCoA's visual projection into the text space).

    This is the module the Trainer wraps (DDP, DeepSpeed, ...), so the training forward goes through the
    wrapper; attacks get the unwrapped module."""

    def __init__(self, tower: VisionTower, embedding: str = "pooled", head: nn.Module | None = None):
        super().__init__()
        if embedding not in EMBEDDINGS:
            raise ValueError(f"embedding must be one of {EMBEDDINGS}, got {embedding!r}")
        self.tower = tower
        self.embedding = embedding
        self.head = head
        if head is not None:
            head.requires_grad_(False)

    @property
    def encoder(self) -> CLIPVisionModel:
        return self.tower.encoder

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        embedding = self.tower.embed(pixel_values, self.embedding)
        return embedding if self.head is None else self.head(embedding.to(self.head.weight.dtype))


def load_encoder_for_training(config: EncoderTrainingConfig) -> LoadedEncoder:
    """Load ``config.model_name_or_path`` as a standalone CLIPVisionModel plus its preprocessing
    (:func:`adpo.models.load_vision_encoder`), with the config's feature layer and strategy when set."""
    name = config.model_name_or_path
    if config.save_lvlm and model_type_of(name, config.trust_remote_code) in (*ENCODER_MODEL_TYPES, *CLIP_MODEL_TYPES):
        raise UsageError(f"save_lvlm: true writes an LVLM with the trained tower, but {name!r} is a standalone CLIP "
                         "model; set save_lvlm: false (the encoder is written to <output_dir>/encoder either way)")
    loaded = load_vision_encoder(name, dtype=resolve_dtype(config.model_dtype) or torch.float32,
                                 load_dtype=config.load_dtype, trust_remote_code=config.trust_remote_code)
    if config.feature_layer is not None:
        loaded.feature_layer = config.feature_layer
    if config.select_strategy is not None:
        loaded.select_strategy = config.select_strategy
    loaded.record = {"base_model": name, "base_kind": loaded.kind, "feature_layer": loaded.feature_layer,
                     "select_strategy": loaded.select_strategy}
    return loaded


def build_tower_embedding(loaded: LoadedEncoder, embedding: str, head: nn.Module | None = None) -> TowerEmbedding:
    """The trainable module; encoder parameters no gradient of ``embedding`` can reach are frozen
    (with 'llm' features from layer -2, the last block and the post-layernorm) so DDP and weight decay
    never see parameters without gradients."""
    tower = VisionTower.from_encoder(loaded.encoder, loaded.image_processor, loaded.feature_layer, loaded.select_strategy)
    unreachable = set(unreachable_tower_parameters(tower, uses=("pooled" if embedding == "pooled" else "llm",)))
    for name, parameter in tower.encoder.named_parameters():
        parameter.requires_grad_(name not in unreachable)
    return TowerEmbedding(tower, embedding, head)


# ----------------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------------
def load_training_images(config: EncoderTrainingConfig, need_labels: bool = False) -> ImageSource:
    """The training images as an :class:`adpo.sources.ImageSource` (labelled when ``need_labels``)."""
    source = open_source(
        config.dataset,
        split=config.dataset_split,
        n=config.max_train_samples,
        labelled=need_labels,
        image_column=config.image_column,
        label_column=config.label_column if need_labels else None,
        allow_outside_root=config.allow_outside_root,
    )
    if len(source) == 0:
        raise ValueError(f"dataset {config.dataset!r} (split {config.dataset_split!r}) holds no images")
    if need_labels and not source.class_names:
        raise ValueError(
            f"dataset {config.dataset!r} has no class labels; TeCoA needs them: use an image folder with one "
            f"sub-folder per class or a HF dataset with a label column (set label_column){plugin_data_hint()}"
        )
    return source


@dataclass
class PixelCollator:
    """Image records -> ``pixel_values`` in [0, 1] at the encoder's resolution (and ``labels``).

    Records whose image could not be read (``record.error``) are dropped from the batch with a warning."""

    image_processor: Any
    with_labels: bool = False

    def __call__(self, records: Sequence[ImageRecord]) -> dict[str, torch.Tensor]:
        readable = [record for record in records if record.image is not None]
        for record in records:
            if record.image is None:
                logger.warning("skipping unreadable image %s: %s", record.source_id, record.error)
        if not readable:
            raise ValueError(f"no readable image in a batch of {len(records)} (first error: {records[0].error})")
        batch = {"pixel_values": to_pixels([record.image for record in readable], self.image_processor)}
        if self.with_labels:
            if any(record.label is None for record in readable):
                raise ValueError("a training image has no label; TeCoA needs a labelled source")
            batch["labels"] = torch.tensor([record.label for record in readable], dtype=torch.long)
        return batch


# ----------------------------------------------------------------------------------------------------
# The trainer
# ----------------------------------------------------------------------------------------------------
class EncoderAdversarialTrainer(Trainer):
    """A Trainer whose loss is "inner attack, then the method's loss on the adversarial images".

    Subclasses implement :meth:`attack_objective` (what PGD maximises) and :meth:`adversarial_loss`
    (what the optimiser minimises); :meth:`prepare_batch` computes per-batch constants both need
    (e.g. FARE's reference embeddings). The attack's random start is seeded from (seed, step,
    micro-batch, process), so a resumed run draws the same starts as an uninterrupted one.
    """

    method: str = ""
    #: formula written into the card
    objective_description: str = ""
    #: whether batches carry class labels (TeCoA)
    needs_labels: bool = False
    #: the attack objective is a distance to the clean embedding, flat at x' = x (FARE, Sim-CLIP)
    zero_gradient_at_clean: bool = False

    def __init__(
        self,
        model: TowerEmbedding,
        args: EncoderTrainingConfig,
        train_dataset=None,
        image_processor: Any = None,
        source: dict | None = None,
        **kwargs: Any,
    ):
        if image_processor is None:
            raise ValueError("image_processor is required: it sets the resolution and is saved beside the encoder")
        kwargs.setdefault(
            "data_collator",
            PixelCollator(image_processor, with_labels=self.needs_labels),
        )
        super().__init__(model=model, args=args, train_dataset=train_dataset, **kwargs)
        self.image_processor = image_processor
        self.source = dict(source or {})
        self.threat = args.threat_model()
        if self.zero_gradient_at_clean and not args.attack_random_start:
            logger.warning("%s's attack objective has zero gradient at the clean image: without attack_random_start "
                           "PGD cannot leave it and training sees no adversarial images", self.method)
        self._micro_step = (-1, 0)  # (global step, micro-batches attacked during it)

    # --- method hooks -------------------------------------------------------------------------------
    def prepare_batch(self, module: TowerEmbedding, inputs: dict[str, torch.Tensor]) -> dict[str, Any]:
        return {}

    def attack_objective(self, module: TowerEmbedding, inputs: dict[str, torch.Tensor], context: dict) -> Objective:
        raise NotImplementedError

    def adversarial_loss(self, embedding: torch.Tensor, inputs: dict[str, torch.Tensor], context: dict) -> torch.Tensor:
        raise NotImplementedError

    # --- the step ----------------------------------------------------------------------------------
    def attack(self, module: TowerEmbedding, inputs: dict[str, torch.Tensor], context: dict) -> AttackResult:
        """The inner maximisation: PGD on the method's objective, run to the last step (no early stop)."""
        return pgd(
            self.attack_objective(module, inputs, context),
            inputs["pixel_values"],
            self.threat,
            self.args.attack_steps,
            momentum=self.args.attack_momentum,
            early_stop=False,
            generator=self._attack_generator(inputs["pixel_values"].device),
        )

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        module = self.accelerator.unwrap_model(model)
        context = self.prepare_batch(module, inputs)
        x_adv = self.attack(module, inputs, context).x_adv
        embedding = model(x_adv)  # through the (possibly distributed) wrapper, so gradients synchronise
        loss = self.adversarial_loss(embedding, inputs, context)
        return (loss, embedding) if return_outputs else loss

    def _attack_generator(self, device: torch.device) -> torch.Generator:
        step, micro = self._micro_step
        micro = micro + 1 if step == self.state.global_step else 0
        self._micro_step = (self.state.global_step, micro)
        seed = derived_seed(self.args.seed, self.state.global_step, micro, self.args.process_index, separator="/")
        return torch.Generator(device=device).manual_seed(seed)

    # --- the interchange format --------------------------------------------------------------------
    def card(self) -> dict:
        """How this encoder was trained (stored as adpo_card.json beside the weights)."""
        args = self.args
        return {
            "method": self.method,
            "objective": self.objective_description,
            **self.source,
            "embedding": args.embedding,
            "trainable_parameters": sum(p.numel() for p in self.model.parameters() if p.requires_grad),
            "threat_model": self.threat.describe(),
            "norm": self.threat.norm,
            "eps": self.threat.eps,
            "attack": {"name": "pgd", "steps": args.attack_steps, "step_size": self.threat.alpha,
                       "momentum": args.attack_momentum, "random_start": args.attack_random_start},
            "optimizer": {"name": _plain(args.optim), "learning_rate": args.learning_rate,
                          "weight_decay": args.weight_decay, "scheduler": _plain(args.lr_scheduler_type),
                          "warmup_steps": args.warmup_steps},
            "effective_batch_size": args.effective_batch_size,
            "optimizer_steps": self.state.global_step,
            "images_seen": self.state.global_step * args.effective_batch_size,
            "dataset": args.dataset,
            "dataset_split": args.dataset_split,
            "train_images": len(self.train_dataset) if self.train_dataset is not None else None,
            "seed": args.seed,
            "adpo_version": adpo.__version__,
        }

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """Checkpoints and the final output hold ``encoder/``; the final one also what the config asks for
        besides (``save_lvlm``, ``encoder_copy_dtype``)."""
        super().save_model(output_dir, _internal_call)
        if not _internal_call and self.args.should_save:
            args = self.args
            out = Path(output_dir if output_dir is not None else args.output_dir)
            # read back what _save wrote: the whole encoder even where DeepSpeed / FSDP shard the live one
            write_requested_exports(
                out, load_encoder(out / ENCODER_DIRNAME), self.image_processor, self.card(),
                base_model=args.model_name_or_path, save_lvlm=args.save_lvlm,
                encoder_copy_dtype=args.encoder_copy_dtype, trust_remote_code=args.trust_remote_code,
            )

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        """What is trained, not the model it came from: the encoder under ``<output_dir>/encoder``."""
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if not self.args.should_save:
            return
        module = self.accelerator.unwrap_model(self.model)
        encoder: nn.Module = module.encoder
        if state_dict is not None:  # gathered by DeepSpeed / FSDP: keep the encoder's part
            prefix = "tower.encoder."
            encoder = CLIPVisionModel(module.encoder.config)
            put_encoder(encoder, canonical_encoder_state(
                {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
            ))
        if next(encoder.parameters()).dtype != torch.float32:  # model_dtype trains in half: export it upcast (exact)
            encoder = copy.deepcopy(encoder).float()
        save_encoder(encoder, Path(output_dir) / ENCODER_DIRNAME, self.image_processor, self.card())
        torch.save(self.args, os.path.join(output_dir, "training_args.bin"))

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
        if self.is_fsdp_enabled or self.is_deepspeed_enabled:
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        module = self.accelerator.unwrap_model(model if model is not None else self.model)
        # strict: refuses missing or extra keys
        put_encoder(module.encoder, checkpoint_encoder_dir(resume_from_checkpoint))

    def _load_best_model(self) -> None:
        if self.is_fsdp_enabled or self.is_deepspeed_enabled:
            return super()._load_best_model()
        self._load_from_checkpoint(self.state.best_model_checkpoint)


def _plain(value: Any) -> Any:
    """An enum option as its plain value (for the JSON card)."""
    return getattr(value, "value", value)


def train_and_save(trainer: EncoderAdversarialTrainer) -> Path:
    """Train (resuming when asked) and write the final encoder into ``<output_dir>/encoder``; returns that directory."""
    trainer.train(resume_from_checkpoint=resume_checkpoint(trainer.args.resume_from_checkpoint, trainer.args.output_dir))
    trainer.save_model()
    return Path(trainer.args.output_dir) / ENCODER_DIRNAME


def frozen_copy(module: nn.Module) -> nn.Module:
    """A frozen, eval-mode deep copy (FARE's φ_orig)."""
    clone = copy.deepcopy(module).eval()
    clone.requires_grad_(False)
    return clone
