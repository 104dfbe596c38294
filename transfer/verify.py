"""Verification of a graft on a sample of images.

* Tower agreement: cosine between the donor encoder's and the grafted tower's embeddings (pooled CLS
  and the features the LLM reads) on the same images — close to 1 unless a fix changed the input
  (position interpolation changes the resolution, so only the pooled embedding is compared then).
* Answer agreement: greedy answers of the original target vs the grafted model, and VQA accuracy of
  both when reference answers exist.
* Optional robust accuracy: APGD on the LM loss of the reference answer in an ℓp ball, then VQA
  accuracy of the answer to the adversarial image.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Sequence

import torch
from tqdm.auto import tqdm

from adpo.attacks import apgd
from adpo.eval.metrics import normalize_answer, vqa_soft_accuracy
from adpo.lvlm import LlavaView, VisionTower, cosine_similarity
from adpo.objectives import LanguageModelLoss
from adpo.preprocess import image_processor_of, to_pixels
from adpo.sources import open_source
from adpo.threat import ThreatModel

DEFAULT_QUESTION = "What is in the image?"


@dataclass
class Sample:
    image: Any  # anything adpo.preprocess.load_rgb accepts
    question: str
    answers: list[str] | None = None  # reference answers (VQA accuracy, robust accuracy)
    caption: str | None = None  # for projector re-alignment


def load_samples(spec: str, n: int, caption_column: str | None = None) -> list[Sample]:
    """Up to ``n`` samples from an image source spec (see :func:`adpo.sources.open_source`: ``world:SPLIT``, a
    saved HF dataset, an image folder, a COCO captions file). Image i asks its (i mod k)-th question (with
    its answer) when the source has questions, else :data:`DEFAULT_QUESTION`; unreadable images are skipped.
    ``caption_column`` names a saved HF dataset's caption column (COCO files and the world have captions)."""
    samples = []
    columns = {"caption_column": caption_column} if caption_column else {}
    for index, record in enumerate(open_source(spec, n=n, **columns)):
        if record.image is None:
            continue
        pick = index % len(record.questions) if record.questions else 0
        question = record.questions[pick] if record.questions else DEFAULT_QUESTION
        answers = [record.answers[pick]] if record.questions and len(record.answers) == len(record.questions) else None
        caption = record.captions[index % len(record.captions)] if record.captions else None
        samples.append(Sample(record.image, question, answers, caption))
    if not samples:
        raise ValueError(f"{spec}: no readable images among the first {n}")
    return samples


def _batches(items: Sequence[Any], size: int):
    for start in range(0, len(items), size):
        yield start, items[start:start + size]


def donor_view(encoder: Any, image_mean: Sequence[float] | None, image_std: Sequence[float] | None, image_processor: Any,
               target_tower: VisionTower, target_processor: Any) -> tuple[VisionTower, Any]:
    """The donor encoder as a :class:`VisionTower` reading the target's feature layer (with the donor's own
    normalisation, the target's when unknown), and an image processor giving its input resolution: its
    own, else the target's with the size changed to the donor's."""
    mean = list(image_mean) if image_mean is not None else target_tower.mean.flatten().tolist()
    std = list(image_std) if image_std is not None else target_tower.std.flatten().tolist()
    size = encoder.config.image_size
    tower = VisionTower(encoder, mean, std, size, target_tower.feature_layer, target_tower.select_strategy)
    if image_processor is None:
        image_processor = copy.deepcopy(image_processor_of(target_processor))
        if size != target_tower.image_size:
            image_processor.size = {"shortest_edge": size}
            image_processor.crop_size = {"height": size, "width": size}
    return tower, image_processor


@torch.no_grad()
def tower_agreement(donor_tower: VisionTower, grafted_tower: VisionTower, images: Sequence[Any], donor_processor: Any,
                    target_processor: Any, batch_size: int = 16) -> dict:
    """Per-image cosine of pooled and LLM-feature embeddings, donor vs grafted tower (mean and min)."""
    pooled, features = [], []
    same_resolution = donor_tower.image_size == grafted_tower.image_size
    for _, batch in tqdm(list(_batches(images, batch_size)), desc="tower agreement", leave=False):
        target_pixels = to_pixels(batch, target_processor)
        donor_pixels = target_pixels if same_resolution else to_pixels(batch, donor_processor)
        device = next(grafted_tower.encoder.parameters()).device
        donor_out = donor_tower(donor_pixels.to(next(donor_tower.encoder.parameters()).device))
        grafted_out = grafted_tower(target_pixels.to(device))
        pooled.append(cosine_similarity(donor_out.pooled.cpu(), grafted_out.pooled.cpu()))
        if same_resolution:
            features.append(cosine_similarity(donor_out.llm_features.cpu(), grafted_out.llm_features.cpu()))
    result = {"tower_cosine_pooled_mean": torch.cat(pooled).mean().item(),
              "tower_cosine_pooled_min": torch.cat(pooled).min().item()}
    if features:
        result |= {"tower_cosine_llm_features_mean": torch.cat(features).mean().item(),
                   "tower_cosine_llm_features_min": torch.cat(features).min().item()}
    else:
        result["tower_cosine_note"] = (f"resolutions differ ({donor_tower.image_size} vs {grafted_tower.image_size} px, "
                                       "positions interpolated): only the pooled embedding compared")
    return result


