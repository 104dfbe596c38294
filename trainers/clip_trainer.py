"""Shared machinery of the trainers that train a whole CLIPModel, image and text towers, against image and text
attacks (MMCoA, ΔCLIP), on top of the encoder trainers' (:mod:`trainers.encoder_trainer`).

The trainable module is :class:`ClipPixelModel`: pixels in [0, 1] → projected image features (normalisation inside
the core's :class:`adpo.lvlm.VisionTower`) and token ids → projected text features. Both towers train, fully or
through LoRA adapters (``lora_rank`` > 0, :mod:`peft`); ``freeze_text_tower: true`` keeps the text tower and its
projection fixed. The image attack is the core's :func:`adpo.attacks.pgd`, the text attack the core's
:func:`adpo.text_attacks.text_attack` inside :class:`adpo.text_attacks.TextThreatModel`.

Every checkpoint and the final output hold ``encoder/`` (the image tower in the interchange format, as every
trainer writes it, so it grafts into an LVLM and drops into ``adpo eval``) and ``clip/`` (the whole CLIPModel with
its processor: the text tower is part of what was trained); with LoRA also ``adapter/`` (the adapters, which resume
reads back). Both exports hold the merged fp32 weights.
"""

from __future__ import annotations

import copy
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn
from transformers import CLIPModel, CLIPVisionModel

from adpo.encoder_io import save_encoder
from adpo.errors import UsageError
from adpo.io import atomic_directory
from adpo.models import clip_vision_part, load_clip, model_type_of, resolve_dtype
from adpo.plugins import plugin_model_hint
from adpo.preprocess import image_processor_of
from adpo.runtime import CLIP_DIRNAME, ENCODER_DIRNAME, STAGE_OUTPUTS, write_stage_outputs
from adpo.text_attacks import (
    TextAttackResult,
    TextObjective,
    TextThreatModel,
    check_text_threat_settings,
    text_attack,
)
from adpo.tower import VisionTower
from trainers.encoder_trainer import EncoderAdversarialTrainer, EncoderTrainingConfig

ADAPTER_DIRNAME = "adapter"


@dataclass
class ClipTrainingConfig(EncoderTrainingConfig):
    """Options of the whole-CLIP trainers on top of :class:`EncoderTrainingConfig` (whose image threat model, data
    and optimiser options apply unchanged; ``embedding`` stays 'pooled')."""

    text_max_substitutions: int = field(default=1, metadata={"help": "Text threat model: at most this many token substitutions (k)."})
    text_candidates: str = field(default="words", metadata={"help": "Substitute tokens: 'words' (alphabetic vocabulary "
                                                                   "entries) or 'vocabulary' (every non-special token)."})
    text_shortlist: int = field(default=16, metadata={"help": "Text attack: substitutions per text and round scored exactly "
                                                               "after the first-order (HotFlip) ranking."})
    text_beam_width: int = field(default=1, metadata={"help": "Text attack: texts kept per round (1 = greedy)."})
    freeze_text_tower: bool = field(default=False, metadata={"help": "Keep the text tower and its projection fixed "
                                                                      "(only the image tower trains)."})
    lora_rank: int = field(default=0, metadata={"help": "0: full fine-tune; > 0: train LoRA adapters of this rank (peft)."})
    lora_alpha: float = field(default=16.0, metadata={"help": "LoRA scaling numerator (the update is alpha/rank × BA)."})
    lora_dropout: float = field(default=0.0, metadata={"help": "Dropout on the LoRA input."})
    lora_target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "out_proj"],
        metadata={"help": "Attention projections that get adapters (in both towers unless freeze_text_tower)."},
    )

    def __post_init__(self) -> None:
        if self.embedding != "pooled":
            raise UsageError(f"embedding={self.embedding!r}: the whole-CLIP trainers compare pooled, projected image "
                             "features with text features; set embedding: pooled")
        if self.save_lvlm:
            raise UsageError("save_lvlm: true needs an LVLM; these trainers train a CLIPModel (graft its encoder/ with "
                             "adpo transfer instead)")
        if self.lora_rank < 0 or not self.lora_target_modules:
            raise UsageError(f"lora_rank={self.lora_rank} must be >= 0 (0 = full fine-tune) and lora_target_modules "
                             "must name at least one module")
        check_text_threat_settings(self)
        if self.model_name_or_path and model_type_of(self.model_name_or_path, self.trust_remote_code) not in (None, "clip"):
            raise UsageError(f"model_name_or_path={self.model_name_or_path!r} is not a CLIPModel; this trainer trains "
                             f"both towers: pass a CLIPModel directory or hub id{plugin_model_hint('clip')}")
        super().__post_init__()

    @property
    def text_threat(self) -> TextThreatModel:
        return TextThreatModel(max_substitutions=self.text_max_substitutions, candidates=self.text_candidates,
                               shortlist=self.text_shortlist, beam_width=self.text_beam_width)


