"""Evaluation reports: JSON for machines, Markdown for people, PNG plots, sanity checks, comparisons.

A report is a plain JSON-serialisable dict (``REPORT_FORMAT``, version 1)::

    {
      "format": "adpo-eval-report", "version": 1,
      "name": "undefended", "model": "llava-hf/llava-1.5-7b-hf", "task": "vqa",
      "primary_metric": "exact_match", "metrics": ["exact_match", "soft_accuracy"],
      "num_samples": 64,
      "protocol": {"summary": "<markdown>", ...parameters},
      "config": {...},                              # the EvalConfig that produced it
      "clean": {"exact_match": 0.81, ...},          # aggregate, in [0, 1] (CIDEr in pycocoevalcap units)
      "robust": [{"eps": 0.0157, "eps_label": "4/255", "steps": 100,
                  "metrics": {...}, "attack_only_metrics": {...}, "num_attacked": 52,
                  "gradient_steps": 4210, "seconds": 12.3}],
                                                    # num_attacked: attacked at this ε (not broken at a smaller one)
      "step_check": null | {"eps_label": "4/255", "steps": 10, "metrics": {...}, "per_sample": {id: score}},
      "samples": [{"id": "...", "prompt": "...", "references": [...],
                   "clean": {"output": "...", "scores": {...}, "broken": false},
                   "robust": {"4/255": {"output": "...", "scores": {...}, "broken": true,
                                        "attack_only_scores": {...} | null,
                                        "source": "clean" | "<pass>@<precision> ε=<where found>",
                                        "attacked": true, "steps": 37}}}],
                                                    # steps: gradient steps the sample's attack took at this ε
      "examples": [{"id": "...", "eps_label": "4/255", "clean_image": "examples/x_clean.png",
                    "adversarial_image": "examples/x_4-255.png", "prompt": "...",
                    "clean_output": "...", "adversarial_output": "..."}],
      "sanity": [{"check": "...", "status": "pass" | "warn" | "fail", "detail": "..."}],
      "timing": {"seconds": 81.2, "device": "cpu"}
    }

Every metric is oriented so that higher is better for the model (for the targeted task the metric is
``target_avoided`` = 1 - attack success); the Markdown shows the attack success rate as well.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from pathlib import Path

from adpo.errors import UsageError
from adpo.io import write_text_atomic

REPORT_FORMAT = "adpo-eval-report"
REPORT_VERSION = 1
REPORT_JSON = "report.json"
REPORT_MARKDOWN = "report.md"
PLOT_METRIC_VS_EPS = "metric_vs_eps.png"
PLOT_EXAMPLES = "examples.png"

METRIC_LABELS = {
    "exact_match": "VQA accuracy (exact match, %)",
    "soft_accuracy": "VQA soft accuracy (%)",
    "cider": "CIDEr (×100)",
    "bleu4": "BLEU-4 (%)",
    "rouge_l": "ROUGE-L (%)",
    "accuracy": "zero-shot accuracy (%)",
    "target_avoided": "target string avoided (%)",
}


# Stored metrics lie in [0, 1] (CIDEr in pycocoevalcap units); papers print them x 100 (percent, CIDEr x 100).
DISPLAY_SCALE = 100.0


def report_label(report: dict) -> str:
    """A report's row label: its name, or the model when it has none."""
    return report.get("name") or report["model"]


def format_metric(value: float | None) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    return f"{value * DISPLAY_SCALE:.1f}"


# -- Sanity checks --------------------------------------------------------------------------------------


def _check(name: str, status: str, detail: str) -> dict:
    return {"check": name, "status": status, "detail": detail}


def _ids(ids: Sequence[str], limit: int = 5) -> str:
    shown = ", ".join(map(str, ids[:limit]))
    return shown + (f" (+{len(ids) - limit} more)" if len(ids) > limit else "")


