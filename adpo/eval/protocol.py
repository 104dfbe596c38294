"""The robustness evaluation protocol: clean pass, an ensemble of APGD passes, per-sample worst case.

The epsilons run from the smallest up, and each sample starts from its worst output at the next smaller
epsilon (the clean output at the smallest): the balls are nested, so an image found there lies in this ball
too, and a sample broken there is broken here without another attack. The attack then runs in *stages* (the
precision schedule, by default half precision then fp32); each stage runs every *attack pass* of the
task (one untargeted pass per reference answer or caption, plus the task's targeted passes) on the
samples that are not yet broken, in batches, with per-sample early stopping inside APGD wherever the
objective's success implies the sample is broken; such early-stopping passes run side by side (one batch
row per sample and pass, a sample's rows leaving together once one breaks it). After each pass the
adversarial images are decoded (greedy generation, or the zero-shot classifier) and scored; per sample
the worst output so far is kept and samples that are broken leave the protocol. Later stages warm-start
from the worst perturbation found so far. The reported robust score of a sample is the worst over its
clean image (which lies in the threat set) and every attack output.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from tqdm.auto import tqdm

from adpo.attacks import apgd
from adpo.eval.config import EvalConfig
from adpo.eval.metrics import CaptionScorer, contains_target, exact_match, mean, normalize_answer, vqa_soft_accuracy
from adpo.io import atomic_file
from adpo.threat import ThreatModel, parse_eps

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
                 logit_scale: float, modules: Sequence[torch.nn.Module], device: torch.device):
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


def precision_context(precision: str, device: torch.device):
    """Autocast for an attack stage. "half" is fp16 autocast on GPUs and fp32 on CPUs: CPU autocast has no fp16,
    and bf16 autocast made the batched attack 1.9x slower than fp32 on a 2-core AVX512-bf16 CPU, defeating the
    cheap first stage's purpose ("bfloat16" asks for it explicitly)."""
    if precision == "float32" or (precision == "half" and device.type == "cpu"):
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bfloat16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def _batches(indices: Sequence[int], size: int):
    for start in range(0, len(indices), size):
        yield list(indices[start:start + size])


@dataclass
class AttackRun:
    """Per-sample results of the attack at one epsilon."""

    worst: list[Outcome | None]  # worst attack output per sample (None: never attacked)
    steps: list[int]  # per sample, the gradient steps its attack took (every pass and stage)
    attacked: int
    seconds: float

    @property
    def gradient_steps(self) -> int:
        return sum(self.steps)