def generate_answers(model: Any, processor: Any, samples: Sequence[Sample], max_new_tokens: int = 16,
                     batch_size: int = 8, desc: str = "answers") -> list[str]:
    """Greedy answers of ``model`` to each sample's question."""
    view = LlavaView(model, processor)
    answers: list[str] = []
    for _, batch in tqdm(list(_batches(samples, batch_size)), desc=desc, leave=False):
        pixels = to_pixels([s.image for s in batch], processor)
        answers += view.generate(pixels, [s.question for s in batch], max_new_tokens=max_new_tokens)
    return answers


def vqa_accuracy(answers: Sequence[str], samples: Sequence[Sample]) -> float | None:
    scored = [vqa_soft_accuracy(a, s.answers) for a, s in zip(answers, samples) if s.answers]
    return sum(scored) / len(scored) if scored else None


def answer_agreement(original: Sequence[str], grafted: Sequence[str], samples: Sequence[Sample]) -> dict:
    """How often the grafted model answers as the original (exact and VQA-normalised), and both accuracies."""
    if len(original) != len(grafted):
        raise ValueError(f"{len(original)} original answers but {len(grafted)} grafted ones")
    exact = sum(a == b for a, b in zip(original, grafted)) / len(original)
    normalised = sum(normalize_answer(a) == normalize_answer(b) for a, b in zip(original, grafted)) / len(original)
    return {"num_samples": len(original), "answer_agreement_exact": exact, "answer_agreement_normalised": normalised,
            "vqa_accuracy_original": vqa_accuracy(original, samples),
            "vqa_accuracy_grafted": vqa_accuracy(grafted, samples)}


def robust_vqa_accuracy(model: Any, processor: Any, samples: Sequence[Sample], threat: ThreatModel, steps: int,
                        max_new_tokens: int = 16, batch_size: int = 8, seed: int = 0) -> dict:
    """Clean and robust VQA accuracy under APGD on the LM loss of the first reference answer.

    A sample counts as robust when both its clean and its adversarial answer are correct (per-sample
    minimum), so a failed attack never makes a wrong model look right.
    """
    scored = [s for s in samples if s.answers]
    if not scored:
        return {"robust_note": "no reference answers: robust accuracy not measured"}
    view = LlavaView(model, processor)
    generator = torch.Generator(device=view.device).manual_seed(seed)
    clean_scores, robust_scores = [], []
    for _, batch in tqdm(list(_batches(scored, batch_size)), desc=f"robust ({threat.describe()})", leave=False):
        pixels = to_pixels([s.image for s in batch], processor).to(view.device)
        questions = [s.question for s in batch]
        encoded = view.encode(questions, [s.answers[0] for s in batch]).to(view.device)
        objective = LanguageModelLoss(view, encoded.input_ids, encoded.attention_mask, encoded.labels)
        adversarial = apgd(objective, pixels, threat, steps, generator=generator).x_adv
        clean = view.generate(pixels, questions, max_new_tokens=max_new_tokens)
        attacked = view.generate(adversarial, questions, max_new_tokens=max_new_tokens)
        for sample, clean_answer, attacked_answer in zip(batch, clean, attacked):
            clean_score = vqa_soft_accuracy(clean_answer, sample.answers)
            clean_scores.append(clean_score)
            robust_scores.append(min(clean_score, vqa_soft_accuracy(attacked_answer, sample.answers)))
    return {"threat": threat.describe(), "attack": f"APGD {steps} steps on the reference answer's LM loss",
            "num_samples": len(scored), "vqa_accuracy_clean": sum(clean_scores) / len(scored),
            "vqa_accuracy_robust": sum(robust_scores) / len(scored)}
