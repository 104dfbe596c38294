"""The text threat model and its attack: at most k token substitutions, each from an allowed candidate set.

This module owns everything adversarial about *texts*, as :mod:`adpo.threat` and :mod:`adpo.attacks` own images:

* :class:`TextThreatModel` — the admissible set: a text ``t'`` is admissible for ``t`` iff it has the same length,
  differs from ``t`` in at most ``max_substitutions`` token positions, only at *editable* positions (real tokens:
  not padding, not the tokenizer's special tokens), and every substituted token is in the candidate set of the
  ``candidates`` rule ("words": vocabulary entries that are alphabetic once the BPE markers ``</w>``, ``Ġ``, ``▁``,
  ``##`` are stripped; "vocabulary": every non-special entry). *Protected words* (the class names in zero-shot
  classification and MMCoA, a configured list in ΔCLIP) are neither edited nor put in: without that, one
  substitution turns "a photo of a red circle" into "a photo of a blue circle", which changes the label rather
  than attacking the model.
* :func:`text_attack` — a gradient-guided search inside that set (HotFlip, Ebrahimi et al. 2018): each round takes the
  gradient of the objective with respect to the text tower's input token embeddings, ranks every (position,
  candidate) substitution by its first-order gain ``(E[v] − E[t_i]) · ∂J/∂e_i``, keeps the ``shortlist`` best, and
  scores those with the true objective (no approximation decides); the ``beam_width`` best texts go on to the next
  round, so ``beam_width: 1`` is greedy. The best text seen (the clean one included) is returned.
* Text objectives (:class:`ZeroShotTextCrossEntropy`, :class:`TextRetrievalCrossEntropy`) — per-sample values to
  maximise, with success, restricted to a subset like :class:`adpo.objectives.Objective`.

MMCoA (Zhou et al. 2024) attacked texts with BERT-Attack, whose candidates come from a BERT masked language model.
No BERT is available offline here, and a second model would make the threat model depend on it; HotFlip's
candidates come from the attacked model's own embedding table, so the attack needs nothing but the CLIP model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from adpo.attacks import attack_mode
from adpo.errors import UsageError
from adpo.objectives import Evaluation, Objective

CANDIDATE_RULES: tuple[str, ...] = ("words", "vocabulary")
# How BPE and WordPiece vocabularies mark word boundaries; stripped before the "words" rule looks at a token.
_SUBWORD_MARKERS = ("</w>", "Ġ", "▁", "##")


@dataclass(frozen=True)
class TextThreatModel:
    """At most ``max_substitutions`` token substitutions from the ``candidates`` rule's set (see the module doc).

    ``shortlist`` and ``beam_width`` set the attack's effort, not the admissible set: per round, how many
    first-order-ranked substitutions per text are scored exactly, and how many texts go on to the next round.
    """

    max_substitutions: int = 1
    candidates: str = "words"
    shortlist: int = 16
    beam_width: int = 1

    def __post_init__(self) -> None:
        check_text_threat_settings(self, prefix="")

    def describe(self) -> str:
        return (f"≤{self.max_substitutions} token substitution(s) from the '{self.candidates}' candidates "
                f"(HotFlip ranking, shortlist {self.shortlist}, beam {self.beam_width})")

    def allowed_tokens(self, tokenizer, protected_words: Sequence[str] = ()) -> torch.Tensor:
        """Boolean [vocabulary size]: the tokens a substitution may put in (never a token of a protected word)."""
        size = max(len(tokenizer), max(tokenizer.get_vocab().values()) + 1)
        allowed = torch.zeros(size, dtype=torch.bool)
        excluded = set(tokenizer.all_special_ids) | protected_token_ids(tokenizer, protected_words)
        for token, index in tokenizer.get_vocab().items():
            if index in excluded:
                continue
            allowed[index] = self.candidates == "vocabulary" or _is_word(token)
        if not bool(allowed.any()):
            raise UsageError(f"text attack: the tokenizer has no '{self.candidates}' candidates; try candidates: vocabulary")
        return allowed

    @staticmethod
    def editable_positions(input_ids: torch.Tensor, attention_mask: torch.Tensor, tokenizer,
                           protected_words: Sequence[str] = ()) -> torch.Tensor:
        """Boolean [B, L]: positions a substitution may change (real tokens that are neither special nor a token
        of a protected word)."""
        fixed = set(tokenizer.all_special_ids) | protected_token_ids(tokenizer, protected_words)
        fixed_ids = torch.tensor(sorted(fixed), dtype=input_ids.dtype, device=input_ids.device)
        return attention_mask.bool() & ~torch.isin(input_ids, fixed_ids)

    def contains(self, adversarial_ids: torch.Tensor, input_ids: torch.Tensor, editable: torch.Tensor,
                 allowed: torch.Tensor) -> torch.Tensor:
        """Boolean [B]: each adversarial text is admissible for its clean text."""
        if adversarial_ids.shape != input_ids.shape:
            return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        changed = adversarial_ids != input_ids
        inside = (changed & ~editable).sum(dim=1) == 0
        allowed_here = allowed.to(adversarial_ids.device)[adversarial_ids] | ~changed
        return inside & allowed_here.all(dim=1) & (changed.sum(dim=1) <= self.max_substitutions)


def check_text_threat_settings(config: object, prefix: str = "text_") -> None:
    """The text threat model's settings of a config (``text_max_substitutions``, ...), checked under their config
    names; raises :class:`adpo.errors.UsageError`."""
    for key in ("max_substitutions", "shortlist", "beam_width"):
        value = getattr(config, prefix + key)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise UsageError(f"{prefix}{key}={value!r} must be a whole number >= 1")
    if getattr(config, prefix + "candidates") not in CANDIDATE_RULES:
        raise UsageError(f"{prefix}candidates={getattr(config, prefix + 'candidates')!r}; use one of {CANDIDATE_RULES}")


def protected_token_ids(tokenizer, words: Sequence[str]) -> set[int]:
    """The token ids of ``words`` (each word tokenised alone, without special tokens)."""
    ids: set[int] = set()
    for word in words:
        ids.update(tokenizer(word, add_special_tokens=False)["input_ids"])
    return ids


def _is_word(token: str) -> bool:
    for marker in _SUBWORD_MARKERS:
        token = token.replace(marker, "")
    return token.isalpha()


# -- objectives ----------------------------------------------------------------------------------------


class TextObjective(Objective):
    """A per-sample objective over token ids: ``evaluate(input_ids, attention_mask)`` -> values [B] to maximise.

    ``token_embedding`` is the text tower's input embedding table: the attack differentiates through its output.
    """

    token_embedding: nn.Embedding

    def evaluate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> Evaluation:  # type: ignore[override]
        raise NotImplementedError


class _CosineCrossEntropy(TextObjective):
    """Shared by both text objectives: cross-entropy of ``logit_scale`` × cosine similarities."""

    def __init__(self, text_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], token_embedding: nn.Embedding,
                 labels: torch.Tensor, logit_scale: float, modules: Sequence[nn.Module] = ()):
        self.text_fn = text_fn
        self.token_embedding = token_embedding
        self.labels = labels
        self.logit_scale = float(logit_scale)
        self._modules = tuple(modules)

    def modules(self) -> Sequence[nn.Module]:
        return self._modules

    def _result(self, logits: torch.Tensor) -> Evaluation:
        labels = self.labels.to(logits.device)
        values = F.cross_entropy(logits, labels, reduction="none")
        return Evaluation(values=values, success=logits.argmax(dim=-1) != labels)


class ZeroShotTextCrossEntropy(_CosineCrossEntropy):
    """Zero-shot classification with the prompt of the true class attacked: row n holds image n's embedding and
    the (perturbed) prompt of its class ``labels[n]``; the classifier is the clean class embeddings with row
    ``labels[n]`` replaced by that prompt's embedding. Value: cross-entropy of the true class; success: misclassified.
    """

    per_sample_fields = ("image_embeddings", "labels")

    def __init__(self, text_fn, token_embedding, image_embeddings: torch.Tensor, class_embeddings: torch.Tensor,
                 labels: torch.Tensor, logit_scale: float, modules: Sequence[nn.Module] = ()):
        super().__init__(text_fn, token_embedding, labels, logit_scale, modules)
        self.image_embeddings = F.normalize(image_embeddings.detach().float(), dim=-1)
        self.class_embeddings = F.normalize(class_embeddings.detach().float(), dim=-1)

    def evaluate(self, input_ids, attention_mask):
        prompt = F.normalize(self.text_fn(input_ids, attention_mask).float(), dim=-1)
        image = self.image_embeddings.to(prompt.device)
        logits = self.logit_scale * image @ self.class_embeddings.to(prompt.device).T
        own = self.logit_scale * (image * prompt).sum(dim=-1)
        logits = logits.scatter(1, self.labels.to(prompt.device)[:, None], own[:, None])
        return self._result(logits)


class TextRetrievalCrossEntropy(_CosineCrossEntropy):
    """Text-to-image retrieval over a fixed gallery of image embeddings [M, D]: row n's text should retrieve
    gallery item ``labels[n]`` (in-batch contrastive pre-training: the gallery is the batch, ``labels`` = arange).
    Value: cross-entropy of the right item; success: another item is retrieved first."""

    per_sample_fields = ("labels",)

    def __init__(self, text_fn, token_embedding, gallery: torch.Tensor, labels: torch.Tensor, logit_scale: float,
                 modules: Sequence[nn.Module] = ()):
        super().__init__(text_fn, token_embedding, labels, logit_scale, modules)
        self.gallery = F.normalize(gallery.detach().float(), dim=-1)

    def evaluate(self, input_ids, attention_mask):
        text = F.normalize(self.text_fn(input_ids, attention_mask).float(), dim=-1)
        return self._result(self.logit_scale * text @ self.gallery.to(text.device).T)


# -- the attack ----------------------------------------------------------------------------------------


@dataclass
class TextAttackResult:
    """input_ids: the adversarial texts (same shape as the clean ids); values: the objective there; success: per
    sample; substitutions: how many positions differ from the clean text."""

    input_ids: torch.Tensor
    values: torch.Tensor
    success: torch.Tensor
    substitutions: torch.Tensor


def _embedding_gradient(objective: TextObjective, input_ids: torch.Tensor, attention_mask: torch.Tensor):
    """The objective's values [R] and their gradient with respect to the input token embeddings [R, L, E]."""
    captured: list[torch.Tensor] = []

    def leaf(module, inputs, output):
        output = output.detach().requires_grad_(True)
        captured.append(output)
        return output

    handle = objective.token_embedding.register_forward_hook(leaf)
    try:
        with torch.enable_grad():
            values = objective.evaluate(input_ids, attention_mask).values
            grad = torch.autograd.grad(values.float().sum(), captured[-1])[0]
    finally:
        handle.remove()
    return values.detach().float(), grad.detach().float()