def attack_ensemble(
    model,
    task: Task,
    samples: Sequence[Sample],
    pixels: torch.Tensor,
    clean: Sequence[Outcome],
    threat: ThreatModel,
    steps: int,
    precision_schedule: Sequence[str],
    batch_size: int,
    generator: torch.Generator | None = None,
    progress: bool = False,
    carried: Sequence[Outcome | None] | None = None,
) -> AttackRun:
    """Run every attack pass of ``task`` in every precision stage on the samples that are not yet broken.

    ``carried``: per sample, the worst attack output found at a smaller epsilon of the same norm. Its image
    lies in this ball too, so it starts as the sample's worst here, and a sample it breaks is not attacked again.

    Passes whose success does not imply a broken sample (captions; one of several VQA answers) run one after
    another, each decoded and scored before the next. The others (early-stopping passes) run side by side:
    one row per (sample, pass), a sample's rows in one batch where ``batch_size`` rows allow, and a sample's
    rows stop together once one of them breaks it. Each unbroken sample still gets every pass's full steps;
    the batch just no longer waits for one pass to finish before the next starts.
    """
    start = time.perf_counter()
    passes = [{p.key: p for p in task.passes(s, c.output)} for s, c in zip(samples, clean)]
    keys = list(dict.fromkeys(key for per_sample in passes for key in per_sample))
    one_by_one = [k for k in keys if any(k in p and not p[k].early_stop for p in passes)]
    side_by_side = any(p.early_stop for per_sample in passes for p in per_sample.values())
    worst: list[Outcome | None] = list(carried) if carried is not None else [None] * len(samples)
    if len(worst) != len(samples):
        raise ValueError(f"carried has {len(worst)} outcomes for {len(samples)} samples")
    broken = [task.broken(c.scores) or (w is not None and task.broken(w.scores)) for c, w in zip(clean, worst)]
    attacked = [False] * len(samples)
    sample_steps = [0] * len(samples)
    device = model.device
    label = eps_label(threat.eps)
    bar = tqdm(total=len(precision_schedule) * (len(one_by_one) + side_by_side), desc=f"attack ε={label}",
               disable=None if progress else True, leave=False)  # None: quiet when not a TTY

    def run(rows: list[tuple[int, str]], stage: int, precision: str, early_stop: bool) -> None:
        rows = [(i, key) for i, key in rows if not broken[i]]  # an earlier chunk may have broken the sample
        if not rows:
            return
        index = [i for i, _ in rows]
        x = pixels[index].to(device)
        init = None
        if stage > 0:
            # Warm start from the worst perturbation so far (a fresh random start where there is none).
            init = threat.random_init(x, generator)
            for row, i in enumerate(index):
                if worst[i] is not None:
                    init[row] = worst[i].x_adv.to(device)
        objective = model.objective([samples[i] for i in index], [passes[i][key] for i, key in rows])
        groups = torch.tensor(index) if early_stop else None
        with precision_context(precision, device):
            result = apgd(objective, x, threat, steps, init=init, early_stop=early_stop, groups=groups, generator=generator)
        for row, i in enumerate(index):
            attacked[i] = True
            sample_steps[i] += int(result.steps_run[row])
        # A row stopped because another pass broke its sample need not be decoded.
        decode = [r for r in range(len(rows)) if not early_stop or bool(result.success[r]) or int(result.steps_run[r]) >= steps]
        decoded_samples = [samples[index[r]] for r in decode]
        outputs = model.predict(result.x_adv[decode], decoded_samples) if decode else []
        for r, output, scores in zip(decode, outputs, task.score(decoded_samples, outputs)):
            i, key = rows[r]
            if worst[i] is None or scores[task.primary] < worst[i].scores[task.primary]:
                worst[i] = Outcome(output, scores, result.x_adv[r].detach().cpu(), f"{key}@{precision} ε={label}")
            broken[i] = task.broken(worst[i].scores)

    for stage, precision in enumerate(precision_schedule):
        for key in one_by_one:
            todo = [(i, key) for i in range(len(samples)) if key in passes[i] and not passes[i][key].early_stop and not broken[i]]
            for chunk in _batches(todo, batch_size):
                run(chunk, stage, precision, early_stop=False)
            bar.update(1)
        if side_by_side:
            todo = [(i, key) for i in range(len(samples)) if not broken[i] for key in keys if key in passes[i] and passes[i][key].early_stop]
            for chunk in _pack_by_sample(todo, batch_size):
                run(chunk, stage, precision, early_stop=True)
            bar.update(1)
    bar.close()
    return AttackRun(worst, sample_steps, sum(attacked), time.perf_counter() - start)


def _pack_by_sample(rows: Sequence[tuple[int, str]], size: int) -> list[list[tuple[int, str]]]:
    """Chunks of at most ``size`` (sample, pass) rows, keeping a sample's rows together where they fit; a sample
    with more rows than ``size`` gets consecutive chunks of its own, which run in turn (batch size 1: one pass
    after another, the per-sample loop of the reference code)."""
    chunks: list[list[tuple[int, str]]] = []
    current: list[tuple[int, str]] = []
    for _, group in itertools.groupby(rows, key=lambda row: row[0]):
        mine = list(group)
        if current and len(current) + len(mine) > size:
            chunks.append(current)
            current = []
        while len(mine) > size:
            chunks.append(mine[:size])
            mine = mine[size:]
        current += mine
        if len(current) == size:
            chunks.append(current)
            current = []
    if current:
        chunks.append(current)
    return chunks


def robust_outcomes(task: Task, clean: Sequence[Outcome], run: AttackRun) -> list[Outcome]:
    """Per sample, the worst of the clean output and every attack output (the clean image is in the ball)."""
    final = []
    for clean_outcome, attack in zip(clean, run.worst):
        if attack is not None and attack.scores[task.primary] <= clean_outcome.scores[task.primary]:
            final.append(attack)
        else:
            final.append(clean_outcome)
    return final


def predict_in_batches(model, pixels: torch.Tensor, samples: Sequence[Sample], batch_size: int, progress: bool = False) -> list[str]:
    outputs: list[str] = []
    chunks = list(_batches(list(range(len(samples))), batch_size))
    for chunk in tqdm(chunks, desc="clean pass", disable=None if progress else True, leave=False):
        outputs += model.predict(pixels[chunk].to(model.device), [samples[i] for i in chunk])
    return outputs


# -- the whole protocol ---------------------------------------------------------------------------------


def eps_label(eps: float) -> str:
    """How reports name an epsilon: in 255ths where it is a whole number of hundredths of them ("4/255"), else as is."""
    in_255ths = round(eps * 255, 2)
    return f"{in_255ths:g}/255" if math.isclose(eps * 255, in_255ths, abs_tol=1e-4) else f"{eps:.4g}"


def resolve_eps(values: Sequence[str]) -> list[tuple[float, str]]:
    """(epsilon, label) pairs sorted by epsilon; "world" is the bundled world's working epsilon."""
    return sorted({(eps, eps_label(eps)) for eps in map(parse_eps, values)})


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