def sanity_checks(report: dict) -> list[dict]:
    """The checks that catch a weak or masked attack; each is pass, warn (suspicious) or fail (a bug).

    1. Per sample, robust <= clean. The reported robust score is the worst over the clean image and
       every attack output (the clean image is inside the threat set), so a violation is a bookkeeping
       bug (fail). An attack output that scored *above* the clean output is reported as a warning: the
       attack moved the answer the wrong way.
    2. Robust score non-increasing in epsilon (aggregate, clean counted as epsilon 0): a larger budget
       contains the smaller ball, so a rise means the attack is too weak at the larger epsilon (warn).
    3. More steps never raise robust accuracy: the run with fewer steps (``step_check``) must not end
       *below* the full run on the same samples; if it does the full attack is being masked (warn).
    4. The attack took at least one gradient step on every sample it had to break (one not broken on the
       clean image nor by the output carried from the next smaller epsilon) and left unbroken. Zero steps
       there means the objective called the sample broken at its start point while its decoded output was
       not, so its robust score is the clean score by default (fail). A sample that the random start
       itself broke needs no step.
    """
    metric = report["primary_metric"]
    checks = []

    violations, attack_above_clean = [], []
    for sample in report["samples"]:
        clean = sample["clean"]["scores"][metric]
        for label, robust in sample["robust"].items():
            if robust["scores"][metric] > clean + 1e-9:
                violations.append(f"{sample['id']}@{label}")
            attack_only = robust.get("attack_only_scores")
            if attack_only is not None and attack_only[metric] > clean + 1e-9:
                attack_above_clean.append(f"{sample['id']}@{label}")
    if violations:
        checks.append(_check("robust_le_clean", "fail", f"robust > clean for {len(violations)} sample(s): {_ids(violations)}"))
    elif attack_above_clean:
        checks.append(
            _check(
                "robust_le_clean",
                "warn",
                f"robust <= clean holds, but for {len(attack_above_clean)} attacked sample(s) every attack output "
                f"scored above the clean output (clean kept as worst case): {_ids(attack_above_clean)}",
            )
        )
    else:
        checks.append(_check("robust_le_clean", "pass", "every sample's robust score <= its clean score"))

    curve = [(0.0, "clean", report["clean"][metric])] + sorted(
        (row["eps"], row["eps_label"], row["metrics"][metric]) for row in report["robust"]
    )
    rises = [f"{a[1]} -> {b[1]} ({format_metric(a[2])} -> {format_metric(b[2])})" for a, b in zip(curve, curve[1:]) if b[2] > a[2] + 1e-9]
    checks.append(
        # Every output found at one ε is carried to the larger ones (nested balls), so a rise is a bookkeeping bug.
        _check("monotone_in_eps", "fail", "robust score rises with epsilon: " + "; ".join(rises))
        if rises
        else _check("monotone_in_eps", "pass", "robust score non-increasing in epsilon")
    )

    step_check = report.get("step_check")
    if step_check:
        full = next(row for row in report["robust"] if row["eps_label"] == step_check["eps_label"])
        few, many = step_check["metrics"][metric], full["metrics"][metric]
        detail = (
            f"at ε={step_check['eps_label']}: {step_check['steps']} steps -> {format_metric(few)}, "
            f"{full['steps']} steps -> {format_metric(many)}"
        )
        if many > few + 1e-9:
            checks.append(_check("more_steps_not_weaker", "warn", "more steps gave HIGHER robust score (gradient masking?) " + detail))
        else:
            checks.append(_check("more_steps_not_weaker", "pass", detail))
    else:
        checks.append(_check("more_steps_not_weaker", "warn", "not run (step_check_steps disabled in the config)"))

    labels = [row["eps_label"] for row in sorted(report["robust"], key=lambda row: row["eps"])]
    unattacked = []
    for sample in report["samples"]:
        broken_before = sample["clean"]["broken"]
        for label in labels:
            robust = sample["robust"][label]
            if not broken_before and not robust["broken"] and robust["steps"] == 0:
                unattacked.append(f"{sample['id']}@{label}")
            broken_before = robust["broken"]
    checks.append(
        _check("attack_took_steps", "fail",
               f"no gradient step on {len(unattacked)} sample(s) that were not broken before the attack and are not after "
               f"it (the objective called them broken at its start point, their decoded output disagreed): {_ids(unattacked)}")
        if unattacked
        else _check("attack_took_steps", "pass", "every sample the attack left unbroken took at least one gradient step")
    )
    return checks


# -- Rendering ------------------------------------------------------------------------------------------

_STATUS_MARK = {"pass": "PASS", "warn": "WARN", "fail": "FAIL"}


