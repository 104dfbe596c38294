"""`adpo run`'s zero-shot stages: every model's zero-shot accuracy, clean and under image, text and joint attacks.

With an ``eval_zeroshot`` section in the pipeline YAML, ``adpo run`` adds one ``zeroshot-<method>`` stage per model
(the undefended one too) and a ``report-zeroshot`` stage:

* an encoder-only method (FARE, TeCoA, Sim-CLIP, AdPO) is judged with the original CLIP model's text side
  (``clip_model`` of the base config) and its trained image tower (``encoder``);
* a method that trains both towers (MMCoA, ΔCLIP) is judged with its own whole CLIP model (``<run>/clip``);
* ``report-zeroshot`` writes ``adpo eval compare`` over those reports (image attacks, each model against the
  undefended one, sample by sample, with the sign test) and ``multimodal.md``: clean, text, image and joint accuracy
  side by side, with the same paired sign test for the text and joint attacks.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from adpo.io import atomic_directory, write_json_atomic
from adpo.runtime import CLIP_DIRNAME, declared_outputs_of

# Trainers that write a whole CLIPModel in <run>/clip (both towers trained).
CLIP_TRAINERS = ("mmcoa", "deltaclip")


def zeroshot_stages(config, out: Path, stage_type, command_stage: Callable, merged_config: Callable, adpo: Callable,
                    original: str) -> list:
    """The zero-shot stages for ``config`` (a :class:`adpo.pipeline.PipelineConfig` with ``eval_zeroshot`` set)."""
    spec = config.eval_zeroshot
    base_clip = merged_config(spec, {}).get("clip_model")
    if not base_clip:
        from adpo.errors import UsageError

        raise UsageError("eval_zeroshot: its config must set clip_model, the CLIP model whose text side judges the "
                         "encoder-only methods (the bundled world's configs/eval/world_zeroshot.yaml does)")
    stages, report_dirs, names, stage_names = [], [], [], []
    for method in [original, *config.methods]:
        directory = out / "eval_zeroshot" / method
        name = f"{method} (zero-shot)"
        keys: dict[str, Any] = {"output_dir": str(directory / "report"), "seed": config.seed, "name": name,
                                "task": "zeroshot"}
        inputs: tuple[str, ...] = ()
        resolve = None
        if method == original:
            keys.update(clip_model=base_clip, model=base_clip, encoder=None)
        elif config.trainer_of(method) in CLIP_TRAINERS:
            clip = str(out / "train" / method / "run" / CLIP_DIRNAME)
            keys.update(clip_model=clip, model=clip, encoder=None)
            inputs, resolve = (f"train-{method}",), declared_outputs_of({key: (out / "train" / method / "run", "clip") for key in ("clip_model", "model")})
        else:
            keys.update(clip_model=base_clip, model=base_clip, encoder=str(out / "train" / method / "run"))
            inputs, resolve = (f"train-{method}",), declared_outputs_of({"encoder": (out / "train" / method / "run", "encoder")})
        if config.eps is not None:
            keys["attack_eps"] = [config.eps]
        stage_name = f"zeroshot-{method}"
        stages.append(command_stage(stage_name, directory, ["eval"], merged_config(spec, keys), inputs, resolve))
        report_dirs.append(directory / "report")
        names.append(name)
        stage_names.append(stage_name)

    report_dir = out / "report_zeroshot"
    compare = ["eval", "compare", *map(str, report_dirs), "--names", *names, "--baseline", names[0]]

    def run_report() -> None:
        with atomic_directory(report_dir) as staging:
            adpo([*compare, "--out", str(staging)])
            table = multimodal_comparison(report_dirs, names)
            write_json_atomic(staging / "multimodal.json", table)
            (staging / "multimodal.md").write_text(multimodal_markdown(table), encoding="utf-8")

    stages.append(stage_type("report-zeroshot", report_dir, {"compare": compare}, run_report, tuple(stage_names)))
    return stages


def multimodal_comparison(report_dirs: list[Path], names: list[str]) -> dict:
    """Per model: accuracy clean, under the text attack, and per ε under the image and the joint attacks; per attack,
    against the first model (the undefended one) sample by sample: gained, lost, sign-test p."""
    import json

    from adpo.eval.report import sign_test_p_value

    reports = [json.loads((Path(d) / "report.json").read_text(encoding="utf-8")) for d in report_dirs]

    def robust_by_attack(report: dict) -> dict[str, dict[str, bool]]:
        columns = {"clean": {s["id"]: s["clean"]["scores"]["accuracy"] > 0 for s in report["samples"]}}
        section = report.get("multimodal", {})
        if "text" in section.get("samples", {}):
            columns["text"] = {row["id"]: row["robust"] for row in section["samples"]["text"]}
        for row in report["robust"]:
            label = row["eps_label"]
            columns[f"image {label}"] = {s["id"]: s["robust"][label]["scores"]["accuracy"] > 0 for s in report["samples"]}
            if f"joint {label}" in section.get("samples", {}):
                columns[f"joint {label}"] = {r["id"]: r["robust"] for r in section["samples"][f"joint {label}"]}
        return columns

    tables = [robust_by_attack(report) for report in reports]
    baseline = tables[0]
    rows = []
    for name, table in zip(names, tables):
        row: dict[str, Any] = {"name": name, "accuracy": {}, "versus_first": {}}
        for attack, outcome in table.items():
            row["accuracy"][attack] = sum(outcome.values()) / max(len(outcome), 1)
            if attack in baseline and name != names[0]:
                shared = set(outcome) & set(baseline[attack])
                gained = sum(outcome[i] and not baseline[attack][i] for i in shared)
                lost = sum(baseline[attack][i] and not outcome[i] for i in shared)
                row["versus_first"][attack] = {"gained": gained, "lost": lost, "p": sign_test_p_value(gained, lost)}
        rows.append(row)
    return {"baseline": names[0], "samples": len(next(iter(baseline.values()))), "rows": rows}


def multimodal_markdown(table: dict) -> str:
    attacks = list(table["rows"][0]["accuracy"])
    lines = [
        f"# Zero-shot accuracy under image, text and joint attacks ({table['samples']} samples, %)",
        "",
        "| model | " + " | ".join(attacks) + " |",
        "|---|" + "---|" * len(attacks),
    ]
    for row in table["rows"]:
        lines.append(f"| {row['name']} | " + " | ".join(f"{100 * row['accuracy'].get(a, float('nan')):.1f}" for a in attacks) + " |")
    lines += ["", f"Against {table['baseline']}, sample by sample (gained / lost, sign-test p):", "",
              "| model | " + " | ".join(attacks) + " |", "|---|" + "---|" * len(attacks)]
    for row in table["rows"][1:]:
        cells = []
        for attack in attacks:
            paired = row["versus_first"].get(attack)
            cells.append("—" if paired is None else f"{paired['gained']} / {paired['lost']} (p = {paired['p']:.2g})")
        lines.append(f"| {row['name']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
