"""LVLMs around any vision backbone (Robust-LLaVA, arXiv 2502.01576): a llava-hf model whose tower is a given
Hugging Face vision model (ViT, SigLIP, DeiT, DINOv2, CLIP: any backbone whose hidden states are token sequences)
and whose projector is fresh, to be aligned by ``adpo train instruct``.

:func:`llava_around_backbone` keeps the language model, tokenizer and chat template of an existing LLaVA-family model
and swaps in the backbone; :func:`load_backbone` reads a backbone (a ``*ForImageClassification`` checkpoint gives its
base model). ConvNeXt-style backbones, whose hidden states are feature maps, are refused: LLaVA's projector reads
token sequences.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers import AutoImageProcessor, AutoModel, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor

from adpo.errors import UsageError
from adpo.tower import find_vision_tower, prefix_token_count
from adpo.preprocess import image_processor_of


def load_backbone(name_or_path: str, dtype: torch.dtype | None = None) -> tuple[nn.Module, Any]:
    """A vision backbone (its base model, without a classification head) and its image processor.

    Weights the checkpoint lacks (a classifier's ViT has no pooler; LLaVA never reads it) are initialised from a
    fixed seed, so every load, the export's included, gives the same model."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = AutoModel.from_pretrained(name_or_path, dtype=dtype)
    if getattr(model.config, "vision_config", None) is not None:
        model = _vision_part(model)
    return model, AutoImageProcessor.from_pretrained(name_or_path)


def _vision_part(model: nn.Module) -> nn.Module:
    """The vision half of a dual encoder (CLIPModel, SiglipModel), as its ``*VisionModel`` class."""
    vision = AutoModel.from_config(model.config.vision_config)
    vision.vision_model.load_state_dict(model.vision_model.state_dict())
    return vision.to(next(model.parameters()).dtype)


def check_sequence_backbone(backbone: nn.Module) -> int:
    """The number of tokens the backbone's hidden states hold for one image; refuses feature-map backbones."""
    config = backbone.config
    size = getattr(config, "image_size", None)
    if not isinstance(size, int) or getattr(config, "patch_size", None) is None:
        raise UsageError(f"{type(backbone).__name__} has no square image_size and patch_size in its config; adpo builds "
                         "LLaVA models around token-sequence backbones (ViT, SigLIP, DeiT, DINOv2, CLIP)")
    probe = torch.zeros(1, getattr(config, "num_channels", 3), size, size, dtype=next(backbone.parameters()).dtype)
    with torch.no_grad():
        hidden = backbone(probe, output_hidden_states=True, return_dict=True).hidden_states[-1]
    if hidden.dim() != 3:
        raise UsageError(f"{type(backbone).__name__}'s hidden states are feature maps {tuple(hidden.shape)}, not token "
                         "sequences; LLaVA's projector needs a ViT-style backbone (ViT, SigLIP, DeiT, DINOv2, CLIP)")
    return hidden.shape[1]


def llava_around_backbone(
    backbone: nn.Module,
    image_processor: Any,
    lvlm: LlavaForConditionalGeneration,
    processor: Any,
    feature_layer: int = -2,
    select_strategy: str | None = None,
    seed: int = 0,
) -> tuple[LlavaForConditionalGeneration, LlavaProcessor]:
    """A LLaVA with ``lvlm``'s language model (weights shared, not copied), ``backbone`` as its tower and a fresh
    projector (seeded by ``seed``), and a processor with ``processor``'s tokenizer and chat template.

    ``select_strategy`` defaults to "default" (drop the first token) for backbones with a CLS token and "full"
    for those without (SigLIP).
    """
    check_sequence_backbone(backbone)
    prefix = prefix_token_count(backbone)
    strategy = select_strategy or ("default" if prefix else "full")
    if strategy not in ("default", "full"):
        raise UsageError(f"select_strategy={strategy!r}; use 'default' or 'full'")
    if strategy == "default" and prefix == 0:
        raise UsageError(f"{type(backbone).__name__} has no CLS token for the 'default' strategy to drop; use 'full'")
    base = lvlm.config
    config = LlavaConfig(
        vision_config=backbone.config.to_dict(), text_config=base.text_config.to_dict(),
        image_token_id=base.image_token_id, projector_hidden_act=getattr(base, "projector_hidden_act", "gelu"),
        vision_feature_layer=feature_layer, vision_feature_select_strategy=strategy,
        multimodal_projector_bias=getattr(base, "multimodal_projector_bias", True),
    )
    with torch.device("meta"):  # nothing is allocated for the tower and LM, which are replaced below
        model = LlavaForConditionalGeneration(config)
    model.model.vision_tower = backbone
    model.model.language_model = lvlm.model.language_model
    model.lm_head = lvlm.lm_head
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        projector = type(lvlm.model.multi_modal_projector)(config)
    model.model.multi_modal_projector = projector.to(next(backbone.parameters()).dtype)
    model.generation_config = lvlm.generation_config
    model.eval()
    tokenizer = processor.tokenizer
    new_processor = LlavaProcessor(
        image_processor=image_processor_of(image_processor), tokenizer=tokenizer, patch_size=backbone.config.patch_size,
        vision_feature_select_strategy=strategy, chat_template=getattr(processor, "chat_template", None),
        num_additional_image_tokens=prefix, image_token=find_image_token(processor, base.image_token_id),
    )
    find_vision_tower(model)
    return model, new_processor


def find_image_token(processor: Any, image_token_id: int) -> str:
    return processor.tokenizer.convert_ids_to_tokens(int(image_token_id))