class ClipPixelModel(nn.Module):
    """A CLIPModel (or its peft wrapper) seen from pixel space: ``forward(pixel_values, input_ids, attention_mask)``
    gives (projected image features, projected text features, logit scale s). This is what the Trainer wraps."""

    def __init__(self, clip: nn.Module, image_processor: Any):
        super().__init__()
        self.clip = clip
        base = self.base
        # The interchange view of the image tower: a CLIPVisionModel sharing the CLIP model's own vision module.
        view = CLIPVisionModel(base.config.vision_config).to(base.dtype)
        _share_vision_modules(view, base.vision_model)
        self.tower = VisionTower.from_encoder(view, image_processor)

    @property
    def base(self) -> CLIPModel:
        return self.clip.get_base_model() if hasattr(self.clip, "get_base_model") else self.clip

    @property
    def encoder(self) -> CLIPVisionModel:
        return self.tower.encoder

    @property
    def token_embedding(self) -> nn.Embedding:
        return self.base.text_model.embeddings.token_embedding

    def image_features(self, pixels: torch.Tensor) -> torch.Tensor:
        projection = self.base.visual_projection
        return projection(self.tower.pooled(pixels).to(projection.weight.dtype))

    def text_features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        base = self.base
        pooled = base.text_model(input_ids=input_ids, attention_mask=attention_mask).pooler_output
        return base.text_projection(pooled)

    def forward(self, pixel_values: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor):
        return self.image_features(pixel_values), self.text_features(input_ids, attention_mask), self.base.logit_scale.exp()


def _share_vision_modules(view: CLIPVisionModel, vision: nn.Module) -> None:
    """Make ``view`` run ``vision``'s own modules: its one ``vision_model`` child (transformers 4.x) or its flat
    children (5.x: embeddings, pre_layrnorm, encoder, post_layernorm)."""
    children = dict(view.named_children())
    if set(children) == {"vision_model"}:
        view.vision_model = vision
        return
    for name in children:
        setattr(view, name, getattr(vision, name))


@dataclass
class LoadedClip:
    clip: CLIPModel
    processor: Any
    source: dict


def load_clip_for_training(config: ClipTrainingConfig, from_scratch: bool = False) -> LoadedClip:
    """The CLIPModel ``config.model_name_or_path`` names (fp32 unless ``model_dtype``) and its processor; with
    ``from_scratch`` its architecture only, freshly initialised from ``config.seed``."""
    from transformers import AutoProcessor, CLIPConfig

    name = config.model_name_or_path
    dtype = resolve_dtype(config.model_dtype) or torch.float32
    if from_scratch and Path(name).is_dir() and not any(Path(name).glob("*.safetensors")):
        # a directory with a config and a processor only: nothing to load
        clip_config, processor = CLIPConfig.from_pretrained(name), AutoProcessor.from_pretrained(name)
    else:
        clip, processor = load_clip(name)
        clip_config = clip.config
    if from_scratch:
        torch.manual_seed(config.seed)
        clip = CLIPModel(clip_config)
    clip = clip.to(dtype)
    source = {"base_model": name, "base_kind": "clip", "from_scratch": from_scratch, "feature_layer": -2,
              "select_strategy": "default"}
    return LoadedClip(clip, processor, source)


def build_clip_pixel_model(config: ClipTrainingConfig, loaded: LoadedClip, train_logit_scale: bool) -> ClipPixelModel:
    """The trainable module: full fine-tune or LoRA adapters, the text tower frozen when the config says so."""
    clip = loaded.clip
    clip.logit_scale.requires_grad_(train_logit_scale)
    if config.freeze_text_tower:
        clip.text_model.requires_grad_(False)
        clip.text_projection.requires_grad_(False)
    if config.lora_rank:
        from peft import LoraConfig, get_peft_model

        towers = "vision_model" if config.freeze_text_tower else "(vision_model|text_model)"
        pattern = rf".*{towers}\..*\.({'|'.join(config.lora_target_modules)})"
        lora = LoraConfig(r=config.lora_rank, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
                          target_modules=pattern)
        clip = get_peft_model(clip, lora)
        if train_logit_scale:
            clip.get_base_model().logit_scale.requires_grad_(True)
    return ClipPixelModel(clip, image_processor_of(loaded.processor))


