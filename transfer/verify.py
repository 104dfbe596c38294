"""Verification of a graft on a sample of images.

* Tower agreement: cosine between the donor encoder's and the grafted tower's embeddings (pooled CLS
  and the features the LLM reads) on the same images — close to 1 unless a fix changed the input
  (position interpolation changes the resolution, so only the pooled embedding is compared then).
* Answer agreement: greedy answers of the original target vs the grafted model, and VQA accuracy of
  both when reference answers exist.
* Feature shift: how far a feature-space attack in an ℓp ball moves what the target's LLM reads (the
  projector's output), before and after the graft. A robust encoder transfers only by holding its
  features still; one that leaves the shift where the original had it gives the target nothing to inherit.
* Optional robust accuracy: APGD on the LM loss of the reference answer in an ℓp ball, then VQA
  accuracy of the answer to the adversarial image.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Sequence

import torch
from tqdm.auto import tqdm

from adpo.attacks import pgd
from adpo.eval.ensemble import eps_label
from adpo.eval.metrics import normalize_answer, vqa_soft_accuracy
from adpo.lvlm import LlavaView
from adpo.objectives import EmbeddingDistance
from adpo.preprocess import image_processor_of, to_pixels
from adpo.sources import open_source
from adpo.threat import ThreatModel, parse_eps
from adpo.tower import VisionTower, cosine_similarity, find_projector

DEFAULT_QUESTION = "What is in the image?"


@dataclass
class Sample:
    image: Any  # anything adpo.preprocess.load_rgb accepts
    question: str
    answers: list[str] | None = None  # reference answers (VQA accuracy, robust accuracy)
    caption: str | None = None  # for projector re-alignment


def load_samples(spec: str, n: int, caption_column: str | None = None, question_column: str | None = None,
                 answers_column: str | None = None, question_suffix: str = "") -> list[Sample]:
    """Up to ``n`` samples from an image source spec (see :func:`adpo.sources.open_source`: a plugin's data, a
    saved HF dataset, an image folder, a COCO captions file). Image i asks its (i mod k)-th question plus
    ``question_suffix`` (with its reference answers) when the source has questions, else :data:`DEFAULT_QUESTION`;
    unreadable images are skipped. A saved HF dataset's columns are named as in ``adpo eval``: ``question_column``
    (one question per row), ``answers_column`` (a list, VQAv2's answer dicts, or one string) and
    ``caption_column`` (COCO files and the world have captions)."""
    samples = []
    named = {"caption_column": caption_column, "question_column": question_column, "answers_column": answers_column}
    columns = {key: value for key, value in named.items() if value}
    for index, record in enumerate(open_source(spec, n=n, **columns)):
        if record.image is None:
            continue
        pick = index % len(record.questions) if record.questions else 0
        question = record.questions[pick] + question_suffix if record.questions else DEFAULT_QUESTION
        answers = None
        if record.questions and len(record.answers) == len(record.questions):
            answers = record.answers[pick]
            answers = list(answers) if isinstance(answers, (list, tuple)) else [answers]
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
                    target_processor: Any, batch_size: int = 16, pad_to_square: bool = False) -> dict:
    """Per-image cosine of pooled and LLM-feature embeddings, donor vs grafted tower (mean and min)."""
    pooled, features = [], []
    same_resolution = donor_tower.image_size == grafted_tower.image_size
    for _, batch in tqdm(list(_batches(images, batch_size)), desc="tower agreement", leave=False):
        target_pixels = to_pixels(batch, target_processor, pad_to_square=pad_to_square)
        donor_pixels = target_pixels if same_resolution else to_pixels(batch, donor_processor, pad_to_square=pad_to_square)
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


def feature_shift(model: Any, processor: Any, images: Sequence[Any], eps: str, steps: int = 10, norm: str = "linf",
                  batch_size: int = 8, seed: int = 0, pad_to_square: bool = False) -> dict:
    """How far a feature-space attack moves what ``model``'s LLM reads: PGD on the FARE objective, with the
    projector's output P(φ(x)) on the clean image as the reference, then ‖P(φ(x')) − P(φ(x))‖ / ‖P(φ(x))‖ per
    image (mean and max). Measured on the target before and after a graft, with the target's projector both times."""
    tower = VisionTower.from_lvlm(model, processor)
    projector = find_projector(model)
    device = next(tower.encoder.parameters()).device
    projector_device = next(projector.parameters()).device  # differs when a device map splits the model
    threat = ThreatModel(norm=norm, eps=parse_eps(eps))
    generator = torch.Generator(device=device).manual_seed(seed)

    def llm_input(pixels: torch.Tensor) -> torch.Tensor:
        return projector(tower.features(pixels).to(projector_device))

    shifts = []
    for _, batch in tqdm(list(_batches(images, batch_size)), desc="feature shift", leave=False):
        pixels = to_pixels(batch, processor, pad_to_square=pad_to_square).to(device)
        with torch.no_grad():
            clean = llm_input(pixels)
        objective = EmbeddingDistance(llm_input, clean, modules=[tower, projector])
        x_adv = pgd(objective, pixels, threat, steps, generator=generator).x_adv
        with torch.no_grad():
            moved = llm_input(x_adv)
        shifts.append(((moved - clean).float().flatten(1).norm(dim=1) / clean.float().flatten(1).norm(dim=1)).cpu())
    shift = torch.cat(shifts)
    return {"feature_shift_threat": f"{norm} eps={eps_label(threat.eps)}, PGD {steps} steps on the projector's output",
            "feature_shift_mean": shift.mean().item(), "feature_shift_max": shift.max().item()}