def results_table(reports: Sequence[dict], metric: str | None = None) -> str:
    """Paper-style Markdown table: one row per report, columns clean and each epsilon."""
    metric = metric or reports[0]["primary_metric"]
    eps_columns = sorted({(row["eps"], row["eps_label"]) for report in reports for row in report["robust"]})
    header = ["Model", "Clean"] + [f"ε={label}" for _, label in eps_columns]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for report in reports:
        by_label = {row["eps_label"]: row["metrics"].get(metric) for row in report["robust"]}
        cells = [report_label(report), format_metric(report["clean"].get(metric))]
        cells += [format_metric(by_label.get(label)) for _, label in eps_columns]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def render_markdown(report: dict) -> str:
    metric = report["primary_metric"]
    lines = [
        f"# adpo eval — {report_label(report)}",
        "",
        f"- model: `{report['model']}`",
        f"- task: {report['task']}, {report['num_samples']} samples",
        f"- time: {report.get('timing', {}).get('seconds', float('nan')):.1f} s on {report.get('timing', {}).get('device', '?')}",
        "",
        "## Results",
        "",
    ]
    for name in report["metrics"]:
        lines += [f"{METRIC_LABELS.get(name, name)}" , "", results_table([report], name), ""]
    if report["task"] == "targeted":
        rates = ", ".join(f"ε={row['eps_label']}: {100 * (1 - row['metrics']['target_avoided']):.1f} %" for row in report["robust"])
        lines += [f"Targeted attack success rate: {rates}", ""]
    lines += ["Attacked samples per ε (the others were already broken on the clean image): "
              + ", ".join(f"{row['eps_label']}: {row['num_attacked']}" for row in report["robust"]), ""]
    lines += ["Gradient steps per ε (all attacked samples, passes and stages): "
              + ", ".join(f"{row['eps_label']}: {row['gradient_steps']}" for row in report["robust"]), ""]
    lines += [f"![{metric} vs ε]({PLOT_METRIC_VS_EPS})", ""]
    lines += ["## Sanity checks", ""]
    for check in report["sanity"]:
        lines.append(f"- **{_STATUS_MARK[check['status']]}** `{check['check']}` — {check['detail']}")
    if report.get("multimodal"):
        from adpo.eval.multimodal import markdown as multimodal_markdown

        lines += ["", multimodal_markdown(report).rstrip()]
    lines += ["", "## Protocol", "", report["protocol"]["summary"], ""]
    if report.get("examples"):
        lines += ["## Examples", "", f"![examples]({PLOT_EXAMPLES})", ""]
        for example in report["examples"]:
            lines.append(
                f"- `{example['id']}` ε={example['eps_label']}: clean “{example['clean_output']}” → adversarial “{example['adversarial_output']}”"
            )
        lines.append("")
    return "\n".join(lines)


def _curve(report: dict, metric: str):
    from adpo.eval.plots import Curve

    rows = sorted(report["robust"], key=lambda row: row["eps"])
    return Curve(
        label=report_label(report),
        eps=[0.0] + [row["eps"] for row in rows],
        values=[report["clean"][metric] * DISPLAY_SCALE] + [row["metrics"][metric] * DISPLAY_SCALE for row in rows],
    )


def write_report(report: dict, out_dir: str | os.PathLike) -> dict[str, Path]:
    """Run the sanity checks, then write report.json, report.md and the plots into ``out_dir``."""
    from adpo.eval.plots import ExamplePanel, plot_examples, plot_metric_vs_eps

    out_dir = Path(out_dir)
    report["sanity"] = sanity_checks(report)
    metric = report["primary_metric"]
    paths = {
        "plot": plot_metric_vs_eps([_curve(report, metric)], out_dir / PLOT_METRIC_VS_EPS, METRIC_LABELS.get(metric, metric), title=report["task"]),
    }
    if report.get("examples"):
        import numpy as np
        from PIL import Image

        panels = [
            ExamplePanel(
                clean_image=np.asarray(Image.open(out_dir / ex["clean_image"]).convert("RGB")),
                adversarial_image=np.asarray(Image.open(out_dir / ex["adversarial_image"]).convert("RGB")),
                prompt=ex["prompt"],
                clean_output=ex["clean_output"],
                adversarial_output=ex["adversarial_output"],
                title=f"{ex['id']} ε={ex['eps_label']}",
            )
            for ex in report["examples"]
        ]
        paths["examples"] = plot_examples(panels, out_dir / PLOT_EXAMPLES)
    paths["json"] = write_text_atomic(out_dir / REPORT_JSON, json.dumps(report, indent=2, ensure_ascii=False))
    paths["markdown"] = write_text_atomic(out_dir / REPORT_MARKDOWN, render_markdown(report))
    return paths


