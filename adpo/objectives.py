"""Per-sample objectives that the attacks in :mod:`adpo.attacks` maximise.

An objective maps a batch of pixel-space images ``[B, 3, H, W]`` to one value per sample (higher = a
stronger attack) and may report per-sample *success*, which lets attacks stop early on samples that
are already broken. Objectives carry per-sample state (reference embeddings, token ids, labels) and
can be restricted to a subset of the batch with :meth:`Objective.subset`.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

if TYPE_CHECKING:
    from adpo.lvlm import LlavaView


@dataclass
class Evaluation:
    """Objective values ``[B]`` (to maximise) and, where the objective can tell, success ``[B]``."""

    values: torch.Tensor
    success: torch.Tensor | None = None


class Objective:
    """Base class. Subclasses list their per-sample tensor attributes in ``per_sample_fields``."""

    per_sample_fields: tuple[str, ...] = ()

    def modules(self) -> Sequence[nn.Module]:
        """Modules the objective runs; attacks put them in eval mode and freeze their parameters."""
        return ()

    def evaluate(self, x: torch.Tensor) -> Evaluation:
        raise NotImplementedError

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.evaluate(x).values

    def subset(self, index: torch.Tensor) -> "Objective":
        """The same objective restricted to the samples ``index`` of the batch."""
        restricted = copy.copy(self)
        for field in self.per_sample_fields:
            value = getattr(self, field)
            if value is not None:
                setattr(restricted, field, value[index.to(value.device)])
        return restricted


class EmbeddingDistance(Objective):
    """‖φ(x') − reference‖² summed over all non-batch dimensions (the FARE objective).

    ``embed_fn`` maps pixel-space images to embeddings (e.g. ``VisionTower.pooled`` of the encoder being
    attacked); ``reference`` holds φ_orig(x) of the clean images, computed once by the caller with the
    frozen original encoder.
    """

    per_sample_fields = ("reference",)

    def __init__(self, embed_fn: Callable[[torch.Tensor], torch.Tensor], reference: torch.Tensor, modules: Sequence[nn.Module] = ()):
        self.embed_fn = embed_fn
        self.reference = reference.detach()
        self._modules = tuple(modules)

    def modules(self) -> Sequence[nn.Module]:
        return self._modules

    def evaluate(self, x: torch.Tensor) -> Evaluation:
        embedding = self.embed_fn(x)
        if embedding.shape != self.reference.shape:
            raise ValueError(
                f"embedding shape {tuple(embedding.shape)} differs from the reference's {tuple(self.reference.shape)}; "
                "compute the reference with the same embedding function on the clean images"
            )
        diff = embedding.float() - self.reference.float()
        return Evaluation(values=diff.pow(2).flatten(1).sum(dim=1))


class LanguageModelLoss(Objective):
    """Per-sample mean negative log-likelihood of given answer tokens under an LVLM.

    Untargeted (default): maximise the NLL of the reference answers (push them away); success when the
    teacher-forced greedy prediction differs from the reference at some answer token — which, for greedy
    decoding, is exactly "the generated answer is not the reference".
    Targeted: maximise −NLL of a target string (pull it in); success when every target token is the
    greedy prediction, i.e. greedy decoding produces the target. ``targeted`` is one flag for the batch or
    one per sample (untargeted and targeted attack passes side by side in one batch).

    ``labels`` follow the Hugging Face convention (``-100`` outside the answer); build them with
    :meth:`adpo.lvlm.LlavaView.encode` so the answer ends at the model's end-of-turn token.
    """

    per_sample_fields = ("input_ids", "attention_mask", "labels", "targeted")

    def __init__(self, view: "LlavaView", input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor,
                 targeted: bool | torch.Tensor = False):
        if input_ids.shape != labels.shape or input_ids.shape != attention_mask.shape:
            raise ValueError(
                f"input_ids {tuple(input_ids.shape)}, attention_mask {tuple(attention_mask.shape)} and labels "
                f"{tuple(labels.shape)} must have the same shape"
            )
        if bool(((labels != -100).sum(dim=1) == 0).any()):
            raise ValueError("every sample needs at least one answer token in labels (all were -100 for some sample)")
        self.view = view
        self.input_ids = input_ids
        self.attention_mask = attention_mask
        self.labels = labels
        self.targeted = torch.as_tensor(targeted, dtype=torch.bool).expand(input_ids.shape[0]).clone()

    def modules(self) -> Sequence[nn.Module]:
        return (self.view.model,)

    def evaluate(self, x: torch.Tensor) -> Evaluation:
        scores = self.view.answer_scores(x, self.input_ids, self.attention_mask, self.labels)
        mean_nll = -scores.sum_logps / scores.num_tokens
        targeted = self.targeted.to(mean_nll.device)
        return Evaluation(values=torch.where(targeted, -mean_nll, mean_nll),
                          success=torch.where(targeted, scores.all_greedy, ~scores.all_greedy))


class ZeroShotCrossEntropy(Objective):
    """Cross-entropy of a CLIP zero-shot classifier (cosine similarity × ``logit_scale``).

    Untargeted: maximise CE of the true ``labels``; success when the prediction is wrong.
    Targeted (``target_labels`` given): maximise −CE of the targets; success when the target is predicted.
    A target label of −1 makes that sample's row untargeted (both kinds of pass side by side in one batch).
    """

    per_sample_fields = ("labels", "target_labels")

    def __init__(
        self,
        embed_fn: Callable[[torch.Tensor], torch.Tensor],
        class_embeddings: torch.Tensor,
        labels: torch.Tensor,
        logit_scale: float = 100.0,
        target_labels: torch.Tensor | None = None,
        modules: Sequence[nn.Module] = (),
    ):
        self.embed_fn = embed_fn
        self.class_embeddings = F.normalize(class_embeddings.detach().float(), dim=-1)
        self.labels = labels
        self.target_labels = target_labels
        self.logit_scale = logit_scale
        self._modules = tuple(modules)

    def modules(self) -> Sequence[nn.Module]:
        return self._modules

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        image = F.normalize(self.embed_fn(x).float(), dim=-1)
        return self.logit_scale * image @ self.class_embeddings.to(image.device).T

    def evaluate(self, x: torch.Tensor) -> Evaluation:
        logits = self.logits(x)
        predicted = logits.argmax(dim=-1)
        values = F.cross_entropy(logits, self.labels, reduction="none")
        success = predicted != self.labels
        if self.target_labels is not None:
            targeted = self.target_labels >= 0
            toward = -F.cross_entropy(logits, self.target_labels.clamp_min(0), reduction="none")
            values = torch.where(targeted, toward, values)
            success = torch.where(targeted, predicted == self.target_labels, success)
        return Evaluation(values=values, success=success)