def protocol_summary(config: EvalConfig, task: Task, eps: Sequence[tuple[float, str]], samples: Sequence[Sample]) -> dict:
    schedule = " → ".join(config.precision_schedule)
    text = "\n".join(
        [
            f"- Threat model: {config.attack_norm} ball, ε ∈ {{{', '.join(label for _, label in eps)}}}, pixel space [0, 1] "
            "(normalisation inside the model), random start in the ball.",
            f"- Clean pass: greedy decoding, max {config.max_new_tokens or DEFAULT_MAX_NEW_TOKENS[config.task]} new tokens."
            if config.task != "zeroshot" else "- Clean pass: zero-shot prediction of every sample.",
            f"- {task.describe()}",
            f"- Attack: APGD (Croce & Hein 2020), {config.attack_steps} steps per pass, batched ({config.batch_size} rows "
            "of sample × pass) with per-sample early stop where success implies a broken sample; such passes run side "
            "by side, a sample's rows leaving the batch together once one of them breaks it.",
            f"- Precision schedule: {schedule}; every stage runs all passes on the samples not yet broken; each "
            "stage after the first warm-starts from the worst perturbation found so far (\"half\" = fp16 autocast "
            "on GPU, float32 on CPU).",
            "- Per sample, the reported robust output is the worst (lowest score) over the clean image and every "
            "attack output; samples already broken on the clean image or by an earlier pass are not attacked again.",
            "- The ε values run from the smallest up and the balls are nested: each sample's worst output at one ε is "
            "also an output at every larger ε, so a sample broken there is counted broken here without a new attack.",
            f"- Step check: the largest ε is re-run with {config.step_check_steps} steps; more steps must not leave a "
            "higher robust score." if config.step_check_steps else "- Step check: disabled.",
            f"- Seed {config.seed}.",
        ]
    )
    return {
        "summary": text,
        "attack": "apgd",
        "norm": config.attack_norm,
        "steps": config.attack_steps,
        "precision_schedule": list(config.precision_schedule),
        "batch_size": config.batch_size,
        "passes": sorted({p.key for sample in samples for p in task.passes(sample)}),
        "break_rule": f"{task.primary} <= 0" if config.task != "caption" else f"cider < {config.caption_break_threshold}",
    }