@torch.no_grad()
def _score(objective: TextObjective, input_ids: torch.Tensor, attention_mask: torch.Tensor):
    evaluation = objective.evaluate(input_ids, attention_mask)
    success = evaluation.success if evaluation.success is not None else torch.zeros_like(evaluation.values, dtype=torch.bool)
    return evaluation.values.detach().float(), success.detach()


def text_attack(
    objective: TextObjective,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    threat: TextThreatModel,
    allowed: torch.Tensor,
    editable: torch.Tensor,
    *,
    early_stop: bool = True,
    progress: bool = False,
) -> TextAttackResult:
    """Maximise ``objective`` over the texts ``threat`` admits around ``input_ids`` (see the module doc).

    ``allowed`` [V] and ``editable`` [B, L] come from :meth:`TextThreatModel.allowed_tokens` and
    :meth:`TextThreatModel.editable_positions`. With ``early_stop`` a sample stops once a text succeeds (the
    succeeding text is returned); otherwise every round runs and the highest value wins.
    """
    if input_ids.shape != attention_mask.shape or input_ids.shape != editable.shape:
        raise ValueError(f"input_ids {tuple(input_ids.shape)}, attention_mask {tuple(attention_mask.shape)} and "
                         f"editable {tuple(editable.shape)} must have the same shape")
    batch, length = input_ids.shape
    device = input_ids.device
    table = objective.token_embedding.weight.detach().float()
    allowed = allowed.to(device)
    if allowed.shape[0] < table.shape[0]:  # embedding rows past the tokenizer's vocabulary are never candidates
        allowed = torch.cat([allowed, allowed.new_zeros(table.shape[0] - allowed.shape[0])])
    allowed = allowed[: table.shape[0]]

    with attack_mode(objective.modules()):
        best_values, success = _score(objective, input_ids, attention_mask)
        best_ids = input_ids.clone()
        beams = input_ids[:, None].clone()  # [B, W, L]
        for _ in tqdm(range(threat.max_substitutions), desc="text attack", disable=not progress, leave=False):
            active = torch.arange(batch, device=device) if not early_stop else (~success).nonzero().flatten()
            if active.numel() == 0:
                break
            width = beams.shape[1]
            rows = beams[active].reshape(-1, length)  # [R, L], R = active × W
            owner = active.repeat_interleave(width)
            mask = attention_mask[owner]
            _, grad = _embedding_gradient(objective.subset(owner), rows, mask)
            # First-order gain of putting token v at position i: (E[v] − E[t_i]) · g_i.
            gain = grad @ table.T - (grad * table[rows]).sum(dim=-1, keepdim=True)  # [R, L, V]
            open_position = editable[owner] & (rows == input_ids[owner])  # each position is substituted at most once
            gain = gain.masked_fill(~open_position[..., None], -math.inf).masked_fill(~allowed[None, None], -math.inf)
            gain = gain.scatter(2, rows[..., None], -math.inf)  # "substituting" a token by itself is no change
            count = min(threat.shortlist, length * table.shape[0])
            top_gain, top_index = gain.flatten(1).topk(count, dim=1)
            usable = torch.isfinite(top_gain)  # [R, S]
            if not bool(usable.any()):
                break
            position, token = top_index // table.shape[0], top_index % table.shape[0]
            candidates = rows[:, None].repeat(1, count, 1)  # [R, S, L]
            candidates.scatter_(2, position[..., None], token[..., None])
            flat = candidates[usable]
            flat_owner = owner[:, None].expand(-1, count)[usable]
            values, hit = _score(objective.subset(flat_owner), flat, attention_mask[flat_owner])
            new_beams = []
            for sample in active.tolist():
                mine = (flat_owner == sample).nonzero().flatten()
                if mine.numel() == 0:
                    new_beams.append(beams[sample])
                    continue
                order = mine[values[mine].argsort(descending=True)]
                if early_stop and bool(hit[mine].any()):
                    winner = mine[hit[mine]][values[mine][hit[mine]].argmax()]
                    best_ids[sample], best_values[sample], success[sample] = flat[winner], values[winner], True
                elif values[order[0]] > best_values[sample]:
                    best_ids[sample], best_values[sample] = flat[order[0]], values[order[0]]
                    success[sample] |= hit[order[0]]
                kept, seen = [], set()
                for index in order.tolist():
                    key = tuple(flat[index].tolist())
                    if key not in seen:
                        seen.add(key)
                        kept.append(flat[index])
                    if len(kept) == threat.beam_width:
                        break
                new_beams.append(torch.stack(kept))
            grown = max(b.shape[0] for b in new_beams)
            next_beams = beams[:, :1].repeat(1, grown, 1)  # samples out of the search keep their best
            for sample, kept in zip(active.tolist(), new_beams):
                # Pad a short beam list with its first entry: a duplicate beam costs work, never admissibility.
                next_beams[sample] = torch.cat([kept, kept[:1].repeat(grown - kept.shape[0], 1)])
            beams = next_beams
    return TextAttackResult(best_ids, best_values, success, (best_ids != input_ids).sum(dim=1))


def clip_text_tower(clip) -> tuple[Callable[[torch.Tensor, torch.Tensor], torch.Tensor], nn.Embedding]:
    """A CLIPModel's text side as the attack needs it: (ids, mask) -> projected text features, and the token table."""

    def text_fn(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        features = clip.get_text_features(input_ids=input_ids, attention_mask=attention_mask)
        return getattr(features, "pooler_output", features)

    return text_fn, clip.text_model.embeddings.token_embedding
