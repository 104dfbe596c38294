"""The models the evaluation drives: an LVLM (greedy generation and its LM-loss objective) and a CLIP zero-shot
classifier, behind one interface (decode pixels, build a pass's objective)."""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from tqdm.auto import tqdm

from adpo.eval.tasks import AttackPass, Sample


class GenerativeModel:
    """An LVLM driven through :class:`adpo.lvlm.LlavaView`: greedy generation and the LM-loss objective."""

    def __init__(self, view, max_new_tokens: int):
        self.view = view
        self.max_new_tokens = max_new_tokens

    @property
    def device(self) -> torch.device:
        return self.view.device

    def predict(self, pixels: torch.Tensor, samples: Sequence[Sample]) -> list[str]:
        return self.view.generate(pixels, [s.prompt for s in samples], max_new_tokens=self.max_new_tokens)

    def objective(self, samples: Sequence[Sample], passes: Sequence[AttackPass]):
        from adpo.objectives import LanguageModelLoss

        encoded = self.view.encode([s.prompt for s in samples], [p.text for p in passes]).to(self.device)
        targeted = torch.tensor([p.targeted for p in passes])
        return LanguageModelLoss(self.view, encoded.input_ids, encoded.attention_mask, encoded.labels, targeted=targeted)


class ZeroShotModel:
    """A CLIP zero-shot classifier on pixel-space images: ``embed_fn`` gives image embeddings in the text space."""

    def __init__(self, embed_fn: Callable[[torch.Tensor], torch.Tensor], class_embeddings: torch.Tensor, class_names: Sequence[str],
                 logit_scale: float, modules: Sequence[torch.nn.Module], device: torch.device, text=None):
        self.text = text  # adpo.eval.multimodal.ZeroShotText, for the text and joint attacks
        self.embed_fn = embed_fn
        self.class_embeddings = class_embeddings
        self.class_names = list(class_names)
        self.logit_scale = logit_scale
        self.modules = tuple(modules)
        self.device = device

    def _objective(self, labels: torch.Tensor, targets: torch.Tensor | None = None):
        from adpo.objectives import ZeroShotCrossEntropy

        return ZeroShotCrossEntropy(self.embed_fn, self.class_embeddings, labels.to(self.device), self.logit_scale,
                                    None if targets is None else targets.to(self.device), modules=self.modules)

    @torch.no_grad()
    def logits(self, pixels: torch.Tensor) -> torch.Tensor:
        dummy = torch.zeros(pixels.shape[0], dtype=torch.long)
        return self._objective(dummy).logits(pixels.to(self.device))

    def predict(self, pixels: torch.Tensor, samples: Sequence[Sample]) -> list[str]:
        return [self.class_names[i] for i in self.logits(pixels).argmax(dim=-1).tolist()]

    def objective(self, samples: Sequence[Sample], passes: Sequence[AttackPass]):
        labels = torch.tensor([s.label for s in samples])
        if not any(p.targeted for p in passes):
            return self._objective(labels)
        return self._objective(labels, torch.tensor([p.target_label if p.targeted else -1 for p in passes]))


# -- the attack loop ------------------------------------------------------------------------------------


def predict_in_batches(model, pixels: torch.Tensor, samples: Sequence[Sample], batch_size: int, progress: bool = False) -> list[str]:
    outputs: list[str] = []
    chunks = list(index_batches(list(range(len(samples))), batch_size))
    for chunk in tqdm(chunks, desc="clean pass", disable=None if progress else True, leave=False):
        outputs += model.predict(pixels[chunk].to(model.device), [samples[i] for i in chunk])
    return outputs


# -- the whole protocol ---------------------------------------------------------------------------------


def index_batches(indices: Sequence[int], size: int):
    for start in range(0, len(indices), size):
        yield list(indices[start:start + size])
