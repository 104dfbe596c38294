"""The run summary (``summary.json``) and the dataset card (``README.md``) of a pair dataset."""

from __future__ import annotations

import json
import statistics
from collections import Counter
from typing import Any


REF_LOGPS_TEXT = (
    "ref_chosen_logps = log pi(y_w|x,q), ref_rejected_logps = log pi(y_l|x_adv,q) under the original model: sums over "
    "the answer tokens as adpo.lvlm.LlavaView.encode tokenises them (chat template, answer cut after end of turn)"
)


def distance_stats(values: list[float]) -> dict[str, float] | None:
    if not values:
        return None
    return {
        "mean": statistics.fmean(values),
        "median": statistics.median(values),
        "min": min(values),
        "max": max(values),
    }


def build_summary(
    *,
    config: dict,
    eps: float,
    step_size: float,
    model_id: str,
    prompts: list[str],
    images_planned: int,
    items_planned: int,
    source_skipped: list[dict],
    shard_records: list[dict],
    answers_differ: list[bool],
    distances: list[float],
    empty_chosen: int,
    empty_rejected: int,
    pairs_in_dataset: int,
    num_processes: int,
    fingerprint: str,
) -> dict:
    """Everything the card reports, machine-readable. ``answers_differ`` / ``distances`` cover every generated pair;
    the skipped images are the files the source left out when listing, then the unreadable ones of each shard."""
    skipped = list(source_skipped) + [entry for record in shard_records for entry in record.get("skipped", [])]
    generated = len(answers_differ)
    changed = sum(answers_differ)
    seconds = sum(record.get("seconds", 0.0) for record in shard_records)
    return {
        "model_id": model_id,
        "source": {k: config.get(k) for k in ("source", "source_split", "image_column", "id_column", "image_root", "max_images")},
        "prompts": prompts,
        "prompts_per_image": config["prompts_per_image"],
        "attack": {
            "objective": "FARE embedding distance ||phi(x_adv) - phi_orig(x)||^2 against the original tower",
            "embedding": config["embedding"],
            "norm": config["attack_norm"],
            "eps": eps,
            "eps_255": eps * 255,
            "steps": config["attack_steps"],
            "step_size": step_size,
            "random_start": config["attack_random_start"],
            "momentum": config["attack_momentum"],
        },
        "decoding": {k: config[k] for k in ("max_new_tokens", "do_sample", "temperature", "top_p", "num_beams")},
        "seed": config["seed"],
        "counts": {
            "images_planned": images_planned,
            "images_skipped": len(skipped),
            "images_used": images_planned - len(skipped),
            "items_planned": items_planned,
            "pairs_generated": generated,
            "pairs_answer_changed": changed,
            "pairs_answer_unchanged": generated - changed,
            "share_answer_changed": changed / generated if generated else None,
            "unchanged_pairs": "kept" if config["keep_unchanged"] else "dropped",
            "chosen_empty": empty_chosen,
            "rejected_empty": empty_rejected,
            "pairs_in_dataset": pairs_in_dataset,
        },
        "skipped_images": skipped,
        "skip_reasons": dict(Counter(entry["reason"] for entry in skipped)),
        "embedding_distance": distance_stats(distances),
        "reference_logps": bool(config["compute_ref_logps"]),
        "shards": len(shard_records),
        "processes": num_processes,
        "generation_seconds_summed_over_processes": seconds,
        "pairs_per_second_per_process": generated / seconds if seconds > 0 else None,
        "config_fingerprint": fingerprint,
        "config": config,
    }


def _value(value: Any) -> str:
    """A Markdown table cell (pipes escaped so they do not split the cell)."""
    if isinstance(value, float):
        text = f"{value:.6g}"
    elif isinstance(value, (dict, list)):
        text = json.dumps(value, default=str)
    else:
        text = str(value)
    return text.replace("|", "\\|")


def render_card(summary: dict) -> str:
    """A Hugging Face dataset card (YAML header + Markdown) from :func:`build_summary`'s output."""
    counts, attack = summary["counts"], summary["attack"]
    share = counts["share_answer_changed"]
    lines = [
        "---",
        "tags: [adversarial-robustness, preference-optimization, adpo, llava]",
        "task_categories: [image-text-to-text]",
        "---",
        "",
        "# AdPO preference pairs",
        "",
        f"Clean-chosen / adversarial-rejected pairs made by `adpo pairs` with **{summary['model_id']}**: for each image "
        "and prompt, `chosen` is the model's answer on the clean image, `rejected` its answer on an adversarial image "
        f"crafted by PGD on the FARE objective ({attack['norm']}, eps = {attack['eps_255']:.3g}/255, {attack['steps']} steps).",
        "",
        "## Counts",
        "",
        "| | |",
        "| --- | --- |",
        f"| images planned | {counts['images_planned']} |",
        f"| images skipped (unreadable) | {counts['images_skipped']} |",
        f"| pairs generated | {counts['pairs_generated']} |",
        f"| rejected answer differs from chosen | {counts['pairs_answer_changed']}"
        + (f" ({share:.1%})" if share is not None else "") + " |",
        f"| rejected answer equals chosen | {counts['pairs_answer_unchanged']} ({counts['unchanged_pairs']}) |",
        f"| empty chosen / rejected answers | {counts['chosen_empty']} / {counts['rejected_empty']} |",
        f"| pairs in the dataset | {counts['pairs_in_dataset']} |",
        "",
    ]
    if summary["embedding_distance"]:
        d = summary["embedding_distance"]
        lines += [
            f"Achieved embedding distance ||phi(x_adv) - phi_orig(x)||^2 ({attack['embedding']} embedding, on the stored "
            f"images): mean {d['mean']:.4g}, median {d['median']:.4g}, min {d['min']:.4g}, max {d['max']:.4g}.",
            "",
        ]
    if summary["skipped_images"]:
        lines += ["## Skipped images", "", "| source_id | reason |", "| --- | --- |"]
        lines += [f"| {_value(e['source_id'])} | {_value(e['reason'])} |" for e in summary["skipped_images"][:200]]
        if len(summary["skipped_images"]) > 200:
            lines.append(f"| … | {len(summary['skipped_images']) - 200} more in summary.json |")
        lines.append("")
    lines += [
        "## How it was made",
        "",
        "| setting | value |",
        "| --- | --- |",
        f"| model | {_value(summary['model_id'])} |",
        f"| source | {_value(summary['source'])} |",
        f"| prompts ({summary['prompts_per_image']} per image, chosen with the seed) | {_value(summary['prompts'])} |",
        f"| attack | {_value(attack)} |",
        f"| decoding | {_value(summary['decoding'])} |",
        f"| seed | {summary['seed']} |",
        f"| reference log-probs | {_value(REF_LOGPS_TEXT) if summary['reference_logps'] else 'not computed'} |",
        f"| shards / processes | {summary['shards']} / {summary['processes']} |",
        f"| config fingerprint | {summary['config_fingerprint']} |",
        "",
        "The clean `image` is stored exactly as the model saw it (the processor's resize and crop) and `adv_image` is a "
        "lossless PNG on the same uint8 grid, inside the eps-ball of `image`. Every row also records eps, norm, steps, "
        "step size, the achieved embedding distance, the source id, the seed, the model and the decoding settings.",
        "",
        "## Use",
        "",
        "```python",
        "from pairs import load_pairs",
        "pairs = load_pairs('<output_dir>')  # or datasets.load_from_disk('<output_dir>/dataset')",
        "```",
        "",
        "Full run settings and per-image skip reasons: `summary.json` beside this card.",
        "",
    ]
    return "\n".join(lines)
