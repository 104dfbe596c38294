"""``adpo train <method> --config FILE``: dispatch to one trainer module."""

from __future__ import annotations

import argparse
import importlib
import sys

METHODS: dict[str, str] = {
    "adpo": "AdPO: DPO on clean-chosen vs adversarial-rejected answers + adversarial SFT (PIO + lambda*AIO), vision tower only",
    "fare": "FARE: unsupervised adversarial fine-tuning that keeps embeddings close to the original encoder's",
    "tecoa": "TeCoA: supervised adversarial fine-tuning against text embeddings of class prompts",
    "simclip": "Sim-CLIP: adversarial fine-tuning maximising cosine similarity to the clean embedding",
    "deltaclip": "ΔCLIP: adversarial contrastive vision-language pre-training of a whole CLIP model (from scratch or a checkpoint)",
    "mmcoa": "MMCoA: both CLIP towers against image and text attacks (adversarial images vs clean prompts, clean images vs adversarial prompts)",
    "instruct": "(adversarial) visual instruction tuning of a whole LVLM: projector, LM LoRA and/or tower by config",
    "classifier": "adversarial training of a ViT classifier on labelled images (a robust non-CLIP backbone)",
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in METHODS:
        parser = argparse.ArgumentParser(
            prog="adpo train",
            description="Train a robust CLIP vision encoder or LVLM. Each method reads a YAML config: "
            "adpo train <method> --config configs/<method>/<name>.yaml. Multi-GPU: "
            "accelerate launch --config_file configs/accelerate/<setup>.yaml -m trainers.<method> --config ...",
        )
        parser.add_argument("method", choices=sorted(METHODS), help="; ".join(f"{k}: {v}" for k, v in METHODS.items()))
        parser.parse_args(argv or ["--help"])
        return 2
    module = importlib.import_module(f"trainers.{argv[0]}")
    return int(module.main(argv[1:]) or 0)


if __name__ == "__main__":
    from adpo.runtime import run_as_process

    sys.exit(run_as_process(main))