class ClipAdversarialTrainer(EncoderAdversarialTrainer):
    """An :class:`EncoderAdversarialTrainer` over a whole CLIPModel: adds the text attack, and saves and resumes both
    towers (``clip/``, ``adapter/`` with LoRA) besides the image tower's ``encoder/``."""

    def __init__(self, model: ClipPixelModel, args: ClipTrainingConfig, processor: Any = None,
                 protected_words: Sequence[str] = (), **kwargs: Any):
        if processor is None:
            raise ValueError("processor is required: its tokenizer encodes the texts and it is saved beside clip/")
        super().__init__(model=model, args=args, image_processor=image_processor_of(processor), **kwargs)
        self.processor = processor
        self.tokenizer_for_text = processor.tokenizer
        self.text_threat = args.text_threat
        # words the text attack neither edits nor puts in (class names): changing them changes the label
        self.protected_words = list(protected_words)
        self.allowed_tokens = self.text_threat.allowed_tokens(self.tokenizer_for_text, self.protected_words)

    # --- the text attack ---------------------------------------------------------------------------
    def attack_text(self, objective: TextObjective, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> TextAttackResult:
        """The inner maximisation over texts, run to its last round (no early stop), as the image attack is."""
        editable = self.text_threat.editable_positions(input_ids, attention_mask, self.tokenizer_for_text,
                                                       self.protected_words)
        return text_attack(objective, input_ids, attention_mask, self.text_threat, self.allowed_tokens, editable,
                           early_stop=False)

    # --- saving and resuming -----------------------------------------------------------------------
    def card(self) -> dict:
        args = self.args
        return {
            **super().card(),
            "towers_trained": "image" if args.freeze_text_tower else "image and text",
            "adaptation": f"lora rank {args.lora_rank}" if args.lora_rank else "full fine-tune",
            "text_threat_model": self.text_threat.describe(),
            "text_attack": {"name": "hotflip", "max_substitutions": args.text_max_substitutions,
                            "candidates": args.text_candidates, "shortlist": args.text_shortlist,
                            "beam_width": args.text_beam_width, "protected_words": self.protected_words},
        }

    def exported_clip(self) -> CLIPModel:
        """The trained CLIPModel with LoRA adapters merged, float32 (the live model itself when nothing needs changing)."""
        module = self.accelerator.unwrap_model(self.model)
        clip = module.clip
        if hasattr(clip, "merge_and_unload"):
            clip = copy.deepcopy(clip).merge_and_unload()
        if clip.dtype != torch.float32:
            clip = copy.deepcopy(clip).float()
        return clip

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """The final save also declares ``clip`` (and ``adapter`` with LoRA) beside what the encoder trainers declare."""
        super().save_model(output_dir, _internal_call)
        if not _internal_call and self.args.should_save:
            out = Path(output_dir if output_dir is not None else self.args.output_dir)
            declared = json.loads((out / STAGE_OUTPUTS).read_text())
            extra = {"clip": out / CLIP_DIRNAME, **({"adapter": out / ADAPTER_DIRNAME} if self.args.lora_rank else {})}
            write_stage_outputs(out, **{name: out / path for name, path in declared.items()}, **extra)

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if not self.args.should_save:
            return
        if state_dict is not None and (self.is_deepspeed_enabled or self.is_fsdp_enabled):
            raise ValueError("the whole-CLIP trainers save unsharded models only; run them with DDP or one process")
        out = Path(output_dir)
        clip = self.exported_clip()
        save_encoder(clip_vision_part(clip), out / ENCODER_DIRNAME, self.image_processor, self.card())
        with atomic_directory(out / CLIP_DIRNAME) as staging:
            clip.save_pretrained(staging, safe_serialization=True)
            self.processor.save_pretrained(staging)
        module = self.accelerator.unwrap_model(self.model)
        if self.args.lora_rank:
            with atomic_directory(out / ADAPTER_DIRNAME) as staging:
                module.clip.save_pretrained(staging)
        torch.save(self.args, os.path.join(output_dir, "training_args.bin"))

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
        module = self.accelerator.unwrap_model(model if model is not None else self.model)
        checkpoint = Path(resume_from_checkpoint)
        if self.args.lora_rank:
            from peft import set_peft_model_state_dict
            from safetensors.torch import load_file

            weights = checkpoint / ADAPTER_DIRNAME / "adapter_model.safetensors"
            if not weights.is_file():
                raise FileNotFoundError(f"{checkpoint} holds no {ADAPTER_DIRNAME}/adapter_model.safetensors to resume from")
            result = set_peft_model_state_dict(module.clip, load_file(str(weights)))
            if getattr(result, "unexpected_keys", None):
                raise ValueError(f"{weights} does not match this LoRA config: unexpected {result.unexpected_keys[:3]}")
            return
        if not (checkpoint / CLIP_DIRNAME / "config.json").is_file():
            raise FileNotFoundError(f"{checkpoint} holds no {CLIP_DIRNAME}/config.json to resume from")
        saved = CLIPModel.from_pretrained(checkpoint / CLIP_DIRNAME, dtype=module.base.dtype)
        module.base.load_state_dict(saved.state_dict(), strict=True)

    def _load_best_model(self) -> None:
        self._load_from_checkpoint(self.state.best_model_checkpoint)