def run_protocol(
    config: EvalConfig,
    model,
    samples: list[Sample],
    pixels: torch.Tensor,
    class_names: Sequence[str] | None = None,
    out_dir: str | Path | None = None,
    write: bool = True,
) -> dict:
    """Evaluate ``model`` (a :class:`GenerativeModel` or :class:`ZeroShotModel`) and build the report dict.

    ``pixels`` are the samples' images in [0, 1] at the model's resolution (``adpo.preprocess.to_pixels``).
    With ``write`` the report (JSON, Markdown, plots, example images) goes to ``out_dir`` (default
    ``config.output_dir``).
    """
    from adpo.eval.report import REPORT_FORMAT, REPORT_VERSION, write_report

    if len(samples) != pixels.shape[0]:
        raise ValueError(f"got {len(samples)} samples but {pixels.shape[0]} images")
    started = time.perf_counter()
    task = make_task(config, samples, class_names)
    eps_list = resolve_eps(config.attack_eps)
    progress = config.progress

    clean_outputs = predict_in_batches(model, pixels, samples, config.batch_size, progress)
    clean = [Outcome(o, s) for o, s in zip(clean_outputs, task.score(samples, clean_outputs))]
    if isinstance(task, ZeroShotTask):
        _choose_target_classes(model, pixels, samples, config)

    rows, runs = [], {}
    carried = None  # the ε-balls are nested: what breaks a sample at one ε breaks it at every larger ε
    for index, (eps, label) in enumerate(eps_list):
        threat = ThreatModel(norm=config.attack_norm, eps=eps)
        generator = torch.Generator(device=model.device).manual_seed(config.seed * 1000 + index)
        run = attack_ensemble(model, task, samples, pixels, clean, threat, config.attack_steps, config.precision_schedule,
                              config.batch_size, generator, progress, carried=carried)
        carried = run.worst
        final = robust_outcomes(task, clean, run)
        attack_only = [w if w is not None else c for w, c in zip(run.worst, clean)]
        runs[label] = (run, final)
        rows.append({
            "eps": eps,
            "eps_label": label,
            "steps": config.attack_steps,
            "metrics": task.aggregate(samples, [o.output for o in final], [o.scores for o in final]),
            "attack_only_metrics": task.aggregate(samples, [o.output for o in attack_only], [o.scores for o in attack_only]),
            "num_attacked": run.attacked,
            "gradient_steps": run.gradient_steps,
            "seconds": run.seconds,
        })

    step_check = None
    if config.step_check_steps:
        eps, label = eps_list[-1]
        generator = torch.Generator(device=model.device).manual_seed(config.seed * 1000 + 999)
        # Start where the main run at the largest ε started: from the next smaller ε's worst outputs.
        below = runs[eps_list[-2][1]][0].worst if len(eps_list) > 1 else None
        run = attack_ensemble(model, task, samples, pixels, clean, ThreatModel(norm=config.attack_norm, eps=eps), config.step_check_steps,
                              config.precision_schedule, config.batch_size, generator, progress, carried=below)
        final = robust_outcomes(task, clean, run)
        step_check = {
            "eps_label": label,
            "steps": config.step_check_steps,
            "metrics": task.aggregate(samples, [o.output for o in final], [o.scores for o in final]),
            "per_sample": {s.id: o.scores[task.primary] for s, o in zip(samples, final)},
        }

    report = {
        "format": REPORT_FORMAT,
        "version": REPORT_VERSION,
        "name": config.name or config.model,
        "model": config.model,
        "encoder": config.encoder,
        "task": task.name,
        "primary_metric": task.primary,
        "metrics": list(task.metrics),
        "num_samples": len(samples),
        "protocol": protocol_summary(config, task, eps_list, samples),
        "config": config.to_dict(),
        "clean": task.aggregate(samples, clean_outputs, [c.scores for c in clean]),
        "robust": rows,
        "step_check": step_check,
        "samples": [
            {
                "id": sample.id,
                "prompt": sample.prompt,
                "references": sample.references,
                **({"label": sample.label} if sample.label is not None else {}),
                "clean": {"output": c.output, "scores": c.scores, "broken": task.broken(c.scores)},
                "robust": {
                    label: {
                        "output": final[i].output,
                        "scores": final[i].scores,
                        "broken": task.broken(final[i].scores),
                        "attack_only_scores": run.worst[i].scores if run.worst[i] is not None else None,
                        "source": final[i].source,
                        "attacked": run.worst[i] is not None,
                        "steps": run.steps[i],
                    }
                    for label, (run, final) in runs.items()
                },
            }
            for i, (sample, c) in enumerate(zip(samples, clean))
        ],
        "examples": [],
        "timing": {"seconds": 0.0, "device": str(model.device)},
    }
    out_dir = Path(out_dir or config.output_dir)
    if write and config.num_examples:
        report["examples"] = _save_examples(samples, pixels, clean, runs[eps_list[-1][1]], eps_list[-1][1], task, config.num_examples, out_dir)
    report["timing"]["seconds"] = time.perf_counter() - started
    if write:
        write_report(report, out_dir)
    else:
        from adpo.eval.report import sanity_checks

        report["sanity"] = sanity_checks(report)
    return report


def _choose_target_classes(model: ZeroShotModel, pixels: torch.Tensor, samples: Sequence[Sample], config: EvalConfig) -> None:
    """Targets for APGD-T: the highest-scoring wrong classes on each clean image."""
    for chunk in _batches(list(range(len(samples))), config.batch_size):
        logits = model.logits(pixels[chunk])
        for row, i in enumerate(chunk):
            ranking = [c for c in logits[row].argsort(descending=True).tolist() if c != samples[i].label]
            samples[i].target_labels = ranking[: config.zeroshot_target_classes]


def _save_examples(samples, pixels, clean, run_and_final, label, task, count, out_dir: Path) -> list[dict]:
    """Lossless PNGs of clean and adversarial images for the samples whose output the attack changed most."""
    from adpo.preprocess import to_uint8_images

    run, final = run_and_final
    changed = [i for i, outcome in enumerate(final) if outcome.x_adv is not None and outcome.output != clean[i].output]
    # Broken samples first, then by how far the score fell.
    changed.sort(key=lambda i: (not task.broken(final[i].scores), final[i].scores[task.primary] - clean[i].scores[task.primary]))
    examples = []
    safe_label = label.replace("/", "-")
    for i in changed[:count]:
        clean_image, adversarial_image = to_uint8_images(torch.stack([pixels[i].float().cpu(), final[i].x_adv.float()]))
        folder = out_dir / "examples"
        folder.mkdir(parents=True, exist_ok=True)
        stem = "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in samples[i].id)
        clean_path, adversarial_path = folder / f"{stem}_clean.png", folder / f"{stem}_{safe_label}.png"
        _save_png(clean_image, clean_path)
        _save_png(adversarial_image, adversarial_path)
        examples.append({
            "id": samples[i].id,
            "eps_label": label,
            "clean_image": str(clean_path.relative_to(out_dir)),
            "adversarial_image": str(adversarial_path.relative_to(out_dir)),
            "prompt": samples[i].prompt,
            "clean_output": clean[i].output,
            "adversarial_output": final[i].output,
        })
    return examples


def _save_png(image, path: Path) -> None:
    with atomic_file(path) as temporary:
        image.save(temporary, format="PNG")