def load_report(path: str | os.PathLike) -> dict:
    """Load a report from its directory or its report.json."""
    path = Path(path)
    if path.is_dir():
        path = path / REPORT_JSON
    if not path.exists():
        raise FileNotFoundError(f"No evaluation report at {path}; pass a directory written by `adpo eval` (it holds {REPORT_JSON}).")
    report = json.loads(path.read_text(encoding="utf-8"))
    if report.get("format") != REPORT_FORMAT:
        raise ValueError(f"{path} is not an adpo eval report (format={report.get('format')!r}, expected {REPORT_FORMAT!r}).")
    return report


# -- Paired comparison against a baseline ---------------------------------------------------------------


def sign_test_p_value(gained: int, lost: int) -> float:
    """Exact two-sided sign test (McNemar's exact test for 0/1 scores) of ``gained`` against ``lost``.

    Under the null hypothesis each sample whose score changed is equally likely to have gone up or down, so
    the smaller count is Binomial(gained + lost, 1/2); ties (unchanged samples) carry no information.
    """
    if gained < 0 or lost < 0:
        raise ValueError(f"counts must be >= 0, got gained={gained}, lost={lost}")
    changed = gained + lost
    if changed == 0:
        return 1.0
    tail = sum(math.comb(changed, k) for k in range(min(gained, lost) + 1)) / 2.0**changed
    return min(1.0, 2.0 * tail)


def _per_sample_scores(report: dict, metric: str) -> dict[str, dict[str, float]]:
    """``{"clean" | eps_label: {sample id: score}}`` from a report's samples."""
    columns: dict[str, dict[str, float]] = {"clean": {}}
    for sample in report["samples"]:
        columns["clean"][sample["id"]] = sample["clean"]["scores"][metric]
        for label, robust in sample["robust"].items():
            columns.setdefault(label, {})[sample["id"]] = robust["scores"][metric]
    return columns


def paired_comparison(report: dict, baseline: dict, metric: str | None = None) -> list[dict]:
    """Sample-by-sample comparison of ``report`` with ``baseline`` on the samples both scored, per column.

    One row for clean and one per ε both reports attacked: the shared sample count, the mean difference
    (report − baseline, in metric units), how many samples scored higher (``gained``) and lower (``lost``)
    than under the baseline, and the sign test's two-sided p-value. On a few dozen questions a one- or
    two-question difference is noise; the p-value says how much.
    """
    metric = metric or baseline["primary_metric"]
    ours, theirs = _per_sample_scores(report, metric), _per_sample_scores(baseline, metric)
    rows = []
    for label in ["clean"] + [row["eps_label"] for row in sorted(baseline["robust"], key=lambda row: row["eps"])]:
        if label not in ours or label not in theirs:
            continue
        shared = sorted(set(ours[label]) & set(theirs[label]))
        if not shared:
            continue
        differences = [ours[label][i] - theirs[label][i] for i in shared]
        gained = sum(d > 1e-12 for d in differences)
        lost = sum(d < -1e-12 for d in differences)
        rows.append(
            {
                "name": report_label(report),
                "baseline": report_label(baseline),
                "column": label,
                "shared_samples": len(shared),
                "delta": sum(differences) / len(shared),
                "gained": gained,
                "lost": lost,
                "p_value": sign_test_p_value(gained, lost),
            }
        )
    return rows


def paired_table(rows: Sequence[dict]) -> str:
    """Markdown for :func:`paired_comparison` rows (differences in points, i.e. ×100)."""
    lines = ["| Model | against | images | Δ (points) | gained | lost | p (sign test) |", "|---|---|---|---|---|---|---|"]
    for row in rows:
        column = row["column"] if row["column"] == "clean" else f"ε={row['column']}"
        lines.append(
            f"| {row['name']} | {row['baseline']} | {column} | {row['delta'] * DISPLAY_SCALE:+.1f} | {row['gained']} | "
            f"{row['lost']} | {row['p_value']:.2g} |"
        )
    return "\n".join(lines)


def _baseline_positions(reports: Sequence[dict], baselines: Sequence[str] | None) -> list[int | None]:
    """For each report, the index of the baseline it is compared with (None for the baselines themselves).

    Each report goes against the last baseline listed before it, so one compare can hold several groups
    (``original (small)``, its encoders, ``original (large)``, its encoders). Default: the first report.
    """
    labels = [report_label(r) for r in reports]
    if baselines:
        unknown = [name for name in baselines if name not in labels]
        if unknown:
            raise UsageError(f"--baseline {unknown} matches no report; the report names are {labels}")
        marked = {i for i, label in enumerate(labels) if label in baselines}
    else:
        marked = {0}
    positions: list[int | None] = []
    current: int | None = None
    for index in range(len(reports)):
        if index in marked:
            current = index
            positions.append(None)
        else:
            positions.append(current)
    return positions


