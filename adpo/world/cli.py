"""``adpo world``: build | info | prune | eval | merge for the bundled world.

    adpo world info                          # LM packages, caches, shipped weights and their hashes
    adpo world prune [--dry-run]             # delete caches left by earlier shipped weights
    adpo world build [--stages clip small large] [--out DIR] [--steps N] [--device cuda]
    adpo world eval [--sizes small large] [--clean-images 500] [--robust-images 100] [--robust-offset 0]
                    [--eps 2 4 8] [--steps 50] [--out runs/world_eval.json] [--update-config]
    adpo world merge PIECE.json [PIECE.json ...] --out runs/world_eval.json [--update-config]

``eval`` uses the evaluation protocol of :mod:`adpo.eval` (the same sampling, generation, metrics and APGD
as ``adpo eval``): WorldCLIP zero-shot accuracy, then per LVLM clean VQA exact match and caption CIDEr, and
VQA exact match under untargeted APGD on the LM loss at each epsilon. With ``--update-config`` the measured
metrics and the working epsilon (the smallest epsilon at which every evaluated LVLM's robust VQA accuracy is
<= 10 %) go into ``adpo/world/world.yaml``.

The robust part is the slow one on a CPU (seconds per question and radius), so it can be run in pieces:
``--robust-offset K --robust-images N`` attacks test questions K .. K+N-1, and ``merge`` combines pieces with
disjoint ranges into one result (robust figures weighted by their question counts; the clean figures of the
piece with the most clean images).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

from adpo.io import write_json_atomic, write_text_atomic

BREAK_THRESHOLD = 0.10  # robust VQA accuracy at or below which the world counts as broken at an epsilon


def _info() -> int:
    from adpo.world.lm import WORLD_LMS, cache_root, lm_cache_dir, lm_installed
    from adpo.world.lvlm import (
        MANIFEST_PATH, SIZES, WEIGHTS_DIR, assembled_cache_dir, folder_bytes, read_manifest, stale_world_caches,
        verify_manifest,
    )

    print(f"cache root: {cache_root()}")
    for name, lm in WORLD_LMS.items():
        state = "installed" if lm_installed(name) else f"MISSING -> {lm.install_command}"
        cached = "converted" if (lm_cache_dir(name) / "config.json").is_file() else "not converted yet"
        print(f"LM {name}: {lm.description}: {state}; cache {lm_cache_dir(name)} ({cached})")
    if not MANIFEST_PATH.is_file():
        print(f"shipped weights: {MANIFEST_PATH} missing (run `adpo world build`)")
        return 1
    manifest = read_manifest()
    status = verify_manifest()
    print(f"shipped weights in {WEIGHTS_DIR}: {len(status)} files, {manifest['total_bytes'] / 1e6:.1f} MB")
    for rel, verdict in status.items():
        print(f"  {verdict:13s} {rel}  {manifest['files'][rel]['sha256'][:16]}")
    for size in SIZES:
        try:
            folder = assembled_cache_dir(size)
            print(f"LVLM {size}: assembled cache {folder} ({'present' if (folder / 'config.json').is_file() else 'built on first load'})")
        except FileNotFoundError as error:
            print(f"LVLM {size}: {error}")
    stale = stale_world_caches()
    if stale:
        total = sum(folder_bytes(folder) for folder in stale)
        print(f"stale caches (not loaded by this checkout), {total / 1e9:.2f} GB; `adpo world prune` removes them:")
        for folder in stale:
            print(f"  {folder}")
    return 0 if all(v == "ok" for v in status.values()) else 1


def _prune(dry_run: bool, weights_dir: Path | None = None) -> int:
    import shutil

    from adpo.world.lvlm import WEIGHTS_DIR, folder_bytes, stale_world_caches

    stale = stale_world_caches(weights_dir or WEIGHTS_DIR)
    if not stale:
        print("no stale world caches")
        return 0
    total = 0
    for folder in stale:
        size = folder_bytes(folder)
        total += size
        if not dry_run:
            shutil.rmtree(folder)
        print(f"{'would remove' if dry_run else 'removed'} {folder} ({size / 1e9:.2f} GB)")
    print(f"{'would free' if dry_run else 'freed'} {total / 1e9:.2f} GB")
    return 0


# ------------------------------------------------------------------------------------------------ eval


def _eval_config(size: str, task: str, n: int, eps: list[str], steps: int, batch_size: int, progress: bool):
    from adpo.eval.config import EvalConfig

    return EvalConfig(
        model=f"world:{size}", task=task, data="world:test", num_samples=n, questions_per_image=1,
        max_new_tokens=4 if task == "vqa" else 24, attack_eps=eps, attack_steps=steps, precision_schedule=["float32"],
        vqa_targets=[], step_check_steps=0, batch_size=batch_size, num_examples=0, progress=progress,
        device="cpu",
    )


def _clean_metrics(config, model, samples, pixels, batch_size: int) -> dict:
    from adpo.eval.adapters import predict_in_batches
    from adpo.eval.tasks import make_task

    task = make_task(config, samples)
    outputs = predict_in_batches(model, pixels, samples, batch_size)
    aggregated = task.aggregate(samples, outputs, task.score(samples, outputs))
    return {**aggregated, "num_samples": len(samples), "examples": [[s.prompt, o] for s, o in list(zip(samples, outputs))[:5]]}


def check_robust_slice(clean_images: int, robust_images: int, robust_offset: int) -> None:
    """The attacked questions are a slice of the clean ones; refuse a slice that does not fit."""
    if robust_images and not 0 <= robust_offset <= clean_images - robust_images:
        raise ValueError(
            f"robust questions {robust_offset}..{robust_offset + robust_images - 1} are not inside the "
            f"{clean_images} clean test images; raise --clean-images to at least {robust_offset + robust_images} "
            "(the robust questions are a slice of the clean ones) or lower --robust-offset / --robust-images."
        )


def evaluate_world(
    sizes=("small", "large"),
    clean_images: int = 500,
    robust_images: int = 100,
    robust_offset: int = 0,
    eps=("2/255", "4/255", "8/255"),
    steps: int = 50,
    batch_size: int = 16,
    captions: bool = True,
    zeroshot: bool = True,
    progress: bool = True,
) -> dict:
    """Score the world (see the module docstring); returns the results dict."""
    from adpo.eval.loading import load_samples, prepare
    from adpo.eval.adapters import GenerativeModel, predict_in_batches
    from adpo.eval.protocol import run_protocol
    from adpo.eval.tasks import make_task
    from adpo.preprocess import to_pixels

    eps = [str(e) for e in eps]
    check_robust_slice(clean_images, robust_images if eps else 0, robust_offset)
    results: dict = {"test_split": "world:test", "protocol": {
        "clean_images": clean_images, "robust_images": robust_images, "eps": eps, "apgd_steps": steps,
        "attack": "untargeted APGD on the LM loss of the reference answer, fp32, per-sample early stop",
        "questions_per_image": 1, "vqa_metric": "exact match (adpo.eval.metrics)", "caption_metric": "CIDEr-D",
    }}
    started = time.time()
    if zeroshot:
        from adpo.eval.config import EvalConfig

        config = EvalConfig(task="zeroshot", model="world:clip", clip_model="world:clip", data="world:test",
                            num_samples=clean_images, attack_eps=eps, attack_steps=steps, device="cpu", num_examples=0, progress=progress)
        model, samples, pixels, class_names = prepare(config)
        task = make_task(config, samples, class_names)
        outputs = predict_in_batches(model, pixels, samples, 250)
        results["zeroshot"] = {**task.aggregate(samples, outputs, task.score(samples, outputs)), "num_samples": len(samples)}
    for size in sizes:
        entry: dict = {}
        size_started = time.time()
        vqa_config = _eval_config(size, "vqa", clean_images, eps, steps, batch_size, progress)
        model, samples, pixels, _ = prepare(vqa_config)
        entry["vqa_clean"] = _clean_metrics(vqa_config, model, samples, pixels, 32)
        if captions:
            caption_config = _eval_config(size, "caption", clean_images, eps, steps, batch_size, progress)
            caption_samples, _ = load_samples(caption_config)
            caption_pixels = to_pixels([s.image for s in caption_samples], model.view.processor)
            caption_model = GenerativeModel(model.view, caption_config.max_new_tokens)
            entry["caption_clean"] = _clean_metrics(caption_config, caption_model, caption_samples, caption_pixels, 32)
        if robust_images and eps:
            start, stop = robust_offset, min(robust_offset + robust_images, len(samples))
            n = stop - start
            report = run_protocol(replace(vqa_config, num_samples=n), model, samples[start:stop], pixels[start:stop],
                                  write=False)
            entry["vqa_robust"] = {
                row["eps_label"]: {**row["metrics"], "num_samples": n, "num_attacked": row["num_attacked"],
                                   "gradient_steps": row["gradient_steps"], "seconds": round(row["seconds"], 1)}
                for row in report["robust"]
            }
            entry["vqa_clean_on_robust_subset"] = report["clean"]
            entry["robust_range"] = [start, stop]
        entry["seconds"] = round(time.time() - size_started, 1)
        results[size] = entry
        del model
    results["working_eps"] = working_eps(results, sizes, eps)
    results["seconds"] = round(time.time() - started, 1)
    return results


def working_eps(results: dict, sizes, eps) -> dict | None:
    """The smallest epsilon at which robust VQA exact match of every evaluated LVLM is <= 10 %."""
    from adpo.threat import parse_eps

    for label in sorted(eps, key=parse_eps):
        values = [results.get(size, {}).get("vqa_robust", {}).get(label, {}).get("exact_match") for size in sizes]
        if values and all(v is not None and v <= BREAK_THRESHOLD for v in values):
            value = parse_eps(label)
            return {"label": label, "eps": round(value, 8), "eps_255": round(value * 255)}
    return None


# Fields of a robust figure that add up across pieces; the others are rates weighted by num_samples.
_ADDITIVE = ("num_samples", "num_attacked", "gradient_steps", "seconds")
_PROTOCOL_KEYS = ("eps", "apgd_steps", "attack", "questions_per_image", "vqa_metric")


def _robust_range(entry: dict) -> tuple[int, int]:
    """The test questions a piece attacked; results written before ranges existed attacked the first N."""
    if "robust_range" in entry:
        return tuple(entry["robust_range"])
    if "robust_ranges" in entry:  # an earlier merge: usable as one piece when its ranges are contiguous
        ranges = entry["robust_ranges"]
        if any(current[0] != previous[1] for previous, current in zip(ranges, ranges[1:])):
            raise ValueError(f"a merged result with gaps between its ranges {ranges}; merge its pieces instead")
        return ranges[0][0], ranges[-1][1]
    return 0, next(iter(entry["vqa_robust"].values()))["num_samples"]


def _weighted(figures: list[dict], weights: list[int]) -> dict:
    total = sum(weights)
    merged = {}
    for key in figures[0]:
        values = [figure[key] for figure in figures]
        if key in _ADDITIVE:
            merged[key] = round(sum(values), 1) if key == "seconds" else sum(values)
        elif all(isinstance(v, (int, float)) for v in values):
            merged[key] = sum(v * w for v, w in zip(values, weights)) / total
    return merged


def _read_piece(path: str) -> dict:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise ValueError(f"cannot read {path} as a result of `adpo world eval --out`: {error}") from error


def merge_world_evals(pieces: list[dict], names: list[str] | None = None) -> dict:
    """Combine ``adpo world eval`` results whose robust parts attacked disjoint slices of the test questions.

    Robust VQA figures are weighted by each piece's question count; clean VQA, captions and zero-shot come from
    the piece that scored the most clean images (the clean images are the same prefix of the test split).
    """
    names = names or [f"piece {i}" for i in range(len(pieces))]
    if not pieces:
        raise ValueError("nothing to merge: give the JSON files written by `adpo world eval --out`")
    reference = pieces[0]
    for name, piece in zip(names, pieces):
        if piece.get("test_split") != reference.get("test_split"):
            raise ValueError(f"{name} scored {piece.get('test_split')}, {names[0]} {reference.get('test_split')}")
        for key in _PROTOCOL_KEYS:
            if piece["protocol"].get(key) != reference["protocol"].get(key):
                raise ValueError(
                    f"{name} used {key} = {piece['protocol'].get(key)!r}, {names[0]} {reference['protocol'].get(key)!r}; "
                    "only pieces run with the same attack protocol can be merged"
                )
    merged: dict = {"test_split": reference["test_split"], "protocol": dict(reference["protocol"]), "pieces": names}
    biggest_zeroshot = max((p for p in pieces if "zeroshot" in p), key=lambda p: p["zeroshot"]["num_samples"], default=None)
    if biggest_zeroshot:
        merged["zeroshot"] = biggest_zeroshot["zeroshot"]
    sizes = [size for size in ("small", "large") if any(size in p for p in pieces)]
    robust_total = 0
    for size in sizes:
        entries = [(name, p[size]) for name, p in zip(names, pieces) if size in p]
        entry: dict = {}
        for key in ("vqa_clean", "caption_clean"):
            scored = [e[key] for _, e in entries if key in e]
            if scored:
                entry[key] = max(scored, key=lambda figure: figure["num_samples"])
        robust = sorted(((_robust_range(e), name, e) for name, e in entries if "vqa_robust" in e), key=lambda t: t[0])
        for (previous, previous_name, _), (current, name, _) in zip(robust, robust[1:]):
            if current[0] < previous[1]:
                raise ValueError(
                    f"{size}: {name} attacked questions {current[0]}..{current[1] - 1}, which overlap "
                    f"{previous_name}'s {previous[0]}..{previous[1] - 1}; merge pieces with disjoint --robust-offset ranges"
                )
        if robust:
            labels = set(robust[0][2]["vqa_robust"])
            for _, name, e in robust:
                if set(e["vqa_robust"]) != labels:
                    raise ValueError(f"{size}: {name} attacked at {sorted(e['vqa_robust'])}, others at {sorted(labels)}")
            weights = [stop - start for (start, stop), _, _ in robust]
            entry["vqa_robust"] = {
                label: _weighted([e["vqa_robust"][label] for _, _, e in robust], weights) for label in robust[0][2]["vqa_robust"]
            }
            entry["vqa_clean_on_robust_subset"] = _weighted([e["vqa_clean_on_robust_subset"] for _, _, e in robust], weights)
            entry["robust_ranges"] = [list(r) for r, _, _ in robust]
            robust_total = max(robust_total, sum(weights))
        entry["seconds"] = round(sum(e.get("seconds", 0.0) for _, e in entries), 1)
        merged[size] = entry
    merged["protocol"]["robust_images"] = robust_total
    merged["protocol"]["clean_images"] = max(p["protocol"]["clean_images"] for p in pieces)
    merged["working_eps"] = working_eps(merged, sizes, reference["protocol"]["eps"])
    merged["seconds"] = round(sum(p.get("seconds", 0.0) for p in pieces), 1)
    return merged


def update_world_config(results: dict) -> Path:
    """Merge the measured metrics into world.yaml (atomic); sizes not in ``results`` keep their recorded metrics.

    The working epsilon is recomputed from the merged robust VQA figures of both LVLMs; it is only written
    when both have been measured and one epsilon breaks both.
    """
    import yaml

    from adpo.world import WORLD_CONFIG_PATH

    config = yaml.safe_load(WORLD_CONFIG_PATH.read_text()) or {}
    metrics = dict(config.get("metrics") or {})
    if "zeroshot" in results:
        metrics["zeroshot_accuracy"] = round(results["zeroshot"]["accuracy"], 4)
        metrics["zeroshot_samples"] = results["zeroshot"]["num_samples"]
    for size in ("small", "large"):
        if size not in results:
            continue
        entry = results[size]
        row = {"vqa_exact_match": round(entry["vqa_clean"]["exact_match"], 4), "vqa_samples": entry["vqa_clean"]["num_samples"]}
        if "caption_clean" in entry:
            row["caption_cider"] = round(entry["caption_clean"]["cider"], 4)
            row["caption_samples"] = entry["caption_clean"]["num_samples"]
        if "vqa_robust" in entry:
            row["vqa_robust_exact_match"] = {k: round(v["exact_match"], 4) for k, v in entry["vqa_robust"].items()}
            row["vqa_robust_samples"] = next(iter(entry["vqa_robust"].values()))["num_samples"]
            row["apgd_steps"] = results["protocol"]["apgd_steps"]
        previous = metrics.get(size, {})
        if previous.get("vqa_samples", 0) > row["vqa_samples"]:  # a robust-only run keeps the larger clean run
            row["vqa_exact_match"], row["vqa_samples"] = previous["vqa_exact_match"], previous["vqa_samples"]
        metrics[size] = {**previous, **row}
    config["metrics"] = metrics
    merged = {size: {"vqa_robust": {k: {"exact_match": v} for k, v in metrics[size].get("vqa_robust_exact_match", {}).items()}}
              for size in ("small", "large") if size in metrics}
    labels = sorted({k for entry in merged.values() for k in entry["vqa_robust"]})
    found = working_eps(merged, ["small", "large"], labels) if len(merged) == 2 else None
    if found:
        config["working_eps"] = found["eps"]
        config["working_eps_255"] = found["eps_255"]
    config["working_eps_measured"] = bool(found)
    text = "# The bundled world's settings and measured metrics (read by adpo.world.world_config()).\n"
    text += "# Written by `adpo world eval --update-config`; later stages default to working_eps.\n"
    text += yaml.safe_dump(config, sort_keys=False)
    write_text_atomic(WORLD_CONFIG_PATH, text)
    return WORLD_CONFIG_PATH


# ------------------------------------------------------------------------------------------------ main


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="adpo world", description="The bundled offline world: build | info | prune | eval | merge."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="what is installed: LM packages, caches, shipped weights (hash check)")
    prune = sub.add_parser(
        "prune",
        help="delete cached LVLMs/LMs this checkout no longer loads (left by earlier shipped weights; "
        "another checkout with other weights rebuilds its own on its next load)",
    )
    prune.add_argument("--dry-run", action="store_true", help="list what would be removed, remove nothing")
    build = sub.add_parser("build", help="rebuild every shipped weight from scratch (seeded)")
    build.add_argument("--stages", nargs="+", default=["clip", "small", "large"], choices=["clip", "small", "large"],
                       help="what to rebuild: WorldCLIP and/or the projectors (these train on the WorldCLIP in --out)")
    build.add_argument("--out", default=None, help="weights folder (default: the package's adpo/world/weights)")
    build.add_argument("--steps", type=int, default=None, help="projector training steps (default: as shipped)")
    build.add_argument("--train-images", type=int, default=None,
                       help="projectors: first N train-split images (default: the whole split, as shipped)")
    build.add_argument("--lm-lora-rank", type=int, default=None,
                       help="projectors: rank of the LoRA adapter trained on the LM beside them "
                            "(default: as shipped, 16; 0 keeps the LM frozen)")
    build.add_argument("--anneal-steps", type=int, default=None,
                       help="projectors: steps of the lower-learning-rate run after --steps (default: as shipped, "
                            "600; 0: none)")
    build.add_argument("--continue-training", action="store_true",
                       help="projectors: continue from the ones in --out for --steps more steps at the phase-2 "
                            "learning rates (no re-alignment, no annealing run)")
    build.add_argument("--seed", type=int, default=0, help="seed of every stage (the shipped weights use 0)")
    build.add_argument("--device", default="cpu",
                       help="where WorldCLIP trains: cpu (about 1.5 h on 2 cores) or cuda (the shipped weights: "
                            "7.7 min on one H100); the projectors train on the CPU")
    evaluate = sub.add_parser("eval", help="score the world: zero-shot, clean and robust VQA, CIDEr")
    evaluate.add_argument("--sizes", nargs="+", default=["small", "large"], choices=["small", "large"],
                          help="which LVLMs to score (the working eps needs both, here or already in world.yaml)")
    evaluate.add_argument("--clean-images", type=int, default=500, help="test images for clean VQA, captions and zero-shot")
    evaluate.add_argument("--robust-images", type=int, default=100, metavar="N",
                          help="N of those attacked per eps (0: clean only)")
    evaluate.add_argument("--robust-offset", type=int, default=0, metavar="K",
                          help="attack questions K..K+N-1 of the clean ones, to run the robust part in pieces "
                               "(combine them with `adpo world merge`)")
    evaluate.add_argument("--eps", nargs="+", default=["2/255", "4/255", "8/255"], help="l-inf radii of the robust VQA")
    evaluate.add_argument("--steps", type=int, default=50, help="APGD steps")
    evaluate.add_argument("--batch-size", type=int, default=16, help="rows attacked together (one per sample: no targeted VQA pass here)")
    evaluate.add_argument("--no-captions", action="store_true", help="skip caption CIDEr")
    evaluate.add_argument("--no-zeroshot", action="store_true", help="skip WorldCLIP zero-shot accuracy")
    evaluate.add_argument("--out", default="runs/world_eval.json", help="where the JSON results go")
    evaluate.add_argument("--update-config", action="store_true", help="write metrics + working eps into world.yaml")
    merge = sub.add_parser("merge", help="combine `eval` results whose robust parts attacked disjoint question ranges")
    merge.add_argument("pieces", nargs="+", help="JSON files written by `adpo world eval --out`")
    merge.add_argument("--out", default="runs/world_eval.json", help="where the merged JSON goes")
    merge.add_argument("--update-config", action="store_true", help="write metrics + working eps into world.yaml")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    progress = sys.stderr.isatty()
    if args.command == "info":
        return _info()
    if args.command == "prune":
        return _prune(args.dry_run)
    if args.command == "build":
        from adpo.world.build import WorldBuildConfig, build_world

        config = WorldBuildConfig(seed=args.seed)
        config.clip.device = args.device
        for stage_config in (config.small, config.large):
            stage_config.seed = args.seed
            if args.steps is not None:
                stage_config.steps = args.steps
            if args.train_images is not None:
                stage_config.train_images = args.train_images
            if args.anneal_steps is not None:
                stage_config.anneal_steps = args.anneal_steps
            if args.lm_lora_rank is not None:
                stage_config.lm_lora_rank = args.lm_lora_rank
            stage_config.continue_training = args.continue_training
        results = build_world(out_dir=args.out, stages=args.stages, config=config, progress=progress)
        print(json.dumps({"wall_seconds": results["wall_seconds"]}, indent=2))
        return 0
    if args.command == "merge":
        try:
            results = merge_world_evals([_read_piece(path) for path in args.pieces], names=args.pieces)
        except ValueError as error:
            print(f"adpo world merge: {error}", file=sys.stderr)
            return 2
    else:
        try:
            check_robust_slice(args.clean_images, args.robust_images if args.eps else 0, args.robust_offset)
        except ValueError as error:
            parser.error(str(error))
        results = evaluate_world(
            sizes=args.sizes, clean_images=args.clean_images, robust_images=args.robust_images,
            robust_offset=args.robust_offset, eps=args.eps, steps=args.steps, batch_size=args.batch_size,
            captions=not args.no_captions, zeroshot=not args.no_zeroshot, progress=progress,
        )
    write_json_atomic(args.out, results)
    if args.update_config:
        update_world_config(results)
    print(json.dumps({k: v for k, v in results.items() if k != "protocol"}, indent=2)[:4000])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
