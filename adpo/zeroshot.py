"""CLIP zero-shot classification: the class-prompt text embeddings an image embedding is compared with (evaluation's
zero-shot task, TeCoA's objective and the world's WorldCLIP checks all use this one)."""

from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.nn.functional as F

DEFAULT_CLASS_PROMPT = "a photo of a {}"


@torch.no_grad()
def zero_shot_classifier(model: Any, processor: Any, class_names: Sequence[str], template: str = DEFAULT_CLASS_PROMPT) -> torch.Tensor:
    """L2-normalised text embeddings [C, D] of ``template.format(name)`` for every class name, from a ``CLIPModel``."""
    prompts = [template.format(name) for name in class_names]
    encoded = processor.tokenizer(prompts, padding=True, return_tensors="pt")
    device = next(model.parameters()).device
    embeds = model.get_text_features(
        input_ids=encoded["input_ids"].to(device), attention_mask=encoded["attention_mask"].to(device)
    )
    embeds = getattr(embeds, "pooler_output", embeds)
    return F.normalize(embeds.float(), dim=-1)
