"""Optional projector re-alignment after a graft.

Plug-and-play grafting keeps the target's projector, which was trained on the original encoder's
features; a robust encoder's features are close but not identical. Robust-LLaVA reports that adapting
to the new encoder helps, so this offers the cheapest version: a short fine-tune of the projector only
(encoder and LLM frozen) on image-caption pairs, with the caption's LM loss. Its effect is reported
separately from the plain graft.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch
from tqdm.auto import tqdm

from adpo.lvlm import LlavaView
from adpo.preprocess import to_pixels
from adpo.tower import find_projector
from transfer.verify import Sample


@dataclass
class RealignConfig:
    steps: int = 100
    learning_rate: float = 1e-4
    batch_size: int = 8
    prompt: str = "Describe the image."
    seed: int = 0
    pad_to_square: bool = False  # adpo.preprocess.to_pixels: pad as original LLaVA-1.5 instead of centre-cropping


def realign_projector(model: Any, processor: Any, samples: Sequence[Sample], config: RealignConfig) -> dict:
    """Fine-tune only ``model``'s projector on the samples' captions (in place); returns training statistics.

    Train the model in float32 (or bfloat16 with care): the optimiser updates the projector's own dtype.
    """
    captioned = [s for s in samples if s.caption]
    if not captioned:
        raise ValueError("projector re-alignment needs captions: the data has no 'caption(s)' column")
    if config.steps <= 0:
        raise ValueError(f"steps must be > 0, got {config.steps}")
    view = LlavaView(model, processor)
    trainable = list(find_projector(model).parameters())
    saved_flags = [(p, p.requires_grad) for p in model.parameters()]
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    for parameter in trainable:
        parameter.requires_grad_(True)
    optimizer = torch.optim.AdamW(trainable, lr=config.learning_rate, weight_decay=0.0)
    pixels = to_pixels([s.image for s in captioned], processor, pad_to_square=config.pad_to_square)
    generator = torch.Generator().manual_seed(config.seed)
    order = torch.randperm(len(captioned), generator=generator)
    losses: list[float] = []
    try:
        for step in tqdm(range(config.steps), desc="projector re-alignment", leave=False):
            start = (step * config.batch_size) % len(captioned)
            index = order[torch.arange(start, start + config.batch_size) % len(captioned)]
            batch = [captioned[i] for i in index.tolist()]
            encoded = view.encode([config.prompt] * len(batch), [s.caption for s in batch]).to(view.device)
            scores = view.answer_scores(pixels[index].to(view.device), encoded.input_ids, encoded.attention_mask, encoded.labels)
            loss = -(scores.sum_logps / scores.num_tokens).mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
    finally:
        for parameter, flag in saved_flags:
            parameter.requires_grad_(flag)
        model.eval()
    window = max(1, len(losses) // 10)
    return {"steps": config.steps, "learning_rate": config.learning_rate, "batch_size": config.batch_size,
            "num_caption_samples": len(captioned), "trained": "projector only (encoder and LLM frozen)",
            "caption_loss_first": sum(losses[:window]) / window, "caption_loss_last": sum(losses[-window:]) / window}