def compare_reports(
    paths: Sequence[str | os.PathLike],
    out_dir: str | os.PathLike,
    names: Sequence[str] | None = None,
    baselines: Sequence[str] | None = None,
    versus: Sequence[tuple[str, str]] = (),
) -> dict[str, Path]:
    """One table and one chart from several reports of the same task (e.g. original, FARE, TeCoA, AdPO).

    Each report after a baseline is also compared with it sample by sample (``paired_comparison``): by default
    everything against the first report; ``baselines`` (report names) starts a new group at each one named.
    ``versus`` adds head-to-head comparisons of two named reports (e.g. AdPO against FARE on one LVLM).
    """
    from adpo.eval.plots import plot_metric_vs_eps

    if not paths:
        raise ValueError("compare needs at least one report directory.")
    reports = [load_report(p) for p in paths]
    if names:
        if len(names) != len(reports):
            raise ValueError(f"Got {len(names)} names for {len(reports)} reports; pass one --names entry per directory.")
        for report, name in zip(reports, names):
            report["name"] = name
    task, metric = reports[0]["task"], reports[0]["primary_metric"]
    for path, report in zip(paths, reports):
        if (report["task"], report["primary_metric"]) != (task, metric):
            raise ValueError(
                f"{path} is a {report['task']}/{report['primary_metric']} report but {paths[0]} is {task}/{metric}; "
                "compare reports of one task at a time."
            )
    out_dir = Path(out_dir)
    lines = [f"# adpo eval compare — {task}", ""]
    for name in reports[0]["metrics"]:
        if all(name in r["clean"] for r in reports):
            lines += [METRIC_LABELS.get(name, name) , "", results_table(reports, name), ""]
    lines += ["Sample counts: " + ", ".join(f"{report_label(r)}: {r['num_samples']}" for r in reports), ""]
    paired = [
        row
        for report, base in zip(reports, _baseline_positions(reports, baselines))
        if base is not None
        for row in paired_comparison(report, reports[base], metric)
    ]
    by_label = {report_label(r): r for r in reports}
    unknown = [name for pair in versus for name in pair if name not in by_label]
    if unknown:
        raise UsageError(f"--versus {unknown} matches no report; the report names are {list(by_label)}")
    paired += [row for first, second in versus for row in paired_comparison(by_label[first], by_label[second], metric)]
    if paired:
        lines += [
            "## Against the baseline, question by question",
            "",
            f"{METRIC_LABELS.get(metric, metric)} on the samples both reports scored: the difference in points, how "
            "many samples scored higher (gained) and lower (lost) than under the baseline, and the exact two-sided "
            "sign test's p-value (a large p: the difference is within what chance gives on this many questions).",
            "",
            paired_table(paired),
            "",
        ]
    flagged = [(report_label(r), c) for r in reports for c in r.get("sanity", []) if c["status"] != "pass"]
    if flagged:
        lines += ["## Flags", ""] + [f"- {name}: **{_STATUS_MARK[c['status']]}** `{c['check']}` — {c['detail']}" for name, c in flagged] + [""]
    lines += [f"![{metric} vs ε](compare_{PLOT_METRIC_VS_EPS})", ""]
    summary = {
        "format": "adpo-eval-compare",
        "task": task,
        "primary_metric": metric,
        "reports": [str(p) for p in paths],
        "rows": [{"name": report_label(r), "clean": r["clean"], "robust": [{k: row[k] for k in ("eps", "eps_label", "steps", "metrics")} for row in r["robust"]]} for r in reports],
        "paired": paired,
    }
    return {
        "plot": plot_metric_vs_eps([_curve(r, metric) for r in reports], out_dir / f"compare_{PLOT_METRIC_VS_EPS}", METRIC_LABELS.get(metric, metric), title=task),
        "markdown": write_text_atomic(out_dir / "compare.md", "\n".join(lines)),
        "json": write_text_atomic(out_dir / "compare.json", json.dumps(summary, indent=2, ensure_ascii=False)),
    }
