"""The robustness evaluation protocol, its driver: clean pass, an ensemble of APGD passes, per-sample worst case, and
the report's summary. Its pieces live beside it: the tasks (:mod:`adpo.eval.tasks`), the model adapters
(:mod:`adpo.eval.adapters`), the attack ensemble (:mod:`adpo.eval.ensemble`) and the example images
(:mod:`adpo.eval.examples`).

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

import time
from pathlib import Path
from typing import Sequence

import torch

from adpo.eval.adapters import ZeroShotModel, index_batches, predict_in_batches
from adpo.eval.config import EvalConfig
from adpo.eval.ensemble import attack_ensemble, eps_label, robust_outcomes
from adpo.eval.examples import save_examples
from adpo.eval.tasks import DEFAULT_MAX_NEW_TOKENS, Outcome, Sample, Task, ZeroShotTask, make_task
from adpo.threat import ThreatModel, parse_eps


def resolve_eps(values: Sequence[str]) -> list[tuple[float, str]]:
    """(epsilon, label) pairs sorted by epsilon; a plugin's named radius is read as its value."""
    return sorted({(eps, eps_label(eps)) for eps in map(parse_eps, values)})


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

    multimodal = None
    if config.task == "zeroshot" and config.attack_modalities != ["image"]:
        from adpo.eval.multimodal import multimodal_attacks

        multimodal = multimodal_attacks(config, model, samples, pixels, clean, runs)

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
        **({"multimodal": multimodal} if multimodal is not None else {}),
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
        report["examples"] = save_examples(samples, pixels, clean, runs[eps_list[-1][1]], eps_list[-1][1], task, config.num_examples, out_dir)
    report["timing"]["seconds"] = time.perf_counter() - started
    if write:
        write_report(report, out_dir)
    else:
        from adpo.eval.report import sanity_checks

        report["sanity"] = sanity_checks(report)
    return report


def _choose_target_classes(model: ZeroShotModel, pixels: torch.Tensor, samples: Sequence[Sample], config: EvalConfig) -> None:
    """Targets for APGD-T: the highest-scoring wrong classes on each clean image."""
    for chunk in index_batches(list(range(len(samples))), config.batch_size):
        logits = model.logits(pixels[chunk])
        for row, i in enumerate(chunk):
            ranking = [c for c in logits[row].argsort(descending=True).tolist() if c != samples[i].label]
            samples[i].target_labels = ranking[: config.zeroshot_target_classes]
