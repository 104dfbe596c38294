"""AdPO: adversarial robustness of an LVLM's CLIP vision tower by preference optimisation.

A subclass of TRL's :class:`~trl.DPOTrainer` that trains **only the vision tower** of a LLaVA-family
model on preference pairs, with


    loss = PIO + λ·AIO [+ μ·anchor]                   (adpo.losses.preference, adpo.losses.encoder)

* PIO: DPO between π(y_w | x, q) on the *clean* image and π(y_l | x_adv, q) on the *adversarial* one,
  in any of TRL's loss shapes that make sense here (``loss_type``; sigmoid by default).
* AIO: −Σ_t sg(p_t)·log p_t of y_w on x_adv (λ = ``aio_weight``).
* anchor (optional, off by default; not in the paper): ‖φ_θ(x) − φ_orig(x)‖² / ‖φ_orig(x)‖² on the clean
  images (μ = ``anchor_weight``), so the tower's clean features stay where a grafted LVLM's projector,
  trained on the original tower, expects them.

Where the pairs come from (``pair_source``):

* ``stored``: a pairs dataset (``adpo pairs``: columns ``image``, ``adv_image``, ``prompt``, ``chosen``,
  ``rejected`` and optional ``ref_chosen_logps`` / ``ref_rejected_logps``), written once by the original model.
* ``online`` (the paper's algorithm): images and prompts from an image source (``adpo.sources``); each
  step the *current* policy answers the clean image (y_w) and a fresh x_adv made by PGD on the FARE
  objective against the current tower (y_l). Greedy by default; sampling is seeded per step.

What changes against TRL's DPOTrainer, and why:

* The batch is built by :class:`AdPODataCollator` with the project's one tokenisation path
  (``LlavaView.encode``, the one ``adpo pairs`` used for the stored reference log-probs) and the
  project's one preprocessing path (``to_pixels``): chosen rows see the clean image, rejected rows the
  adversarial one. The model runs on pixel-space images; normalisation happens inside
  (``VisionTower.normalize``), so ``adv_source: online`` can re-attack each step in pixel space.
* One forward pass scores three row blocks — [y_w | x], [y_l | x_adv], [y_w | x_adv] — with TRL's
  fused LM head (no full logits); the third block feeds AIO.
* The reference is **not a second LVLM**: it differs from the policy only in the tower, so it is the
  frozen LLM + projector run with a frozen copy of the original tower (full fine-tuning; TRL holds that
  copy as ``ref_model``) or with the LoRA adapters disabled (``tune: lora``). Reference log-probs stored
  in the dataset are used when present (``use_stored_ref_logps``), which skips the reference forward.
* Only reachable tower parameters train (``freeze_for_tower_training``); the LLM and projector stay
  bit-identical. Every ``save_model`` (final and per checkpoint) writes what trains, not the frozen LVLM:
  the merged encoder in the interchange format (``<dir>/encoder``: a float32 ``CLIPVisionModel`` directory
  + card; LoRA adds its adapter files), so checkpoints resume with ``resume_from_checkpoint`` and drop into
  ``adpo transfer``. ``save_lvlm`` adds the whole LVLM at the end, bit-identical outside the tower.

Run: ``adpo train adpo --config configs/adpo/world.yaml`` or
``accelerate launch -m trainers.adpo --config configs/adpo/paper.yaml``.
"""

from __future__ import annotations

import sys
from pathlib import Path


import contextlib
import copy
import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

import torch
from datasets import Dataset
from torch import nn
from transformers import TrainerCallback
from trl import DPOConfig, DPOTrainer
from trl.trainer.utils import use_adapter

import adpo
from adpo.attacks import attack_mode, pgd
from adpo.encoder_io import export_encoder, put_encoder, save_encoder
from adpo.errors import UsageError, parse_config
from adpo.losses.encoder import relative_drift_loss
from adpo.losses.preference import PIO_LOSS_TYPES, aio_loss, pio_loss, sequence_logps
from adpo.lvlm import LlavaView
from adpo.objectives import EmbeddingDistance
from adpo.pairs_format import DATASET_DIR, REF_COLUMNS, REQUIRED_COLUMNS, check_pairs, load_pairs, missing_columns
from adpo.plugins import plugin_data_hint, plugin_model_hint, plugin_radius_hint
from adpo.preprocess import to_pixels
from adpo.prompts import prompts_for_image, resolve_prompts
from adpo.runtime import (
    ENCODER_DIRNAME,
    check_training_arguments,
    checkpoint_encoder_dir,
    derived_seed,
    fit_precision_to_device,
    load_lvlm_for_tower_training,
    resume_checkpoint,
    write_requested_exports,
)
from adpo.sources import ImageSource, ImageSourceArguments, check_source, open_source, saved_dataset_columns
from adpo.threat import EPS_SYNTAX, ThreatArguments
from adpo.tower import VisionTower, find_vision_tower, freeze_for_tower_training

logger = logging.getLogger(__name__)

PAIR_SOURCES = ("stored", "online")
ADV_SOURCES = ("stored", "online")
IDENTICAL_PAIRS = ("keep", "drop")
SOURCE_INDEX = "source_index"  # the one stored column of an online image dataset (online_images)
ONLINE_COLUMNS = ("image", "prompt")
TUNE_MODES = ("full", "lora")
EMBEDDINGS = ("pooled", "llm")
# Linear layers of a CLIP encoder block that LoRA adapts.
CLIP_LINEAR_NAMES = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")


