"""Pair-generation throughput: the batched generator vs a per-image loop over the same work.

Both arms run the same code (``pairs.generate.rows_for_shard``: clean generation, PGD on the FARE
objective, quantisation, adversarial generation, PNG encoding) on the same images and prompts; only
``batch_size`` differs (B images per batch vs 1). Arms are interleaved over several repeats and the
median pairs/s of each gives the ratio.

    python benchmarks/pairs_throughput.py --quick             # tiny random LLaVA, < 2 min on 2 cores
    python benchmarks/pairs_throughput.py --model world:small  # the bundled world's small LVLM

The last stdout line is one JSON object (see /work/shared/CONVENTIONS.md).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from dataclasses import replace

import numpy as np
import torch
from PIL import Image


def build_model(name: str):
    if name == "tiny":
        from adpo.testing import tiny_llava, tiny_vision_config

        # a little larger than the unit-test model so the per-call overhead is not the whole story
        return tiny_llava(seed=0, text_hidden_size=128, text_layers=4, vision_config=tiny_vision_config(image_size=64, patch_size=16, hidden_size=64, layers=4))
    from adpo.models import load_lvlm

    return load_lvlm(name, dtype="float32")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny", help="'tiny' (random, built here) or any load_lvlm name, e.g. world:small")
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: steadier on a shared 2-core machine)")
    parser.add_argument("--quick", action="store_true", help="16 images in one batch, 5 PGD steps, 8 new tokens, 3 repeats")
    args = parser.parse_args(argv)
    if args.quick:
        args.images, args.batch_size, args.steps, args.max_new_tokens, args.repeats = 16, 16, 5, 8, 3
    torch.set_num_threads(args.threads)

    from adpo.preprocess import to_pixels
    from pairs.config import PairsConfig
    from pairs.generate import PairGenerator, rows_for_shard
    from pairs.shards import plan_shards

    model, processor = build_model(args.model)
    model.eval()
    config = PairsConfig(
        model_name_or_path=args.model, source="benchmark", output_dir="unused", prompt_set="paper",
        steps=args.steps, max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, images_per_shard=args.images,
        progress=False,
    )
    eps = config.eps_value()
    rng = np.random.default_rng(0)
    ids = [f"img{i:03d}" for i in range(args.images)]
    pixels = to_pixels([Image.fromarray(rng.integers(0, 256, (96, 80, 3), dtype=np.uint8)) for _ in ids], processor)
    images = dict(zip(ids, pixels))
    (shard,) = plan_shards(ids, config.prompt_list(), 1, config.seed, args.images)
    arms = {"batched": PairGenerator(model, processor, config, eps), "per_image": PairGenerator(model, processor, replace(config, batch_size=1), eps)}
    configs = {"batched": config, "per_image": replace(config, batch_size=1)}

    rows_for_shard(arms["batched"], plan_shards(ids[:2], ["What is in the image?"], 1, 0, 2)[0], images, configs["batched"], args.model)  # warm-up
    rates: dict[str, list[float]] = {name: [] for name in arms}
    changed: dict[str, float] = {}
    for repeat in range(args.repeats):
        order = list(arms) if repeat % 2 == 0 else list(reversed(arms))  # interleave, alternating who goes first
        for name in order:
            started = time.perf_counter()
            rows = rows_for_shard(arms[name], shard, images, configs[name], args.model)
            seconds = time.perf_counter() - started
            rates[name].append(len(rows) / seconds)
            changed[name] = sum(row["answers_differ"] for row in rows) / len(rows)
            print(f"repeat {repeat} {name:9s}: {len(rows)} pairs in {seconds:.2f} s = {len(rows) / seconds:.2f} pairs/s", flush=True)

    batched, per_image = statistics.median(rates["batched"]), statistics.median(rates["per_image"])
    ratio = batched / per_image
    print(f"median pairs/s: batched {batched:.2f}, per-image {per_image:.2f}, speedup {ratio:.2f}x")
    print(json.dumps({
        "metric": "pairs_throughput_speedup",
        "value": round(ratio, 3),
        "goal": ">= 4",
        "unit": "ratio",
        "details": {
            "model": args.model, "images": args.images, "batch_size": args.batch_size, "pgd_steps": args.steps,
            "max_new_tokens": args.max_new_tokens, "repeats": args.repeats, "threads": args.threads,
            "device": str(arms["batched"].view.device),
            "pairs_per_s_batched_median": round(batched, 3), "pairs_per_s_per_image_median": round(per_image, 3),
            "pairs_per_s_batched": [round(r, 3) for r in rates["batched"]],
            "pairs_per_s_per_image": [round(r, 3) for r in rates["per_image"]],
            "share_answer_changed": changed,
        },
    }))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
