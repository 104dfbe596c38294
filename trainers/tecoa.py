"""TeCoA (Mao et al., ICLR 2023): supervised text-guided contrastive adversarial fine-tuning.

    min_θ  E_(x,y)  max_{x' ∈ B(x, ε)}  CE( s · cos(W φ_θ(x'), t_c) over classes c,  y )

t_c is the frozen CLIP text embedding of ``class_prompt_template.format(class_c)`` ("This is a photo of
a {}"), W the CLIP model's frozen visual projection, s the logit scale (inverse temperature; CLIP's
learned one unless set). The inner PGD maximises the same cross-entropy. Needs labelled images (an
image folder with one sub-folder per class, a HF dataset with a label column, or the world) and a
CLIP text tower (any HF ``CLIPModel``, or a plugin's CLIP model such as the bundled world's).

    accelerate launch -m trainers.tecoa --config configs/tecoa/world.yaml
    adpo train tecoa --config configs/tecoa/world.yaml
"""

from __future__ import annotations

import copy
import logging
import sys
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from transformers import CLIPModel

from adpo.errors import UsageError, parse_config
from adpo.losses.encoder import tecoa_loss
from adpo.models import LoadedEncoder, load_clip
from adpo.objectives import ZeroShotCrossEntropy
from adpo.plugins import plugin_model_hint
from adpo.zeroshot import zero_shot_classifier
from trainers.encoder_trainer import (
    EncoderAdversarialTrainer,
    EncoderTrainingConfig,
    TowerEmbedding,
    build_tower_embedding,
    load_encoder_for_training,
    load_training_images,
    train_and_save,
)

logger = logging.getLogger(__name__)

TECOA_PROMPT_TEMPLATE = "This is a photo of a {}"


@dataclass
class TecoaConfig(EncoderTrainingConfig):
    """TeCoA options on top of :class:`EncoderTrainingConfig` (``embedding`` must stay 'pooled')."""

    needs_labels = True

    text_model_name_or_path: str | None = field(
        default=None,
        metadata={"help": f"CLIPModel whose text tower embeds the class prompts (dir or hub id{plugin_model_hint('clip')}); "
                          "default: model_name_or_path when that is a CLIPModel."},
    )
    class_prompt_template: str = field(default=TECOA_PROMPT_TEMPLATE, metadata={"help": "Prompt per class; {} = name."})
    class_names: list[str] | None = field(
        default=None, metadata={"help": "Class names in label order (default: the dataset's)."}
    )
    logit_scale: float | None = field(
        default=None, metadata={"help": "Inverse temperature s (default: the CLIP model's learned scale, 100 for OpenAI)."}
    )

    def __post_init__(self) -> None:
        if self.embedding != "pooled":
            raise UsageError(f"embedding={self.embedding!r}: TeCoA compares the pooled, projected image embedding with "
                             "text embeddings; set embedding: pooled")
        super().__post_init__()


class TecoaTrainer(EncoderAdversarialTrainer):
    method = "tecoa"
    needs_labels = True
    objective_description = (
        "min_theta E_(x,y) max_{x' in B(x,eps)} CE(s * cos(W phi_theta(x'), t_c), y); "
        "t_c = frozen text embedding of the class prompt; the same CE drives PGD"
    )

    def __init__(
        self,
        model: TowerEmbedding,
        args: TecoaConfig,
        class_embeddings: torch.Tensor,
        logit_scale: float,
        class_names: list[str] | None = None,
        **kwargs: Any,
    ):
        if model.head is None:
            raise ValueError("TeCoA needs the CLIP visual projection as the model's head (TowerEmbedding(head=...))")
        super().__init__(model=model, args=args, **kwargs)
        self.class_embeddings = F.normalize(class_embeddings.detach().float(), dim=-1)
        self.logit_scale = float(logit_scale)
        self.class_names = class_names

    def prepare_batch(self, module, inputs):
        return {"class_embeddings": self.class_embeddings.to(inputs["pixel_values"].device)}

    def attack_objective(self, module, inputs, context):
        return ZeroShotCrossEntropy(module, context["class_embeddings"], inputs["labels"], self.logit_scale, modules=(module,))

    def adversarial_loss(self, embedding, inputs, context):
        return tecoa_loss(embedding, context["class_embeddings"], inputs["labels"], self.logit_scale)

    def card(self) -> dict:
        return {
            **super().card(),
            "text_model": self.args.text_model_name_or_path or self.args.model_name_or_path,
            "class_prompt_template": self.args.class_prompt_template,
            "num_classes": int(self.class_embeddings.shape[0]),
            "logit_scale": self.logit_scale,
        }