# ----------------------------------------------------------------------------------------------------
# Configuration
# ----------------------------------------------------------------------------------------------------
@dataclass
class AdPOConfig(DPOConfig, ThreatArguments, ImageSourceArguments):
    """TRL's DPOConfig plus what AdPO needs. Defaults differing from DPOConfig follow the paper
    (AdamW lr 1e-5, weight decay 1e-4, 2 epochs); ``beta`` keeps DPO's 0.1."""

    # --- what to train on ---------------------------------------------------------------------------
    model_name_or_path: str | None = field(
        default=None,
        metadata={"help": f"LLaVA-family model: hub id or local directory{plugin_model_hint('lvlm')}."},
    )
    model_dtype: str = field(
        default="float32",
        metadata={"help": "dtype the LVLM is loaded in (float32, bfloat16, float16). The trained tower is kept in "
                  "float32 (master weights) unless keep_tower_dtype is set."},
    )
    keep_tower_dtype: bool = field(
        default=False, metadata={"help": "Train the tower in model_dtype instead of upcasting it to float32."}
    )
    save_lvlm: bool = field(
        default=False,
        metadata={"help": "Also write <output_dir>/lvlm at the end: the original LVLM, loaded as stored, with the "
                  "trained tower put in (every other tensor bit-identical). Checkpoints never hold the LVLM."},
    )
    encoder_copy_dtype: str | None = field(
        default=None,
        metadata={"help": "Also write <output_dir>/encoder-<dtype> at the end: the trained encoder cast to this "
                  "dtype (e.g. float16); encoder/ stays float32."},
    )
    pair_source: str = field(
        default="stored",
        metadata={"help": "'stored': a pairs dataset (dataset_path) written once by the original model; 'online' "
                  "(the paper): each step the current policy answers the clean image (chosen) and a fresh "
                  "adversarial one (rejected), over the images of image_source."},
    )
    dataset_path: str | None = field(
        default=None,
        metadata={"help": "Pairs dataset (pair_source: stored): an `adpo pairs` output directory (its dataset/ "
                  "folder), a save_to_disk directory, or a hub id."},
    )
    dataset_split: str = field(default="train", metadata={"help": "Split to train on when the dataset has several."})
    eval_fraction: float = field(
        default=0.0, metadata={"help": "Share of the pairs (or images) held out as eval set (0 = none); split with `seed`."}
    )

    # --- online pairs (pair_source: online) ---------------------------------------------------------
    image_source: str | None = field(
        default=None,
        metadata={"help": "Images for online pairs (adpo.sources.open_source): an image folder, a saved HF dataset, "
                  f"a COCO captions .json or a hub dataset id{plugin_data_hint()}."},
    )
    image_split: str = field(default="train", metadata={"help": "Split of a HF dataset or of a plugin's data."})
    question_column: str | None = field(
        default=None, metadata={"help": "HF dataset: column with a question per image (for use_source_questions)."}
    )
    pad_to_square: bool = field(
        default=False, metadata={"help": "Pad each image to a square in the processor's mean colour before its resize "
                                 "and crop, as original LLaVA-1.5 does (adpo.preprocess.to_pixels)."},
    )
    prompt_set: str = field(default="paper", metadata={"help": "Named prompt set (adpo.prompts.PROMPT_SETS); 'paper' "
                            "is the paper's single 'What is in the image?'."})
    prompts: list[str] | None = field(default=None, metadata={"help": "Explicit prompts (override prompt_set)."})
    prompts_file: str | None = field(default=None, metadata={"help": "Text file, one prompt per line (overrides prompt_set)."})
    use_source_questions: bool = field(
        default=False,
        metadata={"help": "Ask each image one of the source's own questions (a plugin's data's questions; a HF dataset's "
                  "question_column) instead of the prompt set."},
    )
    max_new_tokens: int = field(default=32, metadata={"help": "Length limit of the generated answers (tokens)."})
    do_sample: bool = field(default=False, metadata={"help": "Sample the answers instead of greedy decoding (seeded per step)."})
    temperature: float = field(default=1.0, metadata={"help": "Sampling temperature (do_sample only)."})
    top_p: float = field(default=1.0, metadata={"help": "Nucleus sampling (do_sample only)."})
    identical_pairs: str = field(
        default="keep",
        metadata={"help": "Pairs whose rejected answer equals the chosen one: 'keep' them in PIO or 'drop' them from it "
                  "(they state no preference; AIO still scores every image; a step with no pair left and no AIO "
                  "leaves the weights as they were)."},
    )

    # --- the AdPO objective -------------------------------------------------------------------------
    aio_weight: float = field(default=1.0, metadata={"help": "λ: weight of AIO in PIO + λ·AIO (0 disables AIO)."})
    anchor_weight: float = field(
        default=0.0,
        metadata={"help": "μ: weight of the clean-feature anchor ||φ_θ(x) − φ_orig(x)||² / ||φ_orig(x)||² added to the "
                  "loss (drift_embedding output; 0, the paper's AdPO, disables it). Keeps the clean features where a "
                  "projector trained on the original tower reads them, for encoders meant to be grafted."},
    )
    use_stored_ref_logps: bool = field(
        default=True,
        metadata={"help": "Use the dataset's ref_chosen_logps / ref_rejected_logps when present instead of running "
                  "the reference forward (stored rejected log-probs are ignored with adv_source=online)."},
    )

    # --- adversarial images -------------------------------------------------------------------------
    adv_source: str | None = field(
        default=None,
        metadata={"help": "'stored': the pairs dataset's adv_image; 'online': a new x_adv every step by PGD on the FARE "
                  "objective ||φ_θ(x_adv) − φ_orig(x)||² (current tower against the frozen original one). Default: "
                  "what pair_source implies; online adversarial images need pair_source: online."},
    )
    # the online attack: ThreatArguments' keys (attack_norm, attack_eps, attack_steps, attack_step_size,
    # attack_random_start, attack_momentum), at the paper's 2/255 by default
    attack_eps: str = field(default="2/255", metadata={"help": f"Online attack ε in [0,1] pixels: {EPS_SYNTAX}"
                                                                     f"{plugin_radius_hint()}."})
    attack_embedding: str = field(
        default="pooled", metadata={"help": "Tower output the online FARE objective compares: 'pooled' or 'llm'."}
    )
    drift_embedding: str = field(
        default="llm",
        metadata={"help": "Tower output the logged clean-embedding drift ||φ_θ(x) − φ_orig(x)|| (and the anchor) "
                  "compares: 'llm' (the features the LLM consumes) or 'pooled'."},
    )

    # --- what trains --------------------------------------------------------------------------------
    tune: str = field(default="full", metadata={"help": "'full': every reachable tower parameter; 'lora': LoRA on the tower."})
    lora_r: int = field(default=16, metadata={"help": "LoRA rank (tune: lora)."})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA alpha (tune: lora)."})
    lora_dropout: float = field(default=0.0, metadata={"help": "LoRA dropout (tune: lora)."})
    lora_target_modules: list[str] = field(
        default_factory=lambda: list(CLIP_LINEAR_NAMES),
        metadata={"help": "CLIP linear layers LoRA adapts, in every tower layer the LLM's features depend on."},
    )

    # --- paper defaults that differ from DPOConfig --------------------------------------------------
    learning_rate: float = field(default=1e-5, metadata={"help": "AdamW learning rate (paper: 1e-5)."})
    weight_decay: float = field(default=1e-4, metadata={"help": "AdamW weight decay (paper: 1e-4)."})
    num_train_epochs: float = field(default=2.0, metadata={"help": "Epochs over the pairs (paper: 2)."})

    def __post_init__(self):
        # Every check runs here, when the config is parsed: a bad value fails before any model or dataset loads,
        # and before TrainingArguments' own checks (which may refuse the machine first).
        check_training_arguments(self, ("model_dtype", "encoder_copy_dtype"))
        problems = self._attack_problems()
        if problems:
            raise UsageError("invalid AdPO config: " + "; ".join(problems))
        if self.bf16 is None:  # TRL's default (bf16 unless fp16), set here so that a machine without GPU drops it
            self.bf16 = not self.fp16
        fit_precision_to_device(self, ("model_dtype",))
        super().__post_init__()
        problems = []
        if self.pair_source == "stored" and self.dataset_path:
            problems += self._pairs_problems()
        if self.pair_source not in PAIR_SOURCES:
            problems.append(f"pair_source={self.pair_source!r}; use one of {PAIR_SOURCES}")
        if self.adv_source is None:
            self.adv_source = "online" if self.pair_source == "online" else "stored"
        if self.adv_source not in ADV_SOURCES:
            problems.append(f"adv_source={self.adv_source!r}; use one of {ADV_SOURCES}")
        elif self.adv_source == "online" and self.pair_source == "stored":
            problems.append("adv_source: online with stored pairs would score each stored rejected answer on a new image "
                            "it was not written for; set pair_source: online (answers generated on each step's x_adv)")
        elif self.adv_source == "stored" and self.pair_source == "online":
            problems.append("pair_source: online attacks every step and has no stored adversarial images; remove adv_source")
        if self.pair_source == "online":
            problems += self._online_problems()
        if self.identical_pairs not in IDENTICAL_PAIRS:
            problems.append(f"identical_pairs={self.identical_pairs!r}; use one of {IDENTICAL_PAIRS}")
        if self.tune not in TUNE_MODES:
            problems.append(f"tune={self.tune!r}; use one of {TUNE_MODES}")
        for key in ("attack_embedding", "drift_embedding"):
            if getattr(self, key) not in EMBEDDINGS:
                problems.append(f"{key}={getattr(self, key)!r}; use one of {EMBEDDINGS}")
        unsupported = [t for t in self.loss_type if t not in PIO_LOSS_TYPES]
        if unsupported:
            problems.append(f"loss_type {unsupported} has no PIO form; use one or more of {PIO_LOSS_TYPES}")
        for key in ("aio_weight", "anchor_weight"):
            if getattr(self, key) < 0:
                problems.append(f"{key} must be >= 0, got {getattr(self, key)}")
        if self.model_dtype not in ("float32", "fp32") and not (self.bf16 or self.fp16 or self.keep_tower_dtype):
            problems.append(f"model_dtype={self.model_dtype!r} with an fp32 tower needs mixed precision (bf16: true or "
                            "fp16: true) so the projector accepts the tower's features; or set keep_tower_dtype: true")
        if not 0.0 <= self.eval_fraction < 1.0:
            problems.append(f"eval_fraction must be in [0, 1), got {self.eval_fraction}")
        # DPOTrainer features that do not carry over to a preference between two *images*.
        if self.f_divergence_type != "reverse_kl":
            problems.append("f_divergence_type must stay 'reverse_kl' for AdPO")
        if self.ld_alpha is not None:
            problems.append("ld_alpha (length desensitisation) is not supported by AdPO; remove it")
        if self.use_weighting:
            problems.append("use_weighting (WPO) is not supported by AdPO; set it to false")
        if self.sync_ref_model:
            problems.append("sync_ref_model is not supported: AdPO's reference is the original tower by definition")
        if self.precompute_ref_log_probs:
            problems.append("precompute_ref_log_probs is not supported; store ref log-probs with `adpo pairs` "
                            "(compute_ref_logps: true) and keep use_stored_ref_logps: true")
        if problems:
            raise UsageError("invalid AdPO config: " + "; ".join(problems))

    def _attack_problems(self) -> list[str]:
        """The online attack's settings (checked whatever adv_source says: a config must not hold a bad ε)."""
        problems = []
        try:
            self.check_threat()
        except UsageError as error:
            problems.append(str(error))
        if self.max_length is not None and self.max_length < 1:
            problems.append(f"max_length={self.max_length}; must be >= 1 or unset")
        return problems

    def _pairs_problems(self) -> list[str]:
        """A stored pairs dataset that is not there, or lacks a column AdPO reads (checked from its metadata)."""
        try:
            check_source(self.dataset_path, "dataset_path", self.dataset_split, split_key="dataset_split")
            location = Path(self.dataset_path).expanduser()
            if (location / DATASET_DIR).is_dir():  # an `adpo pairs` run directory
                location = location / DATASET_DIR
            columns = saved_dataset_columns(location, self.dataset_split, "dataset_path", "dataset_split")
        except UsageError as error:
            return [str(error)]
        missing = missing_columns(columns)
        if missing:
            return [f"dataset_path={self.dataset_path!r} lacks columns {missing} (has {columns}); an AdPO dataset needs "
                    f"{list(REQUIRED_COLUMNS)}: make one with `adpo pairs`"]
        return []

    def _online_problems(self) -> list[str]:
        problems = []
        if self.image_source:
            columns = {"image_column": self.image_column, "question_column": self.question_column}
            try:
                check_source(self.image_source, "image_source", self.image_split, columns, split_key="image_split")
            except UsageError as error:
                problems.append(str(error))
        problems += self.image_source_problems()
        if self.use_source_questions:
            if self.prompts or self.prompts_file:
                problems.append("use_source_questions asks the source's own questions; remove prompts / prompts_file")
        else:
            try:
                self.prompt_list()
            except ValueError as error:
                problems.append(str(error))
        if self.max_new_tokens < 1:
            problems.append(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.do_sample and not (self.temperature > 0 and 0 < self.top_p <= 1):
            problems.append(f"sampling needs temperature > 0 and 0 < top_p <= 1, got {self.temperature} and {self.top_p}")
        return problems

    def prompt_list(self) -> list[str] | None:
        """The prompts online pairs ask (None: each image's own questions)."""
        if self.use_source_questions:
            return None
        return resolve_prompts(self.prompt_set, self.prompts, self.prompts_file)

    def decoding(self) -> dict[str, Any]:
        """``generate`` settings for the online answers."""
        settings: dict[str, Any] = {"max_new_tokens": self.max_new_tokens, "do_sample": self.do_sample}
        if self.do_sample:
            settings.update(temperature=self.temperature, top_p=self.top_p)
        return settings


# ----------------------------------------------------------------------------------------------------
# Collator
# ----------------------------------------------------------------------------------------------------
@dataclass
class AdPODataCollator:
    """Pairs → one AdPO batch.

    ``input_ids`` / ``attention_mask`` / ``completion_mask`` are ``[2B, T]`` (left-padded): rows 0..B−1
    are prompt + chosen, rows B..2B−1 prompt + rejected, tokenised by ``LlavaView.encode``.
    ``clean_pixels`` (for the chosen rows) and ``adv_pixels`` (for the rejected rows) are ``[B, 3, H, W]``
    in [0, 1], from ``to_pixels``. ``ref_chosen_logps`` / ``ref_rejected_logps`` ``[B]`` pass through when
    every example has them. With ``drop_identical``, ``pair_weights`` ``[B]`` is 0 where rejected == chosen.
    """

    view: LlavaView
    max_length: int | None = None
    drop_identical: bool = False

    def __call__(self, examples: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        missing = missing_columns(list(examples[0]))
        if missing:
            raise KeyError(f"pairs example lacks columns {missing}; an AdPO dataset needs {REQUIRED_COLUMNS} "
                           "(make one with `adpo pairs`)")
        chosen, rejected = [e["chosen"] for e in examples], [e["rejected"] for e in examples]
        batch = encode_pairs(self.view, [e["prompt"] for e in examples], chosen, rejected, self.max_length)
        processor = self.view.processor
        clean = to_pixels([e["image"] for e in examples], processor)
        adv = to_pixels([e["adv_image"] for e in examples], processor)
        if clean.shape != adv.shape:
            raise ValueError(f"clean images {tuple(clean.shape)} and adversarial images {tuple(adv.shape)} differ in "
                             "size; the pairs dataset must store both at the model's resolution")
        batch.update(clean_pixels=clean, adv_pixels=adv)
        if self.drop_identical:
            batch["pair_weights"] = distinct_pairs(chosen, rejected)
        for column in REF_COLUMNS:
            if all(e.get(column) is not None for e in examples):
                batch[column] = torch.tensor([float(e[column]) for e in examples], dtype=torch.float32)
        return batch


def encode_pairs(
    view: LlavaView, prompts: Sequence[str], chosen: Sequence[str], rejected: Sequence[str], max_length: int | None
) -> dict[str, torch.Tensor]:
    """``input_ids`` / ``attention_mask`` / ``completion_mask`` ``[2B, T]``: prompt + chosen rows, then prompt +
    rejected rows, by ``LlavaView.encode`` (the tokenisation ``adpo pairs`` scored its reference log-probs with)."""
    encoded = view.encode(list(prompts) * 2, list(chosen) + list(rejected))
    pad_token_id = view.tokenizer.pad_token_id or 0
    input_ids, attention_mask, labels = _truncate_left_padded(
        encoded.input_ids, encoded.attention_mask, encoded.labels, max_length, pad_token_id
    )
    return {"input_ids": input_ids, "attention_mask": attention_mask, "completion_mask": (labels != -100).long()}


def distinct_pairs(chosen: Sequence[str], rejected: Sequence[str]) -> torch.Tensor:
    """``[B]`` float: 1 where the rejected answer differs from the chosen one, 0 where they are the same text."""
    return torch.tensor([float(c != r) for c, r in zip(chosen, rejected, strict=True)])


def _truncate_left_padded(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    labels: torch.Tensor,
    max_length: int | None,
    pad_token_id: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Keep the first ``max_length`` tokens of each left-padded row (the answer's end is cut, never the image)."""
    if max_length is None or input_ids.shape[1] <= max_length:
        return input_ids, attention_mask, labels
    lengths = attention_mask.sum(dim=1)
    kept = lengths.clamp(max=max_length)
    width = int(kept.max())
    out_ids = torch.full((input_ids.shape[0], width), pad_token_id, dtype=input_ids.dtype)
    out_mask = torch.zeros((input_ids.shape[0], width), dtype=attention_mask.dtype)
    out_labels = torch.full((input_ids.shape[0], width), -100, dtype=labels.dtype)
    total = input_ids.shape[1]
    for row in range(input_ids.shape[0]):
        start, keep = total - int(lengths[row]), int(kept[row])
        if (labels[row, start : start + keep] != -100).sum() == 0:
            raise ValueError(f"max_length={max_length} leaves no answer token in a row of {int(lengths[row])} tokens "
                             "(the prompt with its image tokens fills it); raise max_length")
        out_ids[row, width - keep :] = input_ids[row, start : start + keep]
        out_mask[row, width - keep :] = 1
        out_labels[row, width - keep :] = labels[row, start : start + keep]
    return out_ids, out_mask, out_labels


# ----------------------------------------------------------------------------------------------------
# Online pairs: images and prompts in; the trainer generates the answers each step
# ----------------------------------------------------------------------------------------------------
def online_images(source: ImageSource, prompts: list[str] | None, seed: int = 0) -> Dataset:
    """An image source as training rows ``{"image", "prompt", "source_id", "error"}`` (``pair_source: online``).

    The dataset holds only the source positions; images are read when a batch is drawn (a transform), so a
    large folder costs nothing up front. Each image is asked one prompt, fixed by (seed, source_id)
    (``adpo.prompts.prompts_for_image``): every process, epoch and resume asks it the same. ``prompts=None``
    asks one of the image's own questions.
    """
    if len(source) == 0:
        raise ValueError(f"image source {source.name} holds no image; check image_source and max_images")

    def read(rows: dict[str, list]) -> dict[str, list]:
        out: dict[str, list] = {"image": [], "prompt": [], "source_id": [], "error": []}
        for position in rows[SOURCE_INDEX]:
            record = source[position]
            options = prompts if prompts is not None else record.questions
            if not options:
                raise ValueError(f"image {record.source_id} of {source.name} has no question; set question_column "
                                 "(HF dataset) or use_source_questions: false")
            ((_, prompt),) = prompts_for_image(list(options), 1, seed, record.source_id)
            for key, value in (("image", record.image), ("prompt", prompt), ("source_id", record.source_id),
                               ("error", record.error)):
                out[key].append(value)
        return out

    dataset = Dataset.from_dict({SOURCE_INDEX: list(range(len(source)))})
    dataset.set_transform(read)
    return dataset


@dataclass
class OnlineImageCollator:
    """Images + prompts → ``clean_pixels`` ``[B, 3, H, W]`` (``to_pixels``) and ``prompts``; unreadable images
    are left out with a warning."""

    processor: Any
    pad_to_square: bool = False

    def __call__(self, examples: Sequence[dict[str, Any]]) -> dict[str, Any]:
        readable = [e for e in examples if e["image"] is not None]
        for example in examples:
            if example["image"] is None:
                logger.warning("skipping unreadable image %s: %s", example.get("source_id"), example.get("error"))
        if not readable:
            names = ", ".join(f"{e.get('source_id')} ({e.get('error')})" for e in examples)
            raise ValueError(f"every image of a batch is unreadable: {names}; repair or remove them from image_source")
        return {"clean_pixels": to_pixels([e["image"] for e in readable], self.processor, self.pad_to_square),
                "prompts": [e["prompt"] for e in readable]}


@dataclass
class OnlinePairs:
    """What one online micro-batch trained on (``AdPOTrainer.online_pairs``)."""

    prompts: list[str]
    chosen: list[str]  # the policy's answers on clean_pixels
    rejected: list[str]  # the policy's answers on adv_pixels
    clean_pixels: torch.Tensor
    adv_pixels: torch.Tensor


class _SkipStepsWithoutPairs(TrainerCallback):
    """``identical_pairs: drop`` without AIO: an optimizer step whose micro-batches kept no pair on any process has
    nothing to learn and leaves the weights as they were. A zero gradient would not (AdamW's weight decay and
    momentum still move them), so the gradients are removed and AdamW skips every parameter."""

    def __init__(self, trainer: "AdPOTrainer"):
        self.trainer = trainer

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        trainer = self.trainer
        kept = torch.tensor(float(trainer._kept_pairs), device=trainer.accelerator.device)
        trainer._kept_pairs = 0
        if trainer.accelerator.reduce(kept, reduction="sum").item() == 0:
            for parameter in trainer.model.parameters():
                parameter.grad = None


# ----------------------------------------------------------------------------------------------------
# Trainer
# ----------------------------------------------------------------------------------------------------
class AdPOTrainer(DPOTrainer):
    """DPOTrainer whose policy and reference differ only in the vision tower (see the module docstring).

    ``model`` is a loaded LLaVA-family model (``adpo.models.load_lvlm``) and ``processing_class`` its
    processor; the trainer freezes everything but the tower itself (or wraps the tower in LoRA).
    ``train_dataset`` is a pairs dataset (``pair_source: stored``) or rows of images and prompts
    (``online``: :func:`online_images`, or any dataset with ``image`` and ``prompt`` columns).
    """

    _tag_names = ["trl", "dpo", "adpo"]
    _name = "AdPO"

    def __init__(
        self,
        model: nn.Module,
        args: AdPOConfig,
        train_dataset: Dataset,
        processing_class: Any,
        eval_dataset: Dataset | None = None,
        callbacks: list[TrainerCallback] | None = None,
        optimizers: tuple = (None, None),
    ):
        if not isinstance(args, AdPOConfig):
            raise TypeError(f"args must be an AdPOConfig, got {type(args).__name__}")
        for name, dataset in (("train_dataset", train_dataset), ("eval_dataset", eval_dataset)):
            if dataset is None:
                continue
            if args.pair_source == "online":
                _check_online_dataset(dataset, name)
            else:
                check_pairs(dataset, name)
        self.processor = processing_class
        self.view = LlavaView(model, processing_class)  # tokenisation + the policy tower in pixel space

        peft_config = None
        reference_tower = None
        if args.tune == "full":
            self.freeze_report = freeze_for_tower_training(model, processing_class, uses=("llm",))
            # The reference = frozen LLM + projector + this frozen copy of the original tower. TRL keeps it as
            # `ref_model` (moved to the device, dropout disabled, never wrapped for DDP).
            reference_tower = export_encoder(model).requires_grad_(False).eval()
        else:
            from peft import LoraConfig

            for parameter in model.parameters():
                parameter.requires_grad_(False)
            self.freeze_report = None
            targets = _lora_targets(model, processing_class, args.lora_target_modules)
            peft_config = LoraConfig(r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
                                     target_modules=targets, bias="none")
        self._reference_view = (
            VisionTower.from_encoder(reference_tower, processing_class, self.view.tower.feature_layer,
                                     self.view.tower.select_strategy)
            if reference_tower is not None else None
        )

        super().__init__(
            model=model,
            ref_model=reference_tower,
            args=args,
            data_collator=(
                OnlineImageCollator(processing_class, args.pad_to_square) if args.pair_source == "online"
                else AdPODataCollator(self.view, args.max_length, drop_identical=args.identical_pairs == "drop")
            ),
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=processing_class,
            callbacks=callbacks,
            optimizers=optimizers,
            peft_config=peft_config,
        )
        if self.ref_model is not None:
            # TRL moved the reference tower to the device; keep our pixel-space view on the same module.
            self._reference_view.encoder = self.accelerator.unwrap_model(self.ref_model)
        # LoRA: the policy tower now sits inside the PEFT wrapper.
        self.view.tower.encoder = find_vision_tower(self.accelerator.unwrap_model(self.model))
        self._seed_step, self._micro_batch = None, 0
        self._generation_seconds = 0.0
        self._kept_pairs = 0  # pairs in the loss since the last optimizer step (identical_pairs: drop)
        self.online_pairs: OnlinePairs | None = None  # the last online micro-batch
        if args.identical_pairs == "drop" and args.aio_weight == 0:
            self.add_callback(_SkipStepsWithoutPairs(self))
        if args.tune == "full":
            logger.info(self.freeze_report.summary())

    # --- dataset columns ------------------------------------------------------------------------------
    def _set_signature_columns_if_needed(self):
        if self._signature_columns is None:
            online = self.args.pair_source == "online"
            self._signature_columns = list((SOURCE_INDEX,) + ONLINE_COLUMNS if online else REQUIRED_COLUMNS + REF_COLUMNS)

    # --- the reference --------------------------------------------------------------------------------
    @contextlib.contextmanager
    def _reference(self) -> Iterator[tuple[nn.Module, VisionTower]]:
        """The reference LVLM and its tower view: the policy with the original tower swapped in (full
        fine-tuning) or with the LoRA adapters disabled. Use under ``torch.no_grad``."""
        unwrapped = self.accelerator.unwrap_model(self.model)
        if self.args.tune == "lora":
            with use_adapter(unwrapped, adapter_name=None):
                yield unwrapped, self.view.tower
            return
        holder, attribute = _tower_slot(unwrapped)
        policy_tower = getattr(holder, attribute)
        setattr(holder, attribute, self._reference_view.encoder)
        try:
            yield unwrapped, self._reference_view
        finally:
            setattr(holder, attribute, policy_tower)

    # --- the loss -------------------------------------------------------------------------------------
    def _compute_loss(self, model, inputs, return_outputs):
        if return_outputs:
            raise ValueError("AdPOTrainer computes no logits for compute_metrics; leave compute_metrics unset")
        mode = "train" if self.model.training else "eval"
        args = self.args
        if args.pair_source == "online":
            inputs = self._online_pairs(inputs, mode)
        clean, adv = inputs["clean_pixels"], inputs["adv_pixels"]
        batch = clean.shape[0]
        pair_weights = inputs.get("pair_weights")  # None: every pair counts
        if pair_weights is not None and mode == "train":
            self._kept_pairs += int(pair_weights.sum())

        input_ids, attention_mask = inputs["input_ids"], inputs["attention_mask"]
        completion_mask = inputs["completion_mask"]
        use_aio = args.aio_weight > 0
        # Row blocks: [y_w | x], [y_l | x_adv] and, for AIO, [y_w | x_adv].
        if use_aio:
            input_ids = torch.cat([input_ids, input_ids[:batch]])
            attention_mask = torch.cat([attention_mask, attention_mask[:batch]])
            completion_mask = torch.cat([completion_mask, completion_mask[:batch]])
            pixels = torch.cat([clean, adv, adv])
        else:
            pixels = torch.cat([clean, adv])
        labels = input_ids.masked_fill(completion_mask == 0, -100)
        outputs = model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            pixel_values=self.view.tower.normalize(pixels),
            labels=labels,
            fused_lm_head=True,
            use_cache=False,
        )
        answer_mask = completion_mask[:, 1:]
        per_token_logps = outputs.log_probs[:, -answer_mask.shape[1]:]
        logps = sequence_logps(per_token_logps, answer_mask)
        chosen_logps, rejected_logps = logps[:batch], logps[batch : 2 * batch]
        lengths = answer_mask.sum(dim=1).float()
        ref_chosen_logps, ref_rejected_logps = self._reference_logps(
            inputs, pixels[: 2 * batch], input_ids[: 2 * batch], attention_mask[: 2 * batch], labels[: 2 * batch]
        )

        pio_per_pair = 0.0
        for loss_type, weight in zip(self.loss_types, self.loss_weights, strict=True):
            pio = pio_loss(
                chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps,
                beta=self.beta, loss_type=loss_type, label_smoothing=self.label_smoothing,
                chosen_lengths=lengths[:batch], rejected_lengths=lengths[batch : 2 * batch],
            )
            pio_per_pair = pio_per_pair + weight * pio.per_pair
        # identical_pairs: drop leaves identical pairs out of PIO only: they state no preference between answers
        # (kept, PIO would push the correct answer down on x_adv), while AIO, a loss on y_w at x_adv, holds for
        # every image.
        loss = _pair_mean(pio_per_pair, pair_weights)
        metrics = self._metrics[mode]
        gather = self.accelerator.gather_for_metrics
        metrics["pio"].append(gather(loss.detach()).mean().item())
        if use_aio:
            aio = aio_loss(per_token_logps[2 * batch :], answer_mask[2 * batch :])
            loss = loss + args.aio_weight * aio.loss
            metrics["aio"].append(gather(aio.loss.detach()).mean().item())
            metrics["logps/chosen_on_adv"].append(gather(logps[2 * batch :].detach()).mean().item())
        chosen_rewards, rejected_rewards = pio.chosen_rewards, pio.rejected_rewards
        metrics["rewards/chosen"].append(gather(chosen_rewards).mean().item())
        metrics["rewards/rejected"].append(gather(rejected_rewards).mean().item())
        metrics["rewards/accuracies"].append(gather((chosen_rewards > rejected_rewards).float()).mean().item())
        metrics["rewards/margins"].append(gather(chosen_rewards - rejected_rewards).mean().item())
        metrics["logps/chosen"].append(gather(chosen_logps.detach()).mean().item())
        metrics["logps/rejected"].append(gather(rejected_logps.detach()).mean().item())
        policy_features, original_features = self._clean_features(clean, with_grad=args.anchor_weight > 0)
        if args.anchor_weight > 0:
            anchor = relative_drift_loss(policy_features.float(), original_features.float())
            loss = loss + args.anchor_weight * anchor
            metrics["anchor"].append(gather(anchor.detach()).mean().item())
        drift = (policy_features.detach().float() - original_features.float()).flatten(1).norm(dim=1)
        metrics["drift/clean_embedding"].append(gather(drift).mean().item())
        return loss

    def _reference_logps(self, inputs, pixels, input_ids, attention_mask, labels):
        """π_ref log-probs of [y_w | x] and [y_l | x_adv]: stored ones when allowed, else one reference forward."""
        batch = pixels.shape[0] // 2
        stored_chosen = inputs.get("ref_chosen_logps") if self.args.use_stored_ref_logps else None
        stored_rejected = inputs.get("ref_rejected_logps") if self.args.use_stored_ref_logps else None
        rows = [r for r, stored in ((0, stored_chosen), (1, stored_rejected)) if stored is None]
        computed: dict[int, torch.Tensor] = {}
        if rows:
            index = torch.cat([torch.arange(r * batch, (r + 1) * batch, device=pixels.device) for r in rows])
            with torch.no_grad(), self._reference() as (reference_model, reference_view):
                out = reference_model(
                    input_ids=input_ids[index],
                    attention_mask=attention_mask[index],
                    pixel_values=reference_view.normalize(pixels[index]),
                    labels=labels[index],
                    fused_lm_head=True,
                    use_cache=False,
                )
            mask = (labels[index][:, 1:] != -100)
            sums = sequence_logps(out.log_probs[:, -mask.shape[1]:], mask)
            for k, r in enumerate(rows):
                computed[r] = sums[k * batch : (k + 1) * batch]
        ref_chosen = computed[0] if 0 in computed else stored_chosen.to(pixels.device)
        ref_rejected = computed[1] if 1 in computed else stored_rejected.to(pixels.device)
        return ref_chosen.float(), ref_rejected.float()

    # --- online pairs ---------------------------------------------------------------------------------
    def _online_pairs(self, inputs: dict[str, Any], mode: str) -> dict[str, torch.Tensor]:
        """This micro-batch's pairs: x_adv against the current tower, then y_w on x and y_l on x_adv from the
        current policy (trained tower, frozen LLM), tokenised as stored pairs are."""
        clean, prompts = inputs["clean_pixels"], list(inputs["prompts"])
        batch = clean.shape[0]
        # (seed, step, micro-batch, rank): reproducible, and a resumed run draws what an uninterrupted one would.
        seed = (self.args.seed, self.state.global_step, self._micro_batch, self.accelerator.process_index)
        self._micro_batch += 1
        adv = self._online_adversarial(clean, derived_seed(*seed, "attack"))
        started = time.perf_counter()
        answers = self._generate(torch.cat([clean, adv]), prompts * 2, derived_seed(*seed, "sample"))
        self._generation_seconds += time.perf_counter() - started
        chosen, rejected = answers[:batch], answers[batch:]
        self.online_pairs = OnlinePairs(prompts, chosen, rejected, clean, adv)

        pairs = {key: value.to(clean.device) for key, value in
                 encode_pairs(self.view, prompts, chosen, rejected, self.args.max_length).items()}
        pairs.update(clean_pixels=clean, adv_pixels=adv)
        distinct = distinct_pairs(chosen, rejected).to(clean.device)
        if self.args.identical_pairs == "drop":
            pairs["pair_weights"] = distinct
        identical_rate = self.accelerator.gather_for_metrics(1 - distinct).mean().item()
        self._metrics[mode]["online/identical_rate"].append(identical_rate)
        self._metrics[mode]["online/changed_rate"].append(1 - identical_rate)
        return pairs

    def _generate(self, pixels: torch.Tensor, prompts: list[str], seed: int) -> list[str]:
        """The policy's answers, in eval mode; sampling draws from ``seed`` without touching the global RNG state."""
        settings = self.args.decoding()
        devices = [] if pixels.device.type == "cpu" else [pixels.device]
        with attack_mode([self.view.model]), torch.random.fork_rng(devices=devices, device_type=pixels.device.type):
            if settings["do_sample"]:
                torch.manual_seed(seed)
            return self.view.generate(pixels, prompts, **settings)

    def _online_adversarial(self, clean: torch.Tensor, seed: int) -> torch.Tensor:
        """PGD on ‖φ_θ(x_adv) − φ_orig(x)‖² with the current tower against the frozen original one."""
        which = self.args.attack_embedding
        with torch.no_grad(), self._reference() as (_, reference_view):
            target = reference_view.embed(clean, which)
        objective = EmbeddingDistance(lambda x: self.view.tower.embed(x, which), target, modules=(self.view.tower,))
        generator = torch.Generator(device=clean.device).manual_seed(seed)
        result = pgd(objective, clean, self.args.threat_model(), self.args.attack_steps,
                     momentum=self.args.attack_momentum, generator=generator)
        return result.x_adv.detach()

    def _clean_features(self, clean: torch.Tensor, with_grad: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """φ_θ(x) (differentiable when ``with_grad``, for the anchor) and φ_orig(x) on the clean images, as the
        ``drift_embedding`` output of the tower."""
        which = self.args.drift_embedding
        with torch.set_grad_enabled(with_grad and torch.is_grad_enabled()):
            policy = self.view.tower.embed(clean, which)
        with torch.no_grad(), self._reference() as (_, reference_view):
            original = reference_view.embed(clean, which)
        return policy, original

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        # Evaluation reports the loss and the logged metrics (rewards, margins, drift); there are no logits.
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            loss = self.compute_loss(model, inputs)
        return loss.detach(), None, None

    def training_step(self, model, inputs, num_items_in_batch=None):
        if self.state.global_step != self._seed_step:
            self._seed_step, self._micro_batch = self.state.global_step, 0
        if self.args.pair_source != "online":
            return super().training_step(model, inputs, num_items_in_batch)
        self._generation_seconds = 0.0
        started = time.perf_counter()
        loss = super().training_step(model, inputs, num_items_in_batch)
        # Share of this micro-batch's attack + generation + forward + backward spent generating the answers.
        self._metrics["train"]["online/generation_share"].append(self._generation_seconds / (time.perf_counter() - started))
        return loss

    # --- saving ---------------------------------------------------------------------------------------
    def save_model(self, output_dir: str | None = None, _internal_call: bool = False):
        """What trains, not the frozen LVLM: the tower in the interchange format under ``encoder/`` (float32
        master weights, with its card) and, with LoRA, the adapter files; checkpoints add the Trainer's optimizer,
        scheduler, RNG and state. The final save adds what the config asks for (``save_lvlm``,
        ``encoder_copy_dtype``)."""
        args = self.args
        output_dir = output_dir or args.output_dir
        if args.tune == "lora" or self.is_deepspeed_enabled or self.is_fsdp_enabled:
            super().save_model(output_dir, _internal_call)  # adapter files; DeepSpeed / FSDP keep their own format
        elif args.should_save:
            os.makedirs(output_dir, exist_ok=True)
            torch.save(args, os.path.join(output_dir, "training_args.bin"))
        if args.should_save:
            encoder, card = self.trained_encoder(), self.encoder_card()
            save_encoder(encoder, Path(output_dir) / ENCODER_DIRNAME, self.processor, card)
            if not _internal_call:
                write_requested_exports(output_dir, encoder, self.processor, card, base_model=args.model_name_or_path,
                                        save_lvlm=args.save_lvlm, encoder_copy_dtype=args.encoder_copy_dtype)

    # Under full fine-tuning the tower is the only thing that changes, and checkpoints hold only it (encoder/):
    # resume and load-best put it back into the loaded LVLM. LoRA checkpoints hold adapter files, which Trainer
    # loads itself.
    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
        if self.args.tune == "lora" or self.is_deepspeed_enabled or self.is_fsdp_enabled:
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        self._load_tower(resume_from_checkpoint, model)

    def _load_best_model(self) -> None:
        if self.args.tune == "lora" or self.is_deepspeed_enabled or self.is_fsdp_enabled:
            return super()._load_best_model()
        self._load_tower(self.state.best_model_checkpoint)

    def _load_tower(self, checkpoint: str, model: nn.Module | None = None) -> None:
        put_encoder(self.accelerator.unwrap_model(model or self.model), checkpoint_encoder_dir(checkpoint))

    def trained_encoder(self) -> nn.Module:
        """A standalone copy of the trained tower (LoRA merged in), on the CPU."""
        tower = find_vision_tower(self.accelerator.unwrap_model(self.model))
        merged = copy.deepcopy(tower).cpu()
        if self.args.tune == "lora":
            from peft.tuners.tuners_utils import BaseTunerLayer

            for name, module in list(merged.named_modules()):
                if isinstance(module, BaseTunerLayer):
                    module.merge()
                    parent_name, _, child = name.rpartition(".")
                    setattr(merged.get_submodule(parent_name) if parent_name else merged, child, module.get_base_layer())
        return merged.float()

    def encoder_card(self) -> dict[str, Any]:
        args = self.args
        card = {
            "method": "AdPO (PIO + lambda*AIO), arXiv 2504.01735",
            "adpo_version": adpo.__version__,
            "base_model": args.model_name_or_path,
            "pair_source": args.pair_source,
            "dataset": args.dataset_path if args.pair_source == "stored" else args.image_source,
            "beta": args.beta,
            "aio_weight": args.aio_weight,
            "anchor_weight": args.anchor_weight,
            "loss_type": list(args.loss_type),
            "adv_source": args.adv_source,
            "tune": args.tune,
            "learning_rate": args.learning_rate,
            "weight_decay": args.weight_decay,
            "effective_batch_size": args.per_device_train_batch_size * args.gradient_accumulation_steps
            * self.accelerator.num_processes,
            "global_step": self.state.global_step,
            "epoch": self.state.epoch,
            "feature_layer": self.view.tower.feature_layer,
            "select_strategy": self.view.tower.select_strategy,
        }
        if args.adv_source == "online":
            threat = args.threat_model()
            card["attack"] = {"norm": args.attack_norm, "eps": threat.eps, "steps": args.attack_steps,
                              "step_size": threat.step_size, "embedding": args.attack_embedding}
        if args.pair_source == "online":
            card["online_pairs"] = {"prompts": args.prompt_list() or f"the source's questions ({args.question_column})",
                                    "decoding": args.decoding(), "identical_pairs": args.identical_pairs,
                                    "pad_to_square": args.pad_to_square}
        if args.tune == "lora":
            card["lora"] = {"r": args.lora_r, "alpha": args.lora_alpha, "targets": list(args.lora_target_modules)}
        if self.freeze_report is not None:
            card["frozen_unreachable"] = self.freeze_report.frozen_unreachable
        logged = [entry for entry in self.state.log_history if "pio" in entry]
        if logged:
            card["last_train_log"] = logged[-1]
        return card


def _pair_mean(values: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
    """Mean over the pairs, or over the pairs with weight 1 (0 when none is left: no gradient, no NaN)."""
    if weights is None:
        return values.mean()
    return (values * weights).sum() / weights.sum().clamp(min=1)


def _check_online_dataset(dataset: Dataset, name: str) -> None:
    if not isinstance(dataset, Dataset) or len(dataset) == 0:
        raise TypeError(f"{name} must be a non-empty datasets.Dataset of images and prompts: online_images(open_source(...), "
                        f"prompts), got {type(dataset).__name__}")
    missing = [c for c in ONLINE_COLUMNS if c not in dataset[0]]
    if missing:
        raise ValueError(f"{name} rows lack {missing}; pair_source: online needs rows with {ONLINE_COLUMNS}: use "
                         "online_images(open_source(...), prompts)")


def _tower_slot(model: nn.Module) -> tuple[nn.Module, str]:
    """(module holding the vision tower, attribute name), so the reference tower can be swapped in."""
    tower = find_vision_tower(model)
    for name, module in model.named_modules():
        if module is tower:
            parent_name, _, attribute = name.rpartition(".")
            return (model.get_submodule(parent_name) if parent_name else model), attribute
    raise ValueError(f"cannot locate the vision tower inside {type(model).__name__}")


def _lora_targets(model: nn.Module, processor: Any, names: Sequence[str]) -> list[str]:
    """Full module names of the tower's linear layers named in ``names`` that the LLM's features depend on
    (layers past the feature layer never receive a gradient, so they get no adapter)."""
    from adpo.tower import unreachable_tower_parameters

    tower = find_vision_tower(model)
    unreachable = set(unreachable_tower_parameters(VisionTower.from_lvlm(model, processor), uses=("llm",)))
    prefix = next(n for n, m in model.named_modules() if m is tower)
    targets = [
        f"{prefix}.{name}"
        for name, module in tower.named_modules()
        if isinstance(module, nn.Linear) and name.rpartition(".")[2] in names and f"{name}.weight" not in unreachable
    ]
    if not targets:
        raise ValueError(f"no tower linear layer matches lora_target_modules={list(names)}; CLIP's are {CLIP_LINEAR_NAMES}")
    return targets


# ----------------------------------------------------------------------------------------------------
# Entry point
# ----------------------------------------------------------------------------------------------------
def open_online_images(args: AdPOConfig) -> Dataset:
    """The image source of ``pair_source: online`` with its prompts; reads no model."""
    hf_columns = {"image_column": args.image_column}
    if args.question_column:
        hf_columns["question_column"] = args.question_column
    source = open_source(args.image_source, split=args.image_split, n=args.max_images, image_root=args.image_root,
                         allow_outside_root=args.allow_outside_root, **hf_columns)
    images = online_images(source, args.prompt_list(), seed=args.seed)
    if args.use_source_questions and not source[0].questions:
        raise UsageError(f"use_source_questions: {source.name} has no questions; set question_column (a HF dataset's "
                         "question column) or use_source_questions: false")
    return images


def build_trainer(args: AdPOConfig) -> AdPOTrainer:
    if not args.model_name_or_path:
        raise UsageError("set model_name_or_path in the config (or pass --model_name_or_path ...)")
    eval_dataset = None
    if args.pair_source == "online":
        if not args.image_source:
            raise UsageError("pair_source: online needs image_source (an image folder, a saved HF dataset, a COCO .json or "
                             f"a hub dataset id{plugin_data_hint()})")
        if args.dataset_path:
            logger.warning("pair_source: online generates its pairs; dataset_path %s is not read", args.dataset_path)
        train_dataset = open_online_images(args)
    else:
        if not args.dataset_path:
            raise UsageError("pair_source: stored needs dataset_path (an `adpo pairs` output directory), or set "
                             "pair_source: online with an image_source")
        train_dataset = load_pairs(args.dataset_path, args.dataset_split)
    if args.eval_fraction > 0:
        split = train_dataset.train_test_split(test_size=args.eval_fraction, seed=args.seed)
        train_dataset, eval_dataset = split["train"], split["test"]
    # fp32 master weights for the trained tower, equal to the stored ones; autocast runs the matmuls
    model, processor = load_lvlm_for_tower_training(args.model_name_or_path, args.model_dtype, args.keep_tower_dtype)
    return AdPOTrainer(model, args, train_dataset=train_dataset, eval_dataset=eval_dataset, processing_class=processor)


def main(argv: list[str] | None = None) -> int:
    (args,) = parse_config([AdPOConfig], argv, prog="adpo train adpo")
    trainer = build_trainer(args)
    trainer.train(resume_from_checkpoint=resume_checkpoint(args.resume_from_checkpoint, args.output_dir))
    trainer.save_model(args.output_dir)
    if trainer.accelerator.is_main_process:
        print(f"AdPO encoder written to {Path(args.output_dir) / ENCODER_DIRNAME}")
    return 0


if __name__ == "__main__":
    from adpo.runtime import run_as_process

    sys.exit(run_as_process(main))
