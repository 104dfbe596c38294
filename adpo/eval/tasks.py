"""Evaluation tasks: what a sample is, which attack passes a task runs on it (VQA, captions, targeted output,
zero-shot classes), how an output is scored and when a sample counts as broken."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

from adpo.eval.config import EvalConfig
from adpo.eval.metrics import CaptionScorer, contains_target, exact_match, mean, normalize_answer, vqa_soft_accuracy


DEFAULT_MAX_NEW_TOKENS = {"vqa": 10, "caption": 30, "targeted": 30, "zeroshot": 0}


@dataclass
class Sample:
    """One evaluated item: an image, the prompt asked about it and its reference answers/captions."""

    id: str
    image: Any
    prompt: str
    references: list[str]
    label: int | None = None
    target_labels: list[int] = field(default_factory=list)  # zeroshot: classes for the targeted passes


@dataclass(frozen=True)
class AttackPass:
    """One attack of the ensemble: maximise the loss of ``text`` (untargeted) or pull toward it (targeted).

    ``early_stop``: the objective's success implies the sample is broken, so APGD may drop the sample as
    soon as it succeeds (otherwise it runs all steps and the decoded output decides).
    """

    key: str
    text: str | None = None
    targeted: bool = False
    early_stop: bool = True
    target_label: int | None = None


@dataclass
class Outcome:
    output: str
    scores: dict[str, float]
    x_adv: torch.Tensor | None = None  # on CPU; None for the clean image
    source: str = "clean"


# -- tasks ----------------------------------------------------------------------------------------------


class Task:
    """What to attack and how to score. Every metric is oriented so that higher is better for the model."""

    name: str
    metrics: tuple[str, ...]
    primary: str

    def passes(self, sample: Sample, clean_output: str | None = None) -> list[AttackPass]:
        """The attack passes for ``sample``; ``clean_output`` is the model's answer to the clean image, where known."""
        raise NotImplementedError

    def score(self, samples: Sequence[Sample], outputs: Sequence[str]) -> list[dict[str, float]]:
        raise NotImplementedError

    def aggregate(self, samples: Sequence[Sample], outputs: Sequence[str], scores: Sequence[dict[str, float]]) -> dict[str, float]:
        return {metric: mean([s[metric] for s in scores]) for metric in self.metrics}

    def broken(self, scores: dict[str, float]) -> bool:
        return scores[self.primary] <= 0.0

    def describe(self) -> str:
        raise NotImplementedError


class VQATask(Task):
    name = "vqa"

    def __init__(self, samples: Sequence[Sample], targets: Sequence[str]):
        several = any(len(s.references) > 1 for s in samples)
        # With several human answers per question the VQAv2 soft accuracy is the headline metric.
        self.metrics = ("soft_accuracy", "exact_match") if several else ("exact_match", "soft_accuracy")
        self.primary = self.metrics[0]
        self.targets = list(targets)

    def passes(self, sample: Sample, clean_output: str | None = None) -> list[AttackPass]:
        by_form = Counter(normalize_answer(r) for r in sample.references)
        # One untargeted pass per distinct answer, spelled as annotators most often spelled it, except the answer
        # the model gave on the clean image: the scorer counts "Red." as "red", so that pass attacks the model's own
        # spelling. Its labels then reproduce the clean greedy output, and the LM loss's success test (some label
        # token is not the greedy choice) cannot call the clean image broken.
        spelled = {}
        if clean_output is not None and normalize_answer(clean_output) in by_form:
            spelled[normalize_answer(clean_output)] = clean_output
        for reference in sample.references:
            spelled.setdefault(normalize_answer(reference), reference)
        distinct = [spelled[form] for form, _ in by_form.most_common()]
        passes = [AttackPass(f"answer#{i}", text, early_stop=len(distinct) == 1) for i, text in enumerate(distinct)]
        passes += [AttackPass(f"target:{t}", t, targeted=True) for t in self.targets if normalize_answer(t) not in by_form]
        return passes

    def score(self, samples, outputs):
        return [
            {"exact_match": exact_match(o, s.references), "soft_accuracy": vqa_soft_accuracy(o, s.references)}
            for s, o in zip(samples, outputs)
        ]

    def describe(self) -> str:
        targets = ", ".join(f"“{t}”" for t in self.targets) or "none"
        return (
            "VQA: untargeted APGD on the LM loss of each distinct reference answer in turn (most frequent first), then "
            f"targeted APGD toward {targets} (skipped where the target is a reference answer). Metrics: exact match "
            "after VQA answer normalisation, and VQAv2 soft accuracy (min(#matching humans / 3, 1) averaged over the "
            "leave-one-out subsets; equals exact match with one reference). A sample is broken when its "
            f"{self.primary} is 0."
        )