def load_text_tower(config: TecoaConfig, loaded: LoadedEncoder) -> tuple[CLIPModel, Any]:
    """The CLIPModel (and processor) whose text tower and visual projection TeCoA uses."""
    name = config.text_model_name_or_path
    if name is None:
        if loaded.clip_model is None:
            raise ValueError(
                f"{config.model_name_or_path!r} has no text tower; TeCoA needs one: set text_model_name_or_path to the "
                f"CLIPModel the encoder comes from (e.g. openai/clip-vit-large-patch14-336 for LLaVA-1.5{plugin_model_hint('clip')})"
            )
        return loaded.clip_model, loaded.clip_processor
    clip, processor = load_clip(name)
    return clip.eval(), processor


def _warn_if_different_vision_weights(clip: CLIPModel, loaded: LoadedEncoder) -> None:
    # The text embeddings are aligned with the CLIP model's own image tower; training another encoder
    # against them starts far from zero-shot-aligned and mostly measures the mismatch.
    ours = loaded.encoder.state_dict()
    theirs = clip.vision_model.state_dict()
    key = "embeddings.patch_embedding.weight"
    mine = ours.get("vision_model." + key, ours.get(key))
    if mine is None or theirs.get(key) is None or not _same_weights(mine, theirs[key]):
        logger.warning("the text tower's CLIP image weights differ from the encoder being trained; zero-shot "
                       "alignment starts poor (use the CLIPModel the encoder comes from as text_model_name_or_path)")


def _same_weights(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal in a common dtype: as they are, or both rounded to fp16 or to bf16 (an LVLM stored in half precision
    holds the CLIP model's fp32 weights rounded, whatever dtype either was loaded in)."""
    common = (torch.float32, torch.float16, torch.bfloat16)
    return a.shape == b.shape and any(torch.equal(a.to(dtype), b.to(dtype)) for dtype in common)


def build_trainer(config: TecoaConfig, train_dataset=None) -> TecoaTrainer:
    loaded = load_encoder_for_training(config)
    clip, clip_processor = load_text_tower(config, loaded)
    if clip.visual_projection.in_features != loaded.encoder.config.hidden_size:
        raise ValueError(
            f"the text model's visual projection expects width {clip.visual_projection.in_features} but the encoder's "
            f"pooled embedding has width {loaded.encoder.config.hidden_size}; use the CLIPModel the encoder comes from"
        )
    _warn_if_different_vision_weights(clip, loaded)
    if train_dataset is None:
        train_dataset = load_training_images(config, need_labels=True)
    class_names = config.class_names or getattr(train_dataset, "class_names", None)
    if not class_names:
        raise ValueError("no class names: set class_names in the config (label order) or use a labelled dataset")
    class_embeddings = zero_shot_classifier(clip, clip_processor, class_names, config.class_prompt_template)
    logit_scale = config.logit_scale if config.logit_scale is not None else float(clip.logit_scale.detach().exp())
    head = copy.deepcopy(clip.visual_projection).to(loaded.encoder.dtype)
    model = build_tower_embedding(loaded, "pooled", head=head)
    del clip
    return TecoaTrainer(model, config, class_embeddings=class_embeddings, logit_scale=logit_scale,
                        class_names=list(class_names), train_dataset=train_dataset,
                        image_processor=loaded.image_processor, source=loaded.record)


def main(argv: list[str] | None = None) -> int:
    (config,) = parse_config([TecoaConfig], argv, prog="adpo train tecoa")
    out = train_and_save(build_trainer(config))
    print(f"TeCoA encoder written to {out}")
    return 0


if __name__ == "__main__":
    from adpo.runtime import run_as_process

    sys.exit(run_as_process(main))
