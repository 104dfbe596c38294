"""FARE (Schlarmann et al., ICML 2024): unsupervised adversarial fine-tuning of a CLIP vision encoder.

    min_θ  E_x  max_{x' ∈ B(x, ε)}  ‖φ_θ(x') − φ_orig(x)‖²₂

φ_orig is a frozen copy of the encoder before training; the squared ℓ2 distance is summed over the
embedding's dimensions (unnormalised) and averaged over the batch; the same distance drives the inner
PGD. ``embedding: pooled`` (default) is the published variant; ``embedding: llm`` preserves the patch
features the LVLM's projector consumes instead.

    accelerate launch -m trainers.fare --config configs/fare/world.yaml
    adpo train fare --config configs/fare/world.yaml
"""

from __future__ import annotations

import sys
from dataclasses import dataclass


import torch

from adpo.errors import parse_config
from adpo.losses.encoder import fare_loss
from adpo.objectives import EmbeddingDistance
from trainers.encoder_trainer import (
    EncoderAdversarialTrainer,
    EncoderTrainingConfig,
    TowerEmbedding,
    build_tower_embedding,
    frozen_copy,
    load_encoder_for_training,
    load_training_images,
    train_and_save,
)


@dataclass
class FareConfig(EncoderTrainingConfig):
    """FARE options: everything is shared (see :class:`EncoderTrainingConfig`)."""


class FareTrainer(EncoderAdversarialTrainer):
    method = "fare"
    zero_gradient_at_clean = True
    objective_description = (
        "min_theta E_x max_{x' in B(x,eps)} ||phi_theta(x') - phi_orig(x)||_2^2 "
        "(unnormalised, summed over dimensions, batch mean; the same distance drives PGD)"
    )

    def __init__(self, model: TowerEmbedding, args: FareConfig, original: TowerEmbedding | None = None, **kwargs):
        # φ_orig: the encoder as it was before training (taken before any checkpoint is loaded into `model`)
        self.original = original if original is not None else frozen_copy(model)
        super().__init__(model=model, args=args, **kwargs)

    def prepare_batch(self, module, inputs):
        pixels = inputs["pixel_values"]
        self.original.to(pixels.device)
        with torch.no_grad():
            return {"reference": self.original(pixels)}

    def attack_objective(self, module, inputs, context):
        return EmbeddingDistance(module, context["reference"], modules=(module,))

    def adversarial_loss(self, embedding, inputs, context):
        return fare_loss(embedding, context["reference"])


def build_trainer(config: FareConfig, train_dataset=None) -> FareTrainer:
    loaded = load_encoder_for_training(config)
    model = build_tower_embedding(loaded, config.embedding)
    if train_dataset is None:
        train_dataset = load_training_images(config)
    return FareTrainer(model, config, train_dataset=train_dataset, image_processor=loaded.image_processor,
                       source=loaded.record)


def main(argv: list[str] | None = None) -> int:
    (config,) = parse_config([FareConfig], argv, prog="adpo train fare")
    out = train_and_save(build_trainer(config))
    print(f"FARE encoder written to {out}")
    return 0


if __name__ == "__main__":
    from adpo.runtime import run_as_process

    sys.exit(run_as_process(main))