def generate_answers(model: Any, processor: Any, samples: Sequence[Sample], max_new_tokens: int = 16,
                     batch_size: int = 8, desc: str = "answers", pad_to_square: bool = False) -> list[str]:
    """Greedy answers of ``model`` to each sample's question."""
    view = LlavaView(model, processor)
    answers: list[str] = []
    for _, batch in tqdm(list(_batches(samples, batch_size)), desc=desc, leave=False):
        pixels = to_pixels([s.image for s in batch], processor, pad_to_square=pad_to_square)
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


def robust_vqa_accuracy(model: Any, processor: Any, samples: Sequence[Sample], eps: str, steps: int, norm: str = "linf",
                        max_new_tokens: int = 16, batch_size: int = 8, seed: int = 0, pad_to_square: bool = False) -> dict:
    """Clean and robust VQA accuracy by the evaluation protocol of :mod:`adpo.eval.protocol`, as a quick check:
    one ε, untargeted APGD on each reference answer's LM loss, one fp32 stage, no step check. For the full
    protocol run ``adpo eval`` on the saved directory."""
    from adpo.eval.config import EvalConfig
    from adpo.eval.adapters import GenerativeModel
    from adpo.eval.protocol import run_protocol
    from adpo.eval.tasks import Sample as EvalSample

    scored = [s for s in samples if s.answers]
    if not scored:
        return {"robust_note": "no reference answers: robust accuracy not measured"}
    config = EvalConfig(model="in-memory graft", task="vqa", num_samples=len(scored), attack_eps=[eps], attack_norm=norm,
                        attack_steps=steps,
                        precision_schedule=["float32"], vqa_targets=[], step_check_steps=0, batch_size=batch_size,
                        seed=seed, num_examples=0, progress=False, max_new_tokens=max_new_tokens)
    eval_samples = [EvalSample(str(i), None, s.question, list(s.answers)) for i, s in enumerate(scored)]
    pixels = to_pixels([s.image for s in scored], processor, pad_to_square=pad_to_square)
    report = run_protocol(config, GenerativeModel(LlavaView(model, processor), max_new_tokens), eval_samples, pixels, write=False)
    row = report["robust"][0]
    metric = report["primary_metric"]
    return {"threat": f"{norm} eps={row['eps_label']}", "attack": f"APGD {steps} steps per reference answer (adpo eval protocol)",
            "num_samples": len(scored), "vqa_accuracy_clean": report["clean"][metric],
            "vqa_accuracy_robust": row["metrics"][metric]}
