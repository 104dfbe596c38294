"""AdPO: adversarial robustness of an LVLM's CLIP vision tower by preference optimisation.

A subclass of TRL's :class:`~trl.DPOTrainer` that trains **only the vision tower** of a LLaVA-family
model on a pairs dataset (``adpo pairs``: columns ``image``, ``adv_image``, ``prompt``, ``chosen``,
``rejected`` and optional ``ref_chosen_logps`` / ``ref_rejected_logps``) with

    loss = PIO + λ·AIO                                (adpo.losses.preference)

* PIO: DPO between π(y_w | x, q) on the *clean* image and π(y_l | x_adv, q) on the *adversarial* one,
  in any of TRL's loss shapes that make sense here (``loss_type``; sigmoid by default).
* AIO: −Σ_t sg(p_t)·log p_t of y_w on x_adv (λ = ``aio_weight``).

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
  bit-identical. Every ``save_model`` (final and per checkpoint) also writes the merged encoder in the
  interchange format (``<dir>/encoder``: a ``CLIPVisionModel`` directory + card) beside the usual
  Trainer files, so checkpoints resume with ``resume_from_checkpoint`` and drop into ``adpo transfer``.

Run: ``adpo train adpo --config configs/adpo/world.yaml`` or
``accelerate launch trainers/adpo.py --config configs/adpo/llava15_paper.yaml``.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __name__ == "__main__":
    # Run as a script, this file's folder heads sys.path and "adpo" would name this file rather than
    # the adpo package: drop the folder and put the repository root first.
    _here = Path(__file__).resolve().parent
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _here]
    sys.path.insert(0, str(_here.parent))

import contextlib
import copy
import logging
import os
import zlib
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

import torch
from datasets import Dataset, DatasetDict, load_dataset, load_from_disk
from torch import nn
from transformers import TrainerCallback
from transformers.trainer_utils import get_last_checkpoint
from trl import DPOConfig, DPOTrainer, TrlParser
from trl.trainer.utils import use_adapter

import adpo
from adpo.attacks import pgd
from adpo.losses.preference import PIO_LOSS_TYPES, aio_loss, pio_loss, sequence_logps
from adpo.lvlm import (
    LlavaView,
    VisionTower,
    export_encoder,
    find_vision_tower,
    freeze_for_tower_training,
    load_lvlm,
    put_encoder,
    resolve_dtype,
    save_encoder,
)
from adpo.objectives import EmbeddingDistance
from adpo.preprocess import to_pixels
from adpo.runtime import checkpoint_encoder_dir, fit_precision_to_device, write_requested_exports
from adpo.threat import ThreatModel, parse_eps

logger = logging.getLogger(__name__)

REQUIRED_COLUMNS = ("image", "adv_image", "prompt", "chosen", "rejected")
REF_COLUMNS = ("ref_chosen_logps", "ref_rejected_logps")
ADV_SOURCES = ("stored", "online")
TUNE_MODES = ("full", "lora")
EMBEDDINGS = ("pooled", "llm")
ENCODER_DIRNAME = "encoder"
# Linear layers of a CLIP encoder block that LoRA adapts.
CLIP_LINEAR_NAMES = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")


# ----------------------------------------------------------------------------------------------------
# Configuration
# ----------------------------------------------------------------------------------------------------
@dataclass
class AdPOConfig(DPOConfig):
    """TRL's DPOConfig plus what AdPO needs. Defaults differing from DPOConfig follow the paper
    (AdamW lr 1e-5, weight decay 1e-4, 2 epochs); ``beta`` keeps DPO's 0.1."""

    # --- what to train on ---------------------------------------------------------------------------
    model_name_or_path: str | None = field(
        default=None,
        metadata={"help": "LLaVA-family model: hub id, local directory or world:small / world:large."},
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
    dataset_path: str | None = field(
        default=None,
        metadata={"help": "Pairs dataset: an `adpo pairs` output directory (its dataset/ folder), a "
                  "save_to_disk directory, or a hub id."},
    )
    dataset_split: str = field(default="train", metadata={"help": "Split to train on when the dataset has several."})
    eval_fraction: float = field(
        default=0.0, metadata={"help": "Share of the pairs held out as eval set (0 = none); split with `seed`."}
    )

    # --- the AdPO objective -------------------------------------------------------------------------
    aio_weight: float = field(default=1.0, metadata={"help": "λ: weight of AIO in PIO + λ·AIO (0 disables AIO)."})
    use_stored_ref_logps: bool = field(
        default=True,
        metadata={"help": "Use the dataset's ref_chosen_logps / ref_rejected_logps when present instead of running "
                  "the reference forward (stored rejected log-probs are ignored with adv_source=online)."},
    )

    # --- adversarial images -------------------------------------------------------------------------
    adv_source: str = field(
        default="stored",
        metadata={"help": "'stored': the dataset's adv_image; 'online': re-attack the clean image every step by PGD "
                  "on the FARE objective ||φ_θ(x_adv) − φ_orig(x)||² against the frozen original encoder."},
    )
    attack_norm: str = field(default="linf", metadata={"help": "Online attack norm: linf or l2."})
    attack_eps: str = field(default="2/255", metadata={"help": "Online attack ε: '2/255', 0.0078, 2 (255ths) or 'world' (the bundled world's working ε)."})
    attack_steps: int = field(default=10, metadata={"help": "Online PGD steps."})
    attack_step_size: float | None = field(default=None, metadata={"help": "Online PGD step size (default ε/4)."})
    attack_random_start: bool = field(default=True, metadata={"help": "Online PGD starts uniformly in the ball."})
    attack_embedding: str = field(
        default="pooled", metadata={"help": "Tower output the online FARE objective compares: 'pooled' or 'llm'."}
    )
    drift_embedding: str = field(
        default="llm",
        metadata={"help": "Tower output the logged clean-embedding drift ||φ_θ(x) − φ_orig(x)|| compares: 'llm' "
                  "(the features the LLM consumes) or 'pooled'."},
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
        fit_precision_to_device(self, ("model_dtype",))
        resolve_dtype(self.encoder_copy_dtype)  # an unknown dtype fails here, not after training
        super().__post_init__()
        problems = []
        if self.adv_source not in ADV_SOURCES:
            problems.append(f"adv_source={self.adv_source!r}; use one of {ADV_SOURCES}")
        if self.tune not in TUNE_MODES:
            problems.append(f"tune={self.tune!r}; use one of {TUNE_MODES}")
        for key in ("attack_embedding", "drift_embedding"):
            if getattr(self, key) not in EMBEDDINGS:
                problems.append(f"{key}={getattr(self, key)!r}; use one of {EMBEDDINGS}")
        unsupported = [t for t in self.loss_type if t not in PIO_LOSS_TYPES]
        if unsupported:
            problems.append(f"loss_type {unsupported} has no PIO form; use one or more of {PIO_LOSS_TYPES}")
        if self.aio_weight < 0:
            problems.append(f"aio_weight must be >= 0, got {self.aio_weight}")
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
            raise ValueError("invalid AdPO config: " + "; ".join(problems))
        self.attack_eps = str(self.attack_eps)

    def threat(self) -> ThreatModel:
        return ThreatModel(norm=self.attack_norm, eps=parse_eps(self.attack_eps), step_size=self.attack_step_size,
                           random_start=self.attack_random_start)


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
    every example has them.
    """

    view: LlavaView
    max_length: int | None = None

    def __call__(self, examples: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        missing = [c for c in REQUIRED_COLUMNS if c not in examples[0]]
        if missing:
            raise KeyError(f"pairs example lacks columns {missing}; an AdPO dataset needs {REQUIRED_COLUMNS} "
                           "(make one with `adpo pairs`)")
        questions = [e["prompt"] for e in examples]
        answers = [e["chosen"] for e in examples] + [e["rejected"] for e in examples]
        encoded = self.view.encode(questions + questions, answers)
        pad_token_id = self.view.tokenizer.pad_token_id or 0
        input_ids, attention_mask, labels = _truncate_left_padded(
            encoded.input_ids, encoded.attention_mask, encoded.labels, self.max_length, pad_token_id
        )
        processor = self.view.processor
        clean = to_pixels([e["image"] for e in examples], processor)
        adv = to_pixels([e["adv_image"] for e in examples], processor)
        if clean.shape != adv.shape:
            raise ValueError(f"clean images {tuple(clean.shape)} and adversarial images {tuple(adv.shape)} differ in "
                             "size; the pairs dataset must store both at the model's resolution")
        batch = {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "completion_mask": (labels != -100).long(),
            "clean_pixels": clean,
            "adv_pixels": adv,
        }
        for column in REF_COLUMNS:
            if all(e.get(column) is not None for e in examples):
                batch[column] = torch.tensor([float(e[column]) for e in examples], dtype=torch.float32)
        return batch


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
# Trainer
# ----------------------------------------------------------------------------------------------------
class AdPOTrainer(DPOTrainer):
    """DPOTrainer whose policy and reference differ only in the vision tower (see the module docstring).

    ``model`` is a loaded LLaVA-family model (``adpo.lvlm.load_lvlm``) and ``processing_class`` its
    processor; the trainer freezes everything but the tower itself (or wraps the tower in LoRA).
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
        _check_pairs_dataset(train_dataset, "train_dataset")
        if eval_dataset is not None:
            _check_pairs_dataset(eval_dataset, "eval_dataset")
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
            data_collator=AdPODataCollator(self.view, max_length=args.max_length),
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
        self._attack_calls = 0
        if args.tune == "full":
            logger.info(self.freeze_report.summary())

    # --- dataset columns ------------------------------------------------------------------------------
    def _set_signature_columns_if_needed(self):
        if self._signature_columns is None:
            self._signature_columns = list(REQUIRED_COLUMNS + REF_COLUMNS)

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
        clean, adv = inputs["clean_pixels"], inputs["adv_pixels"]
        batch = clean.shape[0]
        online = args.adv_source == "online"
        if online:
            adv = self._online_adversarial(clean)

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
            inputs, pixels[: 2 * batch], input_ids[: 2 * batch], attention_mask[: 2 * batch], labels[: 2 * batch], online
        )

        pio_total = 0.0
        for loss_type, weight in zip(self.loss_types, self.loss_weights, strict=True):
            pio = pio_loss(
                chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps,
                beta=self.beta, loss_type=loss_type, label_smoothing=self.label_smoothing,
                chosen_lengths=lengths[:batch], rejected_lengths=lengths[batch : 2 * batch],
            )
            pio_total = pio_total + weight * pio.loss
        loss = pio_total
        metrics = self._metrics[mode]
        gather = self.accelerator.gather_for_metrics
        if use_aio:
            aio = aio_loss(per_token_logps[2 * batch :], answer_mask[2 * batch :])
            loss = loss + args.aio_weight * aio.loss
            metrics["aio"].append(gather(aio.loss.detach()).mean().item())
            metrics["logps/chosen_on_adv"].append(gather(logps[2 * batch :].detach()).mean().item())
        metrics["pio"].append(gather(pio_total.detach()).mean().item())
        chosen_rewards, rejected_rewards = pio.chosen_rewards, pio.rejected_rewards
        metrics["rewards/chosen"].append(gather(chosen_rewards).mean().item())
        metrics["rewards/rejected"].append(gather(rejected_rewards).mean().item())
        metrics["rewards/accuracies"].append(gather((chosen_rewards > rejected_rewards).float()).mean().item())
        metrics["rewards/margins"].append(gather(chosen_rewards - rejected_rewards).mean().item())
        metrics["logps/chosen"].append(gather(chosen_logps.detach()).mean().item())
        metrics["logps/rejected"].append(gather(rejected_logps.detach()).mean().item())
        metrics["drift/clean_embedding"].append(gather(self._clean_drift(clean)).mean().item())
        return loss

    def _reference_logps(self, inputs, pixels, input_ids, attention_mask, labels, online: bool):
        """π_ref log-probs of [y_w | x] and [y_l | x_adv]: stored ones when allowed, else one reference forward."""
        batch = pixels.shape[0] // 2
        stored_chosen = inputs.get("ref_chosen_logps") if self.args.use_stored_ref_logps else None
        # A stored rejected log-prob was scored on the stored x_adv, not on this step's online one.
        stored_rejected = (
            inputs.get("ref_rejected_logps") if self.args.use_stored_ref_logps and not online else None
        )
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

    def _online_adversarial(self, clean: torch.Tensor) -> torch.Tensor:
        """PGD on ‖φ_θ(x_adv) − φ_orig(x)‖² with the current tower against the frozen original one."""
        which = self.args.attack_embedding
        with torch.no_grad(), self._reference() as (_, reference_view):
            target = reference_view.embed(clean, which)
        objective = EmbeddingDistance(lambda x: self.view.tower.embed(x, which), target, modules=(self.view.tower,))
        # Seeded by (seed, step, micro-batch, rank): reproducible, and a resumed run draws what an uninterrupted one would.
        seed = zlib.crc32(f"{self.args.seed}:{self.state.global_step}:{self._attack_calls}:{self.accelerator.process_index}".encode())
        self._attack_calls += 1
        generator = torch.Generator(device=clean.device).manual_seed(seed)
        result = pgd(objective, clean, self.args.threat(), self.args.attack_steps, generator=generator)
        return result.x_adv.detach()

    def _clean_drift(self, clean: torch.Tensor) -> torch.Tensor:
        """Per-sample ‖φ_θ(x) − φ_orig(x)‖₂ on the clean images (``drift_embedding`` output of the tower)."""
        which = self.args.drift_embedding
        with torch.no_grad():
            policy = self.view.tower.embed(clean, which).float()
            with self._reference() as (_, reference_view):
                original = reference_view.embed(clean, which).float()
        return (policy - original).flatten(1).norm(dim=1)

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        # Evaluation reports the loss and the logged metrics (rewards, margins, drift); there are no logits.
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            loss = self.compute_loss(model, inputs)
        return loss.detach(), None, None

    def training_step(self, model, inputs, num_items_in_batch=None):
        if self.state.global_step != getattr(self, "_attack_step", None):
            self._attack_step, self._attack_calls = self.state.global_step, 0
        return super().training_step(model, inputs, num_items_in_batch)

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
            "dataset": args.dataset_path,
            "beta": args.beta,
            "aio_weight": args.aio_weight,
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
            card["attack"] = {"norm": args.attack_norm, "eps": parse_eps(args.attack_eps), "steps": args.attack_steps,
                              "step_size": args.attack_step_size, "embedding": args.attack_embedding}
        if args.tune == "lora":
            card["lora"] = {"r": args.lora_r, "alpha": args.lora_alpha, "targets": list(args.lora_target_modules)}
        if self.freeze_report is not None:
            card["frozen_unreachable"] = self.freeze_report.frozen_unreachable
        logged = [entry for entry in self.state.log_history if "pio" in entry]
        if logged:
            card["last_train_log"] = logged[-1]
        return card


def _check_pairs_dataset(dataset: Dataset, name: str) -> None:
    columns = getattr(dataset, "column_names", None)
    if columns is None:
        raise TypeError(f"{name} must be a datasets.Dataset of pairs, got {type(dataset).__name__}")
    missing = [c for c in REQUIRED_COLUMNS if c not in columns]
    if missing:
        raise ValueError(f"{name} lacks columns {missing} (has {columns}); an AdPO dataset needs {REQUIRED_COLUMNS}: "
                         "make one with `adpo pairs --config configs/pairs/<name>.yaml`")


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
    from adpo.lvlm import unreachable_tower_parameters

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
def load_pairs(path: str, split: str = "train") -> Dataset:
    """A pairs dataset from an `adpo pairs` output dir, a save_to_disk dir or a hub id."""
    location = Path(path)
    if location.exists():
        if (location / "dataset").is_dir():
            location = location / "dataset"
        dataset = load_from_disk(str(location))
        if isinstance(dataset, DatasetDict):
            if split not in dataset:
                raise ValueError(f"{path} has splits {list(dataset)}, not {split!r}; set dataset_split")
            dataset = dataset[split]
        return dataset
    return load_dataset(path, split=split)


def build_trainer(args: AdPOConfig) -> AdPOTrainer:
    if not args.model_name_or_path or not args.dataset_path:
        raise ValueError("set model_name_or_path and dataset_path in the config (or pass --model_name_or_path ... "
                         "--dataset_path ...)")
    model, processor = load_lvlm(args.model_name_or_path, dtype=args.model_dtype)
    if not args.keep_tower_dtype:
        find_vision_tower(model).float()  # fp32 master weights for the trained tower; autocast runs the matmuls
    pairs = load_pairs(args.dataset_path, args.dataset_split)
    eval_dataset = None
    if args.eval_fraction > 0:
        split = pairs.train_test_split(test_size=args.eval_fraction, seed=args.seed)
        pairs, eval_dataset = split["train"], split["test"]
    return AdPOTrainer(model, args, train_dataset=pairs, eval_dataset=eval_dataset, processing_class=processor)


def main(argv: list[str] | None = None) -> int:
    (args,) = TrlParser([AdPOConfig]).parse_args_and_config(argv)
    trainer = build_trainer(args)
    resume = args.resume_from_checkpoint
    if resume in ("auto", "last", "true", "True"):
        resume = get_last_checkpoint(args.output_dir) if os.path.isdir(args.output_dir) else None
    trainer.train(resume_from_checkpoint=resume)
    trainer.save_model(args.output_dir)
    if trainer.accelerator.is_main_process:
        print(f"AdPO encoder written to {Path(args.output_dir) / ENCODER_DIRNAME}")
    return 0


if __name__ == "__main__":
    from adpo.runtime import run_as_process

    sys.exit(run_as_process(main))
