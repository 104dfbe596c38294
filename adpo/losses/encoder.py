"""Encoder-only adversarial fine-tuning losses (FARE, TeCoA, Sim-CLIP) as pure tensor functions.

Each takes embeddings already computed by the caller (the trainer runs the tower; these functions
never touch a model) and returns the batch mean, or one value per sample with ``reduction="none"``
so an attack objective can reuse the same formula.

Embeddings may be pooled ``[B, D]`` or token features ``[B, N, D]`` (the patch tokens the LLM
consumes); the formulas below say how the extra token axis is treated.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

Reduction = Literal["mean", "none"]


def _reduce(per_sample: torch.Tensor, reduction: Reduction) -> torch.Tensor:
    if reduction == "mean":
        return per_sample.mean()
    if reduction == "none":
        return per_sample
    raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}")


def _check_same_shape(a: torch.Tensor, b: torch.Tensor, a_name: str, b_name: str) -> None:
    if a.shape != b.shape:
        raise ValueError(
            f"{a_name} has shape {tuple(a.shape)} but {b_name} has shape {tuple(b.shape)}; both must come from "
            "the same tower output (same embedding kind: pooled or llm_features) on the same batch"
        )


def fare_loss(
    adversarial_embedding: torch.Tensor, original_embedding: torch.Tensor, reduction: Reduction = "mean"
) -> torch.Tensor:
    """FARE: ``||phi_theta(x') - phi_orig(x)||_2^2`` summed over every non-batch dimension, then averaged
    over the batch. Embeddings are not normalised. ``original_embedding`` comes from the frozen original
    encoder on the clean image and is treated as a constant (detached here)."""
    _check_same_shape(adversarial_embedding, original_embedding, "adversarial_embedding", "original_embedding")
    difference = adversarial_embedding - original_embedding.detach()
    return _reduce(difference.pow(2).flatten(1).sum(dim=1), reduction)


def relative_drift_loss(
    policy_embedding: torch.Tensor, original_embedding: torch.Tensor, reduction: Reduction = "mean"
) -> torch.Tensor:
    """Clean-feature anchor: ``||phi_theta(x) - phi_orig(x)||_2^2 / ||phi_orig(x)||_2^2``, FARE's distance
    divided by the original embedding's squared norm so its weight does not depend on the tower's scale.
    ``original_embedding`` is a constant (detached here)."""
    scale = original_embedding.detach().pow(2).flatten(1).sum(dim=1).clamp_min(torch.finfo(original_embedding.dtype).tiny)
    return _reduce(fare_loss(policy_embedding, original_embedding, reduction="none") / scale, reduction)


def tecoa_loss(
    adversarial_image_embedding: torch.Tensor,
    class_text_embeddings: torch.Tensor,
    labels: torch.Tensor,
    logit_scale: float | torch.Tensor,
    reduction: Reduction = "mean",
) -> torch.Tensor:
    """TeCoA: cross-entropy of ``logit_scale * cos(image_embedding, text_embedding_c)`` over classes c.

    ``adversarial_image_embedding`` is ``[B, D]`` in the joint image-text space (after the visual
    projection); ``class_text_embeddings`` is ``[C, D]`` (one prompt embedding per class, constant);
    ``labels`` is ``[B]`` class indices; ``logit_scale`` is the inverse temperature (CLIP's is 100)."""
    if adversarial_image_embedding.dim() != 2 or class_text_embeddings.dim() != 2:
        raise ValueError(
            "tecoa_loss needs pooled, projected image embeddings [B, D] and class text embeddings [C, D]; got "
            f"{tuple(adversarial_image_embedding.shape)} and {tuple(class_text_embeddings.shape)} "
            "(TeCoA works on the pooled embedding, not on token features)"
        )
    if adversarial_image_embedding.shape[-1] != class_text_embeddings.shape[-1]:
        raise ValueError(
            f"image embedding width {adversarial_image_embedding.shape[-1]} != text embedding width "
            f"{class_text_embeddings.shape[-1]}: project the image embedding with the CLIP model's visual_projection"
        )
    image = F.normalize(adversarial_image_embedding, dim=-1)
    text = F.normalize(class_text_embeddings.detach(), dim=-1).to(image.dtype)
    logits = logit_scale * image @ text.T
    return _reduce(F.cross_entropy(logits.float(), labels.long(), reduction="none"), reduction)


def simclip_loss(
    adversarial_embedding: torch.Tensor, clean_embedding: torch.Tensor, reduction: Reduction = "mean"
) -> torch.Tensor:
    """Sim-CLIP: ``1 - cos(phi_theta(x'), stopgrad(phi_theta(x)))``; gradients flow only through the
    adversarial branch. For token features ``[B, N, D]`` the cosine is taken per token and averaged over
    tokens. Minimising this maximises the cosine similarity (the constant 1 keeps the loss >= 0)."""
    _check_same_shape(adversarial_embedding, clean_embedding, "adversarial_embedding", "clean_embedding")
    cosine = F.cosine_similarity(adversarial_embedding, clean_embedding.detach(), dim=-1)
    per_sample = (1.0 - cosine).reshape(cosine.shape[0], -1).mean(dim=1)
    return _reduce(per_sample, reduction)
