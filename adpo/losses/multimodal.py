"""Losses that train both CLIP towers against image and text attacks (MMCoA, ΔCLIP) as pure tensor functions.

Like :mod:`adpo.losses.encoder`, each takes embeddings the caller computed and never touches a model. ``scale`` is
the logit scale s (CLIP's ``logit_scale.exp()``, 100 for OpenAI CLIP), not its logarithm.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def clip_contrastive_loss(
    image_embeds: torch.Tensor, text_embeds: torch.Tensor, scale: float | torch.Tensor, ignore: torch.Tensor | None = None
) -> torch.Tensor:
    """CLIP's symmetric InfoNCE between L2-normalised embeddings (pair i is image i with text i):
    ½ [CE(s · Î T̂ᵀ, arange) + CE(s · T̂ Îᵀ, arange)].

    ``ignore`` [B, B] (bool, False on the diagonal) marks pairs left out of both softmaxes, e.g. images and texts of
    the same class, which are not true negatives.
    """
    image_embeds = F.normalize(image_embeds, dim=-1)
    text_embeds = F.normalize(text_embeds, dim=-1)
    logits = scale * image_embeds @ text_embeds.t()
    if ignore is not None:
        logits = logits.masked_fill(ignore, float("-inf"))
    targets = torch.arange(len(logits), device=logits.device)
    return (F.cross_entropy(logits, targets) + F.cross_entropy(logits.t(), targets)) / 2


def prompt_replaced_logits(image_embeds: torch.Tensor, class_embeds: torch.Tensor, prompt_embeds: torch.Tensor,
                           labels: torch.Tensor, scale: float | torch.Tensor) -> torch.Tensor:
    """Zero-shot logits [B, C] of image i when its own class's prompt is ``prompt_embeds[i]``:
    s · cos(image_i, class_c) for c ≠ y_i and s · cos(image_i, prompt_i) for c = y_i."""
    image = F.normalize(image_embeds, dim=-1)
    logits = scale * image @ F.normalize(class_embeds, dim=-1).t()
    own = scale * (image * F.normalize(prompt_embeds, dim=-1)).sum(dim=-1)
    return logits.scatter(1, labels[:, None], own[:, None].to(logits.dtype))


def mmcoa_loss(
    adversarial_image: torch.Tensor,
    clean_image: torch.Tensor,
    class_text: torch.Tensor,
    adversarial_prompt: torch.Tensor,
    labels: torch.Tensor,
    scale: float | torch.Tensor,
    text_weight: float = 1.0,
) -> torch.Tensor:
    """MMCoA (Zhou et al. 2024, arXiv 2404.19287): adversarial images against clean texts plus clean images against
    adversarial texts, in the zero-shot classifier's cross-entropy (TeCoA's loss, which MMCoA extends to text):

        CE(s · cos(f(x'_i), g(t_c))_c, y_i)  +  text_weight · CE(logits of f(x_i) with g(t_c) for c ≠ y_i and g(t'_i)
        for c = y_i, y_i)

    averaged over the batch. ``adversarial_image``/``clean_image`` [B, D] are projected image embeddings,
    ``class_text`` [C, D] the clean class-prompt embeddings, ``adversarial_prompt`` [B, D] the embedding of each
    sample's perturbed prompt of its own class. Every input keeps its gradient: both towers train.
    """
    image_term = F.cross_entropy((scale * F.normalize(adversarial_image, dim=-1)
                                  @ F.normalize(class_text, dim=-1).t()).float(), labels)
    text_term = F.cross_entropy(prompt_replaced_logits(clean_image, class_text, adversarial_prompt, labels, scale).float(),
                                labels)
    return image_term + text_weight * text_term


def deltaclip_loss(
    adversarial_image: torch.Tensor,
    adversarial_text: torch.Tensor,
    scale: float | torch.Tensor,
    clean_image: torch.Tensor | None = None,
    clean_text: torch.Tensor | None = None,
    clean_weight: float = 0.0,
    ignore: torch.Tensor | None = None,
) -> torch.Tensor:
    """ΔCLIP-style adversarial contrastive pre-training (arXiv 2501.09446): CLIP's symmetric InfoNCE on the batch's
    adversarial image-text pairs, plus ``clean_weight`` × the same loss on the clean pairs:

        InfoNCE(f(x'), g(t'))  +  clean_weight · InfoNCE(f(x), g(t))
    """
    loss = clip_contrastive_loss(adversarial_image, adversarial_text, scale, ignore)
    if clean_weight:
        if clean_image is None or clean_text is None:
            raise ValueError("clean_weight > 0 needs clean_image and clean_text embeddings")
        loss = loss + clean_weight * clip_contrastive_loss(clean_image, clean_text, scale, ignore)
    return loss