class CaptionTask(Task):
    name = "caption"
    metrics = ("cider", "bleu4", "rouge_l")
    primary = "cider"

    def __init__(self, samples: Sequence[Sample], break_threshold: float):
        self.scorer = CaptionScorer({s.id: s.references for s in samples})
        self.break_threshold = break_threshold

    def passes(self, sample: Sample, clean_output: str | None = None) -> list[AttackPass]:
        # "The caption differs from this reference" is true almost always, so APGD runs all its steps.
        return [AttackPass(f"caption#{i}", text, early_stop=False) for i, text in enumerate(sample.references)]

    def score(self, samples, outputs):
        predictions = {s.id: o for s, o in zip(samples, outputs)}
        cider, bleu, rouge = self.scorer.cider(predictions), self.scorer.bleu(predictions), self.scorer.rouge_l(predictions)
        return [{"cider": cider[s.id], "bleu4": bleu[s.id], "rouge_l": rouge[s.id]} for s in samples]

    def aggregate(self, samples, outputs, scores):
        aggregated = super().aggregate(samples, outputs, scores)
        # BLEU is a corpus statistic (n-gram counts pooled over samples), not a mean of sentence scores.
        aggregated["bleu4"] = self.scorer.corpus_bleu({s.id: o for s, o in zip(samples, outputs)})
        return aggregated

    def broken(self, scores):
        return scores["cider"] < self.break_threshold

    def describe(self) -> str:
        return (
            "Captioning: untargeted APGD on the LM loss of each reference caption in turn (all steps: no early stop "
            "inside APGD). Metric: CIDEr-D (pycocoevalcap's scorer, document frequencies from all references; a "
            "Java-free tokenizer: lower-case, punctuation removed), with corpus BLEU-4 and ROUGE-L of the same "
            f"outputs. The worst output is the lowest-CIDEr one; a sample with CIDEr < {self.break_threshold:g} "
            f"(= {100 * self.break_threshold:g} in papers' x100 units) is broken and no longer attacked."
        )


class TargetedTask(Task):
    name = "targeted"
    metrics = ("target_avoided",)
    primary = "target_avoided"

    def __init__(self, target: str):
        self.target = target

    def passes(self, sample: Sample, clean_output: str | None = None) -> list[AttackPass]:
        return [AttackPass("target", self.target, targeted=True)]

    def score(self, samples, outputs):
        return [{"target_avoided": 1.0 - contains_target(o, self.target)} for o in outputs]

    def describe(self) -> str:
        return (
            f"Targeted: APGD pulling the output toward “{self.target}” (early stop once greedy decoding produces it). "
            "The attack succeeds when the target occurs verbatim in the generated output; the table shows the "
            "share of samples where it does not (target_avoided = 1 − success rate)."
        )


class ZeroShotTask(Task):
    name = "zeroshot"
    metrics = ("accuracy",)
    primary = "accuracy"

    def __init__(self, class_names: Sequence[str], target_classes: int):
        self.class_names = list(class_names)
        self.target_classes = target_classes

    def passes(self, sample: Sample, clean_output: str | None = None) -> list[AttackPass]:
        passes = [AttackPass("ce")]
        passes += [AttackPass(f"target#{k}", targeted=True, target_label=t) for k, t in enumerate(sample.target_labels)]
        return passes

    def score(self, samples, outputs):
        return [{"accuracy": float(o == self.class_names[s.label])} for s, o in zip(samples, outputs)]

    def describe(self) -> str:
        return (
            "Zero-shot classification: APGD on the cross-entropy of the text-prompt classifier (cosine similarity × "
            f"logit scale), then targeted APGD (cross-entropy toward the class) for each of the {self.target_classes} "
            "highest-scoring wrong classes on the clean image (AutoAttack-style APGD-CE + APGD-T); early stop "
            "on misclassification. Metric: robust accuracy."
        )


# -- models ---------------------------------------------------------------------------------------------


def make_task(config: EvalConfig, samples: Sequence[Sample], class_names: Sequence[str] | None = None) -> Task:
    if config.task == "vqa":
        return VQATask(samples, config.vqa_targets)
    if config.task == "caption":
        return CaptionTask(samples, config.caption_break_threshold)
    if config.task == "targeted":
        return TargetedTask(config.target)
    if class_names is None:
        raise ValueError("zeroshot evaluation needs class names (a ClassLabel column or the world's classes).")
    return ZeroShotTask(class_names, config.zeroshot_target_classes)
